"""The supervised child process of emucore.process: what stop and start do when something
goes wrong around them (a cancel aimed at the caller, a pidfile that cannot be written)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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
