"""Faults and abuse with real QEMU: kills in the middle of disk writes, kills with links up,
random concurrent calls, and who can reach a node's control socket and console.

Everything here starts the real qemu-system-x86_64 (TCG) and uses the real qemu-img.

How the 100 linked-clone lifecycles stay affordable: booting the tiny guest costs about 8 s
under TCG, so only every 25th lifecycle writes from a booted guest (``dd`` to ``/dev/vda``,
``conv=fsync``). The others write through QEMU's own block layer while the VM runs or is
paused: QMP ``human-monitor-command`` runs ``qemu-io`` on ``drive0``, the same BlockBackend
the guest's virtio disk uses, so the same qcow2 driver in the same process allocates
clusters and updates L2 and refcount tables when QEMU is killed. ``aio_write`` keeps up to
16 writes in flight, then ``aio_flush`` and sometimes ``flush``; that is what leaves leaked
clusters behind (a kill between the refcount and the L2 update), so the repair path runs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import select
import signal
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from emu_qemu.contract import monitor_of, qemu_pid
from emu_qemu.disks import overlay_path
from emu_qemu.qmp import Monitor
from emu_tests.console import open_guest_console
from emucore.errors import EmuError, ImageError, NodeStateError
from emucore.models import LinkFilters, NodeEvent, NodeStatus, UdpNio
from emucore.node import Node
from emucore.process import spawn
from emucore.session import Session
from emucore.telnet import ConsoleError, TelnetConsole

NodeFactory = Callable[..., Awaitable[Node]]

pytestmark = pytest.mark.qemu

EVENT_TIMEOUT = 5.0


def random_seed() -> int:
    """``EMU_TEST_SEED`` to replay a failure (its message shows the seed), else a fresh one."""
    return int(os.environ.get("EMU_TEST_SEED") or int.from_bytes(os.urandom(4), "big"))


# -- helpers -----------------------------------------------------------------------------------


def bare_node(session: Session, name: str, qemu_binary: Path, **properties: Any) -> Node:
    """A QEMU node with no disk and no kernel: SeaBIOS finds nothing to boot and idles, so
    a start costs only QEMU's own start."""
    description = {"name": name, "emulator": "qemu", "qemu_path": str(qemu_binary), "ram": 32}
    return session.add_node(description | {"adapters": 0} | properties)


async def next_event(events: asyncio.Queue[NodeEvent], kind: str) -> NodeEvent:
    """The next event of ``kind`` (bounded)."""
    while (event := await asyncio.wait_for(events.get(), EVENT_TIMEOUT)).kind != kind:
        pass
    return event


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` has open."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]), int(port, 16)
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # /proc prints 4 LE words
    return ":".join(b"".join(words)[i : i + 2].hex() for i in range(0, 16, 2)), int(port, 16)


def bound_sockets(pid: int, protocol: str, state: str) -> set[tuple[str, int]]:
    """(address, port) of the ``protocol`` (``tcp``/``udp``) sockets of ``pid`` in ``state``
    (``0A`` listening TCP, ``07`` unconnected UDP), read from /proc/net: what the kernel
    says, not what emu believes."""
    inodes = socket_inodes(pid)
    found = set()
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[9]) in inodes:
                found.add(_address(fields[1]))
    return found


def local_ports(node: Node) -> set[int]:
    """The UDP ports the node's adapters receive on."""
    return {a.nio.local_port for a in node.adapters if isinstance(a.nio, UdpNio)}


def udp_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a UDP socket can bind ``host:port`` right now (nobody holds it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` ends within ``timeout`` seconds."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def qemus_of(directory: Path) -> list[str]:
    """``pgrep -af`` lines of processes whose command line names ``directory``."""
    done = subprocess.run(
        ["pgrep", "-af", str(directory)], capture_output=True, text=True, check=False
    )
    return [line for line in done.stdout.splitlines() if "qemu" in line]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """(pid, pidfd) of every QEMU emu starts during the test: a pidfd cannot be fooled by
    pid reuse, and becomes readable when the process has ended."""
    started: list[tuple[int, int]] = []

    async def recording_spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        child = await spawn(*args, **kwargs)
        started.append((child.pid, os.pidfd_open(child.pid)))
        return child

    monkeypatch.setattr("emucore.process.spawn", recording_spawn)  # Supervised.start uses it
    try:
        yield started
    finally:
        for _, pidfd in started:
            os.close(pidfd)


# -- 100 linked-clone lifecycles with QEMU killed mid-write -----------------------------------

REGION = 64 << 10  # one qcow2 cluster: the unit the writes below allocate
PAGE = 4 << 10  # a killed write is cut short at a page boundary, never inside a page
PAGES = REGION // PAGE
DISK_SIZE = 1 << 30
REGIONS = DISK_SIZE // REGION
BASE_BYTE = 0xAB
BASE_REGIONS = 16  # the base holds 1 MiB of BASE_BYTE at offset 0, zeros after
LIFECYCLES = 100
GUEST_EVERY = 25  # lifecycles 12, 37, 62, 87 write from a booted guest
CHECK_SAMPLE = 32  # older regions re-read after each lifecycle (all of them at the end)


@attrs.define
class Write:
    """One 64 KiB write of a single byte value to a region."""

    seq: int
    region: int
    byte: int


class DiskModel:
    """What each 4 KiB page of the node's disk may hold, given the writes issued since the
    last check and how far QEMU confirmed them.

    After a SIGKILL only *durable* writes (a flush finished after them) must be there; after
    a clean stop every *completed* write must (QEMU drains and flushes on SIGTERM). A later
    write may or may not have landed, page by page.
    """

    def __init__(self) -> None:
        self.known: dict[int, bytes] = {}  # region -> byte value of each page at the last check
        self.pending: list[Write] = []
        self.completed = 0
        self.durable = 0
        self._seq = 0

    def issue(self, region: int, byte: int) -> Write:
        """Record a write before it is sent: it may land even if its command never returns."""
        self._seq += 1
        write = Write(self._seq, region, byte)
        self.pending.append(write)
        return write

    def confirm(self, seq: int, *, durable: bool) -> None:
        """Writes up to ``seq`` completed (and, if ``durable``, were flushed)."""
        self.completed = max(self.completed, seq)
        if durable:
            self.durable = max(self.durable, seq)

    def before(self, region: int) -> bytes:
        default = BASE_BYTE if region < BASE_REGIONS else 0
        return self.known.get(region, bytes([default]) * PAGES)

    def allowed(self, region: int, survived: int) -> list[set[int]]:
        """Per page, the byte values the region may hold if writes up to ``survived`` must
        be there and later ones may be."""
        pages = [{value} for value in self.before(region)]
        for write in self.pending:
            if write.region != region:
                continue
            if write.seq <= survived:
                pages = [{write.byte} for _ in pages]
            else:
                for page in pages:
                    page.add(write.byte)
        return pages

    def settle(self, observed: dict[int, bytes]) -> None:
        """The check passed: what was read is now the known state."""
        self.known.update(observed)
        self.pending.clear()
        self.completed = self.durable = self._seq

    def forget(self) -> None:
        """The overlay was deleted: the disk is the base again."""
        self.known.clear()
        self.settle({})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img_check(path: Path) -> tuple[int, dict[str, Any]]:
    """Read-only ``qemu-img check``: exit code and its JSON report."""
    done = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        report = {"output": done.stdout + done.stderr}
    return done.returncode, report


def read_pages(overlay: Path, base: Path, regions: set[int]) -> dict[int, list[int | None]]:
    """The byte value of every page of ``regions`` as a reader of the overlay sees it (``None``
    for a page that is not one value throughout).

    ``qemu-img map`` says where QEMU's qcow2 driver finds each range: in the overlay
    (depth 0), in the base (depth 1), or nowhere (zeros); the pages are read from there.
    """
    done = subprocess.run(
        ["qemu-img", "map", "--output=json", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    extents = json.loads(done.stdout)
    starts = [extent["start"] for extent in extents]
    files = {0: overlay.open("rb"), 1: base.open("rb")}
    try:
        result = {}
        for region in sorted(regions):
            values: list[int | None] = []
            for page in range(PAGES):
                virtual = region * REGION + page * PAGE
                extent = extents[bisect.bisect_right(starts, virtual) - 1]
                if extent["data"]:
                    where = extent["offset"] + virtual - extent["start"]
                    data = os.pread(files[extent["depth"]].fileno(), PAGE, where)
                else:
                    data = bytes(PAGE)
                values.append(data[0] if data == data[:1] * PAGE else None)
            result[region] = values
        return result
    finally:
        for file in files.values():
            file.close()


def check_disk(
    disk: DiskModel, overlay: Path, base: Path, survived: int, regions: set[int]
) -> list[str]:
    """Compare what the overlay holds with the model; settle it; the mismatches."""
    observed = read_pages(overlay, base, regions)
    problems = []
    for region, values in observed.items():
        for page, (value, allowed) in enumerate(
            zip(values, disk.allowed(region, survived), strict=True)
        ):
            if value not in allowed:
                problems.append(
                    f"region {region} page {page}: holds {value!r}, expected one of"
                    f" {sorted(allowed)}"
                )
    disk.settle({r: bytes(v if v is not None else 0 for v in vals) for r, vals in observed.items()})
    return problems


async def qemu_io(monitor: Monitor, command: str) -> None:
    """Run a qemu-io command inside QEMU on drive0 (its output goes to qemu.log)."""
    line = f'qemu-io drive0 "{command}"'
    await monitor.execute("human-monitor-command", {"command-line": line})


async def qmp_writes(monitor: Monitor, disk: DiskModel, rng: random.Random) -> None:
    """Write until QEMU goes away: batches of in-flight writes, drained, sometimes flushed."""
    while True:
        batch = [
            disk.issue(rng.randrange(REGIONS), rng.randrange(1, 256))
            for _ in range(rng.randint(1, 16))
        ]
        for write in batch:
            await qemu_io(monitor, f"aio_write -P {write.byte} {write.region * REGION} {REGION}")
        await qemu_io(monitor, "aio_flush")
        flush = rng.random() < 0.5
        if flush:
            await qemu_io(monitor, "flush")
        disk.confirm(batch[-1].seq, durable=flush)


async def guest_writes(
    console: TelnetConsole, disk: DiskModel, rng: random.Random, first: asyncio.Event
) -> None:
    """Have the guest ``dd`` single-byte 64 KiB blocks to /dev/vda, each ``conv=fsync``; its
    ``ok-SEQ`` line proves that write and every earlier one durable."""
    writes = [disk.issue(rng.randrange(REGIONS), rng.randrange(1, 256)) for _ in range(100)]
    # busybox's line editor takes at most 1024 characters a line: send the list in pieces.
    await console.sendline("S=")
    for start in range(0, len(writes), 25):
        steps = " ".join(f"{w.seq}:{w.region}:{w.byte:03o}" for w in writes[start : start + 25])
        await console.sendline(f'S="$S {steps}"')
    await console.sendline(
        "for w in $S; do s=${w%%:*}; w=${w#*:}; r=${w%%:*}; b=${w#*:};"
        f' head -c {REGION} /dev/zero | tr "\\000" "\\\\$b" >/tmp/block &&'
        f" dd if=/tmp/block of=/dev/vda bs={REGION} seek=$r count=1 conv=fsync 2>/dev/null"
        " && echo ok-$s; done"
    )
    done = re.compile(r"ok-(\d+)")
    with contextlib.suppress(ConsoleError):  # the console closes when QEMU goes
        while True:
            match = await console.expect(done, timeout=60)
            disk.confirm(int(match.group(1)), durable=True)
            first.set()


@attrs.define
class Tally:
    kills: int = 0
    stops: int = 0
    guest_lifecycles: int = 0
    guest_durable_writes: int = 0
    leaky: int = 0  # lifecycles after which qemu-img check found leaked clusters
    damaged: int = 0  # lifecycles after which emu refused the overlay as damaged
    verified_pages: int = 0


@pytest.mark.slow
def test_a_linked_clone_survives_100_lifecycles_killed_mid_write(
    emu_run: Any,
    qemu_node: NodeFactory,
    emu_session: Session,
    emu_settings: Any,
) -> None:
    seed = random_seed()
    rng = random.Random(seed)
    base = emu_settings.image_dirs[0] / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    subprocess.run(
        ["qemu-io", "-c", f"write -P {BASE_BYTE} 0 {BASE_REGIONS * REGION}", str(base)],
        check=True,
        capture_output=True,
    )
    base_hash, base_mtime = sha256(base), base.stat().st_mtime_ns
    disk = DiskModel()
    tally = Tally()

    async def lifecycle(node: Node, number: int) -> None:
        guest = number % GUEST_EVERY == GUEST_EVERY // 2
        kill = rng.random() < 0.8
        with emu_session.events.queue() as events:
            await node.start()
            pid = qemu_pid(node)
            assert pid is not None
            console = None
            first = asyncio.Event()
            if guest:
                console = await open_guest_console(node)
                writer = asyncio.create_task(guest_writes(console, disk, rng, first))
                await asyncio.wait_for(first.wait(), 60)  # the guest really writes
                await asyncio.sleep(rng.uniform(0, 1.5))  # then a random moment
            else:
                if rng.random() < 0.5:
                    await node.suspend()  # qemu-io writes while the CPUs are paused
                writer = asyncio.create_task(qmp_writes(monitor_of(node), disk, rng))
                await asyncio.sleep(rng.uniform(0.02, 0.4))  # a random moment
            if kill:
                os.kill(pid, signal.SIGKILL)
                event = await next_event(events, "error")
                assert event.message == "emulator exited unexpectedly (exit code -9)"
            else:
                await node.stop()
            with contextlib.suppress(EmuError):
                await asyncio.wait_for(writer, EVENT_TIMEOUT)
            if console is not None:
                await console.close()
        assert node.status is NodeStatus.STOPPED
        tally.kills += kill
        tally.stops += not kill
        if guest:
            tally.guest_lifecycles += 1
            tally.guest_durable_writes += sum(w.seq <= disk.durable for w in disk.pending)
        await after_lifecycle(node, survived=disk.durable if kill else disk.completed, kill=kill)

    async def after_lifecycle(node: Node, survived: int, kill: bool) -> None:
        overlay = overlay_path(node, "a")
        code, report = qemu_img_check(overlay)
        if not kill:
            assert (code, report.get("leaks", 0)) == (0, 0), report  # a clean stop is clean
        if report.get("leaks"):
            tally.leaky += 1
        if code == 2 or report.get("corruptions"):
            # Damaged (never seen so far): emu must say so, and not start on it.
            with pytest.raises(ImageError, match=r"linked clone .* is damaged.*Delete it"):
                await node.prepare_disks()
            tally.damaged += 1
            overlay.unlink()
            disk.forget()
        else:
            assert code in (0, 3), report  # clean, or leaks only
            await node.prepare_disks()
            code, report = qemu_img_check(overlay)
            assert (code, report.get("leaks", 0), report.get("check-errors")) == (0, 0, 0), report
            touched = {write.region for write in disk.pending}
            older = sorted(set(disk.known) - touched)
            regions = touched | set(rng.sample(older, min(CHECK_SAMPLE, len(older))))
            problems = check_disk(disk, overlay, base, survived, regions)
            assert problems == [], f"seed {seed}: data lost or invented: {problems[:5]}"
            tally.verified_pages += len(regions) * PAGES
        assert base.stat().st_mtime_ns == base_mtime
        assert sha256(base) == base_hash

    async def body() -> None:
        node = await qemu_node(
            "clone",
            start=False,
            adapters=0,
            hda_disk_image=base.name,
            hda_disk_interface="virtio",
        )
        for number in range(LIFECYCLES):
            await lifecycle(node, number)
        problems = check_disk(disk, overlay_path(node, "a"), base, disk.completed, set(disk.known))
        assert problems == [], f"seed {seed}: {problems[:5]}"

    emu_run(body())
    print(f"seed {seed}: {tally}")
    assert tally.kills + tally.stops == LIFECYCLES
    assert tally.guest_lifecycles == LIFECYCLES // GUEST_EVERY
    assert tally.guest_durable_writes >= tally.guest_lifecycles  # every guest wrote for real
    # The repair path ran (leaks follow about one kill in five here).
    assert tally.leaky > 0, tally
    assert sha256(base) == base_hash


# -- a killed QEMU gives its link ports back ----------------------------------------------------


def test_a_killed_qemu_frees_its_link_ports_and_takes_them_again_on_restart(
    emu_run: Any, emu_session: Session, qemu_binary: Path
) -> None:
    async def body() -> None:
        a = bare_node(emu_session, "a", qemu_binary, adapters=2)
        b = bare_node(emu_session, "b", qemu_binary, adapters=2)
        await asyncio.gather(a.start(), b.start())
        await emu_session.link(a, 0, b, 0)  # direct
        relayed = await emu_session.link(a, 1, b, 1, LinkFilters(delay=1))
        assert relayed.relay is not None
        a_ports, b_ports = local_ports(a), local_ports(b)
        relay_ports = {relayed.relay.port("a"), relayed.relay.port("b")}
        a_pid, b_pid = qemu_pid(a), qemu_pid(b)
        assert a_pid is not None
        assert b_pid is not None
        assert {port for _, port in bound_sockets(a_pid, "udp", "07")} == a_ports
        assert {port for _, port in bound_sockets(b_pid, "udp", "07")} == b_ports

        loop = asyncio.get_running_loop()
        with emu_session.events.queue() as events:
            killed_at = loop.time()
            os.kill(a_pid, signal.SIGKILL)
            await next_event(events, "error")
            assert loop.time() - killed_at < 1.0
        assert a.status is NodeStatus.STOPPED
        assert all(udp_bindable(port) for port in a_ports)  # the dead QEMU holds nothing
        assert not any(udp_bindable(port) for port in b_ports | relay_ports)
        assert b.status is NodeStatus.STARTED
        assert {port for _, port in bound_sockets(b_pid, "udp", "07")} == b_ports
        # The links stay: the restarted node takes the same ports again.
        assert local_ports(a) == a_ports
        await a.start()
        new_pid = qemu_pid(a)
        assert new_pid is not None
        assert new_pid != a_pid
        assert {port for _, port in bound_sockets(new_pid, "udp", "07")} == a_ports

    emu_run(body())


# -- 200 random concurrent calls on 5 nodes ---------------------------------------------------

OPERATIONS = ("start", "stop", "suspend", "resume")
RUNNING = (NodeStatus.STARTED, NodeStatus.SUSPENDED)
TRANSITIONS = {
    (NodeStatus.STOPPED, NodeStatus.STARTING),
    (NodeStatus.STARTING, NodeStatus.STARTED),
    (NodeStatus.STARTING, NodeStatus.STOPPED),
    (NodeStatus.STARTED, NodeStatus.SUSPENDED),
    (NodeStatus.SUSPENDED, NodeStatus.STARTED),
    (NodeStatus.STARTED, NodeStatus.STOPPING),
    (NodeStatus.SUSPENDED, NodeStatus.STOPPING),
    (NodeStatus.STOPPING, NodeStatus.STOPPED),
}


def model(status: NodeStatus, operation: str) -> tuple[NodeStatus, str]:
    """The node's documented state machine: the status after ``operation`` and whether the
    call succeeds (``ok``) or is refused with NodeStateError (``refused``)."""
    if operation == "start":
        return NodeStatus.STARTED, "ok"
    if operation == "stop":
        return NodeStatus.STOPPED, "ok"
    if status is NodeStatus.STOPPED:  # suspend and resume need a running node
        return status, "refused"
    return (NodeStatus.SUSPENDED if operation == "suspend" else NodeStatus.STARTED), "ok"


def test_200_random_concurrent_calls_on_5_nodes_end_as_the_last_call_says(
    emu_run: Any,
    emu_session: Session,
    qemu_binary: Path,
    spawned: list[tuple[int, int]],
) -> None:
    seed = random_seed()
    rng = random.Random(seed)
    nodes = [bare_node(emu_session, f"n{i}", qemu_binary) for i in range(5)]
    calls = [(rng.choice(nodes), rng.choice(OPERATIONS)) for _ in range(200)]
    statuses: dict[str, list[NodeStatus]] = {node.name: [NodeStatus.STOPPED] for node in nodes}

    def record(event: NodeEvent) -> None:
        if event.kind == "status":
            statuses[event.node].append(event.status)

    emu_session.events.subscribe(record)

    async def call(node: Node, operation: str) -> str:
        try:
            await getattr(node, operation)()
        except NodeStateError:
            return "refused"
        return "ok"

    async def body() -> list[str]:
        tasks = []
        for node, operation in calls:
            # Each task reaches the node's lock before the next is made: lock order = call order.
            tasks.append(asyncio.create_task(call(node, operation)))
            await asyncio.sleep(rng.uniform(0, 0.02))
        results: list[str] = await asyncio.wait_for(asyncio.gather(*tasks), 180)  # no deadlock
        return results

    results = emu_run(body())

    expected_status = {node.name: NodeStatus.STOPPED for node in nodes}
    expected_results = []
    for node, operation in calls:
        expected_status[node.name], outcome = model(expected_status[node.name], operation)
        expected_results.append(outcome)
    assert results == expected_results, f"seed {seed}"
    assert {n.name: n.status for n in nodes} == expected_status, f"seed {seed}"
    for name, path in statuses.items():
        steps = set(itertools.pairwise(path))
        assert steps <= TRANSITIONS, f"seed {seed}: {name} went {steps - TRANSITIONS}"

    async def real_states() -> dict[str, str]:
        states = {}
        for node in nodes:
            if node.is_running:
                states[node.name] = (await monitor_of(node).execute("query-status"))["status"]
            else:
                assert qemu_pid(node) is None
                assert not (node.directory / "qmp.sock").exists()
                assert not (node.directory / "qemu.pid").exists()
                states[node.name] = "stopped"
        return states

    wanted = {NodeStatus.STARTED: "running", NodeStatus.SUSPENDED: "paused"}
    assert emu_run(real_states()) == {
        name: wanted.get(status, "stopped") for name, status in expected_status.items()
    }
    alive = {pid for node in nodes if (pid := qemu_pid(node)) is not None}
    assert len(alive) == sum(status in RUNNING for status in expected_status.values())
    assert len(spawned) >= len(alive)
    leaked = [pid for pid, pidfd in spawned if pid not in alive and not exited(pidfd, 5)]
    assert leaked == [], f"seed {seed}: QEMUs of stopped nodes still run"
    emu_run(emu_session.close())
    assert [pid for pid, pidfd in spawned if not exited(pidfd, 10)] == []
    assert qemus_of(emu_session.project.directory) == []


# -- private control socket, console on the configured address only --------------------------


@pytest.mark.parametrize(
    ("console_type", "console_host"),
    [("telnet", None), ("telnet", "127.0.0.2"), ("vnc", None), ("vnc", "127.0.0.2")],
)
def test_qmp_is_a_private_unix_socket_and_the_console_listens_where_configured(
    emu_run: Any,
    emu_session: Session,
    qemu_binary: Path,
    console_type: str,
    console_host: str | None,
) -> None:
    session = emu_session
    if console_host is not None:
        settings = attrs.evolve(emu_session.settings, console_host=console_host)
        session = Session(emu_session.project, settings=settings)
    node = bare_node(session, "private", qemu_binary, console_type=console_type)

    async def body() -> None:
        try:
            await node.start()
            pid = qemu_pid(node)
            assert pid is not None
            assert node.console is not None
            host = console_host or "127.0.0.1"
            assert (node.console.type, node.console.host) == (console_type, host)
            # The kernel's view: the console listens on TCP at the console's address and port
            # only (QEMU's VNC server; the host's telnet server, QEMU then listening on no TCP
            # port at all); QMP is nowhere on TCP.
            console = {(host, node.console.port)}
            if console_type == "telnet":
                assert bound_sockets(pid, "tcp", "0A") == set()
                assert console <= bound_sockets(os.getpid(), "tcp", "0A")
            else:
                assert bound_sockets(pid, "tcp", "0A") == console
            for name in ("qmp.sock", "console.sock") if console_type == "telnet" else ("qmp.sock",):
                mode = (node.directory / name).stat().st_mode
                assert stat.S_ISSOCK(mode)
                assert stat.S_IMODE(mode) == 0o600
                assert (node.directory / name).stat().st_uid == os.getuid()
        finally:
            await session.close()

    emu_run(body())
