"""A small telnet console client for scripts and tests: ``expect``, ``send``, ``run``.

Emulators expose text consoles over telnet (QEMU's serial chardev, VPCS). This client drops
telnet negotiation (IAC sequences) from what it reads, answers nothing (servers here do not
require it), and keeps everything it read so ``expect`` can look back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from types import TracebackType

from emucore.errors import EmuError

IAC, SB, SE = 255, 250, 240
_NEGOTIATION = frozenset((251, 252, 253, 254))  # WILL, WONT, DO, DONT


class ConsoleError(EmuError):
    """The console closed, or what was expected did not come in time."""


class TelnetConsole:
    """A connection to a telnet console.

    :ivar transcript: everything read so far (telnet negotiation removed).
    :ivar prompt: a regular expression for the shell's prompt; when set, :meth:`run` also
        consumes the prompt that follows each command, so outputs never carry prompts.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.name = name
        self.transcript = ""
        self._seen = 0  # transcript position up to which expect() has consumed
        self._pending = b""
        self.prompt: str | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, *, name: str = "", timeout: float = 10.0
    ) -> TelnetConsole:
        """Connect to ``host:port``.

        :raises ConsoleError: the connection failed within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see expect()
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise ConsoleError(
                f"{name or host}: cannot connect to console {host}:{port}: {exc}"
            ) from None
        return cls(reader, writer, name or f"{host}:{port}")

    async def send(self, text: str) -> None:
        """Type ``text`` (add ``\\r`` yourself to press Enter; :meth:`sendline` does)."""
        self._writer.write(text.encode().replace(bytes([IAC]), bytes([IAC, IAC])))
        await self._writer.drain()

    async def sendline(self, line: str = "") -> None:
        """Type ``line`` and press Enter."""
        await self.send(line + "\r")

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` appears in output not yet consumed; consume up to its end.

        :raises ConsoleError: not seen within ``timeout`` seconds (the message shows the
            last output), or the console closed.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            match = regex.search(self.transcript, self._seen)
            if match:
                self._seen = match.end()
                return match
            left = deadline - loop.time()
            if left <= 0:
                tail = self.transcript[-300:]
                raise ConsoleError(
                    f"{self.name}: {regex.pattern!r} not seen within {timeout:g} s;"
                    f" last output: {tail!r}"
                )
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
                # (Ctrl-C) that arrives as the read completes, and the wait goes on.
                async with asyncio.timeout(left):
                    chunk = await self._reader.read(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise ConsoleError(
                    f"{self.name}: console closed while waiting for {regex.pattern!r}"
                )
            self._feed(chunk)

    async def read(self) -> str:
        """Wait for more output and return it ('' when the console closed); it is also
        appended to the transcript."""
        before = len(self.transcript)
        while len(self.transcript) == before:
            chunk = await self._reader.read(4096)
            if not chunk:
                break
            self._feed(chunk)  # may add nothing: a chunk of telnet negotiation only
        return self.transcript[before:]

    async def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a command on a console showing a POSIX shell prompt.

        Turn the terminal's echo off first (``stty -echo``) for clean output; an echoed
        command line is removed when it can be recognised.

        :return: the exit status and the output.
        """
        marker = f"EMU{secrets.token_hex(4)}"
        start = self._seen
        await self.sendline(f"{command}; echo {marker}=$?=")
        match = await self.expect(re.compile(rf"{marker}=(\d+)="), timeout)
        output = self.transcript[start : match.start()].replace("\r", "")
        echoed = output.find(f"echo {marker}")
        if echoed >= 0:
            output = output[echoed:].partition("\n")[2]
        if self.prompt is not None:
            await self.expect(self.prompt, timeout)
        return int(match.group(1)), output.strip()

    def _feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        self._pending = b""
        out = bytearray()
        i = 0
        while i < len(data):
            byte = data[i]
            if byte != IAC:
                out.append(byte)
                i += 1
                continue
            if i + 1 >= len(data):
                self._pending = data[i:]
                break
            command = data[i + 1]
            if command == IAC:
                out.append(IAC)
                i += 2
            elif command in _NEGOTIATION:
                if i + 2 >= len(data):
                    self._pending = data[i:]
                    break
                i += 3
            elif command == SB:
                end = data.find(bytes([IAC, SE]), i)
                if end < 0:
                    self._pending = data[i:]
                    break
                i = end + 2
            else:
                i += 2
        self.transcript += out.decode(errors="replace")

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> TelnetConsole:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
