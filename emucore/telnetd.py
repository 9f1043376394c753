"""A small telnet server in front of a :class:`~emucore.consoles.ConsoleHub`, for any number of
clients at once.

Every client sees everything the emulator prints from the moment it connects, and what any
client types goes to the emulator. The server asks clients for character mode (``WILL
ECHO``, ``WILL SUPPRESS-GO-AHEAD``: the guest echoes and edits the line itself), drops the
telnet negotiation they send, turns telnet's Enter (CR LF or CR NUL) into one CR and its
Interrupt Process into Ctrl-C. A client that does not read its output is disconnected rather
than buffered forever.

A host finds a node's server under :data:`CONSOLE_SERVER` in the node's stash (a plugin that
serves a node's console with a :class:`TelnetServer` puts it there while it serves), to
:meth:`~TelnetServer.restart` it without touching the emulator (GNS3's ``console/reset``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from emucore.consoles import ConsoleHub
from emucore.stash import StashKey

log = logging.getLogger("emu")

IAC, DONT, DO, WONT, WILL, SB, SE, IP = 255, 254, 253, 252, 251, 250, 240, 244
ECHO, SUPPRESS_GO_AHEAD = 1, 3
GREETING = bytes([IAC, WILL, ECHO, IAC, WILL, SUPPRESS_GO_AHEAD])
CTRL_C = b"\x03"
# Output a client may leave unread before it is disconnected.
MAX_UNREAD = 1 << 20


class TelnetDecoder:
    """Turns what a telnet client sends into what the guest should read (state kept across
    chunks)."""

    def __init__(self) -> None:
        self._state = "data"
        self._after_cr = False

    def feed(self, data: bytes) -> bytes:
        """Decode one chunk from the client."""
        out = bytearray()
        for byte in data:
            state = self._state
            if state == "data":
                if byte == IAC:
                    self._state = "iac"
                    continue
                if self._after_cr and byte in (0, 10):  # the second half of telnet's Enter
                    self._after_cr = False
                    continue
                self._after_cr = byte == 13
                out.append(byte)
            elif state == "iac":
                self._state = "data"
                if byte == IAC:
                    out.append(IAC)
                elif byte in (WILL, WONT, DO, DONT):
                    self._state = "option"
                elif byte == SB:
                    self._state = "sb"
                elif byte == IP:
                    out += CTRL_C
            elif state == "option":
                self._state = "data"
            elif state == "sb":
                if byte == IAC:
                    self._state = "sb-iac"
            else:  # "sb-iac": IAC SE ends the subnegotiation, IAC IAC is data inside it
                self._state = "data" if byte == SE else "sb"
        return bytes(out)


def _listen(family: int, kind: int, proto: int, address: tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


class TelnetServer:
    """Serves a console over telnet on one TCP port.

    Binding and serving are two steps, so a plugin can take its port before the emulator
    starts (its command line may need the number) and serve once the console exists.

    :ivar port: the port it listens on.
    """

    def __init__(self, name: str, sock: socket.socket) -> None:
        """Use :meth:`bind`."""
        self.name = name
        self.port: int = sock.getsockname()[1]
        self._console: ConsoleHub | None = None
        self._sock = sock
        self._server: asyncio.Server | None = None
        # Each client's handler task and its transport.
        self._clients: dict[asyncio.Task[None], asyncio.WriteTransport] = {}

    @classmethod
    async def bind(cls, name: str, host: str, port: int) -> TelnetServer:
        """Take ``host:port`` (port 0: the kernel picks a free one, no race); serve later.

        :raises OSError: the address cannot be bound (e.g. the port is taken).
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        return cls(name, _listen(family, kind, proto, address))

    @classmethod
    async def start(cls, name: str, console: ConsoleHub, host: str, port: int) -> TelnetServer:
        """:meth:`bind`, then :meth:`serve` ``console``.

        :raises OSError: the address cannot be bound (e.g. the port is taken).
        """
        server = await cls.bind(name, host, port)
        await server.serve(console)
        return server

    async def serve(self, console: ConsoleHub) -> None:
        """Accept clients and join them to ``console``."""
        self._console = console
        self._server = await asyncio.start_server(self._serve, sock=self._sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        transport = writer.transport
        self._clients[task] = transport

        def send(chunk: bytes) -> None:
            if transport.is_closing():
                return
            if transport.get_write_buffer_size() > MAX_UNREAD:
                log.warning("%s: console client %s reads too slowly; disconnected", self.name, peer)
                transport.abort()
                return
            transport.write(chunk.replace(bytes([IAC]), bytes([IAC, IAC])))

        console = self._console
        assert console is not None
        unsubscribe = console.subscribe(send)
        decoder = TelnetDecoder()
        try:
            transport.write(GREETING)
            while data := await reader.read(4096):
                console.write(decoder.feed(data))
        except (ConnectionError, OSError):
            pass
        finally:
            unsubscribe()
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening and disconnect every client."""
        if self._server is not None:
            self._server.close()
        await self._disconnect_clients()
        self._sock.close()

    async def restart(self) -> None:
        """Disconnect every client, go on listening on the same socket and serving the same
        console: what a client left behind (a stuck session, a half-read negotiation) is
        gone, while the emulator and the console's log and input are untouched. The port is
        never let go meanwhile, and a server closed meanwhile (its node stopped) stays
        closed."""
        await self._disconnect_clients()

    async def _disconnect_clients(self) -> None:
        # Abort, not cancel: a cancelled handler task makes asyncio's streams log an error.
        for transport in self._clients.values():
            transport.abort()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)


CONSOLE_SERVER = StashKey[TelnetServer]()
"""Where a plugin keeps the :class:`TelnetServer` of a node's console while it serves it, so
a host can restart it (``node.stash.get(CONSOLE_SERVER, None)``); removed when it stops."""
