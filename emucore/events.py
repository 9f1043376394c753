"""A tiny publish/subscribe bus for node events (status changes, warnings, errors)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from emucore.models import NodeEvent

log = logging.getLogger("emu")

Subscriber = Callable[[NodeEvent], None]

_LOG_LEVELS = {"status": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class EventBus:
    """Delivers each :class:`~emucore.models.NodeEvent` to every subscriber, synchronously.

    Subscribers must not block; a subscriber that raises is logged and skipped. Every event
    is also logged to the ``emu`` logger.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` for each event from now on; returns an unsubscribe function."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    @contextlib.contextmanager
    def queue(self) -> Iterator[asyncio.Queue[NodeEvent]]:
        """A queue receiving every event while the ``with`` block runs (for async hosts)."""
        events: asyncio.Queue[NodeEvent] = asyncio.Queue()
        unsubscribe = self.subscribe(events.put_nowait)
        try:
            yield events
        finally:
            unsubscribe()

    def publish(self, event: NodeEvent) -> None:
        """Send ``event`` to every subscriber."""
        level = _LOG_LEVELS.get(event.kind, logging.ERROR)
        log.log(level, "%s: %s", event.node, event.message)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed", subscriber)
