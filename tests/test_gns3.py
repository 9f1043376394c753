"""A stock GNS3 3.0.6 controller drives emu's compute (``emu serve``) through its own API.

Everything goes through the controller's REST API with its JWT, as a GNS3 user's GUI would:
register the emu compute, build a lab of two tiny-guest QEMU nodes and a VPCS node, link
them (one link with loss and delay), start them, ping on the consoles, capture a link and read
the controller's pcap stream with dpkt, suspend and resume a link, stop, close and delete the
project. One QEMU node's initrd exists only on the controller, which uploads it when the
compute answers ``ImageMissingError``. The controller and the compute start once per module.
"""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dpkt
import pytest

from emu_tests.console import wait_for_prompt
from emu_tests.guest import TinyGuest, build_tiny_guest
from emucore.telnet import TelnetConsole
from tests.gns3_controller import (
    GNS3SERVER,
    ApiError,
    Controller,
    EmuCompute,
    gns3_controller,
    start_emu_compute,
    stop,
)
from tests.helpers import emulators_mentioning

pytestmark = [
    pytest.mark.skipif(not GNS3SERVER.exists(), reason="run ./scripts/setup: no .venv-gns3"),
    pytest.mark.timeout(600),
]

DELAY_MS = 50
STATUS_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def guest() -> TinyGuest:
    """The tiny guest (built once, cached)."""
    return build_tiny_guest()


@pytest.fixture(scope="module")
def gns3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, EmuCompute, str]]:
    """A controller, an ``emu serve`` with the controller's compute credentials, and the
    compute id the controller registered it under."""
    root = tmp_path_factory.mktemp("gns3")
    with gns3_controller(root) as controller:
        compute = start_emu_compute(root, controller.compute_user, controller.compute_password)
        try:
            compute_id = str(uuid.uuid4())
            registration = {
                "compute_id": compute_id,
                "protocol": "http",
                "host": "127.0.0.1",
                "port": compute.port,
                "user": compute.user,
                "password": compute.password,
                "name": "emu",
            }
            answer = controller.api("POST", "/computes?connect=true", registration)
            assert answer["compute_id"] == compute_id
            yield controller, compute, compute_id
        finally:
            stop(compute.process)
            left = emulators_mentioning(str(compute.projects))
            compute.remove_projects()
            assert left == {}, compute.log()


def wait_status(controller: Controller, project: str, node: str, status: str) -> dict[str, Any]:
    """Poll the controller until the node has ``status`` (it learns it from notifications)."""
    deadline = time.monotonic() + STATUS_TIMEOUT
    while True:
        answer: dict[str, Any] = controller.api("GET", f"/projects/{project}/nodes/{node}")
        if answer["status"] == status:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{answer['name']} is {answer['status']}, not {status}")
        time.sleep(0.2)


def qemu_properties(guest: TinyGuest, name: str, initrd: str, **ips: str) -> dict[str, Any]:
    """A tiny-guest QEMU node as a GNS3 user would describe it (images by file name)."""
    line = guest.kernel_command_line(ip=ips["eth0"], hostname=name, extra_ips={"eth1": ips["eth1"]})
    return {
        "ram": 128,
        "adapters": 2,
        "adapter_type": "virtio-net-pci",
        "kernel_image": "tiny-vmlinuz",
        "initrd": initrd,
        "kernel_command_line": line,
        "console_type": "telnet",
    }


def ping(output: str) -> tuple[int, float | None]:
    """Packets received and the minimum round trip (ms) of busybox ping's summary."""
    received = re.search(r"(\d+) packets received", output)
    rtt = re.search(r"min/avg/max = ([\d.]+)/", output)
    return (int(received.group(1)) if received else 0), (float(rtt.group(1)) if rtt else None)


class PcapReader(threading.Thread):
    """Reads the controller's pcap stream of a link until it ends."""

    def __init__(self, controller: Controller, project: str, link: str) -> None:
        super().__init__(daemon=True)
        url = f"{controller.url}/projects/{project}/links/{link}/capture/stream"
        self.request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {controller.token}"}
        )
        self.data = b""
        self.first_bytes = threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.request, timeout=120) as stream:
            while chunk := stream.read1(65536):
                self.data += chunk
                self.first_bytes.set()


def icmp_between(pcap: bytes) -> set[tuple[str, str, str]]:
    """(kind, source, destination) of the ICMP echoes in a pcap, read with dpkt."""
    found = set()
    for _, frame in dpkt.pcap.Reader(io.BytesIO(pcap)):
        packet = dpkt.ethernet.Ethernet(frame).data
        if isinstance(packet, dpkt.ip.IP) and isinstance(packet.data, dpkt.icmp.ICMP):
            kind = {8: "request", 0: "reply"}.get(packet.data.type)
            if kind:
                src, dst = (".".join(map(str, a)) for a in (packet.src, packet.dst))
                found.add((kind, src, dst))
    return found


def test_the_controller_registered_the_emu_compute(
    gns3: tuple[Controller, EmuCompute, str],
) -> None:
    controller, _, compute_id = gns3

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


def test_a_wrong_password_is_refused(gns3: tuple[Controller, EmuCompute, str]) -> None:
    controller, compute, _ = gns3
    bad = {"protocol": "http", "host": "127.0.0.1", "port": compute.port}
    bad |= {"user": compute.user, "password": "not-the-password", "compute_id": str(uuid.uuid4())}
    with pytest.raises(ApiError) as refused:
        controller.api("POST", "/computes?connect=true", bad)
    assert refused.value.status == 401
    assert "Invalid auth" in refused.value.body["message"]
    # What the controller was told, straight from the compute: 401 and a message.
    with pytest.raises(ApiError) as direct:
        compute.api("GET", "/version", password="wrong")
    assert direct.value.status == 401
    assert "password" in direct.value.body["message"]


def test_a_lab_runs_through_the_controller(
    gns3: tuple[Controller, EmuCompute, str], guest: TinyGuest
) -> None:
    controller, compute, compute_id = gns3
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

            controller.api("POST", f"/projects/{project}/links/{to_pc}/capture/start", {})
            reader = PcapReader(controller, project, to_pc)
            reader.start()
            _, output = await console.run("ping -c 3 -W 3 10.0.1.2", timeout=60)
            assert ping(output)[0] >= 1, output
            controller.api("POST", f"/projects/{project}/links/{to_pc}/capture/stop", {})
            await asyncio.to_thread(reader.join, 60)
            assert not reader.is_alive(), "the pcap stream did not end with the capture"
            echoes = icmp_between(reader.data)
            assert ("request", "10.0.1.1", "10.0.1.2") in echoes
            assert ("reply", "10.0.1.2", "10.0.1.1") in echoes

            controller.api("PUT", f"/projects/{project}/links/{impaired}", {"suspend": True})
            _, output = await console.run("ping -c 2 -W 1 10.0.0.2", timeout=60)
            assert ping(output)[0] == 0, output
            controller.api("PUT", f"/projects/{project}/links/{impaired}", {"suspend": False})
            _, output = await console.run("ping -c 5 -W 3 10.0.0.2", timeout=60)
            assert ping(output)[0] >= 1, output
        finally:
            await console.close()

    asyncio.run(asyncio.wait_for(on_the_consoles(), 300))

    controller.api("POST", f"/projects/{project}/nodes/stop")
    for node in (a, b, pc):
        wait_status(controller, project, node, "stopped")
    controller.api("POST", f"/projects/{project}/close")
    assert emulators_mentioning(str(compute.projects / project)) == {}
    # Deleting reopens it first: the controller replays every node's JSON to the compute.
    controller.api("DELETE", f"/projects/{project}")
    assert not (compute.projects / project).exists()
    assert emulators_mentioning(str(compute.projects)) == {}


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
    gns3: tuple[Controller, EmuCompute, str],
) -> None:
    controller, _, compute_id = gns3
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


def test_sigterm_stops_every_node(gns3: tuple[Controller, EmuCompute, str]) -> None:
    controller, compute, compute_id = gns3
    project = controller.api("POST", "/projects", {"name": "emu-sigterm"})["project_id"]
    body = {"name": "pc", "node_type": "vpcs", "compute_id": compute_id}
    node = controller.api("POST", f"/projects/{project}/nodes", body)["node_id"]
    controller.api("POST", f"/projects/{project}/nodes/{node}/start", {})
    wait_status(controller, project, node, "started")
    assert emulators_mentioning(str(compute.projects / project)) != {}
    assert stop(compute.process) == 0
    assert emulators_mentioning(str(compute.projects)) == {}
    assert "stopping every node" in compute.log()


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
