"""The link relay: impairments (loss, corruption, delay, jitter, rate) and capture for UDP links.

QEMU has no netem, so a UDP link with impairments runs through a relay in the host process;
a link without impairments stays direct. Each node's NIO points at the relay's port on its
side, so node B sees A's frames come from ``port_b``, the remote of B's NIO::

    node A ──▶ (host, port_a) ─┐         ┌─ (host, port_b) ──▶ node B
    node A ◀── (host, port_a) ◀┘  relay  └▶ (host, port_b) ◀── node B

Each direction is impaired on its own, with the same :class:`~emucore.models.LinkFilters`:
the counted drop (one frame in N), loss, then corruption, then the rate limit (a token bucket
in front of a ~100 ms tail-drop queue), then delay ± jitter (jitter reorders frames, as netem
does). Held frames wait in a heap served by one ``loop.call_at`` timer per direction;
nothing ever sleeps. With every filter at 0 a frame goes from ``recvfrom`` straight to
``sendto``: no timer, no random draw.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import os
import random
import socket
import time
from types import TracebackType
from typing import Literal

import attrs

from emucore.errors import EmuError, PortError
from emucore.models import LinkFilters
from emucore.pcap import PcapWriter

log = logging.getLogger("emu.relay")

Side = Literal["a", "b"]
Address = tuple[str, int]

SIDES: tuple[Side, Side] = ("a", "b")
ETHERNET_HEADER = 14
# The largest UDP payload; jumbo frames fit.
MAX_DATAGRAM = 65535
# Frames held (delay, jitter, rate) per direction, like netem's default limit.
QUEUE_LIMIT = 1000
# The rate limit drops a frame rather than hold it longer than this.
MAX_QUEUE_DELAY = 0.1
# Frames read per readiness callback: one busy direction cannot starve the other.
_BATCH = 64
# Token bucket depth: a full-size frame, or 5 ms at the link rate when that is more.
_MIN_BURST_BYTES = 1518
_BURST_TIME = 0.005
# Room for bursts from fast guests; the kernel caps it at net.core.[rw]mem_max.
_SOCKET_BUFFER = 1 << 20
_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "an IPv4", socket.AF_INET6: "an IPv6"}


class RelayError(EmuError):
    """A relay cannot be opened or was asked something impossible (bad peer, second capture)."""


@attrs.frozen
class DirectionStats:
    """Counters of one direction of a relay since it opened.

    :ivar received: frames received from the sending side's peer.
    :ivar forwarded: frames sent to the receiving side's peer.
    :ivar dropped_loss: frames dropped by the loss impairment or the counted drop
        (``drop_every``).
    :ivar dropped_queue: frames dropped because the relay's queue was full or would have held
        them too long (rate limit), or the kernel's send buffer was full.
    :ivar corrupted: frames with one bit flipped past the Ethernet header.
    :ivar bytes: bytes forwarded.
    :ivar ignored: datagrams from an address that is not the sending side's peer (not counted
        in ``received``).
    :ivar send_errors: frames the OS refused to send (e.g. no route to the peer).
    :ivar queued: frames held for delay or rate limit right now.
    """

    received: int = 0
    forwarded: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    corrupted: int = 0
    bytes: int = 0
    ignored: int = 0
    send_errors: int = 0
    queued: int = 0


@attrs.frozen
class RelayStats:
    """Counters of both directions of a relay.

    :ivar a_to_b: frames node A sent, on their way to node B.
    :ivar b_to_a: frames node B sent, on their way to node A.
    """

    a_to_b: DirectionStats
    b_to_a: DirectionStats


class _Side:
    """One end of the relay: the socket node X talks to, X's address, X's capture."""

    __slots__ = ("capture", "family", "name", "peer", "relay_name", "sock")

    def __init__(self, relay_name: str, name: Side, sock: socket.socket, peer: Address) -> None:
        self.relay_name = relay_name
        self.name = name
        self.sock = sock
        self.family = sock.family
        self.peer = peer
        self.capture: PcapWriter | None = None

    def write_capture(self, capture: PcapWriter, frame: bytes) -> None:
        try:
            capture.write(frame, time.time())
        except OSError as error:
            # A full disk must not break the link: stop capturing, keep forwarding.
            log.warning(
                "%s: capture of side %s to %s stopped: %s",
                self.relay_name,
                self.name,
                capture.path,
                error,
            )
            self.capture = None
            with contextlib.suppress(OSError):
                capture.close()


class _Direction:
    """Frames from one side to the other: counters, impairments and the held-frame heap."""

    __slots__ = (
        "burst",
        "bytes",
        "corrupted",
        "corruption",
        "counted",
        "delay",
        "drop_every",
        "dropped_loss",
        "dropped_queue",
        "dst",
        "forwarded",
        "ignored",
        "impaired",
        "jitter",
        "last_departure",
        "line_free",
        "loop",
        "loss",
        "queue",
        "rate",
        "received",
        "rng",
        "send_errors",
        "sequence",
        "src",
        "timer",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: _Side, dst: _Side, rng: random.Random
    ) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.rng = rng
        self.received = self.forwarded = self.bytes = self.ignored = 0
        self.dropped_loss = self.dropped_queue = self.corrupted = self.send_errors = 0
        # (due time, sequence, frame); the sequence keeps equal due times in arrival order.
        self.queue: list[tuple[float, int, bytes]] = []
        self.sequence = 0
        self.timer: asyncio.TimerHandle | None = None
        self.set_filters(LinkFilters())

    def set_filters(self, filters: LinkFilters) -> None:
        self.impaired = filters.active
        self.drop_every = filters.drop_every
        self.counted = 0
        self.loss = filters.loss / 100
        self.corruption = filters.corruption / 100
        self.delay = filters.delay / 1000
        self.jitter = filters.jitter / 1000
        self.rate = filters.rate * 1000 / 8  # bytes per second
        self.burst = max(_MIN_BURST_BYTES, self.rate * _BURST_TIME)
        # A new rate starts with a full bucket; frames held already keep their due time.
        self.line_free = self.last_departure = 0.0

    def stats(self) -> DirectionStats:
        return DirectionStats(
            received=self.received,
            forwarded=self.forwarded,
            dropped_loss=self.dropped_loss,
            dropped_queue=self.dropped_queue,
            corrupted=self.corrupted,
            bytes=self.bytes,
            ignored=self.ignored,
            send_errors=self.send_errors,
            queued=len(self.queue),
        )

    def on_readable(self) -> None:
        """Forward what the source socket holds, at most ``_BATCH`` frames per call."""
        src = self.src
        recvfrom = src.sock.recvfrom
        for _ in range(_BATCH):
            try:
                frame, source = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as error:
                log.debug("%s: receive on side %s failed: %s", src.relay_name, src.name, error)
                return
            peer = src.peer
            if source[1] != peer[1] or source[0] != peer[0]:
                self.ignored += 1
                log.debug(
                    "%s: side %s ignored a datagram from %s (its peer is %s)",
                    src.relay_name,
                    src.name,
                    source[:2],
                    peer,
                )
                continue
            self.received += 1
            capture = src.capture
            if capture is not None:
                src.write_capture(capture, frame)
            if self.impaired:
                self.impair(frame)
            else:
                self.send(frame)

    def send(self, frame: bytes) -> None:
        dst = self.dst
        try:
            dst.sock.sendto(frame, dst.peer)
        except BlockingIOError:
            self.dropped_queue += 1
            return
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                self.dropped_queue += 1
            else:
                self.send_errors += 1
                log.debug("%s: send to side %s failed: %s", dst.relay_name, dst.name, error)
            return
        self.forwarded += 1
        self.bytes += len(frame)
        capture = dst.capture
        if capture is not None:
            dst.write_capture(capture, frame)

    def impair(self, frame: bytes) -> None:
        rng = self.rng
        if self.drop_every:
            self.counted += 1
            if self.counted >= self.drop_every:
                self.counted = 0
                self.dropped_loss += 1
                return
        if self.loss and rng.random() < self.loss:
            self.dropped_loss += 1
            return
        if self.corruption and len(frame) > ETHERNET_HEADER and rng.random() < self.corruption:
            frame = _corrupt(frame, rng)
            self.corrupted += 1
        now = self.loop.time()
        due = now
        size = len(frame)
        if self.rate:
            # Token bucket as a virtual clock: line_free is when the bucket would be full
            # again; a frame leaves once the bucket has room for it, never before the last one.
            due = max(now, self.line_free + (size - self.burst) / self.rate, self.last_departure)
            if due - now > MAX_QUEUE_DELAY:
                self.dropped_queue += 1
                return
        departure = due
        if self.delay or self.jitter:
            due += max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))
        if len(self.queue) >= QUEUE_LIMIT:
            self.dropped_queue += 1
            return
        if self.rate:
            self.line_free = max(self.line_free, departure) + size / self.rate
            self.last_departure = departure
        if due <= now and not self.queue:
            self.send(frame)  # nothing held, nothing to wait for: no timer
            return
        heapq.heappush(self.queue, (due, self.sequence, frame))
        self.sequence += 1
        if self.timer is None or due < self.timer.when():
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(due, self.release_due)

    def release_due(self) -> None:
        """Timer callback: send every held frame whose time has come, re-arm for the next."""
        self.timer = None
        queue = self.queue
        now = self.loop.time()
        while queue and queue[0][0] <= now:
            self.send(heapq.heappop(queue)[2])
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self.release_due)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


def _corrupt(frame: bytes, rng: random.Random) -> bytes:
    """``frame`` with one random bit of one random byte past the Ethernet header flipped."""
    damaged = bytearray(frame)
    damaged[rng.randrange(ETHERNET_HEADER, len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


class Relay:
    """Joins two UDP tunnel ends, A and B, through this process to impair and capture frames.

    Open one with :meth:`open` inside a running event loop and close it with :meth:`close`
    (or use ``async with``). Everything runs in that loop's thread.

    :ivar name: how messages and logs name the relay.
    """

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        side_a: _Side,
        side_b: _Side,
        filters: LinkFilters,
        rng: random.Random,
    ) -> None:
        """Use :meth:`open`."""
        self.name = name
        self._loop = loop
        self._sides = {"a": side_a, "b": side_b}
        # Own generators per direction: the draws of one never depend on the other's traffic.
        self._directions = {
            "a": _Direction(loop, side_a, side_b, random.Random(rng.getrandbits(64))),
            "b": _Direction(loop, side_b, side_a, random.Random(rng.getrandbits(64))),
        }
        self._filters = LinkFilters()
        self._closed = False
        self.set_filters(filters)
        for side in SIDES:
            loop.add_reader(self._sides[side].sock, self._directions[side].on_readable)

    @classmethod
    async def open(
        cls,
        *,
        host: str,
        port_a: int,
        peer_a: Address,
        port_b: int,
        peer_b: Address,
        filters: LinkFilters | None = None,
        rng: random.Random | None = None,
        name: str = "",
    ) -> Relay:
        """Bind both sides and start forwarding.

        :param host: the address both sides bind to (an IP literal or a host name).
        :param port_a: where node A sends (its NIO's remote port); 0 picks a free port, read it
            back with :meth:`port`.
        :param peer_a: where node A receives (its NIO's local address).
        :param port_b: where node B sends.
        :param peer_b: where node B receives.
        :param filters: impairments, the same for both directions; none by default.
        :param rng: source of randomness for loss, corruption and jitter (seed it for
            reproducible runs); a fresh unseeded one by default.
        :param name: how messages and logs name the relay; ``relay HOST:PORT_A-PORT_B`` by
            default.
        :return: the running relay.
        :raises PortError: a port is taken already.
        :raises RelayError: the host or a peer cannot be resolved, or a socket cannot be set up.
        """
        loop = asyncio.get_running_loop()
        label = name or f"relay {host}:{port_a}-{port_b}"
        family, bind_address = await _resolve(loop, host, 0, f"{label}: host")
        socks: list[socket.socket] = []
        try:
            for side, port in zip(SIDES, (port_a, port_b), strict=True):
                socks.append(_bind(family, (bind_address[0], port), label, side))
            if not name:
                ports = "-".join(str(sock.getsockname()[1]) for sock in socks)
                label = f"relay {host}:{ports}"
            _, address_a = await _resolve(loop, *peer_a, f"{label}: peer of side a", family)
            _, address_b = await _resolve(loop, *peer_b, f"{label}: peer of side b", family)
            relay = cls(
                label,
                loop,
                _Side(label, "a", socks[0], address_a),
                _Side(label, "b", socks[1], address_b),
                filters if filters is not None else LinkFilters(),
                rng if rng is not None else random.Random(),
            )
        except BaseException:
            for sock in socks:
                loop.remove_reader(sock)
                sock.close()
            raise
        log.debug("%s: open, side a ↔ %s, side b ↔ %s", label, address_a, address_b)
        return relay

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def filters(self) -> LinkFilters:
        """The impairments in force."""
        return self._filters

    @property
    def stats(self) -> RelayStats:
        """A snapshot of the counters of both directions."""
        return RelayStats(
            a_to_b=self._directions["a"].stats(), b_to_a=self._directions["b"].stats()
        )

    def port(self, side: Side) -> int:
        """The UDP port the relay listens on for ``side`` (where that side's node sends).

        :param side: ``"a"`` or ``"b"``.
        """
        return int(self._side(side).sock.getsockname()[1])

    def peer(self, side: Side) -> Address:
        """Where the relay sends frames for ``side`` (that side's node) and accepts them from.

        :param side: ``"a"`` or ``"b"``.
        """
        return self._side(side).peer

    def set_filters(self, filters: LinkFilters) -> None:
        """Change the impairments, effective from the next frame (``filters.direction`` says
        which directions suffer them).

        A field set to 0 removes that impairment; all at 0 restore the direct path (frames
        held already still leave at their due time).

        :param filters: the new impairments.
        """
        self._check_open("change filters")
        self._filters = filters
        # Direction "a" carries frames from a to b; filters.direction may spare one of them.
        spared = {"a_to_b": "b", "b_to_a": "a"}.get(filters.direction)
        for side, direction in self._directions.items():
            direction.set_filters(LinkFilters() if side == spared else filters)

    async def set_peer(self, side: Side, peer: Address) -> None:
        """Relink one side: send its frames to ``peer`` and accept frames only from there.

        :param side: ``"a"`` or ``"b"``.
        :param peer: the new node address (IP literal or host name, port).
        :raises RelayError: the peer cannot be resolved to an address of the side's family.
        """
        end = self._side(side)
        self._check_open("relink")
        _, address = await _resolve(
            self._loop, *peer, f"{self.name}: new peer of side {side}", end.family
        )
        log.debug("%s: side %s relinked from %s to %s", self.name, side, end.peer, address)
        end.peer = address

    async def start_capture(self, path: str | os.PathLike[str], *, side: Side) -> None:
        """Write the frames crossing ``side`` to a pcap file, as a sniffer on that cable would.

        The file holds both directions: the frames that side's node sends, as they enter the
        relay, and the frames it is sent, as they leave the relay (after impairments: lost
        frames are missing, corrupted ones show the damage).

        :param path: the pcap file to (over)write.
        :param side: ``"a"`` or ``"b"``.
        :raises RelayError: a capture runs on that side already, or the file cannot be created.
        """
        end = self._side(side)
        self._check_open("capture")
        if end.capture is not None:
            raise RelayError(
                f"{self.name}: side {side} is already captured to {end.capture.path};"
                " stop that capture first"
            )
        try:
            end.capture = PcapWriter(path)
        except OSError as error:
            raise RelayError(
                f"{self.name}: cannot write capture file {os.fspath(path)!r}: {error.strerror}"
            ) from error
        log.debug("%s: capturing side %s to %s", self.name, side, end.capture.path)

    def capturing(self, side: Side) -> bool:
        """Whether a capture of ``side`` runs.

        :param side: ``"a"`` or ``"b"``.
        """
        return self._side(side).capture is not None

    async def stop_capture(self, *, side: Side) -> None:
        """Stop the capture of ``side`` (no-op if none runs); the file stays.

        :param side: ``"a"`` or ``"b"``.
        """
        end = self._side(side)
        capture, end.capture = end.capture, None
        if capture is not None:
            capture.close()

    async def close(self) -> None:
        """Stop forwarding: drop held frames, close the sockets and captures (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for direction in self._directions.values():
            direction.stop()
        for end in self._sides.values():
            self._loop.remove_reader(end.sock)
            end.sock.close()
            capture, end.capture = end.capture, None
            if capture is not None:
                capture.close()
        log.debug("%s: closed", self.name)

    async def __aenter__(self) -> Relay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _side(self, side: Side) -> _Side:
        try:
            return self._sides[side]
        except KeyError:
            raise RelayError(f"{self.name}: side must be 'a' or 'b', not {side!r}") from None

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise RelayError(f"{self.name}: cannot {action}, the relay is closed")


async def _resolve(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    what: str,
    family: int = socket.AF_UNSPEC,
) -> tuple[int, Address]:
    """The family and the ``(ip, port)`` of ``host``, as ``recvfrom`` reports a sender."""
    if not 0 <= port <= 65535:
        raise RelayError(f"{what}: port {port} is not within 0-65535")
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as error:
        kind = _FAMILY_NAMES.get(family, "an")
        raise RelayError(f"{what} {host!r} is not {kind} address: {error}") from error
    found_family, _, _, _, address = infos[0]
    return found_family, (str(address[0]), int(address[1]))


def _bind(family: int, address: Address, name: str, side: Side) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.bind(address)
    except OSError as error:
        sock.close()
        where = f"{name}: side {side} cannot bind UDP {address[0]} port {address[1]}"
        if error.errno in (errno.EADDRINUSE, errno.EACCES):
            raise PortError(f"{where}: {error.strerror}; allocate another port") from error
        raise RelayError(f"{where}: {error.strerror}") from error
    return sock
