"""How much memory the controller (this Python process) spends per running node.

Run from the repository root::

    .venv/bin/python bench/memory.py [--nodes 50]

One warm-up node is started and stopped first (imports, caches, the event loop's first
allocations). Then the resident set size of this process (VmRSS in /proc/self/status; never
QEMU's) is read, N tiny-guest nodes are created and started five at a time, each paused
right after its start, and VmRSS is read again: the growth over N is the cost of a managed
node (its Node object, QMP connection and reader task, process watcher, log files open,
events). Target: < 1 MiB per node.
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import benchlib

from emucore.node import Node

TARGET_KIB = 1024
BATCH = 5


async def start_paused(node: Node) -> None:
    await node.start()
    await node.suspend()


async def main(count: int) -> None:
    with benchlib.lab_directory("memory") as root:
        tiny = benchlib.guest()
        lab = benchlib.session(root, tiny)
        try:
            warm = benchlib.guest_node(lab, tiny, "warm-up", ram=64)
            await start_paused(warm)
            await warm.stop()
            gc.collect()
            before = benchlib.rss_kib()
            nodes = [benchlib.guest_node(lab, tiny, f"n{i}", ram=64) for i in range(count)]
            for first in range(0, count, BATCH):
                await asyncio.gather(*(start_paused(n) for n in nodes[first : first + BATCH]))
            gc.collect()
            after = benchlib.rss_kib()
            running = sum(node.is_running for node in nodes)
        finally:
            await lab.close()
    gc.collect()
    closed = benchlib.rss_kib()
    per_node = (after - before) / count
    print(f"# {running} of {count} nodes running, paused; {benchlib.load_note()}")
    benchlib.figure("rss_before_mib", before / 1024, "controller RSS, warmed up, no node running")
    benchlib.figure("rss_running_mib", after / 1024, f"controller RSS with {count} nodes running")
    benchlib.figure("rss_after_close_mib", closed / 1024, "controller RSS after closing them")
    benchlib.figure(
        "rss_per_node_kib", per_node, f"RSS growth / nodes; target < {TARGET_KIB} KiB", 1
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50, help="nodes to run (default 50)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.nodes))
