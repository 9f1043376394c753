"""emucore.digests: a file's MD5 is read once per version, however many ask at once."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from emucore import digests


def test_concurrent_askers_share_one_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "base.img"
    image.write_bytes(b"emu" * 300_000)
    readings: list[Path] = []
    real = digests._md5_file

    def counted(path: Path) -> str:
        readings.append(path)
        return real(path)

    monkeypatch.setattr(digests, "_md5_file", counted)

    async def ask(count: int) -> list[str]:
        return await asyncio.gather(*(digests.md5(image) for _ in range(count)))

    answers = asyncio.run(ask(8))
    expected = hashlib.md5(image.read_bytes(), usedforsecurity=False).hexdigest()
    assert answers == [expected] * 8
    assert readings == [image]
    image.write_bytes(b"changed")  # a new version is read again
    assert asyncio.run(ask(2)) == [hashlib.md5(b"changed", usedforsecurity=False).hexdigest()] * 2
    assert len(readings) == 2
