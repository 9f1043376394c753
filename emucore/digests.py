"""What is remembered about files: one value per file version, and files' MD5 digests.

A file version is its resolved path, size and mtime (:func:`stamp`). An MD5 is computed in
a thread (never on the event loop), once per version: concurrent askers share the one
computation, and the result is kept in memory and in ``<cache>/image-md5.json``, so neither
a second node on the same image nor a restarted host reads gigabytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from emucore.paths import cache_dir


def stamp(path: Path) -> tuple[str, int, int]:
    """The version of a file: resolved path, size, mtime (ns)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


class StampedFile:
    """A JSON file in emu's cache remembering one value per file version, keyed
    ``path|size|mtime_ns``; when it is written, the entries of files that are gone
    (temporary bases of tests, deleted labs) are dropped."""

    def __init__(self, name: str) -> None:
        self.name = name

    def load(self) -> dict[str, Any]:
        """Everything remembered ({} when the file is missing or unreadable)."""
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((cache_dir() / self.name).read_text())
            if isinstance(data, dict):
                return {str(key): value for key, value in data.items()}
        return {}

    def remember(self, key: str, value: Any) -> None:
        """Add ``key``; a cache that cannot be written is not an error."""
        path = cache_dir() / self.name
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            known = {k: v for k, v in self.load().items() if Path(k.split("|")[0]).exists()}
            known[key] = value
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(known, indent=1))
            temporary.replace(path)


_MD5S = StampedFile("image-md5.json")
_md5s: dict[tuple[str, int, int], str] = {}
# Computations under way, each of one event loop (a host may run several loops in turn).
_computing: dict[tuple[str, int, int], asyncio.Future[str]] = {}


def _md5_file(path: Path) -> str:
    with path.open("rb") as image:
        return hashlib.file_digest(image, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


async def md5(path: Path) -> str:
    """The MD5 of a file (hex), computed once per version of it (see the module docstring).

    :raises OSError: the file cannot be read.
    """
    version = stamp(path)
    if version in _md5s:
        return _md5s[version]
    loop = asyncio.get_running_loop()
    computing = _computing.get(version)
    if computing is None or computing.get_loop() is not loop:
        computing = _computing[version] = loop.create_task(_compute(path, version))
    return await asyncio.shield(computing)  # one asker giving up cancels no other's


async def _compute(path: Path, version: tuple[str, int, int]) -> str:
    try:
        key = "|".join(map(str, version))
        remembered = _MD5S.load().get(key)
        if isinstance(remembered, str):
            digest = remembered
        else:
            digest = await asyncio.to_thread(_md5_file, path)
            _MD5S.remember(key, digest)
        _md5s[version] = digest
        return digest
    finally:
        _computing.pop(version, None)
