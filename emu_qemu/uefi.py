"""UEFI boot (``uefi``): OVMF's firmware, shared and read-only, and a variable store per node.

With ``uefi`` QEMU boots OVMF instead of SeaBIOS, from two flash devices: the firmware code
(``OVMF_CODE_4M.fd`` of Debian's ``ovmf``), opened read-only and shared by every node, and
the variable store (boot entries, Secure Boot keys...), which the firmware writes. Each node
gets its own store: a copy of the host's template (``OVMF_VARS_4M.fd``) made in the node
directory the first time its disks are prepared, and kept across restarts, as the guest's
NVRAM would be; deleting it resets the variables. The template itself is never written.

The files come from the host's settings (``ovmf_code``, ``ovmf_vars``); where a setting
names no existing file, its file name is looked up in the image directories, so a host
without the package can drop OVMF's files there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from emu_qemu import positions
from emu_qemu.contract import QemuNode
from emu_qemu.images import resolve_image
from emu_qemu.properties import QemuSettings, host_qemu_settings
from emu_qemu.qemuopts import opts
from emucore import hookimpl
from emucore.errors import EmuError, ImageError, NodeError
from emucore.files import UnsafePathError, check_regular, write_atomic
from emucore.models import HostSettings
from emucore.records import ArgFragment, CheckResult

EMULATOR = "qemu"


def firmware_file(node: QemuNode, configured: str, setting: str) -> Path:
    """The firmware file the host's setting names, or the image of that name.

    :raises NodeError: neither exists.
    """
    path = Path(configured)
    if path.is_absolute() and path.is_file():
        return path  # the host's own setting: trusted like binary_dirs
    try:
        return resolve_image(node, "uefi", path.name)
    except ImageError:
        raise NodeError(
            node.name,
            f"uefi: the UEFI firmware file {configured} does not exist and no image directory"
            f" holds {path.name}; install OVMF (Debian: apt-get install ovmf), or set the"
            f" host setting {setting}",
        ) from None


def vars_path(node: QemuNode) -> Path:
    """The node's own UEFI variable store, named like the host's template."""
    return node.directory / Path(node.emulator_settings.ovmf_vars).name


@hookimpl(trylast=True)
async def emu_prepare_disks(node: QemuNode) -> None:
    """Give the node its copy of the variable store, once (it is the node's NVRAM)."""
    if not node.properties.uefi:
        return
    target = vars_path(node)
    try:
        if check_regular(target, "uefi: the node's UEFI variable store"):
            return
    except UnsafePathError as exc:
        raise ImageError(node.name, str(exc)) from None
    template = firmware_file(node, node.emulator_settings.ovmf_vars, "ovmf_vars")
    data = await asyncio.to_thread(template.read_bytes)
    write_atomic(target, data)  # whole or not at all, never through a planted link


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """Two flash drives: the firmware, read-only, and the node's variable store."""
    if not node.properties.uefi:
        return []
    settings: QemuSettings = node.emulator_settings
    code = firmware_file(node, settings.ovmf_code, "ovmf_code")
    flash = {"if": "pflash", "format": "raw"}
    args = ["-drive", opts(None, {**flash, "readonly": True, "file": str(code)})]
    args += ["-drive", opts(None, {**flash, "file": str(vars_path(node))})]
    return [ArgFragment(positions.FIRMWARE, args, "qemu.uefi")]


@hookimpl
def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report whether the UEFI firmware files are there, found as a start finds them (the
    host's setting, else an image directory holding a file of that name)."""
    try:
        qemu_settings = host_qemu_settings(settings)
    except EmuError as exc:
        return [CheckResult("ovmf", False, str(exc))]
    files: list[Path] = []
    missing: list[str] = []
    for configured in (qemu_settings.ovmf_code, qemu_settings.ovmf_vars):
        path = Path(configured)
        candidates = [path] if path.is_absolute() else []
        candidates += [Path(directory) / path.name for directory in settings.image_dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(configured)
        else:
            files.append(found)
    if missing:
        detail = (
            f"{', '.join(missing)} missing: nodes with uefi need them (apt-get install ovmf,"
            " or put them in an image directory)"
        )
        return [CheckResult("ovmf", False, detail)]
    return [CheckResult("ovmf", True, ", ".join(map(str, files)))]
