"""The QEMU process: launch it paused, control it over QMP, stop it for sure.

Start: QEMU runs in the node directory with ``-S`` (CPUs paused) and QMP on ``qmp.sock``;
its stdout and stderr go to ``qemu.log``, which begins with the command line. If a plugin
made a cgroup for the node (:data:`~emucore.cgroups.NODE_CGROUP`, e.g. a CPU quota), QEMU
is put in it at once, before its CPUs run. Once QMP answers, the other pieces act on the
paused machine (``emu_qemu_paused``), then ``cont`` lets the guest run.
A task waits on the process, so an exit is seen at once, not by polling.

Stop: ``on_close = shutdown_signal`` asks the guest to power off (ACPI) and waits
``powerdown_timeout`` seconds; then SIGTERM, wait, SIGKILL, wait. ``power_off`` goes straight
to SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path

import attrs
from qemu.qmp import EventListener

from emu_qemu import positions
from emu_qemu.contract import MONITOR, PID, QemuNode, monitor_of, paused
from emu_qemu.qmp import SOCKET_NAME, Monitor, QmpError
from emucore import hookimpl
from emucore.cgroups import NODE_CGROUP, CgroupError
from emucore.errors import EmulatorExitedError
from emucore.files import create_file
from emucore.process import Supervised, log_tail
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "qemu"

LOG_NAME = "qemu.log"
PIDFILE_NAME = "qemu.pid"
# The log's first line; left out of the tails shown in errors (it can be 40 KB long).
COMMAND_LINE = "emu: command line: "


@attrs.define
class QemuProcess:
    """A running QEMU.

    :ivar supervised: the process, watched (see :class:`emucore.process.Supervised`).
    :ivar events: the task reading QMP events.
    :ivar shutdown_reason: the reason of QEMU's last SHUTDOWN event, if any.
    """

    supervised: Supervised | None = None
    events: asyncio.Task[None] | None = None
    shutdown_reason: str = ""

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.supervised is not None and self.supervised.alive


PROCESS = StashKey[QemuProcess]()


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """``-S`` (start paused) and QMP on a UNIX socket in the node directory; never HMP or TCP."""
    qmp = f"unix:{SOCKET_NAME},server=on,wait=off"
    return [ArgFragment(positions.CONTROL, ["-S", "-qmp", qmp], "qemu.process")]


@hookimpl(trylast=True)
async def emu_start(node: QemuNode, argv: Sequence[str]) -> None:
    """Launch QEMU, connect QMP, release the CPUs."""
    settings = node.emulator_settings
    directory = node.directory
    (directory / SOCKET_NAME).unlink(missing_ok=True)
    log_path = directory / LOG_NAME
    running = node.stash[PROCESS] = QemuProcess()
    with create_file(log_path) as log:
        log.write(COMMAND_LINE + shlex.join(argv) + "\n")
        log.flush()
        running.supervised = process = await Supervised.start(
            argv,
            cwd=directory,
            pidfile=directory / PIDFILE_NAME,
            output=log,
            on_exit=lambda returncode: _exited(node, running, returncode, log_path),
        )
    _join_node_cgroup(node, process.pid)
    node.stash[PID] = process.pid
    try:
        monitor = await Monitor.connect(
            directory / SOCKET_NAME,
            timeout=settings.start_timeout,
            command_timeout=settings.qmp_timeout,
            alive=lambda: running.alive,
        )
    except QmpError as exc:
        raise await _start_failed(node, exc, process, log_path) from None
    node.stash[MONITOR] = monitor
    # Born 0700 under the child's umask 077; 0600 says what it is: read-write, owner only.
    (directory / SOCKET_NAME).chmod(0o600)
    listener = monitor.listener("SHUTDOWN")
    running.events = asyncio.get_running_loop().create_task(_remember_shutdown(running, listener))
    await paused(node)  # e.g. a saved state restored before the guest runs
    try:
        await monitor.execute("cont")
    except QmpError as exc:
        raise await _start_failed(node, exc, process, log_path) from None


def _join_node_cgroup(node: QemuNode, pid: int) -> None:
    # Still paused (-S): the guest never runs outside the group. A failure is left to the
    # plugin that made the group, which checks once QEMU runs.
    group = node.stash.get(NODE_CGROUP, None)
    if group is not None:
        with contextlib.suppress(CgroupError):
            group.add(pid)


async def _start_failed(
    node: QemuNode, exc: Exception, process: Supervised, log_path: Path
) -> EmulatorExitedError:
    # QEMU that failed usually exits within milliseconds: give the exit code a chance.
    returncode = await process.wait(2)
    return EmulatorExitedError(
        node.name, f"QEMU did not start: {exc}", returncode, qemu_log_tail(log_path)
    )


# QEMU warns at every start about each adapter's sink (a hub port without peer, on purpose):
# with many adapters those lines would push the real error out of the log tail.
_SINK_WARNINGS = re.compile(
    r"warning: (hub port sink\d+ has no peer|hub \d+ is not connected to host network"
    r"|netdev sink\d+ has no peer)"
)


def qemu_log_tail(log_path: Path, lines: int = 20) -> str:
    """The end of ``qemu.log`` without its command line and the expected warnings about
    adapter sinks: what QEMU said, not what it was told."""
    text = log_tail(log_path, lines=lines + 4 * 275)
    kept = [
        line
        for line in text.splitlines()
        if not line.startswith(COMMAND_LINE) and not _SINK_WARNINGS.search(line)
    ]
    return "\n".join(kept[-lines:])


async def _remember_shutdown(running: QemuProcess, listener: EventListener) -> None:
    # The exit that follows a guest power-off is not a crash: remember why QEMU shut down.
    with contextlib.suppress(Exception):
        async for event in listener:
            data = event.get("data", {})
            running.shutdown_reason = str(data.get("reason", "")) if isinstance(data, dict) else ""


def _exited(node: QemuNode, running: QemuProcess, returncode: int, log_path: Path) -> None:
    """QEMU ended on its own: a guest power-off, or a crash."""
    node.stash.pop(PID, None)  # the pid is free for reuse now: nobody may signal it
    reason = running.shutdown_reason
    if reason == "guest-shutdown":
        node.emulator_exited(returncode, "", "the guest powered off", kind="info")
    else:
        node.emulator_exited(returncode, qemu_log_tail(log_path))


@hookimpl(trylast=True)
async def emu_stop(node: QemuNode) -> None:
    """Power the guest off (ACPI, bounded) if asked, then terminate QEMU; clean up."""
    running = node.stash.pop(PROCESS, None)
    monitor = node.stash.pop(MONITOR, None)
    node.stash.pop(PID, None)
    process = running.supervised if running is not None else None
    if process is not None:
        process.stopping = True
        if process.alive and monitor is not None and node.properties.on_close == "shutdown_signal":
            await _acpi_shutdown(node, process, monitor)
        grace = node.emulator_settings.terminate_timeout
        was_running = process.alive
        if await process.stop(grace) == -signal.SIGKILL and was_running:
            node.emit(
                "warning",
                f"QEMU did not exit within {grace:g} s of SIGTERM and was killed; a linked clone"
                " it was writing may hold leaked clusters (repaired at the next start)",
            )
    if running is not None and running.events is not None:
        running.events.cancel()
    if monitor is not None:
        await monitor.close()
    (node.directory / SOCKET_NAME).unlink(missing_ok=True)
    (node.directory / PIDFILE_NAME).unlink(missing_ok=True)


async def _acpi_shutdown(node: QemuNode, process: Supervised, monitor: Monitor) -> None:
    timeout = node.emulator_settings.powerdown_timeout
    try:
        await monitor.execute("system_powerdown")
    except QmpError as exc:
        node.emit("warning", f"ACPI shutdown request failed ({exc}); terminating QEMU")
        return
    if await process.wait(timeout) is None:
        node.emit("warning", f"the guest did not power off within {timeout:g} s; terminating QEMU")


@hookimpl(trylast=True)
async def emu_suspend(node: QemuNode) -> None:
    """QMP ``stop``: the guest's CPUs pause."""
    await monitor_of(node).execute("stop")


@hookimpl(trylast=True)
async def emu_resume(node: QemuNode) -> None:
    """QMP ``cont``."""
    await monitor_of(node).execute("cont")


@hookimpl(trylast=True)
async def emu_reload(node: QemuNode) -> None:
    """QMP ``system_reset``, then ``cont`` if the VM was paused."""
    monitor = monitor_of(node)
    await monitor.execute("system_reset")
    status = await monitor.execute("query-status")
    if not status.get("running", False):
        await monitor.execute("cont")
