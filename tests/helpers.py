"""Small helpers several test files share: pcap reading, process scans, cgroups."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import dpkt

from emucore.cgroups import CgroupError, Hierarchy, find_hierarchy, probe


def icmp_pairs(path: Path) -> set[tuple[str, str, str]]:
    """(kind, source, destination) of every ICMP echo in a pcap, read with dpkt."""
    found = set()
    with path.open("rb") as capture:
        for _, frame in dpkt.pcap.Reader(capture):
            packet = dpkt.ethernet.Ethernet(frame).data
            if isinstance(packet, dpkt.ip.IP) and isinstance(packet.data, dpkt.icmp.ICMP):
                kind = {8: "request", 0: "reply"}.get(packet.data.type)
                if kind:
                    found.add((kind, _dotted(packet.src), _dotted(packet.dst)))
    return found


def _dotted(address: bytes) -> str:
    return ".".join(str(byte) for byte in address)


def processes_mentioning(text: str) -> dict[int, str]:
    """Live (non-zombie) processes, other than this one and pytest runs, whose command line
    contains ``text``: pid → command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if text in cmdline and state != "Z" and "pytest" not in cmdline:
                found[int(entry.name)] = cmdline
    return found


def writable_hierarchy() -> Hierarchy | None:
    """This host's cgroup hierarchy if emu can make groups with a CPU quota in it, else
    ``None`` (not root, read-only, no cpu controller)."""
    try:
        found = find_hierarchy()
        asyncio.run(probe(found))
    except CgroupError:
        return None
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
