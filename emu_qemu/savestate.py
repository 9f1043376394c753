"""Saved VM state (``on_close = "save_vm_state"``): a stop saves the running machine, and the
next start resumes it where it was, instead of booting.

**Saving.** At a stop, before anything signals QEMU, the CPUs are paused (QMP ``stop``) and
QEMU's ``snapshot-save`` job writes the machine's state (RAM and devices) into the first
hard disk and snapshots every hard disk with it, under the tag :data:`TAG`, inside the
qcow2 files (a linked clone's overlay, never a base image). A state saved earlier is
deleted first: the job does not overwrite. Then QEMU is terminated as with ``power_off``.

**Restoring.** QEMU starts paused (``-S``). Before its CPUs run (``emu_qemu_paused``), the
hard disks holding the tag are found with ``query-block``, and ``snapshot-load`` restores
the machine: the guest goes on from where it stopped, its uptime growing. The state stays
on the disks until the next save replaces it.

**Discarding.** A start with any other ``on_close`` deletes a saved state it finds
(``snapshot-delete``), so a guest never jumps back to an old state later.

Each job is awaited on QMP's ``JOB_STATUS_CHANGE`` events, bounded by the host setting
``savevm_timeout``, with an ``info`` event every few seconds while it runs; ``info``
events say what was saved or restored, and how long it took. The jobs (QEMU ≥ 6.0)
are used rather than HMP's ``savevm`` and ``-loadvm``: those want every writable drive to
hold the snapshot, and the UEFI variable store is a raw flash drive that cannot, while the
jobs take the list of drives.

**Refused.** A node without a hard disk (nothing could hold the state), and a node without
linked clones whose disk images are not all qcow2: a raw disk would keep its newer contents
under a restored, older RAM.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from emu_qemu.contract import QemuNode, monitor_of, prepared_disks, qemu_pid
from emu_qemu.images import resolve_image, sniff_format
from emu_qemu.properties import DRIVES
from emu_qemu.qmp import Monitor, QmpError
from emucore import hookimpl
from emucore.errors import ConfigError, NodeError
from emucore.models import NodeStatus

EMULATOR = "qemu"

TAG = "emu-saved-state"
SAVE = "save_vm_state"
PROGRESS_EVERY = 5.0
JOB_WORDS = {
    "snapshot-save": "saving the VM state",
    "snapshot-load": "restoring the VM state",
    "snapshot-delete": "discarding the VM state",
}


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """Refuse ``save_vm_state`` where no qcow2 disk can hold the state."""
    props = node.properties
    if props.on_close != SAVE:
        return
    drives = [drive for drive in DRIVES if props.disk_image(drive)]
    problem = ""
    if not drives:
        problem = (
            "save_vm_state needs a hard disk to hold the state (hda_disk_image..."
            " hdd_disk_image); add one, even an empty qcow2 image, or use power_off"
        )
    elif not props.linked_clone:
        images = {d: resolve_image(node, f"hd{d}_disk_image", props.disk_image(d)) for d in drives}
        raw = [f"hd{d}_disk_image" for d, path in images.items() if sniff_format(path) != "qcow2"]
        if raw:
            problem = (
                f"save_vm_state needs every hard disk in qcow2 (not {', '.join(raw)}): a disk"
                " in another format cannot hold a snapshot; use linked_clone = true"
                " (overlays are qcow2) or convert the image"
            )
    if problem:
        raise ConfigError(f"node {node.name!r}", [f"$.on_close: {problem}"])


def _hard_disks(node: QemuNode, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hard disks of this start as ``query-block`` shows them (matched by file)."""
    files = {str(disk.path) for drive, disk in prepared_disks(node).items() if drive in DRIVES}
    return [
        block
        for block in blocks
        if (block.get("inserted") or {}).get("file") in files and not block["inserted"]["ro"]
    ]


def _has_tag(block: dict[str, Any]) -> bool:
    snapshots = block["inserted"].get("image", {}).get("snapshots", [])
    return any(snapshot.get("name") == TAG for snapshot in snapshots)


def _node_names(disks: list[dict[str, Any]]) -> list[str]:
    return [str(block["inserted"]["node-name"]) for block in disks]


async def _concluded(listener: EventListener, job: str) -> None:
    async for event in listener:
        data = event.get("data", {})
        if isinstance(data, dict) and data.get("id") == job and data.get("status") == "concluded":
            return


async def run_job(
    node: QemuNode, monitor: Monitor, command: str, arguments: dict[str, Any]
) -> None:
    """Run a QMP job and wait until it concluded: bounded by ``savevm_timeout``, with an
    ``info`` event every :data:`PROGRESS_EVERY` seconds while it runs.

    :raises QmpError: the job failed or did not finish in time.
    """
    timeout = node.emulator_settings.savevm_timeout
    job = f"emu-{command}"
    loop = asyncio.get_running_loop()
    began = loop.time()
    listener = monitor.listener("JOB_STATUS_CHANGE")
    waiting = asyncio.ensure_future(_concluded(listener, job))
    try:
        await monitor.execute(command, {"job-id": job, **arguments})
        while True:
            left = began + timeout - loop.time()
            if left <= 0:
                raise QmpError(f"{command} did not finish within {timeout:g} s")
            done, _ = await asyncio.wait({waiting}, timeout=min(PROGRESS_EVERY, left))
            if done:
                break
            node.emit("info", f"{JOB_WORDS[command]}: {loop.time() - began:.0f} s so far")
        jobs = await monitor.execute("query-jobs")
        error = next((j.get("error") for j in jobs if j.get("id") == job), None)
        await monitor.execute("job-dismiss", {"id": job})
        if error:
            raise QmpError(f"{command} failed: {error}")
    finally:
        waiting.cancel()
        monitor.client.remove_listener(listener)


@hookimpl(trylast=True)
async def emu_qemu_paused(node: QemuNode) -> None:
    """Before the guest runs: restore a saved state, or discard one (other ``on_close``)."""
    monitor = monitor_of(node)
    disks = _hard_disks(node, await monitor.execute("query-block"))
    tagged = [block for block in disks if _has_tag(block)]
    if not tagged:
        return
    if node.properties.on_close != SAVE:
        await run_job(
            node, monitor, "snapshot-delete", {"tag": TAG, "devices": _node_names(tagged)}
        )
        node.emit(
            "info", f"on_close is {node.properties.on_close}: the saved VM state was discarded"
        )
        return
    if len(tagged) != len(disks):
        untagged = sorted(set(_node_names(disks)) - set(_node_names(tagged)))
        raise NodeError(
            node.name,
            f"on_close: the saved VM state is not on every hard disk ({', '.join(untagged)} was"
            " added since?); set on_close to power_off once to discard it",
        )
    began = time.monotonic()
    names = _node_names(disks)
    try:
        await run_job(
            node, monitor, "snapshot-load", {"tag": TAG, "vmstate": names[0], "devices": names}
        )
    except QmpError as exc:
        raise NodeError(
            node.name,
            f"on_close: restoring the saved VM state failed ({exc}); set on_close to power_off"
            " once to discard it and boot afresh",
        ) from None
    node.emit("info", f"saved VM state restored in {time.monotonic() - began:.1f} s")


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
    pid = qemu_pid(node)
    if pid is None or not Path(f"/proc/{pid}").exists():
        return  # QEMU died on its own: its state is gone with it
    began = time.monotonic()
    try:
        await _save(node, monitor)
    except (QmpError, NodeError) as exc:
        node.emit("error", f"on_close: saving the VM state failed: {exc}")
        return
    node.emit("info", f"VM state saved in {time.monotonic() - began:.1f} s")


async def _save(node: QemuNode, monitor: Monitor) -> None:
    await monitor.execute("stop")
    disks = _hard_disks(node, await monitor.execute("query-block"))
    if not disks:
        raise NodeError(node.name, "no writable hard disk to hold the state")
    names = _node_names(disks)
    tagged = [block for block in disks if _has_tag(block)]
    if tagged:
        await run_job(
            node, monitor, "snapshot-delete", {"tag": TAG, "devices": _node_names(tagged)}
        )
    node.emit("info", f"saving the VM state into {Path(disks[0]['inserted']['file']).name}")
    await run_job(
        node, monitor, "snapshot-save", {"tag": TAG, "vmstate": names[0], "devices": names}
    )
