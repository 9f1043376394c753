"""An emulator's text console as the host holds it: read all the time, logged, shared.

The host, not the emulator, serves consoles (:mod:`emucore.telnetd`): an emulator's own
telnet server takes one client at a time (QEMU's chardev) or forks (VPCS' daemon mode). A
:class:`ConsoleHub` receives everything the emulator prints, appends it to a log file in the
node directory (so nothing is lost before a client connects), keeps a tail for error
messages, and hands each chunk to every listener (the telnet clients, a start-up waiting for
a prompt); what listeners type goes back to the emulator through :meth:`ConsoleHub.write`.

Subclasses connect a hub to an emulator: :class:`SocketConsole` to a stream socket (QEMU's
serial chardev), ``emu_vpcs.terminal.Terminal`` to a pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from emucore.files import create_file

log = logging.getLogger("emu")

Listener = Callable[[bytes], None]

_TAIL_SIZE = 16384
# What clients typed that the emulator has not read yet; beyond this, typing is dropped.
INPUT_LIMIT = 1 << 16


class ConsoleHub:
    """A console's output fanned out to listeners and a log; its input sent to the emulator.

    :ivar log_path: where everything the emulator prints is written (truncated at open).
    """

    def __init__(self, log_path: Path) -> None:
        """Open (truncate) ``log_path``, never through a planted link."""
        self.log_path = log_path
        self._log: IO[bytes] | None = create_file(log_path, "wb", buffering=0)
        self._listeners: list[Listener] = []
        self._tail = bytearray()
        self._expectations: set[asyncio.Future[bool]] = set()
        self._loop = asyncio.get_running_loop()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each chunk printed from now on; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._unsubscribe(listener)

    def _unsubscribe(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def write(self, data: bytes) -> None:
        """Type ``data`` into the console (subclasses send it to the emulator)."""
        raise NotImplementedError

    def note(self, text: str) -> None:
        """Write a line of emu's own (e.g. why the emulator restarts) to the log and listeners."""
        self.deliver(f"\r\n[emu] {text}\r\n".encode())

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines printed, without carriage returns."""
        text = self._tail.decode(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def expect(self, pattern: re.Pattern[bytes]) -> asyncio.Future[bool]:
        """Watch what is printed from now on for ``pattern``.

        :return: a future that becomes ``True`` when the pattern was printed, ``False`` when
            the emulator's side closes first (:meth:`hung_up`); cancel it to stop watching.
        """
        future: asyncio.Future[bool] = self._loop.create_future()
        seen = bytearray()

        def listener(chunk: bytes) -> None:
            seen.extend(chunk)
            if not future.done() and pattern.search(seen):
                future.set_result(True)

        unsubscribe = self.subscribe(listener)
        self._expectations.add(future)

        def forget(_: asyncio.Future[bool]) -> None:
            unsubscribe()
            self._expectations.discard(future)

        future.add_done_callback(forget)
        return future

    def hung_up(self) -> None:
        """The emulator's side closed: pending :meth:`expect` futures become ``False``."""
        for future in list(self._expectations):
            if not future.done():
                future.set_result(False)

    def deliver(self, chunk: bytes) -> None:
        """Hand a chunk the emulator printed to the log, the tail and every listener."""
        self._tail += chunk
        del self._tail[:-_TAIL_SIZE]
        if self._log is not None:
            try:
                self._log.write(chunk)
            except OSError as error:
                # A full disk must not stop the console: keep serving, stop logging.
                log.warning("%s: logging stopped: %s", self.log_path, error)
                self._log.close()
                self._log = None
        for listener in list(self._listeners):
            try:
                listener(chunk)
            except Exception:
                log.exception("%s: a console listener failed", self.log_path)

    def close(self) -> None:
        """Drop the listeners and close the log."""
        self.hung_up()
        self._listeners.clear()
        if self._log is not None:
            self._log.close()
            self._log = None


class SocketConsole(ConsoleHub):
    """A console the emulator reaches through a stream socket (QEMU: ``-chardev socket``).

    The host listens on a UNIX socket in the node directory before the emulator starts, and
    the emulator connects to it as a client while it starts: nothing it prints can come
    before the host reads.
    """

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path)
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the emulator's connection (a second connection is refused)."""
        if self._writer is not None:
            writer.close()
            return
        self._writer = writer
        self._reading = self._loop.create_task(self._read(reader))
        self.connected.set()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                self.deliver(chunk)
        self.hung_up()

    def write(self, data: bytes) -> None:
        """Send ``data`` to the emulator (dropped before it connected, or when it lags)."""
        writer = self._writer
        if writer is None or writer.is_closing() or not data:
            return
        if writer.transport.get_write_buffer_size() + len(data) > INPUT_LIMIT:
            log.warning("%s: console input dropped: the emulator does not read it", self.log_path)
            return
        writer.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until everything the emulator sent was read:
        call it once the emulator is gone, before :meth:`aclose`."""
        if self._reading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reading), timeout)

    async def aclose(self) -> None:
        """Close the connection to the emulator, then the hub."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        self.close()
