"""No orphans: the VMs (and their cpulimit) die with the host, even when it is SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emu_tests.guest import TinyGuest
from emucore.process import reap_pidfile, write_pidfile

HOLD_NODES = Path(__file__).with_name("hold_nodes.py")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` seconds (pidfds: no polling of /proc)."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture(autouse=True)
def adopt_orphans() -> None:
    """Become the subreaper of what the killed host leaves, so its dead children are reaped
    here instead of lingering as zombies under a container init that may never reap them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def run_and_kill_host(tmp_path: Path, guest: TinyGuest, count: int) -> list[int]:
    host = subprocess.Popen(
        [
            sys.executable,
            str(HOLD_NODES),
            str(tmp_path),
            str(guest.kernel),
            str(guest.initrd),
            str(count),
            "--throttle",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2 * count
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        survivors = wait_gone(pids, timeout=10)
        reap([pid for pid in pids if pid not in survivors])
        return survivors
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


@pytest.mark.qemu
def test_sigkill_of_the_host_takes_its_vms_and_cpulimits_along(
    tmp_path: Path, tiny_guest: TinyGuest, qemu_binary: Path
) -> None:
    assert run_and_kill_host(tmp_path, tiny_guest, count=2) == []


@pytest.mark.qemu
@pytest.mark.slow
def test_sigkill_of_the_host_twenty_times(
    tmp_path: Path, tiny_guest: TinyGuest, qemu_binary: Path
) -> None:
    survivors = [
        run_and_kill_host(tmp_path / str(trial), tiny_guest, count=2) for trial in range(20)
    ]
    assert survivors == [[]] * 20


def test_a_leftover_named_by_a_pidfile_is_reaped(tmp_path: Path, emu_run: object) -> None:
    marker = str(tmp_path / "node-dir")
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_pidfile(tmp_path / "mine.pid", leftover.pid, marker)
        write_pidfile(tmp_path / "other.pid", unrelated.pid, marker)  # pid reused by a stranger
        import asyncio

        assert asyncio.run(reap_pidfile(tmp_path / "mine.pid")) == leftover.pid
        assert leftover.wait(5) == -signal.SIGKILL
        assert asyncio.run(reap_pidfile(tmp_path / "other.pid")) is None
        assert unrelated.poll() is None  # not ours: left alone
        assert not (tmp_path / "mine.pid").exists()
    finally:
        for process in (leftover, unrelated):
            process.kill()
            process.wait()
