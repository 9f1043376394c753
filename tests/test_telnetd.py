"""The host's telnet server for a console: many clients at once, and a restart that keeps the
port and the console (what GNS3's ``console/reset`` calls).

The server and its clients are real (TCP on 127.0.0.1); the console behind it is a
:class:`~emucore.consoles.ConsoleHub` whose emulator is this test: it prints with
``deliver`` and records what clients type, so no emulator needs to boot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from emucore.consoles import ConsoleHub
from emucore.telnetd import GREETING, TelnetServer
from tests.conftest import run


class RecordingHub(ConsoleHub):
    """A console whose emulator side is the test: what clients type is kept in ``typed``."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path)
        self.typed = bytearray()
        self.arrived = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.typed += data
        self.arrived.set()


async def _client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.readexactly(len(GREETING)) == GREETING
    return reader, writer


async def _typed(hub: RecordingHub, text: bytes) -> None:
    while text not in hub.typed:
        hub.arrived.clear()
        await asyncio.wait_for(hub.arrived.wait(), 10)


def test_clients_share_a_console_and_a_restart_keeps_port_and_console(tmp_path: Path) -> None:
    async def scenario() -> None:
        hub = RecordingHub(tmp_path / "console.log")
        server = await TelnetServer.start("n1", hub, "127.0.0.1", 0)
        try:
            port = server.port
            first, second = await _client(port), await _client(port)
            hub.deliver(b"login: ")
            for reader, _ in (first, second):
                assert await reader.readexactly(7) == b"login: "
            first[1].write(b"one\r\n")
            second[1].write(b"two\r\n")
            await _typed(hub, b"one\r")
            await _typed(hub, b"two\r")

            await server.restart()
            assert server.port == port
            for reader, _ in (first, second):  # disconnected: the end of their streams
                assert await asyncio.wait_for(reader.read(), 10) == b""
            third = await _client(port)
            hub.deliver(b"still here")
            assert await third[0].readexactly(10) == b"still here"
            third[1].write(b"three\r\n")
            await _typed(hub, b"three\r")
            assert b"still here" in (tmp_path / "console.log").read_bytes()
            for _, writer in (first, second, third):
                writer.close()
        finally:
            await server.close()
            hub.close()

    run(scenario())
