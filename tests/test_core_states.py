"""Saved states in the core, with no emulator behind them: the node API, its checks, and
lab snapshots over a node that saves states and one that cannot.

A toy keeps "states" in a dict (there is no machine to save: the hooks' contract is what
is tested here); the real thing, QEMU, is tested in ``test_lab_snapshots.py``.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import pytest

from emucore import hookimpl, snapshots
from emucore.errors import ConfigError, NodeError, NodeStateError, StateUnsupportedError
from emucore.models import NodeEvent, Project
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.records import SavedState
from emucore.session import Session
from tests.toy_emulator import make_toy

BAD_NAMES = ["", "../up", "a/b", ".hidden", "a b", "x" * 65, "é", 7, None]


def keeper() -> types.ModuleType:
    """A toy emulator ``keeper`` (lifecycle of the toy) whose nodes save states in a dict."""
    module = make_toy("keeper")
    kept: dict[tuple[str, str], float] = {}
    restoring: list[tuple[str, str]] = []
    module.kept = kept  # type: ignore[attr-defined]
    module.restoring = restoring  # type: ignore[attr-defined]

    @hookimpl
    async def emu_save_state(node: Node, name: str) -> bool:
        module.calls.append(("save", node.name))
        kept[(node.name, name)] = float(len(kept) + 1)
        return True

    @hookimpl
    async def emu_restore_state(node: Node, name: str) -> bool:
        if (node.name, name) not in kept:
            raise NodeError(node.name, f"no saved state {name!r}")
        restoring.append((node.name, name))
        return True

    @hookimpl
    async def emu_list_states(node: Node) -> Sequence[SavedState]:
        return [
            SavedState(name, 1000, saved)
            for (owner, name), saved in kept.items()
            if owner == node.name
        ]

    @hookimpl
    async def emu_delete_state(node: Node, name: str) -> bool:
        if kept.pop((node.name, name), None) is None:
            raise NodeError(node.name, f"no saved state {name!r}")
        return True

    for impl in (emu_save_state, emu_restore_state, emu_list_states, emu_delete_state):
        setattr(module, impl.__name__, impl)
    return module


@pytest.fixture
def kinds() -> tuple[types.ModuleType, types.ModuleType]:
    return keeper(), make_toy("toy")


@pytest.fixture
def session(tmp_path: Any, kinds: tuple[types.ModuleType, types.ModuleType]) -> Session:
    stateful, stateless = kinds
    plugins = make_plugin_manager(
        entry_points=False, plugins=[("keeper", stateful), ("toy", stateless)], environ={}
    )
    return Session(Project.for_directory(tmp_path / "project"), plugins=plugins)


def test_a_node_saves_lists_resumes_and_deletes_a_state(
    emu_run: Any, session: Session, kinds: tuple[types.ModuleType, Any]
) -> None:
    stateful, _ = kinds
    node = session.add_node({"name": "k", "emulator": "keeper"})

    async def body() -> None:
        with pytest.raises(NodeStateError, match="not running"):
            await node.save_state("s1")
        await node.start()
        await node.save_state("s1")
        assert [state.name for state in await node.states()] == ["s1"]
        with pytest.raises(NodeStateError, match=r"resume from the saved state .s1.*stop it"):
            await node.start(state="s1")
        with pytest.raises(NodeStateError, match="delete the saved state 's1'"):
            await node.delete_state("s1")
        await node.stop()
        await node.start(state="s1")
        assert stateful.restoring == [("k", "s1")]
        await node.stop()
        # A state that is not there: the plugin's error, and the node stays stopped.
        with pytest.raises(NodeError, match="no saved state 'nope'"):
            await node.start(state="nope")
        assert node.status.value == "stopped"
        await node.delete_state("s1")
        assert await node.states() == []

    emu_run(body())


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_state_name_is_never_a_path(emu_run: Any, session: Session, name: Any) -> None:
    node = session.add_node({"name": "k", "emulator": "keeper"})
    for call in (node.save_state, node.delete_state):
        with pytest.raises(NodeError, match="is not a state name"):
            emu_run(call(name))
    if name is not None:  # start(state=None) is a plain start
        with pytest.raises(NodeError, match="is not a state name"):
            emu_run(node.start(state=name))
    with pytest.raises(ConfigError, match=r"--save: .* is not a state name"):
        snapshots.checked_name(name, "--save")


def test_an_emulator_without_state_hooks_is_unsupported(emu_run: Any, session: Session) -> None:
    node = session.add_node({"name": "t", "emulator": "toy"})

    async def body() -> None:
        with pytest.raises(StateUnsupportedError, match="no plugin of 'toy'"):
            await node.states()
        with pytest.raises(StateUnsupportedError, match="restores saved states"):
            await node.start(state="s1")
        assert node.status.value == "stopped"
        await node.start()
        with pytest.raises(StateUnsupportedError, match="saves running states"):
            await node.save_state("s1")

    emu_run(body())


def test_a_lab_snapshot_pauses_saves_and_restarts_the_others_afresh(
    emu_run: Any, session: Session, kinds: tuple[types.ModuleType, types.ModuleType]
) -> None:
    stateful, _ = kinds
    for name in ("k1", "k2"):
        session.add_node({"name": name, "emulator": "keeper"})
    session.add_node({"name": "t", "emulator": "toy"})
    events: list[NodeEvent] = []
    session.events.subscribe(events.append)

    async def body() -> None:
        for node in session.nodes.values():
            await node.start()
        assert await snapshots.save(session, "converged") == ["t"]
        # Each saving node was paused before any saved (one moment), and runs again.
        suspends = [i for i, call in enumerate(stateful.calls) if call[0] == "suspend"]
        saves = [i for i, call in enumerate(stateful.calls) if call[0] == "save"]
        assert len(suspends) == len(saves) == 2
        assert max(suspends) < min(saves)
        assert all(node.status.value == "started" for node in session.nodes.values())
        assert any(e.node == "t" and "cannot save a running state" in e.message for e in events)
        listed, stateless_nodes = await snapshots.snapshots(session)
        assert [(s.name, sorted(s.states), s.size) for s in listed] == [
            ("converged", ["k1", "k2"], 2000)
        ]
        assert stateless_nodes == ["t"]
        # A restore is planned before anything starts: a missing state names the node.
        with pytest.raises(ConfigError, match=r"\$\.nodes\.k1: no saved state 'other'"):
            await snapshots.restore_plan(session, "other", "lab.toml")
        resuming, fresh = await snapshots.restore_plan(session, "converged", "lab.toml")
        assert (resuming, fresh) == (["k1", "k2"], ["t"])
        for node in session.nodes.values():
            await node.stop()
        with pytest.raises(ConfigError, match=r"no snapshot called 'gone' .*converged"):
            await snapshots.delete(session, "gone", "lab.toml")
        await snapshots.delete(session, "converged", "lab.toml")
        assert stateful.kept == {}

    emu_run(body())


def test_a_lab_snapshot_is_refused_while_a_node_that_can_save_is_stopped(
    emu_run: Any, session: Session, kinds: tuple[types.ModuleType, types.ModuleType]
) -> None:
    stateful, _ = kinds
    for name in ("k1", "k2"):
        session.add_node({"name": name, "emulator": "keeper"})
    session.add_node({"name": "t", "emulator": "toy"})  # cannot save: may be stopped

    async def body() -> None:
        await session.nodes["k1"].start()
        with pytest.raises(NodeStateError, match=r"lab as 'converged'.*: k2 \(stopped\);"):
            await snapshots.save(session, "converged")
        assert stateful.kept == {}  # nothing saved
        assert not [call for call in stateful.calls if call[0] == "suspend"]  # nor paused
        assert session.nodes["k1"].status.value == "started"
        await session.nodes["k2"].start()
        assert await snapshots.save(session, "converged") == ["t"]
        assert sorted(owner for owner, _ in stateful.kept) == ["k1", "k2"]

    emu_run(body())
