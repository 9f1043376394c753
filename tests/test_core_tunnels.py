"""Core pieces behind ``emu serve``: tunnels (a relay in front of one adapter), the counted
drop, changing a stopped node, and following a capture while it is written.

The nodes are the toy emulator's (no process); the node's and the peer's ends are real UDP
sockets on 127.0.0.1, so the relay forwards, impairs and captures real datagrams.
"""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import dpkt
import pytest

from emucore.errors import ConfigError, NodeStateError
from emucore.models import LinkFilters, Project, UdpNio
from emucore.pcap import PcapWriter, follow
from emucore.plugins import make_plugin_manager
from emucore.session import Session
from tests.toy_emulator import make_toy

FRAME = bytes(range(6)) * 2 + b"\x08\x00" + b"x" * 46  # an Ethernet frame of 60 bytes


def session(tmp_path: Path) -> Session:
    manager = make_plugin_manager(entry_points=False, plugins=[("toy", make_toy("toy"))])
    return Session(Project.for_directory(tmp_path), plugins=manager)


def udp(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def receive(sock: socket.socket, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65535), timeout)


async def receive_all(sock: socket.socket, quiet: float = 0.3) -> list[bytes]:
    """Every datagram until none came for ``quiet`` seconds."""
    got = []
    while True:
        try:
            got.append(await receive(sock, quiet))
        except TimeoutError:
            return got


def test_update_node_changes_a_stopped_node_and_refuses_a_started_one(tmp_path: Path) -> None:
    async def body() -> None:
        async with session(tmp_path) as s:
            node = s.add_node({"name": "r1", "emulator": "toy", "ram": 64})
            await s.update_node("r1", {"ram": 128, "name": "r2"})
            assert s.node("r2") is node
            assert node.properties.ram == 128
            assert "r1" not in s.nodes
            with pytest.raises(ConfigError, match=r"\$\.ram: must be an integer"):
                await s.update_node("r2", {"ram": "lots"})
            assert node.properties.ram == 128
            await node.start()
            with pytest.raises(NodeStateError, match="started"):
                await s.update_node("r2", {"ram": 256})

    asyncio.run(body())


def test_a_tunnel_relays_and_impairs_in_front_of_one_adapter(tmp_path: Path) -> None:
    async def body() -> None:
        async with session(tmp_path) as s:
            node = s.add_node({"name": "r1", "emulator": "toy", "adapters": 2})
            await node.start()
            peer = udp()
            local = s.ports.allocate()
            nio = UdpNio(local, "127.0.0.1", peer.getsockname()[1])
            tunnel = await s.tunnel(node, 1, nio)
            assert node.adapters[1].nio == nio  # direct: the node itself faces the peer
            await tunnel.set_filters(LinkFilters(delay=100, drop_every=2))
            inner = node.adapters[1].nio
            assert isinstance(inner, UdpNio)
            assert inner.local_port != local  # relinked behind the relay, which took `local`
            node_end = udp(inner.local_port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            peer.sendto(FRAME, ("127.0.0.1", local))
            assert await receive(node_end) == FRAME
            assert loop.time() - started >= 0.09  # the delay
            for _ in range(4):
                node_end.sendto(FRAME, ("127.0.0.1", inner.remote_port))
            # Each direction counts on its own: from the node, every second frame is dropped.
            assert len(await receive_all(peer)) == 2
            await s.untunnel(tunnel)
            assert node.adapters[1].nio is None
            assert local not in s.ports.held
            node_end.close()
            peer.close()

    asyncio.run(body())


def test_a_tunnel_captures_in_a_relay_when_the_emulator_cannot(tmp_path: Path) -> None:
    async def body() -> None:
        async with session(tmp_path) as s:
            node = s.add_node({"name": "r1", "emulator": "toy", "adapters": 2})
            await node.start()
            peer = udp()
            nio = UdpNio(s.ports.allocate(), "127.0.0.1", peer.getsockname()[1])
            tunnel = await s.tunnel(node, 1, nio)  # the toy captures adapter 0 only
            capture = tmp_path / "captures" / "r1-1.pcap"
            capture.parent.mkdir()
            await tunnel.start_capture(capture)
            assert tunnel.capturing
            assert tunnel.relay is not None
            inner = node.adapters[1].nio
            assert isinstance(inner, UdpNio)
            node_end = udp(inner.local_port)
            node_end.sendto(FRAME, ("127.0.0.1", inner.remote_port))
            assert await receive(peer) == FRAME
            peer.sendto(FRAME[::-1], ("127.0.0.1", nio.local_port))
            assert await receive(node_end) == FRAME[::-1]
            await tunnel.stop_capture()
            assert not tunnel.capturing
            frames = [bytes(f) for _, f in dpkt.pcap.Reader(io.BytesIO(capture.read_bytes()))]
            assert frames == [FRAME, FRAME[::-1]]
            node_end.close()
            peer.close()

    asyncio.run(body())


def test_follow_reads_a_capture_while_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "live.pcap"

    async def body() -> bytes:
        writer = PcapWriter(path)
        running = True
        received = b""
        first_frame_read = asyncio.Event()

        async def read() -> None:
            nonlocal received
            async for chunk in follow(path, lambda: running, poll_interval=0.01):
                received += chunk
                if len(received) >= 24 + 16 + len(FRAME):  # the header and one record
                    first_frame_read.set()

        reader = asyncio.create_task(read())
        writer.write(FRAME, 1.0)
        # The reader sees the first frame while the capture still runs.
        await asyncio.wait_for(first_frame_read.wait(), 5)
        writer.write(FRAME[::-1], 2.0)
        writer.close()
        running = False
        await asyncio.wait_for(reader, 5)
        return received

    data = asyncio.run(body())
    frames = [bytes(f) for _, f in dpkt.pcap.Reader(io.BytesIO(data))]
    assert frames == [FRAME, FRAME[::-1]]
