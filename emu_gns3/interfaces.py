"""The host's network interfaces with their IPv4 address, as ``GET /network/interfaces``
answers (the controller asks when it links two computes that it knows by a loopback or
wildcard address)."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from typing import Any

_SIOCGIFADDR, _SIOCGIFNETMASK, _SIOCGIFHWADDR = 0x8915, 0x891B, 0x8927


def _ioctl(sock: socket.socket, request: int, name: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))


def interfaces() -> list[dict[str, Any]]:
    """One entry per interface: ``id``, ``name``, ``ip_address``, ``netmask``,
    ``mac_address``, ``type`` (``""`` where an interface has no IPv4 address)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            address = netmask = ""
            mac = "00:00:00:00:00:00"
            with contextlib.suppress(OSError):
                address = socket.inet_ntoa(_ioctl(sock, _SIOCGIFADDR, name)[20:24])
                netmask = socket.inet_ntoa(_ioctl(sock, _SIOCGIFNETMASK, name)[20:24])
            with contextlib.suppress(OSError):
                mac = ":".join(f"{b:02x}" for b in _ioctl(sock, _SIOCGIFHWADDR, name)[18:24])
            found.append(
                {
                    "id": name,
                    "name": name,
                    "ip_address": address,
                    "netmask": netmask or None,
                    "mac_address": mac,
                    "type": "ethernet",
                }
            )
    return found
