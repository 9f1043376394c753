"""UEFI (OVMF) and the TPM (swtpm): the tiny guest boots under OVMF and sees a TPM 2.0.

Every test that says it boots starts the real qemu-system-x86_64 under TCG with Debian's
OVMF firmware and the real swtpm (scripts/setup installs both).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emu_qemu.tpm import SWTPM
from emucore.errors import ConfigError, EmuError, ImageError, NodeError
from emucore.models import NodeEvent
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.conftest import QemuLab, run, values_of

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# OVMF and the kernel's EFI stub need more than the 128 MiB the tiny guest boots in.
UEFI_RAM = 256
MOUNT_EFIVARS = "load_on_demand && mkdir -p /efi && mount -t efivarfs none /efi"
EMU_VARIABLE = "/efi/EmuTest-3d2a5c4e-1f6b-4d8a-9c3e-5b7a1e2f4d6c"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.qemu
def test_the_guest_boots_under_uefi_with_a_tpm_and_keeps_its_variables(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory
) -> None:
    async def body() -> None:
        node = await qemu_node("efi", ram=UEFI_RAM, uefi=True, tpm=True)
        swtpm = node.stash[SWTPM]
        assert alive(swtpm.pid)
        console = await guest_console(node)
        status, out = await console.run(
            "ls /sys/firmware/efi; cat /sys/firmware/efi/fw_platform_size"
        )
        assert status == 0, out
        assert "efivars" in out or "runtime" in out, out
        assert out.splitlines()[-1] == "64"
        status, out = await console.run("cat /sys/class/tpm/tpm0/tpm_version_major")
        assert (status, out) == (0, "2")
        # A UEFI variable the guest writes (attributes: non-volatile, boot and run time).
        # One write() of attributes and data, as efivarfs wants: dd, not the shell.
        value = "printf '\\007\\000\\000\\000kept' > /tmp/variable"
        write = f"{value} && dd if=/tmp/variable of={EMU_VARIABLE} bs=64"
        status, out = await console.run(f"{MOUNT_EFIVARS}; {write}")
        assert status == 0, out
        # The node's own variable store, a copy of the host's template; the template and the
        # firmware are opened read-only (QEMU would refuse to write them).
        store = node.directory / "OVMF_VARS_4M.fd"
        assert store.stat().st_size == OVMF_VARS.stat().st_size
        assert f"file={store}" in " ".join(node.argv)
        assert f"readonly=on,file={OVMF_CODE}" in " ".join(node.argv)
        # The TPM's state lives in the node directory, and swtpm went down with QEMU.
        await node.stop()
        assert not alive(swtpm.pid)
        assert (node.directory / "tpm" / "tpm2-00.permall").stat().st_size > 0
        assert not (node.directory / "swtpm.sock").exists()
        # A restart keeps the node's variable store, and so a variable the guest wrote.
        inode = store.stat().st_ino
        await node.start()
        again = await guest_console(node)
        status, out = await again.run(f"{MOUNT_EFIVARS}; od -An -c {EMU_VARIABLE}")
        assert status == 0, out
        assert "k   e   p   t" in out
        await node.stop()
        assert store.stat().st_ino == inode

    emu_run(body())


def test_uefi_argv_and_refusals(qemu_lab: QemuLab) -> None:
    node = qemu_lab.node(uefi=True)
    argv = run(node.dry_run())
    assert values_of(argv, "-drive") == [
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        f"if=pflash,format=raw,file={node.directory}/OVMF_VARS_4M.fd",
    ]
    assert argv.index("-drive") < argv.index("-boot")  # the firmware, then how it boots
    assert not node.directory.exists()  # a dry run writes nothing
    qemu_lab.image("bios.bin", "1M", "raw")
    with pytest.raises(ConfigError, match=r"\$\.uefi: cannot be used together with bios_image"):
        qemu_lab.node(name="R3", uefi=True, bios_image="bios.bin")


def test_uefi_firmware_from_the_image_directories_when_the_setting_names_no_file(
    qemu_lab: QemuLab,
) -> None:
    (qemu_lab.images / "MY_CODE.fd").write_bytes(OVMF_CODE.read_bytes())
    settings = qemu_lab.settings(
        emulators={"qemu": {"ovmf_code": "/nonexistent/MY_CODE.fd", "kvm": "off"}}
    )
    argv = qemu_lab.argv(qemu_lab.session(settings), uefi=True)
    assert f"if=pflash,format=raw,readonly=on,file={qemu_lab.images}/MY_CODE.fd" in argv
    settings = qemu_lab.settings(emulators={"qemu": {"ovmf_code": "/nonexistent/NONE.fd"}})
    with pytest.raises(NodeError, match=r"uefi: the UEFI firmware file /nonexistent/NONE\.fd"):
        qemu_lab.argv(qemu_lab.session(settings), name="R2", uefi=True)


def test_tpm_argv(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(tpm=True)
    assert values_of(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=tpm0chr"]
    assert "socket,id=tpm0chr,path=swtpm.sock" in values_of(argv, "-chardev")
    assert "tpm-tis,tpmdev=tpm0" in values_of(argv, "-device")
    missing = qemu_lab.settings(emulators={"qemu": {"swtpm_path": "no-such-swtpm"}})
    with pytest.raises(NodeError, match="tpm: the TPM emulator 'no-such-swtpm' is not installed"):
        qemu_lab.argv(qemu_lab.session(missing), name="R2", tpm=True)


@pytest.mark.qemu
def test_a_failing_swtpm_is_an_error_event_with_its_log(
    emu_run: Any, qemu_node: NodeFactory, emu_session: Session
) -> None:
    async def body() -> None:
        node = await qemu_node("badtpm", start=False, tpm=True)
        state = node.make_directory() / "tpm"
        state.mkdir()
        (state / "tpm2-00.permall").write_bytes(b"not a TPM state" * 100)
        events: list[NodeEvent] = []
        emu_session.events.subscribe(events.append)
        with pytest.raises(EmuError):
            await node.start()
        errors = [e for e in events if e.kind == "error" and e.message.startswith("tpm: swtpm")]
        assert errors, [e.message for e in events]
        assert "Could not initialize the TPM" in errors[0].details  # swtpm's own words
        assert not (node.directory / "swtpm.sock").exists()

    emu_run(body())


def test_the_tpm_state_directory_must_hold_plain_files(
    qemu_lab: QemuLab, emu_run: Any, tmp_path: Path
) -> None:
    node = qemu_lab.node(tpm=True)
    state = node.make_directory() / "tpm"
    state.mkdir()
    (state / "tpm2-00.permall").symlink_to(tmp_path / "elsewhere")

    async def body() -> None:
        with pytest.raises(ImageError, match="a symbolic link"):
            await node.start()

    emu_run(body())
    assert not (tmp_path / "elsewhere").exists()
