"""The host's load as the controller sees it, and the RAM check before a node starts.

The ``ping`` notification carries three percentages, read from the kernel as ``top`` and
``df`` read them: CPU time spent busy since the previous ping (``/proc/stat``, all CPUs;
guest time is already inside user time and is not counted twice), memory in use, meaning
not available (``MemTotal - MemAvailable`` of ``/proc/meminfo``), and the projects file
system's use (used / (used + available to users), as ``df`` prints it).

GNS3's controller only warns when a compute lacks the RAM for a node; an emu compute
refuses the start (409) of a node whose ``ram`` exceeds the host's ``MemAvailable``: a
guest that cannot get its memory is killed by the kernel's OOM killer later, with a worse
message, possibly taking another node along.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from emu_gns3.errors import Conflict
from emucore.node import Node

MEMINFO = Path("/proc/meminfo")
STAT = Path("/proc/stat")


class HostLoad:
    """CPU, memory and disk use in percent, as one listener's ``ping`` messages carry them.

    :ivar disk_path: the file system whose use is reported (the projects directory).
    """

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._last_cpu = cpu_times()

    def sample(self) -> dict[str, float]:
        """The use since the previous sample (CPU) and now (memory, disk)."""
        busy, total = cpu_times()
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        cpu = 100.0 * (busy - last_busy) / (total - last_total) if total > last_total else 0.0
        return {
            "cpu_usage_percent": round(cpu, 1),
            "memory_usage_percent": round(memory_percent(), 1),
            "disk_usage_percent": round(disk_percent(self.disk_path), 1),
        }


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of ``/proc/stat``."""
    try:
        fields = [int(v) for v in STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal; guest time is inside user already.
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in KiB by key (empty when it cannot be read)."""
    info: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in MEMINFO.read_text().splitlines():
            key, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                info[key] = int(rest.split()[0])
    return info


def memory_percent() -> float:
    """Memory in use (not available) in percent."""
    info = meminfo()
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    return 100.0 * (total - available) / total if total else 0.0


def memory_bytes() -> int:
    """The host's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_size(path: Path) -> int:
    """The size in bytes of the file system holding ``path`` (or its nearest existing
    parent)."""
    return shutil.disk_usage(_nearest_existing(path)).total


def disk_percent(path: Path) -> float:
    """How full the file system holding ``path`` (or its nearest existing parent) is."""
    usage = shutil.disk_usage(_nearest_existing(path))
    # shutil's free is what users may still write (f_bavail): df's "Use%" is used/(used+avail).
    room = usage.used + usage.free
    return 100.0 * usage.used / room if room else 0.0


def _nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (a directory not made yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_memory(node: Node) -> None:
    """Refuse to start a node whose ``ram`` (MiB) exceeds the host's available memory.

    Nodes without a ``ram`` property (VPCS) are not checked.

    :raises Conflict: naming the node, what it asks for and what the host has.
    """
    ram = getattr(node.properties, "ram", None)
    if not isinstance(ram, int) or isinstance(ram, bool):
        return
    available_kib = meminfo().get("MemAvailable")
    if available_kib is None:
        return  # the kernel does not say: let the start try
    available = available_kib // 1024
    if ram > available:
        raise Conflict(
            f"node {node.name!r} asks for {ram} MiB of RAM but this compute has only"
            f" {available} MiB available (MemAvailable); stop other nodes, lower its ram,"
            " or place it on another compute"
        )
