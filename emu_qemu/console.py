"""The node's console: telnet on a serial port, VNC, SPICE, or none.

A port of 0 (or none given) lets QEMU pick a free one when it binds (telnet, VNC), and the
real port is read back over QMP: no bind-then-close race. SPICE cannot pick its own port, so
one is chosen just before the start. The telnet console's output is also written to
``console.log`` in the node directory, so nothing the guest prints is lost before a client
connects.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence

from emu_qemu import positions
from emu_qemu.qemuopts import opts
from emu_qemu.qmp import monitor_of
from emucore import hookimpl
from emucore.errors import NodeError
from emucore.models import ConsoleInfo
from emucore.node import Node
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "qemu"

CHARDEV_ID = "console0"
LOG_NAME = "console.log"
VNC_BASE = 5900
_CHOSEN_PORT = StashKey[int]()
_TELNET_PORT = re.compile(r":(\d+)(?:,|$)")


def _free_tcp_port(node: Node) -> int:
    host = node.settings.console_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            raise NodeError(
                node.name,
                f"console: cannot pick a port on console_host {host!r} ({exc.strerror});"
                " set HostSettings.console_host to an address of this machine",
            ) from None
        port: int = probe.getsockname()[1]
        return port


def console_port(node: Node) -> int:
    """The console port the command line asks for: the node's, one chosen at prepare time,
    or 0 (QEMU picks; the real port is in ``node.console`` once the node runs)."""
    chosen: int = node.properties.console or node.stash.get(_CHOSEN_PORT, 0)
    return chosen


@hookimpl(trylast=True)
def emu_prepare(node: Node) -> None:
    """Pick a free port now when QEMU cannot pick one itself: SPICE (port 0 disables it),
    or options that use ``%console-port%`` (they need the real number in the argv)."""
    node.stash.pop(_CHOSEN_PORT, None)
    props = node.properties
    if props.console or props.console_type == "none":
        return
    if props.console_type == "spice" or "%console-port%" in props.options:
        node.stash[_CHOSEN_PORT] = _free_tcp_port(node)


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """The console's options (see the module docstring)."""
    props = node.properties
    host = node.settings.console_host
    port: int = console_port(node)
    if props.console_type == "telnet":
        chardev: dict[str, str | int | bool] = {"id": CHARDEV_ID, "host": host, "port": port}
        chardev |= {"server": True, "wait": False}
        chardev |= {"telnet": True, "logfile": str(node.directory / LOG_NAME)}
        args = ["-chardev", opts("socket", chardev), "-serial", f"chardev:{CHARDEV_ID}"]
    elif props.console_type == "vnc":
        if port and port < VNC_BASE:
            raise NodeError(node.name, f"console: a VNC port must be ≥ {VNC_BASE}, got {port}")
        display = f"{host}:{port - VNC_BASE if port else 0}"
        # "to" lets QEMU walk up from display 0 to the first free one.
        args = ["-vnc", opts(display, {"to": None if port else 99}), "-vga", "std"]
    elif props.console_type == "spice":
        spice_port = port or _free_tcp_port(node)
        spice: dict[str, str | int | bool] = {"addr": host, "port": spice_port}
        spice["disable-ticketing"] = True
        args = ["-spice", opts(None, spice), "-vga", "qxl"]
    else:
        args = []
    return [ArgFragment(positions.CONSOLE, args, "qemu.console")] if args else []


@hookimpl(trylast=True)
async def emu_started(node: Node) -> None:
    """Read the real console port from QEMU and publish it as ``node.console``."""
    props = node.properties
    host = node.settings.console_host
    monitor = monitor_of(node)
    if props.console_type == "telnet":
        chardevs = await monitor.execute("query-chardev")
        filename = next(c["filename"] for c in chardevs if c["label"] == CHARDEV_ID)
        match = _TELNET_PORT.search(filename)
        if match is None:
            raise NodeError(node.name, f"console: cannot read the telnet port from {filename!r}")
        node.console = ConsoleInfo("telnet", host, int(match.group(1)))
    elif props.console_type == "vnc":
        vnc = await monitor.execute("query-vnc")
        node.console = ConsoleInfo("vnc", host, int(vnc["service"]))
    elif props.console_type == "spice":
        spice = await monitor.execute("query-spice")
        node.console = ConsoleInfo("spice", host, int(spice["port"]))
