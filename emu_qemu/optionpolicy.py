"""Which of a node's own ``options`` may reach QEMU: an allow-list, read the way QEMU reads.

A node's options come from whoever wrote the node. QEMU has many ways to reach the host
from its command line — a file to open, a device to pass through, a socket, a script to
run — and several syntaxes to spell each: ``key=value`` lists with an implied first key,
``no``-prefixed booleans, ``,,`` for a comma, dotted keys, JSON objects (``-device
'{"driver": ...}'``, with ``\\u`` escapes), ``-global`` in two forms, ``-set`` and
``-readconfig`` that edit anything, and a bare word QEMU opens as a disk image. So:

* an option must be in :data:`ALLOWED` (anything else: refused), and its value is parsed as
  QEMU parses it (a JSON object when it starts with ``{``, else an option string);
* in any value, no key (at any depth, dotted or ``no``-prefixed) may be one of
  :data:`UNSAFE_KEYS`; a ``-device`` or ``-global`` may not name a driver of
  :data:`UNSAFE_DEVICES` or :data:`UNSAFE_DEVICE_PREFIXES` (but a ``-device
  vhost-vsock-pci`` whose ``guest-cid`` is the node's own, claimed for ``%guest-cid%``);
* a word that is neither an option nor an option's value is refused (QEMU would open it as
  the first hard disk), as is a value that cannot be parsed (JSON QEMU might read otherwise).

Devices are checked against a deny-list, not an allow-list: QEMU 7.2 has hundreds of device
models and the ones that reach the host are a small, known set (passthrough, host files,
host sound, vhost/vfio backends).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Checker = Callable[[str, str], list[str]]

# Keys that name a host file, directory, device, descriptor, script or port, in any option.
UNSAFE_KEYS = frozenset(
    "file filename romfile kernel initrd firmware dtb dumpdtb splash rrfile path logfile"
    " mem-path rootdir db evdev fd fds vhostfd vhostfds script downscript helper tftp"
    " bootfile smb hostfwd guestfwd sock socket vnc sysfsdev host hostdevice".split()
)

# Devices that reach into the host: load host files, pass host devices through, open the
# host's sound system, or need vhost/vfio/xen backends.
UNSAFE_DEVICES = frozenset(
    "loader guest-loader usb-host u2f-passthru usb-mtp ccid-card-emulated ccid-card-passthru"
    " usb-redir pvrdma AC97 ES1370 sb16 cs4231a gus adlib intel-hda ich9-intel-hda hda-duplex"
    " hda-micro hda-output usb-audio virtio-sound virtio-sound-pci".split()
)
UNSAFE_DEVICE_PREFIXES = ("vfio-", "vhost-", "xen-", "virtio-input-host", "virtio-9p", "ivshmem")

_PLAIN_NAME = r"[A-Za-z0-9_.\-]{1,64}"
_UUID = r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"


def _items(value: str) -> list[str]:
    """The items of an option string as QEMU reads them (``,,`` is a literal comma)."""
    return [item.replace("\0", ",") for item in value.replace(",,", "\0").split(",")]


def _key_names(key: str) -> set[str]:
    """Every name a key may stand for: each dotted part, with and without a ``no`` prefix
    (QEMU reads a bare ``nofoo`` as ``foo=off``)."""
    parts = {part.strip() for part in key.split(".")}
    return parts | {part.removeprefix("no") for part in parts}


def unsafe_device(driver: str) -> bool:
    """Whether ``driver`` is a device model that reaches into the host."""
    driver = driver.strip()
    return driver in UNSAFE_DEVICES or driver.startswith(UNSAFE_DEVICE_PREFIXES)


def _walk_json(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every member of a JSON value, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            yield from _walk_json(item, path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicated = {key for key in keys if keys.count(key) > 1}
    if duplicated:
        raise ValueError(f"duplicate key {sorted(duplicated)[0]!r}")
    return dict(pairs)


def parse_value(value: str, implied: str | None) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of an option's value as QEMU reads it: a JSON object when it
    starts with ``{`` (members at any depth), else an option string whose first bare item
    is the ``implied`` key and later bare items are booleans.

    :raises ValueError: JSON that does not parse (or repeats a key).
    """
    if value.startswith("{"):
        parsed = json.loads(value, object_pairs_hook=_no_duplicates)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return list(_walk_json(parsed))
    pairs: list[tuple[str, Any]] = []
    for index, item in enumerate(_items(value)):
        key, sep, rest = item.partition("=")
        if sep:
            pairs.append((key, rest))
        elif index == 0 and implied is not None:
            pairs.append((implied, key))
        elif key:
            pairs.append((key, "on"))
    return pairs


def _checked_pairs(option: str, value: str, implied: str | None) -> tuple[list[str], list[Any]]:
    try:
        pairs = parse_value(value, implied)
    except ValueError as exc:
        return [f"{option} {value[:40]!r}: cannot be read ({exc})"], []
    problems = [
        f"{option} {name}="
        for key, _ in pairs
        for name in sorted(_key_names(str(key)) & UNSAFE_KEYS)
    ]
    return problems, pairs


def option_string(implied: str | None = None) -> Checker:
    """A value that is an option string or a JSON object; no unsafe key anywhere."""

    def check(option: str, value: str) -> list[str]:
        return _checked_pairs(option, value, implied)[0]

    return check


# The vsock device a guest is reached at by its CID: allowed with the node's own CID only.
VSOCK_DEVICE = "vhost-vsock-pci"


def device(option: str, value: str, guest_cid: int | None = None) -> list[str]:
    """``-device``: no unsafe key, and a driver that does not reach into the host; or
    ``vhost-vsock-pci`` with ``guest-cid`` set to ``guest_cid``, the node's own."""
    problems, pairs = _checked_pairs(option, value, "driver")
    drivers = [str(v) for k, v in pairs if k == "driver"]
    cids = [str(v) for k, v in pairs if k == "guest-cid"]
    own_vsock = guest_cid is not None and drivers == [VSOCK_DEVICE] and cids == [str(guest_cid)]
    problems += [
        f"{option} {driver}" for driver in drivers if unsafe_device(driver) and not own_vsock
    ]
    return problems


def global_default(option: str, value: str) -> list[str]:
    """``-global DRIVER.PROP=VALUE`` or ``-global driver=D,property=P,value=V``."""
    problems, pairs = _checked_pairs(option, value, None)
    named = dict((str(k), str(v)) for k, v in pairs)
    if "property" in named or "driver" in named:
        driver, prop = named.get("driver", ""), named.get("property", "")
    else:
        driver, _, prop = next((str(k) for k, _ in pairs), "").rpartition(".")
    if prop in UNSAFE_KEYS or prop.removeprefix("no") in UNSAFE_KEYS:
        problems.append(f"{option} {prop}=")
    if unsafe_device(driver):
        problems.append(f"{option} {driver}")
    return sorted(set(problems))


def plain(pattern: str, what: str) -> Checker:
    """A value that must fully match ``pattern``."""
    compiled = re.compile(pattern)

    def check(option: str, value: str) -> list[str]:
        return [] if compiled.fullmatch(value) else [f"{option} {value[:40]!r} (must be {what})"]

    return check


# Options without a value that change only the virtual machine or how QEMU treats the guest.
FLAGS = frozenset(
    "-no-acpi -no-hpet -no-reboot -no-shutdown -usb -nographic -enable-kvm -no-fd-bootchk"
    " -win2k-hack -full-screen -alt-grab -ctrl-grab -show-cursor -mem-prealloc"
    " -only-migratable -nodefaults -no-user-config -S".split()
)

# Options with a value, and how the value is checked.
ALLOWED: dict[str, Checker] = {
    "-machine": option_string("type"),
    "-M": option_string("type"),
    "-cpu": option_string("model"),
    "-accel": option_string("accel"),
    "-smp": option_string("cpus"),
    "-m": option_string("size"),
    "-device": device,
    "-global": global_default,
    "-rtc": option_string(),
    "-boot": option_string("order"),
    "-name": option_string("guest"),
    "-smbios": option_string("type"),
    "-numa": option_string("type"),
    "-icount": option_string("shift"),
    "-overcommit": option_string(),
    "-msg": option_string(),
    "-action": option_string(),
    "-fw_cfg": option_string("name"),
    "-prom-env": option_string(),
    "-vga": plain(r"[a-z0-9_\-]{1,32}", "a display adapter name"),
    "-k": plain(r"[a-z]{2}(-[a-z]{2,})?", "a keyboard layout like en-us"),
    "-uuid": plain(_UUID, "a UUID"),
    "-watchdog": plain(_PLAIN_NAME, "a watchdog model"),
    "-watchdog-action": plain(_PLAIN_NAME, "an action name"),
    "-g": plain(r"\d{1,5}x\d{1,5}(x\d{1,2})?", "a resolution like 1024x768x32"),
    "-tb-size": plain(r"\d{1,6}", "a size in MiB"),
    "-echr": plain(r"\d{1,3}", "a character code"),
}


def option_name(word: str) -> str:
    """How QEMU names the option ``word`` (``--device`` is ``-device``)."""
    return "-" + word[2:] if word.startswith("--") else word


def unsafe_options(argv: Sequence[str], guest_cid: int | None = None) -> list[str]:
    """Why each unsafe part of ``argv`` (a node's options, placeholders replaced) may not
    reach QEMU; empty when all of it may.

    :param guest_cid: the node's claimed guest CID, if any: a ``vhost-vsock-pci`` device
        with that ``guest-cid`` may be used.
    """
    problems: list[str] = []
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "-":
            problems.append(f"{word[:40]!r} (QEMU would open it as a disk image)")
            continue
        option = option_name(word)
        if option in FLAGS:
            continue
        checker = ALLOWED.get(option)
        if checker is None:
            problems.append(option.split("=", 1)[0][:40])  # QEMU knows no "-opt=value" either
            continue
        value = next(words, None)
        if value is None:
            problems.append(f"{option} (needs a value)")
            continue
        if value.startswith("-"):
            # QEMU would take it as the value; a reader (or a check) would take an option.
            problems.append(f"{option} {value[:40]!r} (a value may not start with '-')")
            continue
        if checker is device:
            problems += device(option, value, guest_cid)
        else:
            problems += checker(option, value)
    return problems
