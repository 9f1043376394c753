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
prompt shows (setting an address takes ~3 s: VPCS checks for a duplicate). A tunnel VPCS
could not open (``Open port N error``: another program bound the port between emu's
choice and VPCS' start) fails the start, where VPCS itself would go on deaf. The process is
watched (:class:`emucore.process.Supervised`), so an exit is seen at once. Stop: SIGTERM
(VPCS does not catch it), a bounded wait, SIGKILL. Suspend and resume are SIGSTOP and
SIGCONT; reload restarts VPCS.

Links: VPCS cannot change its tunnel while it runs, so attaching, replacing or removing the
NIO of a running node, or setting its link down or up, restarts VPCS with the command line
the node calls for now (``vpcs.network`` builds it from the adapter).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from emu_vpcs import positions
from emu_vpcs.properties import VpcsNode
from emu_vpcs.terminal import PROMPT, TERMINAL, Terminal, terminal_of
from emucore import hookimpl
from emucore.errors import EmuError, EmulatorExitedError, NodeStateError
from emucore.models import Nio, NodeStatus, UdpNio
from emucore.process import Supervised
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"

LOG_NAME = "vpcs.log"
PIDFILE_NAME = "vpcs.pid"
LAUNCHER = Path(__file__).with_name("confine.py")

PROCESS = StashKey[Supervised]()


def vpcs_pid(node: VpcsNode) -> int | None:
    """The pid of the node's VPCS while it runs."""
    running = node.stash.get(PROCESS, None)
    return running.pid if running and running.alive else None


def launcher_argv(confine: bool) -> list[str]:
    """The launcher command put in front of VPCS' argv (``-I -S``: no site, no environment)."""
    return [sys.executable, "-I", "-S", str(LAUNCHER), *(["--seccomp"] if confine else [])]


@hookimpl(trylast=True)
def emu_build_args(node: VpcsNode) -> Sequence[ArgFragment]:
    """``-i 1``: one virtual PC, in the foreground (never ``-p``, which forks)."""
    return [ArgFragment(positions.INSTANCES, ("-i", "1"), "vpcs.process")]


@hookimpl(trylast=True)
async def emu_start(node: VpcsNode, argv: Sequence[str]) -> None:
    """Launch VPCS on a new terminal and wait for its prompt."""
    terminal = Terminal(node.directory / LOG_NAME)
    node.stash[TERMINAL] = terminal
    await _launch(node, argv, terminal)


# VPCS reports a tunnel it cannot open, then goes on without it (and answers nothing).
_NO_TUNNEL = re.compile(rb"(?:Open port \d+|Create TAP device \S+) error \[[^\]\r\n]*\]")


async def _launch(node: VpcsNode, argv: Sequence[str], terminal: Terminal) -> Supervised:
    settings = node.emulator_settings
    slave = terminal.open_pty()
    ready = terminal.expect(PROMPT)  # before the spawn: the prompt cannot slip past
    no_tunnel = terminal.expect(_NO_TUNNEL)
    # An exit before the prompt is this launch's failure, raised here and reported once by
    # whoever launched; the watcher reports exits of a VPCS that came up.
    came_up = False

    def exited(returncode: int) -> None:
        if came_up:
            _exited(node, terminal, returncode)

    try:
        try:
            running = await Supervised.start(
                [*launcher_argv(settings.confine), *argv],
                cwd=node.directory,
                pidfile=node.directory / PIDFILE_NAME,
                stdin=slave,
                output=slave,
                on_exit=exited,
            )
        finally:
            # VPCS holds the only slave side now: its exit shows as a hangup.
            os.close(slave)
        node.stash[PROCESS] = running
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
            returncode = await running.wait(2)  # the exit code comes a moment later
            raise EmulatorExitedError(node.name, "VPCS did not start", returncode, terminal.tail())
        if no_tunnel.done() and no_tunnel.result():  # printed before the prompt: seen by now
            await running.stop(settings.stop_timeout)
            raise EmulatorExitedError(
                node.name,
                "VPCS cannot open its tunnel (another program took the port since emu chose"
                " it?); start the node again",
                None,
                terminal.tail(),
            )
        came_up = True
        return running
    finally:
        ready.cancel()
        no_tunnel.cancel()


def _exited(node: VpcsNode, terminal: Terminal, returncode: int) -> None:
    if returncode == 0:
        node.emulator_exited(returncode, "", "VPCS quit (its 'quit' command)", kind="info")
    else:
        node.emulator_exited(returncode, terminal.tail())


async def restart(node: VpcsNode, argv: Sequence[str], reason: str, *, run: bool = False) -> None:
    """End the node's VPCS and start it again with ``argv``, on the same terminal.

    Console clients stay connected and see ``[emu] VPCS restarts: <reason>``. A suspended
    node stays suspended unless ``run``. When the new VPCS does not come up, the node is
    stopped (the core is told through ``node.emulator_exited``) and the error is raised.

    :raises EmulatorExitedError: the new VPCS did not start.
    """
    terminal = terminal_of(node)
    running = node.stash.pop(PROCESS, None)
    if running is not None:
        await running.stop(node.emulator_settings.stop_timeout)
    terminal.note(f"VPCS restarts: {reason}")
    try:
        running = await _launch(node, argv, terminal)
    except EmuError as exc:
        node.emulator_exited(getattr(exc, "returncode", None), terminal.tail(), str(exc))
        raise
    node.argv = list(argv)
    if node.status is NodeStatus.SUSPENDED and not run:
        running.send_signal(signal.SIGSTOP)


@hookimpl(trylast=True)
async def emu_stop(node: VpcsNode) -> None:
    """Terminate VPCS (bounded), close its terminal; the pidfile goes with it."""
    running = node.stash.pop(PROCESS, None)
    if running is not None:
        await running.stop(node.emulator_settings.stop_timeout)
    terminal = node.stash.pop(TERMINAL, None)
    if terminal is not None:
        terminal.close()
    (node.directory / PIDFILE_NAME).unlink(missing_ok=True)


def _signal(node: VpcsNode, number: signal.Signals) -> None:
    running = node.stash.get(PROCESS, None)
    if running is None or not running.alive:
        raise NodeStateError(node.name, "VPCS is not running")
    running.send_signal(number)


@hookimpl(trylast=True)
def emu_suspend(node: VpcsNode) -> None:
    """SIGSTOP: VPCS stops answering (a fatal signal still ends it)."""
    _signal(node, signal.SIGSTOP)


@hookimpl(trylast=True)
def emu_resume(node: VpcsNode) -> None:
    """SIGCONT."""
    _signal(node, signal.SIGCONT)


@hookimpl(trylast=True)
async def emu_reload(node: VpcsNode) -> None:
    """Restart VPCS with the same command line: its startup script runs again."""
    await restart(node, node.argv, "reload", run=True)


# -- links: VPCS cannot change its tunnel while it runs, so a change restarts it -----------


async def _relaunch(node: VpcsNode, reason: str) -> None:
    """Restart VPCS with the command line the node's adapters call for now (the core
    records an adapter's change before calling the hooks), unless it stays the same."""
    argv = node.hooks.build_args(node)
    if argv != node.argv:
        await restart(node, argv, reason)


def _describe(nio: Nio) -> str:
    if isinstance(nio, UdpNio):
        return f"UDP {nio.local_port} -> {nio.remote_host}:{nio.remote_port}"
    return type(nio).__name__


@hookimpl(trylast=True)
async def emu_attach_nio(node: VpcsNode, adapter: int, nio: Nio) -> None:
    """Restart VPCS connected to ``nio`` (to the sink while the link is down)."""
    await _relaunch(node, f"adapter {adapter} connected ({_describe(nio)})")


@hookimpl(trylast=True)
async def emu_update_nio(node: VpcsNode, adapter: int, old: Nio, new: Nio) -> None:
    """Restart VPCS connected to ``new`` (VPCS cannot change its tunnel live)."""
    await _relaunch(node, f"adapter {adapter} relinked ({_describe(new)})")


@hookimpl(trylast=True)
async def emu_detach_nio(node: VpcsNode, adapter: int, nio: Nio) -> None:
    """Restart VPCS sending to the sink."""
    await _relaunch(node, f"adapter {adapter} disconnected")


@hookimpl(trylast=True)
async def emu_set_link(node: VpcsNode, adapter: int, up: bool) -> None:
    """Link down: restart VPCS on the sink, keeping the NIO; link up: back on the NIO."""
    await _relaunch(node, f"adapter {adapter} link {'up' if up else 'down'}")
