"""The link relay with real UDP sockets on 127.0.0.1 standing in for nodes A and B.

Every test waits for the datagrams or counters it expects, with a timeout; none sleeps and
then looks. Captures are read back with dpkt, a real pcap parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import attrs
import dpkt
import pytest

from emucore.errors import EmuError, PortError
from emucore.models import LinkFilters
from emucore.pcap import PcapWriter
from emucore.ports import PortAllocator
from emucore.relay import Relay, RelayError

HOST = "127.0.0.1"
TEST_TIMEOUT = 10.0
WAIT = 3.0
# Local-administered MACs and the IEEE "local experimental" EtherType.
_HEADER = bytes.fromhex("02 00 00 00 00 02  02 00 00 00 00 01  88 b5")


def async_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT))

    return run


def frame(index: int, size: int = 64) -> bytes:
    """An Ethernet frame of ``size`` bytes carrying ``index`` right after the header."""
    body = struct.pack("!I", index)
    return _HEADER + body + bytes(size - len(_HEADER) - len(body))


@attrs.frozen
class Arrival:
    """A datagram a fake node received."""

    frame: bytes
    source: tuple[str, int]
    time: float


class FakeNode:
    """A UDP tunnel end like an emulator's NIO: sends frames, records what arrives and when."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.arrivals: list[Arrival] = []
        self._changed = asyncio.Event()
        self.loop.add_reader(self.sock, self._read)

    def _read(self) -> None:
        # Drain everything: a node must not be the bottleneck that overflows a buffer.
        while True:
            try:
                data, source = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            self.arrivals.append(Arrival(data, source, self.loop.time()))
        self._changed.set()

    def send(self, data: bytes, port: int) -> float:
        """Send ``data`` to the relay's ``port``; return the loop time just before."""
        sent = self.loop.time()
        self.sock.sendto(data, (HOST, port))
        return sent

    async def wait_arrivals(self, count: int, timeout: float = WAIT) -> list[Arrival]:
        """The first ``count`` arrivals, once they are all in."""
        deadline = self.loop.time() + timeout
        while len(self.arrivals) < count:
            self._changed.clear()
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.arrivals)} datagrams, expected {count}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.arrivals[:count]

    def close(self) -> None:
        """Stop reading and free the port."""
        self.loop.remove_reader(self.sock)
        self.sock.close()


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds (polled each millisecond), or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def open_lab(
    filters: LinkFilters | None = None, seed: int = 1
) -> tuple[FakeNode, FakeNode, Relay]:
    """Nodes A and B joined by a relay on free ports."""
    node_a, node_b = FakeNode(), FakeNode()
    relay = await Relay.open(
        host=HOST,
        port_a=0,
        peer_a=node_a.address,
        port_b=0,
        peer_b=node_b.address,
        filters=filters,
        rng=random.Random(seed),
    )
    return node_a, node_b, relay


async def close_lab(*things: FakeNode | Relay) -> None:
    """Close relays and nodes."""
    for thing in things:
        if isinstance(thing, Relay):
            await thing.close()
        else:
            thing.close()


def received_a_to_b(relay: Relay, count: int) -> bool:
    """Whether the relay has received ``count`` frames from A."""
    return relay.stats.a_to_b.received == count


async def send_in_chunks(
    sender: FakeNode, receiver: FakeNode, relay: Relay, frames: list[bytes], chunk: int = 100
) -> None:
    """Send ``frames`` A→B a chunk at a time, each chunk once the last one is through.

    Blasting thousands of datagrams at once would overflow socket buffers and turn a test of
    the relay into a test of the kernel.
    """
    port = relay.port("a")
    for start in range(0, len(frames), chunk):
        for data in frames[start : start + chunk]:
            sender.send(data, port)
        done = min(start + chunk, len(frames))

        def through(done: int = done) -> bool:
            stats = relay.stats.a_to_b
            return (
                stats.received == done
                and stats.queued == 0
                and len(receiver.arrivals) == stats.forwarded
            )

        await until(through, f"frames {start}-{done} through the relay")


def read_pcap(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    """The link type and the (timestamp, frame) records of a pcap file, parsed by dpkt."""
    with path.open("rb") as file:
        reader = dpkt.pcap.Reader(file)
        return reader.datalink(), [(float(ts), bytes(data)) for ts, data in reader]


# --- forwarding ------------------------------------------------------------------------------


@async_test
async def test_forwards_both_ways_from_the_port_the_node_expects() -> None:
    node_a, node_b, relay = await open_lab()
    node_a.send(frame(1), relay.port("a"))
    (arrival,) = await node_b.wait_arrivals(1)
    assert arrival.frame == frame(1)
    assert arrival.source == (HOST, relay.port("b"))

    node_b.send(frame(2, 1500), relay.port("b"))
    (arrival,) = await node_a.wait_arrivals(1)
    assert arrival.frame == frame(2, 1500)
    assert arrival.source == (HOST, relay.port("a"))

    stats = relay.stats
    assert (stats.a_to_b.received, stats.a_to_b.forwarded, stats.a_to_b.bytes) == (1, 1, 64)
    assert (stats.b_to_a.received, stats.b_to_a.forwarded, stats.b_to_a.bytes) == (1, 1, 1500)
    await close_lab(relay, node_a, node_b)


@async_test
async def test_ignores_datagrams_from_anyone_but_the_sides_peer() -> None:
    node_a, node_b, relay = await open_lab()
    stranger = FakeNode()
    stranger.send(frame(666), relay.port("a"))
    await until(lambda: relay.stats.a_to_b.ignored == 1, "the stranger's datagram")
    node_a.send(frame(1), relay.port("a"))
    (arrival,) = await node_b.wait_arrivals(1)
    assert arrival.frame == frame(1)
    assert relay.stats.a_to_b.received == 1
    await close_lab(relay, node_a, node_b, stranger)


# --- impairments -----------------------------------------------------------------------------


async def survivors_of_loss(seed: int, count: int) -> tuple[list[int], int]:
    """Which of ``count`` frames cross a link with 30 % loss, and the relay's loss counter."""
    node_a, node_b, relay = await open_lab(LinkFilters(loss=30), seed=seed)
    await send_in_chunks(node_a, node_b, relay, [frame(i) for i in range(count)])
    stats = relay.stats.a_to_b
    assert stats.received == count
    assert stats.forwarded + stats.dropped_loss == count
    assert len(node_b.arrivals) == stats.forwarded
    survivors = [struct.unpack_from("!I", a.frame, 14)[0] for a in node_b.arrivals]
    await close_lab(relay, node_a, node_b)
    return survivors, stats.dropped_loss


@async_test
async def test_loss_drops_the_given_share_reproducibly() -> None:
    survivors, dropped = await survivors_of_loss(seed=7, count=2000)
    # 30 % of 2000 is 600, σ ≈ 20.5: ±90 is over 4σ, and the seed makes it repeatable anyway.
    assert 510 <= dropped <= 690
    assert survivors == sorted(survivors)
    again, _ = await survivors_of_loss(seed=7, count=2000)
    assert again == survivors


@async_test
async def test_corruption_flips_exactly_one_bit_past_the_ethernet_header() -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(corruption=100))
    sent = [frame(i, 100) for i in range(50)]
    await send_in_chunks(node_a, node_b, relay, sent)
    positions = set()
    for original, arrival in zip(sent, node_b.arrivals, strict=True):
        changed = [
            i for i, (x, y) in enumerate(zip(original, arrival.frame, strict=True)) if x != y
        ]
        assert len(arrival.frame) == len(original)
        assert len(changed) == 1
        assert changed[0] >= 14
        assert bin(original[changed[0]] ^ arrival.frame[changed[0]]).count("1") == 1
        positions.add(changed[0])
    assert len(positions) > 10  # the byte is random, not always the same one
    assert relay.stats.a_to_b.corrupted == 50

    # A frame with no payload has nothing to corrupt: it passes as it is.
    node_a.send(_HEADER, relay.port("a"))
    arrival = (await node_b.wait_arrivals(51))[-1]
    assert arrival.frame == _HEADER
    assert relay.stats.a_to_b.corrupted == 50
    await close_lab(relay, node_a, node_b)


@async_test
async def test_delay_shows_in_the_one_way_latency_of_both_directions() -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(delay=100))
    sent_a = [node_a.send(frame(i), relay.port("a")) for i in range(5)]
    sent_b = [node_b.send(frame(i), relay.port("b")) for i in range(5)]
    await until(lambda: relay.stats.a_to_b.queued == 5, "5 frames held")
    at_b = await node_b.wait_arrivals(5)
    at_a = await node_a.wait_arrivals(5)
    for sent, arrivals in ((sent_a, at_b), (sent_b, at_a)):
        for when, arrival in zip(sent, arrivals, strict=True):
            assert 0.100 <= arrival.time - when < 0.3
    assert [a.frame for a in at_b] == [frame(i) for i in range(5)]  # no jitter, no reordering
    await close_lab(relay, node_a, node_b)


@async_test
async def test_jitter_spreads_latencies_around_the_delay() -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(delay=50, jitter=40))
    sent = {i: node_a.send(frame(i), relay.port("a")) for i in range(40)}
    arrivals = await node_b.wait_arrivals(40)
    latencies = [a.time - sent[struct.unpack_from("!I", a.frame, 14)[0]] for a in arrivals]
    assert min(latencies) >= 0.010
    assert max(latencies) < 0.2
    assert max(latencies) - min(latencies) > 0.04
    await close_lab(relay, node_a, node_b)


@pytest.mark.parametrize(("rate", "burst"), [(800, 40), (8000, 40)])
@async_test
async def test_rate_limit_caps_throughput(rate: int, burst: int) -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(rate=rate))
    for i in range(burst):
        node_a.send(frame(i, 1400), relay.port("a"))

    def settled() -> bool:
        stats = relay.stats.a_to_b
        return stats.received == burst and stats.queued == 0

    await until(settled, "the burst through the rate limit")
    stats = relay.stats.a_to_b
    arrivals = await node_b.wait_arrivals(stats.forwarded)
    assert stats.forwarded + stats.dropped_queue == burst
    # The first frame leaves at once (full bucket); the rest are paced by the rate.
    span = arrivals[-1].time - arrivals[0].time
    measured = (len(arrivals) - 1) * 1400 * 8 / 1000 / span
    assert rate * 0.7 <= measured <= rate * 1.3, f"{measured:.0f} kbit/s"
    # Frames that would wait over ~100 ms are dropped, not queued: at 800 kbit/s (14 ms per
    # frame) that is the first frame (full bucket) and about 7 more; 8000 kbit/s takes all 40.
    expected = 8 if rate == 800 else burst
    assert expected - 1 <= stats.forwarded <= expected + 1
    await close_lab(relay, node_a, node_b)


@async_test
async def test_queue_limit_drops_frames_beyond_it() -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(delay=300))
    for start in range(0, 1100, 100):
        for i in range(start, start + 100):
            node_a.send(frame(i), relay.port("a"))
        await until(functools.partial(received_a_to_b, relay, start + 100), "a chunk received")
    stats = relay.stats.a_to_b
    assert (stats.queued, stats.dropped_queue) == (1000, 100)
    arrivals = await node_b.wait_arrivals(1000)
    assert [struct.unpack_from("!I", a.frame, 14)[0] for a in arrivals] == list(range(1000))
    await close_lab(relay, node_a, node_b)


@async_test
async def test_zero_filters_remove_impairments_and_restore_the_direct_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node_a, node_b, relay = await open_lab(LinkFilters(loss=100))
    node_a.send(frame(0), relay.port("a"))
    await until(lambda: relay.stats.a_to_b.dropped_loss == 1, "the frame lost")

    # gns3-server#2536: setting an impairment back to 0 must remove it, not keep it in place.
    relay.set_filters(LinkFilters(delay=200, jitter=5, corruption=50, rate=1000))
    relay.set_filters(LinkFilters())
    assert relay.filters == LinkFilters()

    def no_random(*_args: object) -> float:
        raise AssertionError("the direct path drew a random number")

    for method in ("random", "uniform", "randrange", "getrandbits"):
        monkeypatch.setattr(random.Random, method, no_random)
    sent = [node_a.send(frame(i), relay.port("a")) for i in range(1, 101)]
    for i in range(1, 101):
        node_b.send(frame(i), relay.port("b"))
    at_b = await node_b.wait_arrivals(100)
    at_a = await node_a.wait_arrivals(100)
    assert [a.frame for a in at_b] == [frame(i) for i in range(1, 101)]
    assert [a.frame for a in at_a] == [frame(i) for i in range(1, 101)]
    assert max(a.time - when for a, when in zip(at_b, sent, strict=True)) < 0.05
    stats = relay.stats
    for direction in (stats.a_to_b, stats.b_to_a):
        assert direction.queued == 0
        assert direction.dropped_queue == direction.corrupted == 0
    assert stats.a_to_b.dropped_loss == 1  # only the frame sent while loss was 100 %
    await close_lab(relay, node_a, node_b)


# --- relink ----------------------------------------------------------------------------------


@async_test
async def test_set_peer_relinks_one_side() -> None:
    node_a, node_b, relay = await open_lab()
    node_c = FakeNode()
    await relay.set_peer("b", node_c.address)
    assert relay.peer("b") == node_c.address

    node_a.send(frame(1), relay.port("a"))
    (arrival,) = await node_c.wait_arrivals(1)
    assert arrival.frame == frame(1)
    assert arrival.source == (HOST, relay.port("b"))

    node_b.send(frame(2), relay.port("b"))  # the old peer is a stranger now
    await until(lambda: relay.stats.b_to_a.ignored == 1, "the old peer ignored")
    node_c.send(frame(3), relay.port("b"))
    (arrival,) = await node_a.wait_arrivals(1)
    assert arrival.frame == frame(3)
    assert node_b.arrivals == []
    await close_lab(relay, node_a, node_b, node_c)


@async_test
async def test_set_peer_refuses_an_address_of_another_family() -> None:
    node_a, node_b, relay = await open_lab()
    with pytest.raises(RelayError, match=r"side b.*'::1' is not an IPv4 address"):
        await relay.set_peer("b", ("::1", 4000))
    assert relay.peer("b") == node_b.address
    await close_lab(relay, node_a, node_b)


# --- capture ---------------------------------------------------------------------------------


@async_test
async def test_capture_holds_both_directions_and_is_readable_while_written(
    tmp_path: Path,
) -> None:
    node_a, node_b, relay = await open_lab()
    path = tmp_path / "a.pcap"
    await relay.start_capture(path, side="a")
    expected = []
    before = time.time()
    for i in range(3):
        expected.append(frame(i, 60 + i))
        node_a.send(expected[-1], relay.port("a"))
        await node_b.wait_arrivals(i + 1)
        expected.append(frame(100 + i, 1500))
        node_b.send(expected[-1], relay.port("b"))
        await node_a.wait_arrivals(i + 1)

    # Flushed frame by frame: a reader sees every frame before the capture stops.
    link_type, records = read_pcap(path)
    assert link_type == dpkt.pcap.DLT_EN10MB
    assert [data for _, data in records] == expected

    await relay.stop_capture(side="a")
    node_a.send(frame(9), relay.port("a"))
    await node_b.wait_arrivals(4)
    _, records = read_pcap(path)
    assert [data for _, data in records] == expected
    stamps = [ts for ts, _ in records]
    assert stamps == sorted(stamps)
    assert before - 0.001 <= stamps[0]
    assert stamps[-1] <= time.time() + 0.001
    await close_lab(relay, node_a, node_b)


@async_test
async def test_capture_shows_what_crosses_its_side(tmp_path: Path) -> None:
    # With 100 % loss each node's frames enter the relay and never leave it.
    node_a, node_b, relay = await open_lab(LinkFilters(loss=100))
    await relay.start_capture(tmp_path / "a.pcap", side="a")
    await relay.start_capture(tmp_path / "b.pcap", side="b")
    for i in range(2):
        node_a.send(frame(i), relay.port("a"))
    for i in range(3):
        node_b.send(frame(10 + i), relay.port("b"))
    await until(lambda: relay.stats.a_to_b.dropped_loss == 2, "A's frames lost")
    await until(lambda: relay.stats.b_to_a.dropped_loss == 3, "B's frames lost")
    await relay.close()  # closes the captures too
    assert [d for _, d in read_pcap(tmp_path / "a.pcap")[1]] == [frame(0), frame(1)]
    assert [d for _, d in read_pcap(tmp_path / "b.pcap")[1]] == [frame(i) for i in (10, 11, 12)]
    await close_lab(node_a, node_b)


@async_test
async def test_a_second_capture_on_one_side_is_refused(tmp_path: Path) -> None:
    node_a, node_b, relay = await open_lab()
    await relay.start_capture(tmp_path / "first.pcap", side="b")
    with pytest.raises(RelayError, match=r"side b is already captured to .*first\.pcap"):
        await relay.start_capture(tmp_path / "second.pcap", side="b")
    await relay.stop_capture(side="b")
    await relay.stop_capture(side="b")  # nothing runs: no-op
    await relay.start_capture(tmp_path / "second.pcap", side="b")
    with pytest.raises(RelayError, match=r"cannot write capture file .*missing"):
        await relay.start_capture(tmp_path / "missing" / "x.pcap", side="a")
    await close_lab(relay, node_a, node_b)


def test_pcap_writer_rounds_timestamps_and_records_lengths(tmp_path: Path) -> None:
    path = tmp_path / "w.pcap"
    with PcapWriter(path) as writer:
        writer.write(frame(1), 1_700_000_000.25)
        writer.write(frame(2, 1514), 1_700_000_000.9999999)  # rounds up to the next second
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(frame(3), 0.0)
    with path.open("rb") as file:
        reader = dpkt.pcap.Reader(file)
        assert reader.snaplen == 65535
        records = list(reader)
    assert [(ts, bytes(data)) for ts, data in records] == [
        (pytest.approx(1_700_000_000.25), frame(1)),
        (pytest.approx(1_700_000_001.0), frame(2, 1514)),
    ]


# --- open and close --------------------------------------------------------------------------


@async_test
async def test_close_is_idempotent_drops_held_frames_and_frees_the_ports() -> None:
    allocator = PortAllocator(HOST, (43000, 43999))
    port_a, port_b = allocator.allocate(), allocator.allocate()
    node_a, node_b = FakeNode(), FakeNode()
    relay = await Relay.open(
        host=HOST,
        port_a=port_a,
        peer_a=node_a.address,
        port_b=port_b,
        peer_b=node_b.address,
        filters=LinkFilters(delay=50),
    )
    assert (relay.port("a"), relay.port("b")) == (port_a, port_b)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    node_a.send(frame(1), port_a)
    await until(lambda: relay.stats.a_to_b.queued == 1, "the frame held")

    await relay.close()
    await relay.close()
    assert relay.closed
    assert relay.stats.a_to_b.queued == 0
    for port in (port_a, port_b):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((HOST, port))
    with pytest.raises(RelayError, match="relay is closed"):
        relay.set_filters(LinkFilters())
    # Past the frame's due time: its timer was cancelled, nothing fires, nothing arrives.
    await asyncio.sleep(0.1)
    assert node_b.arrivals == []
    assert errors == []
    allocator.release_all()
    await close_lab(node_a, node_b)


@async_test
async def test_open_reports_a_taken_port_and_leaks_no_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        busy = taken.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            free = probe.getsockname()[1]
        with pytest.raises(PortError, match=rf"side b cannot bind UDP {HOST} port {busy}"):
            await Relay.open(
                host=HOST,
                port_a=free,
                peer_a=(HOST, 9),
                port_b=busy,
                peer_b=(HOST, 9),
            )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind((HOST, free))  # side a's socket was closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peer_a": ("::1", 9)}, r"peer of side a '::1' is not an IPv4 address"),
        ({"peer_b": (HOST, 70000)}, r"peer of side b: port 70000 is not within 0-65535"),
    ],
)
@async_test
async def test_open_refuses_a_bad_peer(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "host": HOST,
        "port_a": 0,
        "peer_a": (HOST, 9),
        "port_b": 0,
        "peer_b": (HOST, 9),
    }
    with pytest.raises(RelayError, match=message) as caught:
        await Relay.open(**(arguments | kwargs))
    assert isinstance(caught.value, EmuError)


@async_test
async def test_an_unknown_side_is_refused() -> None:
    node_a, node_b, relay = await open_lab()
    with pytest.raises(RelayError, match="side must be 'a' or 'b', not 'c'"):
        relay.port("c")  # type: ignore[arg-type]
    await close_lab(relay, node_a, node_b)
