"""The emu-vpcs plugin with the real vpcs binary (and the real QEMU for the mixed lab).

VPCS 0.5b2 prints ping replies as ``10.0.0.1 icmp_seq=1 ttl=64 time=0.3 ms``; later
versions as ``84 bytes from 10.0.0.1 icmp_seq=1 ...``: the checks accept both.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from emu_vpcs.confine import ConfineError, install_seccomp
from emu_vpcs.process import PROCESS as VPCS_PROCESS
from emu_vpcs.process import launcher_argv, vpcs_pid

from emu_qemu.contract import PID as QEMU_PID
from emu_qemu.process import PROCESS as QEMU_PROCESS
from emu_tests.vpcs_fixtures import (
    VPCS_PROMPT,
    open_vpcs_console,
    vpcs_command,
    vpcs_console,
    vpcs_node,
)
from emucore import hookimpl
from emucore.errors import ConfigError, EmulatorExitedError, NodeError
from emucore.hooks import call_each
from emucore.models import HostSettings, NodeEvent, NodeStatus, Project, UdpNio
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.records import CheckResult
from emucore.session import Session
from emucore.telnet import TelnetConsole
from emucore.telnetd import TelnetDecoder
from tests.helpers import icmp_pairs, processes_mentioning
from tests.test_orphans import reap, wait_gone

__all__ = ["vpcs_console", "vpcs_node"]  # fixtures, until emu_tests.plugin registers them

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]

REPLY = r"(?:84 bytes from )?{address}[ :].*icmp_seq=\d+ ttl=\d+ time="


def replies(output: str, address: str) -> int:
    """How many echo replies from ``address`` a VPCS ping printed."""
    return len(re.findall(REPLY.format(address=re.escape(address)), output))


async def vpcs_ping(console: TelnetConsole, address: str, count: int = 3) -> str:
    """VPCS pings ``address`` ``count`` times, 0.3 s apart, each waiting 1 s for its reply."""
    command = f"ping {address} -c {count} -i 300 -w 1000"
    return await vpcs_command(console, command, timeout=10 + 2 * count)


def run(work: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(work, timeout))


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session with the installed plugins on a fresh project (no node is started)."""
    project = Project.for_directory(tmp_path / "project")
    session = Session(project, settings=HostSettings(), plugins=make_plugin_manager(environ={}))
    yield session
    run(session.close())  # gives the nodes' MAC addresses back


# -- description, argv, check: no process ---------------------------------------------------


def problems(session: Session, **description: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        session.add_node({"name": "pc", "emulator": "vpcs", **description})
    return list(caught.value.problems)


def test_bad_properties_are_refused_naming_each_field(session: Session) -> None:
    assert problems(session, ip="10.0.0.2") == [
        "$.ip: must be an IPv4 address with a prefix length, like 10.0.0.2/24; got '10.0.0.2'"
    ]
    assert problems(session, ip="10.0.0.0/24")[0].startswith("$.ip: 10.0.0.0 is the network's")
    assert problems(session, ip="10.0.0.2/24", gateway="10.0.1.1") == [
        "$.gateway: must be another address of ip's network 10.0.0.0/24; got '10.0.1.1'"
    ]
    assert problems(session, gateway="10.0.0.1") == [
        "$.gateway: needs ip (the node's own address and prefix length)"
    ]
    assert problems(session, ip="10.0.0.2/24", startup_script="ip 10.0.0.3/24")[0].startswith(
        "$.ip: cannot be used together with startup_script"
    )
    assert problems(session, startup_script="ip 10.0.0.3/24\n  ! rm -rf /tmp/x\n") == [
        "$.startup_script: line 2: '!' runs a command on the host, which emu does not allow;"
        " got '! rm -rf /tmp/x'"
    ]
    assert problems(session, mac_address="02:00:00:00:00:01") == [
        "$.mac_address: must be 00:50:79:66:68:XX (VPCS lets only the last byte be chosen);"
        " got '02:00:00:00:00:01'"
    ]
    assert set(problems(session, console=70000, console_type="vnc", adapters=2)) == {
        "$.console: must be 0..65535, got 70000",
        "$.console_type: must be one of none, telnet; got 'vnc'",
        "$.adapters: unknown key",
    }
    assert problems(
        session,
        nios={
            "1": {
                "type": "udp",
                "local_port": 30000,
                "remote_host": "127.0.0.1",
                "remote_port": 30001,
            }
        },
    ) == ["$.nios[1]: adapter 1 does not exist (the node has 1)"]


def test_mac_addresses_are_stable_unique_in_a_project_and_explicit_ones_checked(
    session: Session, tmp_path: Path
) -> None:
    nodes = [session.add_node({"name": f"pc{n}", "emulator": "vpcs"}) for n in range(40)]
    bytes_ = [argv_of(node)[argv_of(node).index("-m") + 1] for node in nodes]
    assert len(set(bytes_)) == 40  # 40 nodes in 256 values: collisions were moved aside
    free = next(b for b in range(256) if str(b) not in bytes_)
    mac = f"00:50:79:66:68:{free:02X}"
    fixed = session.add_node({"name": "fixed", "emulator": "vpcs", "mac_address": mac})
    assert argv_of(fixed)[argv_of(fixed).index("-m") + 1] == str(free)
    assert problems(session, mac_address=mac.lower()) == [
        f"$.mac_address: {mac.lower()} is held by VPCS node 'fixed'; choose another"
    ]
    run(session.close())  # closing gives the MACs back
    again = Session(session.project, plugins=make_plugin_manager(environ={}))
    node = again.add_node({"name": "pc0", "emulator": "vpcs"})
    assert argv_of(node)[argv_of(node).index("-m") + 1] == bytes_[0]  # same node, same MAC
    assert again.add_node({"name": "f", "emulator": "vpcs", "mac_address": mac})
    run(again.close())


def argv_of(node: Node) -> list[str]:
    return list(run(node.dry_run()))


def test_the_command_line_of_a_connected_and_of_an_unconnected_node(session: Session) -> None:
    nio = {"type": "nio_udp", "lport": 30010, "rhost": "127.0.0.1", "rport": 30011}
    linked = session.add_node(
        {"name": "pc1", "emulator": "vpcs", "ip": "10.0.0.2/24", "nios": {"0": nio}}
    )
    script = linked.directory / "startup.vpc"
    argv = argv_of(linked)
    mac = argv[argv.index("-m") + 1]
    assert argv == [
        "/usr/bin/vpcs", "-i", "1", "-m", mac,
        "-s", "30010", "-c", "30011", "-t", "127.0.0.1", str(script),
    ]  # fmt: skip
    assert not script.exists()  # a dry run writes nothing
    alone = session.add_node({"name": "pc2", "emulator": "vpcs"})
    assert argv_of(alone)[5:11] == ["-s", "0", "-c", "0", "-t", "127.0.0.1"]
    tap = session.add_node(
        {"name": "pc3", "emulator": "vpcs", "nios": {"0": {"type": "tap", "device": "tap0"}}}
    )
    with pytest.raises(NodeError, match="adapter 0: VPCS supports UDP NIOs only, got TapNio"):
        argv_of(tap)
    far = session.add_node(
        {"name": "pc4", "emulator": "vpcs", "nios": {"0": {**nio, "rhost": "::1"}}}
    )
    with pytest.raises(NodeError, match="adapter 0: VPCS needs an IPv4 address"):
        argv_of(far)
    missing = session.add_node(
        {"name": "pc5", "emulator": "vpcs", "vpcs_path": "/usr/bin/no-such-vpcs"}
    )
    with pytest.raises(NodeError, match="vpcs_path: VPCS binary '/usr/bin/no-such-vpcs' not found"):
        argv_of(missing)
    # A description cannot make emu run an executable of its choice.
    elsewhere = session.add_node({"name": "pc6", "emulator": "vpcs", "vpcs_path": "/tmp/vpcs"})
    with pytest.raises(NodeError, match="is not in the host's binary directories or on PATH"):
        argv_of(elsewhere)


def check_vpcs(settings: HostSettings) -> CheckResult:
    # Blocked: the QEMU checks (the KVM probe boots a kernel) are not what this is about.
    manager = make_plugin_manager(environ={}, blocked=["qemu.accel", "qemu.binary"])
    results = run(call_each(manager, "emu_check", settings=settings))
    found: list[CheckResult] = [r for group in results for r in group if r.subject == "vpcs"]
    assert len(found) == 1, found
    return found[0]


def test_emu_check_reports_the_vpcs_binary(tmp_path: Path) -> None:
    found = check_vpcs(HostSettings())
    assert found == CheckResult("vpcs", True, "/usr/bin/vpcs, version 0.5b2")
    bad = check_vpcs(HostSettings(emulators={"vpcs": {"binary_dirs": 3}}))
    assert not bad.ok
    assert "$.binary_dirs" in bad.detail
    impostor = tmp_path / "bin" / "vpcs"
    impostor.parent.mkdir()
    impostor.write_text("#!/bin/sh\necho hello\n")
    impostor.chmod(0o755)
    fake = check_vpcs(HostSettings(emulators={"vpcs": {"binary_dirs": [str(impostor.parent)]}}))
    assert fake == CheckResult(
        "vpcs", False, f"{str(impostor)!r} did not report a VPCS version (-v)"
    )


def test_the_telnet_decoder_turns_client_input_into_keystrokes() -> None:
    decoder = TelnetDecoder()
    # Negotiation dropped, CR LF and CR NUL are one Enter, IAC IAC is 0xff, IP is Ctrl-C.
    data = b"\xff\xfb\x18ping\r\n\xff\xfa\x18\x00xterm\xff\xf0x\r\x00\xff\xff\xff\xf4"
    assert decoder.feed(data) == b"ping\rx\r\xff\x03"
    # Split anywhere, even inside a command or between CR and LF, it decodes the same.
    split = TelnetDecoder()
    assert b"".join(split.feed(data[i : i + 1]) for i in range(len(data))) == b"ping\rx\r\xff\x03"


# -- real VPCS ------------------------------------------------------------------------------


class Spy:
    """A plugin scoped to one emulator kind that records which nodes its hooks receive."""

    def __init__(self, kind: str) -> None:
        self.EMULATOR = kind
        self.seen: set[tuple[str, str]] = set()

    @hookimpl
    def emu_node_created(self, node: Node) -> None:
        self.seen.add(("created", node.name))

    @hookimpl
    def emu_build_args(self, node: Node) -> None:
        self.seen.add(("build_args", node.name))

    @hookimpl
    def emu_start(self, node: Node, argv: list[str]) -> None:
        self.seen.add(("start", node.name))

    @hookimpl
    def emu_update_nio(self, node: Node, adapter: int, old: Any, new: Any) -> None:
        self.seen.add(("update_nio", node.name))

    @hookimpl
    def emu_stop(self, node: Node) -> None:
        self.seen.add(("stop", node.name))


@pytest.mark.qemu
def test_a_qemu_guest_and_vpcs_ping_each_other_and_never_see_each_others_nodes(
    emu_run: Any,
    emu_session: Session,
    emu_plugin_manager: Any,
    qemu_node: NodeFactory,
    guest_console: ConsoleFactory,
    vpcs_node: NodeFactory,
    vpcs_console: ConsoleFactory,
) -> None:
    spies = {kind: Spy(kind) for kind in ("qemu", "vpcs")}
    for kind, spy in spies.items():
        emu_plugin_manager.register(spy, name=f"spy-{kind}")

    async def body() -> None:
        guest, pc = await asyncio.gather(
            qemu_node("r1", ip="10.0.0.1/24"), vpcs_node("pc1", ip="10.0.0.2/24")
        )
        await emu_session.link(guest, 0, pc, 0)
        shell, console = await asyncio.gather(guest_console(guest), vpcs_console(pc))
        assert "IP/MASK     : 10.0.0.2/24" in await vpcs_command(console, "show ip")

        out = await vpcs_ping(console, "10.0.0.1")
        assert replies(out, "10.0.0.1") == 3, out
        status, out = await shell.run("ping -c 3 -W 2 10.0.0.2", timeout=30)
        assert status == 0, out
        assert "3 packets received" in out

        # Each kind's plugins worked on their own node only: argv and stash show it.
        assert guest.argv[0].endswith("qemu-system-x86_64")
        assert pc.argv[:3] == ["/usr/bin/vpcs", "-i", "1"]
        assert QEMU_PID in guest.stash
        assert QEMU_PROCESS in guest.stash
        assert VPCS_PROCESS not in guest.stash
        assert QEMU_PID not in pc.stash
        assert QEMU_PROCESS not in pc.stash
        assert VPCS_PROCESS in pc.stash
        await asyncio.gather(guest.stop(), pc.stop())

    emu_run(body())
    for kind, node in (("qemu", "r1"), ("vpcs", "pc1")):
        names = {name for _, name in spies[kind].seen}
        assert names == {node}, spies[kind].seen
        assert ("start", node) in spies[kind].seen
    assert ("update_nio", "pc1") not in spies["vpcs"].seen  # linked while running: an attach
    assert ("stop", "r1") in spies["qemu"].seen
    assert ("stop", "pc1") in spies["vpcs"].seen


@pytest.mark.qemu
def test_a_capture_on_the_vpcs_end_runs_in_the_relay_and_relinking_restarts_vpcs(
    emu_run: Any,
    emu_session: Session,
    qemu_node: NodeFactory,
    vpcs_node: NodeFactory,
    vpcs_console: ConsoleFactory,
    tmp_path: Path,
) -> None:
    capture = tmp_path / "vpcs-end.pcap"

    async def body() -> None:
        guest, pc = await asyncio.gather(
            qemu_node("r1", ip="10.0.0.1/24"), vpcs_node("pc1", ip="10.0.0.2/24")
        )
        link = await emu_session.link(guest, 0, pc, 0)
        assert link.relay is None
        console = await vpcs_console(pc)
        first_pid = vpcs_pid(pc)
        direct = pc.adapters[0].nio
        assert isinstance(direct, UdpNio)

        await link.start_capture(capture, side="b")  # VPCS cannot: the relay captures
        assert link.relay is not None
        relayed = pc.adapters[0].nio
        assert isinstance(relayed, UdpNio)
        assert relayed.remote_port != direct.remote_port  # now pointing at the relay
        assert vpcs_pid(pc) not in (None, first_pid)  # relinked = restarted
        assert pc.argv[pc.argv.index("-c") + 1] == str(relayed.remote_port)
        assert pc.status is NodeStatus.STARTED
        # The console client stayed connected through the restart and was told why.
        await console.expect(r"\[emu\] VPCS restarts: adapter 0 relinked", timeout=5)
        await console.expect(r"VPCS> ", timeout=10)

        out = await vpcs_ping(console, "10.0.0.1")
        assert replies(out, "10.0.0.1") == 3, out
        await link.stop_capture(side="b")

    emu_run(body())
    pairs = icmp_pairs(capture)
    assert ("request", "10.0.0.2", "10.0.0.1") in pairs
    assert ("reply", "10.0.0.1", "10.0.0.2") in pairs


def test_stop_start_suspend_resume_reload_relink_and_crashes(
    emu_run: Any, emu_session: Session, vpcs_node: NodeFactory, vpcs_console: ConsoleFactory
) -> None:
    async def body() -> None:
        pc1 = await vpcs_node("pc1", start=False, ip="10.0.0.1/24")
        pc2 = await vpcs_node("pc2", start=False, ip="10.0.0.2/24")
        link = await emu_session.link(pc1, 0, pc2, 0)  # stopped: recorded, no restart
        await asyncio.gather(pc1.start(), pc2.start())
        console = await vpcs_console(pc1)
        assert replies(await vpcs_ping(console, "10.0.0.2"), "10.0.0.2") == 3

        await pc2.stop()
        assert pc2.status is NodeStatus.STOPPED
        assert vpcs_pid(pc2) is None
        assert replies(await vpcs_ping(console, "10.0.0.2", count=1), "10.0.0.2") == 0
        await pc2.start()
        assert replies(await vpcs_ping(console, "10.0.0.2"), "10.0.0.2") == 3

        # Ctrl-C interrupts a ping as on a real terminal (the pty is VPCS' controlling tty).
        await console.sendline("ping 10.0.0.2 -t")
        await console.expect(r"icmp_seq=2 ", timeout=10)
        await console.send("\x03")
        await console.expect(VPCS_PROMPT, timeout=5)

        await pc2.suspend()  # SIGSTOP: no answers, the process stays
        assert replies(await vpcs_ping(console, "10.0.0.2", count=1), "10.0.0.2") == 0
        await pc2.resume()
        assert replies(await vpcs_ping(console, "10.0.0.2"), "10.0.0.2") == 3

        before = vpcs_pid(pc2)
        await pc2.reload()
        assert vpcs_pid(pc2) not in (None, before)
        assert replies(await vpcs_ping(console, "10.0.0.2"), "10.0.0.2") == 3

        # Link down: VPCS restarts on its sink, keeping its NIO; up: back on it.
        await link.set_up(False)
        assert pc1.adapters[0].nio is not None
        assert pc1.argv[pc1.argv.index("-s") + 1] == "0"
        console = await vpcs_console(pc1)  # VPCS restarted: sync on its new prompt
        assert replies(await vpcs_ping(console, "10.0.0.2", count=1), "10.0.0.2") == 0
        await link.set_up(True)
        console = await vpcs_console(pc1)
        assert replies(await vpcs_ping(console, "10.0.0.2"), "10.0.0.2") == 3

        with emu_session.events.queue() as events:
            crashed = vpcs_pid(pc2)
            assert crashed is not None
            os.kill(crashed, signal.SIGKILL)  # a crash
            crash = await next_event(events, "pc2", "error")
            assert crash.message == "emulator exited unexpectedly (exit code -9)"
            assert pc2.status is NodeStatus.STOPPED

            await console.sendline("quit")
            quit_event = await next_event(events, "pc1", "info")
            assert quit_event.message == "VPCS quit (its 'quit' command)"
            assert pc1.status is NodeStatus.STOPPED

    emu_run(body())


async def next_event(events: asyncio.Queue[NodeEvent], node: str, kind: str) -> NodeEvent:
    """The next event of ``kind`` about ``node`` (bounded)."""
    while True:
        event = await asyncio.wait_for(events.get(), 10)
        if event.node == node and event.kind == kind:
            return event


def test_the_console_serves_several_clients_and_host_commands_do_nothing(
    emu_run: Any, vpcs_node: NodeFactory, vpcs_console: ConsoleFactory, tmp_path: Path
) -> None:
    touched = tmp_path / "touched"

    async def body() -> None:
        pc = await vpcs_node("pc1", ip="10.0.0.2/24", gateway="10.0.0.1")
        one, two = await vpcs_console(pc), await vpcs_console(pc)
        # Every client sees what any client's command printed.
        assert await vpcs_command(one, "echo typed-in-one") == "typed-in-one"
        await two.expect("\ntyped-in-one", timeout=5)
        await two.expect(VPCS_PROMPT, timeout=5)
        shown = await vpcs_command(two, "show ip")
        assert "GATEWAY     : 10.0.0.1" in shown
        assert re.search(r"MAC         : 00:50:79:66:68:[0-9a-f]{2}", shown), shown
        await one.expect("GATEWAY     : 10.0.0.1", timeout=5)
        await one.expect(VPCS_PROMPT, timeout=5)

        # VPCS' '!' runs host commands; the launcher's seccomp filter makes it do nothing.
        await vpcs_command(one, f"! touch {touched}")
        pid = vpcs_pid(pc)
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE), status
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        assert children == ""
        assert pc.status is NodeStatus.STARTED
        assert "IP/MASK     : 10.0.0.2/24" in await vpcs_command(one, "show ip")

    emu_run(body())
    assert not touched.exists()


def test_a_startup_script_that_never_ends_fails_the_start_and_leaves_nothing(
    emu_run: Any, emu_project: Project
) -> None:
    settings = HostSettings(emulators={"vpcs": {"start_timeout": 1}})

    async def body() -> None:
        async with Session(emu_project, settings=settings) as session:
            pc = session.add_node({"name": "pc1", "emulator": "vpcs", "startup_script": "sleep 60"})
            with pytest.raises(EmulatorExitedError, match="VPCS showed no prompt within 1 s"):
                await pc.start()
            assert pc.status is NodeStatus.STOPPED
            assert processes_mentioning(str(pc.directory)) == {}
            assert not (pc.directory / "vpcs.pid").exists()

    emu_run(body())


def test_without_confinement_vpcs_runs_host_commands(
    emu_run: Any, emu_project: Project, tmp_path: Path
) -> None:
    # The control for the test above: its file stays absent because of the filter alone.
    touched = tmp_path / "touched"
    settings = HostSettings(emulators={"vpcs": {"confine": False}})

    async def body() -> None:
        async with Session(emu_project, settings=settings) as session:
            pc = session.add_node({"name": "pc1", "emulator": "vpcs"})
            await pc.start()
            status = Path(f"/proc/{vpcs_pid(pc)}/status").read_text()
            assert re.search(r"^Seccomp:\s+0$", status, re.MULTILINE), status
            console = await open_vpcs_console(pc)
            try:
                await vpcs_command(console, f"! touch {touched}")
            finally:
                await console.close()

    emu_run(body())
    assert touched.exists()


def test_the_launcher_says_why_it_cannot_run_vpcs(tmp_path: Path) -> None:
    with pytest.raises(ConfineError, match=r"no seccomp filter for this machine \(sparc64\)"):
        install_seccomp("sparc64")
    # It needs the pty as stdin; a missing program is reported, with exit status 126.
    import pty

    master, slave = pty.openpty()
    try:
        launcher = subprocess.run(
            [*launcher_argv(confine=True), str(tmp_path / "no-vpcs")],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert launcher.returncode == 126
    assert launcher.stderr.startswith(f"emu-vpcs: cannot run {tmp_path / 'no-vpcs'}: ")


# -- the host dies -------------------------------------------------------------------------

HOST = """
import asyncio, sys
from pathlib import Path
from emu_vpcs.confine import ConfineError, install_seccomp
from emu_vpcs.process import launcher_argv, vpcs_pid
from emucore.models import Project
from emucore.session import Session
from emucore.telnet import TelnetConsole

async def main(directory):
    session = Session(Project.for_directory(Path(directory)))
    pc1 = session.add_node({"name": "pc1", "emulator": "vpcs", "ip": "10.0.0.1/24"})
    pc2 = session.add_node({"name": "pc2", "emulator": "vpcs", "ip": "10.0.0.2/24"})
    await session.link(pc1, 0, pc2, 0)
    await asyncio.gather(pc1.start(), pc2.start())
    await pc2.suspend()  # a stopped process must die too
    console = await TelnetConsole.connect(pc1.console.host, pc1.console.port)
    await console.sendline("ping 10.0.0.2 -t")  # busy when the host dies
    print("PIDS", vpcs_pid(pc1), vpcs_pid(pc2), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
def subreaper() -> None:
    """Adopt what the killed host leaves, so its dead children are reaped here."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def test_sigkill_of_the_host_leaves_no_vpcs(tmp_path: Path, subreaper: None) -> None:
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(HOST))
    project = tmp_path / "project"
    host = subprocess.Popen(
        [sys.executable, str(script), str(project)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(pid) for pid in line.split()[1:]]
        assert len(pids) == 2
        assert all(Path(f"/proc/{pid}/exe").resolve() == Path("/usr/bin/vpcs") for pid in pids)
        killed = time.monotonic()
        os.kill(host.pid, signal.SIGKILL)
        host.wait(10)
        assert wait_gone(pids, timeout=10) == []
        print(f"VPCS gone {time.monotonic() - killed:.3f} s after the host's SIGKILL")
        reap(pids)
        assert processes_mentioning(str(project)) == {}
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_a_tunnel_port_another_program_took_fails_the_start(
    emu_run: Any, vpcs_node: NodeFactory
) -> None:
    """VPCS only prints "Open port N error" and goes on deaf; emu makes it a failed start.
    (The port is taken by this test's socket, standing in for another program.)"""

    async def body() -> None:
        pc = await vpcs_node("pc1", start=False, ip="10.0.0.1/24")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            await pc.attach_nio(0, UdpNio(port, "127.0.0.1", port + 1))
            with pytest.raises(EmulatorExitedError, match="VPCS cannot open its tunnel") as info:
                await pc.start()
        assert f"Open port {port} error [Address already in use]" in str(info.value)
        assert pc.status is NodeStatus.STOPPED
        assert vpcs_pid(pc) is None

    emu_run(body())
