"""How the guest boots: boot order, BIOS image, or a kernel with initrd and command line."""

from __future__ import annotations

from collections.abc import Sequence

from emu_qemu import positions
from emu_qemu.contract import QemuNode
from emu_qemu.images import resolve_image
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.records import ArgFragment

EMULATOR = "qemu"


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """An initrd or a kernel command line needs a kernel; images must exist and be allowed."""
    props = node.properties
    problems = [
        f"$.{field}: needs kernel_image (QEMU only passes it to a kernel it loads itself)"
        for field in ("initrd", "kernel_command_line")
        if getattr(props, field) and not props.kernel_image
    ]
    if problems:
        raise ConfigError(f"node {node.name!r}", problems)
    for field in ("bios_image", "kernel_image", "initrd"):
        if getattr(props, field):
            resolve_image(node, field, getattr(props, field))


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """``-boot order=``, then ``-bios``, ``-kernel``, ``-initrd``, ``-append`` when set.

    These options take a plain path (not an option string), so nothing needs escaping.
    """
    props = node.properties
    args = ["-boot", f"order={props.boot_priority}"]
    if props.bios_image:
        args += ["-bios", str(resolve_image(node, "bios_image", props.bios_image))]
    if props.kernel_image:
        args += ["-kernel", str(resolve_image(node, "kernel_image", props.kernel_image))]
        if props.initrd:
            args += ["-initrd", str(resolve_image(node, "initrd", props.initrd))]
        if props.kernel_command_line:
            args += ["-append", props.kernel_command_line]
    return [ArgFragment(positions.BOOT, args, "qemu.boot")]
