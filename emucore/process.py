"""Child processes that cannot outlive their host: spawn, watch, terminate, reap leftovers.

Every emulator or helper process (QEMU, VPCS, cpulimit, swtpm) is started through
:func:`spawn`, and watched as a :class:`Supervised` process:

* the kernel sends it a death signal when the host process dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``, set by util-linux's ``setpriv`` right before it execs the command,
  or by a ``preexec_fn`` where setpriv is missing; it fires when the spawning *thread* ends,
  so spawn from the event loop's thread, which lives as long as the host). SIGTERM by
  default, so an emulator can shut down in order; SIGKILL for a helper that might have
  SIGTERM blocked at that moment (cpulimit was seen stuck so, with SIGTERM pending forever);
* it gets its own session, so a Ctrl-C on the host's terminal reaches the host only and the
  host stops its nodes in order;
* its files are created with mode 0600/0700 (umask 077): QMP sockets, logs, captures;
* a pidfile lets the next start kill a leftover from a host that died before the kernel
  could help (e.g. a reboot of a container without PID namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from emucore.files import read_text, write_atomic

_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _child_setup(parent: int, death_signal: int, libc: Any) -> None:
    """Runs in the child between fork and exec: async-signal-safe calls only."""
    libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    if os.getppid() != parent:  # the host died before prctl took effect
        os._exit(1)
    os.umask(0o077)


# util-linux's setpriv sets the death signal and execs the command (through a one-line shell
# that checks the host is still its parent): no Python code runs in the child, so CPython
# can use vfork instead of copying the host's memory (about 1 ms against 15 ms for a 200 MB
# host at every start). Without setpriv, a preexec_fn does the same job.
_SETPRIV = shutil.which("setpriv")


async def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    output: IO[Any] | int | None = asyncio.subprocess.DEVNULL,
    stdin: int | None = asyncio.subprocess.DEVNULL,
    death_signal: signal.Signals = signal.SIGTERM,
    pass_fds: Sequence[int] = (),
) -> asyncio.subprocess.Process:
    """Start ``argv`` as a child that dies with the host (see the module docstring).

    :param argv: the command line; never a shell string.
    :param cwd: working directory of the child.
    :param output: where stdout and stderr go (a file, ``PIPE`` or ``DEVNULL``).
    :param stdin: the child's stdin (``DEVNULL`` by default).
    :param death_signal: what the kernel sends the child when the host dies: ``SIGTERM``
        (default: the child may shut down in order) or ``SIGKILL`` (it cannot be blocked,
        caught or left pending; for helpers that need no clean exit).
    :param pass_fds: descriptors the child inherits under the same numbers (a socket it
        listens on, bound by the host); every other descriptor is closed.
    """
    common: dict[str, Any] = {
        "pass_fds": tuple(pass_fds),
        "cwd": cwd,
        "stdin": stdin,
        "stdout": output,
        "stderr": asyncio.subprocess.STDOUT if output is not None else None,
        "start_new_session": True,
    }
    if _SETPRIV is not None:
        # The shell closes setpriv's race: a host that died before the death signal was set
        # can no longer send it, so the child checks its parent is still the host, then execs.
        check = 'test "$PPID" = "$1" && shift && exec "$@"'
        name = death_signal.name.removeprefix("SIG")
        command = [_SETPRIV, "--pdeathsig", name, "--", "/bin/sh", "-c", check, "sh"]
        command += [str(os.getpid()), *argv]
        return await asyncio.create_subprocess_exec(*command, umask=0o077, **common)
    libc = _load_libc()
    parent = os.getpid()
    return await asyncio.create_subprocess_exec(
        *argv, preexec_fn=lambda: _child_setup(parent, death_signal, libc), **common
    )


def signal_child(process: asyncio.subprocess.Process, number: int) -> None:
    """Send signal ``number`` to a child that has not exited.

    Not ``Process.send_signal``: it polls first (``waitpid``), and a child that exited a
    moment before is reaped there, behind asyncio's child watcher, which then reports exit
    code 255 and logs "Unknown child process" (seen in 8 of 100 stops: SIGTERM, then SIGCONT
    to a process already gone). ``waitid`` with ``WNOWAIT`` looks without reaping: an exited
    child stays a zombie, its pid not reused, until the watcher collects its real status.
    """
    if process.returncode is not None:
        return
    try:
        if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            os.kill(process.pid, number)
    except (ChildProcessError, ProcessLookupError):
        pass  # already collected by the watcher


async def terminate(process: asyncio.subprocess.Process, grace: float = 5.0) -> int | None:
    """SIGTERM (then SIGCONT), wait up to ``grace`` seconds, then SIGKILL and wait: bounded.

    A stopped process (SIGSTOP, e.g. by a throttling helper) keeps a SIGTERM it handles
    pending until it runs again: the SIGCONT right after lets it act on it.

    :return: the exit code.
    """
    if process.returncode is None:
        signal_child(process, signal.SIGTERM)
        signal_child(process, signal.SIGCONT)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            signal_child(process, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 10)
    return process.returncode


def write_pidfile(path: Path, pid: int, marker: str) -> None:
    """Record ``pid`` with a ``marker`` that must appear in its command line to be ours
    (never through a link planted at ``path``)."""
    write_atomic(path, f"{pid}\n{marker}\n")


async def reap_pidfile(path: Path, timeout: float = 5.0) -> int | None:
    """Kill the process a leftover pidfile names if it is still ours; remove the file.

    The marker (e.g. the node's directory) guards against killing an unrelated process
    that reused the pid: it must appear in the process's command line, or be its working
    directory (children that name their files relatively). Waits (bounded) until the
    process is gone, so its ports are free.

    :return: the pid killed, if any.
    """
    try:
        pid_text, marker = read_text(path, 4096).split("\n")[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None

    def ours(pid: int) -> bool:
        return marker in _cmdline(pid) or _cwd(pid) == marker

    killed = None
    if marker and ours(pid):
        with contextlib.suppress(ProcessLookupError):
            killed = await kill_and_wait(pid, timeout, ours)  # checked again once held
    path.unlink(missing_ok=True)
    return killed


async def kill_and_wait(
    pid: int, timeout: float, still_ours: Callable[[int], bool] | None = None
) -> int:
    """SIGKILL a process that is not our child and wait (bounded) until it is gone.

    :param pid: the process; its pidfd is opened first, so a reused pid is never signalled
        after the wait.
    :param timeout: seconds to wait for the exit.
    :param still_ours: asked with ``pid`` once the pidfd holds the process: whether it is
        still the one meant (the pid may have been reused since it was read); ``False``
        spares it.
    :return: ``pid``.
    :raises ProcessLookupError: there is no such process, or ``still_ours`` said no.
    """
    pidfd = os.pidfd_open(pid)
    try:
        if still_ours is not None and not still_ours(pid):
            raise ProcessLookupError(pid, "no longer the process meant")
        gone = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, gone.set)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), timeout)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    return pid


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - max(16384, lines * 256)))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


ExitHandler = Callable[[int], None]


class Supervised:
    """A child that dies with the host and is watched: the one shape of every emulator and
    helper process (QEMU, VPCS, cpulimit's guard, swtpm).

    :meth:`start` reaps a leftover named by the pidfile, spawns (:func:`spawn`), records the
    pid, and starts a task that waits for the exit: an exit nobody asked for is reported at
    once to ``on_exit`` (never by polling). :meth:`stop` is bounded and final
    (:func:`terminate`) and removes the pidfile.

    :ivar process: the asyncio process.
    :ivar pidfile: where its pid is recorded, if anywhere.
    :ivar stopping: set by :meth:`stop`; the exit it causes is not reported.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        pidfile: Path | None,
        on_exit: ExitHandler | None,
    ) -> None:
        """Use :meth:`start`."""
        self.process = process
        self.pidfile = pidfile
        self.stopping = False
        self._on_exit = on_exit
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        pidfile: Path | None = None,
        output: IO[Any] | int | None = asyncio.subprocess.DEVNULL,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        death_signal: signal.Signals = signal.SIGTERM,
        pass_fds: Sequence[int] = (),
        on_exit: ExitHandler | None = None,
    ) -> Supervised:
        """Start ``argv`` (see :func:`spawn` for ``cwd``, ``output``, ``stdin``,
        ``death_signal`` and ``pass_fds``).

        :param pidfile: kill a leftover it names (a host that died before the kernel could
            help), then record the new pid there, marked with ``cwd``.
        :param on_exit: called with the exit code when the process ends on its own.
        """
        if pidfile is not None:
            await reap_pidfile(pidfile)
        process = await spawn(
            argv,
            cwd=cwd,
            output=output,
            stdin=stdin,
            death_signal=death_signal,
            pass_fds=pass_fds,
        )
        if pidfile is not None:
            try:
                write_pidfile(pidfile, process.pid, str(cwd or ""))
            except BaseException:
                # Nothing would be left to stop it: a read-only or full disk ends the child here.
                await asyncio.shield(terminate(process))
                raise
        return cls(process, pidfile, on_exit)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.returncode is None

    async def _watch(self) -> None:
        returncode = await self.process.wait()
        if not self.stopping and self._on_exit is not None:
            self._on_exit(returncode)

    async def wait(self, timeout: float) -> int | None:
        """Wait at most ``timeout`` seconds for the exit; the exit code, or ``None``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)
        return self.process.returncode

    def send_signal(self, number: signal.Signals) -> None:
        """Send ``number`` if the process still runs."""
        signal_child(self.process, number)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL: bounded and final; the exit is
        not reported. Removes the pidfile.

        :return: the exit code.
        """
        self.stopping = True
        returncode = await terminate(self.process, grace)
        # Wait for the watcher without awaiting it: a cancel aimed at the caller must reach
        # the caller, not be swallowed here (nor cancel the watcher).
        await asyncio.wait({self._watcher})
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        return returncode
