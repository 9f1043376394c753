"""Which QEMU binary runs a node: from ``qemu_path`` or ``platform``, with its version.

It answers ``emu_qemu_binary`` (see :mod:`emu_qemu.contract`) for every piece that needs
the binary, and puts it first on the command line. The binary is resolved afresh at each
start, in a thread (a first ``-version`` can take a while), in a *tryfirst* ``emu_prepare``:
the other pieces' ``emu_prepare`` (the KVM probe) then find it resolved.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from emu_qemu import positions
from emu_qemu.contract import QemuNode, binary
from emu_qemu.qemubinary import DEFAULT_PLATFORM, QemuBinary, find_binary, read_version
from emucore import hookimpl
from emucore.models import HostSettings
from emucore.records import ArgFragment, CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"

_RESOLVED = StashKey[QemuBinary]()


@hookimpl(trylast=True)
def emu_qemu_binary(node: QemuNode) -> QemuBinary:
    """The binary resolved for this start, or resolved now (node created, not started)."""
    found = node.stash.get(_RESOLVED, None)
    if found is None:
        found = find_binary(node.properties, node.emulator_settings, node.name)
        node.stash[_RESOLVED] = found
    return found


@hookimpl(tryfirst=True)
async def emu_prepare(node: QemuNode) -> None:
    """Resolve the binary afresh at each start (it may have been upgraded), in a thread."""
    node.stash[_RESOLVED] = await asyncio.to_thread(
        find_binary, node.properties, node.emulator_settings, node.name
    )


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """The binary is argv[0]."""
    # Through the hook, as every piece asks: a plugin answering first names argv[0] too.
    return [ArgFragment(positions.PROGRAM, (str(binary(node).path),), "qemu.binary")]


@hookimpl
def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report the QEMU binaries found in the host's binary_dirs and on PATH."""
    raw = settings.emulators.get("qemu", {})
    dirs = [str(d) for d in raw.get("binary_dirs", ())] if isinstance(raw, Mapping) else []
    search = os.pathsep.join([*dirs, os.environ.get("PATH", "")])
    results = []
    for platform in ("x86_64", "i386", "aarch64", "arm"):
        name = f"qemu-system-{platform}"
        located = shutil.which(name, path=search)
        if located is None:
            if platform == DEFAULT_PLATFORM:
                results.append(
                    CheckResult(name, False, "not found on PATH; apt-get install qemu-system-x86")
                )
            continue
        path = Path(located)
        stat = path.stat()
        version = read_version(path, stat.st_size, stat.st_mtime_ns)
        detail = (
            f"{path}, version {'.'.join(map(str, version))}" if version else f"{path}, no version"
        )
        results.append(CheckResult(name, version is not None, detail))
    qemu_img = shutil.which("qemu-img")
    results.append(
        CheckResult(
            "qemu-img", qemu_img is not None, qemu_img or "not found; apt-get install qemu-utils"
        )
    )
    return results
