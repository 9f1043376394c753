"""A node's telnet console shared by any number of clients (telnet and WebSocket).

QEMU's telnet chardev serves one client at a time; GNS3 users expect to open a console in
the GUI, another in the web UI and a script's at once. So the front end is the emulator's
only client and serves its own port to everyone: what the node prints goes to every client,
what any client types goes to the node. The emulator's telnet greeting (its option
negotiation, sent once on connect) is replayed to each client that joins later. A client
that does not read its output is disconnected rather than buffered without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("emu.gns3")

IAC = 255
# Output a client may leave unread before it is disconnected.
MAX_UNREAD = 1 << 20

Sender = Callable[[bytes], bool]
"""Delivers output to one client; returns ``False`` when the client must go."""


class SharedConsole:
    """The front end's console for one running node.

    :ivar name: the node's name, for logs.
    :ivar port: the TCP port clients connect to.
    :ivar upstream: the emulator's console it is connected to (host, port).
    :ivar ended: set once the emulator's console closed or :meth:`close` was called.
    """

    def __init__(
        self,
        name: str,
        upstream: tuple[str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Use :meth:`open`."""
        self.name = name
        self.port = 0
        self.upstream = upstream
        self._reader = reader
        self._writer = writer
        self._greeting = b""
        self._greeted = False
        self._senders: dict[int, Sender] = {}
        self._next_id = 0
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._pump: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()

    @classmethod
    async def open(
        cls, name: str, upstream: tuple[str, int], listen: tuple[str, int]
    ) -> SharedConsole:
        """Connect to the emulator's console and listen for clients.

        :param name: the node's name.
        :param upstream: the emulator's telnet console (host, port).
        :param listen: where clients connect (host, port; port 0 lets the kernel pick).
        :raises OSError: the console cannot be reached, or the port cannot be bound.
        """
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*upstream), 10)
        console = cls(name, upstream, reader, writer)
        try:
            console._server = await asyncio.start_server(
                console._serve, listen[0], listen[1], reuse_address=True
            )
        except BaseException:
            writer.close()
            raise
        console.port = console._server.sockets[0].getsockname()[1]
        console._pump = asyncio.create_task(console._forward_output())
        return console

    def attach(self, send: Sender) -> Callable[[], None]:
        """Give ``send`` everything the node prints from now on (after the greeting).

        :return: the function that detaches it.
        """
        key = self._next_id
        self._next_id += 1
        if self._greeting and not send(self._greeting):
            return lambda: None
        self._senders[key] = send

        def detach() -> None:
            self._senders.pop(key, None)

        return detach

    def write(self, data: bytes) -> None:
        """Type ``data`` on the node's console."""
        if data and not self._writer.is_closing():
            self._writer.write(data)

    @property
    def client_count(self) -> int:
        """How many clients receive the output now."""
        return len(self._senders)

    async def _forward_output(self) -> None:
        try:
            while chunk := await self._reader.read(65536):
                if not self._greeted:
                    negotiation = _leading_negotiation(chunk)
                    self._greeting += negotiation
                    self._greeted = len(negotiation) < len(chunk)
                for key, send in list(self._senders.items()):
                    if not send(chunk):
                        self._senders.pop(key, None)
        except (ConnectionError, OSError):
            pass
        finally:
            self._disconnect_clients()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        peer = writer.get_extra_info("peername")
        self._clients.add(writer)

        def send(chunk: bytes) -> bool:
            if transport.is_closing():
                return False
            if transport.get_write_buffer_size() > MAX_UNREAD:
                log.warning("%s: console client %s reads too slowly; disconnected", self.name, peer)
                transport.abort()
                return False
            transport.write(chunk)
            return True

        detach = self.attach(send)
        try:
            while data := await reader.read(4096):
                self.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            detach()
            self._clients.discard(writer)
            writer.close()

    def _disconnect_clients(self) -> None:
        self.ended.set()
        self._senders.clear()
        for writer in list(self._clients):
            writer.transport.abort()

    async def close(self) -> None:
        """Stop listening, disconnect every client and the emulator's console."""
        if self._server is not None:
            self._server.close()
        self._disconnect_clients()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


def _leading_negotiation(chunk: bytes) -> bytes:
    """The telnet commands at the start of ``chunk`` (IAC, a command, an option)."""
    end = 0
    while end < len(chunk) and chunk[end] == IAC and end + 1 < len(chunk):
        end += 3 if 251 <= chunk[end + 1] <= 254 else 2
    return chunk[: min(end, len(chunk))]
