"""Changes to a running QEMU node: the CD-ROM's medium is swapped and the guest reads the new
disc, the CPU quota changes; what cannot change live is refused before anything changes.

The guest here also has an auxiliary telnet console (its second serial port), whose shell
is used to read the disc: both consoles reach the same running guest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emu_qemu.contract import monitor_of, prepared_disks
from emu_qemu.throttle import throttling_of
from emu_tests.console import wait_for_prompt
from emucore.errors import ImageError, NodeError, NodeStateError
from emucore.models import HostSettings
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]

# What the guest reads from the disc: its first 16 bytes, without the padding. The first
# read after a swap fails (the drive reports the change: "unit attention"), so the guest
# tries again, a bounded number of times.
READ_DISC = (
    "for try in 1 2 3 4 5 6 7 8 9 10; do"
    " label=$(dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 16 | tr -d '\\000');"
    ' [ -n "$label" ] && break; sleep 0.3; done; echo "$label"'
)


def disc(directory: Path, name: str, label: str) -> Path:
    """A raw "disc" of 1 MiB whose first bytes are ``label``."""
    path = directory / name
    path.write_bytes(label.encode().ljust(1 << 20, b"\0"))
    return path


@pytest.mark.qemu
def test_the_cdrom_medium_is_swapped_while_the_guest_runs(
    emu_run: Any,
    qemu_node: NodeFactory,
    guest_console: ConsoleFactory,
    emu_session: Session,
    emu_settings: HostSettings,
) -> None:
    images = Path(emu_settings.image_dirs[0])
    first, second = (
        disc(images, "first.iso", "EMU-DISC-FIRST"),
        disc(images, "second.iso", "EMU-DISC-SECOND"),
    )

    async def body() -> None:
        node = await qemu_node("cd", cdrom_image=first.name, aux_type="telnet")
        console = await guest_console(node)
        # Kernel messages (the I/O error of a read after a swap) stay off the console.
        status, out = await console.run(f"dmesg -n 1; load_on_demand 2>/dev/null; {READ_DISC}")
        assert (status, out) == (0, "EMU-DISC-FIRST")

        await emu_session.update_node("cd", {"cdrom_image": second.name})
        assert node.properties.cdrom_image == second.name
        assert prepared_disks(node)["cdrom"].path == second
        status, out = await console.run(READ_DISC)
        assert (status, out) == (0, "EMU-DISC-SECOND")

        # Ejected: the drive stays, empty; then a disc goes in again.
        await emu_session.update_node("cd", {"cdrom_image": ""})
        status, out = await console.run("dd if=/dev/sr0 bs=2048 count=1 of=/dev/null")
        assert status != 0, out
        await emu_session.update_node("cd", {"cdrom_image": first.name})

        # The second serial port has a shell too, in the same guest.
        info = await node.info()
        aux = await TelnetConsole.connect(node.settings.console_host, info["aux"], name="aux")
        try:
            await wait_for_prompt(aux)
            status, out = await aux.run(f"tty; {READ_DISC}")
            assert (status, out) == (0, "/dev/ttyS1\nEMU-DISC-FIRST")
        finally:
            await aux.close()

        # The CPU quota changes live too, through the same hooks.
        await emu_session.update_node("cd", {"cpu_throttling": 50})
        throttling = throttling_of(node)
        assert throttling is not None
        assert throttling.percent == 50

        # Refused before anything changes: the CD-ROM stays as it is.
        with pytest.raises(NodeStateError, match="cannot change ram while the node is started"):
            await emu_session.update_node("cd", {"ram": 256, "cdrom_image": second.name})
        with pytest.raises(ImageError, match=r"cdrom_image: image 'missing\.iso' not found"):
            await emu_session.update_node("cd", {"cdrom_image": "missing.iso"})
        assert node.properties.cdrom_image == first.name
        blocks = await monitor_of(node).execute("query-block")
        (cdrom,) = [b for b in blocks if b["device"] == "cdrom0"]
        assert cdrom["inserted"]["file"] == str(first)
        assert cdrom["inserted"]["ro"] is True

    emu_run(body())


def test_a_node_started_without_a_cdrom_drive_says_so(
    emu_run: Any, emu_session: Session, emu_settings: HostSettings, qemu_binary: Path
) -> None:
    iso = disc(Path(emu_settings.image_dirs[0]), "late.iso", "LATE")

    async def body() -> None:
        description = {"name": "nocd", "emulator": "qemu", "qemu_path": str(qemu_binary)}
        node = emu_session.add_node(description | {"ram": 32, "adapters": 0})
        await node.start()
        with pytest.raises(NodeError, match="started without a CD-ROM drive"):
            await emu_session.update_node("nocd", {"cdrom_image": iso.name})
        assert node.properties.cdrom_image == ""
        await node.stop()
        await emu_session.update_node("nocd", {"cdrom_image": iso.name})  # for the next start

    emu_run(body())
