"""The node's console: telnet on the guest's serial port (served by the host), VNC, SPICE, or none.

**Telnet.** QEMU's own telnet server takes one client at a time (a second one hangs, unseen)
and writes its log file wherever the path leads. So the host serves the console instead:

* before QEMU starts, the host listens on ``console.sock`` in the node directory and binds
  the telnet port on ``console_host`` (the node's ``console``, or one the kernel picks);
* QEMU connects its serial port to that socket as a client (``-chardev socket,path=...``)
  while it starts, before any guest code runs, so nothing the guest prints is lost;
* once QEMU runs, the port serves any number of telnet clients at once
  (:class:`~emucore.telnetd.TelnetServer`), and the host writes ``console.log`` itself.

**VNC and SPICE.** A VNC port of 0 lets QEMU pick the first free display and the real port
is read back over QMP (``query-vnc``); SPICE cannot pick its own port, so one is chosen just
before the start and read back (``query-spice``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import attrs

from emu_qemu import positions
from emu_qemu.contract import CONSOLE_PORT, QemuNode, console_port, monitor_of
from emu_qemu.qemuopts import opts
from emucore import hookimpl
from emucore.claims import claim_tcp_port
from emucore.consoles import SocketConsole
from emucore.errors import NodeError
from emucore.files import unix_listener
from emucore.models import ConsoleInfo, NodeStatus
from emucore.records import ArgFragment
from emucore.stash import StashKey
from emucore.telnetd import TelnetServer

EMULATOR = "qemu"

CHARDEV_ID = "console0"
LOG_NAME = "console.log"
SOCKET_NAME = "console.sock"
VNC_BASE = 5900
# QEMU connects its serial port while it starts, long before QMP answers; this is a bound.
CONNECT_TIMEOUT = 10.0
# QEMU is gone when the console is closed: the rest of its output is already in the socket.
DRAIN_TIMEOUT = 2.0


@attrs.define
class HostConsole:
    """The host's side of a telnet console: the guest's socket, the hub, the telnet port."""

    listener: socket.socket
    server: asyncio.Server
    hub: SocketConsole
    telnet: TelnetServer


CONSOLE = StashKey[HostConsole]()


def _free_tcp_port(node: QemuNode) -> int:
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


async def _open_host_console(node: QemuNode) -> HostConsole:
    host, port = node.settings.console_host, node.properties.console or 0
    try:
        telnet = await TelnetServer.bind(node.name, host, port)
    except OSError as exc:
        raise NodeError(
            node.name,
            f"console: cannot listen on {host} port {port}: {exc.strerror or exc};"
            " choose another port or leave console unset",
        ) from None
    try:
        hub = SocketConsole(node.directory / LOG_NAME)
        listener = unix_listener(node.directory, SOCKET_NAME)
        server = await asyncio.start_unix_server(hub.attach, sock=listener)
    except BaseException:
        await telnet.close()
        raise
    return HostConsole(listener, server, hub, telnet)


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """A fixed console port belongs to one node at a time."""
    if node.properties.console and node.properties.console_type != "none":
        claim_tcp_port(node, node.properties.console, "console")


@hookimpl(trylast=True)
async def emu_prepare(node: QemuNode) -> None:
    """At a start: take the telnet port and the guest's console socket (QEMU needs both
    before it runs). SPICE, or options using ``%console-port%``, get a free port chosen now
    (QEMU cannot pick one itself there)."""
    node.stash.pop(CONSOLE_PORT, None)
    props = node.properties
    if props.console_type == "telnet" and node.status is NodeStatus.STARTING:
        held = node.stash[CONSOLE] = await _open_host_console(node)
        node.stash[CONSOLE_PORT] = held.telnet.port
        return
    if props.console or props.console_type in ("none", "telnet"):
        return
    if props.console_type == "spice" or "%console-port%" in props.options:
        node.stash[CONSOLE_PORT] = _free_tcp_port(node)


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """The console's options (see the module docstring)."""
    props = node.properties
    host = node.settings.console_host
    port: int = console_port(node)
    if props.console_type == "telnet":
        # A client of the host's socket; the path is relative to QEMU's working directory.
        chardev = opts("socket", {"id": CHARDEV_ID, "path": SOCKET_NAME})
        args = ["-chardev", chardev, "-serial", f"chardev:{CHARDEV_ID}"]
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
async def emu_started(node: QemuNode) -> None:
    """Serve the telnet console once QEMU is connected, or read the real VNC/SPICE port from
    QEMU; publish it as ``node.console``."""
    props = node.properties
    host = node.settings.console_host
    held = node.stash.get(CONSOLE, None)
    if held is not None:
        try:
            await asyncio.wait_for(held.hub.connected.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise NodeError(
                node.name, f"console: QEMU did not connect its serial port in {CONNECT_TIMEOUT:g} s"
            ) from None
        await held.telnet.serve(held.hub)
        node.console = ConsoleInfo("telnet", host, held.telnet.port)
    elif props.console_type == "vnc":
        vnc = await monitor_of(node).execute("query-vnc")
        node.console = ConsoleInfo("vnc", host, int(vnc["service"]))
    elif props.console_type == "spice":
        spice = await monitor_of(node).execute("query-spice")
        node.console = ConsoleInfo("spice", host, int(spice["port"]))


@hookimpl(trylast=True)
async def emu_stopped(node: QemuNode) -> None:
    """QEMU is gone: read what it printed last, disconnect the console's clients and
    release the port and the socket."""
    held = node.stash.pop(CONSOLE, None)
    if held is None:
        return
    held.server.close()
    await held.hub.drain(DRAIN_TIMEOUT)
    await held.telnet.close()
    await held.hub.aclose()
    held.listener.close()
    (node.directory / SOCKET_NAME).unlink(missing_ok=True)
