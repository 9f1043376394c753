"""Guest-to-guest TCP throughput over a direct UDP link and over the relay with no impairment.

Run from the repository root::

    .venv/bin/python bench/link_throughput.py [--mib 64] [--runs 3]

Two tiny guests (virtio NICs, 10.0.0.1 and 10.0.0.2) are linked directly; the receiver runs
busybox ``nc -l`` into ``wc -c``, the sender ``dd if=/dev/zero bs=64k count=N | nc``. A run
is timed on the host from the moment the sender's command is typed until the receiver
reports every byte (both in the guests' shells on their telnet consoles). Then the link is
replaced by one made with a 1 ms delay and set back to ``LinkFilters()``: the relay stays,
with every filter at 0. The two kinds alternate. The relay runs in this process, so its CPU
time is this process's CPU time during a relayed transfer minus what this process spends
during a direct transfer of the same length (reading consoles, the event loop). Targets:
relay/direct throughput ≥ 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import benchlib

from emu_tests.console import open_guest_console
from emucore.links import Link
from emucore.models import LinkFilters
from emucore.telnet import TelnetConsole

TARGET = 0.8
PORT = 5000


async def transfer(sender: TelnetConsole, receiver: TelnetConsole, mib: int) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds for one transfer of ``mib`` MiB."""
    # busybox nc quits soon after its stdin ends (or fails: the console, read from a command
    # substitution). A FIFO opened read-write never ends and never gives data, so the
    # listener ends when the sender closes the connection. The sender retries until the
    # listener is up.
    listen = f"nc -l -p {PORT} 0<>/tmp/fifo | wc -c"
    await receiver.sendline(
        f"rm -f /tmp/fifo; mkfifo /tmp/fifo; echo LISTENING; echo RECEIVED-$({listen})"
    )
    await receiver.expect("LISTENING")
    cpu, began = time.process_time(), benchlib.now()
    send = f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc 10.0.0.2 {PORT}"
    await sender.sendline(f"until {send}; do usleep 20000; done")
    match = await receiver.expect(r"RECEIVED-(\d+)\r?\n", timeout=600)
    wall, cpu = benchlib.now() - began, time.process_time() - cpu
    assert int(match.group(1)) == mib << 20, receiver.transcript[-600:]
    await sender.expect(sender.prompt or "# ", timeout=60)
    await receiver.expect(receiver.prompt or "# ", timeout=60)
    return wall, cpu


async def main(mib: int, runs: int) -> None:
    with benchlib.lab_directory("link") as root:
        tiny = benchlib.guest()
        lab = benchlib.session(root, tiny)
        a = benchlib.guest_node(lab, tiny, "a", ip="10.0.0.1/24")
        b = benchlib.guest_node(lab, tiny, "b", ip="10.0.0.2/24")
        consoles: list[TelnetConsole] = []
        try:
            await asyncio.gather(a.start(), b.start())
            consoles = list(await asyncio.gather(open_guest_console(a), open_guest_console(b)))
            sender, receiver = consoles
            link: Link | None = None
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "relay": []}
            for run in range(runs * 2):
                kind = "direct" if run % 2 == 0 else "relay"
                if link is not None:
                    await lab.unlink(link)
                if kind == "direct":
                    link = await lab.link(a, 0, b, 0)
                else:
                    link = await lab.link(a, 0, b, 0, LinkFilters(delay=1))
                    await link.set_filters(LinkFilters())
                    assert link.relay is not None
                    assert not link.relay.filters.active
                status, out = await sender.run("ping -c 1 -W 5 10.0.0.2")
                assert status == 0, out
                results[kind].append(await transfer(sender, receiver, mib))
        finally:
            for console in consoles:
                await console.close()
            await lab.close()
    direct = benchlib.median([mib * 8 * 1.048576 / wall for wall, _ in results["direct"]])
    relay = benchlib.median([mib * 8 * 1.048576 / wall for wall, _ in results["relay"]])
    idle_share = benchlib.median([cpu / wall for wall, cpu in results["direct"]])
    relay_share = benchlib.median([cpu / wall for wall, cpu in results["relay"]]) - idle_share
    print(f"# {runs} transfers of {mib} MiB each way of linking; {benchlib.load_note()}")
    benchlib.figure("direct_mbps", direct, "median guest-to-guest Mbit/s, direct link", 1)
    benchlib.figure("relay_mbps", relay, "median guest-to-guest Mbit/s, relay, filters at 0", 1)
    benchlib.figure("throughput_ratio", relay / direct, f"relay/direct; target ≥ {TARGET}")
    benchlib.figure(
        "relay_cpu_share", relay_share, "CPU s per wall s the relay adds to this process", 3
    )
    benchlib.figure(
        "relay_cpu_per_100mbps", relay_share / relay * 100 * 100, "% of one core per 100 Mbit/s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="transfers of each kind (default 3)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.mib, arguments.runs))
