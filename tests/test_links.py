"""Links between real guests: UDP and TAP, live relinking, link state, pcap, impairments."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emucore.errors import NodeStateError
from emucore.models import LinkFilters, TapNio
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.helpers import icmp_pairs

NodeFactory = Callable[..., Awaitable[Node]]
ConsoleFactory = Callable[[Node], Awaitable[TelnetConsole]]

pytestmark = pytest.mark.qemu


async def ping(
    console: TelnetConsole, address: str, count: int = 3, extra: str = ""
) -> tuple[int, str]:
    return await console.run(f"ping -c {count} -W 2 {extra} {address}", timeout=30 + count)


async def carrier(console: TelnetConsole, interface: str) -> str:
    # The carrier of a down interface cannot be read: bring it up (no address needed).
    status, out = await console.run(
        f"ip link set {interface} up; cat /sys/class/net/{interface}/carrier"
    )
    assert status == 0, out
    return out.strip()


async def boot(
    factory: NodeFactory, consoles: ConsoleFactory, *specs: tuple[str, str, int]
) -> list[tuple[Node, TelnetConsole]]:
    """Start several guests at once (name, ip, adapters) and open their consoles."""
    nodes = await asyncio.gather(
        *(factory(name, ip=ip, adapters=adapters) for name, ip, adapters in specs)
    )
    opened = await asyncio.gather(*(consoles(node) for node in nodes))
    return list(zip(nodes, opened, strict=True))


def test_two_guests_ping_over_a_udp_link_and_the_capture_holds_the_icmp_pair(
    emu_run: Any,
    qemu_node: NodeFactory,
    guest_console: ConsoleFactory,
    emu_session: Session,
    tmp_path: Path,
) -> None:
    capture = tmp_path / "a.pcap"

    async def body() -> None:
        (a, con_a), (b, con_b) = await boot(
            qemu_node, guest_console, ("a", "10.0.0.1/24", 1), ("b", "10.0.0.2/24", 1)
        )
        await emu_session.link(a, 0, b, 0)
        await a.start_capture(0, capture)
        with pytest.raises(NodeStateError, match="already captured"):
            await a.start_capture(0, tmp_path / "again.pcap")
        status, out = await ping(con_a, "10.0.0.2")
        assert status == 0, out
        status, out = await ping(con_b, "10.0.0.1")
        assert status == 0, out
        await a.stop_capture(0)

    emu_run(body())
    pairs = icmp_pairs(capture)
    assert ("request", "10.0.0.1", "10.0.0.2") in pairs
    assert ("reply", "10.0.0.2", "10.0.0.1") in pairs
    assert ("request", "10.0.0.2", "10.0.0.1") in pairs


def test_live_relink_link_state_and_a_capture_that_survives_it(
    emu_run: Any,
    qemu_node: NodeFactory,
    guest_console: ConsoleFactory,
    emu_session: Session,
    tmp_path: Path,
) -> None:
    capture = tmp_path / "relink.pcap"

    async def body() -> None:
        (a, con_a), (b, _), (c, _) = await boot(
            qemu_node,
            guest_console,
            ("a", "10.0.0.1/24", 2),
            ("b", "10.0.0.2/24", 1),
            ("c", "10.0.0.3/24", 1),
        )
        assert await carrier(con_a, "eth1") == "0"  # an adapter without NIO: link down
        assert await carrier(con_a, "eth0") == "0"
        link = await emu_session.link(a, 0, b, 0)
        assert await carrier(con_a, "eth0") == "1"
        await a.start_capture(0, capture)
        assert (await ping(con_a, "10.0.0.2"))[0] == 0
        ports = {
            nio.local_port for nio in (a.adapters[0].nio, b.adapters[0].nio) if nio is not None
        }

        await emu_session.unlink(link)  # the guest keeps its NIC; its cable is pulled
        assert (await ping(con_a, "10.0.0.2", count=2))[0] != 0
        assert await carrier(con_a, "eth0") == "0"
        assert not ports & emu_session.ports.held  # ports given back

        link = await emu_session.link(a, 0, c, 0)  # a different peer, same NIC
        status, out = await ping(con_a, "10.0.0.3")
        assert status == 0, out

        await link.set_up(False)
        assert await carrier(con_a, "eth0") == "0"
        assert (await ping(con_a, "10.0.0.3", count=2))[0] != 0
        await link.set_up(True)
        assert await carrier(con_a, "eth0") == "1"
        assert (await ping(con_a, "10.0.0.3"))[0] == 0
        await a.stop_capture(0)

    emu_run(body())
    pairs = icmp_pairs(capture)
    assert {("request", "10.0.0.1", "10.0.0.2"), ("reply", "10.0.0.2", "10.0.0.1")} <= pairs
    assert {("request", "10.0.0.1", "10.0.0.3"), ("reply", "10.0.0.3", "10.0.0.1")} <= pairs


@pytest.fixture
def tap_device() -> Iterator[str]:
    """A host TAP device with 10.99.0.1/24 (root creates it with iproute2)."""
    name = "emutest0"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.99.0.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_a_guest_pings_the_host_through_a_tap_device(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, tap_device: str
) -> None:
    async def body() -> None:
        node = await qemu_node(
            "tapped", ip="10.99.0.2/24", nios={"0": {"type": "nio_tap", "tap_device": tap_device}}
        )
        console = await guest_console(node)
        status, out = await ping(console, "10.99.0.1")
        assert status == 0, out
        assert node.adapters[0].nio == TapNio(tap_device)

    emu_run(body())


def loss_percent(output: str) -> float:
    match = re.search(r"(\d+)% packet loss", output)
    assert match, output
    return float(match.group(1))


def average_rtt(output: str) -> float:
    match = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", output)
    assert match, output
    return float(match.group(1))


def test_impairments_loss_delay_and_back_to_zero(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_session: Session
) -> None:
    async def body() -> None:
        (a, con_a), (b, _) = await boot(
            qemu_node, guest_console, ("a", "10.0.0.1/24", 1), ("b", "10.0.0.2/24", 1)
        )
        link = await emu_session.link(a, 0, b, 0, LinkFilters(delay=1))
        assert link.relay is not None
        # Resolve ARP first: a lost ARP request would hold back every ping for a second.
        assert (await ping(con_a, "10.0.0.2", count=1))[0] == 0
        await link.set_filters(LinkFilters(loss=30, direction="a_to_b"))
        _, out = await ping(con_a, "10.0.0.2", count=300, extra="-i 0.02 -q")
        # 300 pings, p = 0.3: σ ≈ 2.6 points; ±10 points is almost 4σ.
        assert 20 <= loss_percent(out) <= 40, out

        await link.set_filters(LinkFilters(delay=100))  # both directions: RTT grows by 200 ms
        _, out = await ping(con_a, "10.0.0.2", count=5, extra="-i 0.2")
        assert loss_percent(out) == 0
        assert 200 <= average_rtt(out) < 400, out

        await link.set_filters(LinkFilters())  # 0 removes the impairments (gns3-server#2536)
        _, out = await ping(con_a, "10.0.0.2", count=5, extra="-i 0.2")
        assert loss_percent(out) == 0
        assert average_rtt(out) < 100, out

    emu_run(body())


def test_impairments_can_be_added_to_a_direct_link_live(
    emu_run: Any, qemu_node: NodeFactory, guest_console: ConsoleFactory, emu_session: Session
) -> None:
    async def body() -> None:
        (a, con_a), (b, _) = await boot(
            qemu_node, guest_console, ("a", "10.0.0.1/24", 1), ("b", "10.0.0.2/24", 1)
        )
        link = await emu_session.link(a, 0, b, 0)
        assert link.relay is None  # direct links stay direct
        assert (await ping(con_a, "10.0.0.2"))[0] == 0
        await link.set_filters(LinkFilters(delay=60, direction="a_to_b"))
        assert link.relay is not None
        _, out = await ping(con_a, "10.0.0.2", count=5, extra="-i 0.2")
        assert loss_percent(out) == 0
        assert 60 <= average_rtt(out) < 250, out

    emu_run(body())
