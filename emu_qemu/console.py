"""The node's consoles: the console (``console_type``) and the auxiliary console (``aux_type``),
each telnet on a serial port of the guest (served by the host), VNC, SPICE, or none.

**Telnet.** QEMU's own telnet server takes one client at a time (a second one hangs, unseen)
and writes its log file wherever the path leads. So the host serves each telnet console:

* before QEMU starts, the host listens on a socket in the node directory (``console.sock``,
  ``aux.sock``) and binds the telnet port on ``console_host`` (the node's ``console`` or
  ``aux``, or one the kernel picks);
* QEMU connects a serial port to that socket as a client (``-chardev socket,path=...``)
  while it starts, before any guest code runs, so nothing the guest prints is lost;
* once QEMU runs, the port serves any number of telnet clients at once
  (:class:`~emucore.telnetd.TelnetServer`), and the host writes the log (``console.log``,
  ``aux.log``) itself.

The serial ports follow each other: the console's is the guest's first (``ttyS0``), the
auxiliary console's the next one (``ttyS1``; ``ttyS0`` when the console is not telnet).

**VNC and SPICE.** A VNC port of 0 lets QEMU pick the first free display and the real port
is read back over QMP (``query-vnc``); SPICE cannot pick its own port, so one is chosen just
before the start and read back (``query-spice``). ``spice+agent`` adds the SPICE agent's
channel (a virtio serial port the guest's ``spice-vdagent`` talks to: mouse, resolution,
clipboard) and the folder sharing (WebDAV) channel. QEMU has one VNC and one SPICE server,
so the two consoles cannot both be of one of those kinds.

The console's real port is ``node.console``; the auxiliary console's is reported as
``aux`` by :meth:`Node.info <emucore.node.Node.info>` while the node runs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any

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
from emucore.telnetd import CONSOLE_SERVER, TelnetServer

EMULATOR = "qemu"

VNC_BASE = 5900
# QEMU connects its serial port while it starts, long before QMP answers; this is a bound.
CONNECT_TIMEOUT = 10.0
# QEMU is gone when the console is closed: the rest of its output is already in the socket.
DRAIN_TIMEOUT = 2.0
SPICE_TYPES = ("spice", "spice+agent")


@attrs.frozen
class Slot:
    """One of the node's two consoles.

    :ivar role: ``console`` or ``aux`` (the property names: ``console``, ``console_type``;
        ``aux``, ``aux_type``).
    :ivar type: ``telnet``, ``vnc``, ``spice``, ``spice+agent`` or ``none``.
    :ivar port: the fixed port the node asks for, 0 for any.
    """

    role: str
    type: str
    port: int

    @property
    def chardev(self) -> str:
        """QEMU's id of its serial port's chardev."""
        return f"{self.role}0"

    @property
    def socket_name(self) -> str:
        """The host's socket in the node directory its serial port connects to."""
        return f"{self.role}.sock"

    @property
    def log_name(self) -> str:
        """What the guest printed there, written by the host."""
        return f"{self.role}.log"


def slots(node: QemuNode) -> list[Slot]:
    """The node's consoles that are not ``none``, the console first."""
    props = node.properties
    both = [
        Slot("console", props.console_type, props.console or 0),
        Slot("aux", props.aux_type, props.aux or 0),
    ]
    return [slot for slot in both if slot.type != "none"]


@attrs.define
class HostConsole:
    """The host's side of a telnet console: the guest's socket, the hub, the telnet port."""

    listener: socket.socket
    server: asyncio.Server
    hub: SocketConsole
    telnet: TelnetServer


# The host's telnet consoles of this start, and the ports chosen for the others, by role.
CONSOLES = StashKey[dict[str, HostConsole]]()
CHOSEN_PORTS = StashKey[dict[str, int]]()
# The auxiliary console's real port while the node runs.
AUX_INFO = StashKey[ConsoleInfo]()


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


async def _open_host_console(node: QemuNode, slot: Slot) -> HostConsole:
    host = node.settings.console_host
    try:
        telnet = await TelnetServer.bind(node.name, host, slot.port)
    except OSError as exc:
        raise NodeError(
            node.name,
            f"{slot.role}: cannot listen on {host} port {slot.port}: {exc.strerror or exc};"
            f" choose another port or leave {slot.role} unset",
        ) from None
    try:
        hub = SocketConsole(node.directory / slot.log_name)
        listener = unix_listener(node.directory, slot.socket_name)
        server = await asyncio.start_unix_server(hub.attach, sock=listener)
    except BaseException:
        await telnet.close()
        raise
    return HostConsole(listener, server, hub, telnet)


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """A fixed console port belongs to one node at a time."""
    for slot in slots(node):
        if slot.port:
            claim_tcp_port(node, slot.port, slot.role)


@hookimpl(trylast=True)
async def emu_prepare(node: QemuNode) -> None:
    """At a start: take the telnet ports and the guest's console sockets (QEMU needs both
    before it runs). SPICE, or options using ``%console-port%``, get a free port chosen now
    (QEMU cannot pick one itself there)."""
    node.stash.pop(CONSOLE_PORT, None)
    chosen = node.stash[CHOSEN_PORTS] = {}
    held = node.stash[CONSOLES] = {}
    for slot in slots(node):
        if slot.type == "telnet":
            if node.status is NodeStatus.STARTING:
                held[slot.role] = await _open_host_console(node, slot)
                chosen[slot.role] = held[slot.role].telnet.port
        elif not slot.port:
            needs_number = slot.role == "console" and "%console-port%" in node.properties.options
            if slot.type in SPICE_TYPES or needs_number:
                chosen[slot.role] = _free_tcp_port(node)
    if "console" in chosen:
        node.stash[CONSOLE_PORT] = chosen["console"]


def _port(node: QemuNode, slot: Slot) -> int:
    if slot.role == "console":
        return console_port(node)
    return node.stash.get(CHOSEN_PORTS, {}).get(slot.role, 0) or slot.port


def _slot_args(node: QemuNode, slot: Slot, port: int) -> list[str]:
    host = node.settings.console_host
    if slot.type == "telnet":
        # A client of the host's socket; the path is relative to QEMU's working directory.
        chardev = opts("socket", {"id": slot.chardev, "path": slot.socket_name})
        return ["-chardev", chardev, "-serial", f"chardev:{slot.chardev}"]
    if slot.type == "vnc":
        if port and port < VNC_BASE:
            message = f"{slot.role}: a VNC port must be ≥ {VNC_BASE}, got {port}"
            raise NodeError(node.name, message)
        display = f"{host}:{port - VNC_BASE if port else 0}"
        # "to" lets QEMU walk up from display 0 to the first free one.
        return ["-vnc", opts(display, {"to": None if port else 99})]
    spice: dict[str, str | int | bool] = {"addr": host, "port": port or _free_tcp_port(node)}
    spice["disable-ticketing"] = True
    args = ["-spice", opts(None, spice)]
    if slot.type == "spice+agent":
        args += _spice_agent_args()
    return args


def _spice_agent_args() -> list[str]:
    """The SPICE agent's channel and the folder sharing channel, on a virtio serial bus."""
    return [
        "-device", opts("virtio-serial-pci", {"id": "spice-serial0"}),
        "-chardev", opts("spicevmc", {"id": "vdagent", "debug": 0, "name": "vdagent"}),
        "-device", opts("virtserialport", {
            "bus": "spice-serial0.0", "chardev": "vdagent", "name": "com.redhat.spice.0"
        }),
        "-chardev", opts("spiceport", {"id": "webdav", "name": "org.spice-space.webdav.0"}),
        "-device", opts("virtserialport", {
            "bus": "spice-serial0.0", "chardev": "webdav", "name": "org.spice-space.webdav.0"
        }),
    ]  # fmt: skip


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """The consoles' options (see the module docstring), then the display adapter a
    graphical console needs: ``qxl`` for SPICE, else ``std`` for VNC."""
    args: list[str] = []
    for slot in slots(node):
        args += _slot_args(node, slot, _port(node, slot))
    types = {slot.type for slot in slots(node)}
    if types & set(SPICE_TYPES):
        args += ["-vga", "qxl"]
    elif "vnc" in types:
        args += ["-vga", "std"]
    return [ArgFragment(positions.CONSOLE, args, "qemu.console")] if args else []


async def _serve(node: QemuNode, slot: Slot, held: HostConsole) -> ConsoleInfo:
    try:
        await asyncio.wait_for(held.hub.connected.wait(), CONNECT_TIMEOUT)
    except TimeoutError:
        raise NodeError(
            node.name,
            f"{slot.role}: QEMU did not connect its serial port in {CONNECT_TIMEOUT:g} s",
        ) from None
    await held.telnet.serve(held.hub)
    return ConsoleInfo("telnet", node.settings.console_host, held.telnet.port)


@hookimpl(trylast=True)
async def emu_started(node: QemuNode) -> None:
    """Serve the telnet consoles once QEMU is connected, or read the real VNC/SPICE port
    from QEMU; publish the console as ``node.console``, the auxiliary one for ``info``."""
    held = node.stash.get(CONSOLES, {})
    host = node.settings.console_host
    for slot in slots(node):
        if slot.role in held:
            info = await _serve(node, slot, held[slot.role])
            if slot.role == "console":  # where hosts find it (console reset)
                node.stash[CONSOLE_SERVER] = held[slot.role].telnet
        elif slot.type == "vnc":
            vnc = await monitor_of(node).execute("query-vnc")
            info = ConsoleInfo("vnc", host, int(vnc["service"]))
        else:
            spice = await monitor_of(node).execute("query-spice")
            info = ConsoleInfo("spice", host, int(spice["port"]))
        if slot.role == "console":
            node.console = info
        else:
            node.stash[AUX_INFO] = info


@hookimpl(trylast=True)
def emu_node_info(node: QemuNode) -> Mapping[str, Any]:
    """``aux``: the auxiliary console's real port while the node runs."""
    aux = node.stash.get(AUX_INFO, None)
    return {"aux": aux.port} if aux is not None and node.is_running else {}


@hookimpl(trylast=True)
async def emu_stopped(node: QemuNode) -> None:
    """QEMU is gone: read what it printed last, disconnect the consoles' clients and
    release the ports and the sockets."""
    node.stash.pop(AUX_INFO, None)
    node.stash.pop(CONSOLE_SERVER, None)
    for role, held in node.stash.pop(CONSOLES, {}).items():
        held.server.close()
        await held.hub.drain(DRAIN_TIMEOUT)
        await held.telnet.close()
        await held.hub.aclose()
        held.listener.close()
        (node.directory / f"{role}.sock").unlink(missing_ok=True)
