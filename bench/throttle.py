"""A guest's CPU share under ``cpu_throttling = 50`` against an unthrottled one, per mechanism.

Run from the repository root::

    .venv/bin/python bench/throttle.py [--seconds 20]

For each mechanism this host offers (its cgroup, where one can be written, and the cpulimit
fallback, forced with ``cpu_throttling_mechanism = "cpulimit"``), two tiny guests boot
unthrottled, then both busy-loop in their shell (a counter, written to ``/tmp/n`` every
1000 turns) while one of them is throttled to 50 (live, with ``set_cpu_throttling``). After
2 s, over ``--seconds``:

* CPU: each QEMU's CPU seconds per second, from ``/proc/<pid>/stat`` (all threads), and for
  the throttled one also from its cgroup's own usage counter;
* work: each guest's turns per second, read from ``/tmp/n`` over the console.

The figure is the throttled QEMU's share of one CPU (target 0.45–0.55), by the cgroup's
counter where there is one. The ratios throttled / unthrottled compare it with the guest
next to it: about 0.5 on an otherwise idle host, but on 2 CPUs the two guests want 1.5 of
them, so other work on the host slows the unthrottled guest and lifts the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import benchlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.helpers

from emu_qemu.contract import qemu_pid
from emu_qemu.throttle import Throttling, set_cpu_throttling, throttling_of
from emu_tests.console import open_guest_console
from emucore.cgroups import CgroupError, find_hierarchy, probe
from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.helpers import cpu_seconds

COUNTER = "i=0; while :; do i=$((i+1)); [ $((i%1000)) = 0 ] && echo $i > /tmp/n; done & true"
WARM_UP = 2.0


async def turns(console: TelnetConsole) -> tuple[int, float]:
    """The guest's busy-loop counter, and when it was read (the middle of the command)."""
    sent = benchlib.now()
    status, output = await console.run("cat /tmp/n", timeout=60)
    if status != 0:
        raise RuntimeError(f"cat /tmp/n failed: {output}")
    return int(output.split()[-1]), (sent + benchlib.now()) / 2


async def measure(mechanism: str, seconds: float) -> dict[str, float]:
    """Run the two guests under ``mechanism`` and return the figures (see the docstring)."""
    with benchlib.lab_directory(f"throttle-{mechanism}") as root:
        tiny = benchlib.guest()
        wanted = "cpulimit" if mechanism == "cpulimit" else "auto"
        settings = HostSettings(
            image_dirs=(root / "images", tiny.kernel.parent, tiny.initrd.parent),
            emulators={"qemu": {"kvm": "off", "cpu_throttling_mechanism": wanted}},
        )
        lab = Session(Project.for_directory(root / "project"), settings=settings)
        throttled = benchlib.guest_node(lab, tiny, "throttled")
        free = benchlib.guest_node(lab, tiny, "free")
        try:
            await asyncio.gather(throttled.start(), free.start())
            consoles = await asyncio.gather(*(open_guest_console(n) for n in (throttled, free)))
            for console in consoles:
                status, output = await console.run(COUNTER)
                if status != 0:
                    raise RuntimeError(f"busy loop did not start: {output}")
            await set_cpu_throttling(throttled, 50)
            state = throttling_of(throttled)
            if state is None or state.mechanism != mechanism:
                raise RuntimeError(f"wanted {mechanism}, got {state}")
            await asyncio.sleep(WARM_UP)
            return await window(state, [throttled, free], consoles, seconds)
        finally:
            await lab.close()


async def window(
    state: Throttling, nodes: list[Node], consoles: list[TelnetConsole], seconds: float
) -> dict[str, float]:
    """The figures of one window (the throttled node first)."""
    pids = [qemu_pid(node) or 0 for node in nodes]
    group = state.group
    turns_before = [await turns(console) for console in consoles]
    began = benchlib.now()
    cpu_before = [cpu_seconds(pid) for pid in pids]
    usage_before = group.usage() if group is not None else None
    await asyncio.sleep(seconds)
    cpu_after = [cpu_seconds(pid) for pid in pids]
    usage_after = group.usage() if group is not None else None
    elapsed = benchlib.now() - began
    turns_after = [await turns(console) for console in consoles]
    cpu = [(a - b) / elapsed for a, b in zip(cpu_after, cpu_before, strict=True)]
    work = [(a[0] - b[0]) / (a[1] - b[1]) for a, b in zip(turns_after, turns_before, strict=True)]
    figures = {
        "cpu_throttled": cpu[0],
        "cpu_free": cpu[1],
        "cpu_ratio": cpu[0] / cpu[1],
        "work_ratio": work[0] / work[1],
        "turns_free": work[1],
    }
    if usage_before is not None and usage_after is not None:
        figures["cgroup_usage_throttled"] = (usage_after - usage_before) / elapsed
    return figures


def mechanisms() -> list[str]:
    """The mechanisms this host offers: its cgroup's (if one can be written), cpulimit."""
    found = []
    try:
        hierarchy = find_hierarchy()
        asyncio.run(probe(hierarchy))
        found.append(hierarchy.label)
    except CgroupError as exc:
        print(f"# no cgroup here: {exc}")
    return [*found, "cpulimit"]


def main(seconds: float) -> None:
    results = {mechanism: asyncio.run(measure(mechanism, seconds)) for mechanism in mechanisms()}
    print(
        f"# {seconds:g} s windows, guests at 50 % and unthrottled at once; {benchlib.load_note()}"
    )
    for mechanism, figures in results.items():
        name = "cpulimit" if mechanism == "cpulimit" else "cgroup"  # names are [a-z_]+
        print(f"# {name}: {mechanism}")
        share = figures.get("cgroup_usage_throttled", figures["cpu_throttled"])
        counter = "the cgroup's counter" if "cgroup_usage_throttled" in figures else "/proc"
        benchlib.figure(
            f"{name}_share", share, f"throttled QEMU, CPU s/s by {counter}; target 0.45-0.55"
        )
        benchlib.figure(f"{name}_cpu_throttled", figures["cpu_throttled"], "CPU s/s by /proc")
        benchlib.figure(f"{name}_cpu_free", figures["cpu_free"], "unthrottled QEMU, CPU s/s")
        benchlib.figure(
            f"{name}_cpu_ratio",
            figures["cpu_ratio"],
            "throttled/unthrottled CPU; 0.5 on an idle host",
        )
        benchlib.figure(
            f"{name}_work_ratio", figures["work_ratio"], "throttled/unthrottled guest turns"
        )
        benchlib.figure(f"{name}_turns_free", figures["turns_free"], "unthrottled guest turns/s", 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="window (default 20)")
    arguments = parser.parse_args()
    if arguments.seconds < 5:
        sys.exit("--seconds must be at least 5")
    main(arguments.seconds)
