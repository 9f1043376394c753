"""Disks with the real qemu-img and real guests: linked clones never touch their base."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emu_qemu import qemuimg
from emu_qemu.disks import overlay_path
from emucore.digests import md5
from emucore.errors import ImageError
from emucore.models import HostSettings, NodeEvent
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_base(path: Path, size: str = "64M", data: bool = True) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if data:  # some allocated clusters, so there is something to protect
        subprocess.run(
            ["qemu-io", "-c", "write -P 0xab 0 1M", str(path)], check=True, capture_output=True
        )
    return path


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


@pytest.mark.qemu
def test_a_guest_writes_to_its_linked_clone_and_the_base_is_untouched(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_settings: Any
) -> None:
    base = make_base(emu_settings.image_dirs[0] / "base.qcow2")
    base_hash = sha256(base)

    async def body() -> None:
        node = await qemu_node("writer", hda_disk_image="base.qcow2", hda_disk_interface="virtio")
        overlay = overlay_path(node, "a")
        assert image_info(overlay)["backing-filename"] == str(base)
        console = await guest_console(node)
        status, out = await console.run(
            "dd if=/dev/urandom of=/dev/vda bs=64k count=16 conv=fsync 2>&1;"
            " dd if=/dev/vda bs=64k count=16 2>/dev/null | md5sum"
        )
        assert status == 0, out
        written = out.split()[-2]
        await node.stop()
        assert sha256(base) == base_hash
        assert image_info(overlay)["actual-size"] > 1 << 20
        await node.start()  # the overlay is reused: the guest finds its data again
        console = await guest_console(node)
        status, out = await console.run("dd if=/dev/vda bs=64k count=16 2>/dev/null | md5sum")
        assert out.split()[-2] == written

    emu_run(body())
    assert sha256(base) == base_hash


def test_overlays_are_created_before_the_first_start_and_follow_a_moved_base(
    emu_run: Any, emu_session: Session, emu_settings: Any, tmp_path: Path
) -> None:
    first_dir = emu_settings.image_dirs[0]
    base = make_base(first_dir / "moving.qcow2")
    node = emu_session.add_node(
        {"name": "mover", "emulator": "qemu", "hda_disk_image": "moving.qcow2"}
    )
    overlay = overlay_path(node, "a")
    emu_run(node.prepare_disks())  # a host may ask for the clone right away
    assert overlay.exists()
    assert image_info(overlay)["backing-filename"] == str(base)

    # The base moves (e.g. a project imported on another host): the overlay is rebased.
    other_dir = tmp_path / "other-images"
    other_dir.mkdir()
    moved = other_dir / "moving.qcow2"
    shutil.move(base, moved)
    again = Session(emu_session.project, settings=HostSettings(image_dirs=(other_dir,)))
    node2 = again.add_node({"name": "mover", "emulator": "qemu", "hda_disk_image": "moving.qcow2"})
    events: list[NodeEvent] = []
    again.events.subscribe(events.append)
    emu_run(node2.prepare_disks())
    assert image_info(overlay)["backing-filename"] == str(moved)
    assert [e.message for e in events if e.kind == "info"] == [
        f"hda: linked clone now points at {moved}"
    ]
    emu_run(again.close())


def corrupt(path: Path) -> None:
    """Point the first L2 entry at the L1 table's cluster: two owners for one cluster, which
    qemu-img check calls corruption (exit 2), not a mere leak."""
    with path.open("r+b") as image:
        header = image.read(72)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        image.seek(l1_offset)
        l2_offset = struct.unpack(">Q", image.read(8))[0] & 0x00FFFFFFFFFFFE00
        image.seek(l2_offset)
        image.write(struct.pack(">Q", (1 << 63) | l1_offset))


def test_a_corrupt_base_is_reported_never_repaired(
    emu_run: Any, emu_session: Session, emu_settings: Any
) -> None:
    base = make_base(emu_settings.image_dirs[0] / "bad.qcow2")
    corrupt(base)
    check = subprocess.run(["qemu-img", "check", str(base)], capture_output=True)
    assert check.returncode == qemuimg.CHECK_CORRUPT
    damaged = sha256(base)
    node = emu_session.add_node(
        {"name": "victim", "emulator": "qemu", "hda_disk_image": "bad.qcow2"}
    )
    events: list[NodeEvent] = []
    emu_session.events.subscribe(events.append)
    with pytest.raises(ImageError, match=r"base image .*bad.qcow2 is corrupt; emu never repairs"):
        emu_run(node.prepare_disks())
    assert [e.kind for e in events] == ["error"]
    assert sha256(base) == damaged  # left exactly as it was


def test_an_unchanged_base_is_checked_once(
    emu_run: Any, emu_settings: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    base = make_base(emu_settings.image_dirs[0] / "once.qcow2")
    qemu_img = qemuimg.find_qemu_img()
    calls: list[list[str]] = []
    real_run = qemuimg.run

    async def counting_run(binary: str, args: Any, timeout: float = 600.0) -> qemuimg.Completed:
        calls.append(list(args))
        return await real_run(binary, args, timeout)

    monkeypatch.setattr(qemuimg, "run", counting_run)
    first = emu_run(qemuimg.check_base(qemu_img, base, "qcow2"))
    second = emu_run(qemuimg.check_base(qemu_img, base, "qcow2"))
    assert first.returncode == second.returncode == qemuimg.CHECK_OK
    assert [c[0] for c in calls] == ["check"]
    subprocess.run(["qemu-io", "-c", "write 2M 64k", str(base)], check=True, capture_output=True)
    emu_run(qemuimg.check_base(qemu_img, base, "qcow2"))  # changed: checked again
    assert [c[0] for c in calls] == ["check", "check"]


def test_without_linked_clones_an_image_serves_one_node(
    emu_session: Session, emu_settings: Any, emu_run: Any
) -> None:
    make_base(emu_settings.image_dirs[0] / "mine.qcow2", data=False)
    first = emu_session.add_node(
        {"name": "one", "emulator": "qemu", "hda_disk_image": "mine.qcow2", "linked_clone": False}
    )
    with pytest.raises(ImageError, match="already used by node 'one' without linked_clone"):
        emu_session.add_node(
            {
                "name": "two",
                "emulator": "qemu",
                "hda_disk_image": "mine.qcow2",
                "linked_clone": False,
            }
        )
    emu_run(emu_session.remove_node(first.name))  # released when the node goes
    emu_session.add_node(
        {"name": "two", "emulator": "qemu", "hda_disk_image": "mine.qcow2", "linked_clone": False}
    )


def test_md5_is_lazy_cached_and_computed_off_the_loop(tmp_path: Path, emu_run: Any) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(b"emu" * 100_000)
    expected = hashlib.md5(image.read_bytes(), usedforsecurity=False).hexdigest()

    async def body() -> tuple[str, str, int]:
        loop_thread = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        first = await md5(image)
        task.cancel()
        assert loop_thread is asyncio.get_running_loop()
        second = await md5(image)
        return first, second, ticks

    first, second, ticks = emu_run(body())
    assert first == second == expected
    assert ticks > 0  # the loop kept running while the file was hashed in a thread
