"""CPU throttling: ``cpu_throttling`` percent of one host CPU, as the kernel's CPU quota.

The mechanism, chosen at each start (``emu check`` says which this host uses):

* **a cgroup per node**, ``<hierarchy>/emu/<node id>`` (:mod:`emucore.cgroups`): cgroup
  v2's ``cpu.max`` where its cpu controller is available, else cgroup v1's
  ``cpu.cfs_quota_us``. The scheduler enforces it: no helper process, no stopped guest,
  nothing to leak. The group is made in ``emu_prepare``, before QEMU exists, and QEMU
  enters it right after its spawn while its CPUs are still paused (``-S``): ``qemu.process``
  adds it through :data:`~emucore.cgroups.NODE_CGROUP`, and ``emu_started`` makes sure.
* **cpulimit** (:mod:`emu_qemu.cpulimit`) where no cgroup can be written (not root, a
  read-only cgroup file system, no cpu controller), with a warning event.

``emu_stop`` is ``tryfirst``: the throttling is lifted before anything signals QEMU. QEMU
goes back to the host's own cgroup and the node's group is removed, or cpulimit is killed
and QEMU continued; so a SIGTERM never waits on a stopped QEMU and a low quota never slows
a stop down. A group left by a host that died (its QEMU died with it) is removed at the
node's next start, killing what is still in it. :func:`set_cpu_throttling` changes the
share while the node runs, and so does a change of the running node's ``cpu_throttling``
(``Session.update_node``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

import attrs

from emu_qemu.contract import QemuNode, qemu_pid
from emu_qemu.cpulimit import Cpulimit, CpulimitError, limit_for, start_cpulimit
from emu_qemu.properties import QemuProperties, QemuSettings, host_qemu_settings
from emucore import hookimpl
from emucore.cgroups import (
    NODE_CGROUP,
    CgroupError,
    CpuGroup,
    Hierarchy,
    find_hierarchy,
    make_group,
    probe,
)
from emucore.errors import ConfigError, EmuError, NodeError, NodeStateError
from emucore.models import HostSettings, NodeStatus
from emucore.records import CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"

MAX_PERCENT = 800


@attrs.define
class Throttling:
    """The CPU throttling of a started node.

    :ivar percent: the share in force, in % of one CPU (0: none).
    :ivar mechanism: ``cgroup v2``, ``cgroup v1`` or ``cpulimit``; ``""`` until one was needed.
    :ivar group: the node's cgroup (cgroup mechanisms).
    :ivar cpulimit: cpulimit under its guard (cpulimit mechanism, while it limits).
    :ivar ended: set when the node stops; the throttling cannot change any more.
    """

    percent: int
    mechanism: str = ""
    group: CpuGroup | None = None
    cpulimit: Cpulimit | None = None
    ended: bool = False
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, repr=False)
    watcher: asyncio.Task[None] | None = attrs.field(default=None, repr=False)


THROTTLING = StashKey[Throttling]()


def throttling_of(node: QemuNode) -> Throttling | None:
    """The throttling state of a started QEMU node (``None`` when stopped)."""
    return node.stash.get(THROTTLING, None)


def _hierarchy(settings: QemuSettings) -> Hierarchy:
    return find_hierarchy(Path(settings.cgroup_root) if settings.cgroup_root else None)


@hookimpl(trylast=True)
async def emu_prepare(node: QemuNode) -> None:
    """Remove the node's leftover cgroup; make its group, with the quota, before QEMU runs."""
    if node.status is not NodeStatus.STARTING:  # a dry run or disk preparation
        return
    settings = node.emulator_settings
    state = Throttling(node.properties.cpu_throttling)
    node.stash[THROTTLING] = state
    with contextlib.suppress(CgroupError):
        killed = await _hierarchy(settings).group(str(node.config.id)).remove()
        if killed:
            node.emit("info", f"killed processes left in the node's cgroup: {killed}")
    if state.percent:
        await _choose(node, state, settings)


async def _choose(node: QemuNode, state: Throttling, settings: QemuSettings) -> None:
    """Pick the mechanism: the node's cgroup, with the quota set, else cpulimit."""
    wanted = settings.cpu_throttling_mechanism
    if wanted != "cpulimit":
        try:
            hierarchy = _hierarchy(settings)
            group = await make_group(hierarchy, str(node.config.id))
            try:
                group.set_quota(state.percent)
            except CgroupError:
                await group.remove()
                raise
        except CgroupError as exc:
            if wanted == "cgroup":
                raise NodeError(
                    node.name, f"cpu_throttling: no cgroup can be used ({exc}); see emu check"
                ) from None
            node.emit("warning", f"cpu_throttling: no cgroup can be used ({exc}); using cpulimit")
        else:
            state.group, state.mechanism = group, hierarchy.label
            node.stash[NODE_CGROUP] = group
            return
    state.mechanism = "cpulimit"
    _cpulimit_binary(node)  # fail before QEMU starts


def _cpulimit_binary(node: QemuNode) -> str:
    found = shutil.which("cpulimit")
    if found is None:
        raise NodeError(
            node.name,
            "cpu_throttling: no cgroup can be used here and cpulimit is not installed"
            " (Debian: apt-get install cpulimit)",
        )
    return found


@hookimpl(trylast=True)
async def emu_started(node: QemuNode) -> None:
    """Make sure QEMU is in the node's cgroup, or start cpulimit on it."""
    state = node.stash.get(THROTTLING, None)
    pid = qemu_pid(node)
    if state is None or pid is None or not state.percent:
        return
    async with state.lock:
        await _enforce(node, state, pid)


async def _enforce(node: QemuNode, state: Throttling, pid: int) -> None:
    """Apply ``state.percent`` to QEMU with the mechanism chosen."""
    if state.group is not None:
        try:
            state.group.set_quota(state.percent)
            state.group.add(pid)  # a no-op when qemu.process put it there already
            return
        except CgroupError as exc:
            if node.emulator_settings.cpu_throttling_mechanism == "cgroup":
                raise NodeError(node.name, f"cpu_throttling: {exc}") from None
            node.emit("warning", f"cpu_throttling: {exc}; using cpulimit")
            group, state.group = state.group, None
            node.stash.pop(NODE_CGROUP, None)
            with contextlib.suppress(CgroupError):
                await group.dissolve()
            state.mechanism = "cpulimit"
    if state.mechanism == "cpulimit":
        await _start_cpulimit(node, state, pid)


async def _start_cpulimit(node: QemuNode, state: Throttling, pid: int) -> None:
    limit = limit_for(state.percent)
    if limit is None:  # at least every CPU of the host: nothing to limit
        return
    started: list[Cpulimit] = []  # the guard may end before start_cpulimit returns

    def guard_exited(returncode: int) -> None:
        if started:
            ended = _ended(node, state, started[0], returncode)
            state.watcher = asyncio.get_running_loop().create_task(ended)

    try:
        cpulimit = await start_cpulimit(
            _cpulimit_binary(node), pid, limit, node.directory, on_exit=guard_exited
        )
    except CpulimitError as exc:
        raise NodeError(node.name, f"cpu_throttling: {exc}") from None
    started.append(cpulimit)
    state.cpulimit = cpulimit


async def _stop_cpulimit(node: QemuNode, state: Throttling) -> None:
    cpulimit, state.cpulimit = state.cpulimit, None
    watcher, state.watcher = state.watcher, None
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if cpulimit is not None:
        await cpulimit.stop()
        _continue(node)


def _continue(node: QemuNode) -> None:
    # The guard continued QEMU already; this covers a guard that was killed.
    pid = qemu_pid(node)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def _ended(node: QemuNode, state: Throttling, cpulimit: Cpulimit, returncode: int) -> None:
    """cpulimit's guard ended on its own (killed behind emu's back)."""
    if state.cpulimit is not cpulimit:
        return
    state.cpulimit, state.percent = None, 0
    await cpulimit.gone()  # a killed guard's cpulimit dies by its death signal, maybe later
    _continue(node)
    if qemu_pid(node) is not None:  # QEMU runs on: say it is no longer throttled
        node.emit(
            "warning",
            f"cpu_throttling: cpulimit ended on its own (exit code {returncode}, see"
            " cpulimit.log); QEMU runs unthrottled",
        )


@hookimpl(tryfirst=True)
async def emu_stop(node: QemuNode) -> None:
    """Lift the throttling before anything signals QEMU: out of its cgroup (which is
    removed), or cpulimit killed and QEMU continued. ``tryfirst`` on purpose."""
    state = node.stash.pop(THROTTLING, None)
    node.stash.pop(NODE_CGROUP, None)
    if state is None:
        return
    async with state.lock:
        state.ended = True
        await _stop_cpulimit(node, state)
        if state.group is not None:
            try:
                await state.group.dissolve()
            except CgroupError as exc:
                with contextlib.suppress(CgroupError):
                    state.group.set_quota(0)
                node.emit(
                    "warning",
                    f"cpu_throttling: the node's cgroup stays until its next start ({exc})",
                )


@hookimpl(trylast=True)
def emu_live_properties(node: QemuNode) -> list[str]:
    """``cpu_throttling`` changes while the node runs."""
    return ["cpu_throttling"]


@hookimpl(trylast=True)
async def emu_update_running(
    node: QemuNode, previous: QemuProperties, changed: frozenset[str]
) -> None:
    """Apply a new ``cpu_throttling`` at once (:func:`set_cpu_throttling`)."""
    if "cpu_throttling" in changed:
        await set_cpu_throttling(node, node.properties.cpu_throttling)


async def set_cpu_throttling(node: QemuNode, percent: int) -> None:
    """Change the CPU throttling of a running QEMU node now, without a restart.

    The node's description keeps its ``cpu_throttling``, which the next start uses again.
    With a cgroup the new quota is written; with cpulimit, cpulimit is restarted. A node
    that started unthrottled gets its mechanism chosen now.

    :param node: a started or suspended QEMU node.
    :param percent: percent of one host CPU, 0–800; 0 lifts the throttling.
    :raises ConfigError: ``percent`` is out of range.
    :raises NodeStateError: the node does not run.
    :raises NodeError: the share could not be applied (say, cpulimit is missing).
    """
    if not 0 <= percent <= MAX_PERCENT:
        raise ConfigError(node.name, [f"$.cpu_throttling: must be 0..800, got {percent}"])
    state = node.stash.get(THROTTLING, None)
    if state is None or not node.is_running:
        raise NodeStateError(node.name, "cpu_throttling changes live only while the node runs")
    async with state.lock:
        pid = qemu_pid(node)
        if state.ended or pid is None:
            raise NodeStateError(node.name, "cpu_throttling changes live only while it runs")
        previous, state.percent = state.percent, percent
        try:
            await _change(node, state, pid)
        except BaseException:
            # What is in force now: the group's former quota, or none once cpulimit stopped.
            state.percent = previous if state.group is not None else 0
            raise


async def _change(node: QemuNode, state: Throttling, pid: int) -> None:
    if state.cpulimit is not None:
        await _stop_cpulimit(node, state)
    if state.group is not None:
        try:
            state.group.set_quota(state.percent)
        except CgroupError as exc:
            raise NodeError(node.name, f"cpu_throttling: {exc}") from None
        return
    if state.percent and not state.mechanism:
        await _choose(node, state, node.emulator_settings)
    if state.percent:
        await _enforce(node, state, pid)


@hookimpl
async def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Say how ``cpu_throttling`` is enforced here: cgroup v2, cgroup v1, cpulimit or not."""
    subject = "cpu_throttling"
    try:
        qemu_settings = host_qemu_settings(settings)
    except EmuError as exc:
        return [CheckResult(subject, False, str(exc))]
    cpulimit = shutil.which("cpulimit")
    wanted = qemu_settings.cpu_throttling_mechanism
    reason = "cpu_throttling_mechanism = cpulimit"
    if wanted != "cpulimit":
        try:
            hierarchy = _hierarchy(qemu_settings)
            await probe(hierarchy)
            return [CheckResult(subject, True, hierarchy.describe("<node id>"))]
        except CgroupError as exc:
            reason = f"no cgroup can be used: {exc}"
        if wanted == "cgroup":
            return [CheckResult(subject, False, f"cgroup required, but {reason}")]
    if cpulimit is None:
        return [CheckResult(subject, False, f"none: {reason}; apt-get install cpulimit")]
    return [CheckResult(subject, True, f"cpulimit: {cpulimit} ({reason})")]
