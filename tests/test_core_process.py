"""The supervised child process of emucore.process: what stop and start do when something
goes wrong around them (a cancel aimed at the caller, a pidfile that cannot be written)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import emucore.process
from emucore.process import Supervised


def test_a_cancel_during_stop_reaches_the_caller_and_spares_the_watcher(emu_run: Any) -> None:
    async def body() -> None:
        supervised = await Supervised.start(["sleep", "600"])
        real_watcher = supervised._watcher
        # A watcher that has not yet run when the process ends: stop waits for it.
        release = asyncio.Event()
        supervised._watcher = asyncio.create_task(release.wait())
        stopper = asyncio.create_task(supervised.stop(grace=10))
        await supervised.process.wait()
        for _ in range(20):  # let the stopper leave terminate and reach the watcher
            await asyncio.sleep(0)
        assert not stopper.done()
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        assert stopper.cancelled()  # the cancel reached the task that called stop
        assert not supervised._watcher.done()  # and did not cancel the watcher
        release.set()
        await supervised._watcher
        await real_watcher

    emu_run(body())


def test_a_pidfile_that_cannot_be_written_ends_the_child_it_was_for(
    emu_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[asyncio.subprocess.Process] = []
    real_spawn = emucore.process.spawn

    async def recording_spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        spawned.append(await real_spawn(*args, **kwargs))
        return spawned[-1]

    monkeypatch.setattr("emucore.process.spawn", recording_spawn)
    unwritable = tmp_path / "missing" / "node.pid"  # its directory does not exist

    async def body() -> None:
        with pytest.raises(FileNotFoundError):
            await Supervised.start(["sleep", "600"], pidfile=unwritable)
        assert len(spawned) == 1
        assert spawned[0].returncode is not None  # ended, not left running unowned

    emu_run(body())
