"""Tunnels: one adapter joined to a UDP peer outside the session, direct or through a relay.

A :class:`~emucore.links.Link` joins two adapters of the session. A :class:`Tunnel` joins one
adapter to a peer the session does not manage (an emulator on another host, another program):
the session only knows this end, ``local_port`` (where the peer sends) and the peer's address.
GNS3's controller works this way: it gives each end of a link its own NIO and sends the
link's filters to one end only, so the impairments must sit in front of that one adapter::

    direct:    node ── UDP ──▶ peer              node ◀── local_port ── peer
    relayed:   node ⇄ (host, relay port) │ Relay │ (host, local_port) ⇄ peer

The relay (``emucore.relay.Relay``, node on side ``a``, peer on side ``b``) appears with
the first impairment, or with a capture the node's emulator cannot take; the node is then
relinked to a port of its own and the relay binds ``local_port``, so the peer sees no change.
Like a link's, a relay stays once inserted; with every filter at 0 it forwards untouched.
"""

from __future__ import annotations

from pathlib import Path

from emucore.errors import CaptureUnsupportedError, EmuError, NodeError
from emucore.links import Endpoint
from emucore.models import LinkFilters, UdpNio
from emucore.ports import PortAllocator
from emucore.relay import Relay


class Tunnel:
    """An adapter joined to a UDP peer outside the session.

    :ivar end: the node's adapter.
    :ivar nio: the tunnel as the peer knows it: ``local_port`` (this end, where the peer
        sends), ``remote_host`` and ``remote_port`` (the peer).
    :ivar filters: the impairments now applied (in both directions unless
        ``filters.direction`` says otherwise; ``a`` is the node, ``b`` the peer).
    :ivar relay: the relay in front of the adapter, once there is one.
    """

    def __init__(self, end: Endpoint, nio: UdpNio, ports: PortAllocator) -> None:
        self.end = end
        self.nio = nio
        self.filters = LinkFilters()
        self.relay: Relay | None = None
        self._ports = ports
        self._relay_ports: list[int] = []

    @property
    def name(self) -> str:
        """``node:adapter <-> host:port``."""
        return f"{self.end} <-> {self.nio.remote_host}:{self.nio.remote_port}"

    def __repr__(self) -> str:
        return f"<Tunnel {self.name}>"

    async def connect(self, filters: LinkFilters | None = None) -> None:
        """Hold ``local_port``, open a relay if ``filters`` impair, and attach the NIO.

        :raises NodeError: the adapter does not exist or is connected already.
        :raises PortError: ``local_port`` is held by another tunnel or bound by a program.
        """
        node, adapter = self.end.node, self.end.adapter
        if node.adapter(adapter).nio is not None:
            raise NodeError(node.name, f"adapter {adapter} is already connected")
        if self.nio.local_port not in self._ports.held:
            self._ports.reserve(self.nio.local_port)
        try:
            if filters is not None and filters.active:
                await self._insert_relay(filters)
            else:
                await node.attach_nio(adapter, self.nio)
        except BaseException:
            await self.disconnect()
            raise

    async def set_filters(self, filters: LinkFilters) -> None:
        """Change the impairments live; the first impairment inserts the relay."""
        if self.relay is None:
            if filters.active:
                await self._insert_relay(filters)
            return
        self.relay.set_filters(filters)
        self.filters = filters

    async def set_up(self, up: bool) -> None:
        """Take the link down (``False``) or up as the guest sees it; the NIO stays."""
        await self.end.node.set_link(self.end.adapter, up)

    async def start_capture(self, path: Path) -> None:
        """Capture the frames crossing the adapter: by the emulator when it can, else in the
        relay (inserted for it if needed), as a sniffer on the node's side would see them."""
        node, adapter = self.end.node, self.end.adapter
        try:
            await node.start_capture(adapter, path)
            return
        except CaptureUnsupportedError:
            pass  # the relay captures instead
        if self.relay is None:
            await self._insert_relay(self.filters)
        assert self.relay is not None
        await self.relay.start_capture(path, side="a")

    async def stop_capture(self) -> None:
        """Stop the capture started with :meth:`start_capture` (no-op when none runs)."""
        node, adapter = self.end.node, self.end.adapter
        if node.adapter(adapter).capture is not None:
            await node.stop_capture(adapter)
        elif self.relay is not None:
            await self.relay.stop_capture(side="a")

    @property
    def capturing(self) -> bool:
        """Whether a capture of this tunnel runs (in the emulator or in the relay)."""
        node, adapter = self.end.node, self.end.adapter
        if node.adapter(adapter).capture is not None:
            return True
        return self.relay is not None and self.relay.capturing("a")

    async def disconnect(self) -> None:
        """Detach the NIO, close the relay, give the ports back (idempotent)."""
        node, adapter = self.end.node, self.end.adapter
        error: EmuError | None = None
        try:
            if not node.closed:
                await node.detach_nio(adapter)
        except EmuError as exc:
            error = exc
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        for port in [self.nio.local_port, *self._relay_ports]:
            self._ports.release(port)
        self._relay_ports = []
        if error is not None:
            raise error

    async def _insert_relay(self, filters: LinkFilters) -> None:
        """Relink the node to a port of its own, then let a relay take ``local_port``."""
        host = self._ports.host
        node_port, relay_port = self._ports.allocate(), self._ports.allocate()
        self._relay_ports = [node_port, relay_port]
        # The node lets go of local_port first: the relay binds it next.
        await self.end.node.attach_nio(self.end.adapter, UdpNio(node_port, host, relay_port))
        self.relay = await Relay.open(
            host=host,
            port_a=relay_port,
            peer_a=(host, node_port),
            port_b=self.nio.local_port,
            peer_b=(self.nio.remote_host, self.nio.remote_port),
            filters=filters,
            name=self.name,
        )
        self.filters = filters
