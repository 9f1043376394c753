"""A stock GNS3 3.0.6 controller drives emu's compute (``emu serve``) through its own API.

Everything goes through the controller's REST API with its JWT, as a GNS3 user's GUI would:
register the emu compute, build a lab of two tiny-guest QEMU nodes and a VPCS node, link
them (one link with loss and delay), start them, ping on the consoles, capture a link and read
the controller's pcap stream with dpkt, suspend and resume a link, stop, close and delete the
project. One QEMU node's initrd exists only on the controller, which uploads it when the
compute answers ``ImageMissingError``. The controller starts once per session (``gns3`` in
``conftest.py``), the compute once per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emu_tests.console import wait_for_prompt
from emu_tests.guest import TinyGuest, build_tiny_guest
from emucore.telnet import TelnetConsole
from tests.gns3_controller import (
    GNS3SERVER,
    STATUS_TIMEOUT,
    ApiError,
    Controller,
    EmuCompute,
    captured_echoes,
    crash_and_restart,
    gns3_controller,
    ping,
    qemu_properties,
    register,
    start_emu_compute,
    stop,
    suspend_and_resume,
    unregister,
    wait_status,
)
from tests.helpers import emulators_mentioning, qemu_img_info
from tests.test_qemu_cdrom import READ_DISC

pytestmark = [
    pytest.mark.skipif(not GNS3SERVER.exists(), reason="run ./scripts/setup: no .venv-gns3"),
    pytest.mark.timeout(600),
]

DELAY_MS = 50


@pytest.fixture(scope="module")
def guest() -> TinyGuest:
    """The tiny guest (built once, cached)."""
    return build_tiny_guest()


@pytest.fixture(scope="module")
def lab_compute(
    gns3: Controller, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Controller, EmuCompute, str]]:
    """The controller, an ``emu serve`` with the controller's compute credentials, and the
    compute id the controller registered it under (removed from the controller at the end)."""
    root = tmp_path_factory.mktemp("gns3")
    compute = start_emu_compute(root, gns3.compute_user, gns3.compute_password)
    compute_id = ""
    try:
        compute_id = register(gns3, compute, "emu")
        yield gns3, compute, compute_id
    finally:
        stop(compute.process)
        if compute_id:
            unregister(gns3, compute_id)
        left = compute.emulators()
        compute.remove_projects()
        assert left == {}, compute.log()


def test_the_controller_registered_the_emu_compute(
    lab_compute: tuple[Controller, EmuCompute, str],
) -> None:
    controller, _, compute_id = lab_compute

    async def compute_updates() -> dict[str, Any]:
        url = controller.url.replace("http", "ws", 1)
        url += f"/notifications/ws?token={controller.token}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            async with asyncio.timeout(60):
                while True:
                    message = await ws.receive_json()
                    event = message.get("event", {})
                    # The compute's pings make the controller publish the compute's state.
                    ours = event.get("compute_id") == compute_id
                    pinged = event.get("cpu_usage_percent") is not None
                    if message["action"] == "compute.updated" and ours and pinged:
                        return dict(event)

    event = asyncio.run(compute_updates())
    assert event["connected"] is True
    assert event["capabilities"]["version"] == "3.0.6"
    assert set(event["capabilities"]["node_types"]) >= {"qemu", "vpcs"}
    assert 0 <= event["memory_usage_percent"] <= 100


def test_a_wrong_password_is_refused(lab_compute: tuple[Controller, EmuCompute, str]) -> None:
    controller, compute, _ = lab_compute
    bad = {"protocol": "http", "host": "127.0.0.1", "port": compute.port}
    bad |= {"user": compute.user, "password": "not-the-password", "compute_id": str(uuid.uuid4())}
    try:
        with pytest.raises(ApiError) as refused:
            controller.api("POST", "/computes?connect=true", bad)
    finally:
        unregister(controller, bad["compute_id"])  # a refused registration leaves its row
    assert refused.value.status == 401
    assert "Invalid auth" in refused.value.body["message"]
    # What the controller was told, straight from the compute: 401 and a message.
    with pytest.raises(ApiError) as direct:
        compute.api("GET", "/version", password="wrong")
    assert direct.value.status == 401
    assert "password" in direct.value.body["message"]


def test_a_lab_runs_through_the_controller(
    lab_compute: tuple[Controller, EmuCompute, str], guest: TinyGuest
) -> None:
    controller, compute, compute_id = lab_compute
    shutil.copy(guest.kernel, compute.images / "tiny-vmlinuz")
    shutil.copy(guest.initrd, compute.images / "tiny-initrd.img")
    # b's initrd exists only on the controller: the compute asks for it, the controller uploads.
    shutil.copy(guest.initrd, controller.images / "tiny-initrd-b.img")
    project = controller.api("POST", "/projects", {"name": "emu-lab"})["project_id"]

    def add(name: str, kind: str, properties: dict[str, Any]) -> str:
        body = {"name": name, "node_type": kind, "compute_id": compute_id}
        node_id: str = controller.api(
            "POST", f"/projects/{project}/nodes", body | {"properties": properties}
        )["node_id"]
        return node_id

    a = add(
        "a",
        "qemu",
        qemu_properties(guest, "a", "tiny-initrd.img", eth0="10.0.0.1/24", eth1="10.0.1.1/24"),
    )
    b = add(
        "b",
        "qemu",
        qemu_properties(guest, "b", "tiny-initrd-b.img", eth0="10.0.0.2/24", eth1="10.0.2.2/24"),
    )
    pc = add("pc", "vpcs", {"startup_script": "ip 10.0.1.2/24\n"})
    assert (compute.images / "tiny-initrd-b.img").read_bytes() == guest.initrd.read_bytes()

    def link(first: tuple[str, int], second: tuple[str, int], **extra: Any) -> str:
        ends = [{"node_id": n, "adapter_number": i, "port_number": 0} for n, i in (first, second)]
        link_id: str = controller.api(
            "POST", f"/projects/{project}/links", {"nodes": ends, **extra}
        )["link_id"]
        return link_id

    impaired = link((a, 0), (b, 0), filters={"packet_loss": [10], "delay": [DELAY_MS, 0]})
    # The VPCS end first: the controller captures there, so emu captures in a relay.
    to_pc = link((pc, 0), (a, 1))
    controller.api("POST", f"/projects/{project}/nodes/start")
    nodes = {n: wait_status(controller, project, n, "started") for n in (a, b, pc)}
    assert nodes[a]["console_host"] == "127.0.0.1"

    async def on_the_consoles() -> None:
        console = await TelnetConsole.connect("127.0.0.1", nodes[a]["console"], name="a")
        try:
            await wait_for_prompt(console)
            await _check_websocket_console(controller, project, a)

            _, output = await console.run("ping -c 5 -W 3 10.0.0.2", timeout=60)
            received, fastest = ping(output)
            assert received >= 1, output
            assert fastest is not None, output
            assert fastest >= 2 * DELAY_MS * 0.9, output  # the delay, both ways

            _, output = await console.run("ping -c 3 -W 3 10.0.1.2", timeout=60)
            assert ping(output)[0] >= 1, output

            echoes = await captured_echoes(
                controller, project, to_pc, console, "ping -c 3 -W 3 10.0.1.2"
            )
            assert ("request", "10.0.1.1", "10.0.1.2") in echoes
            assert ("reply", "10.0.1.2", "10.0.1.1") in echoes

            await suspend_and_resume(controller, project, impaired, console, "10.0.0.2")
        finally:
            await console.close()

    asyncio.run(asyncio.wait_for(on_the_consoles(), 300))

    controller.api("POST", f"/projects/{project}/nodes/stop")
    for node in (a, b, pc):
        wait_status(controller, project, node, "stopped")
    controller.api("POST", f"/projects/{project}/close")
    assert compute.emulators() == {}
    # Deleting reopens it first: the controller replays every node's JSON to the compute.
    controller.api("DELETE", f"/projects/{project}")
    assert not (compute.projects / project).exists()
    assert compute.emulators() == {}


async def _check_websocket_console(controller: Controller, project: str, node: str) -> None:
    """The controller's console WebSocket reaches the same console as the telnet client."""
    url = controller.url.replace("http", "ws", 1)
    url += f"/projects/{project}/nodes/{node}/console/ws?token={controller.token}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str("echo WS-$((6 * 7))-OK\r")
        seen = b""
        async with asyncio.timeout(30):
            while b"WS-42-OK" not in seen:
                message = await ws.receive()
                assert message.type == aiohttp.WSMsgType.BINARY, message
                seen += message.data


def test_bad_bodies_get_the_status_and_a_message_naming_the_field(
    lab_compute: tuple[Controller, EmuCompute, str],
) -> None:
    controller, _, compute_id = lab_compute
    project = controller.api("POST", "/projects", {"name": "emu-bad"})["project_id"]
    try:
        bad = {"name": "bad", "node_type": "qemu", "compute_id": compute_id}
        with pytest.raises(ApiError) as refused:
            controller.api(
                "POST", f"/projects/{project}/nodes", bad | {"properties": {"ram": "lots"}}
            )
        assert refused.value.status == 422
        assert "$.ram: must be an integer" in refused.value.body["message"]

        pcs = [
            controller.api(
                "POST", f"/projects/{project}/nodes", {**bad, "name": n, "node_type": "vpcs"}
            )["node_id"]
            for n in ("pc1", "pc2")
        ]
        ends = [{"node_id": n, "adapter_number": 0, "port_number": 0} for n in pcs]
        link = controller.api("POST", f"/projects/{project}/links", {"nodes": ends})["link_id"]
        with pytest.raises(ApiError) as bpf:
            controller.api(
                "PUT", f"/projects/{project}/links/{link}", {"filters": {"bpf": ["icmp"]}}
            )
        assert bpf.value.status == 409
        assert "bpf filter is not supported" in bpf.value.body["message"]
    finally:
        controller.api("DELETE", f"/projects/{project}")


def test_a_stopped_node_changes_its_cpus_through_the_gui(
    lab_compute: tuple[Controller, EmuCompute, str],
) -> None:
    """The GUI's node dialog sends every property back with the one changed: a value emu
    derives (maxcpus follows cpus) must not come back as a stale one that refuses it."""
    controller, _, compute_id = lab_compute
    project = controller.api("POST", "/projects", {"name": "emu-cpus"})["project_id"]
    try:
        body = {"name": "r1", "node_type": "qemu", "compute_id": compute_id}
        created = controller.api("POST", f"/projects/{project}/nodes", body)
        properties = {**created["properties"], "cpus": 2}
        path = f"/projects/{project}/nodes/{created['node_id']}"
        updated = controller.api("PUT", path, {"properties": properties})
        assert updated["properties"]["cpus"] == 2
        assert updated["properties"].get("maxcpus") in (None, 2)
    finally:
        controller.api("DELETE", f"/projects/{project}")


def test_a_running_node_swaps_its_cdrom_and_reports_checksums_and_aux(
    lab_compute: tuple[Controller, EmuCompute, str], guest: TinyGuest
) -> None:
    """GNS3 3.0's node features through the controller: a CD-ROM swapped while the guest
    runs (what cannot change live is refused with 409), the images' md5sums and the aux
    console's port in the node, and disk images made, grown and deleted in the node's
    directory."""
    controller, compute, compute_id = lab_compute
    shutil.copy(guest.kernel, compute.images / "tiny-vmlinuz")
    shutil.copy(guest.initrd, compute.images / "tiny-initrd.img")
    for name, label in (("first.iso", "EMU-DISC-FIRST"), ("second.iso", "EMU-DISC-SECOND")):
        (compute.images / name).write_bytes(label.encode().ljust(1 << 20, b"\0"))
    project = controller.api("POST", "/projects", {"name": "emu-parity"})["project_id"]
    try:
        properties = qemu_properties(guest, "cd", "tiny-initrd.img", eth0="10.0.9.1/24")
        properties |= {"cdrom_image": "first.iso", "aux_type": "telnet"}
        body = {"name": "cd", "node_type": "qemu", "compute_id": compute_id}
        node = controller.api(
            "POST", f"/projects/{project}/nodes", body | {"properties": properties}
        )["node_id"]
        path = f"/projects/{project}/nodes/{node}"
        controller.api("POST", path + "/start", {})
        started = wait_status(controller, project, node, "started")

        deadline = time.monotonic() + STATUS_TIMEOUT
        while not started.get("aux") or "cdrom_image_md5sum" not in started["properties"]:
            assert time.monotonic() < deadline, (started, compute.log()[-3000:])
            time.sleep(0.2)  # the controller learns them from a notification: poll its API
            started = controller.api("GET", path)
        first = compute.images / "first.iso"
        assert (
            started["properties"]["cdrom_image_md5sum"]
            == hashlib.md5(first.read_bytes()).hexdigest()
        )

        async def read_disc(port: int) -> str:
            console = await TelnetConsole.connect(compute.host, port, name="cd")
            try:
                await wait_for_prompt(console)
                _, out = await console.run(f"dmesg -n 1; load_on_demand 2>/dev/null; {READ_DISC}")
                return out
            finally:
                await console.close()

        assert asyncio.run(read_disc(started["console"])) == "EMU-DISC-FIRST"
        swapped = {**started["properties"], "cdrom_image": "second.iso"}
        controller.api("PUT", path, {"properties": swapped})
        assert asyncio.run(read_disc(started["aux"])) == "EMU-DISC-SECOND"
        with pytest.raises(ApiError) as refused:
            controller.api("PUT", path, {"properties": {**swapped, "ram": 256}})
        assert refused.value.status == 409
        assert "ram" in refused.value.body["message"]

        disk = path + "/qemu/disk_image/extra.qcow2"
        controller.api("POST", disk, {"format": "qcow2", "size": 16})
        image = Path(started["node_directory"]) / "extra.qcow2"
        assert image.is_file()
        with pytest.raises(ApiError) as running:
            controller.api("PUT", disk, {"extend": 16})
        assert running.value.status == 409
        controller.api("POST", path + "/stop", {})
        wait_status(controller, project, node, "stopped")
        controller.api("PUT", disk, {"extend": 16})
        assert qemu_img_info(image)["virtual-size"] == 32 << 20
        controller.api("DELETE", disk)
        assert not image.exists()
    finally:
        controller.api("DELETE", f"/projects/{project}")


def test_sigterm_stops_every_node(lab_compute: tuple[Controller, EmuCompute, str]) -> None:
    controller, compute, compute_id = lab_compute
    project = controller.api("POST", "/projects", {"name": "emu-sigterm"})["project_id"]
    try:
        body = {"name": "pc", "node_type": "vpcs", "compute_id": compute_id}
        node = controller.api("POST", f"/projects/{project}/nodes", body)["node_id"]
        controller.api("POST", f"/projects/{project}/nodes/{node}/start", {})
        wait_status(controller, project, node, "started")
        assert emulators_mentioning(str(compute.projects / project)) != {}
        assert stop(compute.process) == 0
        assert emulators_mentioning(str(compute.projects)) == {}
        assert "stopping every node" in compute.log()
    finally:  # the controller lives for the session: leave it no project of ours
        with contextlib.suppress(ApiError):
            controller.api("DELETE", f"/projects/{project}")


def test_a_sigkilled_compute_leaves_no_emulator(tmp_path: Path) -> None:
    compute = start_emu_compute(tmp_path, "user", "secret")
    try:
        project = str(uuid.uuid4())
        compute.api("POST", "/projects", {"name": "kill", "project_id": project})
        node = str(uuid.uuid4())
        compute.api("POST", f"/projects/{project}/vpcs/nodes", {"name": "pc", "node_id": node})
        compute.api("POST", f"/projects/{project}/vpcs/nodes/{node}/start")
        assert emulators_mentioning(str(compute.projects)) != {}
    finally:
        compute.process.send_signal(signal.SIGKILL)
        compute.process.wait(10)
    deadline = time.monotonic() + 10
    while emulators_mentioning(str(compute.projects)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the kernel delivers the death signal; VPCS then exits
    left = emulators_mentioning(str(compute.projects))
    compute.remove_projects()
    assert left == {}


def test_a_controller_that_comes_back_finds_the_nodes_as_it_left_them(tmp_path: Path) -> None:
    """The controller crashes (SIGKILL: it closes nothing) and starts again on its own
    database: it reconnects to the compute, and opening the project finds the node running
    as it was (same process, same console), not restarted."""
    with gns3_controller(tmp_path / "controller") as controller:
        compute = start_emu_compute(
            tmp_path / "compute", controller.compute_user, controller.compute_password
        )
        try:
            compute_id = register(controller, compute, "emu")
            project = controller.api("POST", "/projects", {"name": "comes-back"})["project_id"]
            body = {"name": "pc", "node_type": "vpcs", "compute_id": compute_id}
            node = controller.api("POST", f"/projects/{project}/nodes", body)["node_id"]
            controller.api("POST", f"/projects/{project}/nodes/{node}/start", {})
            console = wait_status(controller, project, node, "started")["console"]
            (pid,) = emulators_mentioning(str(compute.projects / project))

            crash_and_restart(controller)
            controller.api("POST", f"/computes/{compute_id}/connect", {})
            controller.api("POST", f"/projects/{project}/open", {})
            again = wait_status(controller, project, node, "started")
            assert again["console"] == console
            assert set(emulators_mentioning(str(compute.projects / project))) == {pid}

            async def prompt() -> str:
                telnet = await TelnetConsole.connect(compute.host, console)
                try:
                    await telnet.sendline()
                    match = await telnet.expect(r"pc> |VPCS> ", timeout=30)
                    return match.group(0)
                finally:
                    await telnet.close()

            assert asyncio.run(prompt()) in ("pc> ", "VPCS> ")
            controller.api("POST", f"/projects/{project}/nodes/{node}/stop", {})
            wait_status(controller, project, node, "stopped")
            controller.api("DELETE", f"/projects/{project}")
        finally:
            stop(compute.process)
            left = emulators_mentioning(str(compute.projects))
            compute.remove_projects()
            assert left == {}, compute.log()
