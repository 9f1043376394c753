"""Find the image files a node names, and refuse the ones it may not use.

A relative name is looked up in the host's image directories, in order. An absolute path
must lie inside one of them unless the host allows images anywhere. Paths are checked after
resolving symlinks and ``..``, so neither can lead outside.
"""

from __future__ import annotations

import os
from pathlib import Path

from emucore.errors import ImageError
from emucore.node import Node


def resolve_image(node: Node, field: str, value: str) -> Path:
    """The absolute path of the image ``value`` given in property ``field``.

    :raises ImageError: not found, not a readable file, or outside the image directories.
    """
    dirs = [Path(d).absolute() for d in node.settings.image_dirs]
    given = Path(value)
    if given.is_absolute():
        path = given
    else:
        found = [d / given for d in dirs if (d / given).exists()]
        if not found:
            where = ", ".join(map(str, dirs)) or "none configured"
            raise ImageError(
                node.name, f"{field}: image {value!r} not found in the image directories ({where})"
            )
        path = found[0]
    real = path.resolve()
    if not node.settings.allow_images_outside and not any(
        real.is_relative_to(d.resolve()) for d in dirs
    ):
        raise ImageError(
            node.name,
            f"{field}: {value!r} is outside the image directories; move it into one of them"
            " or let the host allow images anywhere (HostSettings.allow_images_outside)",
        )
    if not real.is_file():
        raise ImageError(node.name, f"{field}: {value!r} is not a file")
    if not os.access(real, os.R_OK):
        raise ImageError(node.name, f"{field}: {value!r} is not readable by this user")
    return path.absolute()


def sniff_format(path: Path) -> str:
    """The image format from its first bytes: ``qcow2``, ``vmdk``, ``vdi``, ``vhdx`` or ``raw``.

    Cheap enough for a dry run; ``qemu-img info`` is the authority when disks are prepared.
    """
    with path.open("rb") as image:
        head = image.read(72)
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV"):
        return "vmdk"
    if head[64:68] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    return "raw"
