"""A running machine kept in its own files: QEMU's internal snapshots, as emu uses them.

A saved state is one *tag* in qcow2 files: QEMU's ``snapshot-save`` job (the caller pauses
the CPUs first) writes the machine's state (RAM and devices) into one of them and snapshots
every hard disk under the tag; ``snapshot-load`` puts the machine and the disks back as they
were; ``snapshot-delete`` drops the tag. The disks are a linked clone's overlay in the node
directory, or the node's own image without linked clones: never a base image.

Where the machine's state goes:

* ``on_close = save_vm_state`` (tag :data:`ON_CLOSE_TAG`): into the first hard disk, as
  QEMU's own ``savevm`` does.
* a state saved under a name (tag :func:`tag_of`): into a qcow2 file of its own,
  ``states/<name>.qcow2`` in the node directory, attached over QMP (``blockdev-add``, no
  guest device) for the job and detached after. A node needs no hard disk for it, and
  deleting the state frees all its space: after a ``snapshot-load`` the active layer of the
  file that held the machine's state keeps referring to it (measured: deleting such a
  snapshot from a hard disk freed 16 KiB of 54 MiB), so it is better in a file that goes
  with the state.

The jobs (QEMU ≥ 6.0) are used rather than HMP's ``savevm`` and ``-loadvm``: those want
every writable drive to hold the snapshot, and the UEFI variable store is a raw flash drive
that cannot; the jobs take the list of drives. Each job is awaited on QMP's
``JOB_STATUS_CHANGE`` events, bounded by the host setting ``savevm_timeout``, with an
``info`` event every :data:`PROGRESS_EVERY` seconds while it runs. A stopped node's states
are listed with ``qemu-img info -U`` and deleted with ``qemu-img snapshot -d``.

No hook implementations here: ``qemu.savestate`` uses it for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, Runstate

from emu_qemu import qemuimg
from emu_qemu.chain import check_image_chain, referenced_files
from emu_qemu.contract import QemuNode, hard_disk_files, prepared_disks, qemu_img_of
from emu_qemu.images import resolve_image, sniff_format
from emu_qemu.properties import DRIVES
from emu_qemu.qmp import Monitor, QmpError
from emucore.errors import ImageError, NodeError
from emucore.files import UnsafePathError, check_regular, private_dir
from emucore.node import state_name_problem

ON_CLOSE_TAG = "emu-saved-state"
# Named states get their own prefix, so no name can make the on_close tag.
NAMED_PREFIX = "emu-state-"
PROGRESS_EVERY = 5.0
JOB_WORDS = {
    "snapshot-save": "saving",
    "snapshot-load": "restoring",
    "snapshot-delete": "discarding",
}


def tag_of(name: str) -> str:
    """The snapshot tag of the state saved under ``name`` (a checked state name)."""
    return NAMED_PREFIX + name


def disk_problem(node: QemuNode) -> str | None:
    """Why the node's disks cannot be saved with its machine, or ``None``: without linked
    clones every hard disk must be qcow2 (a raw disk would keep its newer contents under a
    restored, older RAM)."""
    props = node.properties
    if props.linked_clone:
        return None
    drives = [drive for drive in DRIVES if props.disk_image(drive)]
    images = {d: resolve_image(node, f"hd{d}_disk_image", props.disk_image(d)) for d in drives}
    raw = [f"hd{d}_disk_image" for d, path in images.items() if sniff_format(path) != "qcow2"]
    if raw:
        return (
            f"needs every hard disk in qcow2 (not {', '.join(raw)}): a disk in another format"
            " cannot hold a snapshot; use linked_clone = true (overlays are qcow2) or convert"
            " the image"
        )
    return None


def on_close_problem(node: QemuNode) -> str | None:
    """Why ``on_close = save_vm_state`` cannot work here, or ``None``: the state goes into
    the first hard disk, so there must be one, and :func:`disk_problem`."""
    if not any(node.properties.disk_image(drive) for drive in DRIVES):
        return (
            "needs a hard disk to hold the state (hda_disk_image... hdd_disk_image); add"
            " one, even an empty qcow2 image"
        )
    return disk_problem(node)


def hard_disks(node: QemuNode, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The writable hard disks of this start as ``query-block`` shows them (by file)."""
    files = {str(disk.path) for drive, disk in prepared_disks(node).items() if drive in DRIVES}
    return [
        block
        for block in blocks
        if (block.get("inserted") or {}).get("file") in files and not block["inserted"]["ro"]
    ]


def has_tag(block: dict[str, Any], tag: str) -> bool:
    """Whether a ``query-block`` disk holds a snapshot called ``tag``."""
    snapshots = block["inserted"].get("image", {}).get("snapshots", [])
    return any(snapshot.get("name") == tag for snapshot in snapshots)


def node_names(disks: list[dict[str, Any]]) -> list[str]:
    """The block node names of ``query-block`` disks, as the jobs take them."""
    return [str(block["inserted"]["node-name"]) for block in disks]


async def _concluded(listener: EventListener, job: str) -> None:
    async for event in listener:
        data = event.get("data", {})
        if isinstance(data, dict) and data.get("id") == job and data.get("status") == "concluded":
            return


async def run_job(
    node: QemuNode, monitor: Monitor, command: str, arguments: dict[str, Any], what: str
) -> None:
    """Run a QMP job and wait until it concluded: bounded by ``savevm_timeout``, with an
    ``info`` event every :data:`PROGRESS_EVERY` seconds while it runs.

    :param what: the state, for those events (``the VM state``, ``the state 'x'``).
    :raises QmpError: the job failed or did not finish in time.
    """
    timeout = node.emulator_settings.savevm_timeout
    # Its own id: a job given up (timeout, cancel) stays in QEMU until dismissed, and
    # would block a next job of the same id.
    job = f"emu-{command}-{secrets.token_hex(4)}"
    loop = asyncio.get_running_loop()
    began = loop.time()
    listener = monitor.listener("JOB_STATUS_CHANGE")
    waiting = asyncio.ensure_future(_concluded(listener, job))
    created = dismissed = False
    try:
        await monitor.execute(command, {"job-id": job, **arguments})
        created = True
        while True:
            left = began + timeout - loop.time()
            if left <= 0:
                raise QmpError(f"{command} did not finish within {timeout:g} s")
            done, _ = await asyncio.wait({waiting}, timeout=min(PROGRESS_EVERY, left))
            if done:
                break
            if monitor.client.runstate is not Runstate.RUNNING:  # no event comes any more
                raise QmpError(f"{command}: QEMU's monitor went away while the job ran")
            so_far = loop.time() - began
            node.emit("info", f"{JOB_WORDS[command]} {what}: {so_far:.0f} s so far")
        jobs = await monitor.execute("query-jobs")
        error = next((j.get("error") for j in jobs if j.get("id") == job), None)
        await monitor.execute("job-dismiss", {"id": job})
        dismissed = True
        if error:
            raise QmpError(f"{command} failed: {error}")
    finally:
        waiting.cancel()
        monitor.client.remove_listener(listener)
        if created and not dismissed and monitor.client.runstate is Runstate.RUNNING:
            await asyncio.shield(_give_up(monitor, job))


async def _give_up(monitor: Monitor, job: str) -> None:
    """Best effort: dismiss the job if it concluded, else cancel it (no id stays taken by a
    job nobody waits for; QEMU may refuse either, which changes nothing)."""
    with contextlib.suppress(QmpError):
        await monitor.execute("job-dismiss", {"id": job})
        return
    with contextlib.suppress(QmpError):
        await monitor.execute("job-cancel", {"id": job})


async def save(node: QemuNode, monitor: Monitor, tag: str, what: str) -> str:
    """Pause the CPUs and save the machine into the first hard disk and every hard disk
    under ``tag``, replacing a state saved under it before (the job does not overwrite).
    The CPUs stay paused.

    :return: the file holding the machine's state.
    :raises NodeError: there is no writable hard disk.
    :raises QmpError: a job failed.
    """
    await monitor.execute("stop")
    disks = hard_disks(node, await monitor.execute("query-block"))
    if not disks:
        raise NodeError(node.name, "no writable hard disk to hold the state")
    names = node_names(disks)
    tagged = [block for block in disks if has_tag(block, tag)]
    if tagged:
        await delete(node, monitor, tag, tagged, what)
    devices = {"tag": tag, "vmstate": names[0], "devices": names}
    await run_job(node, monitor, "snapshot-save", devices, what)
    return str(disks[0]["inserted"]["file"])


STATES_DIR = "states"
# The block node of a state file while it is attached (one job at a time per node).
STATE_NODE = "emu-state-file"


def state_file(node: QemuNode, name: str) -> Path:
    """The file holding the machine's state saved under ``name`` (a checked state name)."""
    return node.directory / STATES_DIR / f"{name}.qcow2"


async def save_named(node: QemuNode, monitor: Monitor, name: str) -> Path:
    """Pause the CPUs and save the machine into a fresh :func:`state_file`, and every hard
    disk, under ``tag_of(name)``, replacing a state of that name. The CPUs stay paused.

    :return: the state file.
    :raises NodeError: the state file cannot be made.
    :raises QmpError: a job failed.
    """
    tag, what = tag_of(name), f"the state {name!r}"
    await monitor.execute("stop")
    disks = hard_disks(node, await monitor.execute("query-block"))
    tagged = [block for block in disks if has_tag(block, tag)]
    if tagged:
        await delete(node, monitor, tag, tagged, what)
    path = await _fresh_state_file(node, name)
    async with _attached(monitor, path):
        devices = [*node_names(disks), STATE_NODE]
        arguments = {"tag": tag, "vmstate": STATE_NODE, "devices": devices}
        await run_job(node, monitor, "snapshot-save", arguments, what)
    return path


async def load_named(
    node: QemuNode, monitor: Monitor, name: str, disks: list[dict[str, Any]]
) -> None:
    """Restore the machine from its :func:`state_file` and ``disks`` (each holds the tag).

    :raises NodeError: the state file is missing or not a file emu made.
    :raises QmpError: QEMU refused the state or the job failed.
    """
    path = state_file(node, name)
    if await _checked_state_info(node, path) is None:
        raise NodeError(node.name, f"the saved state {name!r} has no {STATES_DIR}/{path.name}")
    async with _attached(monitor, path):
        devices = [*node_names(disks), STATE_NODE]
        arguments = {"tag": tag_of(name), "vmstate": STATE_NODE, "devices": devices}
        await run_job(node, monitor, "snapshot-load", arguments, f"the state {name!r}")


async def _fresh_state_file(node: QemuNode, name: str) -> Path:
    """An empty qcow2 file for the state (made under a temporary name: a planted link at
    the name is replaced, never followed; a kill leaves no half file)."""
    directory = private_dir(node.directory, STATES_DIR)
    path = directory / f"{name}.qcow2"
    partial = directory / f".{name}.partial"
    partial.unlink(missing_ok=True)
    args = ["create", "-q", "-f", "qcow2", str(partial), "1M"]
    done = await qemuimg.run(qemu_img_of(node), args, timeout=60)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NodeError(node.name, f"cannot make the state file {path}: {done.output}")
    os.replace(partial, path)
    return path


@contextlib.asynccontextmanager
async def _attached(monitor: Monitor, path: Path) -> AsyncIterator[None]:
    """The qcow2 file ``path`` open in QEMU as the block node :data:`STATE_NODE` (no guest
    device sees it)."""
    image = {"driver": "file", "filename": str(path)}
    # backing null: QEMU opens no file the state file's header might name.
    arguments = {"driver": "qcow2", "node-name": STATE_NODE, "file": image, "backing": None}
    await monitor.execute("blockdev-add", arguments)
    try:
        yield
    finally:
        await monitor.execute("blockdev-del", {"node-name": STATE_NODE})


async def load(
    node: QemuNode, monitor: Monitor, tag: str, disks: list[dict[str, Any]], what: str
) -> None:
    """Restore the machine and its disks from ``tag`` (every disk of ``disks`` holds it).

    :raises QmpError: QEMU refused the state or the job failed.
    """
    names = node_names(disks)
    devices = {"tag": tag, "vmstate": names[0], "devices": names}
    await run_job(node, monitor, "snapshot-load", devices, what)


async def delete(
    node: QemuNode, monitor: Monitor, tag: str, disks: list[dict[str, Any]], what: str
) -> None:
    """Drop ``tag`` from the running node's ``disks`` (those holding it).

    :raises QmpError: the job failed.
    """
    arguments = {"tag": tag, "devices": node_names(disks)}
    await run_job(node, monitor, "snapshot-delete", arguments, what)


async def named_states(node: QemuNode) -> dict[str, dict[str, Any]]:
    """The states saved under a name: each state file's snapshot of its tag (``qemu-img
    info -U``), by name. Files whose name is not a state name, or that do not hold their
    tag, are left out.

    :raises NodeError: ``qemu-img`` cannot read a state file.
    """
    directory = node.directory / STATES_DIR
    if not directory.is_dir() or directory.is_symlink():
        return {}
    qemu_img = qemu_img_of(node)
    found = {}
    for path in sorted(directory.glob("*.qcow2")):
        name = path.name.removesuffix(".qcow2")
        if state_name_problem(name) is not None:
            continue
        info = await _checked_state_info(node, path, qemu_img)
        if info is None:
            continue
        snapshot = next(
            (s for s in info.get("snapshots", []) if s.get("name") == tag_of(name)), None
        )
        if snapshot is not None:
            found[name] = snapshot
    return found


async def _checked_state_info(
    node: QemuNode, path: Path, qemu_img: str | None = None
) -> dict[str, Any] | None:
    """``qemu-img info`` of a state file emu could have made: a regular file that refers to
    no other file (no backing file, no data file: it was planted or edited otherwise).

    :return: ``None`` when there is no such file.
    :raises NodeError: the file is a link or not a plain state file.
    """
    try:
        if not check_regular(path, "a saved state"):
            return None
        info = await qemuimg.info(qemu_img or qemu_img_of(node), path, image_format="qcow2")
    except (UnsafePathError, qemuimg.QemuImgError) as exc:
        raise NodeError(node.name, str(exc)) from None
    others = referenced_files(info)
    if others:
        what, other = others[0]
        raise NodeError(
            node.name,
            f"{STATES_DIR}/{path.name}: a saved state refers to no other file, this one names"
            f" a {what} ({other}); delete it and save again",
        )
    return info


async def delete_named(node: QemuNode, name: str) -> list[str]:
    """Delete the state saved under ``name`` from the stopped node: its tag from every
    hard disk holding it (``qemu-img snapshot -d``), and its state file.

    :return: the names of the files it was in (none: there was no such state).
    :raises NodeError: ``qemu-img`` failed.
    """
    tag, qemu_img = tag_of(name), qemu_img_of(node)
    gone = []
    for drive, path in _disk_files(node).items():
        try:
            # A linked clone lives in the node directory, where something may be planted.
            linked = node.properties.linked_clone
            exists = check_regular(path, f"hd{drive}: the disk") if linked else path.is_file()
        except UnsafePathError as exc:
            raise NodeError(node.name, str(exc)) from None
        if not exists or sniff_format(path) != "qcow2":
            continue
        # Its whole chain checked, as at a start: qemu-img opens it read-write.
        info = await check_image_chain(node, qemu_img, f"hd{drive}_disk_image", path)
        if not any(snapshot.get("name") == tag for snapshot in info.get("snapshots", [])):
            continue
        args = ["snapshot", "-q", "-d", tag, str(path)]  # a qcow2 file: its magic was read
        done = await qemuimg.run(qemu_img, args, timeout=node.emulator_settings.savevm_timeout)
        if done.returncode != 0:
            raise NodeError(node.name, f"cannot delete {tag} from {path.name}: {done.output}")
        gone.append(path.name)
    path = state_file(node, name)
    if path.is_file() and not path.is_symlink():
        path.unlink()
        gone.append(f"{STATES_DIR}/{path.name}")
    return gone


def _disk_files(node: QemuNode) -> dict[str, Path]:
    try:
        return hard_disk_files(node)
    except ImageError:
        return {}
