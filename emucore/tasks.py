"""Asyncio helpers for work that must end before its caller moves on.

:func:`all_ended` awaits several pieces of work and raises the first failure only once every
one ended: a failure never leaves the others running while the caller cleans up (stops the
nodes, closes the session).

A cancel (Ctrl-C) can reach a task several times: the CLI cancels again until the lab is
stopping, because Python 3.11's ``wait_for`` can lose a cancel. ``asyncio.shield`` alone
protects the shielded work but lets the caller leave at the next cancel, with the work
still running (e.g. a node's stop hooks, with the node's lock released). :func:`finish`
waits however often it is cancelled, then passes the cancel on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def finish(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled, once or many times.

    :return: what ``work`` returned (it raises what ``work`` raised).
    :raises asyncio.CancelledError: the caller was cancelled meanwhile; raised once
        ``work`` ended.
    """
    task = asyncio.ensure_future(work)
    cancel: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancel = exc
    if cancel is not None:
        if not task.cancelled():
            task.exception()  # marked as seen: the caller hears of the cancel
        raise cancel
    return task.result()


async def all_ended(work: Iterable[Awaitable[object]]) -> None:
    """Await everything in ``work`` concurrently; raise the first failure once all ended.

    :raises BaseException: the first failure, in the order of ``work``.
    """
    results = await asyncio.gather(*work, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
