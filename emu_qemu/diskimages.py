"""Disk images in the node directory (GNS3's per-node disk API): create, resize, delete.

The core checks the name is a plain file name and refuses resizing or deleting while the
node runs (:meth:`Node.resize_disk_image <emucore.node.Node.resize_disk_image>`); here:

* **names** must end like a disk image (:data:`EXTENSIONS`), so this API reaches neither
  QEMU's log, sockets and pidfiles nor the UEFI variable store; a linked clone
  (``hda_disk.qcow2``) is one: extending it gives the guest a larger disk, deleting it starts
  the node afresh from its base image at the next start;
* **create** refuses an existing file and runs ``qemu-img create -f FORMAT [-o KEY=VALUE...]
  FILE SIZEM``, with GNS3's options checked strictly first (:class:`DiskImageOptions`: known
  keys, known values), so nothing the request holds becomes a ``qemu-img`` option of its
  own choosing;
* **resize** checks the image is a regular file and that its backing chain names no file
  outside the image directories (:func:`emu_qemu.chain.check_image_chain`), reads its format
  with ``qemu-img info`` (never guessed) and runs ``qemu-img resize -f FORMAT FILE +NM``;
* **delete** removes a regular file with one name, nothing else (never a link's target).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from emu_qemu import qemuimg
from emu_qemu.chain import check_image_chain
from emu_qemu.contract import QemuNode, qemu_img_of
from emu_qemu.qemuopts import escape
from emucore import hookimpl
from emucore.convert import structure
from emucore.errors import ConfigError, ImageError, NodeError
from emucore.files import UnsafePathError, check_regular
from emucore.validators import in_range, one_of

EMULATOR = "qemu"

EXTENSIONS = (".qcow2", ".qcow", ".img", ".raw", ".vmdk", ".vdi", ".vhd", ".vhdx", ".vpc")
# GNS3's formats; it spells vmdk "vdmk" in its schema.
FORMATS = {"qcow2": "qcow2", "qcow": "qcow", "vpc": "vpc", "vdi": "vdi", "vmdk": "vmdk"}
FORMATS |= {"vdmk": "vmdk", "raw": "raw"}
MAX_MIB = 64 * 1024 * 1024  # 64 TiB, qcow2's limit
CREATE_TIMEOUT = 600.0
ON_OFF = ("on", "off")


def _optional(validator: Any) -> Any:
    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            validator(inst, attr, value)

    return check


def _power_of_two(low: int, high: int) -> Any:
    def check(_inst: Any, _attr: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high or value & (value - 1):
            raise ValueError(f"must be a power of two from {low} to {high}, got {value}")

    return check


@attrs.frozen
class DiskImageOptions:
    """A new disk image, in GNS3's terms (``QemuDiskImageCreate``).

    :ivar format: ``qcow2``, ``qcow``, ``vpc``, ``vdi``, ``vmdk`` (GNS3: ``vdmk``), ``raw``.
    :ivar size: the virtual size in MiB.
    :ivar preallocation: ``off``, ``metadata``, ``falloc`` or ``full``.
    :ivar cluster_size: qcow2's cluster size in bytes (a power of two, 512 to 2 MiB).
    :ivar refcount_bits: qcow2's refcount width (a power of two, 1 to 64).
    :ivar lazy_refcounts: qcow2: ``on`` or ``off``.
    :ivar subformat: vmdk's or vpc's layout (``monolithicSparse``, ``dynamic``, ``fixed``...).
    :ivar static: vdi's preallocation: ``on`` or ``off``.
    :ivar zeroed_grain: vmdk: ``on`` or ``off``.
    :ivar adapter_type: vmdk's adapter: ``ide``, ``lsilogic``, ``buslogic``, ``legacyESX``.
    """

    format: str = attrs.field(validator=one_of(FORMATS))
    size: int = attrs.field(validator=in_range(1, MAX_MIB))
    preallocation: str | None = attrs.field(
        default=None, validator=_optional(one_of(("off", "metadata", "falloc", "full")))
    )
    cluster_size: int | None = attrs.field(
        default=None, validator=_optional(_power_of_two(512, 2 << 20))
    )
    refcount_bits: int | None = attrs.field(default=None, validator=_optional(_power_of_two(1, 64)))
    lazy_refcounts: str | None = attrs.field(default=None, validator=_optional(one_of(ON_OFF)))
    subformat: str | None = attrs.field(
        default=None,
        validator=_optional(
            one_of(
                "dynamic fixed streamOptimized twoGbMaxExtentSparse twoGbMaxExtentFlat"
                " monolithicSparse monolithicFlat".split()
            )
        ),
    )
    static: str | None = attrs.field(default=None, validator=_optional(one_of(ON_OFF)))
    zeroed_grain: str | None = attrs.field(default=None, validator=_optional(one_of(ON_OFF)))
    adapter_type: str | None = attrs.field(
        default=None, validator=_optional(one_of(("ide", "lsilogic", "buslogic", "legacyESX")))
    )

    def qemu_img_options(self) -> list[str]:
        """``-o key=value`` for each option set, in a fixed order."""
        args = []
        for field in attrs.fields(type(self))[2:]:
            value = getattr(self, field.name)
            if value is not None:
                args += ["-o", f"{field.name}={escape(str(value))}"]
        return args


def _disk_path(node: QemuNode, name: str) -> Path:
    if not name.endswith(EXTENSIONS):
        raise NodeError(
            node.name,
            f"disk image {name!r}: the name must end with one of {', '.join(EXTENSIONS)}",
        )
    return node.directory / name


def _existing(node: QemuNode, name: str) -> Path:
    path = _disk_path(node, name)
    try:
        check_regular(path, f"disk image {name!r}:", missing_ok=False)
    except UnsafePathError as exc:
        raise ImageError(node.name, str(exc)) from None
    return path


@hookimpl(trylast=True)
async def emu_create_disk_image(node: QemuNode, name: str, options: Mapping[str, Any]) -> bool:
    """``qemu-img create`` a new image; an existing file is refused."""
    path = _disk_path(node, name)
    where = f"node {node.name!r}: disk image {name!r}"
    if not isinstance(options, Mapping):
        raise ConfigError(where, [f"$: must be a table of options, got {options!r}"])
    wanted = structure(dict(options), DiskImageOptions, where)
    try:
        if check_regular(path, f"disk image {name!r}:"):
            raise NodeError(node.name, f"disk image {name!r} exists already; delete it first")
    except UnsafePathError as exc:
        raise ImageError(node.name, str(exc)) from None
    args = ["create", "-q", "-f", FORMATS[wanted.format], *wanted.qemu_img_options()]
    args += [str(path), f"{wanted.size}M"]
    done = await qemuimg.run(qemu_img_of(node), args, timeout=CREATE_TIMEOUT)
    if done.returncode != 0:
        path.unlink(missing_ok=True)  # nothing half made stays behind
        raise ImageError(node.name, f"cannot create disk image {name!r}: {done.output}")
    return True


@hookimpl(trylast=True)
async def emu_resize_disk_image(node: QemuNode, name: str, extend: int) -> bool:
    """``qemu-img resize`` an existing image by ``extend`` MiB."""
    path = _existing(node, name)
    if extend > MAX_MIB:
        raise NodeError(node.name, f"extend: at most {MAX_MIB} MiB, got {extend}")
    qemu_img = qemu_img_of(node)
    info = await check_image_chain(node, qemu_img, f"disk image {name!r}", path)
    args = ["resize", "-q", "-f", str(info["format"]), str(path), f"+{extend}M"]
    done = await qemuimg.run(qemu_img, args, timeout=CREATE_TIMEOUT)
    if done.returncode != 0:
        raise ImageError(node.name, f"cannot resize disk image {name!r}: {done.output}")
    return True


@hookimpl(trylast=True)
async def emu_delete_disk_image(node: QemuNode, name: str) -> bool:
    """Remove an image from the node directory."""
    _existing(node, name).unlink()
    return True
