"""The node's console: telnet, served by the host from VPCS' terminal, or none.

The host reads VPCS' terminal (see :mod:`emu_vpcs.terminal`) and serves it on a TCP port
(:class:`~emucore.telnetd.TelnetServer`): several clients may be connected at once, and they
stay connected when VPCS restarts for a relink. Without a ``console`` port the kernel picks a
free one when the server binds, and it is published as ``node.console``. Everything VPCS
prints is also in ``vpcs.log`` in the node directory, whether a client listens or not.
"""

from __future__ import annotations

from emu_vpcs.properties import VpcsNode
from emu_vpcs.terminal import terminal_of
from emucore import hookimpl
from emucore.claims import claim_tcp_port
from emucore.errors import NodeError
from emucore.models import ConsoleInfo
from emucore.telnetd import CONSOLE_SERVER, TelnetServer

EMULATOR = "vpcs"


@hookimpl(trylast=True)
def emu_node_created(node: VpcsNode) -> None:
    """A fixed console port belongs to one node at a time."""
    if node.properties.console and node.properties.console_type != "none":
        claim_tcp_port(node, node.properties.console, "console")


@hookimpl(trylast=True)
async def emu_started(node: VpcsNode) -> None:
    """Serve the telnet console and publish its address."""
    props = node.properties
    if props.console_type != "telnet":
        return
    host = node.settings.console_host
    try:
        server = await TelnetServer.start(node.name, terminal_of(node), host, props.console or 0)
    except OSError as exc:
        raise NodeError(
            node.name,
            f"console: cannot listen on {host} port {props.console or 0}: {exc.strerror or exc};"
            " choose another port or leave console unset",
        ) from None
    node.stash[CONSOLE_SERVER] = server  # where hosts find it (console reset)
    node.console = ConsoleInfo("telnet", host, server.port)


@hookimpl(trylast=True)
async def emu_stop(node: VpcsNode) -> None:
    """Stop serving the console; its clients are disconnected."""
    server = node.stash.pop(CONSOLE_SERVER, None)
    if server is not None:
        await server.close()
