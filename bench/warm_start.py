"""Warm starts: a node, the demo lab and eight nodes resumed from a snapshot, against a boot.

Run from the repository root::

    .venv/bin/python bench/warm_start.py [--runs 3] [--nodes 8]

Each pair of figures is measured in this one run, cold and warm alternating, and each figure
is the median of ``--runs`` runs:

* ``node_cold_s`` / ``node_warm_s``: one tiny-guest node, from ``node.start()`` (or
  ``node.start(state=...)``) until its shell answers Enter on the console (pressed every
  0.1 s); target ratio ≤ 0.1;
* ``demo_cold_s`` / ``demo_warm_s``: ``examples/demo.toml`` (two tiny guests and a VPCS node,
  one link with 20 ms delay and 1 % loss), from building the lab until every check of the
  file (and its capture's check) passed, as ``emu run --check`` does it, against the same
  with ``--from``; target ratio ≤ 0.25; ``demo_*_ready_s``: the same until the lab started
  (before the checks); ``demo_checks_s``: the checks' own time (their pings), and
  ``demo_vpcs_start_s``: the VPCS node's start (VPCS saves no state: it starts afresh, and
  its ``ip`` command waits 3 s for a duplicate-address check), both the same cold or warm;
* ``many_cold_s`` / ``many_warm_s``: ``--nodes`` tiny guests (linked in pairs), from
  building the lab until every guest's shell answers; target ratio ≤ 0.15.

The snapshots are saved once, before the measured runs (a cold start, the shells, then
``LabRunner.save``). A warm run restores every disk to the snapshot, so each measured
run starts from the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tomllib
from pathlib import Path

import benchlib

from emucore.lab import load_lab
from emucore.models import HostSettings, NodeEvent
from emucore.runner import LabRunner

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"
STATE = "bench"


async def one_node(root: Path, runs: int) -> tuple[list[float], list[float]]:
    """A node booted cold, and resumed from a state saved once with its shell up."""
    tiny = benchlib.guest()
    lab = benchlib.session(root, tiny)
    cold = benchlib.guest_node(lab, tiny, "cold")
    warm = benchlib.guest_node(lab, tiny, "warm")
    colds, warms = [], []
    try:
        await benchlib.shell_answers(warm, None)
        await warm.save_state(STATE)
        await warm.stop()
        for round_number in range(runs):
            order = [(cold, None, colds), (warm, STATE, warms)]
            for node, state, times in order[:: -1 if round_number % 2 else 1]:
                times.append(await benchlib.shell_answers(node, state))
                await node.stop()
    finally:
        await lab.close()
    return colds, warms


def runner_for(lab_file: Path, state: str | None) -> LabRunner:
    """A runner of the lab file, on a host whose emu cache is the benchmark's."""
    lab = load_lab(tomllib.loads(lab_file.read_text()), str(lab_file))
    settings = HostSettings(emulators={"qemu": {"kvm": "off"}})
    return LabRunner(lab, lab_file, settings=settings, from_state=state)


async def demo_run(lab_file: Path, state: str | None) -> tuple[float, float, float]:
    """Seconds until the demo lab started, until all its checks passed, and the VPCS node's
    start took (it starts afresh either way: VPCS saves no state)."""
    began = benchlib.now()
    runner = runner_for(lab_file, state)
    seen: dict[str, float] = {}

    def note(event: NodeEvent) -> None:
        if event.node == "pc" and event.kind == "status":
            seen.setdefault(event.message, benchlib.now())

    try:
        runner.build().events.subscribe(note)
        await runner.start()
        ready = benchlib.now() - began
        outcomes = await runner.check(runner.lab.checks)
        outcomes += runner.check_captures()
        failed = [o for o in outcomes if not o.passed]
        if failed:
            raise RuntimeError(f"a check failed ({'warm' if state else 'cold'}): {failed[0]}")
        return ready, benchlib.now() - began, seen["started"] - seen["starting"]
    finally:
        await runner.stop()


async def shells_run(lab_file: Path, state: str | None) -> float:
    """Seconds until every node of the lab started and its shell answers."""
    began = benchlib.now()
    runner = runner_for(lab_file, state)
    try:
        await runner.start()
        await runner.shells_ready()
        return benchlib.now() - began
    finally:
        await runner.stop()


async def save_once(lab_file: Path) -> None:
    """Boot the lab, wait for its shells, save it as :data:`STATE`."""
    runner = runner_for(lab_file, None)
    try:
        await runner.start()
        await runner.shells_ready()
        await runner.save(STATE)
    finally:
        await runner.stop()


def many_lab(directory: Path, count: int) -> Path:
    """A lab file of ``count`` tiny guests, linked in pairs."""
    lines = ['name = "many"']
    for index in range(count):
        lines += [
            f"[nodes.n{index}]",
            'image = "tiny"',
            f'ip = "10.9.{index // 2}.{index % 2 + 1}/24"',
        ]
    for index in range(0, count - 1, 2):
        lines += ["[[links]]", f'endpoints = ["n{index}:0", "n{index + 1}:0"]']
    path = directory / "many.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def main(runs: int, count: int) -> None:
    with benchlib.lab_directory("warm") as root:
        node_cold, node_warm = await one_node(root, runs)
        demo = root / "demo" / "demo.toml"
        demo.parent.mkdir()
        shutil.copy(DEMO, demo)
        await save_once(demo)
        demo_times: dict[str, list[tuple[float, float, float]]] = {"cold": [], "warm": []}
        for round_number in range(runs):
            order = [("cold", None), ("warm", STATE)][:: -1 if round_number % 2 else 1]
            for key, state in order:
                demo_times[key].append(await demo_run(demo, state))
        many = many_lab(root, count)
        await save_once(many)
        many_times: dict[str, list[float]] = {"cold": [], "warm": []}
        for round_number in range(runs):
            order = [("cold", None), ("warm", STATE)][:: -1 if round_number % 2 else 1]
            for key, state in order:
                many_times[key].append(await shells_run(many, state))
    med = benchlib.median
    print(f"# {runs} runs each, alternating; {benchlib.load_note()}")
    benchlib.figure("node_cold_s", med(node_cold), "median, start until the shell answers")
    benchlib.figure("node_warm_s", med(node_warm), "median, the same from a saved state")
    benchlib.figure("node_ratio", med(node_warm) / med(node_cold), "warm / cold; target ≤ 0.1")
    cold_ready = med([ready for ready, _, _ in demo_times["cold"]])
    warm_ready = med([ready for ready, _, _ in demo_times["warm"]])
    cold_done = med([done for _, done, _ in demo_times["cold"]])
    warm_done = med([done for _, done, _ in demo_times["warm"]])
    checks = med([done - ready for times in demo_times.values() for ready, done, _ in times])
    vpcs = med([took for times in demo_times.values() for _, _, took in times])
    benchlib.figure("demo_cold_ready_s", cold_ready, "median, until the demo lab started")
    benchlib.figure("demo_warm_ready_s", warm_ready, "median, the same from its snapshot")
    benchlib.figure("demo_cold_s", cold_done, "median, until all its checks passed")
    benchlib.figure("demo_warm_s", warm_done, "median, the same from its snapshot")
    benchlib.figure(
        "demo_ratio", warm_done / cold_done, "warm / cold, checks passed; target ≤ 0.25"
    )
    benchlib.figure("demo_ready_ratio", warm_ready / cold_ready, "warm / cold, lab started")
    benchlib.figure("demo_checks_s", checks, "median, the checks themselves, cold and warm")
    benchlib.figure("demo_vpcs_start_s", vpcs, "median, the VPCS node's start, cold and warm")
    benchlib.figure("many_cold_s", med(many_times["cold"]), f"median, {count} nodes, all shells")
    benchlib.figure("many_warm_s", med(many_times["warm"]), "median, the same from a snapshot")
    ratio = med(many_times["warm"]) / med(many_times["cold"])
    benchlib.figure("many_ratio", ratio, "warm / cold; target ≤ 0.15")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=8)
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.runs, arguments.nodes)))
