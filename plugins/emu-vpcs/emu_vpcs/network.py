"""The node's one adapter and its UDP tunnel: ``-s LOCAL_PORT -c REMOTE_PORT -t REMOTE_HOST``.

VPCS cannot change its tunnel while it runs. Attaching, replacing or removing the NIO of a
running node therefore **restarts VPCS** (``vpcs.process`` does it, with the command line
this module builds from the adapter as it now is): its startup script runs again (about
3 s with an address), what was typed on its console is lost, and a running ``ping`` ends.
The console stays open and its clients stay connected. A capture of a
VPCS end (which VPCS cannot do itself) runs in the link's relay; on a direct link the relay is
inserted first, which relinks, hence restarts, VPCS.

Without a NIO, VPCS binds a port the kernel picks (``-s 0``) and sends to the node's sink: a
UDP socket the host holds open and never reads, so its frames go nowhere, quietly (a closed
port would answer with ICMP errors; a random one might belong to someone).

VPCS binds its local port on every address and takes only an IPv4 literal as remote host;
TAP NIOs are not supported. VPCS has no carrier to take down: a link set down restarts VPCS
on the sink, and up again on its NIO.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Sequence

from emu_vpcs import positions
from emu_vpcs.properties import VpcsNode
from emucore import hookimpl
from emucore.errors import NodeError
from emucore.models import Nio, NodeStatus, UdpNio
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"


SINK = StashKey[socket.socket]()


def _ipv4(node: VpcsNode, host: str, what: str) -> str:
    """``host`` as the IPv4 literal VPCS needs (``localhost`` is 127.0.0.1)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise NodeError(
            node.name, f"{what}: VPCS needs an IPv4 address as its tunnel's host, got {host!r}"
        ) from None


def current_nio(node: VpcsNode) -> Nio | None:
    """The NIO the command line is built for: adapter 0's, if its link is up."""
    adapter = node.adapters[0]
    return adapter.nio if adapter.link_up else None


@hookimpl(trylast=True)
def emu_prepare(node: VpcsNode) -> None:
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
def emu_build_args(node: VpcsNode) -> Sequence[ArgFragment]:
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


@hookimpl(trylast=True)
def emu_stop(node: VpcsNode) -> None:
    """Close the sink."""
    sink = node.stash.pop(SINK, None)
    if sink is not None:
        with contextlib.suppress(OSError):
            sink.close()
