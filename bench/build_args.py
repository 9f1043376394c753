"""How long the QEMU plugin takes to build a command line, and how that grows with adapters.

Run from the repository root::

    .venv/bin/python bench/build_args.py [--repeat N]

Each node gets 4 qcow2 disks (linked clones, prepared with the real ``qemu-img``) and N
adapters. One dry run first resolves and caches what a start resolves once (binary, version,
accelerator; ``EMU_QEMU_KVM=off`` so nothing probes KVM); then ``node.hooks.build_args(node)``,
the synchronous part of every start, is timed ``--repeat`` times per node, the nodes taking
turns. Prints ``name: value (meaning)`` lines: medians of this thread's CPU time (other
processes on a busy host barely move it), with the wall time beside; the target for 64
adapters and 4 disks is 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.session import Session

TARGET_US = 1000.0
DISKS = "abcd"
INTERFACES = {"a": "virtio", "b": "sata", "c": "scsi", "d": "ide"}


def make_node(session: Session, adapters: int) -> Node:
    """A node with ``adapters`` adapters, 4 disks, UDP links on half the adapters."""
    description = {
        "name": f"bench-{adapters}",
        "emulator": "qemu",
        "adapters": adapters,
        "nios": {
            n: {
                "type": "udp",
                "local_port": 20000 + n,
                "remote_host": "127.0.0.1",
                "remote_port": 30000 + n,
            }
            for n in range(0, adapters, 2)
        },
        **{f"hd{d}_disk_image": f"{d}.qcow2" for d in DISKS},
        **{f"hd{d}_disk_interface": INTERFACES[d] for d in DISKS},
    }
    node = session.add_node(description)
    asyncio.run(node.prepare_disks())
    asyncio.run(node.dry_run())
    return node


def medians_us(nodes: dict[int, Node], repeat: int) -> dict[int, tuple[float, float]]:
    """Median CPU time and wall time of one ``build_args`` call per node, in microseconds.

    The nodes take turns, so a burst of load from other processes hits every size alike;
    CPU time (this thread's) is the figure that other processes on the host barely move.
    """
    cpu: dict[int, list[int]] = {n: [] for n in nodes}
    wall: dict[int, list[int]] = {n: [] for n in nodes}
    gc.disable()
    try:
        for _ in range(repeat):
            for n, node in nodes.items():
                start_cpu, start_wall = time.thread_time_ns(), time.perf_counter_ns()
                node.hooks.build_args(node)
                wall[n].append(time.perf_counter_ns() - start_wall)
                cpu[n].append(time.thread_time_ns() - start_cpu)
    finally:
        gc.enable()
    return {n: (statistics.median(cpu[n]) / 1000, statistics.median(wall[n]) / 1000) for n in nodes}


def caller_us(node: Node, repeat: int) -> float:
    """Median time of selecting the hook's implementations for the node's kind, alone."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        node.hooks.caller("emu_build_args")
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1000, help="calls timed per node")
    args = parser.parse_args()
    os.environ["EMU_QEMU_KVM"] = "off"
    with tempfile.TemporaryDirectory(prefix="emu-bench-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        os.environ["EMU_CACHE_DIR"] = str(root / "cache")
        for drive in DISKS:
            image = images / f"{drive}.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True
            )
        session = Session(
            Project.for_directory(root / "project"), settings=HostSettings(image_dirs=(images,))
        )
        nodes = {n: make_node(session, n) for n in (1, 16, 64, 256)}
        argv_items = {n: len(node.hooks.build_args(node)) for n, node in nodes.items()}
        measured = medians_us(nodes, args.repeat)
        times = {n: cpu for n, (cpu, _) in measured.items()}
        main_us, main_wall = measured[64]
        print(
            f"build_args_64a4d_median_us: {main_us:.0f}"
            f" ({main_us / TARGET_US:.2f} of 1 ms target; CPU time, wall {main_wall:.0f})"
        )
        for n, (took, took_wall) in measured.items():
            print(
                f"build_args_{n}a4d_median_us: {took:.0f}"
                f" ({took / times[1]:.1f}x the 1-adapter node; {argv_items[n]} argv items;"
                f" wall {took_wall:.0f})"
            )
        per_adapter = (times[256] - times[16]) / (256 - 16)
        print(f"build_args_per_adapter_us: {per_adapter:.1f} (slope from 16 to 256 adapters)")
        overhead = caller_us(nodes[64], args.repeat)
        print(
            f"hook_caller_selection_us: {overhead:.0f}"
            f" ({overhead / main_us:.2f} of the 64-adapter time: subset_hook_caller per call)"
        )
        asyncio.run(session.close())


if __name__ == "__main__":
    main()
