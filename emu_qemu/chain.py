"""What an image file refers to, checked before QEMU or qemu-img follows it.

A disk image is more than its bytes: a qcow2 header can name a backing file and an external
data file, a VMDK descriptor names its extents, and QEMU opens each of them when it opens the
image (the data file read-write when the image is used without a linked clone). An image
someone else made could thus hand a guest ``/etc/shadow`` or a block device. So every image a
node uses is checked here first, with its whole backing chain:

* a text VMDK descriptor is read by emu itself, before any qemu-img call (``qemu-img info``
  opens the extents it names);
* every other format is read by ``qemu-img info`` without its backing chain, which opens
  neither the backing file nor a qcow2 data file (QEMU keeps it so for exactly this use);
* every file named (backing file, data file, extent) must be a plain path that lies inside
  the image directories after resolving links and ``..``, and the chain is followed to its
  end (at most :data:`MAX_DEPTH` images, no loops).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from emu_qemu import qemuimg
from emucore.errors import ImageError
from emucore.node import Node

MAX_DEPTH = 16
_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
# RW 2048 FLAT "name.vmdk" 0   /   parentFileNameHint="base.vmdk"
_EXTENT = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]*)"', re.MULTILINE)
_PARENT_HINT = re.compile(r'^\s*parentFileNameHint\s*=\s*"([^"]*)"', re.MULTILINE)


def inside_image_dirs(node: Node, path: Path) -> bool:
    """Whether ``path`` (links and ``..`` resolved) lies in one of the host's image dirs."""
    real = path.resolve()
    return any(real.is_relative_to(Path(d).resolve()) for d in node.settings.image_dirs)


def _descriptor_files(path: Path) -> list[str]:
    """The files a text VMDK descriptor names (extents, parent hint); [] for other files."""
    with path.open("rb") as image:
        head = image.read(65536)
    if not head.startswith(_DESCRIPTOR_MAGIC):
        return []
    text = head.decode(errors="replace")
    return _EXTENT.findall(text) + _PARENT_HINT.findall(text)


def referenced_files(info: dict[str, Any]) -> list[tuple[str, str]]:
    """``(what, name)`` of every file ``qemu-img info`` says an image opens besides itself."""
    found: list[tuple[str, str]] = []
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        found.append(("backing file", str(backing)))
    specific = info.get("format-specific", {}).get("data", {})
    if isinstance(specific, dict):
        if specific.get("data-file"):
            found.append(("data file", str(specific["data-file"])))
        for extent in specific.get("extents", []) or []:
            if isinstance(extent, dict) and extent.get("filename"):
                found.append(("extent", str(extent["filename"])))
    return found


def _named_file(image: Path, name: str) -> Path | None:
    """The path ``name`` stands for, relative to ``image``'s directory; None for anything
    that is not a plain file name (``json:{...}``, ``nbd://``, ``file:``...)."""
    if not name or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", name):
        return None
    return (image.parent / name) if not Path(name).is_absolute() else Path(name)


async def check_image_chain(node: Node, qemu_img: str, field: str, image: Path) -> dict[str, Any]:
    """Check ``image`` and its backing chain name no file outside the image directories.

    :param field: the property naming the image, for errors (``hda_disk_image``).
    :return: ``qemu-img info`` of ``image`` itself.
    :raises ImageError: naming the field, the image and the file it refers to.
    """
    top: dict[str, Any] | None = None
    current, seen = image, set[Path]()
    for _ in range(MAX_DEPTH):
        real = current.resolve()
        if real in seen:
            raise ImageError(node.name, f"{field}: {image}: its backing chain loops at {current}")
        seen.add(real)
        for name in _descriptor_files(current):
            _check_reference(node, field, image, current, "extent", name)
        info = await qemuimg.info(qemu_img, current)
        top = top or info
        backing: Path | None = None
        for what, name in referenced_files(info):
            named = _named_file(current, name)
            if what == "extent" and named is not None and named.resolve() == real:
                continue  # a monolithic VMDK names itself
            path = _check_reference(node, field, image, current, what, name)
            if what == "backing file":
                backing = path
        if backing is None:
            return top
        current = backing
    raise ImageError(node.name, f"{field}: {image}: backing chain longer than {MAX_DEPTH} images")


def _check_reference(
    node: Node, field: str, image: Path, holder: Path, what: str, name: str
) -> Path:
    path = _named_file(holder, name)
    where = f"{image}" if holder == image else f"{image} (through {holder})"
    if path is None:
        raise ImageError(
            node.name, f"{field}: {where} names its {what} as {name!r}; only files are allowed"
        )
    if not node.settings.allow_images_outside and not inside_image_dirs(node, path):
        raise ImageError(
            node.name,
            f"{field}: {where} names {path} as its {what}, outside the image directories;"
            " emu opens no file outside them (move that file into an image directory)",
        )
    if not path.resolve().is_file():
        raise ImageError(node.name, f"{field}: {where} names {path} as its {what}: not a file")
    return path
