"""Small typed records that hook implementations return."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from emucore.telnet import TelnetConsole

if TYPE_CHECKING:
    from emucore.node import Node


@attrs.frozen
class EmulatorInfo:
    """An emulator kind a plugin provides, returned by ``emu_emulators``.

    :ivar name: the kind, as written in node descriptions (``emulator = "qemu"``); plugins
        that set ``EMULATOR = name`` at module level only see nodes of this kind.
    :ivar properties: attrs class of a node's properties; built from the node description
        (minus ``name``, ``node_id``, ``emulator`` and ``nios``) by the core's converter, so
        unknown keys and bad values are refused with the field's path. Must provide
        an ``adapter_count`` property: how many network adapters the node has (adapter
        numbers are 0..count-1).
    :ivar settings: attrs class of the host's settings for this emulator (all fields with
        defaults), built from ``HostSettings.emulators[name]``; ``None`` if it has none.
    :ivar description: one line for ``emu plugins``.
    """

    name: str
    properties: type[Any]
    settings: type[Any] | None = None
    description: str = ""


def _as_args(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


@attrs.frozen
class ArgFragment:
    """A piece of an emulator's command line, returned by ``emu_build_args``.

    The core sorts fragments by ``position`` (stable: equal positions keep hook call order)
    and concatenates their ``args``. The QEMU plugin documents its positions in
    ``emu_qemu.positions``; a plugin adding options picks a position between them.

    :ivar position: where the fragment goes; 0 is the program itself.
    :ivar args: the argv items, never a shell string.
    :ivar source: who contributed it (a plugin name), shown in errors and useful to wrappers.
    """

    position: int
    args: tuple[str, ...] = attrs.field(converter=_as_args)
    source: str = ""


@attrs.frozen
class CheckResult:
    """One line of ``emu check``, returned by ``emu_check``.

    :ivar subject: what was checked (``qemu-system-x86_64``, ``kvm``, ``vpcs``).
    :ivar ok: whether it is usable.
    :ivar detail: version, path, or why it is not usable and what to do.
    """

    subject: str
    ok: bool
    detail: str


@attrs.frozen
class LabImage:
    """What ``image = NAME`` in a lab's node table stands for, returned by ``emu_lab_image``.

    :ivar description: the node's description with the image's keys replaced: the emulator,
        and the properties that boot the image (for a kernel image: kernel, initrd and
        command line), plus the table's other keys.
    :ivar image_dirs: directories the files the description names live in; the host adds
        them to its image directories for this lab.
    :ivar emulator_settings: settings the image suggests per emulator kind (e.g. a kernel
        for QEMU's KVM probe); the host's own settings win.
    :ivar open_shell: how a check reaches a shell prompt on the node's console, for images
        whose shell needs more than pressing Enter (``None``: the runner presses Enter and
        waits for a prompt).
    :ivar after_restore: what a node resumed from a saved state needs before it is used
        (the tiny guest sets its clock from its RTC); the runner awaits it once every node
        started (``None``: nothing).
    """

    description: Mapping[str, Any]
    image_dirs: tuple[Path, ...] = ()
    emulator_settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    open_shell: Callable[[Node], Awaitable[TelnetConsole]] | None = None
    after_restore: Callable[[Node], Awaitable[None]] | None = None


@attrs.frozen
class SavedState:
    """A running state of a node saved under a name, returned by ``emu_list_states``.

    :ivar name: the name it was saved under (``Node.save_state``).
    :ivar size: bytes the saved machine state takes (RAM, devices); disk blocks the state
        keeps are shared with the live disk and not counted.
    :ivar saved: when it was saved, seconds since the epoch.
    :ivar where: where it lives, for people (a file name in the node directory).
    """

    name: str
    size: int
    saved: float
    where: str = ""
