"""No orphans: the VMs (and their cpulimit and swtpm) die with the host, even when it is
SIGKILLed.

The victims are throttled to 50 % of a CPU, one by its cgroup (where one can be written)
and one by cpulimit under its guard, and each has a TPM (its own swtpm): at the kill, their
guests are booting, so cpulimit is busy stopping and continuing its QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emu_tests.guest import TinyGuest
from emucore.process import reap_pidfile, write_pidfile
from tests.helpers import cpu_seconds, writable_hierarchy

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
    """Start ``count`` throttled nodes in a host process, SIGKILL it, return what survives
    10 s (pids of QEMU, cpulimit and its guard, swtpm). Their cgroups must be empty by then."""
    host = subprocess.Popen(
        [
            sys.executable,
            str(HOLD_NODES),
            str(tmp_path),
            str(guest.kernel),
            str(guest.initrd),
            str(count),
            "--throttle",
            "auto,cpulimit",
            "--tpm",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    groups: list[Path] = []
    pids: list[int] = []
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        groups = [Path(g) for g in host.stdout.readline().split()[1:]]
        mechanisms = host.stdout.readline().split(maxsplit=1)[1].strip().split(",")
        hierarchy = writable_hierarchy()
        expected = [hierarchy.label if hierarchy else "cpulimit", "cpulimit"] * count
        assert mechanisms == expected[:count]  # no cpulimit where a cgroup can be written
        assert len(pids) == 2 * count + 2 * mechanisms.count("cpulimit")
        programs = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in pids]
        assert sum(program.endswith(b"/swtpm") for program in programs) == count
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        survivors = wait_gone(pids, timeout=10)
        reap([pid for pid in pids if pid not in survivors])
        # Their QEMUs died with the host: the groups are empty leftovers for the next start.
        assert all((group / "cgroup.procs").read_text() == "" for group in groups)
        return survivors
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        for pid in pids:  # what survived (the failure the callers assert against) goes too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(pids)
        for group in groups:  # these nodes never start again: remove their leftovers here
            with contextlib.suppress(OSError):
                group.rmdir()


@pytest.fixture
def loaded_host() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two busy loops per CPU, for the length of the test; killed after it, always (and by
    their death signal if pytest itself dies). Issue 12's orphan came on a host at load 10."""
    command = ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(command) for _ in range(2 * len(os.sched_getaffinity(0)))]
    try:
        yield busy
    finally:
        for process in busy:
            process.kill()
            process.wait()


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


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_the_host_twenty_times_on_a_loaded_host(
    tmp_path: Path,
    tiny_guest: TinyGuest,
    qemu_binary: Path,
    loaded_host: list[subprocess.Popen[bytes]],
) -> None:
    began = time.monotonic()
    survivors = [
        run_and_kill_host(tmp_path / str(trial), tiny_guest, count=2) for trial in range(20)
    ]
    assert survivors == [[]] * 20
    # The load was real: each busy loop ran all along, sharing the CPUs with the QEMUs
    # booting in every trial (they got about 40 % of an even share each, here).
    even = (time.monotonic() - began) * len(os.sched_getaffinity(0)) / len(loaded_host)
    assert all(cpu_seconds(busy.pid) > 0.2 * even for busy in loaded_host)


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


def test_a_leftover_that_names_its_files_relatively_is_known_by_its_directory(
    tmp_path: Path,
) -> None:
    """swtpm (and QEMU) run in the node directory and name their files relatively: their
    command line need not hold the marker, their working directory is it."""
    marker = tmp_path / "node-dir"
    marker.mkdir()
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=marker)
    try:
        write_pidfile(tmp_path / "helper.pid", leftover.pid, str(marker))
        assert asyncio.run(reap_pidfile(tmp_path / "helper.pid")) == leftover.pid
        assert leftover.wait(5) == -signal.SIGKILL
    finally:
        leftover.kill()
        leftover.wait()


# A host that spawns two children blocking SIGTERM (as cpulimit was found to), one with each
# death signal, prints their pids, and waits to be killed. Argument: setpriv or preexec.
SPAWNING_HOST = """
import asyncio, signal, sys
import emucore.process
from emucore.process import spawn

if sys.argv[1] == "preexec":
    emucore.process._SETPRIV = None  # the path taken where util-linux's setpriv is missing

BLOCKING = ";".join([
    "import signal, time",
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})",
    "print(1, flush=True)",
    "time.sleep(600)",
])

async def main():
    children = []
    for death_signal in (signal.SIGKILL, signal.SIGTERM):
        argv = [sys.executable, "-c", BLOCKING]
        child = await spawn(argv, output=asyncio.subprocess.PIPE, death_signal=death_signal)
        await child.stdout.readline()  # SIGTERM is blocked now
        children.append(child.pid)
    print(*children, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["setpriv", "preexec"])
def test_a_sigkill_death_signal_ends_a_child_that_blocks_sigterm(how: str) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", SPAWNING_HOST, how], stdout=subprocess.PIPE, text=True
    )
    children: list[int] = []
    try:
        assert host.stdout is not None
        children = [int(pid) for pid in host.stdout.readline().split()]
        assert len(children) == 2, children
        with_sigkill, with_sigterm = children
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        assert wait_gone([with_sigkill], timeout=10) == []
        # The default death signal stays pending in a child that blocks it: the hazard.
        assert wait_gone([with_sigterm], timeout=1) == [with_sigterm]
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{with_sigterm}/status").read_text().splitlines()
        )
        assert int(status["ShdPnd"], 16) & 1 << (signal.SIGTERM - 1)  # pending, as in issue 12
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(children)


def test_terminate_continues_a_stopped_child_so_its_sigterm_handler_runs(emu_run: Any) -> None:
    from emucore.process import spawn, terminate

    handles = ";".join(
        [
            "import signal, sys, time",
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))",
            "print(1, flush=True)",
            "time.sleep(600)",
        ]
    )

    async def body() -> None:
        child = await spawn([sys.executable, "-c", handles], output=asyncio.subprocess.PIPE)
        assert child.stdout is not None
        await child.stdout.readline()  # the handler is in place
        child.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        assert await terminate(child, grace=20) == 3  # its own exit, not the SIGKILL
        assert time.monotonic() - began < 10

    emu_run(body())


def test_terminate_reports_the_real_exit_of_a_child_that_dies_at_once(
    emu_run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM kills ``sleep`` at once; the SIGCONT after it must not reap it behind asyncio's
    child watcher (which then reported 255 and logged "Unknown child process": 8 in 100, and
    this test failed most of its runs before the fix)."""
    from emucore.process import terminate

    async def body() -> list[int | None]:
        codes = []
        for _ in range(300):
            child = await asyncio.create_subprocess_exec("sleep", "600")
            codes.append(await terminate(child, grace=10))
        return codes

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        codes = emu_run(body())
    assert set(codes) == {-signal.SIGTERM}
    assert not [r for r in caplog.records if "Unknown child process" in r.getMessage()]
