"""Saved VM states: ``on_close = "save_vm_state"``, and states saved under a name.

Both keep the running machine with the node (:mod:`emu_qemu.vmstate`: QEMU's snapshot
jobs, every hard disk snapshotted inside a linked clone's overlay, never a base image);
they differ in when, and in where the machine's RAM and devices go.

**on_close.** A stop saves the machine under :data:`~emu_qemu.vmstate.ON_CLOSE_TAG`, into
the first hard disk, before anything signals QEMU; the next start restores it in
``emu_qemu_paused`` (QMP answers, the CPUs have not run), so the guest goes on where it
stopped. A start with any other ``on_close`` discards such a state, so a guest never jumps
back to an old state later.

**Named states** (the core's ``Node.save_state`` / ``Node.start(state=...)``, hence
``emu run --save/--from``): ``emu_save_state`` pauses the CPUs, saves the machine into
``states/<name>.qcow2`` and every hard disk under ``emu-state-<name>``, and lets the CPUs
run again if they ran; ``states/<name>.json`` records what the node was (its properties and
QEMU's version). ``emu_restore_state`` checks the state is there and that no disk changed
since (QEMU could not tell a disk that changed under it); the restore happens in
``emu_qemu_paused``. When QEMU refuses the state (a machine that differs: more RAM, another
NIC), the error names the properties that changed since the save; a restore QEMU accepted
despite changed properties is a ``warning`` event naming them (the guest runs as it was
saved). A named restore leaves the on_close state alone.

**The guest's clock.** QEMU's RTC follows the host's clock (``-rtc clock=host``, QEMU's
default), so it is right after a restore; the guest's own clock goes on from the moment of
the save (its uptime too), so it is behind by the time the state was kept, until the guest
reads its RTC again (``hwclock -s``) or NTP steps it. See ``docs/lab-snapshots.md``.

**Refused.** ``save_vm_state`` without a hard disk (nothing would hold the state); any
saved state on a node without linked clones whose disk images are not all qcow2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from emu_qemu import vmstate
from emu_qemu.contract import QemuNode, binary, monitor_of, qemu_pid
from emu_qemu.qmp import Monitor, QmpError
from emu_qemu.vmstate import ON_CLOSE_TAG, tag_of
from emucore import hookimpl
from emucore.convert import default_converter
from emucore.errors import ConfigError, NodeError
from emucore.files import read_text, write_atomic
from emucore.models import NodeStatus
from emucore.records import SavedState
from emucore.stash import StashKey

EMULATOR = "qemu"

TAG = ON_CLOSE_TAG
SAVE = "save_vm_state"
# Properties whose change QEMU cannot see in a state: the disks it was taken of.
DISK_PROPERTIES = frozenset({"linked_clone"} | {f"hd{drive}_disk_image" for drive in "abcd"})


class _Restoring:
    """The named state this start restores (set by ``emu_restore_state``)."""

    def __init__(self, name: str, changed: list[str]) -> None:
        self.name = name
        self.changed = changed


RESTORING = StashKey[_Restoring]()


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """Refuse ``save_vm_state`` where no qcow2 disk can hold the state."""
    if node.properties.on_close != SAVE:
        return
    problem = vmstate.on_close_problem(node)
    if problem is not None:
        raise ConfigError(f"node {node.name!r}", [f"$.on_close: save_vm_state {problem}"])


@hookimpl(trylast=True)
async def emu_qemu_paused(node: QemuNode) -> None:
    """Before the guest runs: restore the named state asked for, else the on_close state,
    or discard the latter (another ``on_close``)."""
    monitor = monitor_of(node)
    disks = vmstate.hard_disks(node, await monitor.execute("query-block"))
    restoring = node.stash.pop(RESTORING, None)
    if restoring is not None:
        await _restore_named(node, monitor, disks, restoring)
        return
    tagged = [block for block in disks if vmstate.has_tag(block, TAG)]
    if not tagged:
        return
    if node.properties.on_close != SAVE:
        await vmstate.delete(node, monitor, TAG, tagged, "the VM state")
        node.emit(
            "info", f"on_close is {node.properties.on_close}: the saved VM state was discarded"
        )
        return
    if len(tagged) != len(disks):
        untagged = sorted(set(vmstate.node_names(disks)) - set(vmstate.node_names(tagged)))
        raise NodeError(
            node.name,
            f"on_close: the saved VM state is not on every hard disk ({', '.join(untagged)} was"
            " added since?); set on_close to power_off once to discard it",
        )
    began = time.monotonic()
    try:
        await vmstate.load(node, monitor, TAG, disks, "the VM state")
    except QmpError as exc:
        raise NodeError(
            node.name,
            f"on_close: restoring the saved VM state failed ({exc}); set on_close to power_off"
            " once to discard it and boot afresh",
        ) from None
    node.emit("info", f"saved VM state restored in {time.monotonic() - began:.1f} s")


async def _restore_named(
    node: QemuNode, monitor: Monitor, disks: list[dict[str, Any]], restoring: _Restoring
) -> None:
    name, tag = restoring.name, tag_of(restoring.name)
    untagged = [block for block in disks if not vmstate.has_tag(block, tag)]
    if untagged:
        missing = ", ".join(vmstate.node_names(untagged))
        raise NodeError(
            node.name,
            f"the saved state {name!r} is not on every hard disk ({missing}); save it again",
        )
    began = time.monotonic()
    try:
        await vmstate.load_named(node, monitor, name, disks)
    except QmpError as exc:
        why = _changed_text(restoring.changed) or "the node's properties did not change"
        raise NodeError(
            node.name,
            f"the saved state {name!r} cannot be restored: QEMU refused it ({exc}); {why};"
            " start the node without it, or save it again",
        ) from None
    node.emit("info", f"state {name!r} restored in {time.monotonic() - began:.2f} s")
    if restoring.changed:
        node.emit(
            "warning",
            f"the state {name!r} was restored, but {_changed_text(restoring.changed)}: the"
            " guest runs as it was saved; save the state again to make it current",
        )


def _changed_text(changed: list[str]) -> str:
    if not changed:
        return ""
    return f"changed since it was saved: {', '.join(changed)}"


@hookimpl
async def emu_stop(node: QemuNode) -> None:
    """Save the machine's state before QEMU is terminated (``save_vm_state``).

    A plain implementation, not ``trylast`` like the other built-ins: it must run after
    ``qemu.throttle`` lifted the CPU quota (``tryfirst``) and before ``qemu.process``
    terminates QEMU (``trylast``). A failed save is an ``error`` event; the stop goes on.
    """
    if node.properties.on_close != SAVE or node.status is not NodeStatus.STOPPING:
        return  # a failed start or a crash: there is no machine worth saving
    try:
        monitor = monitor_of(node)
    except NodeError:
        return
    if qemu_pid(node) is None:
        return  # QEMU died on its own: its state is gone with it
    began = time.monotonic()
    try:
        where = await vmstate.save(node, monitor, TAG, "the VM state")
    except (QmpError, NodeError) as exc:
        node.emit("error", f"on_close: saving the VM state failed: {exc}")
        return
    took = time.monotonic() - began
    node.emit("info", f"VM state saved in {took:.1f} s (into {Path(where).name})")


# -- named states ---------------------------------------------------------------------------


@hookimpl(trylast=True)
async def emu_save_state(node: QemuNode, name: str) -> bool:
    """Save the running machine into ``states/<name>.qcow2`` and its hard disks under
    ``emu-state-<name>``; the CPUs run again afterwards if they ran before."""
    problem = vmstate.disk_problem(node)
    if problem is not None:
        raise NodeError(node.name, f"cannot save the state {name!r}: the node {problem}")
    monitor = monitor_of(node)
    was_running = bool((await monitor.execute("query-status")).get("running"))
    began = time.monotonic()
    try:
        path = await vmstate.save_named(node, monitor, name)
    except QmpError as exc:
        raise NodeError(node.name, f"saving the state {name!r} failed: {exc}") from None
    finally:
        if was_running:
            await monitor.execute("cont")
    _remember(node, name)
    took = time.monotonic() - began
    node.emit("info", f"state {name!r} saved in {took:.2f} s ({vmstate.STATES_DIR}/{path.name})")
    return True


@hookimpl(trylast=True)
async def emu_restore_state(node: QemuNode, name: str) -> bool:
    """Check the state is there and none of the disks changed since; the restore itself
    happens in ``emu_qemu_paused``."""
    saved = await vmstate.named_states(node)
    if name not in saved:
        have = ", ".join(sorted(saved)) or "none"
        raise NodeError(node.name, f"no saved state {name!r} (saved states: {have}); save it first")
    changed = _changed_since(node, name)
    disks = [text for key, text in changed.items() if key in DISK_PROPERTIES]
    if disks:
        raise NodeError(
            node.name,
            f"the saved state {name!r} cannot be restored: {', '.join(disks)} changed since it"
            " was saved, and the state holds the disks as they were; save it again",
        )
    node.stash[RESTORING] = _Restoring(name, list(changed.values()))
    return True


@hookimpl(trylast=True)
async def emu_list_states(node: QemuNode) -> list[SavedState]:
    """The states in ``states/`` (``qemu-img info`` of each state file)."""
    states = []
    for name, snapshot in (await vmstate.named_states(node)).items():
        saved = float(snapshot.get("date-sec", 0)) + float(snapshot.get("date-nsec", 0)) / 1e9
        size = int(snapshot.get("vm-state-size", 0))
        where = f"{vmstate.STATES_DIR}/{vmstate.state_file(node, name).name}"
        states.append(SavedState(name, size, saved, where))
    return states


@hookimpl(trylast=True)
async def emu_delete_state(node: QemuNode, name: str) -> bool:
    """Delete the state file and the disks' snapshots of the stopped node (``qemu-img
    snapshot -d``: the clusters only they held go back to the file system)."""
    gone = await vmstate.delete_named(node, name)
    if not gone:
        have = ", ".join(sorted(await vmstate.named_states(node))) or "none"
        raise NodeError(node.name, f"no saved state {name!r} (saved states: {have})")
    _record_path(node, name).unlink(missing_ok=True)
    node.emit("info", f"state {name!r} deleted ({', '.join(gone)})")
    return True


def _record_path(node: QemuNode, name: str) -> Path:
    return vmstate.state_file(node, name).with_suffix(".json")


def _record(node: QemuNode, name: str) -> dict[str, Any]:
    """What the node was when ``name`` was saved ({} when missing or damaged)."""
    try:
        data = json.loads(read_text(_record_path(node, name)))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(node: QemuNode, name: str) -> None:
    record = {
        "saved": time.time(),
        "qemu": binary(node).version_text,
        "properties": default_converter().unstructure(node.properties),
    }
    write_atomic(_record_path(node, name), json.dumps(record, indent=1))


def _changed_since(node: QemuNode, name: str) -> dict[str, str]:
    """What differs from the save, by property: ``ram (128 → 160)``."""
    record = _record(node, name)
    if not isinstance(record.get("properties"), dict):
        return {}
    then: dict[str, Any] = record["properties"]
    now = default_converter().unstructure(node.properties)
    changed = {
        key: f"{key} ({_short(then[key])} → {_short(value)})"
        for key, value in now.items()
        if key in then and then[key] != value
    }
    version = binary(node).version_text
    if record.get("qemu") not in (None, version):
        changed["qemu"] = f"the QEMU version ({record['qemu']} → {version})"
    return changed


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
