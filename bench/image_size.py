"""Does a big base image slow a linked-clone start? A 20 GiB base against a 10 MiB one.

Run from the repository root::

    .venv/bin/python bench/image_size.py [--runs 40]

The big base is a sparse 20 GiB qcow2 holding 640 MiB of data (40 runs of 16 MiB spread
over the whole disk: 10,240 allocated clusters and an L2 table per 512 MiB, so ``qemu-img
check`` has real work); the small one is 10 MiB with 1 MiB of data. One node uses each
(linked clone, virtio disk, no kernel). A start is ``node.start()``: prepare hooks,
``prepare_disks`` (overlay created or reused and checked for leaks, base checked once per
size and mtime), argv, spawn, until QMP is ready. emu's caches start empty, so each node's
first start creates its overlay and checks its base; the repeated starts, alternating
between the nodes, are the figure that matters. Target: big/small ≤ 1.05 (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import benchlib

TARGET = 1.05
BIG_SIZE = 20 << 30
CHUNKS, CHUNK = 40, 16 << 20


def make_base(path: Path, size: int, writes: list[str]) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    arguments = [item for command in writes for item in ("-c", command)]
    subprocess.run(["qemu-io", *arguments, str(path)], check=True, capture_output=True)


def check_seconds(path: Path) -> float:
    """One read-only ``qemu-img check`` of ``path``, as GNS3 runs at every start."""
    began = benchlib.now()
    subprocess.run(["qemu-img", "check", "-U", str(path)], check=True, capture_output=True)
    return benchlib.now() - began


async def main(runs: int) -> None:
    with benchlib.lab_directory("image") as root:
        images = root / "images"
        stride = BIG_SIZE // CHUNKS
        make_base(
            images / "big.qcow2",
            BIG_SIZE,
            [f"write -P 0x5a {i * stride} {CHUNK}" for i in range(CHUNKS)],
        )
        make_base(images / "small.qcow2", 10 << 20, ["write -P 0x5a 0 1M"])
        checks = [check_seconds(images / "big.qcow2") for _ in range(5)]
        lab = benchlib.session(root)
        nodes = {
            size: lab.add_node(
                {
                    "name": size,
                    "emulator": "qemu",
                    "qemu_path": benchlib.QEMU,
                    "ram": 64,
                    "hda_disk_image": f"{size}.qcow2",
                    "hda_disk_interface": "virtio",
                }
            )
            for size in ("small", "big")
        }
        try:
            first = {size: await benchlib.timed_start(node) for size, node in nodes.items()}
            times: dict[str, list[float]] = {"small": [], "big": []}
            for round_number in range(runs):
                order = ["small", "big"] if round_number % 2 == 0 else ["big", "small"]
                for size in order:
                    times[size].append(await benchlib.timed_start(nodes[size]))
        finally:
            await lab.close()
    small, big = benchlib.median(times["small"]), benchlib.median(times["big"])
    print(f"# {runs} alternating starts each; {benchlib.load_note()}")
    benchlib.figure("start_small_base_ms", small * 1000, "median, 10 MiB base", 1)
    benchlib.figure("start_big_base_ms", big * 1000, "median, 20 GiB base, 640 MiB data", 1)
    benchlib.figure("first_start_small_base_ms", first["small"] * 1000, "creates and checks", 1)
    benchlib.figure("first_start_big_base_ms", first["big"] * 1000, "creates and checks", 1)
    benchlib.figure(
        "qemu_img_check_big_base_ms",
        benchlib.median(checks) * 1000,
        "one check of the big base: what checking at every start would add",
        1,
    )
    benchlib.figure("image_size_ratio", big / small, f"big/small medians; target ≤ {TARGET}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="starts of each node (default 40)")
    arguments = parser.parse_args()
    if arguments.runs < 5:
        sys.exit("--runs must be at least 5")
    asyncio.run(main(arguments.runs))
