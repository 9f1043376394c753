"""The notification stream: what the controller learns without asking.

Each controller connected to ``/notifications/ws`` gets every message from then on: ``ping``
(the host's CPU, memory and disk use) at once and every ``ping_interval`` seconds,
``node.updated`` with the full node JSON on every status change (the controller learns a
node's status only from these), ``node.deleted``, and ``log.info|warning|error`` for what a
user should see. A listener that falls behind by ``MAX_BACKLOG`` messages is dropped: the
controller reconnects and asks again. The ``ping``'s figures come from
:mod:`emu_gns3.hostload`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

MAX_BACKLOG = 1000

Message = dict[str, Any]


class Notifier:
    """Fans messages out to the connected listeners."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Message | None]] = set()

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Queue[Message | None]]:
        """A queue receiving every message while the ``with`` block runs; ``None`` in it
        means the listener fell behind and must go."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue(MAX_BACKLOG + 1)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def publish(self, action: str, event: dict[str, Any], project_id: str | None = None) -> None:
        """Send ``{"action": action, "event": event}`` to every listener; with a
        ``project_id`` the controller passes it only to that project's clients."""
        message: Message = {"action": action, "event": event}
        if project_id is not None:
            message["project_id"] = project_id
        for queue in list(self._queues):
            if queue.qsize() >= MAX_BACKLOG:
                self._queues.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(message)

    @property
    def listeners(self) -> int:
        """How many listeners are connected."""
        return len(self._queues)
