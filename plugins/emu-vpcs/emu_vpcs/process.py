"""The VPCS process: in the foreground on a pty the host holds, confined, tied to the host.

GNS3 runs ``vpcs -p PORT``, a daemon that forks: the child that stays is not the child the
host spawned, so it does not inherit ``PR_SET_PDEATHSIG`` and survives a SIGKILLed host.
Here VPCS runs in the foreground (no ``-p``) with a pty as its terminal (see
:mod:`emu_vpcs.terminal`), and four things take it down with the host:

1. the death signal: it is spawned through :func:`emucore.process.spawn`, and the launcher
   (:mod:`emu_vpcs.confine`) *execs* VPCS, so the process that has the signal is VPCS itself;
2. its controlling terminal is the host's pty: when the host dies the master side closes and
   the kernel sends SIGHUP;
3. the seccomp filter of the launcher: VPCS cannot create processes, so nothing below it
   could be orphaned (and its ``!`` command cannot run host commands);
4. a pidfile in the node directory: the next start kills a leftover from a host that died
   before the kernel could help.

Start: VPCS runs the startup script, then shows its prompt; the node is started when the
prompt shows (setting an address takes ~3 s: VPCS checks for a duplicate). A task waits on
the process, so an exit is seen at once. Stop: SIGTERM (VPCS does not catch it), a bounded
wait, SIGKILL. Suspend and resume are SIGSTOP and SIGCONT; reload restarts VPCS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from emu_vpcs import positions
from emu_vpcs.binary import settings_of
from emu_vpcs.terminal import PROMPT, Terminal
from emucore import hookimpl
from emucore.errors import EmuError, EmulatorExitedError, NodeStateError
from emucore.models import NodeStatus
from emucore.node import Node
from emucore.process import reap_pidfile, spawn, terminate, write_pidfile
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"

LOG_NAME = "vpcs.log"
PIDFILE_NAME = "vpcs.pid"
LAUNCHER = Path(__file__).with_name("confine.py")


@attrs.define
class VpcsProcess:
    """A running VPCS.

    :ivar process: the asyncio process.
    :ivar watcher: the task waiting for its exit.
    :ivar stopping: set when emu ends it, so its exit is not reported as a crash.
    """

    process: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.returncode is None


PROCESS = StashKey[VpcsProcess]()
TERMINAL = StashKey[Terminal]()


def vpcs_pid(node: Node) -> int | None:
    """The pid of the node's VPCS while it runs."""
    running = node.stash.get(PROCESS, None)
    return running.process.pid if running and running.alive else None


def terminal_of(node: Node) -> Terminal:
    """The node's terminal (while it runs).

    :raises NodeStateError: the node is not running.
    """
    terminal = node.stash.get(TERMINAL, None)
    if terminal is None:
        raise NodeStateError(node.name, "VPCS is not running")
    return terminal


def launcher_argv(confine: bool) -> list[str]:
    """The launcher command put in front of VPCS' argv (``-I -S``: no site, no environment)."""
    return [sys.executable, "-I", "-S", str(LAUNCHER), *(["--seccomp"] if confine else [])]


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """``-i 1``: one virtual PC, in the foreground (never ``-p``, which forks)."""
    return [ArgFragment(positions.INSTANCES, ("-i", "1"), "vpcs.process")]


@hookimpl(trylast=True)
async def emu_start(node: Node, argv: Sequence[str]) -> None:
    """Launch VPCS on a new terminal and wait for its prompt."""
    terminal = Terminal(node.directory / LOG_NAME)
    node.stash[TERMINAL] = terminal
    await _launch(node, argv, terminal)


async def _launch(node: Node, argv: Sequence[str], terminal: Terminal) -> VpcsProcess:
    settings = settings_of(node)
    await reap_pidfile(node.directory / PIDFILE_NAME)
    slave = terminal.open_pty()
    ready = terminal.expect(PROMPT)  # before the spawn: the prompt cannot slip past
    try:
        try:
            process = await spawn(
                [*launcher_argv(settings.confine), *argv],
                cwd=node.directory,
                stdin=slave,
                output=slave,
            )
        finally:
            # VPCS holds the only slave side now: its exit shows as a hangup.
            os.close(slave)
        write_pidfile(node.directory / PIDFILE_NAME, process.pid, str(node.directory))
        running = VpcsProcess(process)
        node.stash[PROCESS] = running
        running.watcher = asyncio.get_running_loop().create_task(_watch(node, running, terminal))
        try:
            shown = await asyncio.wait_for(ready, settings.start_timeout)
        except TimeoutError:
            raise EmulatorExitedError(
                node.name,
                f"VPCS showed no prompt within {settings.start_timeout:g} s"
                " (does the startup script wait for something?)",
                None,
                terminal.tail(),
            ) from None
        if not shown:
            with contextlib.suppress(TimeoutError):  # the exit code comes a moment later
                await asyncio.wait_for(process.wait(), 2)
            raise EmulatorExitedError(
                node.name, "VPCS did not start", process.returncode, terminal.tail()
            )
        return running
    finally:
        ready.cancel()


async def _watch(node: Node, running: VpcsProcess, terminal: Terminal) -> None:
    returncode = await running.process.wait()
    if running.stopping:
        return
    if returncode == 0:
        node.emulator_exited(returncode, "", "VPCS quit (its 'quit' command)", kind="info")
    else:
        node.emulator_exited(returncode, terminal.tail())


async def _end(node: Node, running: VpcsProcess) -> None:
    running.stopping = True
    await terminate(running.process, grace=settings_of(node).stop_timeout)
    if running.watcher is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await running.watcher


async def restart(node: Node, argv: Sequence[str], reason: str, *, run: bool = False) -> None:
    """End the node's VPCS and start it again with ``argv``, on the same terminal.

    Console clients stay connected and see ``[emu] VPCS restarts: <reason>``. A suspended
    node stays suspended unless ``run``. When the new VPCS does not come up, the node is
    stopped (the core is told through ``node.emulator_exited``) and the error is raised.

    :raises EmulatorExitedError: the new VPCS did not start.
    """
    terminal = terminal_of(node)
    running = node.stash.pop(PROCESS, None)
    if running is not None:
        await _end(node, running)
    terminal.note(f"VPCS restarts: {reason}")
    try:
        running = await _launch(node, argv, terminal)
    except EmuError as exc:
        failed = node.stash.get(PROCESS, None)
        if failed is not None:
            failed.stopping = True  # reported here, once, not again by its watcher
        node.emulator_exited(getattr(exc, "returncode", None), terminal.tail(), str(exc))
        raise
    node.argv = list(argv)
    if node.status is NodeStatus.SUSPENDED and not run:
        running.process.send_signal(signal.SIGSTOP)


@hookimpl(trylast=True)
async def emu_stop(node: Node) -> None:
    """Terminate VPCS (bounded), close its terminal, remove the pidfile."""
    running = node.stash.pop(PROCESS, None)
    if running is not None:
        await _end(node, running)
    terminal = node.stash.pop(TERMINAL, None)
    if terminal is not None:
        terminal.close()
    (node.directory / PIDFILE_NAME).unlink(missing_ok=True)


def _signal(node: Node, number: signal.Signals) -> None:
    running = node.stash.get(PROCESS, None)
    if running is None or not running.alive:
        raise NodeStateError(node.name, "VPCS is not running")
    running.process.send_signal(number)


@hookimpl(trylast=True)
def emu_suspend(node: Node) -> None:
    """SIGSTOP: VPCS stops answering (a fatal signal still ends it)."""
    _signal(node, signal.SIGSTOP)


@hookimpl(trylast=True)
def emu_resume(node: Node) -> None:
    """SIGCONT."""
    _signal(node, signal.SIGCONT)


@hookimpl(trylast=True)
async def emu_reload(node: Node) -> None:
    """Restart VPCS with the same command line: its startup script runs again."""
    await restart(node, node.argv, "reload", run=True)
