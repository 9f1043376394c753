"""Run ``qemu-img`` asynchronously with bounded waits, and remember what it said.

``info`` results are cached by (path, size, mtime); so are base-image checks, on disk, so an
unchanged base is checked once, not at every start (GNS3 checks every base at every start).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from emucore.digests import StampedFile, stamp
from emucore.errors import EmuError
from emucore.process import signal_child

# qemu-img check exit codes.
CHECK_OK, CHECK_CORRUPT, CHECK_LEAKS = 0, 2, 3


class QemuImgError(EmuError):
    """qemu-img failed or could not run."""


@attrs.frozen
class Completed:
    """A finished qemu-img run."""

    returncode: int
    output: str


def find_qemu_img(qemu_binary: Path | None = None) -> str:
    """qemu-img next to the QEMU binary (same build), else on PATH.

    :raises QemuImgError: not found.
    """
    if qemu_binary is not None:
        beside = qemu_binary.parent / "qemu-img"
        if os.access(beside, os.X_OK):
            return str(beside)
    found = shutil.which("qemu-img")
    if found is None:
        raise QemuImgError("qemu-img not found; install it (Debian: apt-get install qemu-utils)")
    return found


async def run(qemu_img: str, args: Sequence[str], timeout: float = 600.0) -> Completed:
    """Run ``qemu-img ARGS``; kill it when it takes longer than ``timeout`` seconds."""
    process = await asyncio.create_subprocess_exec(
        qemu_img,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        signal_child(process, signal.SIGKILL)
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(errors="replace").strip())


_info_cache: dict[tuple[str, int, int, str], dict[str, Any]] = {}


async def info(qemu_img: str, path: Path, image_format: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (cached while the file is unchanged).

    It opens neither the backing file nor a qcow2 data file (see :mod:`emu_qemu.chain`).
    ``-U`` lets it read an image a running QEMU holds.

    :param image_format: read the image as this format instead of probing it.
    """
    key = (*stamp(path), image_format or "")
    if key not in _info_cache:
        forced = ["-f", image_format] if image_format else []
        args = ["info", "-U", *forced, "--output=json", str(path)]
        done = await run(qemu_img, args, timeout=60)
        if done.returncode != 0:
            raise QemuImgError(f"qemu-img info {path} failed: {done.output}")
        _info_cache[key] = json.loads(done.output)
    return _info_cache[key]


_CHECKED = StampedFile("checked-images.json")


async def check_base(qemu_img: str, path: Path, image_format: str) -> Completed:
    """Check a base image read-only (never repair it), once per size+mtime.

    Formats qemu-img cannot check (raw) pass.
    """
    if image_format not in ("qcow2", "qed", "vdi", "vhdx", "parallels"):
        return Completed(CHECK_OK, "format has no consistency check")
    key = "|".join(map(str, stamp(path)))
    remembered = _CHECKED.load().get(key)
    if isinstance(remembered, int):
        return Completed(remembered, "checked before, unchanged since")
    done = await run(qemu_img, ["check", "-U", "-f", image_format, str(path)])
    if done.returncode in (CHECK_OK, CHECK_LEAKS, CHECK_CORRUPT):
        _CHECKED.remember(key, done.returncode)
    return done
