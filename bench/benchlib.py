"""What the QEMU benchmarks share: a throwaway lab with the tiny guest, and figures.

Not a benchmark itself. Each ``bench/*.py`` script imports it (the script's directory is on
``sys.path``) and prints ``name: value (meaning)`` lines, one figure per line, so a script
can parse them: ``name`` is ``[a-z_]+``, ``value`` a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from emu_tests.guest import PROMPT, READY_MARKER, TinyGuest, build_tiny_guest
from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.process import signal_child
from emucore.session import Session
from emucore.telnet import ConsoleError, TelnetConsole

QEMU = "/usr/bin/qemu-system-x86_64"


@contextlib.contextmanager
def lab_directory(prefix: str) -> Iterator[Path]:
    """A temporary directory for a project, its images and emu's caches (so a cached base
    check or KVM probe from another run does not change what is measured)."""
    with tempfile.TemporaryDirectory(prefix=f"emu-bench-{prefix}-") as name:
        root = Path(name)
        os.environ["EMU_CACHE_DIR"] = str(root / "cache")
        os.environ["EMU_QEMU_KVM"] = "off"  # KVM hangs guests on the hosts this runs on
        (root / "images").mkdir()
        yield root


def session(root: Path, guest: TinyGuest | None = None, **settings: Any) -> Session:
    """A session on ``root/project`` with ``root/images`` (and the guest's) as image dirs."""
    dirs = [root / "images"]
    if guest is not None:
        dirs += [guest.kernel.parent, guest.initrd.parent]
    host = HostSettings(image_dirs=tuple(dirs), emulators={"qemu": {"kvm": "off"}}, **settings)
    return Session(Project.for_directory(root / "project"), settings=host)


def guest() -> TinyGuest:
    """The tiny guest (built once, then cached)."""
    return build_tiny_guest()


def guest_node(lab: Session, tiny: TinyGuest, name: str, ram: int = 128, **properties: Any) -> Node:
    """A node booting the tiny guest; ``ip`` in ``properties`` sets eth0's address."""
    ip = properties.pop("ip", None)
    description = {
        "name": name,
        "emulator": "qemu",
        "qemu_path": QEMU,
        "ram": ram,
        "adapter_type": "virtio-net-pci",
        "kernel_image": str(tiny.kernel),
        "initrd": str(tiny.initrd),
        "kernel_command_line": tiny.kernel_command_line(ip=ip, hostname=name),
    }
    return lab.add_node(description | properties)


async def shell_answers(node: Node, state: str | None = None, limit: float = 120.0) -> float:
    """Seconds from ``node.start(state=state)`` until the guest's shell answers Enter with
    its prompt (pressed every 0.1 s: a restored guest printed its last prompt long ago).

    :raises TimeoutError: no prompt within ``limit`` seconds.
    """
    began = now()
    await node.start(state=state)
    assert node.console is not None
    console = await TelnetConsole.connect(node.console.host, node.console.port)
    try:
        while True:
            if now() - began > limit:
                raise TimeoutError(f"{node.name}: no shell prompt within {limit:g} s")
            await console.sendline()
            try:
                await console.expect(PROMPT, timeout=0.1)
                return now() - began
            except ConsoleError:
                continue
    finally:
        await console.close()


async def timed_start(node: Node) -> float:
    """Seconds ``node.start()`` takes; the node is stopped afterwards (untimed)."""
    began = now()
    await node.start()
    took = now() - began
    await node.stop()
    return took


def booted(node: Node) -> bool:
    """Whether the guest printed its ready marker (QEMU logs the serial line to a file)."""
    try:
        return READY_MARKER in (node.directory / "console.log").read_text(errors="replace")
    except OSError:
        return False


def rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def median(values: list[float]) -> float:
    return statistics.median(values)


def now() -> float:
    return time.perf_counter()


def figure(name: str, value: float, meaning: str, digits: int = 2) -> None:
    """Print one ``name: value (meaning)`` line."""
    print(f"{name}: {value:.{digits}f} ({meaning})", flush=True)


def load_note() -> str:
    """The host's load average and CPU count, to read the figures against."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


@contextlib.asynccontextmanager
async def bare_qemu(argv: list[str], directory: Path, cont: bool = False) -> Any:
    """QEMU started from ``argv`` without emu: ``asyncio.create_subprocess_exec`` in
    ``directory``, then a ``qemu.qmp`` client connected as soon as the socket accepts
    (polled every 5 ms; emu polls every 10 ms), then ``cont`` if asked. Yields the seconds
    that took; QEMU is killed on the way out."""
    socket_path = directory / "qmp.sock"
    socket_path.unlink(missing_ok=True)
    began = now()
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=directory,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = QMPClient("bare")
    try:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"bare QEMU exited with {process.returncode}")
            if socket_path.exists():
                with contextlib.suppress(ConnectError):  # the file exists before listen()
                    await client.connect(str(socket_path))
                    break
            await asyncio.sleep(0.005)
        if cont:
            await client.execute("cont")
        yield now() - began
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        signal_child(process, signal.SIGKILL)
        await process.wait()
