"""Fuzzed node, settings and link descriptions (Hypothesis): errors are EmuErrors that name
the field, node or file, and no command line holds an option its description did not ask for.

Everything goes through a real session (the installed plugins, the real QEMU binary for its
version) and ``node.dry_run()`` with ``EMU_QEMU_KVM=off``: no QEMU starts. Image names are
real files in an image directory, and the project directory itself holds a comma.

**"An option the description did not ask for"**, precisely. The argv is split into emu's
part and the user's part (the node's ``options``, which come last):

1. The user's part is exactly ``shlex.split(options)`` with each placeholder (``%vm-name%``,
   ``%vm-id%``, ``%project-id%``, ``%project-path%``, ``%console-port%``) replaced once by its
   value, commas doubled; and a placeholder never changes the items QEMU reads from the value
   of an option: read as QEMU 7.2's option parser reads it (``util/qemu-option.c``: the key
   ends at the first ``=`` or ``,``; ``,,`` is a comma only inside a value; a first item
   without ``=`` is the implied key's value for options that have one, a flag otherwise),
   the value has the kinds of items and the keys the user wrote. A value in which a
   placeholder produced an empty flag is exempt: QEMU refuses it, so nothing gets through.
2. emu's part, read QEMU-style (an option, then its value if it takes one), holds only
   options emu generates, and as a multiset exactly the ones this description calls for
   (computed here from the description, independently of emu's code), each with exactly
   the expected items: every option string is split at unescaped commas, its keys are the
   expected set for that option, and every value that came from the user (node name,
   file names, kernel command line, hosts, TAP names) reads back as the user wrote it.
   Plain-value options (``-kernel``, ``-append``, ...) must equal the value as a whole.

Refusals must be ``EmuError`` subclasses: a ``ConfigError`` whose every problem
starts with a field path (``$.field...``) and that names the node (or the settings or lab
file), or a ``NodeError`` that starts with the node and names the property.

The bugs the fuzzing found have a test of their own at the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shlex
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emu_qemu.guestcid import claimed_cid
from emu_qemu.network import adapter_mac
from emu_qemu.properties import (
    ADAPTER_TYPES,
    BOOT_PRIORITIES,
    CONSOLE_TYPES,
    DISK_INTERFACES,
    DRIVES,
    ON_CLOSE,
    PROCESS_PRIORITIES,
    QemuProperties,
)
from emucore.convert import structure
from emucore.errors import ConfigError, EmuError, NodeError
from emucore.lab import load_lab
from emucore.models import HostSettings, LinkFilters, Project, TapNio, UdpNio
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.session import Session
from tests.conftest import option_items

pytestmark = pytest.mark.usefixtures("kvm_off")

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
NODE_EXAMPLES = 1500
LINK_EXAMPLES = 400
FILTER_EXAMPLES = 300

PROPERTY_FIELDS = frozenset(field.name for field in attrs.fields(QemuProperties))
# The test's own list (not emu's) of QEMU options that open host files, devices or sockets.
HOST_REACHING_OPTIONS = frozenset(
    "-drive -blockdev -hda -hdb -hdc -hdd -cdrom -fda -fdb -mtdblock -sd -pflash -snapshot"
    " -netdev -nic -net -fsdev -virtfs -chardev -serial -parallel -monitor -qmp -qmp-pretty"
    " -mon -debugcon -gdb -incoming -loadvm -readconfig -writeconfig -add-fd -object -plugin"
    " -trace -D -pidfile -daemonize -runas -chroot -option-rom -bios -kernel -initrd -dtb"
    " -L -usbdevice -sandbox -spice -vnc -audiodev -tpmdev -display -set -s -mem-path"
    " -acpitable -semihosting -semihosting-config -qtest".split()
)

PLACEHOLDER = re.compile(r"%(?:vm-name|vm-id|project-id|project-path|console-port|guest-cid)%")

# Options emu itself generates: those that take a value, and flags.
EMU_VALUED = frozenset(
    "-accel -machine -name -uuid -m -smp -display -qmp -boot -bios -kernel -initrd -append"
    " -drive -device -netdev -chardev -serial -vnc -vga -spice -tpmdev".split()
)
EMU_FLAGS = frozenset("-S -nodefaults -no-user-config".split())
# Options whose value QEMU takes whole, not as an option string.
PLAIN_VALUE = frozenset("-kernel -initrd -bios -append -uuid -vga -serial -k".split())
# Options whose first item, when it has no "=", is the value of an implied key (QEMU 7.2).
IMPLIED_KEY = frozenset(
    "-device -netdev -chardev -name -boot -machine -m -smp -accel -cpu -vnc -display".split()
)

# Pieces that break naive quoting or option strings.
TOKENS = [
    ",",
    ",,",
    "=",
    ",if=none",
    ",file=/etc/shadow",
    ",readonly=on",
    "id=x",
    "%vm-name%",
    "%vm-id%",
    "%project-path%",
    "%console-port%",
    "%guest-cid%",
    "%",
    "'",
    '"',
    "\\",
    "\n",
    "\t",
    " ",
    "-",
    "-S",
    "-drive",
    " -snapshot",
    ":",
    ";",
    "$HOME",
    "é",
    "☃",
    "a",
    "R1",
    "0",
]


def tricky(max_tokens: int = 6, min_tokens: int = 0) -> st.SearchStrategy[str]:
    """Text built from pieces that break quoting and option strings, plus random text."""
    piece = st.one_of(st.sampled_from(TOKENS), st.text(max_size=3))
    return st.lists(piece, min_size=min_tokens, max_size=max_tokens).map("".join)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 40), 1 << 40),
    st.floats(allow_nan=True),
    tricky(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn about as often as its weight says (``one_of``
    ignores repeated strategies, so repeating one does not weigh it)."""
    slots = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(slots))).flatmap(lambda index: slots[index])


def mostly(good: st.SearchStrategy[Any], weight: int = 10) -> st.SearchStrategy[Any]:
    """``good`` about ``weight`` times out of ``weight + 1``, else a value of any type."""
    return weighted((weight, good), (1, JUNK))


def choice_or_tricky(choices: frozenset[str] | tuple[str, ...]) -> st.SearchStrategy[Any]:
    return weighted((8, st.sampled_from(sorted(choices))), (1, tricky(3)), (1, JUNK))


MACS = st.builds(
    lambda first, rest: ":".join([f"{first:02x}", *(f"{b:02x}" for b in rest)]),
    weighted((4, st.integers(0, 127).map(lambda byte: byte * 2)), (1, st.integers(0, 255))),
    st.lists(st.integers(0, 255), min_size=5, max_size=5),
)
GOOD_HOSTS = st.sampled_from(["127.0.0.1", "127.0.0.2", "localhost", "::1", "10.0.0.2", "r-1.lab"])
HOSTS = weighted((6, GOOD_HOSTS), (1, tricky(3)))
IFNAMES = st.one_of(st.from_regex(r"[A-Za-z0-9_.\-]{1,15}", fullmatch=True), tricky(3))
PORTS = st.one_of(st.integers(1, 65535), st.integers(-2, 70000), JUNK)


def nio() -> st.SearchStrategy[dict[str, Any]]:
    """A NIO in GNS3's spelling or emu's, sometimes with a bad or extra key."""
    forms = st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("nio_udp"), "lport": PORTS, "rhost": HOSTS, "rport": PORTS}
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("udp"),
                "local_port": PORTS,
                "remote_host": HOSTS,
                "remote_port": PORTS,
            }
        ),
        st.fixed_dictionaries({"type": st.just("nio_tap"), "tap_device": IFNAMES}),
        st.fixed_dictionaries({"type": st.just("tap"), "device": IFNAMES}),
    )
    extra = st.dictionaries(st.sampled_from(["type", "lport", "x", "filters"]), JUNK, max_size=1)
    return weighted((3, forms), (1, st.builds(lambda a, b: a | b, forms, extra)))


# -- image files ---------------------------------------------------------------------------

POOL = [
    "plain.qcow2",
    "raw.img",
    "a,b.qcow2",
    "x.qcow2,if=none,file=,,etc,,shadow",
    "x.img,format=raw,readonly=on",
    "q'uote\".img",
    "new\nline.img",
    "eq=ual.qcow2",
    "%vm-name%.img",
    "%project-path%,media=cdrom.img",
    "-drive.img",
    "-S",
    "sp ace.img",
    "sub/inner,x=y.qcow2",
    "é☃.img",
    ",,.img",
    "=",
    "a dir",
]
QCOW2_MAGIC = b"QFI\xfb"


def write_image(path: Path) -> None:
    """A small file: a qcow2 magic for ``*.qcow2`` (format sniffing), zeros otherwise; left
    out when the name cannot be a file here (a parent is a file, the name too long)."""
    head = QCOW2_MAGIC if path.name.endswith(".qcow2") else b""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(head + bytes(512 - len(head)))


def creatable(name: str) -> bool:
    parts = name.split("/")
    return (
        "\0" not in name
        and not name.startswith("/")
        and "" not in parts[:-1]
        and all(part not in (".", "..") for part in parts)
        and parts[-1] not in ("", ".", "..")
    )


@attrs.define
class FuzzLab:
    """An image directory full of awkward names, a project whose path holds a comma."""

    root: Path
    images: Path
    project: Project
    plugins: Any
    runner: asyncio.Runner

    def run(self, work: Any) -> Any:
        return self.runner.run(asyncio.wait_for(work, 30))

    def image_names(self) -> st.SearchStrategy[str]:
        """Existing files, files created on demand, missing ones, absolute paths in and out."""
        inside = st.sampled_from(POOL).map(lambda name: str(self.images / name))
        return weighted(
            (4, st.sampled_from(POOL)),
            (2, tricky(5, min_tokens=1)),
            (1, inside),
            (1, st.sampled_from(["/etc/passwd", str(self.root / "outside.img"), "missing.img"])),
        )


@pytest.fixture
def fuzz_lab(tmp_path: Path) -> Iterator[FuzzLab]:
    images = tmp_path / "images"
    for name in POOL:
        if name == "a dir":
            (images / name).mkdir(parents=True)
        else:
            write_image(images / name)
    write_image(tmp_path / "outside.img")
    # The comma and the unsafe key make any unescaped use of the path visible.
    project = Project.for_directory(tmp_path / "p,logfile=evil")
    runner = asyncio.Runner()
    try:
        yield FuzzLab(tmp_path, images, project, make_plugin_manager(), runner)
    finally:
        runner.close()


# -- descriptions ----------------------------------------------------------------------------


# Placeholders where users put them: inside option strings, as an implied value, as a flag.
PLACED = [
    "-name %vm-name%",
    "-smbios type=1,product=%vm-name%,serial=%vm-id%",
    "-device virtio-rng-pci,id=%vm-name%",
    "-device virtio-rng-pci,%vm-name%",
    "-boot %vm-name%",
    "-rtc base=utc,%vm-name%",
    "-smbios type=2,product=%project-path%",
    "-smbios type=1,version=%console-port%",
    "-uuid %vm-id%",
]
# Node names made of what breaks option strings.
NAMES = st.lists(
    st.sampled_from([",", ",,", "a", "b", "=", ",x", " "]), min_size=1, max_size=5
).map("".join)


def user_options() -> st.SearchStrategy[str]:
    """The node's ``options``: safe and unsafe options, option strings with placeholders and
    awkward values, shell-quoted or not."""
    value = st.one_of(tricky(4), st.sampled_from(["%vm-name%", "%vm-id%", "%console-port%"]))
    keys = st.sampled_from(
        ["type", "product", "serial", "id", "base", "menu", "driver", "file", "romfile", "mac"]
    )
    option_string = st.lists(st.tuples(keys, value), min_size=1, max_size=3).map(
        lambda pairs: ",".join(f"{k}={v}" for k, v in pairs)
    )
    head = st.sampled_from(["", "virtio-rng-pci,", "type=1,", "e1000,"])
    safe = st.sampled_from("-smbios -device -rtc -global -cpu -boot -uuid -name -k".split())
    unsafe = st.sampled_from("-drive -netdev -chardev -snapshot -s".split())
    valued = st.tuples(
        weighted((5, safe), (1, unsafe)),
        st.builds(lambda h, s: h + s, head, option_string) | value,
    ).map(list)
    flag = st.sampled_from(["-no-hpet", "-usb", "-nographic", "-no-reboot"])
    words = st.lists(
        weighted((2, valued), (1, flag.map(lambda f: [f])), (1, value.map(lambda v: [v]))),
        max_size=5,
    )
    quoted = words.map(lambda groups: " ".join(shlex.quote(w) for g in groups for w in g))
    raw = words.map(lambda groups: " ".join(w for g in groups for w in g))
    return weighted((3, quoted), (1, raw), (1, st.just("")), (2, st.sampled_from(PLACED)))


@st.composite
def node_descriptions(draw: st.DrawFn, lab: FuzzLab) -> dict[str, Any]:
    """A QEMU node description: mostly sensible values, some awkward, some of the wrong type."""
    image = lab.image_names()
    optional: dict[str, st.SearchStrategy[Any]] = {
        "ram": mostly(st.integers(1, 512)),
        "cpus": mostly(st.integers(1, 4)),
        "maxcpus": mostly(st.integers(1, 8)),
        "adapters": mostly(weighted((3, st.integers(0, 6)), (1, st.integers(0, 45)))),
        "adapter_type": choice_or_tricky(ADAPTER_TYPES),
        "custom_adapters": mostly(
            st.lists(
                st.fixed_dictionaries(
                    {"adapter_number": mostly(st.integers(0, 2) | st.integers(0, 6))},
                    optional={
                        "adapter_type": choice_or_tricky(ADAPTER_TYPES),
                        "mac_address": MACS | tricky(2),
                        "port_name": tricky(3),
                    },
                ),
                max_size=3,
            )
        ),
        "mac_address": MACS | tricky(2),
        "cdrom_image": image,
        "bios_image": image,
        "kernel_image": image,
        "initrd": image,
        "kernel_command_line": mostly(tricky(8)),
        "boot_priority": choice_or_tricky(BOOT_PRIORITIES),
        "console": mostly(st.one_of(st.none(), st.integers(0, 65535), st.integers(5900, 6100))),
        "console_type": choice_or_tricky(CONSOLE_TYPES),
        "aux": mostly(st.one_of(st.none(), st.integers(0, 65535), st.integers(5900, 6100))),
        "aux_type": choice_or_tricky(CONSOLE_TYPES),
        "uefi": mostly(st.booleans()),
        "tpm": mostly(st.booleans()),
        "linked_clone": mostly(st.booleans()),
        "on_close": choice_or_tricky(ON_CLOSE),
        "cpu_throttling": mostly(st.integers(0, 100)),
        "process_priority": choice_or_tricky(PROCESS_PRIORITIES),
        "options": mostly(user_options()),
        "legacy_networking": st.sampled_from([False] * 8 + [True]),
        "platform": st.sampled_from(["", "x86_64", "x86_64", "i386", "arm"]),
        "qemu_path": st.sampled_from(
            ["qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"] * 2 + ["/nonexistent,if=none"]
        ),
        "nios": mostly(
            st.dictionaries(
                weighted(
                    (4, st.integers(0, 1)), (1, st.integers(0, 6)), (1, st.sampled_from(["1", "x"]))
                ),
                nio(),
                max_size=3,
            )
        ),
    }
    for drive in DRIVES:
        optional[f"hd{drive}_disk_image"] = image
        optional[f"hd{drive}_disk_interface"] = choice_or_tricky(DISK_INTERFACES)
    chosen = draw(st.sets(st.sampled_from(sorted(optional)), max_size=8))
    needs_kernel = bool({"initrd", "kernel_command_line"} & chosen)
    if needs_kernel and draw(st.integers(0, 4)) > 0:
        chosen.add("kernel_image")  # mostly give what needs a kernel its kernel
    description: dict[str, Any] = {
        "name": draw(mostly(weighted((2, tricky(6, min_tokens=1)), (1, NAMES)), weight=10)),
        "emulator": draw(mostly(st.just("qemu"), weight=40)),
    }
    if draw(st.booleans()):
        chosen.add("options")  # the options are where placeholders meet names
    description |= {key: draw(optional[key]) for key in sorted(chosen)}
    if draw(st.integers(0, 30)) == 0:
        description |= draw(st.dictionaries(tricky(2, min_tokens=1), JUNK, max_size=2))
    return description


def host_settings(lab: FuzzLab) -> st.SearchStrategy[dict[str, Any]]:
    """Host settings as a host would read them from a file."""
    return st.fixed_dictionaries(
        {"image_dirs": st.just([str(lab.images)]), "emulators": st.just({"qemu": {"kvm": "off"}})},
        optional={
            "console_host": weighted((8, GOOD_HOSTS), (1, tricky(3)), (1, JUNK)),
            "udp_host": weighted((8, GOOD_HOSTS), (1, tricky(3)), (1, JUNK)),
            "allow_unsafe_options": st.booleans(),
        },
    )


# -- the oracle --------------------------------------------------------------------------------


def substitute(word: str, values: Mapping[str, str]) -> str:
    """Each placeholder replaced once by its value, commas doubled (most QEMU arguments are
    option strings); a value is never searched for placeholders again."""
    return PLACEHOLDER.sub(lambda match: values[match.group(0)].replace(",", ",,"), word)


def items(value: str) -> tuple[tuple[str, str], ...]:
    """An option string's items, QEMU-style (``,,`` is a comma), in a canonical order."""
    return tuple(sorted(option_items(value)))


def qemu_items(value: str, implied: bool) -> list[tuple[str, str]]:
    """The items of an option's value as QEMU 7.2 reads them: ``("=", key)`` for
    ``key=value``; ``("implied", "")`` for a first item without ``=`` when the option has an
    implied key; ``("flag", "")`` for another bare item (its name is anyone's: a placeholder
    may name a flag); ``("empty", "")`` for an empty one, which QEMU refuses."""
    items = []
    position = 0
    while position < len(value):
        stops = [i for i in (value.find("=", position), value.find(",", position)) if i >= 0]
        stop = min(stops, default=len(value))
        if stop < len(value) and value[stop] == "=":
            items.append(("=", value[position:stop]))
            position = _value_end(value, stop + 1)
        elif implied and not items:
            items.append(("implied", ""))
            position = _value_end(value, position)
        else:
            items.append(("flag", "") if stop > position else ("empty", ""))
            position = stop
        position += 1  # the separating comma
    return items


def _value_end(value: str, position: int) -> int:
    """Where a value starting at ``position`` ends: at a comma that is not doubled."""
    while position < len(value):
        if value.startswith(",,", position):
            position += 2
        elif value[position] == ",":
            break
        else:
            position += 1
    return position


def canonical(option: str, value: str | None) -> tuple[str, Any]:
    if value is None:
        return option, None
    if option in PLAIN_VALUE:
        return option, value
    return option, items(value)


def parse_emu_part(words: list[str]) -> list[tuple[str, Any]]:
    """emu's part of the argv as (option, canonical value); an unknown option fails."""
    parsed = []
    position = 0
    while position < len(words):
        option = words[position]
        if option in EMU_FLAGS:
            parsed.append(canonical(option, None))
            position += 1
        elif option in EMU_VALUED:
            assert position + 1 < len(words), f"{option} lacks its value"
            parsed.append(canonical(option, words[position + 1]))
            position += 2
        else:
            raise AssertionError(f"{option!r} is not an option emu generates")
    return parsed


def image_path(lab: FuzzLab, value: str) -> Path:
    given = Path(value)
    return given.absolute() if given.is_absolute() else lab.images.absolute() / given


def image_format(path: Path) -> str:
    with path.open("rb") as image:
        return "qcow2" if image.read(4) == QCOW2_MAGIC else "raw"


def expected_emu_part(
    lab: FuzzLab, node: Node, user_words: list[str], ports: dict[str, int]
) -> list[tuple[str, Any]]:
    """What emu must generate for this node: computed from the description and the host's
    settings, not from emu's code (only the derived MACs are taken from emu)."""
    props: QemuProperties = node.properties
    host = node.settings
    expected: list[tuple[str, str | None]] = [
        ("-accel", "tcg"),
        ("-name", "guest=" + node.name.replace(",", ",,")),
        ("-m", f"{props.ram}M"),
        ("-smp", f"cpus={props.cpus},maxcpus={props.maxcpus or props.cpus}"),
        ("-nodefaults", None),
        ("-no-user-config", None),
        ("-display", "none"),
        ("-S", None),
        ("-qmp", "unix:qmp.sock,server=on,wait=off"),
        ("-boot", f"order={props.boot_priority}"),
    ]
    if "-uuid" not in user_words:
        expected.append(("-uuid", str(node.config.id)))
    if props.bios_image:
        expected.append(("-bios", str(image_path(lab, props.bios_image))))
    if props.kernel_image:
        expected.append(("-kernel", str(image_path(lab, props.kernel_image))))
        if props.initrd:
            expected.append(("-initrd", str(image_path(lab, props.initrd))))
        if props.kernel_command_line:
            expected.append(("-append", props.kernel_command_line))
    parsed = [canonical(option, value) for option, value in expected]
    parsed += expected_disks(lab, node)
    parsed += expected_network(node)
    parsed += expected_console(node, host, ports)
    parsed += expected_firmware_and_tpm(node)
    return parsed


def expected_disks(lab: FuzzLab, node: Node) -> list[tuple[str, Any]]:
    props: QemuProperties = node.properties
    out: list[tuple[str, Any]] = []
    controllers: set[str] = set()

    def controller(name: str, device: str) -> None:
        if name not in controllers:
            controllers.add(name)
            out.append(("-device", items(f"{device},id={name}")))

    for index, drive in enumerate(DRIVES):
        if not props.disk_image(drive):
            continue
        if props.linked_clone:
            path, fmt = node.directory / f"hd{drive}_disk.qcow2", "qcow2"
        else:
            path = image_path(lab, props.disk_image(drive))
            fmt = image_format(path)
        interface = props.disk_interface(drive)
        common = (("file", str(path)), ("format", fmt), ("id", f"drive{index}"))
        if interface in ("ide", "virtio"):
            extra = (("if", interface), ("index", str(index)), ("media", "disk"))
            out.append(("-drive", tuple(sorted(common + extra))))
            continue
        if interface in ("floppy", "pflash"):
            out.append(("-drive", tuple(sorted((*common, ("if", interface))))))
            continue
        assert interface in ("sata", "scsi", "nvme", "sd"), interface  # mtd: refused on x86
        device = {
            "sata": f"ide-hd,bus=ahci0.{index}",
            "scsi": "scsi-hd,bus=scsi0.0",
            "nvme": f"nvme,serial=emu{index}",
            "sd": "sd-card",
        }[interface]
        if interface in ("sata", "scsi", "sd"):
            controller(*{"sata": ("ahci0", "ahci"), "scsi": ("scsi0", "virtio-scsi-pci"),
                         "sd": ("sdhci0", "sdhci-pci")}[interface])  # fmt: skip
        out.append(("-drive", tuple(sorted((*common, ("if", "none"))))))
        out.append(("-device", items(f"{device},drive=drive{index},id=disk{index}")))
    if props.cdrom_image:
        path = image_path(lab, props.cdrom_image)
        cdrom = {"file": str(path), "format": image_format(path), "if": "ide", "index": "2"}
        cdrom |= {"id": "cdrom0", "media": "cdrom", "readonly": "on"}
        out.append(("-drive", tuple(sorted(cdrom.items()))))
    return out


def expected_network(node: Node) -> list[tuple[str, Any]]:
    props: QemuProperties = node.properties
    out: list[tuple[str, Any]] = []
    bridges = -(-max(0, props.adapters - 12) // 31)
    for bridge in range(bridges):
        device = f"pci-bridge,id=pci-bridge{bridge},chassis_nr={bridge + 1},shpc=off"
        out.append(("-device", items(device)))
    custom = {c.adapter_number: c for c in props.custom_adapters}
    for n in range(props.adapters):
        model = props.adapter_type
        if n in custom and custom[n].adapter_type:
            model = custom[n].adapter_type
        model = "virtio-net-pci" if model == "virtio" else model
        mac = adapter_mac(node, n)
        if n in custom and custom[n].mac_address:
            assert mac == custom[n].mac_address.lower()
        nic = [("", model), ("netdev", f"nic{n}"), ("mac", mac), ("id", f"adapter{n}")]
        if n >= 12:
            bridge, slot = divmod(n - 12, 31)
            nic += [("bus", f"pci-bridge{bridge}"), ("addr", f"{slot + 1:#x}")]
        out.append(("-netdev", items(f"hubport,id=nic{n},hubid={n}")))
        out.append(("-netdev", items(f"hubport,id=sink{n},hubid={n}")))
        out.append(("-device", tuple(sorted(nic))))
        nio = node.adapters[n].nio
        if isinstance(nio, UdpNio):
            dgram = [("", "dgram"), ("id", f"link{n}")]
            dgram += [("local.type", "inet"), ("local.host", node.settings.udp_host)]
            dgram += [("local.port", str(nio.local_port)), ("remote.type", "inet")]
            dgram += [("remote.host", nio.remote_host), ("remote.port", str(nio.remote_port))]
            out.append(("-netdev", tuple(sorted(dgram))))
        elif isinstance(nio, TapNio):
            tap = [("", "tap"), ("id", f"link{n}"), ("ifname", nio.device)]
            out.append(("-netdev", tuple(sorted([*tap, ("script", "no"), ("downscript", "no")]))))
        if nio is not None:
            port = f"hubport,id=linkport{n},hubid={n},netdev=link{n}"
            out.append(("-netdev", items(port)))
    return out


SPICE = ("spice", "spice+agent")


def console_slots(props: QemuProperties) -> list[tuple[str, str, int]]:
    """(role, type, fixed port) of the node's consoles that are not ``none``."""
    slots = [("console", props.console_type, props.console or 0)]
    slots.append(("aux", props.aux_type, props.aux or 0))
    return [slot for slot in slots if slot[1] != "none"]


def console_ports(props: QemuProperties, emu_part: list[tuple[str, Any]]) -> dict[str, int]:
    """The port the command line must name for each console: the node's; else, for SPICE
    (which cannot pick its own) or a VNC console when the options use ``%console-port%``,
    one emu picked (read back from the argv, and checked to be a possible port); else 0:
    QEMU (or, for telnet, the host at a real start) picks."""
    ports = {}
    for role, kind, fixed in console_slots(props):
        picked = kind in SPICE or (
            kind == "vnc" and role == "console" and "%console-port%" in props.options
        )
        if fixed or not picked:
            ports[role] = fixed
            continue
        option = "-spice" if kind in SPICE else "-vnc"
        (value,) = [dict(value) for name, value in emu_part if name == option]
        # VNC names a display (port - 5900) after the address; SPICE names the port.
        port = int(value["port"]) if "port" in value else 5900 + int(value[""].rsplit(":", 1)[1])
        assert 1024 <= port <= 65535, f"emu picked {role} port {port}"
        ports[role] = port
    return ports


def expected_console(
    node: Node, host: HostSettings, ports: dict[str, int]
) -> list[tuple[str, Any]]:
    props: QemuProperties = node.properties
    address = host.console_host
    out: list[tuple[str, Any]] = []
    for role, kind, _ in console_slots(props):
        port = ports[role]
        if kind == "telnet":  # served by the host: QEMU's serial is its client
            chardev = {"": "socket", "id": f"{role}0", "path": f"{role}.sock"}
            out += [("-chardev", tuple(sorted(chardev.items()))), ("-serial", f"chardev:{role}0")]
        elif kind == "vnc":
            display = port - 5900 if port else 0
            vnc = [("", f"{address}:{display}")] + ([] if port else [("to", "99")])
            out.append(("-vnc", tuple(sorted(vnc))))
        else:
            spice = [("addr", address), ("port", str(port)), ("disable-ticketing", "on")]
            out.append(("-spice", tuple(sorted(spice))))
            if kind == "spice+agent":
                out.append(("-device", items("virtio-serial-pci,id=spice-serial0")))
                out.append(("-chardev", items("spicevmc,id=vdagent,debug=0,name=vdagent")))
                out.append(("-chardev", items("spiceport,id=webdav,name=org.spice-space.webdav.0")))
                for chardev, name in (
                    ("vdagent", "com.redhat.spice.0"),
                    ("webdav", "org.spice-space.webdav.0"),
                ):
                    port_device = (
                        f"virtserialport,bus=spice-serial0.0,chardev={chardev},name={name}"
                    )
                    out.append(("-device", items(port_device)))
    kinds = {kind for _, kind, _ in console_slots(props)}
    if kinds & set(SPICE):
        out.append(("-vga", "qxl"))
    elif "vnc" in kinds:
        out.append(("-vga", "std"))
    return out


def expected_firmware_and_tpm(node: Node) -> list[tuple[str, Any]]:
    props: QemuProperties = node.properties
    out: list[tuple[str, Any]] = []
    if props.uefi:
        code = {"if": "pflash", "format": "raw", "readonly": "on"}
        code["file"] = "/usr/share/OVMF/OVMF_CODE_4M.fd"
        store = {"if": "pflash", "format": "raw", "file": str(node.directory / "OVMF_VARS_4M.fd")}
        out += [("-drive", tuple(sorted(code.items()))), ("-drive", tuple(sorted(store.items())))]
    if props.tpm:
        out.append(("-chardev", items("socket,id=tpm0chr,path=swtpm.sock")))
        out.append(("-tpmdev", items("emulator,id=tpm0,chardev=tpm0chr")))
        out.append(("-device", items("tpm-tis,tpmdev=tpm0")))
    return out


def check_argv(lab: FuzzLab, node: Node, argv: list[str]) -> None:
    """The definition in the module docstring, asserted."""
    props: QemuProperties = node.properties
    written = shlex.split(props.options)
    program = Path(argv[0])
    assert program.is_absolute(), argv[0]
    assert program.name.startswith("qemu-system-"), argv[0]
    emu_part = argv[1 : len(argv) - len(written)]
    parsed = parse_emu_part(emu_part)
    ports = console_ports(props, parsed)
    values = {
        "%vm-name%": node.name,
        "%vm-id%": str(node.config.id),
        "%project-id%": str(node.project.id),
        "%project-path%": str(node.project.directory),
        "%console-port%": str(ports.get("console", props.console or 0)),
    }
    cid = claimed_cid(node)  # taken from emu, like the MACs; checked to be the node's own
    if "%guest-cid%" in props.options:
        assert cid is not None
        assert 3 <= cid <= 65535
        # A fresh session: the fixed console port when there is one, else the first free CID.
        fixed = props.console if props.console_type != "none" and (props.console or 0) >= 3 else 0
        assert cid == (fixed or 3)
        values["%guest-cid%"] = str(cid)
    user = [substitute(word, values) for word in written]
    assert argv[len(argv) - len(user) :] == user
    for index, (before, after) in enumerate(zip(written, user, strict=True)):
        option = written[index - 1] if index else ""
        if before.startswith("-") or not option.startswith("-") or option in PLAIN_VALUE:
            continue  # an option, a word that is no option's value, or a plain value
        got = qemu_items(after, option in IMPLIED_KEY)
        if ("empty", "") not in got:
            assert got == qemu_items(before, option in IMPLIED_KEY), (
                f"a placeholder changed the items of {option} {before!r}: {after!r}"
            )
    if not node.settings.allow_unsafe_options:
        options = {"-" + word.lstrip("-").split("=", 1)[0] for word in user if word[:1] == "-"}
        assert not options & HOST_REACHING_OPTIONS, options
    actual = collections.Counter(parsed)
    expected = collections.Counter(expected_emu_part(lab, node, user, ports))
    assert actual == expected, (
        f"unexpected: {sorted(map(str, actual - expected))};"
        f" missing: {sorted(map(str, expected - actual))}"
    )


def check_problems(error: ConfigError, where: str, paths: list[str]) -> None:
    """Every problem of ``error`` starts with one of the field ``paths``; it names ``where``."""
    assert error.where == where
    assert error.problems, error
    for problem in error.problems:
        assert problem.startswith(tuple(paths)), f"no field path in {problem!r}"


def check_error(error: EmuError, description: Mapping[str, Any]) -> None:
    """A refusal names the field (``$.path``), and the node or the file it concerns."""
    name = description.get("name")
    if isinstance(error, ConfigError):
        # Keys are anyone's text (dots, colons, spaces): match the known ones as prefixes.
        keys = {*description, *PROPERTY_FIELDS, "node_id"}
        where = f"node {name!r}" if isinstance(name, str) else "node"
        check_problems(error, where, ["$: ", *(f"$.{k}" for k in keys if isinstance(k, str))])
        return
    assert isinstance(error, NodeError), f"{type(error).__name__}: {error}"
    prefix = f"node {name!r}: "
    assert str(error).startswith(prefix), str(error)
    field = str(error)[len(prefix) :].split(":", 1)[0]
    assert field in PROPERTY_FIELDS, f"no field named in {error}"


def draw_image_files(data: st.DataObject, lab: FuzzLab, description: Mapping[str, Any]) -> None:
    """Create the image files a description names, unless the draw says to leave one out."""
    for key, value in description.items():
        is_image = key.endswith("_image") or key == "initrd"
        if is_image and isinstance(value, str) and value and creatable(value):
            wanted = data.draw(st.booleans())  # drawn first: the draws must not depend on files
            path = lab.images / value
            if wanted and not path.exists() and not path.is_symlink():
                write_image(path)


def bindable(host: str) -> bool:
    """Whether a TCP socket can bind ``host`` on this machine."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


# -- the tests -----------------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=NODE_EXAMPLES)
@given(data=st.data())
def test_fuzzed_qemu_nodes_get_exactly_the_options_they_ask_for(
    fuzz_lab: FuzzLab, data: st.DataObject
) -> None:
    raw_settings = data.draw(host_settings(fuzz_lab), label="settings")
    try:
        host = structure(raw_settings, HostSettings, "settings")
    except ConfigError as error:
        event("refused: settings")
        check_problems(error, "settings", ["$.console_host", "$.udp_host"])
        return
    description = data.draw(node_descriptions(fuzz_lab), label="description")
    draw_image_files(data, fuzz_lab, description)
    session = Session(fuzz_lab.project, settings=host, plugins=fuzz_lab.plugins)
    try:
        try:
            node = session.add_node(description)
            argv = fuzz_lab.run(node.dry_run())
        except EmuError as error:
            event(f"refused: {type(error).__name__}")
            check_error(error, description)
            return
        event("accepted")
        check_argv(fuzz_lab, node, argv)
    finally:
        fuzz_lab.run(session.close())


FILTER_FIELDS = {
    "loss": mostly(st.floats(0, 100) | st.integers(0, 100)),
    "delay": mostly(st.integers(0, 60_000)),
    "jitter": mostly(st.integers(0, 60_000)),
    "corruption": mostly(st.floats(0, 100)),
    "rate": mostly(st.integers(0, 100_000_000)),
    "direction": choice_or_tricky(("both", "a_to_b", "b_to_a")),
}
FILTERS = st.fixed_dictionaries({}, optional=FILTER_FIELDS) | st.dictionaries(
    tricky(2, min_tokens=1), JUNK, max_size=2
)


@settings(FUZZ_SETTINGS, max_examples=FILTER_EXAMPLES)
@given(data=mostly(FILTERS, weight=8))
def test_fuzzed_link_filters_are_accepted_or_refused_by_field(data: Any) -> None:
    try:
        filters = structure(data, LinkFilters, "link")
    except ConfigError as error:
        keys = data if isinstance(data, Mapping) else {}
        check_problems(error, "link", ["$: ", *(f"$.{key}: " for key in keys)])
        return
    assert 0 <= filters.loss <= 100
    assert 0 <= filters.corruption <= 100
    assert filters.direction in ("both", "a_to_b", "b_to_a")
    assert {k: getattr(filters, k) for k in data} == data


ENDPOINT_NODES = ["a", "b", "c,d", "a:b", "é"]


@settings(FUZZ_SETTINGS, max_examples=LINK_EXAMPLES)
@given(data=st.data())
def test_fuzzed_lab_links_are_refused_by_field_or_wired_as_asked(
    fuzz_lab: FuzzLab, data: st.DataObject
) -> None:
    endpoint = st.one_of(
        st.builds(
            lambda node, adapter: f"{node}:{adapter}" if adapter is not None else node,
            st.sampled_from(ENDPOINT_NODES),
            st.one_of(st.none(), st.integers(0, 3), st.just("x"), st.just("")),
        ),
        tricky(3),
    )
    link = st.fixed_dictionaries(
        {"endpoints": mostly(st.lists(endpoint, min_size=2, max_size=2))},
        optional={"filters": FILTERS},
    )
    lab_data = {
        "name": data.draw(mostly(st.sampled_from(["lab", "demo-1"]), weight=8)),
        "nodes": {"a": {"emulator": "qemu"}, "b": {"emulator": "qemu"}},
        "links": data.draw(mostly(st.lists(mostly(link, weight=8), max_size=3), weight=8)),
    }
    try:
        lab = load_lab(lab_data, "lab.toml")
    except ConfigError as error:
        check_problems(error, "lab.toml", ["$: ", "$.name: ", "$.links: ", "$.links["])
        return
    # Wire each link between real (stopped) nodes and read the netdevs back from their argv.
    session = Session(
        fuzz_lab.project,
        settings=HostSettings(image_dirs=(fuzz_lab.images,)),
        plugins=fuzz_lab.plugins,
    )

    async def wire() -> None:
        for index, spec in enumerate(lab.links):
            (a_name, a_adapter), (b_name, b_adapter) = spec.parsed()
            nodes = {
                name: session.add_node(
                    {"name": f"{index}{name}", "emulator": "qemu", "adapters": 4}
                )
                for name in dict.fromkeys((a_name, b_name))
            }
            a, b = nodes[a_name], nodes[b_name]
            if max(a_adapter, b_adapter) >= 4:
                with pytest.raises(NodeError, match="does not exist"):
                    await session.link(a, a_adapter, b, b_adapter, spec.filters)
                continue
            wired = await session.link(a, a_adapter, b, b_adapter, spec.filters)
            assert (wired.relay is not None) == spec.filters.active
            for node, adapter in ((a, a_adapter), (b, b_adapter)):
                argv = await node.dry_run()
                check_argv(fuzz_lab, node, argv)
                nio = node.adapters[adapter].nio
                assert isinstance(nio, UdpNio)
                dgram = [
                    dict(option_items(v))
                    for v in argv
                    if v.startswith("dgram,") and f",id=link{adapter}," in v
                ]
                assert len(dgram) == 1
                assert dgram[0]["remote.port"] == str(nio.remote_port)
            ends = [a.adapters[a_adapter].nio, b.adapters[b_adapter].nio]
            assert isinstance(ends[0], UdpNio)
            assert isinstance(ends[1], UdpNio)
            if wired.relay is None:  # direct: each sends to the other's port
                assert ends[0].remote_port == ends[1].local_port
                assert ends[1].remote_port == ends[0].local_port
            else:  # each sends to its side of the relay, which sends back to it
                assert ends[0].remote_port == wired.relay.port("a")
                assert wired.relay.peer("a")[1] == ends[0].local_port
                assert ends[1].remote_port == wired.relay.port("b")
                assert wired.relay.filters == spec.filters
            await session.unlink(wired)
            assert a.adapters[a_adapter].nio is None
        assert session.ports.held == set()

    try:
        fuzz_lab.run(wire())
    finally:
        fuzz_lab.run(session.close())


# -- bugs the fuzzing found, now fixed ------------------------------------------------------


def test_placeholders_are_replaced_once(fuzz_lab: FuzzLab) -> None:
    session = Session(
        fuzz_lab.project,
        settings=HostSettings(image_dirs=(fuzz_lab.images,)),
        plugins=fuzz_lab.plugins,
    )
    node = session.add_node(
        {"name": "%vm-id%", "emulator": "qemu", "options": "-smbios type=1,product=%vm-name%"}
    )
    assert fuzz_lab.run(node.dry_run())[-1] == "type=1,product=%vm-id%"


def test_an_unknown_emulator_is_refused_naming_the_node_and_field(fuzz_lab: FuzzLab) -> None:
    session = Session(fuzz_lab.project, plugins=fuzz_lab.plugins)
    with pytest.raises(ConfigError) as caught:
        session.add_node({"name": "r1", "emulator": "qemux"})
    assert caught.value.where == "node 'r1'"
    assert caught.value.problems[0].startswith("$.emulator: ")


def test_a_placeholder_value_cannot_become_a_key(fuzz_lab: FuzzLab) -> None:
    session = Session(
        fuzz_lab.project,
        settings=HostSettings(image_dirs=(fuzz_lab.images,)),
        plugins=fuzz_lab.plugins,
    )
    description = {"name": "process=evil", "emulator": "qemu", "options": "-name %vm-name%"}
    with pytest.raises(ConfigError) as caught:
        session.add_node(description)
    assert caught.value.problems[0].startswith("$.options: %vm-name% stands for a whole item")
    # As the value of a key, the same name is harmless: one item, commas doubled.
    node = session.add_node({**description, "options": "-smbios type=1,product=%vm-name%"})
    argv = fuzz_lab.run(node.dry_run())
    assert argv[-1] == "type=1,product=process=evil"
    assert qemu_items(argv[-1], implied=False) == [("=", "type"), ("=", "product")]


def test_a_console_port_that_cannot_be_picked_names_the_setting(fuzz_lab: FuzzLab) -> None:
    session = Session(
        fuzz_lab.project,
        settings=HostSettings(image_dirs=(fuzz_lab.images,), console_host="192.0.2.1"),
        plugins=fuzz_lab.plugins,
    )
    node = session.add_node({"name": "r1", "emulator": "qemu", "console_type": "spice"})
    with pytest.raises(NodeError) as caught:
        fuzz_lab.run(node.dry_run())
    assert "console_host" in str(caught.value)
