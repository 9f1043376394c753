"""The node's one adapter and its UDP tunnel: ``-s LOCAL_PORT -c REMOTE_PORT -t REMOTE_HOST``.

VPCS cannot change its tunnel while it runs. Attaching, replacing or removing the NIO of a
running node therefore **restarts VPCS** (:func:`emu_vpcs.process.restart`): its startup
script runs again (about 3 s with an address), what was typed on its console is lost, and a
running ``ping`` ends. The console stays open and its clients stay connected. A capture of a
VPCS end (which VPCS cannot do itself) runs in the link's relay; on a direct link the relay is
inserted first, which relinks, hence restarts, VPCS.

Without a NIO, VPCS binds a port the kernel picks (``-s 0``) and sends to the node's sink: a
UDP socket the host holds open and never reads, so its frames go nowhere, quietly (a closed
port would answer with ICMP errors; a random one might belong to someone).

VPCS binds its local port on every address and takes only an IPv4 literal as remote host;
TAP NIOs are not supported. VPCS has no carrier to take down: a link set down
(``emu_set_link``) restarts VPCS on the sink, and up again on its NIO.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Sequence

import attrs

from emu_vpcs import positions
from emu_vpcs.process import restart
from emucore import hookimpl
from emucore.errors import NodeError
from emucore.models import Nio, NodeStatus, UdpNio
from emucore.node import Node
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"


@attrs.frozen
class _Relink:
    """The NIO a restart for a relink builds its command line with."""

    nio: Nio | None


SINK = StashKey[socket.socket]()
_RELINK = StashKey[_Relink]()


def _ipv4(node: Node, host: str, what: str) -> str:
    """``host`` as the IPv4 literal VPCS needs (``localhost`` is 127.0.0.1)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise NodeError(
            node.name, f"{what}: VPCS needs an IPv4 address as its tunnel's host, got {host!r}"
        ) from None


def current_nio(node: Node) -> Nio | None:
    """The NIO the command line is built for: a relink's, else adapter 0's if its link is up."""
    relink = node.stash.get(_RELINK, None)
    if relink is not None:
        return relink.nio
    adapter = node.adapters[0]
    return adapter.nio if adapter.link_up else None


@hookimpl(trylast=True)
def emu_prepare(node: Node) -> None:
    """Open the sink at each start (a dry run shows remote port 0 instead)."""
    if node.status is NodeStatus.STARTING and SINK not in node.stash:
        host = _ipv4(node, node.settings.udp_host, "HostSettings.udp_host")
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # keep nothing
            sink.bind((host, 0))
        except OSError:
            sink.close()
            raise
        node.stash[SINK] = sink


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """The tunnel of adapter 0, or the sink when it has none."""
    nio = current_nio(node)
    if nio is None:
        sink = node.stash.get(SINK, None)
        host = _ipv4(node, node.settings.udp_host, "HostSettings.udp_host")
        port = sink.getsockname()[1] if sink is not None else 0
        args = ["-s", "0", "-c", str(port), "-t", host]
    elif isinstance(nio, UdpNio):
        remote = _ipv4(node, nio.remote_host, "adapter 0")
        args = ["-s", str(nio.local_port), "-c", str(nio.remote_port), "-t", remote]
    else:
        raise NodeError(
            node.name, f"adapter 0: VPCS supports UDP NIOs only, got {type(nio).__name__}"
        )
    return [ArgFragment(positions.NETWORK, args, "vpcs.network")]


async def _relink(node: Node, nio: Nio | None, reason: str) -> None:
    """Restart VPCS on ``nio`` (``None``: the sink), unless its command line stays the same."""
    node.stash[_RELINK] = _Relink(nio)
    try:
        argv = node.hooks.build_args(node)
    finally:
        node.stash.pop(_RELINK, None)
    if argv != node.argv:
        await restart(node, argv, reason)


def _describe(nio: Nio) -> str:
    if isinstance(nio, UdpNio):
        return f"UDP {nio.local_port} -> {nio.remote_host}:{nio.remote_port}"
    return type(nio).__name__


def _if_up(node: Node, adapter: int, nio: Nio) -> Nio | None:
    return nio if node.adapters[adapter].link_up else None


@hookimpl(trylast=True)
async def emu_attach_nio(node: Node, adapter: int, nio: Nio) -> None:
    """Restart VPCS connected to ``nio`` (to the sink while the link is down)."""
    reason = f"adapter {adapter} connected ({_describe(nio)})"
    await _relink(node, _if_up(node, adapter, nio), reason)


@hookimpl(trylast=True)
async def emu_update_nio(node: Node, adapter: int, old: Nio, new: Nio) -> None:
    """Restart VPCS connected to ``new`` (VPCS cannot change its tunnel live)."""
    reason = f"adapter {adapter} relinked ({_describe(new)})"
    await _relink(node, _if_up(node, adapter, new), reason)


@hookimpl(trylast=True)
async def emu_set_link(node: Node, adapter: int, up: bool) -> None:
    """Link down: restart VPCS on the sink, keeping the NIO; link up: back on the NIO."""
    nio = node.adapters[adapter].nio
    await _relink(node, nio if up else None, f"adapter {adapter} link {'up' if up else 'down'}")


@hookimpl(trylast=True)
async def emu_detach_nio(node: Node, adapter: int, nio: Nio) -> None:
    """Restart VPCS sending to the sink."""
    await _relink(node, None, f"adapter {adapter} disconnected")


@hookimpl(trylast=True)
def emu_stop(node: Node) -> None:
    """Close the sink."""
    sink = node.stash.pop(SINK, None)
    if sink is not None:
        with contextlib.suppress(OSError):
            sink.close()
