"""Lab snapshots on real QEMU: a lab saved once comes back at that moment, without a boot.

The guests are the tiny guest under TCG, and everything is looked at from where a user
would: inside the guests (a file in the RAM file system, the uptime, the clock, pings), in
the capture (read with dpkt), in the qcow2 files (``qemu-img info``) and in the base
images (their sha256).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from emu_qemu.vmstate import tag_of
from emu_tests.console import open_guest_console
from emu_tests.guest import READY_MARKER, TinyGuest
from emucore.errors import NodeError
from emucore.lab import load_lab
from emucore.models import HostSettings, NodeEvent
from emucore.node import Node
from emucore.runner import LabRunner
from emucore.session import Session
from tests.helpers import (
    guest_uptime,
    icmp_pairs,
    processes_mentioning,
    qcow2_snapshots,
)

EMU = [sys.executable, "-m", "emucore.cli"]

LAB = """
name = "warm"

[nodes.a]
image = "tiny"
ip = "10.0.0.1/24"

[nodes.b]
image = "tiny"
adapters = 2
ip = "10.0.0.2/24"
ips = { eth1 = "10.0.1.2/24" }

[nodes.pc]
emulator = "vpcs"
ip = "10.0.1.1/24"
gateway = "10.0.1.2"

[[links]]
endpoints = ["a:0", "b:0"]

[[links]]
endpoints = ["b:1", "pc:0"]

[[captures]]
endpoint = "a:0"
"""

SETTINGS = HostSettings(emulators={"qemu": {"kvm": "off"}})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def shell(node: Node, command: str) -> str:
    """Run ``command`` on a tiny guest's shell; its output (it must succeed)."""
    console = await open_guest_console(node)
    try:
        status, output = await console.run(command, timeout=60)
    finally:
        await console.close()
    assert status == 0, f"{node.name}: {command!r} failed: {output}"
    return output


def runner(path: Path, state: str | None = None) -> LabRunner:
    lab = load_lab(tomllib.loads(path.read_text()), str(path))
    return LabRunner(lab, path, settings=SETTINGS, from_state=state)


@pytest.mark.qemu
def test_a_lab_comes_back_from_its_snapshot_without_a_boot(
    tmp_path: Path, tiny_guest: TinyGuest, emu_run: Any
) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(LAB)
    bases = [tiny_guest.kernel, tiny_guest.initrd]
    digests = {base: sha256(base) for base in bases}
    uptimes: dict[str, float] = {}

    async def save() -> float:
        cold = runner(path)
        try:
            await cold.start()
            assert cold.session is not None
            for name in ("a", "b"):
                console = await open_guest_console(cold.session.node(name))
                try:
                    assert (await console.run(f"echo kept-{name} > /tmp/mark"))[0] == 0
                    uptimes[name] = await guest_uptime(console)
                finally:
                    await console.close()
            assert await cold.save("converged") == ["pc"]
            return time.time()
        finally:
            await cold.stop()

    saved_at = emu_run(save())
    nodes = tmp_path / ".emu" / "warm" / "project-files" / "qemu"
    files = sorted(nodes.glob("*/states/converged.qcow2"))
    assert len(files) == 2  # the machines' states, beside their nodes
    assert all(qcow2_snapshots(file) == [tag_of("converged")] for file in files)

    async def restore() -> None:
        listed, stateless = await runner(path).snapshots()
        assert [(s.name, sorted(s.states)) for s in listed] == [("converged", ["a", "b"])]
        assert stateless == ["pc"]
        # Kept a while: a guest clock left alone would now be this far behind the host's.
        await asyncio.sleep(max(0.0, saved_at + 5 - time.time()))
        warm = runner(path, "converged")
        session = warm.build()
        events: list[NodeEvent] = []
        session.events.subscribe(events.append)
        try:
            await warm.start()
            a, b = session.node("a"), session.node("b")
            # The links carry traffic at once, with no loss.
            out = await shell(a, "ping -c 5 -i 0.2 10.0.0.2")
            assert "5 packets received, 0% packet loss" in out, out
            out = await shell(b, "ping -c 3 -i 0.2 10.0.1.1")
            assert "3 packets received, 0% packet loss" in out, out
            for node in (a, b):
                console = await open_guest_console(node)
                try:
                    assert await console.run("cat /tmp/mark") == (0, f"kept-{node.name}")
                    assert await guest_uptime(console) > uptimes[node.name]  # a boot starts at 0
                    status, out = await console.run("date +%s")
                    assert status == 0, out
                    assert abs(int(out) - time.time()) < 3, "the clock was not set from the RTC"
                finally:
                    await console.close()
                log = (node.directory / "console.log").read_text(errors="replace")
                assert READY_MARKER not in log  # no boot since the start
            assert (warm.restored, warm.started_afresh) == (["a", "b"], ["pc"])
            assert any(e.node == "pc" and "started afresh" in e.message for e in events)
            assert {n["name"]: n["from_state"] for n in warm.state()["nodes"]} == {
                "a": "converged",
                "b": "converged",
                "pc": None,
            }
        finally:
            await warm.stop()
        # The capture, started after the restore, saw the pings.
        pairs = icmp_pairs(tmp_path / "captures" / "a-0.pcap")
        assert {("request", "10.0.0.1", "10.0.0.2"), ("reply", "10.0.0.2", "10.0.0.1")} <= pairs
        freed = await runner(path).delete_snapshot("converged")
        assert freed > 20 << 20  # two machine states, about 50 MiB each
        assert (await runner(path).snapshots())[0] == []

    emu_run(restore())
    assert {base: sha256(base) for base in bases} == digests
    assert processes_mentioning(str(tmp_path / ".emu")) == {}


@pytest.mark.qemu
def test_a_state_that_no_longer_fits_is_refused_naming_what_changed(
    emu_run: Any,
    qemu_node: Any,
    emu_session: Session,
    emu_settings: HostSettings,
) -> None:
    images = Path(emu_settings.image_dirs[0])
    for name in ("disk.qcow2", "other.qcow2"):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(images / name), "16M"], check=True
        )
    (images / "raw.img").write_bytes(bytes(1 << 20))
    disk, other = images / "disk.qcow2", images / "other.qcow2"

    async def body() -> None:
        raw = await qemu_node("raw", hda_disk_image="raw.img", linked_clone=False)
        with pytest.raises(NodeError, match=r"'s': the node needs every hard disk in qcow2"):
            await raw.save_state("s")
        await raw.stop()

        node = await qemu_node("n", hda_disk_image=disk.name)
        await shell(node, "true")  # booted
        await node.save_state("s")
        await node.stop()
        assert [state.name for state in await node.states()] == ["s"]
        assert qcow2_snapshots(node.directory / "hda_disk.qcow2") == [tag_of("s")]  # the disk, too
        assert qcow2_snapshots(disk) == []  # never the base image
        with pytest.raises(NodeError, match=r"no saved state 'nope' \(saved states: s\)"):
            await node.start(state="nope")

        # A machine QEMU cannot take the state into: the error names what changed.
        await emu_session.update_node("n", {"ram": 160})
        with pytest.raises(NodeError, match=r"'s' cannot be restored: QEMU refused .*ram \(128"):
            await node.start(state="s")
        assert node.status.value == "stopped"

        # A disk that changed is refused before anything touches it.
        await emu_session.update_node("n", {"ram": 128, "hda_disk_image": other.name})
        with pytest.raises(NodeError, match=r"hda_disk_image \(.*\) changed since it was saved"):
            await node.start(state="s")

        # A change QEMU accepts: restored, with a warning naming it.
        line = node.properties.kernel_command_line + " emu.note=changed"
        changes = {"hda_disk_image": disk.name, "kernel_command_line": line}
        await emu_session.update_node("n", changes)
        events: list[NodeEvent] = []
        emu_session.events.subscribe(events.append)
        await node.start(state="s")
        warnings = [e.message for e in events if e.kind == "warning"]
        assert any(
            "restored, but changed since it was saved: kernel_command_line" in w for w in warnings
        )
        await node.stop()
        await node.delete_state("s")
        assert await node.states() == []
        assert qcow2_snapshots(node.directory / "hda_disk.qcow2") == []
        assert not (node.directory / "states" / "s.qcow2").exists()

    emu_run(body())


@pytest.mark.qemu
def test_emu_run_saves_resumes_lists_and_deletes(tmp_path: Path, tiny_guest: object) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(
        'name = "one"\n[nodes.a]\nimage = "tiny"\nip = "10.0.0.1/24"\n'
        '[[checks]]\nnode = "a"\nexpect = "stored"\n'
        'command = "echo $((6 * 7)) > /tmp/answer; echo stored"\n'
    )
    env = {"EMU_QEMU_KVM": "off", "PATH": "/usr/bin:/bin"}

    def emu(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EMU, *args], capture_output=True, text=True, env=env, timeout=300)

    done = emu("run", str(path), "--check", "--save", "answered")
    assert done.returncode == 0, done.stderr
    assert "saved as 'answered': a" in done.stdout
    done = emu("run", str(path), "--from", "answered", "--exec", "a", "cat /tmp/answer",
               "--expect", "^42", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["nodes"][0]["from_state"] == "answered"
    assert state["checks"][0]["passed"] is True
    listing = json.loads(emu("snapshots", str(path), "--json").stdout)
    assert [(s["name"], s["nodes"]) for s in listing["snapshots"]] == [("answered", ["a"])]
    assert listing["snapshots"][0]["size"] > 1 << 20
    done = emu("snapshots", str(path), "--delete", "answered")
    assert done.returncode == 0, done.stderr
    assert "MiB freed" in done.stdout
    done = emu("run", str(path), "--from", "answered", "--check")
    assert done.returncode == 2
    assert "$.nodes.a: no saved state 'answered' (saved: none)" in done.stderr
    assert processes_mentioning(str(tmp_path / ".emu")) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "LAB", "--save", "../x"], "--save: '../x' is not a state name"),
        (["run", "LAB", "--from", "a b"], "--from: 'a b' is not a state name"),
        (["run", "LAB", "--save", "s", "--clean"], "--clean: deletes the nodes' files"),
        (
            ["run", "LAB", "--save", "s", "--controller", "http://127.0.0.1:9"],
            "--save: lab snapshots are kept by the nodes on this host",
        ),
        (
            ["run", "LAB", "--from", "s", "--controller", "http://127.0.0.1:9"],
            "--from: lab snapshots are kept by the nodes on this host",
        ),
        (["snapshots", "LAB", "--delete", "/etc"], "--delete: '/etc' is not a state name"),
    ],
)
def test_bad_snapshot_options_are_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "lab.toml"
    path.write_text('name = "l"\n[nodes.t]\nemulator = "vpcs"\n')
    argv = [str(path) if arg == "LAB" else arg for arg in args]
    env = {"PATH": "/usr/bin:/bin", "EMU_GNS3_CONTROLLER_PASSWORD": "unused"}
    done = subprocess.run([*EMU, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / ".emu").exists() or not any((tmp_path / ".emu").rglob("*.pid"))


def test_a_state_file_that_names_another_file_is_refused(
    emu_run: Any, qemu_node: Any, tmp_path: Path
) -> None:
    """A state file emu made refers to no other file; a planted one with a backing file
    (here: a host file outside every image directory) is refused before QEMU opens it."""
    secret = tmp_path / "secret.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(secret), "1M"], check=True)
    node = emu_run(qemu_node("n", start=False))
    states = node.directory / "states"
    states.mkdir(parents=True)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(secret)]
    subprocess.run([*create, str(states / "s.qcow2")], check=True)

    async def body() -> None:
        with pytest.raises(NodeError, match=r"states/s.qcow2: .* names a backing file"):
            await node.states()
        with pytest.raises(NodeError, match=r"states/s.qcow2: .* names a backing file"):
            await node.start(state="s")
        assert node.status.value == "stopped"

    emu_run(body())
    assert processes_mentioning(str(tmp_path)) == {}
