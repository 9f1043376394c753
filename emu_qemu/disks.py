"""Disks: linked clones of base images, their integrity, and the drives on the command line.

With ``linked_clone`` (the default) every disk the node writes is a qcow2 overlay in the node
directory, ``hd<x>_disk.qcow2``, whose backing file is the base image: the base is opened
read-only by QEMU and by every qemu-img call here, and is never repaired or written. Without
``linked_clone`` the node uses the image itself, and no other node may use it at the same time.

The CD-ROM (``cdrom_image``) is read-only and used as it is. Its medium changes while the node
runs (QMP ``blockdev-change-medium``, or ``eject`` for none): the guest sees a new disc.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from emu_qemu import positions, qemuimg
from emu_qemu.chain import check_image_chain, referenced_files
from emu_qemu.contract import (
    DISKS,
    PreparedDisk,
    QemuNode,
    binary,
    monitor_of,
    overlay_path,
    qemu_img_of,
)
from emu_qemu.images import resolve_image, sniff_format
from emu_qemu.properties import DRIVES, QemuProperties
from emu_qemu.qemuopts import opts
from emucore import hookimpl
from emucore.errors import ConfigError, ImageError, NodeError
from emucore.files import UnsafePathError, check_regular
from emucore.records import ArgFragment

EMULATOR = "qemu"

_X86 = ("x86_64", "i386")
CDROM_ID = "cdrom0"


def _images(node: QemuNode) -> dict[str, Path]:
    props = node.properties
    return {
        drive: resolve_image(node, f"hd{drive}_disk_image", props.disk_image(drive))
        for drive in DRIVES
        if props.disk_image(drive)
    }


@hookimpl(trylast=True)
def emu_node_created(node: QemuNode) -> None:
    """Resolve the images now, refuse unusable interfaces, and claim the images used
    without linked clones (one node at a time; the session releases the claims)."""
    props = node.properties
    problems = []
    for drive in DRIVES:
        interface = props.disk_interface(drive)
        if props.disk_image(drive) and interface == "mtd" and _platform(node) in _X86:
            problems.append(
                f"$.hd{drive}_disk_interface: mtd (flash) disks do not exist on x86 machines;"
                " use ide, sata, scsi, virtio or nvme"
            )
    if problems:
        raise ConfigError(f"node {node.name!r}", problems)
    images = _images(node)
    if props.cdrom_image:
        resolve_image(node, "cdrom_image", props.cdrom_image)
    if props.linked_clone:
        return
    for drive, image in images.items():
        other = node.claims.take(node, "image used without linked clone", image.resolve())
        if other is not None:
            raise ImageError(
                node.name,
                f"hd{drive}_disk_image: {image} is already used by node {other.name!r} without"
                " linked_clone; a node without linked clones needs its own image"
                " (copy it, or set linked_clone = true)",
            )


@hookimpl(trylast=True)
async def emu_prepare_disks(node: QemuNode) -> None:
    """Check every image's chain, create or reuse linked clones, rebase moved bases, check
    overlays and bases."""
    qemu_img = qemu_img_of(node)
    prepared: dict[str, PreparedDisk] = {}
    for drive, base in _images(node).items():
        field = f"hd{drive}_disk_image"
        base_info = await check_image_chain(node, qemu_img, field, base)
        base_format = str(base_info["format"])
        await _check_base(node, qemu_img, drive, base, base_format)
        if node.properties.linked_clone:
            overlay = await _linked_clone(node, qemu_img, drive, base, base_format)
            prepared[drive] = PreparedDisk(drive, overlay, "qcow2", base)
        else:
            prepared[drive] = PreparedDisk(drive, base, base_format, base)
    if node.properties.cdrom_image:
        cdrom = resolve_image(node, "cdrom_image", node.properties.cdrom_image)
        info = await check_image_chain(node, qemu_img, "cdrom_image", cdrom)
        prepared["cdrom"] = PreparedDisk("cdrom", cdrom, str(info["format"]), cdrom)
    node.stash[DISKS] = prepared


async def _check_base(node: QemuNode, qemu_img: str, drive: str, base: Path, fmt: str) -> None:
    done = await qemuimg.check_base(qemu_img, base, fmt)
    if done.returncode == qemuimg.CHECK_CORRUPT:
        message = (
            f"hd{drive}_disk_image: base image {base} is corrupt; emu never repairs a base"
            f" image (other nodes share it): restore it from a copy. qemu-img: {done.output}"
        )
        node.emit("error", message)
        raise ImageError(node.name, message)
    if done.returncode == qemuimg.CHECK_LEAKS:
        node.emit("warning", f"hd{drive}_disk_image: base image {base} has leaked clusters")


async def _linked_clone(node: QemuNode, qemu_img: str, drive: str, base: Path, fmt: str) -> Path:
    overlay = overlay_path(node, drive)
    what = f"hd{drive}: the linked clone"
    try:
        exists = check_regular(overlay, what)
    except UnsafePathError as exc:
        raise ImageError(node.name, str(exc)) from None
    if not exists:
        # Create under a temporary name: a kill during creation leaves no half overlay.
        partial = overlay.with_suffix(".partial")
        partial.unlink(missing_ok=True)  # whatever a dead start (or a planted link) left
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt, str(partial)]
        done = await qemuimg.run(qemu_img, args, timeout=120)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageError(node.name, f"hd{drive}: cannot create linked clone: {done.output}")
        os.replace(partial, overlay)
        return overlay
    # The overlay may come with a project someone else made: read its header as qcow2 (never
    # probed), and accept no data file; its backing file is emu's to set.
    info = await qemuimg.info(qemu_img, overlay, image_format="qcow2")
    if info.get("format") != "qcow2":
        raise ImageError(node.name, f"{what} {overlay} is not a qcow2 overlay; move it away")
    if any(kind == "data file" for kind, _ in referenced_files(info)):
        raise ImageError(
            node.name,
            f"{what} {overlay} has an external data file, which emu's linked clones never"
            " have; move it away to start again from the base image",
        )
    if Path(info.get("full-backing-filename") or info.get("backing-filename") or "") != base:
        # The base moved (or the node points at another copy): rewrite the pointer only.
        args = ["rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", fmt, str(overlay)]
        done = await qemuimg.run(qemu_img, args, timeout=60)
        if done.returncode != 0:
            raise ImageError(node.name, f"hd{drive}: cannot rebase {overlay}: {done.output}")
        node.emit("info", f"hd{drive}: linked clone now points at {base}")
    # Leaks are what a killed QEMU leaves: repair those only, in the overlay.
    done = await qemuimg.run(qemu_img, ["check", "-q", "-f", "qcow2", "-r", "leaks", str(overlay)])
    if done.returncode not in (qemuimg.CHECK_OK, qemuimg.CHECK_LEAKS):
        message = (
            f"hd{drive}: the linked clone {overlay} is damaged (qemu-img check exit"
            f" {done.returncode}): {done.output}. Delete it to start again from the base image."
        )
        node.emit("error", message)
        raise ImageError(node.name, message)
    return overlay


def _platform(node: QemuNode) -> str:
    return binary(node).platform


def _disk_for(node: QemuNode, drive: str) -> tuple[Path, str]:
    """The file QEMU opens for a drive and its format, prepared or (dry run) predicted."""
    prepared = node.stash.get(DISKS, {}).get(drive)
    if prepared is not None:  # found, checked and opened by emu_prepare_disks at this start
        return prepared.path, prepared.format
    if drive == "cdrom":
        cdrom = resolve_image(node, "cdrom_image", node.properties.cdrom_image)
        return cdrom, sniff_format(cdrom)
    image = resolve_image(node, f"hd{drive}_disk_image", node.properties.disk_image(drive))
    if node.properties.linked_clone:
        return overlay_path(node, drive), "qcow2"
    return image, sniff_format(image)


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """One ``-drive`` (plus controller and ``-device`` where needed) per disk, and the cdrom."""
    props = node.properties
    x86 = _platform(node) in _X86
    args: list[str] = []
    controllers: set[str] = set()
    for index, drive in enumerate(DRIVES):
        if not props.disk_image(drive):
            continue
        path, fmt = _disk_for(node, drive)
        args += _drive_args(props.disk_interface(drive), index, path, fmt, x86, controllers)
    if props.cdrom_image:
        cdrom, cdrom_format = _disk_for(node, "cdrom")
        cdrom_drive: dict[str, str | int | bool] = {"file": str(cdrom), "format": cdrom_format}
        cdrom_drive |= {"id": CDROM_ID, "if": "ide", "index": 2, "media": "cdrom"}
        cdrom_drive["readonly"] = True
        args += ["-drive", opts(None, cdrom_drive)]
    return [ArgFragment(positions.DISKS, args, "qemu.disks")] if args else []


def _drive_args(
    interface: str, index: int, path: Path, fmt: str, x86: bool, controllers: set[str]
) -> list[str]:
    drive_id, disk_id = f"drive{index}", f"disk{index}"
    common = {"file": str(path), "format": fmt, "id": drive_id}
    if interface in ("ide", "virtio"):
        return ["-drive", opts(None, {**common, "if": interface, "index": index, "media": "disk"})]
    if interface in ("floppy", "pflash") or (interface in ("sd", "mtd") and not x86):
        return ["-drive", opts(None, {**common, "if": interface})]
    # The rest need a device (and maybe a controller) bound to a drive without interface.
    drive = ["-drive", opts(None, {**common, "if": "none"})]
    if interface == "sata":  # QEMU has no if=sata: AHCI controller + ide-hd
        head = _controller(controllers, "ahci0", "ahci")
        device = opts("ide-hd", {"drive": drive_id, "bus": f"ahci0.{index}", "id": disk_id})
    elif interface == "scsi":
        head = _controller(controllers, "scsi0", "virtio-scsi-pci")
        device = opts("scsi-hd", {"drive": drive_id, "bus": "scsi0.0", "id": disk_id})
    elif interface == "nvme":  # an NVMe controller needs a serial number
        head = []
        device = opts("nvme", {"drive": drive_id, "serial": f"emu{index}", "id": disk_id})
    elif interface == "sd":  # x86 has no SD slot: add a PCI SD host controller
        head = _controller(controllers, "sdhci0", "sdhci-pci")
        device = opts("sd-card", {"drive": drive_id, "id": disk_id})
    else:
        raise ValueError(f"unknown disk interface {interface!r}")
    return [*head, *drive, "-device", device]


def _controller(present: set[str], controller_id: str, device: str) -> list[str]:
    if controller_id in present:
        return []
    present.add(controller_id)
    return ["-device", opts(device, {"id": controller_id})]


@hookimpl(trylast=True)
def emu_live_properties(node: QemuNode) -> list[str]:
    """``cdrom_image`` changes while the node runs: the medium is swapped."""
    return ["cdrom_image"]


@hookimpl(trylast=True)
async def emu_update_running(
    node: QemuNode, previous: QemuProperties, changed: frozenset[str]
) -> None:
    """Swap the CD-ROM's medium over QMP: eject it, or insert the new image (checked like
    any image) read-only, as a user would at the machine."""
    if "cdrom_image" not in changed:
        return
    monitor = monitor_of(node)
    blocks = await monitor.execute("query-block")
    drive = next((b for b in blocks if b.get("device") == CDROM_ID), None)
    if drive is None:
        raise NodeError(
            node.name,
            "cdrom_image: the node started without a CD-ROM drive, so no medium can be"
            " inserted while it runs; stop it to add one",
        )
    disks = node.stash.setdefault(DISKS, {})
    wanted = node.properties.cdrom_image
    if not wanted:
        await monitor.execute("eject", {"id": drive["qdev"], "force": True})
        disks.pop("cdrom", None)
        return
    cdrom = resolve_image(node, "cdrom_image", wanted)
    info = await check_image_chain(node, qemu_img_of(node), "cdrom_image", cdrom)
    fmt = str(info["format"])
    medium = {"id": drive["qdev"], "filename": str(cdrom), "format": fmt}
    await monitor.execute("blockdev-change-medium", {**medium, "read-only-mode": "read-only"})
    disks["cdrom"] = PreparedDisk("cdrom", cdrom, fmt, cdrom)
