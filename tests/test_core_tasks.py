"""emucore.tasks: work that ends before its caller moves on, however the caller is told to."""

from __future__ import annotations

import asyncio

import pytest

from emucore.tasks import all_ended, finish


def test_all_ended_raises_the_first_failure_only_once_every_piece_ended() -> None:
    ended: list[str] = []

    async def slow() -> None:
        await asyncio.sleep(0.2)
        ended.append("slow")

    async def failing(message: str) -> None:
        ended.append(message)
        raise RuntimeError(message)

    async def body() -> None:
        with pytest.raises(RuntimeError, match="first"):
            await all_ended([failing("first"), slow(), failing("second")])
        assert sorted(ended) == ["first", "second", "slow"]  # slow was not left running
        await all_ended([])  # nothing to do: no failure

    asyncio.run(body())


def test_finish_waits_for_its_work_however_often_the_caller_is_cancelled() -> None:
    async def body() -> None:
        release = asyncio.Event()
        done: list[str] = []

        async def work() -> str:
            await release.wait()
            done.append("work")
            return "result"

        caller = asyncio.create_task(finish(work()))
        for _ in range(3):  # cancelled again and again (Ctrl-C in emu run)
            await asyncio.sleep(0)
            caller.cancel()
            await asyncio.sleep(0)
            assert not caller.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert done == ["work"]  # the work ended before the cancel reached the caller
        assert await finish(work()) == "result"

    asyncio.run(body())


def test_finish_raises_what_its_work_raised() -> None:
    async def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(finish(failing()))
