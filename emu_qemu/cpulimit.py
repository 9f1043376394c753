"""The cpulimit fallback: CPU throttling by SIGSTOP/SIGCONT where no cgroup can be written.

cpulimit keeps a process within its share by stopping (SIGSTOP) and continuing (SIGCONT)
it. Two hazards come with that, both seen on a loaded host:

* cpulimit can have SIGTERM blocked when it arrives: one was found asleep in a futex with
  SIGTERM pending and blocked, long after its QEMU was gone. So cpulimit gets SIGKILL,
  which cannot be blocked, as its death signal and whenever emu ends it.
* QEMU catches SIGTERM, and a stopped process acts on a caught signal only once continued.
  If cpulimit dies while QEMU is stopped, nothing continues it: a host that died would
  leave that QEMU stopped, its SIGTERM death signal pending forever.

So cpulimit runs under a guard: this module run as a program (``python -m
emu_qemu.cpulimit``), a child of the host with SIGTERM as death signal. The guard opens a
pidfd of QEMU, starts cpulimit (death signal SIGKILL, output in ``cpulimit.log``), prints
cpulimit's pid, and waits for the end: its stdin at end of file (the host closed it, or
died: the kernel closes a dead process's files), SIGTERM, or cpulimit's exit. Then it kills
cpulimit, waits until it is gone, and only then continues QEMU through the pidfd (never a
process that took QEMU's pid since). A guard that is itself killed takes cpulimit along
(SIGKILL death signal); the host then continues QEMU.

The guard's command line names cpulimit, so ``pgrep -f cpulimit`` finds both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from emucore.files import create_file
from emucore.process import Supervised, signal_child, spawn

LOG_NAME = "cpulimit.log"


class CpulimitError(Exception):
    """The guard or cpulimit did not start; the message says what it printed."""


@attrs.define
class Cpulimit:
    """cpulimit throttling a process, under its guard.

    :ivar guard: the guard process, supervised (its stdin is the host's end of the line).
    :ivar pid: cpulimit's pid.
    :ivar percent: the limit, in % of one CPU.
    :ivar pidfd: a pidfd of cpulimit, to see it gone (``None`` once it was).
    """

    guard: Supervised
    pid: int
    percent: int
    pidfd: int | None = None

    async def stop(self, timeout: float = 5.0) -> None:
        """End cpulimit and continue its target; bounded (the guard is killed at worst)."""
        self.guard.stopping = True  # an end asked for, not reported
        if self.guard.process.stdin is not None:
            self.guard.process.stdin.close()
        if await self.guard.wait(timeout) is None:
            await self.guard.stop(grace=1.0)
        await self.gone(timeout)

    async def gone(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until cpulimit itself has exited: then nothing stops the target.

        Its guard may be gone first (killed: cpulimit then dies by its death signal).
        """
        pidfd, self.pidfd = self.pidfd, None
        if pidfd is None:
            return
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), timeout)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)


def limit_for(percent: int) -> int | None:
    """cpulimit's ``-l`` for ``percent`` % of one CPU; ``None`` when it could not bite.

    cpulimit refuses limits above 100 % per CPU of the host, which could not be exceeded.
    """
    cpus = len(os.sched_getaffinity(0))
    return None if percent <= 0 or percent >= 100 * cpus else percent


async def start_cpulimit(
    executable: str,
    target: int,
    percent: int,
    directory: Path,
    timeout: float = 10.0,
    on_exit: Callable[[int], None] | None = None,
) -> Cpulimit:
    """Throttle ``target`` to ``percent`` % of one CPU with cpulimit, under a guard.

    :param executable: the cpulimit binary.
    :param target: the pid to throttle.
    :param percent: cpulimit's ``-l`` (see :func:`limit_for`).
    :param directory: where the guard runs and ``cpulimit.log`` goes.
    :param timeout: seconds the guard gets to report cpulimit's pid.
    :param on_exit: called with the guard's exit code when it ends on its own.
    :raises CpulimitError: the guard did not report a pid.
    """
    command = [executable, "-p", str(target), "-l", str(percent), "-z"]
    argv = [sys.executable, "-m", "emu_qemu.cpulimit", str(target), LOG_NAME, "--", *command]
    guard = await Supervised.start(
        argv,
        cwd=directory,
        output=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE,
        on_exit=on_exit,
    )
    output = guard.process.stdout
    line = b""
    if output is not None:
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(output.readline(), timeout)
    if line.strip().isdigit():
        pid = int(line)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            pidfd = None
        return Cpulimit(guard, pid, percent, pidfd)
    said = line
    if output is not None:
        with contextlib.suppress(TimeoutError):
            said += await asyncio.wait_for(output.read(4000), 1.0)
    await Cpulimit(guard, 0, percent).stop(timeout=1.0)
    text = said.decode(errors="replace").strip() or "nothing"
    raise CpulimitError(f"cpulimit did not start (its guard said: {text[-1000:]})")


# -- the guard, run as ``python -m emu_qemu.cpulimit TARGET LOG -- CPULIMIT_ARGV...`` -------


async def _guard(target: int, log_path: Path, command: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    end = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        loop.add_signal_handler(signum, end.set)

    def stdin_readable() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:  # end of file: the host closed its end, or died
            loop.remove_reader(0)
            end.set()

    loop.add_reader(0, stdin_readable)
    try:
        pidfd = os.pidfd_open(target)
    except ProcessLookupError:
        print(f"process {target} is gone", flush=True)
        return 1
    try:
        with create_file(log_path) as log:  # never through a link planted in the node dir
            cpulimit = await spawn(command, output=log, death_signal=signal.SIGKILL)
        exited = loop.create_task(cpulimit.wait())
        try:
            with contextlib.suppress(OSError):  # a host already gone: the end is near
                print(cpulimit.pid, flush=True)
            ended = loop.create_task(end.wait())
            await asyncio.wait({exited, ended}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
        finally:
            signal_child(cpulimit, signal.SIGKILL)
            await exited  # cpulimit is gone: nothing can stop the target any more
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
    finally:
        os.close(pidfd)
    return 0


def main(argv: Sequence[str]) -> int:
    """The guard's entry point (see the module docstring).

    :param argv: ``TARGET LOG -- CPULIMIT_ARGV...``.
    :return: the exit code.
    """
    if len(argv) < 4 or argv[2] != "--" or not argv[0].isdigit():
        print("usage: python -m emu_qemu.cpulimit TARGET LOG -- CPULIMIT_ARGV...", flush=True)
        return 2
    return asyncio.run(_guard(int(argv[0]), Path(argv[1]), argv[3:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
