"""Lab snapshots: every node of a session saved under one name, and started from it again.

A lab snapshot is no file of its own: it is the state each node saved under the same name
(``Node.save_state``), kept where the node's emulator keeps states (QEMU: inside the node's
linked clones). Links are not saved: they are the host's, rebuilt from the lab file at each
run, and a node resumed from a state finds its adapters connected as they are now.

Saving pauses every node that can save (``Node.suspend``) before any of them saves, so the
states are of one moment, then lets them run again. A node whose emulator saves no state
(no ``emu_list_states`` implementation: VPCS) is skipped, and a restore starts it afresh,
with its startup configuration: each function here says which nodes that concerns, and
each such node gets an ``info`` event saying so.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from emucore.errors import ConfigError, NodeStateError, StateUnsupportedError
from emucore.models import NodeStatus
from emucore.node import Node, state_name_problem
from emucore.records import SavedState
from emucore.session import Session
from emucore.tasks import all_ended

FRESH_NOTE = "{kind} cannot save a running state: started afresh with its startup configuration"


@attrs.frozen
class LabSnapshot:
    """The states a lab's nodes saved under one name.

    :ivar name: the name.
    :ivar states: each saving node's state, by node name.
    :ivar missing: nodes that can save states but have none of this name (added to the lab
        since, or their save failed): the snapshot cannot be restored.
    """

    name: str
    states: Mapping[str, SavedState]
    missing: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes the nodes' saved machine states take together."""
        return sum(state.size for state in self.states.values())

    @property
    def saved(self) -> float:
        """When the last of its nodes was saved (seconds since the epoch)."""
        return max((state.saved for state in self.states.values()), default=0.0)


def checked_name(name: object, where: str) -> str:
    """``name`` if it can name a snapshot (a state name: 1-64 letters, digits, ``_ . -``).

    :raises ConfigError: naming ``where`` (an option, a field) and what is wrong.
    """
    problem = state_name_problem(name)
    if problem is not None:
        raise ConfigError(where, [problem])
    return str(name)


async def node_states(session: Session) -> dict[str, list[SavedState] | None]:
    """Every node's saved states (``None``: its emulator saves none), asked concurrently."""

    async def one(node: Node) -> list[SavedState] | None:
        try:
            return await node.states()
        except StateUnsupportedError:
            return None

    nodes = list(session.nodes.values())
    answers = await asyncio.gather(*(one(node) for node in nodes))
    return {node.name: states for node, states in zip(nodes, answers, strict=True)}


async def save(session: Session, name: str) -> list[str]:
    """Save every node that can under ``name``, all paused first (one moment).

    Every node that can save must be running (started or suspended): a stopped one would be
    missing from the snapshot, which then could not be restored, so the save is refused
    before any node is paused or saved.

    :return: the nodes whose emulator saves no state (a restore starts them afresh).
    :raises ConfigError: ``name`` is not a state name.
    :raises NodeStateError: a node that can save is not running (naming every such node);
        nothing was saved.
    :raises EmuError: a node could not save (the others' states are saved); every paused
        node runs again either way.
    """
    checked_name(name, "state name")
    known = await node_states(session)
    saving = [session.nodes[n] for n, states in known.items() if states is not None]
    fresh = [session.nodes[n] for n, states in known.items() if states is None]
    idle = [node for node in saving if not node.is_running]
    if idle:
        listed = ", ".join(f"{node.name} ({node.status.value})" for node in idle)
        raise NodeStateError(
            idle[0].name,
            f"cannot save the lab as {name!r}: not every node that can save runs: {listed};"
            " a snapshot without them could not be restored (start them, then save)",
        )
    paused = [node for node in saving if node.status is NodeStatus.STARTED]
    try:
        await all_ended(node.suspend() for node in paused)
        await all_ended(node.save_state(name) for node in saving)
    finally:
        await asyncio.gather(*(node.resume() for node in paused), return_exceptions=True)
    for node in fresh:
        node.emit("info", f"not saved: {FRESH_NOTE.format(kind=node.emulator)} at a restore")
    return [node.name for node in fresh]


async def restore_plan(session: Session, name: str, where: str) -> tuple[list[str], list[str]]:
    """Which nodes resume from ``name`` and which start afresh; checked before anything
    starts.

    :param where: the lab file, for errors.
    :return: (nodes that resume from the state, nodes whose emulator saves none).
    :raises ConfigError: a node that can save states has none called ``name``.
    """
    checked_name(name, "state name")
    known = await node_states(session)
    problems = []
    for node, states in known.items():
        if states is None:
            continue
        have = sorted(state.name for state in states)
        if name not in have:
            problems.append(
                f"$.nodes.{node}: no saved state {name!r} (saved: {', '.join(have) or 'none'});"
                f" save the lab under {name!r} first (emu run --save {name})"
            )
    if problems:
        raise ConfigError(where, problems)
    resuming = [node for node, states in known.items() if states is not None]
    fresh = [node for node, states in known.items() if states is None]
    for node in fresh:
        session.nodes[node].emit("info", FRESH_NOTE.format(kind=session.nodes[node].emulator))
    return resuming, fresh


async def snapshots(session: Session) -> tuple[list[LabSnapshot], list[str]]:
    """The lab's snapshots by name, and the nodes whose emulator saves no state."""
    known = await node_states(session)
    saving = {node: states for node, states in known.items() if states is not None}
    names = sorted({state.name for states in saving.values() for state in states})
    found = []
    for name in names:
        states = {
            node: state for node, listed in saving.items() for state in listed if state.name == name
        }
        missing = tuple(node for node in saving if node not in states)
        found.append(LabSnapshot(name, states, missing))
    return found, [node for node, states in known.items() if states is None]


async def delete(session: Session, name: str, where: str) -> int:
    """Delete the snapshot ``name`` from every (stopped) node holding it.

    :param where: the lab file, for errors.
    :return: the bytes the node directories gave back to the file system.
    :raises ConfigError: no node holds a state called ``name``.
    """
    checked_name(name, "state name")
    listed, _ = await snapshots(session)
    snapshot = next((s for s in listed if s.name == name), None)
    if snapshot is None:
        have = ", ".join(s.name for s in listed) or "none"
        raise ConfigError(where, [f"no snapshot called {name!r} (snapshots: {have})"])
    holders = [session.nodes[node] for node in snapshot.states]
    before = sum(_allocated(node.directory) for node in holders)
    await all_ended(node.delete_state(name) for node in holders)
    return max(0, before - sum(_allocated(node.directory) for node in holders))


def _allocated(directory: Path) -> int:
    """Bytes the files of a directory tree take on disk (not their apparent size)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total
