"""The ``tiny`` lab image: ``image = "tiny"`` in a lab boots emu's tiny guest under QEMU.

A plugin (``tiny-guest``, in the ``emucore.plugins`` entry point group) implementing
``emu_lab_image``: the core names no image, this module owns the one emu ships. A node table
with ``image = "tiny"`` may hold three keys of the image's own, which become kernel
parameters the guest's init reads:

* ``ip``: eth0's address(es) in CIDR form, comma-separated;
* ``ips``: other interfaces' addresses, ``{ eth1 = "10.0.1.1/24" }``; an interface name is
  a lower-case letter then up to 14 lower-case letters or digits, so nothing else can reach
  the kernel command line;
* ``gateway``: the default route's gateway.

Its checks reach the shell through :func:`emu_tests.console.open_guest_console`, which waits
for the boot marker or a prompt and turns the terminal's echo off.

**Saved states.** After a restore (``emu run --from``) the guest's clock is behind by the
time the state was kept: ``after_restore`` sets it from the RTC, which QEMU keeps on the
host's time (``hwclock -s -u`` on the shell).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emu_tests.console import open_guest_console
from emu_tests.guest import TinyGuest, build_tiny_guest, default_cache_dir
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.models import HostSettings
from emucore.node import Node
from emucore.records import LabImage

IMAGE = "tiny"
# The table's keys this image reads (and removes from the node's description).
KEYS = ("image", "ip", "ips", "gateway")
_INTERFACE = re.compile(r"[a-z][a-z0-9]{0,14}")


@hookimpl
def emu_lab_image(
    image: str, node: str, table: Mapping[str, Any], settings: HostSettings
) -> LabImage | None:
    """``tiny``: a QEMU node booting the tiny guest's kernel and initramfs."""
    if image != IMAGE:
        return None
    problems = check_addresses(table)
    if problems:
        raise ConfigError("", problems)
    guest = tiny_guest()
    try:
        command_line = guest.kernel_command_line(
            ip=table.get("ip"),
            gateway=table.get("gateway"),
            hostname=node,
            extra_ips=table.get("ips", {}),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError("", [f"$: {exc}"]) from None
    description = {key: value for key, value in table.items() if key not in KEYS}
    description.setdefault("emulator", "qemu")
    description.setdefault("ram", 128)
    description.setdefault("adapter_type", "virtio-net-pci")
    description |= {
        "kernel_image": str(guest.kernel),
        "initrd": str(guest.initrd),
        "kernel_command_line": command_line,
    }
    return LabImage(
        description,
        image_dirs=(guest.kernel.parent, guest.initrd.parent),
        # Its kernel is a fine one for QEMU's KVM probe (it must reach a panic under KVM).
        emulator_settings={"qemu": {"kvm_probe_kernel": str(guest.kernel)}},
        open_shell=open_guest_console,
        after_restore=set_clock_from_rtc,
    )


# The guest found for each cache directory: a lab of many tiny nodes looks once (checking
# that nothing changed walks the kernel's modules: 20 ms a node).
_FOUND: dict[Path, TinyGuest] = {}


def tiny_guest() -> TinyGuest:
    """The tiny guest, built or checked once per process and cache directory (again if its
    files went away meanwhile)."""
    cache = default_cache_dir()
    guest = _FOUND.get(cache)
    if guest is None or not (guest.kernel.is_file() and guest.initrd.is_file()):
        guest = _FOUND[cache] = build_tiny_guest(cache)
    return guest


async def set_clock_from_rtc(node: Node) -> None:
    """Set a resumed guest's clock from its RTC (QEMU keeps the RTC on the host's time)."""
    console = await open_guest_console(node)
    try:
        status, output = await console.run("hwclock -s -u")
    finally:
        await console.close()
    if status != 0:
        node.emit("warning", f"the guest's clock was not set from its RTC: {output[-200:]}")


def check_addresses(table: Mapping[str, Any]) -> list[str]:
    """Check ``ip``, ``ips`` and ``gateway`` on the host (the guest would only complain on
    its console, and they end up on its kernel command line)."""
    ips = table.get("ips", {})
    if not isinstance(ips, Mapping):
        return ['$.ips: must be a table of interface = "address/prefix"']
    problems = [
        f"$.ips: {name!r} is not an interface name (a-z, then a-z or 0-9, at most 15)"
        for name in ips
        if not isinstance(name, str) or not _INTERFACE.fullmatch(name)
    ]
    if problems:
        return problems
    addresses = {"ip": table.get("ip")} | {f"ips.{name}": value for name, value in ips.items()}
    problems = [
        f"$.{key}: must be address/prefix, e.g. 10.0.0.1/24; got {value!r}"
        for key, value in addresses.items()
        if value is not None and not _interfaces(value)
    ]
    gateway = table.get("gateway")
    if gateway is not None:
        try:
            ipaddress.ip_address(str(gateway))
        except ValueError:
            problems.append(f"$.gateway: must be an IP address; got {gateway!r}")
    return problems


def _interfaces(value: object) -> bool:
    """Whether ``value`` is comma-separated address/prefix items (``10.0.0.1/24,fd00::1/64``)."""
    if not isinstance(value, str):
        return False
    try:
        return all("/" in item and ipaddress.ip_interface(item) for item in value.split(","))
    except ValueError:
        return False
