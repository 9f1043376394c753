"""Saved VM state (``on_close = "save_vm_state"``): stop, start, and the guest goes on.

The tests boot the real tiny guest under QEMU with a real qcow2 disk (a linked clone of an
empty image) to hold the state, and look from inside the guest: a file written into its
RAM file system is still there after a stop and a start, and its uptime kept growing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emu_qemu.savestate import TAG
from emu_tests.guest import READY_MARKER
from emucore.errors import ConfigError, NodeError
from emucore.models import HostSettings, NodeEvent
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.helpers import guest_uptime, qcow2_snapshots

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]


@pytest.fixture
def empty_disk(emu_settings: HostSettings) -> Path:
    """A 64 MiB empty qcow2 image in the test's image directory."""
    path = Path(emu_settings.image_dirs[0]) / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.mark.qemu
def test_a_stopped_guest_resumes_where_it_was_and_other_on_close_discards_it(
    emu_run: Any,
    qemu_node: NodeFactory,
    guest_console: ConsoleFactory,
    emu_session: Session,
    empty_disk: Path,
) -> None:
    async def body() -> None:
        node = await qemu_node("warm", hda_disk_image=empty_disk.name, on_close="save_vm_state")
        console = await guest_console(node)
        assert (await console.run("echo kept-in-ram > /tmp/mark"))[0] == 0
        before = await guest_uptime(console)
        events: list[NodeEvent] = []
        emu_session.events.subscribe(events.append)
        await node.stop()
        overlay = node.directory / "hda_disk.qcow2"
        assert qcow2_snapshots(overlay) == [TAG]
        assert qcow2_snapshots(empty_disk) == []  # never the base image
        assert any(e.message.startswith("VM state saved in") for e in events)

        await node.start()
        assert any(e.message.startswith("saved VM state restored in") for e in events)
        again = await guest_console(node)
        status, out = await again.run("cat /tmp/mark")
        assert (status, out) == (0, "kept-in-ram")
        assert await guest_uptime(again) > before  # it went on: a boot would start from 0
        log = (node.directory / "console.log").read_text(errors="replace")
        assert READY_MARKER not in log  # no boot since the start
        # Saved again at the next stop (the state before is replaced, not added to).
        await node.stop()
        assert qcow2_snapshots(overlay) == [TAG]

        # A machine that no longer matches the state (more RAM) cannot take it: the start
        # fails saying what to do, and the state stays for a matching start.
        await emu_session.update_node("warm", {"ram": 160})
        with pytest.raises(NodeError, match=r"restoring the saved VM state failed .*power_off"):
            await node.start()
        assert qcow2_snapshots(overlay) == [TAG]

        # Another on_close: the saved state is discarded at the start, the guest boots.
        await emu_session.update_node("warm", {"on_close": "power_off"})
        await node.start()
        fresh = await guest_console(node)
        assert (await fresh.run("test -e /tmp/mark"))[0] == 1
        assert any("saved VM state was discarded" in e.message for e in events)
        await node.stop()
        assert qcow2_snapshots(overlay) == []

    emu_run(body())


def test_save_vm_state_needs_a_qcow2_disk(
    emu_session: Session, emu_settings: HostSettings, empty_disk: Path
) -> None:
    with pytest.raises(ConfigError, match=r"\$\.on_close: save_vm_state needs a hard disk"):
        emu_session.add_node({"name": "a", "emulator": "qemu", "on_close": "save_vm_state"})
    raw = Path(emu_settings.image_dirs[0]) / "raw.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(ConfigError, match=r"every hard disk in qcow2 \(not hdb_disk_image\)"):
        emu_session.add_node(
            {
                "name": "b",
                "emulator": "qemu",
                "on_close": "save_vm_state",
                "linked_clone": False,
                "hda_disk_image": empty_disk.name,
                "hdb_disk_image": raw.name,
            }
        )
    # With linked clones every disk QEMU writes is a qcow2 overlay: a raw base is fine.
    emu_session.add_node(
        {"name": "c", "emulator": "qemu", "on_close": "save_vm_state", "hda_disk_image": raw.name}
    )
