"""Every built-in piece can be blocked and replaced, and the node still works.

For each plugin of the QEMU and VPCS emulators, the test blocks it by name and registers a
replacement under another name: a new module object carrying the same hook functions. The
node must then boot for real (the tiny guest's shell answers; VPCS' prompt answers). With
tests/test_architecture.py (no hook module imports another), this shows that nothing reaches
a piece but through hooks and the declared contracts (``emu_qemu.contract``,
``emu_vpcs.terminal``): no one looks a plugin up by its name, and no module's state is
written behind the hooks' back. A replacement written from scratch is tried for
``qemu.binary`` as well. Where a piece does nothing for a plain node (UEFI, the TPM, the
saved state...), the node asks for what it provides, and the test sees it done.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from emu_qemu import qemuimg
from emu_qemu.contract import QemuNode
from emu_qemu.qemubinary import QemuBinary, find_binary
from emu_tests.guest import TinyGuest
from emu_tests.vpcs_fixtures import open_vpcs_console, vpcs_command
from emucore import hookimpl
from emucore.models import HostSettings, Project
from emucore.plugins import make_plugin_manager
from emucore.records import ArgFragment
from emucore.session import Session

pytestmark = pytest.mark.qemu


def plugins_of(package: str) -> dict[str, str]:
    """Plugin name → module of the installed plugins of ``package``."""
    points = importlib.metadata.entry_points(group="emucore.plugins")
    return {p.name: p.value for p in points if p.value.startswith(f"{package}.")}


def copy_of(module: types.ModuleType) -> types.ModuleType:
    """A new plugin object with ``module``'s hook implementations (and emulator scope)."""
    copy = types.ModuleType(f"replacement_of_{module.__name__}")
    for name in dir(module):
        function = getattr(module, name)
        if name.startswith("emu_") and hasattr(function, "emucore_impl"):
            setattr(copy, name, function)
    if hasattr(module, "EMULATOR"):
        copy.EMULATOR = module.EMULATOR  # type: ignore[attr-defined]
    return copy


def session_replacing(
    tmp_path: Path, settings: HostSettings, name: str, replacement: object
) -> Session:
    manager = make_plugin_manager(
        environ={}, blocked=[name], plugins=[(f"replacement-of-{name}", replacement)]
    )
    assert manager.get_plugin(name) is None
    return Session(Project.for_directory(tmp_path / "project"), settings=settings, plugins=manager)


def tiny_node(session: Session, guest: TinyGuest, **extra: Any) -> QemuNode:
    return session.add_node(
        {
            "name": "r1",
            "emulator": "qemu",
            "ram": 128,
            "adapter_type": "virtio-net-pci",
            "kernel_image": str(guest.kernel),
            "initrd": str(guest.initrd),
            "kernel_command_line": guest.kernel_command_line(ip="10.0.0.1/24", hostname="r1"),
            "cpu_throttling": 90,  # so the throttle piece has work to do
            "process_priority": "low",
            "aux_type": "telnet",  # and the console piece two consoles
            **extra,
        }
    )


Check = Callable[[QemuNode], Awaitable[None]]


async def boots(session: Session, node: QemuNode, check: Check | None = None) -> str:
    from emu_tests.console import open_guest_console

    try:
        await node.create_disk_image("spare.qcow2", {"format": "qcow2", "size": 1})
        await node.start()
        console = await open_guest_console(node)
        try:
            _, output = await console.run("ip -o addr show eth0")
        finally:
            await console.close()
        if check is not None:
            await check(node)
        return output
    finally:
        await session.close()


async def in_guest(node: QemuNode, command: str) -> int:
    from emu_tests.console import open_guest_console

    console = await open_guest_console(node)
    try:
        status, _ = await console.run(command)
        return status
    finally:
        await console.close()


async def uefi_booted(node: QemuNode) -> None:
    assert await in_guest(node, "test -d /sys/firmware/efi") == 0


async def tpm_present(node: QemuNode) -> None:
    assert await in_guest(node, "test -e /sys/class/tpm/tpm0") == 0


async def state_saved(node: QemuNode) -> None:
    await node.stop()
    info = await qemuimg.info(qemuimg.find_qemu_img(), node.directory / "hda_disk.qcow2")
    assert [snapshot["name"] for snapshot in info["snapshots"]] == ["emu-saved-state"]


async def aux_reported(node: QemuNode) -> None:
    assert (await node.info())["aux"] > 0


async def checksums_reported(node: QemuNode) -> None:
    assert len((await node.info())["kernel_image_md5sum"]) == 32


async def disk_image_made(node: QemuNode) -> None:
    assert (node.directory / "spare.qcow2").is_file()


def piece_at_work(name: str, images: Path) -> tuple[dict[str, Any], Check | None]:
    """What the node needs for the piece ``name`` to have work to do, and how to see it done."""
    if name == "qemu.savestate":
        disk = images / "state.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        return {"hda_disk_image": disk.name, "on_close": "save_vm_state"}, state_saved
    at_work: dict[str, tuple[dict[str, Any], Check]] = {
        "qemu.uefi": ({"uefi": True, "ram": 256}, uefi_booted),
        "qemu.tpm": ({"tpm": True}, tpm_present),
        "qemu.console": ({}, aux_reported),
        "qemu.checksums": ({}, checksums_reported),
        "qemu.diskimages": ({}, disk_image_made),
    }
    return at_work.get(name, ({}, None))


@pytest.mark.parametrize("name", sorted(plugins_of("emu_qemu")))
def test_each_qemu_piece_can_be_replaced(
    name: str, tmp_path: Path, emu_settings: HostSettings, tiny_guest: TinyGuest, emu_run: Any
) -> None:
    module = importlib.import_module(plugins_of("emu_qemu")[name])
    session = session_replacing(tmp_path, emu_settings, name, copy_of(module))
    extra, check = piece_at_work(name, Path(emu_settings.image_dirs[0]))
    output = emu_run(boots(session, tiny_node(session, tiny_guest, **extra), check))
    assert "10.0.0.1/24" in output


@pytest.mark.parametrize("name", sorted(plugins_of("emu_vpcs")))
def test_each_vpcs_piece_can_be_replaced(
    name: str, tmp_path: Path, emu_settings: HostSettings, emu_run: Any
) -> None:
    module = importlib.import_module(plugins_of("emu_vpcs")[name])
    session = session_replacing(tmp_path, emu_settings, name, copy_of(module))
    node = session.add_node({"name": "pc1", "emulator": "vpcs", "ip": "10.0.0.2/24"})

    async def body() -> str:
        try:
            await node.start()
            console = await open_vpcs_console(node)
            try:
                return await vpcs_command(console, "show ip")
            finally:
                await console.close()
        finally:
            await session.close()

    assert "10.0.0.2/24" in emu_run(body())


class PinnedBinary:
    """A replacement for ``qemu.binary`` written from scratch: always one given binary."""

    EMULATOR = "qemu"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.asked = 0

    @hookimpl
    def emu_qemu_binary(self, node: QemuNode) -> QemuBinary:
        self.asked += 1
        return find_binary(node.properties, node.emulator_settings, node.name)

    @hookimpl
    def emu_build_args(self, node: QemuNode) -> Sequence[ArgFragment]:
        return [ArgFragment(0, (str(self.path),), "pinned-binary")]


def test_a_binary_plugin_written_from_scratch_runs_the_node(
    tmp_path: Path,
    emu_settings: HostSettings,
    tiny_guest: TinyGuest,
    emu_run: Any,
    qemu_binary: Path,
) -> None:
    pinned = PinnedBinary(qemu_binary)
    session = session_replacing(tmp_path, emu_settings, "qemu.binary", pinned)
    node = tiny_node(session, tiny_guest)
    assert "10.0.0.1/24" in emu_run(boots(session, node))
    assert node.argv[0] == str(qemu_binary)
    assert pinned.asked > 0  # the accelerator, disks and network asked it, not qemu.binary


def test_without_any_binary_plugin_the_error_says_what_is_missing(
    tmp_path: Path, emu_settings: HostSettings, tiny_guest: TinyGuest, emu_run: Any
) -> None:
    from emucore.errors import NodeError

    manager = make_plugin_manager(environ={}, blocked=["qemu.binary"])
    session = Session(Project.for_directory(tmp_path), settings=emu_settings, plugins=manager)
    with pytest.raises(NodeError, match=r"is qemu\.binary blocked without a replacement"):
        emu_run(tiny_node(session, tiny_guest).dry_run())
