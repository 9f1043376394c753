"""What emu adds to a QEMU start: ``node.start()`` against the same argv started bare.

Run from the repository root::

    .venv/bin/python bench/start_overhead.py [--runs 30]

emu: ``node.start()`` of a tiny-guest node, from the call until QMP is connected (prepare
hooks, argv, spawn, QMP connect: the moment ``Monitor.connect`` returns), and until
``node.start()`` returns (also ``cont``, the console port read back over QMP, link states,
renice: work a bare start does not do, reported apart). Bare: the
argv emu used, launched with ``asyncio.create_subprocess_exec`` in the node directory, until
a ``qemu.qmp`` client has connected (greeting and capabilities negotiated), polling for the
socket every 5 ms (emu polls every 10 ms). The two alternate, in turns, after two warm-up
rounds; QEMU is stopped after each run, untimed. Target: emu/bare ≤ 1.10 (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import benchlib

from emu_qemu.qmp import Monitor
from emucore.node import Node

TARGET = 1.10


async def bare_start(argv: list[str], directory: Path) -> float:
    """Seconds from spawning ``argv`` to a connected QMP client."""
    async with benchlib.bare_qemu(argv, directory) as took:
        return float(took)


async def emu_start(node: Node) -> tuple[float, float]:
    """Seconds from ``node.start()`` to QMP connected, and to ``node.start()`` returning."""
    connected: list[float] = []
    original = Monitor.connect.__func__  # type: ignore[attr-defined]

    async def timed_connect(cls: type[Monitor], *args: Any, **kwargs: Any) -> Monitor:
        monitor: Monitor = await original(cls, *args, **kwargs)
        connected.append(benchlib.now())
        return monitor

    Monitor.connect = classmethod(timed_connect)  # type: ignore[method-assign,assignment]
    try:
        began = benchlib.now()
        await node.start()
        took = benchlib.now() - began
    finally:
        Monitor.connect = classmethod(original)  # type: ignore[method-assign,assignment]
    await node.stop()
    return connected[0] - began, took


async def main(runs: int) -> None:
    with benchlib.lab_directory("start") as root:
        tiny = benchlib.guest()
        lab = benchlib.session(root, tiny)
        node = benchlib.guest_node(lab, tiny, "starter")
        try:
            times: dict[str, list[float]] = {"emu": [], "emu_full": [], "bare": []}
            for round_number in range(runs + 2):
                order = ["emu", "bare"] if round_number % 2 == 0 else ["bare", "emu"]
                for kind in order:
                    full = 0.0
                    if kind == "emu":
                        took, full = await emu_start(node)
                    else:
                        took = await bare_start(node.argv, node.directory)
                    if round_number >= 2:  # the first two rounds warm caches up
                        times[kind].append(took)
                        if kind == "emu":
                            times["emu_full"].append(full)
        finally:
            await lab.close()
    emu, bare = benchlib.median(times["emu"]), benchlib.median(times["bare"])
    print(f"# {runs} alternating runs each; {benchlib.load_note()}")
    full = benchlib.median(times["emu_full"])
    benchlib.figure("start_emu_ms", emu * 1000, "median, node.start() until QMP connected", 1)
    benchlib.figure("start_emu_full_ms", full * 1000, "median, node.start() until it returns", 1)
    benchlib.figure("start_bare_ms", bare * 1000, "median, spawn until QMP connected", 1)
    benchlib.figure("start_emu_min_ms", min(times["emu"]) * 1000, "fastest emu start", 1)
    benchlib.figure("start_bare_min_ms", min(times["bare"]) * 1000, "fastest bare start", 1)
    benchlib.figure("start_overhead_ratio", emu / bare, f"emu/bare medians; target ≤ {TARGET}")
    benchlib.figure("start_full_ratio", full / bare, "whole node.start() / bare QMP ready")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each (default 30)")
    arguments = parser.parse_args()
    if arguments.runs < 10:
        sys.exit("--runs must be at least 10")
    asyncio.run(main(arguments.runs))
