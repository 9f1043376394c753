"""cpu_throttling with real QEMU and the tiny guest: the cgroup quota and the cpulimit fallback.

Shares are measured, never taken from the setting: CPU seconds by the cgroup's own usage
counter (``cpuacct.usage`` on v1, ``cpu.stat`` on v2), or by QEMU's ``/proc/<pid>/stat``
where there is no cgroup, over a window while the guest busy-loops. The upper bounds are
tight (a quota cannot be exceeded); the lower ones are loose and relative to what the same
guest got unthrottled in the same test, since other work shares this host's CPUs.

Guests boot unthrottled (a live change right after the start) and are throttled once they
busy-loop: a guest at 50 % would take twice as long to boot.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from emu_qemu.contract import qemu_pid
from emu_qemu.cpulimit import start_cpulimit
from emu_qemu.throttle import Throttling, set_cpu_throttling, throttling_of
from emu_tests.console import open_guest_console
from emucore import hookimpl
from emucore.cgroups import Hierarchy, make_group
from emucore.errors import ConfigError, NodeError, NodeStateError
from emucore.hooks import call_each
from emucore.models import HostSettings, NodeEvent, Project
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.helpers import cpu_seconds, processes_mentioning

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]
WINDOW = 4.0  # seconds each share is measured over

pytestmark = pytest.mark.qemu


def with_qemu_settings(settings: HostSettings, **qemu: Any) -> HostSettings:
    """``settings`` with more QEMU settings."""
    emulators = dict(settings.emulators)
    emulators["qemu"] = {**emulators.get("qemu", {}), **qemu}
    return attrs.evolve(settings, emulators=emulators)


def process_state(pid: int) -> str:
    """``R``, ``S``, ``T`` (stopped), ...; ``gone`` when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def share(used: Callable[[], float | None]) -> float:
    """CPU seconds per second over :data:`WINDOW`, by the counter ``used``."""
    before, began = used(), time.monotonic()
    await asyncio.sleep(WINDOW)  # the measurement window
    after, ended = used(), time.monotonic()
    assert before is not None
    assert after is not None
    return (after - before) / (ended - began)


async def busy_guest(node: Node) -> TelnetConsole:
    """The node's guest, booted, running a busy loop in its shell."""
    console = await open_guest_console(node)
    status, output = await console.run("while :; do :; done & true")
    assert status == 0, output
    return console


def cpulimit_of(pid: int) -> dict[int, str]:
    """cpulimit processes aimed at ``pid``, and their guards (their command line names
    cpulimit too)."""
    aimed = processes_mentioning(f" -p {pid} ")
    return {p: line for p, line in aimed.items() if "cpulimit" in line}


async def start_throttled(
    make: NodeFactory, name: str, mechanism: str
) -> tuple[Node, int, Throttling]:
    """A node started at ``cpu_throttling = 50``: it, QEMU's pid, and its throttling, which
    must use ``mechanism``."""
    node = await make(name, cpu_throttling=50)
    pid, state = qemu_pid(node), throttling_of(node)
    assert pid is not None
    assert state is not None
    assert state.mechanism == mechanism
    return node, pid, state


def test_a_busy_guest_gets_the_share_asked_for_and_it_changes_live(
    emu_run: Any, qemu_node: NodeFactory, cgroup_hierarchy: Hierarchy
) -> None:
    async def body() -> None:
        node, pid, state = await start_throttled(qemu_node, "busy", cgroup_hierarchy.label)
        group = state.group
        assert group is not None
        assert group.pids() == [pid]
        await set_cpu_throttling(node, 0)  # boot at full speed
        console = await busy_guest(node)
        free = await share(group.usage)
        await set_cpu_throttling(node, 50)
        assert group.quota_percent() == 50
        half = await share(group.usage)
        await set_cpu_throttling(node, 20)
        fifth = await share(group.usage)
        assert half <= 0.55, (free, half, fifth)
        assert fifth <= 0.23, (free, half, fifth)
        assert half >= 0.6 * min(0.5, free), (free, half, fifth)
        assert fifth >= 0.6 * min(0.2, free), (free, half, fifth)
        assert free >= fifth + 0.15, (free, half, fifth)  # 0 lifted the quota
        # No cpulimit where a cgroup can be written.
        assert state.cpulimit is None
        assert cpulimit_of(pid) == {}
        await console.close()
        await node.stop()
        assert not group.exists()

    emu_run(body())


class SeesQemu:
    """A third party's plain ``emu_started``: it runs before the built-ins' (trylast), so
    it sees where QEMU is before ``qemu.throttle``'s own ``emu_started`` runs."""

    def __init__(self) -> None:
        self.cgroups: list[str] = []

    @hookimpl
    def emu_started(self, node: Node) -> None:
        pid = qemu_pid(node)
        if pid is not None:
            self.cgroups.append(Path(f"/proc/{pid}/cgroup").read_text())


def test_leftover_cgroups_are_removed_at_the_next_start(
    emu_run: Any, qemu_node: NodeFactory, cgroup_hierarchy: Hierarchy, emu_plugin_manager: Any
) -> None:
    sees = SeesQemu()
    emu_plugin_manager.register(sees, "sees-qemu")

    async def body() -> None:
        # A host died, leaving the node's group with a live process in it.
        node = await qemu_node("left", cpu_throttling=50, start=False)
        leftover = await make_group(cgroup_hierarchy, str(node.config.id))
        sleeper = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(600)"
        )
        try:
            leftover.add(sleeper.pid)
            await node.start()
            assert await asyncio.wait_for(sleeper.wait(), 10) == -signal.SIGKILL
        finally:
            if sleeper.returncode is None:
                sleeper.kill()
                await sleeper.wait()
        state = throttling_of(node)
        assert state is not None
        assert state.group is not None
        assert state.group.pids() == [qemu_pid(node)]
        # QEMU was in its group before qemu.throttle's emu_started ran: qemu.process put it
        # there right after the spawn, while its CPUs were still paused.
        assert f":/emu/{node.config.id}\n" in sees.cgroups[0]
        await node.stop()
        assert not state.group.exists()

        # An empty leftover, of a node that starts unthrottled: removed all the same.
        other = await qemu_node("empty", start=False)
        await make_group(cgroup_hierarchy, str(other.config.id))
        await other.start()
        assert not cgroup_hierarchy.group(str(other.config.id)).exists()
        unthrottled = throttling_of(other)
        assert unthrottled is not None
        assert unthrottled.mechanism == ""

    emu_run(body())


class TestWithoutAWritableCgroup:
    """The cpulimit fallback, forced by pointing ``cgroup_root`` at a plain directory.

    Not a fake: the host setting is real, and what follows from it (no cgroup file system
    there, so no group can be made; a warning; cpulimit under its guard; real QEMU, real
    cpulimit) is what a host without a writable cgroup goes through. Such a host cannot be
    had here otherwise: this one runs the tests as root with cgroup v1 mounted read-write.
    """

    @pytest.fixture
    def emu_settings(self, emu_settings: HostSettings, tmp_path: Path) -> HostSettings:
        plain = tmp_path / "not-a-cgroup"
        plain.mkdir()
        return with_qemu_settings(emu_settings, cgroup_root=str(plain))

    def test_cpulimit_throttles_under_its_guard(
        self,
        emu_run: Any,
        emu_session: Session,
        emu_settings: HostSettings,
        qemu_node: NodeFactory,
    ) -> None:
        events: list[NodeEvent] = []
        emu_session.events.subscribe(events.append)

        async def body() -> None:
            node, pid, state = await start_throttled(qemu_node, "fallback", "cpulimit")
            assert any("no cgroup can be used" in e.message for e in events if e.kind == "warning")
            first = state.cpulimit
            assert first is not None
            assert sorted(cpulimit_of(pid)) == sorted([first.guard.pid, first.pid])
            await set_cpu_throttling(node, 0)  # boot at full speed
            assert process_state(first.pid) == "gone"
            assert process_state(first.guard.pid) == "gone"
            assert process_state(pid) != "T"  # not left stopped
            console = await busy_guest(node)
            free = await share(lambda: cpu_seconds(pid))
            await set_cpu_throttling(node, 50)
            second = state.cpulimit
            assert second is not None
            guard = Path(f"/proc/{second.guard.pid}/cmdline").read_bytes().split(b"\0")
            assert b"emu_qemu.cpulimit" in guard
            assert [b"-p", str(pid).encode(), b"-l", b"50", b"-z"] == guard[-6:-1]
            half = await share(lambda: cpu_seconds(pid))
            # cpulimit is coarser than a quota: it stops and continues QEMU by signals.
            assert 0.6 * min(0.5, free) <= half <= 0.65, (free, half)
            # A guard killed behind emu's back: cpulimit dies with it (its death signal), and
            # QEMU is continued and said to run unthrottled.
            with emu_session.events.queue() as queue:
                second.guard.process.kill()
                event = await asyncio.wait_for(queue.get(), 20)
            assert event.kind == "warning"
            assert "cpulimit ended on its own" in event.message
            assert process_state(second.pid) in ("gone", "Z")  # a zombie of another reaper
            assert process_state(pid) != "T"
            assert (state.cpulimit, state.percent) == (None, 0)
            await set_cpu_throttling(node, 50)
            third = state.cpulimit
            assert third is not None
            await console.close()
            await node.stop()
            # Lifted before QEMU was signalled; everything is gone with the node.
            assert [process_state(p) for p in (third.pid, third.guard.pid, pid)] == ["gone"] * 3
            plain = Path(emu_settings.emulators["qemu"]["cgroup_root"])
            assert list(plain.iterdir()) == []  # nothing was written where no cgroup is

        emu_run(body())


def test_a_required_cgroup_that_cannot_be_used_fails_the_start(
    emu_run: Any, emu_project: Project, emu_settings: HostSettings, tmp_path: Path
) -> None:
    settings = with_qemu_settings(
        emu_settings, cpu_throttling_mechanism="cgroup", cgroup_root=str(tmp_path)
    )
    session = Session(emu_project, settings=settings)
    node = session.add_node({"name": "strict", "emulator": "qemu", "cpu_throttling": 10})
    with pytest.raises(NodeError, match=r"node 'strict': cpu_throttling: no cgroup can be used"):
        emu_run(node.start())
    assert qemu_pid(node) is None
    emu_run(session.close())


def test_live_changes_only_on_a_running_node_and_within_range(
    emu_run: Any, emu_session: Session
) -> None:
    node = emu_session.add_node({"name": "idle", "emulator": "qemu"})
    with pytest.raises(NodeStateError, match="only while the node runs"):
        emu_run(set_cpu_throttling(node, 50))
    with pytest.raises(ConfigError, match=r"cpu_throttling: must be 0\.\.800, got 801"):
        emu_run(set_cpu_throttling(node, 801))


def test_emu_check_names_the_mechanism(
    emu_run: Any, emu_settings: HostSettings, cgroup_hierarchy: Hierarchy, tmp_path: Path
) -> None:
    def check(**qemu: Any) -> tuple[bool, str]:
        manager = make_plugin_manager(environ={})
        settings = with_qemu_settings(emu_settings, **qemu)
        results = emu_run(call_each(manager, "emu_check", settings=settings))
        found = [r for batch in results for r in batch if r.subject == "cpu_throttling"]
        assert len(found) == 1
        return found[0].ok, found[0].detail

    assert check() == (True, cgroup_hierarchy.describe("<node id>"))
    assert check(cpu_throttling_mechanism="cpulimit") == (
        True,
        "cpulimit: /usr/bin/cpulimit (cpu_throttling_mechanism = cpulimit)",
    )
    ok, detail = check(cgroup_root=str(tmp_path))
    assert ok
    assert detail.startswith("cpulimit: /usr/bin/cpulimit (no cgroup can be used: ")
    ok, detail = check(cgroup_root=str(tmp_path), cpu_throttling_mechanism="cgroup")
    assert not ok
    assert detail.startswith("cgroup required, but no cgroup can be used")


def test_the_guard_continues_its_target_after_killing_cpulimit(
    emu_run: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        target = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
        try:
            cpulimit = await start_cpulimit("/usr/bin/cpulimit", target.pid, 20, tmp_path)
            assert process_state(cpulimit.pid) != "gone"
            target.send_signal(signal.SIGSTOP)  # as cpulimit does, 80 % of the time here
            await cpulimit.stop()
            assert process_state(cpulimit.pid) == "gone"
            assert cpulimit.guard.process.returncode == 0
            assert process_state(target.pid) == "R"  # continued, by the guard
        finally:
            target.kill()
            await target.wait()

    emu_run(body())
