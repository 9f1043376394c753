"""Many hosts: one GNS3 3.0.6 controller, two emu computes, each in its own network namespace.

Each ``emu serve`` runs inside its namespace (``ip netns exec``), listening, serving consoles
and binding its tunnels on its own address; the two namespaces share one veth pair, the wire
between two machines (see ``tests/netns.py``). The unmodified controller runs in the root
namespace and reaches both. Everything goes through the controller's REST API, as a GNS3
user's GUI would: a tiny guest on each compute, linked with a 20 ms delay across the wire
(the round trip shows it, the wire's packet counters show the traffic crossed), a capture
read from the controller's stream with dpkt, link suspend and resume; several console
clients on one QEMU node at once and the console reset; the load each compute reports; a
node refused for lack of RAM; the demo lab file run with ``emu run --controller`` across both
computes; and a compute killed with SIGKILL, which leaves no QEMU and shows as disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from emu_gns3.hostload import disk_percent, meminfo, memory_percent
from emu_tests.console import wait_for_prompt
from emu_tests.guest import TinyGuest, build_tiny_guest
from emucore.telnet import ConsoleError, TelnetConsole
from tests.gns3_controller import (
    ApiError,
    Controller,
    EmuCompute,
    captured_echoes,
    compute_update,
    computes_on,
    ping,
    qemu_properties,
    register,
    start_emu_compute,
    suspend_and_resume,
    unregister,
    wait_status,
)
from tests.helpers import wait_for_line
from tests.netns import Hosts, two_hosts_or_loopback

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
DELAY_MS = 20
ADMIN_PASSWORD = "admin-pw"  # tests/gns3_controller.py's controller admin
# SPICE's link header (magic, protocol 2.2, size) and a link message for the main channel.
SPICE_LINK_REQUEST = struct.pack("<4sIII", b"REDQ", 2, 2, 18) + struct.pack(
    "<IBBIII", 0, 1, 0, 0, 0, 18
)


@attrs.frozen
class Cluster:
    """The controller, the two hosts and the compute on each.

    :ivar computes: (A's, B's) ``emu serve``.
    :ivar ids: their compute ids on the controller.
    :ivar names: their names on the controller (``host-a``, ``host-b``).
    """

    controller: Controller
    hosts: Hosts
    computes: tuple[EmuCompute, EmuCompute]
    ids: tuple[str, str]
    names: tuple[str, str]
    root: Path


@pytest.fixture(scope="module")
def guest() -> TinyGuest:
    """The tiny guest (built once, cached)."""
    return build_tiny_guest()


@pytest.fixture(scope="module")
def cluster(
    gns3: Controller, guest: TinyGuest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two namespaces, an ``emu serve`` in each, both registered with the controller; the
    tiny guest's files exist on the controller only (it uploads them to a compute that
    lacks them). Everything is removed at the end, after a failure too."""
    root = tmp_path_factory.mktemp("hosts")
    shutil.copy(guest.kernel, gns3.images / "tiny-vmlinuz")
    shutil.copy(guest.initrd, gns3.images / "tiny-initrd.img")
    with two_hosts_or_loopback() as hosts, computes_on(gns3, root, hosts) as started:
        (a, a_id), (b, b_id) = started
        yield Cluster(gns3, hosts, (a, b), (a_id, b_id), ("host-a", "host-b"), root)


def add_node(
    controller: Controller, project: str, compute_id: str, name: str, properties: dict[str, Any]
) -> str:
    """A QEMU node on ``compute_id``: its node id."""
    body = {"name": name, "node_type": "qemu", "compute_id": compute_id, "properties": properties}
    node_id: str = controller.api("POST", f"/projects/{project}/nodes", body)["node_id"]
    return node_id


@contextlib.contextmanager
def project(controller: Controller, name: str) -> Iterator[str]:
    """A project on the controller, deleted at the end (its nodes stop on every compute)."""
    project_id: str = controller.api("POST", "/projects", {"name": name})["project_id"]
    try:
        yield project_id
    finally:
        with contextlib.suppress(ApiError):
            controller.api("DELETE", f"/projects/{project_id}")


# -- the computes ----------------------------------------------------------------------------


def test_each_compute_reports_the_hosts_load(cluster: Cluster) -> None:
    """``ping`` carries CPU, memory and disk use; the controller passes them on in its
    ``compute.updated`` notifications. Memory and disk are the machine's (namespaces share
    both), so they must match what the kernel says now."""
    for compute_id, compute in zip(cluster.ids, cluster.computes, strict=True):
        event = asyncio.run(
            compute_update(
                cluster.controller,
                compute_id,
                lambda e: e.get("connected") is True and e.get("cpu_usage_percent") is not None,
            )
        )
        assert event["capabilities"]["node_types"] == ["qemu", "vpcs"]
        assert event["host"] == compute.host
        assert 0 <= event["cpu_usage_percent"] <= 100
        # Another engineer's run may move memory meanwhile: the same figure within 5 points.
        assert abs(event["memory_usage_percent"] - memory_percent()) < 5, event
        assert abs(event["disk_usage_percent"] - disk_percent(compute.projects)) < 2, event


def test_a_node_asking_for_more_ram_than_the_host_has_is_refused(
    cluster: Cluster, guest: TinyGuest
) -> None:
    """GNS3 only warns; an emu compute refuses the start with a 409 naming the figures (no
    RAM is allocated: the check reads MemAvailable before QEMU would run)."""
    controller = cluster.controller
    available_mib = meminfo()["MemAvailable"] // 1024
    too_much = available_mib * 2 + 1024
    with project(controller, "emu-ram") as project_id:
        properties = qemu_properties(guest, "big", "tiny-initrd.img", eth0="10.9.0.1/24")
        node = add_node(
            controller, project_id, cluster.ids[0], "big", properties | {"ram": too_much}
        )
        with pytest.raises(ApiError) as refused:
            controller.api("POST", f"/projects/{project_id}/nodes/{node}/start", {})
        assert refused.value.status == 409
        message = refused.value.body["message"]
        assert f"asks for {too_much} MiB" in message, message
        assert "available" in message, message
        assert controller.api("GET", f"/projects/{project_id}/nodes/{node}")["status"] == "stopped"
    assert cluster.computes[0].emulators() == {}


def test_vnc_spice_and_none_consoles_report_their_real_ports(
    cluster: Cluster, guest: TinyGuest
) -> None:
    """The console port GNS3 shows is the one QEMU really listens on (VNC picks the first
    free display; SPICE gets a free port), and a node without a console reports none."""
    controller = cluster.controller
    with project(controller, "emu-consoles") as project_id:
        nodes = {}
        for kind in ("vnc", "spice", "none"):
            properties = qemu_properties(guest, kind, "tiny-initrd.img", eth0="10.9.0.1/24")
            properties["console_type"] = kind
            nodes[kind] = add_node(controller, project_id, cluster.ids[0], kind, properties)
        controller.api("POST", f"/projects/{project_id}/nodes/start")
        answers = {k: wait_status(controller, project_id, n, "started") for k, n in nodes.items()}
        assert answers["none"]["console"] is None, answers["none"]

        async def greetings() -> dict[str, bytes]:
            found = {}
            for kind in ("vnc", "spice"):
                host, port = answers[kind]["console_host"], answers[kind]["console"]
                reader, writer = await asyncio.open_connection(host, port)
                if kind == "vnc":  # an RFB server speaks first
                    found[kind] = await asyncio.wait_for(reader.readexactly(12), 30)
                else:  # a SPICE server answers a link request with its own header
                    writer.write(SPICE_LINK_REQUEST)
                    found[kind] = await asyncio.wait_for(reader.readexactly(4), 30)
                writer.close()
            return found

        found = asyncio.run(greetings())
        assert answers["vnc"]["console"] >= 5900
        assert found["vnc"].startswith(b"RFB 003."), found
        assert found["spice"] == b"REDQ", found


# -- a link across two computes --------------------------------------------------------------


def test_a_link_across_two_computes(cluster: Cluster, guest: TinyGuest) -> None:
    controller, hosts = cluster.controller, cluster.hosts
    with project(controller, "emu-hosts") as project_id:
        a, b = (
            add_node(
                controller,
                project_id,
                compute_id,
                name,
                qemu_properties(guest, name, "tiny-initrd.img", eth0=f"10.0.0.{index}/24"),
            )
            for index, (name, compute_id) in enumerate(zip("ab", cluster.ids, strict=True), 1)
        )
        ends = [{"node_id": n, "adapter_number": 0, "port_number": 0} for n in (a, b)]
        body = {"nodes": ends, "filters": {"delay": [DELAY_MS, 0]}}
        link = controller.api("POST", f"/projects/{project_id}/links", body)["link_id"]
        controller.api("POST", f"/projects/{project_id}/nodes/start")
        nodes = {n: wait_status(controller, project_id, n, "started") for n in (a, b)}
        assert nodes[a]["console_host"] == cluster.computes[0].host
        assert nodes[b]["console_host"] == cluster.computes[1].host
        qemu_a = cluster.computes[0].emulators()
        assert len(qemu_a) == 1, qemu_a

        async def on_the_consoles() -> None:
            host, port = nodes[a]["console_host"], nodes[a]["console"]
            first = await TelnetConsole.connect(host, port, name="a")
            second = await TelnetConsole.connect(host, port, name="a (second)")
            try:
                await wait_for_prompt(first)
                sent = hosts.wire_packets(0) if hosts.isolated else 0
                _, output = await first.run("ping -c 5 -W 3 10.0.0.2", timeout=60)
                received, fastest = ping(output)
                assert received >= 4, output
                assert fastest is not None, output
                assert fastest >= 2 * DELAY_MS * 0.9, output  # the delay, both ways
                if hosts.isolated:  # the echoes crossed the wire between the namespaces
                    assert hosts.wire_packets(0) - sent >= received, "nothing on the wire"

                echoes = await captured_echoes(
                    controller, project_id, link, first, "ping -c 3 -W 3 10.0.0.2"
                )
                assert ("request", "10.0.0.1", "10.0.0.2") in echoes, echoes
                assert ("reply", "10.0.0.2", "10.0.0.1") in echoes, echoes
                await _many_clients(controller, project_id, a, first, second)

                await suspend_and_resume(controller, project_id, link, first, "10.0.0.2")

                await _reset(controller, project_id, a, host, port, first, second)
            finally:
                await first.close()
                await second.close()

        asyncio.run(asyncio.wait_for(on_the_consoles(), 400))
        # The reset restarted the console's server, not QEMU.
        assert cluster.computes[0].emulators() == qemu_a
    for compute in cluster.computes:
        assert compute.emulators() == {}


async def _many_clients(
    controller: Controller,
    project_id: str,
    node: str,
    first: TelnetConsole,
    second: TelnetConsole,
) -> None:
    """Two telnet clients and the controller's console WebSocket on one QEMU node: each
    sees what any of them typed run; what any of them types reaches the guest."""
    url = controller.url.replace("http", "ws", 1)
    url += f"/projects/{project_id}/nodes/{node}/console/ws?token={controller.token}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for typist, word in ((first, "ONE"), (second, "TWO")):
            await typist.sendline(f"echo {word}-$((6 * 7))-SEEN")
            await first.expect(f"{word}-42-SEEN", timeout=30)
            await second.expect(f"{word}-42-SEEN", timeout=30)
            await _ws_expect(ws, f"{word}-42-SEEN")
        await ws.send_str("echo WS-$((6 * 7))-SEEN\r")
        await _ws_expect(ws, "WS-42-SEEN")
        await first.expect("WS-42-SEEN", timeout=30)
        await second.expect("WS-42-SEEN", timeout=30)
    await first.expect(first.prompt or "# ", timeout=30)


async def _ws_expect(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    seen = b""
    async with asyncio.timeout(30):
        while text.encode() not in seen:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.BINARY, message
            seen += message.data


async def _reset(
    controller: Controller,
    project_id: str,
    node: str,
    host: str,
    port: int,
    *clients: TelnetConsole,
) -> None:
    """``console/reset`` disconnects the clients; the port serves again, the guest kept
    running (a file made before is still there)."""
    _, output = await clients[0].run("touch /tmp/before-reset && echo MADE", timeout=30)
    assert "MADE" in output, output
    controller.api("POST", f"/projects/{project_id}/nodes/{node}/console/reset", {})
    for client in clients:
        with pytest.raises(ConsoleError, match="closed"):
            await client.expect("never printed", timeout=30)
    again = await TelnetConsole.connect(host, port, name="after reset")
    try:
        # The shell's terminal keeps its settings (no echo): the answer alone comes back.
        await again.sendline("test -e /tmp/before-reset && echo STILL-$((6 * 7))-THERE")
        await again.expect("STILL-42-THERE", timeout=30)
    finally:
        await again.close()


# -- a lab file run on the controller --------------------------------------------------------


def emu(*args: str) -> list[str]:
    """The ``emu`` command line."""
    return [sys.executable, "-m", "emucore.cli", *args]


def password_file(root: Path) -> Path:
    """The controller admin's password in a file."""
    path = root / "controller-password"
    path.write_text(ADMIN_PASSWORD + "\n")
    return path


def controller_projects(controller: Controller) -> list[str]:
    """The names of the controller's projects."""
    return [str(p["name"]) for p in controller.api("GET", "/projects")]


def test_the_demo_lab_runs_across_both_computes(cluster: Cluster, tmp_path: Path) -> None:
    """``emu run examples/demo.toml --check --controller URL``: the nodes spread over both
    computes, the checks pass on their consoles, the capture comes from the controller's
    stream; the project is gone afterwards."""
    controller = cluster.controller
    lab = tmp_path / "demo.toml"
    shutil.copy(ROOT / "examples" / "demo.toml", lab)
    base = controller.url.removesuffix("/v3")
    argv = emu(
        "run", str(lab), "--check", "--json", "--controller", base,
        "--controller-password-file", str(password_file(tmp_path)),
    )  # fmt: skip
    env = {**os.environ, "EMU_QEMU_KVM": "off"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads(done.stdout)
    placed = {node["name"]: node["compute"] for node in state["nodes"]}
    assert set(placed.values()) == set(cluster.names), placed  # both computes took nodes
    assert all(check["passed"] for check in state["checks"]), state["checks"]
    capture = state["captures"][0]
    assert capture["icmp_requests"] > 0, capture
    assert capture["icmp_replies"] > 0, capture
    assert "started on host-" in done.stderr, done.stderr
    assert state["controller"]["project_id"]
    assert not [p for p in controller_projects(controller) if p.startswith("emu-demo-")]
    for compute in cluster.computes:
        assert compute.emulators() == {}


def test_a_lab_naming_an_unknown_compute_is_bad_input(cluster: Cluster, tmp_path: Path) -> None:
    """Exit code 2, the field and the computes the controller has named; nothing created."""
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "misplaced"\n[nodes.pc]\nemulator = "vpcs"\ncompute = "host-z"\n')
    base = cluster.controller.url.removesuffix("/v3")
    argv = emu(
        "run", str(lab), "--check", "--controller", base,
        "--controller-password-file", str(password_file(tmp_path)),
    )  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "$.nodes.pc.compute: the controller has no compute 'host-z'" in done.stderr
    assert "host-a (connected)" in done.stderr, done.stderr
    assert not [p for p in controller_projects(cluster.controller) if "misplaced" in p]


@contextlib.contextmanager
def running_lab(cluster: Cluster, tmp_path: Path, name: str, compute: str) -> Iterator[Any]:
    """``emu run --controller`` of a one-VPCS-node lab on ``compute``, without checks (it
    runs until a signal), once it says it runs; killed at the end if still alive."""
    lab = tmp_path / "lab.toml"
    lab.write_text(
        f'name = "{name}"\n[nodes.pc]\nemulator = "vpcs"\nip = "10.0.0.9/24"\n'
        f'compute = "{compute}"\n'
    )
    base = cluster.controller.url.removesuffix("/v3")
    argv = emu(
        "run", str(lab), "--controller", base,
        "--controller-password-file", str(password_file(tmp_path)),
    )  # fmt: skip
    process = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        wait_for_line(process.stderr, "Running. Ctrl-C stops the lab.", 120)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_stops_a_lab_on_the_controller(cluster: Cluster, tmp_path: Path) -> None:
    """A lab running on the controller (no checks: until a signal) ends with 143 on SIGTERM,
    and its project is deleted from the controller, its node stopped on its compute."""
    with running_lab(cluster, tmp_path, "signalled", "host-b") as process:
        assert cluster.computes[1].emulators() != {}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 143
    assert not [p for p in controller_projects(cluster.controller) if "signalled" in p]
    assert cluster.computes[1].emulators() == {}


def test_a_killed_run_leaves_no_node_running(cluster: Cluster, tmp_path: Path) -> None:
    """``emu run --controller`` killed with SIGKILL cannot delete its project; the controller
    closes it once the run's notification WebSocket is gone (``auto_close``), and the
    compute stops the node."""
    with running_lab(cluster, tmp_path, "killed", "host-a") as process:
        assert cluster.computes[0].emulators() != {}
        process.kill()
        process.wait()
    try:
        deadline = time.monotonic() + 60
        while cluster.computes[0].emulators():
            assert time.monotonic() < deadline, "the controller did not close the project"
            time.sleep(0.2)  # the controller waits 5 s after its last listener left
        projects = cluster.controller.api("GET", "/projects")
        killed = [p for p in projects if str(p["name"]).startswith("emu-killed-")]
        assert [p["status"] for p in killed] == ["closed"], killed
    finally:  # the controller serves the module's other tests: leave it no project of ours
        for entry in cluster.controller.api("GET", "/projects"):
            if str(entry["name"]).startswith("emu-killed-"):
                cluster.controller.api("DELETE", f"/projects/{entry['project_id']}")


# -- a compute killed ------------------------------------------------------------------------


def test_a_sigkilled_compute_leaves_no_qemu_and_shows_disconnected(
    cluster: Cluster, guest: TinyGuest
) -> None:
    """A third compute in host B, killed with SIGKILL while its QEMU runs: the kernel's death
    signal ends QEMU, and the controller marks the compute disconnected."""
    controller, hosts = cluster.controller, cluster.hosts
    compute = start_emu_compute(
        cluster.root,
        controller.compute_user,
        controller.compute_password,
        host=hosts.addresses[1],
        prefix=hosts.prefix(1),
        name="host-c",
    )
    compute_id = ""
    try:
        compute_id = register(controller, compute, "host-c")
        with project(controller, "emu-kill") as project_id:
            properties = qemu_properties(guest, "k", "tiny-initrd.img", eth0="10.9.0.1/24")
            node = add_node(controller, project_id, compute_id, "k", properties)
            controller.api("POST", f"/projects/{project_id}/nodes/{node}/start", {})
            wait_status(controller, project_id, node, "started")
            assert len(compute.emulators()) == 1

            def kill() -> None:
                compute.process.send_signal(signal.SIGKILL)
                compute.process.wait(10)

            event = asyncio.run(
                compute_update(controller, compute_id, lambda e: e["connected"] is False, kill)
            )
            assert event["name"] == "host-c"
            deadline = time.monotonic() + 30
            while compute.emulators():
                assert time.monotonic() < deadline, compute.emulators()
                time.sleep(0.1)  # the kernel delivers the death signal; QEMU then exits
    finally:
        if compute.process.poll() is None:
            compute.process.kill()
            compute.process.wait()
        if compute_id:
            unregister(controller, compute_id)
        left = compute.emulators()
        compute.remove_projects()
    assert left == {}
