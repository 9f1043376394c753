"""A host process for orphan tests: start QEMU nodes, print their pids, wait to be killed.

Usage: python tests/hold_nodes.py PROJECT_DIR KERNEL INITRD COUNT [--throttle]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from emu_qemu.process import qemu_pid
from emu_qemu.throttle import CPULIMIT
from emucore.models import HostSettings, Project
from emucore.session import Session


async def main(project_dir: Path, kernel: Path, initrd: Path, count: int, throttle: bool) -> None:
    settings = HostSettings(
        image_dirs=(kernel.parent, initrd.parent), emulators={"qemu": {"kvm": "off"}}
    )
    session = Session(Project.for_directory(project_dir), settings=settings)
    pids = []
    for number in range(count):
        node = session.add_node(
            {
                "name": f"held{number}",
                "emulator": "qemu",
                "ram": 64,
                "kernel_image": str(kernel),
                "initrd": str(initrd),
                "kernel_command_line": "console=ttyS0 quiet",
                "cpu_throttling": 50 if throttle else 0,
            }
        )
        await node.start()
        pids.append(qemu_pid(node))
        if throttle:
            pids.append(node.stash[CPULIMIT].pid)
    print("PIDS", *pids, flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    directory, kernel, initrd, count = sys.argv[1:5]
    asyncio.run(
        main(Path(directory), Path(kernel), Path(initrd), int(count), "--throttle" in sys.argv)
    )
