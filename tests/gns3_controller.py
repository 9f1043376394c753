"""A real, unmodified GNS3 3.0.6 controller and an ``emu serve`` compute for the tests.

The controller is the ``gns3server`` that ``scripts/setup`` installs in ``.venv-gns3`` (its
pins clash with ours), run with an INI file, a temporary HOME and every path in a temporary
directory. Tests talk to it only through its own REST API, with its JWT.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import dpkt

from emu_tests.guest import TinyGuest
from emucore.telnet import TelnetConsole
from tests.helpers import emulators_mentioning
from tests.netns import Hosts

ROOT = Path(__file__).resolve().parent.parent
GNS3SERVER = ROOT / ".venv-gns3" / "bin" / "gns3server"
START_TIMEOUT = 90.0


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ApiError(Exception):
    """A non-2xx answer: the status and the decoded body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def request(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> Any:
    """One JSON request; raises :class:`ApiError` for an error status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=300) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = raw.decode(errors="replace")
        raise ApiError(error.code, decoded) from None
    return json.loads(raw) if raw.strip() else None


@attrs.define
class Controller:
    """A running controller.

    :ivar url: ``http://127.0.0.1:PORT/v3``.
    :ivar token: the admin's JWT.
    :ivar root: its temporary directory (images in ``images/QEMU``).
    :ivar process: the gns3server process.
    """

    url: str
    root: Path
    process: subprocess.Popen[bytes]
    compute_user: str
    compute_password: str
    token: str = ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the controller's REST API as its admin."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return request(self.url + path, method, body, headers)

    @property
    def images(self) -> Path:
        """The controller's QEMU image directory (what it uploads from)."""
        return self.root / "images" / "QEMU"

    def log(self) -> str:
        """The controller's log."""
        path = self.root / "gns3server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_until_listening(url: str, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {log.read_text()[-3000:]}")
        try:
            request(url)
            return
        except ApiError:
            return  # it answers (401 is an answer)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)  # polling a port that does not listen yet: no event to wait for
    raise RuntimeError(f"{what} did not listen within {START_TIMEOUT} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> int:
    """SIGTERM, wait, then SIGKILL: the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@contextlib.contextmanager
def gns3_controller(root: Path) -> Iterator[Controller]:
    """Start a controller in ``root``; stopped when the block ends."""
    for sub in ("home", "images/QEMU", "projects", "appliances", "symbols", "configs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    user, password = "emu-compute", secrets.token_hex(12)
    config = root / "gns3_server.conf"
    config.write_text(
        "[Server]\nhost = 127.0.0.1\n"
        f"port = {port}\n"
        f"images_path = {root / 'images'}\nprojects_path = {root / 'projects'}\n"
        f"appliances_path = {root / 'appliances'}\nsymbols_path = {root / 'symbols'}\n"
        f"configs_path = {root / 'configs'}\n"
        "report_errors = False\ninstall_builtin_appliances = False\n"
        "enable_builtin_templates = False\n"
        f"compute_username = {user}\ncompute_password = {password}\n"
        "[Controller]\ndefault_admin_username = admin\ndefault_admin_password = admin-pw\n"
    )
    controller = Controller(f"http://127.0.0.1:{port}/v3", root, _launch(root), user, password)
    try:
        _log_in(controller)
        yield controller
    finally:
        stop(controller.process)


def _launch(root: Path) -> subprocess.Popen[bytes]:
    """Start gns3server with the configuration written in ``root``."""
    argv = [str(GNS3SERVER), "--config", str(root / "gns3_server.conf")]
    argv += ["--logfile", str(root / "gns3server.log")]
    env = {**os.environ, "HOME": str(root / "home")}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _log_in(controller: Controller) -> None:
    log = controller.root / "gns3server.log"
    _wait_until_listening(controller.url + "/version", controller.process, "the controller", log)
    login = {"username": "admin", "password": "admin-pw"}
    answer = request(controller.url + "/access/users/authenticate", "POST", login)
    controller.token = answer["access_token"]


def crash_and_restart(controller: Controller) -> None:
    """SIGKILL the controller (it closes nothing) and start it again on its own database,
    configuration and port, as after a crash or a lost host."""
    controller.process.kill()
    controller.process.wait(30)
    controller.process = _launch(controller.root)
    _log_in(controller)


@attrs.define
class EmuCompute:
    """A running ``emu serve``.

    :ivar host: the address it listens on (its consoles and tunnels too).
    :ivar port: its TCP port.
    :ivar images: its image directory.
    :ivar projects: its projects directory (remove it with :meth:`remove_projects`).
    """

    host: str
    port: int
    images: Path
    projects: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    user: str
    password: str

    @property
    def url(self) -> str:
        """``http://HOST:PORT/v3/compute``."""
        return f"http://{self.host}:{self.port}/v3/compute"

    def api(self, method: str, path: str, body: Any = None, password: str | None = None) -> Any:
        """Call the compute directly (HTTP Basic)."""
        secret = f"{self.user}:{password if password is not None else self.password}"
        headers = {"Authorization": "Basic " + b64encode(secret.encode()).decode()}
        return request(self.url + path, method, body, headers)

    def log(self) -> str:
        """What ``emu serve`` printed."""
        return self.log_path.read_text(errors="replace")

    def emulators(self) -> dict[int, str]:
        """This compute's emulators still running (pid → command line): their command lines
        name its image directory (QEMU's kernel or disks) or its projects (VPCS, overlays)."""
        return emulators_mentioning(str(self.images)) | emulators_mentioning(str(self.projects))

    def remove_projects(self) -> None:
        """Delete the projects directory."""
        shutil.rmtree(self.projects, ignore_errors=True)


def start_emu_compute(
    root: Path,
    user: str,
    password: str,
    *,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    name: str = "emu",
) -> EmuCompute:
    """Start ``emu serve`` on a free port with its own image and projects directories.

    :param host: the address it listens on; its consoles and UDP tunnels use it too.
    :param prefix: what runs the command (``ip netns exec NS`` for a compute in a namespace).
    :param name: names its directories and files in ``root``.
    """
    images = root / f"{name}-images"
    projects = root / f"{name}-projects"
    images.mkdir(parents=True, exist_ok=True)
    projects.mkdir(parents=True, exist_ok=True)
    password_file = root / f"{name}-password"
    password_file.write_text(password + "\n")
    settings = root / f"{name}-settings.toml"
    settings.write_text(f'console_host = "{host}"\nudp_host = "{host}"\n')
    port = free_port()
    log_path = root / f"{name}-serve.log"
    argv = [*prefix, sys.executable, "-m", "emucore.cli", "-v", "serve", "--port", str(port)]
    argv += ["--host", host, "--settings", str(settings)]
    argv += ["--user", user, "--password-file", str(password_file)]
    argv += ["--image-dir", str(images), "--projects-dir", str(projects)]
    env = {**os.environ, "EMU_QEMU_KVM": "off"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    compute = EmuCompute(host, port, images, projects, process, log_path, user, password)
    _wait_until_listening(compute.url + "/version", process, "emu serve", log_path)
    return compute


def register(controller: Controller, compute: EmuCompute, name: str) -> str:
    """Register ``compute`` with the controller under ``name``; its compute id."""
    compute_id = str(uuid.uuid4())
    registration = {
        "compute_id": compute_id,
        "protocol": "http",
        "host": compute.host,
        "port": compute.port,
        "user": compute.user,
        "password": compute.password,
        "name": name,
    }
    answer = controller.api("POST", "/computes?connect=true", registration)
    assert answer["compute_id"] == compute_id, answer
    return compute_id


def unregister(controller: Controller, compute_id: str) -> None:
    """Remove a compute from the controller (other tests then do not place nodes on it)."""
    with contextlib.suppress(ApiError):
        controller.api("DELETE", f"/computes/{compute_id}")


STATUS_TIMEOUT = 120.0


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
    """A tiny-guest QEMU node as a GNS3 user would describe it (images by file name): the
    kernel ``tiny-vmlinuz``, ``initrd``, two adapters with the addresses ``eth0`` (and
    ``eth1``) given."""
    extra = {"eth1": ips["eth1"]} if "eth1" in ips else {}
    line = guest.kernel_command_line(ip=ips["eth0"], hostname=name, extra_ips=extra)
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


async def captured_echoes(
    controller: Controller, project: str, link: str, console: TelnetConsole, command: str
) -> set[tuple[str, str, str]]:
    """Capture ``link`` through the controller while ``command`` (a ping) runs on
    ``console``; the ICMP echoes the controller's pcap stream held, read with dpkt."""
    controller.api("POST", f"/projects/{project}/links/{link}/capture/start", {})
    reader = PcapReader(controller, project, link)
    reader.start()
    _, output = await console.run(command, timeout=60)
    assert ping(output)[0] >= 1, output
    controller.api("POST", f"/projects/{project}/links/{link}/capture/stop", {})
    await asyncio.to_thread(reader.join, 60)
    assert not reader.is_alive(), "the pcap stream did not end with the capture"
    return icmp_between(reader.data)


async def suspend_and_resume(
    controller: Controller, project: str, link: str, console: TelnetConsole, target: str
) -> None:
    """Suspend ``link`` through the controller (a ping of ``target`` on ``console`` fails),
    then resume it (the ping passes)."""
    controller.api("PUT", f"/projects/{project}/links/{link}", {"suspend": True})
    _, output = await console.run(f"ping -c 2 -W 1 {target}", timeout=60)
    assert ping(output)[0] == 0, output
    controller.api("PUT", f"/projects/{project}/links/{link}", {"suspend": False})
    _, output = await console.run(f"ping -c 5 -W 3 {target}", timeout=60)
    assert ping(output)[0] >= 1, output


async def compute_update(
    controller: Controller,
    compute_id: str,
    accept: Callable[[dict[str, Any]], bool],
    then: Callable[[], None] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The first ``compute.updated`` notification about ``compute_id`` that ``accept``s,
    read from the controller's notification WebSocket (the only place the controller shows
    a compute's connection and load: its REST API returns the stored registration).

    :param then: called once the controller is seen sending this WebSocket updates about
        the compute (e.g. to kill the compute): it subscribes the socket a moment after the
        handshake, and an update sent before that is lost (a SIGKILLed compute's only
        ``connected: false`` was, once in a few runs).
    """
    url = controller.url.replace("http", "ws", 1) + f"/notifications/ws?token={controller.token}"

    async def update() -> dict[str, Any]:
        while True:
            message = await ws.receive_json()
            event = message.get("event", {})
            if message.get("action") == "compute.updated" and event.get("compute_id") == compute_id:
                return dict(event)

    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async with asyncio.timeout(timeout):
            if then is not None:
                await update()  # the compute's next ping: the controller listens to us now
                then()
            while True:
                event = await update()
                if accept(event):
                    return event


@contextlib.contextmanager
def computes_on(
    controller: Controller, root: Path, hosts: Hosts, names: Sequence[str] = ("host-a", "host-b")
) -> Iterator[list[tuple[EmuCompute, str]]]:
    """An ``emu serve`` on each host (inside its namespace, on its address), registered with
    the controller under ``names``: ``[(compute, compute id), ...]``. At the end each is
    stopped and unregistered; none may leave an emulator behind.
    """
    started: list[tuple[EmuCompute, str]] = []
    computes: list[EmuCompute] = []
    try:
        for index, name in enumerate(names):
            compute = start_emu_compute(
                root,
                controller.compute_user,
                controller.compute_password,
                host=hosts.addresses[index],
                prefix=hosts.prefix(index),
                name=name,
            )
            computes.append(compute)
            started.append((compute, register(controller, compute, name)))
        yield started
    finally:
        for compute in computes:
            stop(compute.process)
        for _, compute_id in started:
            unregister(controller, compute_id)
        left = {compute.host: compute.emulators() for compute in computes}
        for compute in computes:
            compute.remove_projects()
        assert all(not found for found in left.values()), left
