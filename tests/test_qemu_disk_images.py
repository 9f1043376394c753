"""Disk images in a QEMU node's directory (GNS3's disk_image routes): create, resize, delete,
against the real qemu-img; refused while the node runs; names checked. And the md5 of every
image a node uses, reported with the node (GNS3's ``*_md5sum``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from emucore.errors import ConfigError, ImageError, NodeError, NodeStateError
from tests.conftest import QemuLab, run
from tests.helpers import qemu_img_info


def test_create_resize_delete_with_qemu_img(qemu_lab: QemuLab) -> None:
    node = qemu_lab.node()
    options = {"format": "qcow2", "size": 64, "cluster_size": 65536, "lazy_refcounts": "on"}
    run(node.create_disk_image("extra.qcow2", options))
    path = node.directory / "extra.qcow2"
    info = qemu_img_info(path)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == (
        "qcow2",
        64 << 20,
        65536,
    )
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    run(node.resize_disk_image("extra.qcow2", 32))
    assert qemu_img_info(path)["virtual-size"] == 96 << 20
    # GNS3 spells vmdk "vdmk"; raw images get their size at once.
    run(
        node.create_disk_image(
            "other.vmdk", {"format": "vdmk", "size": 8, "adapter_type": "lsilogic"}
        )
    )
    assert qemu_img_info(node.directory / "other.vmdk")["format"] == "vmdk"
    run(node.create_disk_image("flat.img", {"format": "raw", "size": 2, "preallocation": "full"}))
    assert (node.directory / "flat.img").stat().st_size == 2 << 20
    run(node.delete_disk_image("extra.qcow2"))
    assert not path.exists()
    with pytest.raises(ImageError, match=r"disk image 'extra\.qcow2': .* does not exist"):
        run(node.delete_disk_image("extra.qcow2"))


def test_a_linked_clone_is_extended_and_the_base_stays_as_it_was(qemu_lab: QemuLab) -> None:
    base = qemu_lab.image("base.qcow2", "16M")
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    with pytest.raises(ImageError, match="does not exist"):  # made at the first start
        run(node.resize_disk_image("hda_disk.qcow2", 16))
    run(node.prepare_disks())
    run(node.resize_disk_image("hda_disk.qcow2", 16))
    overlay = node.directory / "hda_disk.qcow2"
    assert qemu_img_info(overlay)["virtual-size"] == 32 << 20
    assert qemu_img_info(base)["virtual-size"] == 16 << 20
    run(node.delete_disk_image("hda_disk.qcow2"))  # the next start begins from the base again
    assert not overlay.exists()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"format": "qcow2"}, r"\$\.size: required"),
        ({"format": "qcow3", "size": 1}, r"\$\.format: must be one of"),
        ({"format": "qcow2", "size": 0}, r"\$\.size: must be"),
        ({"format": "qcow2", "size": "1M"}, r"\$\.size: must be an integer"),
        ({"format": "qcow2", "size": 1, "cluster_size": 1000}, r"power of two"),
        ({"format": "qcow2", "size": 1, "preallocation": "full,backing_file=/etc/x"}, "one of"),
        ({"format": "qcow2", "size": 1, "backing_file": "/etc/shadow"}, r"backing_file"),
        (["qcow2"], r"must be a table of options"),
    ],
)
def test_create_options_are_checked_before_qemu_img_runs(
    qemu_lab: QemuLab, options: Any, problem: str
) -> None:
    node = qemu_lab.node()
    with pytest.raises(ConfigError, match=problem):
        run(node.create_disk_image("new.qcow2", options))
    assert not (node.directory / "new.qcow2").exists()


def test_names_and_files_that_are_refused(qemu_lab: QemuLab, tmp_path: Path) -> None:
    node = qemu_lab.node()
    run(node.create_disk_image("a.qcow2", {"format": "qcow2", "size": 1}))
    with pytest.raises(NodeError, match="exists already"):
        run(node.create_disk_image("a.qcow2", {"format": "qcow2", "size": 1}))
    for name in ("qemu.log", "OVMF_VARS_4M.fd", "hda_disk.qcow2.partial"):
        with pytest.raises(NodeError, match="the name must end with one of"):
            run(node.delete_disk_image(name))
    with pytest.raises(NodeError, match="plain file name"):
        run(node.create_disk_image("../a.qcow2", {"format": "qcow2", "size": 1}))
    # A link planted in the node directory is never followed, its target never touched.
    target = tmp_path / "target.qcow2"
    target.write_bytes(b"precious")
    (node.directory / "planted.qcow2").symlink_to(target)
    for operation in (
        node.resize_disk_image("planted.qcow2", 1),
        node.delete_disk_image("planted.qcow2"),
        node.create_disk_image("planted.qcow2", {"format": "raw", "size": 1}),
    ):
        with pytest.raises(ImageError, match="a symbolic link"):
            run(operation)
    assert target.read_bytes() == b"precious"


def test_a_chain_leading_outside_the_image_directories_is_not_resized(
    qemu_lab: QemuLab, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "1M"], check=True)
    node = qemu_lab.node()
    node.make_directory()
    crafted = node.directory / "crafted.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(outside),
            "-F",
            "qcow2",
            str(crafted),
        ],
        check=True,
    )
    with pytest.raises(ImageError, match="outside the image directories"):
        run(node.resize_disk_image("crafted.qcow2", 1))
    assert qemu_img_info(crafted)["virtual-size"] == 1 << 20


@pytest.mark.qemu
def test_resize_and_delete_are_refused_while_the_node_runs(
    qemu_lab: QemuLab, qemu_binary: Path
) -> None:
    qemu_lab.image("base.qcow2", "8M")
    node = qemu_lab.node(qemu_path=str(qemu_binary), hda_disk_image="base.qcow2", ram=32)

    async def body() -> None:
        await node.start()
        try:
            with pytest.raises(
                NodeStateError, match=r"cannot resize hda_disk\.qcow2: the node is started"
            ):
                await node.resize_disk_image("hda_disk.qcow2", 8)
            with pytest.raises(NodeStateError, match=r"cannot delete hda_disk\.qcow2"):
                await node.delete_disk_image("hda_disk.qcow2")
            await node.create_disk_image("spare.qcow2", {"format": "qcow2", "size": 4})
        finally:
            await node.stop()
        await node.resize_disk_image("hda_disk.qcow2", 8)

    run(body())
    assert qemu_img_info(node.directory / "hda_disk.qcow2")["virtual-size"] == 16 << 20


def test_image_checksums_are_reported_with_the_node(qemu_lab: QemuLab) -> None:
    disk = qemu_lab.image("disk.qcow2", "4M")
    iso = qemu_lab.images / "cd.iso"
    iso.write_bytes(b"emu" * 50_000)
    node = qemu_lab.node(hda_disk_image="disk.qcow2", cdrom_image="cd.iso")
    info = run(node.info())
    assert info == {
        "hda_disk_image_md5sum": hashlib.md5(disk.read_bytes(), usedforsecurity=False).hexdigest(),
        "cdrom_image_md5sum": hashlib.md5(iso.read_bytes(), usedforsecurity=False).hexdigest(),
    }
    iso.write_bytes(b"changed")  # a new size and mtime: computed again
    assert run(node.info())["cdrom_image_md5sum"] == hashlib.md5(b"changed").hexdigest()
