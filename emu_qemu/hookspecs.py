"""The QEMU plugin's own hooks: how its pieces reach what another piece owns.

Declared through the ``emucore.hookspecs`` entry point group, so the specs stay when the
plugin implementing them is blocked; callers go through :mod:`emu_qemu.contract`, which says
clearly when nobody implements one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from emucore import hookspec
from emucore.hooks import may_be_async

if TYPE_CHECKING:
    from emu_qemu.qemubinary import QemuBinary
    from emucore.node import Node


@hookspec(firstresult=True)
def emu_qemu_binary(node: Node[Any, Any]) -> QemuBinary | None:
    """The QEMU binary that runs ``node``: its path, platform and version.

    ``qemu.binary`` answers from ``qemu_path`` or ``platform``, resolved afresh at each start
    (in its ``emu_prepare``) and remembered until the next; a replacement answers its own
    way. Every piece that depends on the binary (the accelerator, the disks, the network)
    asks through this hook, so a blocked ``qemu.binary`` takes nothing with it but itself.

    :param node: the node; stopped, starting or running.
    :return: the binary, or ``None`` to let the next implementation answer.
    :raises NodeError: the binary the node names is missing or unusable (name the field).

    The first non-``None`` result wins. Sync.
    """


@may_be_async
@hookspec
def emu_qemu_paused(node: Node[Any, Any]) -> Awaitable[None] | None:
    """QEMU runs with its CPUs paused and answers QMP: act before the guest runs.

    ``qemu.process`` calls it at each start between connecting QMP (``contract.MONITOR``
    is set) and releasing the CPUs (``cont``): the place to restore a saved state or set
    up devices over QMP before the guest's first instruction.

    :param node: the node (status ``starting``).
    :return: nothing.
    :raises EmuError: the start fails (and QEMU is stopped).

    Results are collected (and ignored). May be async.
    """
