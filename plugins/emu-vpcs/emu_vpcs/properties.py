"""VPCS node properties (GNS3's names where GNS3 has them) and the host's VPCS settings.

A node is one VPCS instance with one Ethernet adapter. Its addresses come from
``startup_script`` (GNS3's property: the text of ``startup.vpc``) or, for the common case,
from ``ip`` and ``gateway``, which emu turns into that script.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import attrs

from emucore.node import Node
from emucore.validators import in_range, one_of, printable

CONSOLE_TYPES = frozenset(("telnet", "none"))
# VPCS only lets the last byte be chosen (-m); the other five are fixed.
MAC_PREFIX = "00:50:79:66:68:"
MAX_SCRIPT = 64 * 1024
_MAC = re.compile(r"00:50:79:66:68:[0-9a-fA-F]{2}")
# Tabs and line ends are text; every other control character would reach VPCS' line editor.
_SCRIPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _console_port(_inst: Any, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        in_range(0, 65535)(_inst, attr, value)


def _mac_address(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if value and not _MAC.fullmatch(value):
        raise ValueError(
            f"must be {MAC_PREFIX}XX (VPCS lets only the last byte be chosen); got {value!r}"
        )


def _ip(inst: VpcsProperties, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value:
        return
    interface = parse_interface(value)
    network = interface.network
    special = {network.network_address: "network", network.broadcast_address: "broadcast"}
    if network.prefixlen < 31 and interface.ip in special:
        raise ValueError(
            f"{interface.ip} is the network's {special[interface.ip]} address, not a host"
            f" address of {network}; got {value!r}"
        )
    if inst.startup_script:
        raise ValueError(
            "cannot be used together with startup_script: write the address into the script"
            f" (a line 'ip {interface.ip}/{network.prefixlen}') or drop the script"
        )


def _gateway(inst: VpcsProperties, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value:
        return
    try:
        gateway = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"must be an IPv4 address like 10.0.0.1; got {value!r}") from None
    if not inst.ip:
        raise ValueError("needs ip (the node's own address and prefix length)")
    try:
        interface = parse_interface(inst.ip)
    except ValueError:
        return  # ip reports its own problem
    if gateway not in interface.network or gateway == interface.ip:
        raise ValueError(
            f"must be another address of ip's network {interface.network}; got {value!r}"
        )


def _startup_script(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if len(value) > MAX_SCRIPT:
        raise ValueError(f"must be at most {MAX_SCRIPT} characters, got {len(value)}")
    control = _SCRIPT_CONTROL.search(value)
    if control:
        raise ValueError(
            f"must not contain control characters other than tab and line ends;"
            f" found {control.group()!r}"
        )
    for number, line in enumerate(value.splitlines(), 1):
        if line.lstrip().startswith("!"):
            raise ValueError(
                f"line {number}: '!' runs a command on the host, which emu does not allow;"
                f" got {line.strip()!r}"
            )


def parse_interface(value: str) -> ipaddress.IPv4Interface:
    """``10.0.0.2/24`` as an interface; the prefix length is required.

    :raises ValueError: not an IPv4 address with a prefix length.
    """
    if "/" not in value:
        raise ValueError(
            f"must be an IPv4 address with a prefix length, like 10.0.0.2/24; got {value!r}"
        )
    try:
        return ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(
            f"must be an IPv4 address with a prefix length, like 10.0.0.2/24; got {value!r}"
        ) from None


@attrs.frozen
class VpcsProperties:
    """The properties of a VPCS node.

    :ivar console: TCP port of the telnet console; none or 0 lets the host pick a free one.
    :ivar console_type: ``telnet`` or ``none``.
    :ivar startup_script: the text of ``startup.vpc``, run by VPCS at each start
        (GNS3's property); exclusive with ``ip``.
    :ivar ip: the node's IPv4 address and prefix length (``10.0.0.2/24``); emu writes the
        startup script from it and ``gateway``.
    :ivar gateway: the default gateway, an address of ``ip``'s network.
    :ivar mac_address: ``00:50:79:66:68:XX``; by default the last byte is derived from the
        project and node ids and kept unique among the project's VPCS nodes.
    :ivar vpcs_path: the VPCS binary; by default ``vpcs`` on the settings' ``binary_dirs``,
        then ``PATH``.
    """

    console: int | None = attrs.field(default=None, validator=_console_port)
    console_type: str = attrs.field(default="telnet", validator=one_of(CONSOLE_TYPES))
    startup_script: str = attrs.field(default="", validator=_startup_script)
    ip: str = attrs.field(default="", validator=_ip)
    gateway: str = attrs.field(default="", validator=_gateway)
    mac_address: str = attrs.field(default="", validator=_mac_address)
    vpcs_path: str = attrs.field(default="", validator=printable(4096, allow_empty=True))

    @property
    def adapter_count(self) -> int:
        """VPCS has one Ethernet adapter."""
        return 1


@attrs.frozen
class VpcsSettings:
    """The host's settings for VPCS nodes (``HostSettings.emulators["vpcs"]``).

    :ivar binary_dirs: directories searched for ``vpcs`` before ``PATH``.
    :ivar start_timeout: seconds VPCS gets to run its startup script and show its prompt
        (setting an address alone takes about 3 s: VPCS checks for duplicates).
    :ivar stop_timeout: seconds VPCS gets to exit after SIGTERM before it is killed.
    :ivar confine: run VPCS under a seccomp filter that forbids it to create processes, so
        its ``!`` command cannot run host commands (as the host's user) and nothing it starts
        can outlive it. Turn off only where seccomp is missing (the start fails and says so).
    """

    binary_dirs: tuple[Path, ...] = ()
    start_timeout: float = attrs.field(default=30.0, validator=in_range(1, 600))
    stop_timeout: float = attrs.field(default=5.0, validator=in_range(0, 600))
    confine: bool = True


VpcsNode = Node[VpcsProperties, VpcsSettings]
"""A node of the ``vpcs`` kind, as VPCS' hook implementations receive it."""
