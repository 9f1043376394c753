"""Links between two node adapters: UDP tunnels, direct or through an impairment relay.

A direct link gives each side a :class:`~emucore.models.UdpNio` pointing at the other's
port. A link with impairments (any non-zero :class:`~emucore.models.LinkFilters` value)
points both sides at a :class:`~emucore.relay.Relay` instead. Setting filters on a direct
link inserts a relay live (each side is relinked); setting them back to 0 keeps the relay
but removes every impairment, so the frames pass untouched. Ports come from the session's
allocator and go back to it when the link is removed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import attrs

from emucore.errors import CaptureUnsupportedError, EmuError, NodeError
from emucore.models import LinkFilters, UdpNio
from emucore.node import Node
from emucore.ports import PortAllocator
from emucore.relay import SIDES, Relay, Side


@attrs.frozen
class Endpoint:
    """One end of a link: a node's adapter."""

    node: Node
    adapter: int

    def __str__(self) -> str:
        return f"{self.node.name}:{self.adapter}"


class Link:
    """A UDP link between two adapters.

    :ivar a: one end.
    :ivar b: the other end.
    :ivar filters: the impairments now applied.
    :ivar relay: the relay, when the link has (or had) impairments or a relay capture.
    """

    def __init__(self, a: Endpoint, b: Endpoint, ports: PortAllocator) -> None:
        self.a = a
        self.b = b
        self.filters = LinkFilters()
        self.relay: Relay | None = None
        self._ports = ports
        self._local: dict[Side, int] = {}
        self._relay_ports: dict[Side, int] = {}

    @property
    def name(self) -> str:
        """``node:adapter <-> node:adapter``."""
        return f"{self.a} <-> {self.b}"

    def __repr__(self) -> str:
        return f"<Link {self.name}>"

    def end(self, side: Side) -> Endpoint:
        """The endpoint on ``side`` (``a`` or ``b``)."""
        return self.a if side == "a" else self.b

    async def connect(self, filters: LinkFilters | None = None) -> None:
        """Allocate ports, open a relay if ``filters`` impair, and attach both NIOs."""
        for end in (self.a, self.b):
            if end.node.adapters[end.adapter].nio is not None:
                raise NodeError(end.node.name, f"adapter {end.adapter} is already connected")
        self._local = {"a": self._ports.allocate(), "b": self._ports.allocate()}
        try:
            if filters is not None and filters.active:
                await self._open_relay(filters)
            await self._attach_both()
        except BaseException:
            await self.disconnect()
            raise

    async def set_filters(self, filters: LinkFilters) -> None:
        """Change the impairments live; a direct link gets a relay on its first impairment."""
        if self.relay is None:
            if not filters.active:
                return
            await self._open_relay(filters)
            await self._attach_both()
        else:
            self.relay.set_filters(filters)
        self.filters = filters

    async def set_up(self, up: bool) -> None:
        """Suspend (``False``) or resume the link: both guests see their carrier follow."""
        # Both ends at once: an emulator that restarts to change its link (VPCS) takes seconds.
        await asyncio.gather(*(end.node.set_link(end.adapter, up) for end in (self.a, self.b)))

    async def start_capture(self, path: Path, side: Side = "a") -> None:
        """Capture the frames crossing the link, as seen at ``side``'s adapter.

        The node's emulator captures when it can (QEMU does); otherwise the link's relay
        does, and a direct link gets a relay for it.
        """
        end = self.end(side)
        try:
            await end.node.start_capture(end.adapter, path)
            return
        except CaptureUnsupportedError:
            pass  # the relay captures instead
        if self.relay is None:
            await self._open_relay(self.filters)
            await self._attach_both()
        assert self.relay is not None
        await self.relay.start_capture(path, side=side)

    async def stop_capture(self, side: Side = "a") -> None:
        """Stop the capture started on ``side``."""
        end = self.end(side)
        if end.node.adapters[end.adapter].capture is not None:
            await end.node.stop_capture(end.adapter)
        elif self.relay is not None:
            await self.relay.stop_capture(side=side)

    async def disconnect(self) -> None:
        """Detach both NIOs, close the relay, give the ports back (idempotent)."""
        errors: list[BaseException] = []
        for end in (self.a, self.b):
            try:
                if not end.node.closed:
                    await end.node.detach_nio(end.adapter)
            except EmuError as exc:
                errors.append(exc)
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        for port in [*self._local.values(), *self._relay_ports.values()]:
            self._ports.release(port)
        self._local, self._relay_ports = {}, {}
        if errors:
            raise errors[0]

    async def _open_relay(self, filters: LinkFilters) -> None:
        host = self._ports.host
        self._relay_ports = {"a": self._ports.allocate(), "b": self._ports.allocate()}
        self.relay = await Relay.open(
            host=host,
            port_a=self._relay_ports["a"],
            peer_a=(host, self._local["a"]),
            port_b=self._relay_ports["b"],
            peer_b=(host, self._local["b"]),
            filters=filters,
            name=self.name,
        )
        self.filters = filters

    def _nio(self, side: Side) -> UdpNio:
        other: Side = "b" if side == "a" else "a"
        host = self._ports.host
        if self.relay is not None:
            return UdpNio(self._local[side], host, self._relay_ports[side])
        return UdpNio(self._local[side], host, self._local[other])

    async def _attach_both(self) -> None:
        ends = [(self.end(side), self._nio(side)) for side in SIDES]
        await asyncio.gather(*(end.node.attach_nio(end.adapter, nio) for end, nio in ends))
