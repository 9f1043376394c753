"""Real QEMU nodes booting the tiny guest: console, suspend, reload, stops, crashes, priority.

Every test here starts the real qemu-system-x86_64 under TCG and boots a real Linux guest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from emu_qemu.contract import monitor_of, qemu_pid
from emu_qemu.process import COMMAND_LINE, PROCESS
from emu_qemu.throttle import throttling_of
from emu_tests.guest import PROMPT, READY_MARKER, TinyGuest
from emucore.errors import EmulatorExitedError
from emucore.models import NodeEvent, NodeStatus
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import ConsoleError, TelnetConsole

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]

pytestmark = pytest.mark.qemu


async def uptime(console: TelnetConsole) -> float:
    status, out = await console.run("cut -d' ' -f1 /proc/uptime")
    assert status == 0, out
    return float(out.split()[-1])


def test_boot_run_suspend_resume_reload(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, tiny_guest: TinyGuest
) -> None:
    async def body() -> None:
        node = await qemu_node("g1", ip="10.0.0.1/24")
        assert node.status is NodeStatus.STARTED
        assert node.console is not None
        assert node.console.port > 0
        console = await guest_console(node)
        status, out = await console.run("uname -r; ip -o addr show eth0")
        assert status == 0
        assert tiny_guest.version in out
        assert "10.0.0.1/24" in out
        status, out = await console.run("false")
        assert status == 1

        # Suspended, the guest runs nothing: the command waits until resume.
        await node.suspend()
        assert (await monitor_of(node).execute("query-status"))["running"] is False
        await console.sendline("echo was-$((6*7))")
        with pytest.raises(ConsoleError):
            await console.expect("was-42", timeout=2.0)
        await node.resume()
        await console.expect("was-42", timeout=20)
        assert node.status is NodeStatus.STARTED
        # The guest's clock stood still too: of the host's time around a 3 s suspension, the
        # guest's uptime misses (almost) those 3 s, however slow the commands around it are.
        began = time.monotonic()
        start_up = await uptime(console)
        await node.suspend()
        await asyncio.sleep(3.0)  # time passes on the host only
        await node.resume()
        guest_elapsed = await uptime(console) - start_up
        assert time.monotonic() - began - guest_elapsed > 2.5

        # Reload resets the guest: it boots again from the start, with a fresh RAM file system.
        assert (await console.run("touch /tmp/before-reload"))[0] == 0
        await node.reload()
        await console.expect(READY_MARKER, timeout=60)
        await console.sendline()
        await console.expect(PROMPT, timeout=10)
        assert (await console.run("test -e /tmp/before-reload"))[0] == 1

    emu_run(body())


def test_acpi_shutdown_that_the_guest_honours(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_session: Session
) -> None:
    async def body() -> None:
        node = await qemu_node("acpi", on_close="shutdown_signal")
        await guest_console(node)  # booted, power button watcher running
        running = node.stash[PROCESS]
        with emu_session.events.queue() as events:
            began = time.monotonic()
            await node.stop()
            took = time.monotonic() - began
        warnings = [e for e in drain(events) if e.kind == "warning"]
        assert warnings == []  # no fallback to SIGTERM was needed
        assert running.supervised is not None
        assert running.supervised.process.returncode == 0
        assert took < 10  # well before powerdown_timeout ran out
        log = (node.directory / "console.log").read_text(errors="replace")
        assert "power button pressed, powering off" in log

    emu_run(body())


def test_acpi_shutdown_that_times_out_falls_back_to_sigterm(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_session: Session
) -> None:
    async def body() -> None:
        node = await qemu_node("deaf", on_close="shutdown_signal")
        console = await guest_console(node)
        status, _ = await console.run("killall dd")  # the guest stops watching its button
        assert status == 0
        node.emulator_settings = type(node.emulator_settings)(powerdown_timeout=2.0)
        with emu_session.events.queue() as events:
            await node.stop()
        messages = [e.message for e in drain(events) if e.kind == "warning"]
        assert messages == ["the guest did not power off within 2 s; terminating QEMU"]
        assert node.status is NodeStatus.STOPPED

    emu_run(body())


def drain(queue: asyncio.Queue[NodeEvent]) -> list[NodeEvent]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


def test_qemu_killed_from_outside_is_noticed_at_once(
    emu_run: Any, qemu_node: NodeFactory, emu_session: Session
) -> None:
    async def body() -> None:
        node = await qemu_node("victim")
        pid = qemu_pid(node)
        assert pid is not None
        with emu_session.events.queue() as events:
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while (event := await asyncio.wait_for(events.get(), 5)).kind != "error":
                pass
            noticed = time.monotonic() - killed_at
        assert noticed < 1.0
        assert event.message == "emulator exited unexpectedly (exit code -9)"
        assert node.status is NodeStatus.STOPPED
        assert not (node.directory / "qmp.sock").exists()
        await node.start()  # restartable
        assert node.status is NodeStatus.STARTED

    emu_run(body())


def test_a_guest_power_off_is_reported_as_info(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_session: Session
) -> None:
    async def body() -> None:
        node = await qemu_node("quitter")
        console = await guest_console(node)
        with emu_session.events.queue() as events:
            await console.sendline("poweroff")
            while (event := await asyncio.wait_for(events.get(), 30)).kind == "status":
                pass
        assert (event.kind, event.message) == ("info", "the guest powered off")
        assert node.status is NodeStatus.STOPPED

    emu_run(body())


def test_a_qemu_that_cannot_start_reports_its_exit_code_and_log(
    emu_run: Any, qemu_node: NodeFactory
) -> None:
    async def body() -> None:
        with pytest.raises(EmulatorExitedError) as caught:
            await qemu_node("broken", options="-device no-such-device")
        assert caught.value.returncode == 1
        assert "no-such-device" in caught.value.log_tail
        assert "node 'broken': QEMU did not start" in str(caught.value)

    emu_run(body())


def test_priority_throttling_and_private_sockets(emu_run: Any, qemu_node: NodeFactory) -> None:
    async def body() -> None:
        node = await qemu_node("slow", process_priority="very low", cpu_throttling=50)
        pid = qemu_pid(node)
        assert pid is not None
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        throttling = throttling_of(node)  # how it holds: tests/test_qemu_throttle.py
        assert throttling is not None
        assert throttling.percent == 50
        assert throttling.mechanism in ("cgroup v2", "cgroup v1", "cpulimit")
        socket_mode = (node.directory / "qmp.sock").stat().st_mode
        assert stat.S_ISSOCK(socket_mode)
        assert stat.S_IMODE(socket_mode) == 0o600
        assert node.console is not None
        assert node.console.host == "127.0.0.1"
        log = (node.directory / "qemu.log").read_text()
        first = log.splitlines()[0]  # the log starts with the command line
        assert first.startswith(COMMAND_LINE + node.argv[0])
        await node.stop()
        assert throttling.ended  # lifted with the node

    emu_run(body())


def test_console_port_given_or_chosen(emu_run: Any, qemu_node: NodeFactory) -> None:
    async def body() -> None:
        chosen = await qemu_node("auto")
        assert chosen.console is not None
        assert chosen.console.port > 0
        free = free_tcp_port()
        given = await qemu_node("fixed", console=free)
        assert given.console is not None
        assert given.console.port == free
        # The host serves the port; QEMU's serial port is a client of the host's socket.
        assert "socket,id=console0,path=console.sock" in given.argv
        _, writer = await asyncio.open_connection("127.0.0.1", free)
        writer.close()

    emu_run(body())


def free_tcp_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
