"""Starting 16 tiny-guest nodes at once against starting one.

Run from the repository root::

    .venv/bin/python bench/scale.py [--nodes 16] [--repeat 2]

All nodes are started with one ``asyncio.gather`` of ``node.start()``; two times are taken
from that moment: every node QMP-ready (every ``start()`` returned) and every guest booted
(its ready marker in ``console.log``, which QEMU writes from the serial line; checked every
50 ms). The same for a single node. Under TCG a boot is CPU-bound, so on N cores booting 16
guests takes about 16/N times one boot; QMP-ready should stay close to flat. Guests have
128 MiB; all are stopped between rounds.

To tell emu's share from the host's, the same 16 command lines are also started bare
(``asyncio.create_subprocess_exec``, QMP connect, ``cont``: what emu does minus emu) and
timed to all QMP-ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import benchlib

from emucore.node import Node
from emucore.session import Session

POLL = 0.05
BOOT_TIMEOUT = 600.0


async def round_trip(lab: Session, nodes: list[Node]) -> tuple[float, float]:
    """Seconds until all are QMP-ready, and until all guests booted; then stop them."""
    for node in nodes:
        (node.directory / "console.log").unlink(missing_ok=True)
    began = benchlib.now()
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        ready = benchlib.now() - began
        while not all(benchlib.booted(node) for node in nodes):
            if benchlib.now() - began > BOOT_TIMEOUT:
                raise TimeoutError(f"guests not booted after {BOOT_TIMEOUT:g} s")
            await asyncio.sleep(POLL)
        booted = benchlib.now() - began
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))
    return ready, booted


async def bare_round(nodes: list[Node]) -> float:
    """Seconds until the nodes' last command lines, started bare, are all QMP-ready."""
    async with contextlib.AsyncExitStack() as stack:
        began = benchlib.now()
        starts = (benchlib.bare_qemu(node.argv, node.directory, cont=True) for node in nodes)
        await asyncio.gather(*(stack.enter_async_context(start) for start in starts))
        return benchlib.now() - began


async def main(count: int, repeat: int) -> None:
    with benchlib.lab_directory("scale") as root:
        tiny = benchlib.guest()
        lab = benchlib.session(root, tiny)
        many = [benchlib.guest_node(lab, tiny, f"g{i}") for i in range(count)]
        try:
            await round_trip(lab, many[:1])  # warm-up: caches, page cache of the images
            one = [await round_trip(lab, many[:1]) for _ in range(repeat + 1)]
            all_of_them = [await round_trip(lab, many) for _ in range(repeat)]
            bare = [await bare_round(many) for _ in range(repeat)]
        finally:
            await lab.close()
    one_ready = benchlib.median([ready for ready, _ in one])
    one_booted = benchlib.median([booted for _, booted in one])
    many_ready = benchlib.median([ready for ready, _ in all_of_them])
    many_booted = benchlib.median([booted for _, booted in all_of_them])
    print(f"# medians of {repeat + 1} single and {repeat} x{count} rounds; {benchlib.load_note()}")
    benchlib.figure("one_qmp_ready_s", one_ready, "1 node started → QMP ready")
    benchlib.figure("one_booted_s", one_booted, "1 node started → guest booted")
    benchlib.figure("many_qmp_ready_s", many_ready, f"{count} nodes started → all QMP ready")
    benchlib.figure("many_booted_s", many_booted, f"{count} nodes started → all booted")
    benchlib.figure(
        "many_bare_qmp_ready_s", benchlib.median(bare), f"{count} bare QEMUs → all QMP ready"
    )
    benchlib.figure("qmp_ready_ratio", many_ready / one_ready, f"{count} nodes / 1 node")
    benchlib.figure(
        "qmp_ready_vs_bare_ratio", many_ready / benchlib.median(bare), f"{count} nodes: emu/bare"
    )
    benchlib.figure("booted_ratio", many_booted / one_booted, f"{count} nodes / 1 node")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=16, help="nodes started at once")
    parser.add_argument("--repeat", type=int, default=2, help="rounds with all the nodes")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.nodes, arguments.repeat))
