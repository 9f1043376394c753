"""What QEMU's pieces share, as a contract: typed accessors, no hook implementations.

A hook module of ``emu_qemu`` never imports another hook module. What one piece owns and
others use goes through here, so blocking a built-in piece and registering a replacement
works as long as the replacement keeps its side of the contract:

==================  =========================  ==============================================
shared              owner (sets it)            readers
==================  =========================  ==============================================
the binary          ``qemu.binary``: answers   ``qemu.accel``, ``qemu.disks``,
                    ``emu_qemu_binary``         ``qemu.network``; everyone through
                                               :func:`binary`
the QMP monitor     ``qemu.process``: sets     ``qemu.console``, ``qemu.network``,
                    :data:`MONITOR` once QMP    ``qemu.capture``... through :func:`monitor_of`
                    answers, removes it at stop
QEMU's pid          ``qemu.process``: sets     ``qemu.priority``, ``qemu.throttle`` through
                    :data:`PID` at the spawn,   :func:`qemu_pid`
                    removes it at stop
the console port    ``qemu.console``: sets     ``qemu.options`` (``%console-port%``) through
                    :data:`CONSOLE_PORT` in     :func:`console_port`
                    ``emu_prepare``
the disks           ``qemu.disks``: sets        anyone who needs the disks of this start
                    :data:`DISKS` in            (saved state, checksums) through
                    ``emu_prepare_disks``;      :func:`prepared_disks`, or where they are
                    names linked clones as      when stopped (saved states) through
                    :func:`overlay_path` says   :func:`hard_disk_files`
the paused start    ``qemu.process``: calls     ``qemu.savestate`` (restores a saved state)
                    :func:`paused` between
                    QMP and ``cont``
==================  =========================  ==============================================

The user's options are parsed by a plain function (:func:`emu_qemu.userargs.user_argv`),
not shared state.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from emu_qemu.images import resolve_image
from emu_qemu.properties import DRIVES, QemuProperties, QemuSettings
from emu_qemu.qemubinary import QemuBinary
from emu_qemu.qemuimg import find_qemu_img
from emu_qemu.qmp import Monitor
from emucore.errors import NodeError, NodeStateError
from emucore.hooks import call_each
from emucore.node import Node
from emucore.stash import StashKey

QemuNode = Node[QemuProperties, QemuSettings]
"""A node of the ``qemu`` kind, as QEMU's hook implementations receive it."""


def binary(node: QemuNode) -> QemuBinary:
    """The node's QEMU binary (``emu_qemu_binary``).

    :raises NodeError: no plugin answers (``qemu.binary`` blocked without a replacement), or
        the binary the node names is unusable.
    """
    found: QemuBinary | None = node.hooks.call_first("emu_qemu_binary", node=node)
    if found is None:
        raise NodeError(
            node.name,
            "no plugin says which QEMU binary runs this node (emu_qemu_binary): is qemu.binary"
            " blocked without a replacement?",
        )
    return found


def qemu_img_of(node: QemuNode) -> str:
    """The ``qemu-img`` beside the node's QEMU binary (else on ``PATH``)."""
    return find_qemu_img(binary(node).path)


MONITOR = StashKey[Monitor]()
"""The running node's QMP connection (set by ``qemu.process``)."""


def monitor_of(node: QemuNode) -> Monitor:
    """The running node's QMP monitor.

    :raises NodeStateError: the node has no QEMU running.
    """
    monitor = node.stash.get(MONITOR, None)
    if monitor is None:
        raise NodeStateError(node.name, "QEMU is not running (no QMP connection)")
    return monitor


PID = StashKey[int]()
"""QEMU's pid while its process exists: set by ``qemu.process`` right after the spawn,
removed as soon as the exit is seen (or at the stop)."""


def qemu_pid(node: QemuNode) -> int | None:
    """The pid of the node's QEMU while it runs."""
    return node.stash.get(PID, None)


CONSOLE_PORT = StashKey[int]()
"""The console port this start uses, when known before QEMU runs (set by ``qemu.console``)."""


def console_port(node: QemuNode) -> int:
    """The console port the command line may name: the one chosen for this start, else the
    node's ``console``, else 0 (not known before QEMU binds it)."""
    return node.stash.get(CONSOLE_PORT, 0) or node.properties.console or 0


@attrs.frozen
class PreparedDisk:
    """A disk as QEMU will open it.

    :ivar drive: ``a``..``d``, or ``cdrom``.
    :ivar path: the overlay (linked clone) or the image itself.
    :ivar format: the format of ``path``.
    :ivar base: the base image (same as ``path`` without linked clone).
    """

    drive: str
    path: Path
    format: str
    base: Path


def overlay_path(node: QemuNode, drive: str) -> Path:
    """Where the linked clone of ``hd<drive>`` lives (made by ``qemu.disks``)."""
    return node.directory / f"hd{drive}_disk.qcow2"


def hard_disk_files(node: QemuNode) -> dict[str, Path]:
    """The files QEMU writes for the node's hard disks, by drive, as its properties say
    now (the disks of a running node cannot change): the linked clones (one may not exist
    yet), or the images themselves without ``linked_clone``.

    :raises ImageError: an image the node names without linked clones cannot be used.
    """
    props = node.properties
    drives = [drive for drive in DRIVES if props.disk_image(drive)]
    if props.linked_clone:
        return {drive: overlay_path(node, drive) for drive in drives}
    return {d: resolve_image(node, f"hd{d}_disk_image", props.disk_image(d)) for d in drives}


DISKS = StashKey[dict[str, PreparedDisk]]()
"""The disks of this start, by drive (set by ``qemu.disks`` in ``emu_prepare_disks``)."""


def prepared_disks(node: QemuNode) -> dict[str, PreparedDisk]:
    """The disks prepared for this start (empty before ``emu_prepare_disks`` ran)."""
    return node.stash.get(DISKS, {})


async def paused(node: QemuNode) -> None:
    """Call ``emu_qemu_paused`` (QEMU runs, QMP answers, the CPUs have not run yet)."""
    if hasattr(node.hooks.manager.hook, "emu_qemu_paused"):
        await call_each(node.hooks.manager, "emu_qemu_paused", node.emulator, None, node=node)
