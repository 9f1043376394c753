"""Untrusted labs, nodes and images: each attack as a hostile lab would try it, failing safely.

Every test plants what a lab or image someone else made could hold (a symbolic link in a
project tree, a qcow2 header naming a host file, an option in QEMU's JSON syntax...), runs
emu for real (QEMU, qemu-img, VPCS), and checks the victim is untouched (its bytes, or a base
image's sha256), the error names the field or file, and no process is left behind.
See docs/security.md.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from emu_vpcs.process import PROCESS

from emucore.errors import EmuError, EmulatorExitedError, ImageError
from emucore.files import UnsafePathError
from emucore.node import Node
from emucore.telnet import TelnetConsole
from tests.conftest import QemuLab, run
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.usefixtures("kvm_off")

SECRET = b"victim: must never be read, written or handed to a guest\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def victim(directory: Path, name: str = "victim.raw") -> Path:
    """A file outside the image and project directories that nothing may touch."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(SECRET * 1024)
    return path


def base_image(lab: QemuLab, name: str = "base.qcow2") -> Path:
    path = lab.images / name
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    return path


def start_refused(node: Node, error: type[EmuError] = ImageError) -> str:
    """Start ``node``, which must fail with ``error``; no QEMU of the node may be left."""
    with pytest.raises(error) as info:
        run(node.start())
    assert node.status.value == "stopped"
    assert processes_mentioning(str(node.directory)) == {}
    return str(info.value)


async def started_then_stopped(node: Node) -> str:
    """Start ``node`` and stop it again (one event loop); the status it reached."""
    try:
        await node.start()
        return node.status.value
    finally:
        await node.stop()


# -- 1. a symbolic link in place of a linked clone ----------------------------------------------


@pytest.mark.parametrize("target", ["base", "other qcow2"])
def test_a_planted_link_in_place_of_an_overlay_is_refused(qemu_lab: QemuLab, target: str) -> None:
    base = base_image(qemu_lab)
    other = qemu_lab.root / "elsewhere" / "other.qcow2"
    other.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(other), "16M")
    pointed = base if target == "base" else other
    before = {path: sha256(path) for path in (base, other)}
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    node.make_directory()
    (node.directory / "hda_disk.qcow2").symlink_to(pointed)
    message = start_refused(node)
    assert "hda: the linked clone" in message
    assert f"is a symbolic link to {pointed}" in message
    assert {path: sha256(path) for path in (base, other)} == before


def test_a_hard_link_to_the_base_in_place_of_an_overlay_is_refused(qemu_lab: QemuLab) -> None:
    base = base_image(qemu_lab)
    before = sha256(base)
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    node.make_directory()
    (node.directory / "hda_disk.qcow2").hardlink_to(base)
    assert "a regular file with 2 hard links" in start_refused(node)
    assert sha256(base) == before


def test_a_planted_link_in_the_project_tree_is_not_followed(qemu_lab: QemuLab) -> None:
    base_image(qemu_lab)
    elsewhere = qemu_lab.root / "elsewhere"
    elsewhere.mkdir()
    qemu_lab.project.directory.mkdir(parents=True)
    (qemu_lab.project.directory / "project-files").symlink_to(elsewhere)
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    message = start_refused(node, UnsafePathError)
    assert "project-files is a symbolic link to" in message
    assert list(elsewhere.iterdir()) == []


# -- 2. qcow2 metadata naming files outside the image directories -------------------------------


def test_a_base_whose_backing_file_is_outside_is_refused(qemu_lab: QemuLab) -> None:
    secret = victim(qemu_lab.root / "elsewhere")
    base = qemu_lab.images / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(base))
    before = sha256(secret)
    message = start_refused(qemu_lab.node(hda_disk_image="base.qcow2"))
    assert f"hda_disk_image: {base} names {secret} as its backing file" in message
    assert "outside the image directories" in message
    assert sha256(secret) == before
    assert not (qemu_lab.project.directory / "project-files").exists() or not any(
        qemu_lab.project.directory.rglob("*.qcow2")
    )


@pytest.mark.parametrize("linked_clone", [True, False])
def test_a_base_whose_data_file_is_outside_is_refused(
    qemu_lab: QemuLab, linked_clone: bool
) -> None:
    secret = victim(qemu_lab.root / "elsewhere")
    base = qemu_lab.images / "base.qcow2"
    options = f"data_file={secret},data_file_raw=on"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, str(base), "1M")
    before = sha256(secret)
    node = qemu_lab.node(hda_disk_image="base.qcow2", linked_clone=linked_clone)
    message = start_refused(node)
    assert f"names {secret} as its data file, outside the image directories" in message
    assert sha256(secret) == before


def test_a_backing_chain_is_followed_to_its_end(qemu_lab: QemuLab) -> None:
    secret = victim(qemu_lab.root / "elsewhere")
    middle = qemu_lab.images / "middle.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(middle))
    top = qemu_lab.images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(middle), "-F", "qcow2", str(top))
    message = start_refused(qemu_lab.node(hda_disk_image="top.qcow2"))
    assert f"{top} (through {middle}) names {secret} as its backing file" in message


def test_a_backing_file_given_as_json_is_refused(qemu_lab: QemuLab) -> None:
    secret = victim(qemu_lab.root / "elsewhere")
    base = qemu_lab.images / "base.qcow2"
    backing = f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}'
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(base), "1M")
    message = start_refused(qemu_lab.node(hda_disk_image="base.qcow2"))
    assert "names its backing file as 'json:" in message
    assert "only files are allowed" in message


def test_a_vmdk_descriptor_naming_a_host_file_is_refused_before_qemu_img_reads_it(
    qemu_lab: QemuLab,
) -> None:
    secret = victim(qemu_lab.root / "elsewhere")
    descriptor = qemu_lab.images / "appliance.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW 2048 FLAT "{secret}" 0\n'
    )
    message = start_refused(qemu_lab.node(hda_disk_image="appliance.vmdk"))
    assert f"names {secret} as its extent, outside the image directories" in message


def test_a_chain_inside_the_image_directories_is_used(qemu_lab: QemuLab) -> None:
    """The checks refuse only what leaves the image directories: a chain inside them starts."""
    lower = qemu_lab.images / "lower.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(lower), "16M")
    upper = qemu_lab.images / "upper.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "lower.qcow2", "-F", "qcow2", str(upper))
    before = {path: sha256(path) for path in (lower, upper)}
    node = qemu_lab.node(hda_disk_image="upper.qcow2")
    assert run(started_then_stopped(node)) == "started"
    assert {path: sha256(path) for path in (lower, upper)} == before


# -- 5. links planted where emu writes its own files ------------------------------------------


def test_emu_never_writes_through_a_link_in_a_node_directory(qemu_lab: QemuLab) -> None:
    targets = {
        name: victim(qemu_lab.root / "elsewhere", name)
        for name in ("qemu.log", "qemu.pid", "console.log", "hda_disk.partial")
    }
    base_image(qemu_lab)
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    node.make_directory()
    for name, target in targets.items():
        (node.directory / name).symlink_to(target)
    assert run(started_then_stopped(node)) == "started"
    assert not (node.directory / "qemu.log").is_symlink()
    assert (node.directory / "qemu.log").read_text().strip()
    for target in targets.values():
        assert target.read_bytes() == SECRET * 1024


def test_a_capture_never_writes_through_a_planted_link(qemu_lab: QemuLab) -> None:
    """QEMU opens a capture file by name; the core leaves it a fresh regular file first."""
    target = victim(qemu_lab.root / "elsewhere", "capture-target")
    node = qemu_lab.node()
    node.make_directory()
    capture = node.directory / "capture.pcap"
    capture.symlink_to(target)

    async def body() -> bytes:
        try:
            await node.start()
            await node.start_capture(0, capture)
            await node.stop_capture(0)
            return capture.read_bytes()
        finally:
            await node.stop()

    assert run(body())[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")  # a pcap header
    assert not capture.is_symlink()
    assert target.read_bytes() == SECRET * 1024


# -- 10. long lines into a VPCS console ---------------------------------------------------------


def test_a_flood_of_long_lines_cannot_crash_vpcs(
    emu_run: Any, vpcs_node: Any, vpcs_console: Any
) -> None:
    """VPCS 0.8 segfaults on a line of about 144 characters or more, and keeps only the first
    of several lines typed at once; its console server cuts every line to what VPCS can hold
    and types one line per prompt, so 1 MB of long lines leaves it running, every line read."""

    async def body() -> None:
        pc = await vpcs_node("pc1", ip="10.0.0.1/24")
        console = await vpcs_console(pc)
        pid = pc.stash[PROCESS].pid
        line = "show " + "x" * 4000
        count = 1_000_000 // (len(line) + 1)
        await console.send((line + "\r") * count)
        await console.sendline("echo still-answering")
        await console.expect("\nstill-answering", timeout=60)
        # "show" with an argument it does not know: one complaint per line read.
        assert console.transcript.count("Invalid arguments") == count
        assert pc.status.value == "started"
        assert pc.stash[PROCESS].alive
        assert pc.stash[PROCESS].pid == pid  # not restarted either

    emu_run(body())


# -- 11. smaller ------------------------------------------------------------------------------


def test_a_qemu_console_serves_a_second_client(
    emu_run: Any, qemu_node: Any, guest_console: Any
) -> None:
    """QEMU's own telnet server left a second client hanging; the host's serves both."""

    async def body() -> None:
        node = await qemu_node("r1")
        first = await guest_console(node)
        second = await TelnetConsole.connect(node.console.host, node.console.port, name="2nd")
        try:
            await second.sendline("echo typed-by-$((1+1))nd")
            await first.expect("typed-by-2nd", timeout=30)
            await first.expect(first.prompt, timeout=30)
            await second.expect("typed-by-2nd", timeout=30)
            status, output = await first.run("echo from-the-first")
            assert (status, output) == (0, "from-the-first")
            await second.expect("from-the-first", timeout=30)
        finally:
            await second.close()

    emu_run(body())


def test_an_error_says_what_qemu_said_not_its_command_line(qemu_lab: QemuLab) -> None:
    """With 275 adapters QEMU's command line is about 40 KB: it stays in qemu.log, and the
    error shows QEMU's own complaint."""
    node = qemu_lab.node(adapters=275, options="-device e1000,no-such-property=1")
    message = start_refused(node, EmulatorExitedError)
    assert "no-such-property" in message
    assert "-netdev" not in message
    assert len(message) < 2000
    log = (node.directory / "qemu.log").read_text()
    assert log.startswith("emu: command line: ")
    assert "-netdev" in log.splitlines()[0]
