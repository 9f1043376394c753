"""How much the link relay costs: frames/s direct vs through a relay with every filter at 0.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/relay_udp.py [--frames N] [--repeat R]

The relay runs in its own process (as it would beside the emulators) so its CPU time is its
own; this process plays both nodes. Each flow keeps at most ``--window`` frames in flight,
so no socket buffer overflows and the figures measure forwarding, not kernel drops. Prints
``name: value (meaning)`` lines; ratios are relay/direct.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import selectors
import socket
import time
from multiprocessing.connection import Connection

from emucore.models import LinkFilters
from emucore.relay import Relay

HOST = "127.0.0.1"
FRAME_SIZE = 1400
BUFFER = 4 << 20
STALL = 1.0  # seconds without a datagram: the frames still in flight were lost

Address = tuple[str, int]
Flow = tuple[socket.socket, Address, socket.socket]  # sender, destination, receiver


def node_socket() -> socket.socket:
    """A non-blocking UDP socket on a free port, with room for bursts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def pump(flows: list[Flow], count: int, window: int) -> tuple[float, int, int]:
    """Push ``count`` frames through each flow at once.

    :return: seconds from the first send to the last arrival, frames received, frames lost.
    """
    frame = bytes(FRAME_SIZE)
    sent = [0] * len(flows)
    got = [0] * len(flows)
    selector = selectors.DefaultSelector()
    for index, (_, _, receiver) in enumerate(flows):
        selector.register(receiver, selectors.EVENT_READ, index)
    start = last = time.perf_counter()
    while min(got) < count:
        for index, (sender, destination, _) in enumerate(flows):
            while sent[index] < count and sent[index] - got[index] < window:
                sender.sendto(frame, destination)
                sent[index] += 1
        events = selector.select(STALL)
        if not events:
            break
        for key, _ in events:
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            while True:
                try:
                    ready.recv(65535)
                except BlockingIOError:
                    break
                got[key.data] += 1
        last = time.perf_counter()
    selector.close()
    return last - start, sum(got), sum(sent) - sum(got)


def serve_relay(conn: Connection, peer_a: Address, peer_b: Address) -> None:
    """Child process: run a relay with no filter, report its CPU time between start and stop."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        relay = await Relay.open(
            host=HOST, port_a=0, peer_a=peer_a, port_b=0, peer_b=peer_b, filters=LinkFilters()
        )
        conn.send((relay.port("a"), relay.port("b")))
        cpu = 0.0
        while True:
            # The waiting thread sleeps in recv(); the loop thread forwards meanwhile.
            command = await loop.run_in_executor(None, conn.recv)
            if command == "start":
                cpu = time.process_time()
                conn.send("started")
            elif command == "stop":
                stats = relay.stats
                conn.send((time.process_time() - cpu, stats.a_to_b, stats.b_to_a))
            else:
                await relay.close()
                return

    asyncio.run(serve())


class RelayProcess:
    """A relay in a child process between two node sockets."""

    def __init__(self, node_a: socket.socket, node_b: socket.socket) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=serve_relay, args=(child, node_a.getsockname(), node_b.getsockname())
        )
        self.process.start()
        self.port_a, self.port_b = self.conn.recv()

    def measure(self, flows: list[Flow], count: int, window: int) -> tuple[float, int, int, float]:
        """:func:`pump` through the relay, plus the relay's CPU seconds during it."""
        self.conn.send("start")
        self.conn.recv()
        elapsed, received, lost = pump(flows, count, window)
        self.conn.send("stop")
        cpu, _, _ = self.conn.recv()
        return elapsed, received, lost, cpu

    def close(self) -> None:
        """Close the relay and wait for its process to end."""
        self.conn.send("quit")
        self.process.join(10)


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames per flow and run")
    parser.add_argument("--window", type=int, default=64, help="frames in flight per flow")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    args = parser.parse_args()
    count, window = args.frames, args.window

    node_a, node_b = node_socket(), node_socket()
    relay = RelayProcess(node_a, node_b)
    to_a, to_b = (HOST, relay.port_a), (HOST, relay.port_b)
    cases: dict[str, list[Flow]] = {
        "direct": [(node_a, node_b.getsockname(), node_b)],
        "relay": [(node_a, to_a, node_b)],
        "direct_both": [
            (node_a, node_b.getsockname(), node_b),
            (node_b, node_a.getsockname(), node_a),
        ],
        "relay_both": [(node_a, to_a, node_b), (node_b, to_b, node_a)],
    }
    pps: dict[str, float] = {}
    lost = 0
    cpu_total = megabits_total = 0.0
    relay_cpu_share = 0.0
    try:
        for name, flows in cases.items():
            best = 0.0
            for _ in range(args.repeat):
                if name.startswith("relay"):
                    elapsed, received, missing, cpu = relay.measure(flows, count, window)
                    megabits = received * FRAME_SIZE * 8 / 1e6
                    cpu_total += cpu
                    megabits_total += megabits
                    if name == "relay" and received / elapsed > best:
                        relay_cpu_share = cpu / elapsed
                else:
                    elapsed, received, missing = pump(flows, count, window)
                lost += missing
                best = max(best, received / elapsed)
            pps[name] = best
    finally:
        relay.close()
        node_a.close()
        node_b.close()

    print(f"frames: {count} ({FRAME_SIZE} bytes per frame, window {window}, best of {args.repeat})")
    print(f"direct_pps: {pps['direct']:.0f} (frames/s a→b)")
    print(f"relay_pps: {pps['relay']:.0f} (frames/s a→b)")
    print(f"relay_pps_ratio: {pps['relay'] / pps['direct']:.2f} (relay/direct)")
    print(f"direct_both_pps: {pps['direct_both']:.0f} (frames/s a→b plus b→a, at once)")
    print(f"relay_both_pps: {pps['relay_both']:.0f} (frames/s a→b plus b→a, at once)")
    print(f"relay_both_pps_ratio: {pps['relay_both'] / pps['direct_both']:.2f} (relay/direct)")
    print(f"relay_mbps: {pps['relay'] * FRAME_SIZE * 8 / 1e6:.0f} (Mbit/s a→b)")
    print(f"relay_cpu_share: {relay_cpu_share:.2f} (relay CPU s per wall s, a→b)")
    print(
        f"relay_cpu_s_per_mbps: {cpu_total / megabits_total:.6f}"
        " (relay CPU s per Mbit forwarded = CPU share per Mb/s sustained)"
    )
    print(f"lost: {lost} (frames, all runs)")


if __name__ == "__main__":
    main()
