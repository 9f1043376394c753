"""The checksums of a node's images, reported with the node as GNS3 does.

For each image property that is set (``hda_disk_image`` ... ``hdd_disk_image``,
``cdrom_image``, ``bios_image``, ``kernel_image``, ``initrd``), ``emu_node_info`` answers
``<property>_md5sum``: the md5 of the image file. Each file is read once, in a thread, and
its digest remembered by path, size and mtime (:func:`emucore.digests.md5`), so a node
renders at once after the first time. An image that cannot be found has no checksum.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from emu_qemu.contract import QemuNode
from emu_qemu.images import resolve_image
from emu_qemu.properties import QemuProperties
from emucore import hookimpl
from emucore.digests import md5
from emucore.errors import ImageError

EMULATOR = "qemu"

IMAGE_FIELDS = tuple(f.name for f in attrs.fields(QemuProperties) if "image" in f.metadata)


@hookimpl(trylast=True)
async def emu_node_info(node: QemuNode) -> Mapping[str, str]:
    """``<property>_md5sum`` of every image the node names."""
    sums: dict[str, str] = {}
    for field in IMAGE_FIELDS:
        value = getattr(node.properties, field)
        if not value:
            continue
        try:
            path = resolve_image(node, field, value)
        except ImageError:
            continue  # missing or refused: the node's start says why
        sums[f"{field}_md5sum"] = await md5(path)
    return sums
