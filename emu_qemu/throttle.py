"""CPU throttling: ``cpu_throttling`` percent of one host CPU, enforced by ``cpulimit``.

cpulimit runs as a child of the host like QEMU (it dies with the host), with ``-z`` so it
also ends when QEMU ends, and is terminated when the node stops.
"""

from __future__ import annotations

import asyncio
import shutil

from emu_qemu.process import qemu_pid
from emucore import hookimpl
from emucore.errors import NodeError
from emucore.files import create_file
from emucore.node import Node
from emucore.process import spawn, terminate
from emucore.records import CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"


CPULIMIT = StashKey[asyncio.subprocess.Process]()


@hookimpl(trylast=True)
async def emu_started(node: Node) -> None:
    """Start cpulimit on QEMU when the node asks for throttling."""
    percent = node.properties.cpu_throttling
    pid = qemu_pid(node)
    if not percent or pid is None:
        return
    cpulimit = shutil.which("cpulimit")
    if cpulimit is None:
        raise NodeError(
            node.name,
            "cpu_throttling: cpulimit is not installed (Debian: apt-get install cpulimit)",
        )
    with create_file(node.directory / "cpulimit.log") as log:
        node.stash[CPULIMIT] = await spawn(
            [cpulimit, "-p", str(pid), "-l", str(percent), "-z"], cwd=node.directory, output=log
        )


@hookimpl(trylast=True)
async def emu_stop(node: Node) -> None:
    """Stop cpulimit with the node."""
    process = node.stash.pop(CPULIMIT, None)
    if process is not None:
        await terminate(process, grace=2)


@hookimpl
def emu_check(settings: object) -> list[CheckResult]:
    """Report whether cpulimit is installed."""
    found = shutil.which("cpulimit")
    return [
        CheckResult("cpulimit", found is not None, found or "not found; apt-get install cpulimit")
    ]
