"""The node runtime: state machine, one lock per node, events, NIOs and captures.

These tests drive the core with the toy emulator of ``toy_emulator.py`` (no process behind
it); the same state machine under real QEMU is tested in test_qemu_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emucore.errors import CaptureUnsupportedError, NodeError, NodeStateError
from emucore.files import UnsafePathError
from emucore.models import NodeEvent, NodeStatus, Project, TapNio, UdpNio
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.session import Session
from tests.toy_emulator import make_toy

S = NodeStatus


def run(
    work: Callable[[Session, Node, Any], Awaitable[None]], tmp_path: Path, delay: float = 0.0
) -> tuple[Any, list[NodeEvent]]:
    toy = make_toy("toy", delay=delay)
    manager = make_plugin_manager(entry_points=False, plugins=[("toy", toy)])
    session = Session(Project.for_directory(tmp_path), plugins=manager)
    events: list[NodeEvent] = []
    session.events.subscribe(events.append)
    node = session.add_node({"name": "n1", "emulator": "toy", "adapters": 2})

    async def main() -> None:
        try:
            await work(session, node, toy)
        finally:
            await session.close()

    asyncio.run(main())
    return toy, events


def statuses(events: list[NodeEvent]) -> list[str]:
    return [e.status.value for e in events if e.kind == "status"]


def test_start_stop_and_the_events_they_publish(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.start()
        assert node.status is S.STARTED
        assert node.directory.is_dir()
        assert node.directory.is_relative_to(tmp_path)
        await node.start()  # no-op
        await node.stop()
        await node.stop()  # no-op
        assert node.status is S.STOPPED

    toy, events = run(work, tmp_path)
    assert statuses(events) == ["starting", "started", "stopping", "stopped"]
    assert [name for name, _ in toy.calls] == ["build_args", "start", "started", "stop", "close"]


def test_suspend_resume_reload_rules(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        with pytest.raises(NodeStateError, match="cannot suspend: the node is stopped"):
            await node.suspend()
        with pytest.raises(NodeStateError, match="cannot reload"):
            await node.reload()
        await node.start()
        await node.resume()  # started already: no-op
        await node.suspend()
        await node.suspend()  # no-op
        assert node.status is S.SUSPENDED
        await node.start()  # a start resumes a suspended node
        assert node.status is S.STARTED
        await node.suspend()
        await node.reload()  # reload runs afterwards
        assert node.status is S.STARTED

    toy, _ = run(work, tmp_path)
    assert [n for n, _ in toy.calls if n in ("suspend", "resume", "reload")] == [
        "suspend",
        "resume",
        "suspend",
        "reload",
    ]


def test_a_failing_start_cleans_up_and_names_the_node(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        toy.failures["started"] = RuntimeError("console port unknown")
        with pytest.raises(NodeError, match="node 'n1': start failed: console port unknown"):
            await node.start()
        assert node.status is S.STOPPED
        del toy.failures["started"]
        await node.start()  # and it can start again
        assert node.status is S.STARTED

    toy, events = run(work, tmp_path)
    assert [n for n, _ in toy.calls][:4] == ["build_args", "start", "started", "stop"]
    assert statuses(events)[:3] == ["starting", "stopped", "starting"]


def test_a_cancelled_start_still_stops_what_it_started(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        entered = toy.entered["start"] = asyncio.Event()
        task = asyncio.create_task(node.start())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert node.status is S.STOPPED

    toy, _ = run(work, tmp_path, delay=0.05)
    assert ("stop", "n1") in toy.calls


def test_a_start_cancelled_again_during_its_cleanup_waits_for_it(tmp_path: Path) -> None:
    """Ctrl-C cancels again and again (see emucore.cli): the start must keep the node's lock
    until its cleanup ended, or node.close runs the stop hooks a second time alongside."""

    async def work(session: Session, node: Node, toy: Any) -> None:
        started = toy.entered["start"] = asyncio.Event()
        stopping = toy.entered["stop"] = asyncio.Event()
        task = asyncio.create_task(node.start())
        await started.wait()
        task.cancel()
        await stopping.wait()  # the cleanup runs (its hook sleeps for the delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert node.status is S.STOPPED  # the cleanup ended before the start did

    toy, _ = run(work, tmp_path, delay=0.3)
    assert toy.overlaps == []  # node.close did not stop it a second time alongside
    assert [n for n, _ in toy.calls].count("stop") == 1


def test_a_cancelled_stop_still_ends_its_hooks_before_it_leaves(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.start()
        stopping = toy.entered["stop"] = asyncio.Event()
        task = asyncio.create_task(node.stop())
        await stopping.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert node.status is S.STOPPED

    toy, _ = run(work, tmp_path, delay=0.3)
    assert toy.overlaps == []  # close (at the session's end) came after the stop hook


def test_an_emulator_exit_stops_the_node_and_reports_the_log(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.start()
        with session.events.queue() as queue:
            node.emulator_exited(3, "segfault at 0x0")
            while (event := await asyncio.wait_for(queue.get(), 5)).kind != "error":
                pass
        assert event.message == "emulator exited unexpectedly (exit code 3)"
        assert event.details == "segfault at 0x0"
        assert node.status is S.STOPPED
        node.emulator_exited(3)  # a stopped node ignores late news
        await node.start()  # and can start again

    toy, _ = run(work, tmp_path)
    assert [n for n, _ in toy.calls].count("stop") >= 2


def expected_status(sequence: list[str]) -> NodeStatus:
    """What the state machine must end in after ``sequence`` (refused calls change nothing)."""
    status = S.STOPPED
    for name in sequence:
        if name == "stop":
            status = S.STOPPED
        elif name == "start" or (name in ("resume", "reload") and status is not S.STOPPED):
            status = S.STARTED
        elif name == "suspend" and status is not S.STOPPED:
            status = S.SUSPENDED
    return status


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_concurrent_calls_run_one_at_a_time_in_call_order(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sequence = [rng.choice(["start", "stop", "suspend", "resume", "reload"]) for _ in range(60)]
    refused: list[str] = []

    async def work(session: Session, node: Node, toy: Any) -> None:
        async def call(name: str) -> None:
            try:
                await getattr(node, name)()
            except NodeStateError:
                refused.append(name)  # e.g. suspend while stopped

        # asyncio.Lock is fair: the calls take the node's lock in the order they were made.
        await asyncio.wait_for(asyncio.gather(*(call(name) for name in sequence)), 30)
        assert node.status is expected_status(sequence)

    toy, _ = run(work, tmp_path, delay=0.002)
    assert toy.overlaps == []
    assert all(name in ("suspend", "resume", "reload") for name in refused)


def test_nios_on_stopped_and_running_nodes(tmp_path: Path) -> None:
    udp, other = UdpNio(20000, "127.0.0.1", 20001), UdpNio(20002, "127.0.0.1", 20003)

    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.attach_nio(0, udp)  # stopped: recorded only
        assert node.adapters[0].nio == udp
        await node.start()
        await node.attach_nio(1, TapNio("tap0"))
        await node.attach_nio(0, other)  # a relink
        await node.attach_nio(0, other)  # same NIO: nothing to do
        await node.set_link(0, False)
        assert not node.adapters[0].link_up
        await node.detach_nio(1)
        await node.detach_nio(1)  # already detached: nothing to do
        with pytest.raises(NodeError, match=r"adapter 2 does not exist \(adapters 0..1\)"):
            await node.attach_nio(2, udp)

    toy, _ = run(work, tmp_path)
    names = [n for n, _ in toy.calls if n.split()[0] in ("attach", "update", "detach", "link")]
    assert names == ["attach 1", "update 0", "link 0 down", "detach 1"]


def test_captures(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        with pytest.raises(NodeStateError, match="cannot capture: the node is stopped"):
            await node.start_capture(0, tmp_path / "a.pcap")
        await node.start()
        await node.start_capture(0, tmp_path / "a.pcap")
        with pytest.raises(NodeStateError, match="already captured to"):
            await node.start_capture(0, tmp_path / "b.pcap")
        with pytest.raises(CaptureUnsupportedError, match="no plugin can capture on adapter 1"):
            await node.start_capture(1, tmp_path / "c.pcap")
        assert node.adapters[1].capture is None
        await node.stop_capture(0)
        with pytest.raises(NodeStateError, match="is not being captured"):
            await node.stop_capture(0)

    run(work, tmp_path)


def test_a_capture_follows_no_planted_link_and_creates_no_directory_outside_the_project(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (tmp_path / "project-files").mkdir()
    (tmp_path / "project-files" / "captures").symlink_to(elsewhere)
    planted = tmp_path / "project-files" / "captures" / "a.pcap"
    outside = elsewhere / "missing" / "b.pcap"

    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.start()
        with pytest.raises(UnsafePathError, match=f"capture file {planted}: .* symbolic link"):
            await node.start_capture(0, planted)
        with pytest.raises(UnsafePathError, match=f"capture file {outside}: .* is missing"):
            await node.start_capture(0, outside)  # outside the project, nothing is created
        with pytest.raises(UnsafePathError, match=r"'\.\.' cannot be part of a capture path"):
            await node.start_capture(0, tmp_path / ".." / elsewhere.name / "c.pcap")
        assert node.adapters[0].capture is None
        await node.start_capture(0, tmp_path / "new" / "d.pcap")  # its directory made here
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700

    toy, _ = run(work, tmp_path)
    assert list(elsewhere.iterdir()) == []
    assert [n for n, _ in toy.calls].count("capture 0") == 1


def test_a_closed_node_refuses_to_start(tmp_path: Path) -> None:
    async def work(session: Session, node: Node, toy: Any) -> None:
        await node.start()
        await node.close()
        assert node.status is S.STOPPED
        with pytest.raises(NodeStateError, match="the node was closed"):
            await node.start()

    run(work, tmp_path)
