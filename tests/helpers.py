"""Small helpers several test files share: pcap reading, process scans, cgroups, images."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import dpkt

from emucore.cgroups import CgroupError, Hierarchy, find_hierarchy, probe
from emucore.telnet import TelnetConsole


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
    contains ``text``: pid → command line.

    A pytest run is recognised by its program (``pytest``, or ``python -m pytest``), not by
    "pytest" anywhere in its command line: every path under pytest's temporary directory
    holds that word, and a QEMU working there is exactly what this looks for.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cmdline = " ".join(argv)
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if text in cmdline and state != "Z" and not _is_pytest(argv):
                found[int(entry.name)] = cmdline
    return found


EMULATOR_PROGRAMS = ("qemu-system", "vpcs", "confine.py", "cpulimit", "swtpm")


def emulators_mentioning(text: str) -> dict[int, str]:
    """Like :func:`processes_mentioning`, but only emulators and their helpers (QEMU, VPCS
    and its launcher, cpulimit, swtpm): a host process (``emu run``, ``emu serve``) naming
    the same directory on its command line is not a leftover."""
    found = {}
    for pid, cmdline in processes_mentioning(text).items():
        programs = [os.path.basename(word) for word in cmdline.split(" ")[:4]]
        if any(word.startswith(EMULATOR_PROGRAMS) for word in programs):
            found[pid] = cmdline
    return found


def _is_pytest(argv: list[str]) -> bool:
    """``pytest ...``, ``python .../pytest ...``, ``python -m pytest ...`` or ``-mpytest``."""
    program = [os.path.basename(word) for word in argv[:3]]
    if program[0].startswith("pytest"):
        return True
    if not program[0].startswith("python") or len(program) < 2:
        return False
    return program[1].startswith(("pytest", "-mpytest")) or program[1:3] == ["-m", "pytest"]


def wait_for_line(stream: IO[str], needle: str, timeout: float) -> str:
    """Read lines from a process pipe until one contains ``needle``; what follows stays in
    the stream.

    A thread reads, not ``select``: select on a buffered text stream blocks while the lines
    already buffered wait (it saw a check start only when the lab stopped, 60 s later).
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in iter(stream.readline, ""):
            lines.put(line)
            if needle in line:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen in {timeout:g} s; got {seen!r}")


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


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, read without a lock (a running QEMU may hold it)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def qcow2_snapshots(image: Path) -> list[str]:
    """The internal snapshots of a qcow2 file, by name, as qemu-img lists them."""
    return [snapshot["name"] for snapshot in qemu_img_info(image).get("snapshots", [])]


async def guest_uptime(console: TelnetConsole) -> float:
    """A tiny guest's uptime in seconds (``/proc/uptime``), read on its shell."""
    status, out = await console.run("cut -d' ' -f1 /proc/uptime")
    assert status == 0, out
    return float(out.split()[-1])
