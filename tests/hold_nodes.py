"""A host process for orphan tests: start QEMU nodes, print their pids, wait to be killed.

Usage: python tests/hold_nodes.py PROJECT_DIR KERNEL INITRD COUNT [--throttle MECHANISMS] [--tpm]

``--throttle auto,cpulimit`` throttles every node to 50 % of a CPU, node *i* with the
*i*-th mechanism (cycling; ``auto`` is a cgroup where one can be written). ``--tpm`` gives
every node a TPM (a swtpm each). Prints one line ``PIDS ...`` (every QEMU, every cpulimit
and its guard, every swtpm), one line ``GROUPS ...`` (the nodes' cgroup directories) and
one line ``MECHANISMS m1,m2,...``, then waits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from emu_qemu.contract import qemu_pid
from emu_qemu.throttle import throttling_of
from emu_qemu.tpm import SWTPM
from emucore.models import HostSettings, Project
from emucore.session import Session


async def main(
    project_dir: Path, kernel: Path, initrd: Path, count: int, throttle: str, tpm: bool
) -> None:
    mechanisms = throttle.split(",") if throttle else ["auto"]
    sessions = {
        mechanism: Session(
            Project.for_directory(project_dir),
            settings=HostSettings(
                image_dirs=(kernel.parent, initrd.parent),
                emulators={"qemu": {"kvm": "off", "cpu_throttling_mechanism": mechanism}},
            ),
        )
        for mechanism in mechanisms
    }
    pids, groups, used = [], [], []
    for number in range(count):
        mechanism = mechanisms[number % len(mechanisms)]
        node = sessions[mechanism].add_node(
            {
                "name": f"held{number}",
                "emulator": "qemu",
                "ram": 64,
                "kernel_image": str(kernel),
                "initrd": str(initrd),
                "kernel_command_line": "console=ttyS0 quiet",
                "cpu_throttling": 50 if throttle else 0,
                "tpm": tpm,
            }
        )
        await node.start()
        pids.append(qemu_pid(node))
        if tpm:
            pids.append(node.stash[SWTPM].pid)
        state = throttling_of(node)
        if state is not None and state.cpulimit is not None:
            pids += [state.cpulimit.guard.pid, state.cpulimit.pid]
        if state is not None and state.group is not None:
            groups += [str(directory) for directory in state.group.directories]
        used.append((state.mechanism if state else "") or "none")
    print("PIDS", *pids, flush=True)
    print("GROUPS", *groups, flush=True)
    print("MECHANISMS", ",".join(used), flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    directory, kernel, initrd, count = sys.argv[1:5]
    mechanisms = sys.argv[sys.argv.index("--throttle") + 1] if "--throttle" in sys.argv else ""
    tpm = "--tpm" in sys.argv
    asyncio.run(main(Path(directory), Path(kernel), Path(initrd), int(count), mechanisms, tpm))
