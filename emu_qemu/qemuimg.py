"""Run ``qemu-img`` asynchronously with bounded waits, and remember what it said.

``info`` results are cached by (path, size, mtime); so are base-image checks, on disk, so an
unchanged base is checked once, not at every start (GNS3 checks every base at every start).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from emucore.errors import EmuError
from emucore.paths import cache_dir

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
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(errors="replace").strip())


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


_info_cache: dict[tuple[str, int, int, str], dict[str, Any]] = {}


async def info(qemu_img: str, path: Path, image_format: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (cached while the file is unchanged).

    It opens neither the backing file nor a qcow2 data file (see :mod:`emu_qemu.chain`).
    ``-U`` lets it read an image a running QEMU holds.

    :param image_format: read the image as this format instead of probing it.
    """
    key = (*_stamp(path), image_format or "")
    if key not in _info_cache:
        forced = ["-f", image_format] if image_format else []
        args = ["info", "-U", *forced, "--output=json", str(path)]
        done = await run(qemu_img, args, timeout=60)
        if done.returncode != 0:
            raise QemuImgError(f"qemu-img info {path} failed: {done.output}")
        _info_cache[key] = json.loads(done.output)
    return _info_cache[key]


def _checked_file() -> Path:
    return cache_dir() / "checked-images.json"


def _load_checked() -> dict[str, int]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_checked_file().read_text())
        if isinstance(data, dict):
            return {str(k): int(v) for k, v in data.items()}
    return {}


def _remember_checked(key: str, returncode: int) -> None:
    path = _checked_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        # Forget images that are gone (temporary bases of tests, deleted labs).
        checked = {k: v for k, v in _load_checked().items() if Path(k.split("|")[0]).exists()}
        checked[key] = returncode
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(checked, indent=1))
        temporary.replace(path)


async def check_base(qemu_img: str, path: Path, image_format: str) -> Completed:
    """Check a base image read-only (never repair it), once per size+mtime.

    Formats qemu-img cannot check (raw) pass.
    """
    if image_format not in ("qcow2", "qed", "vdi", "vhdx", "parallels"):
        return Completed(CHECK_OK, "format has no consistency check")
    key = "|".join(map(str, _stamp(path)))
    remembered = _load_checked().get(key)
    if remembered is not None:
        return Completed(remembered, "checked before, unchanged since")
    done = await run(qemu_img, ["check", "-U", "-f", image_format, str(path)])
    if done.returncode in (CHECK_OK, CHECK_LEAKS, CHECK_CORRUPT):
        _remember_checked(key, done.returncode)
    return done


_md5_cache: dict[tuple[str, int, int], str] = {}


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as image:
        while chunk := image.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _md5_file_cache() -> Path:
    return cache_dir() / "image-md5.json"


def _load_md5s() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_md5_file_cache().read_text())
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return {}


def _remember_md5(key: str, digest: str) -> None:
    path = _md5_file_cache()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        known = {k: v for k, v in _load_md5s().items() if Path(k.split("|")[0]).exists()}
        known[key] = digest
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1))
        temporary.replace(path)


async def md5(path: Path) -> str:
    """The md5 of an image, computed in a thread (never on the event loop), once per file:
    remembered by path, size and mtime, in memory and in ``<cache>/image-md5.json`` (a host
    restart does not read gigabytes again); computed only when asked for."""
    stamp = _stamp(path)
    if stamp not in _md5_cache:
        key = "|".join(map(str, stamp))
        remembered = _load_md5s().get(key)
        if remembered is None:
            remembered = await asyncio.to_thread(_md5_file, path)
            _remember_md5(key, remembered)
        _md5_cache[stamp] = remembered
    return _md5_cache[stamp]
