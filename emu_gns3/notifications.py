"""The notification stream: what the controller learns without asking.

Each controller connected to ``/notifications/ws`` gets every message from then on: ``ping``
(the host's CPU, memory and disk use) at once and every ``ping_interval`` seconds,
``node.updated`` with the full node JSON on every status change (the controller learns a
node's status only from these), ``node.deleted``, and ``log.info|warning|error`` for what a
user should see. A listener that falls behind by ``MAX_BACKLOG`` messages is dropped: the
controller reconnects and asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
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

    def publish(self, action: str, event: dict[str, Any]) -> None:
        """Send ``{"action": action, "event": event}`` to every listener."""
        message = {"action": action, "event": event}
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


class HostLoad:
    """CPU, memory and disk use in percent, as the ``ping`` message carries them.

    :ivar disk_path: the file system whose use is reported (the projects directory).
    """

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._last_cpu = _cpu_times()

    def sample(self) -> dict[str, float]:
        """The use since the previous sample (CPU) and now (memory, disk)."""
        busy, total = _cpu_times()
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        cpu = 100.0 * (busy - last_busy) / (total - last_total) if total > last_total else 0.0
        return {
            "cpu_usage_percent": round(cpu, 1),
            "memory_usage_percent": round(_memory_percent(), 1),
            "disk_usage_percent": round(self._disk_percent(), 1),
        }

    def _disk_percent(self) -> float:
        path = self.disk_path
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = shutil.disk_usage(path)
        return 100.0 * usage.used / usage.total if usage.total else 0.0


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _memory_percent() -> float:
    """Memory in use (not available) in percent, from ``/proc/meminfo``."""
    info: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    return 100.0 * (total - available) / total if total else 0.0


def memory_bytes() -> int:
    """The host's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
