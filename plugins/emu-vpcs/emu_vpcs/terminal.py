"""VPCS' terminal as the host holds it: the master side of a pty, shared by every console client.

VPCS runs in the foreground with a pty as stdin, stdout and stderr (its ``-p`` daemon mode
forks, and a forked child loses the death signal that ties it to the host). The host reads
the master side all the time, so VPCS never blocks on a full terminal, and hands each chunk
to the log file (``vpcs.log``) and to every listener (the telnet console's clients); what a
client types goes to the master side, hence to VPCS.

A :class:`Terminal` lives as long as the node runs and outlives a VPCS restart (a relink):
each VPCS process gets a new pty through :meth:`Terminal.open_pty`, and listeners stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pty
import re
import struct
import termios
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("emu.vpcs")

Listener = Callable[[bytes], None]

_READ_SIZE = 65536
# What a client types but the pty does not take yet; beyond this the typing is dropped.
_INPUT_LIMIT = 65536
_TAIL_SIZE = 16384
_ROWS, _COLUMNS = 24, 80


class Terminal:
    """The master side of VPCS' pty, its log, and who listens to it.

    :ivar log_path: where everything VPCS prints is appended.
    """

    def __init__(self, log_path: Path) -> None:
        """Open (truncate) ``log_path``; no pty yet: see :meth:`open_pty`."""
        self.log_path = log_path
        self._log: BinaryIO | None = log_path.open("wb", buffering=0)
        self._listeners: list[Listener] = []
        self._master: int | None = None
        self._pending = bytearray()
        self._tail = bytearray()
        self._expectations: set[asyncio.Future[bool]] = set()
        self._loop = asyncio.get_running_loop()

    def open_pty(self) -> int:
        """Open a new pty (closing the previous one) and start reading its master side.

        :return: the slave side, for the child's stdin, stdout and stderr; the caller closes
            it once the child has it.
        """
        self.close_pty()
        master, slave = pty.openpty()
        # VPCS formats its tables for a terminal; give it the classic 80x24.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", _ROWS, _COLUMNS, 0, 0))
        os.set_blocking(master, False)
        self._master = master
        self._loop.add_reader(master, self._on_readable)
        return slave

    def close_pty(self) -> None:
        """Stop reading and close the master side (VPCS, if still there, gets SIGHUP)."""
        master, self._master = self._master, None
        if master is not None:
            self._loop.remove_reader(master)
            self._loop.remove_writer(master)
            os.close(master)
        self._pending.clear()
        self._hung_up()

    def close(self) -> None:
        """Close the pty and the log; listeners are dropped."""
        self.close_pty()
        self._listeners.clear()
        if self._log is not None:
            self._log.close()
            self._log = None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each chunk VPCS prints from now on; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._unsubscribe(listener)

    def _unsubscribe(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def note(self, text: str) -> None:
        """Write a line of emu's own (e.g. why VPCS restarts) to the log and the listeners."""
        self._deliver(f"\r\n[emu] {text}\r\n".encode())

    def write(self, data: bytes) -> None:
        """Type ``data`` into VPCS; dropped when no pty is open or too much is queued."""
        if self._master is None or not data:
            return
        if len(self._pending) + len(data) > _INPUT_LIMIT:
            log.warning("%s: console input dropped: VPCS does not read it", self.log_path)
            return
        self._pending += data
        self._flush()

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines VPCS printed, without carriage returns."""
        text = self._tail.decode(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def expect(self, pattern: re.Pattern[bytes]) -> asyncio.Future[bool]:
        """Watch what VPCS prints from now on for ``pattern``.

        :return: a future that becomes ``True`` when the pattern was printed, ``False`` when
            the pty hangs up (VPCS exited) first; cancel it to stop watching.
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

    def _hung_up(self) -> None:
        for future in list(self._expectations):
            if not future.done():
                future.set_result(False)

    def _flush(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            written = os.write(master, self._pending)
        except BlockingIOError:
            written = 0
        except OSError:
            self._pending.clear()  # VPCS is gone; the reader sees the hangup
            return
        del self._pending[:written]
        if self._pending:
            self._loop.add_writer(master, self._flush)
        else:
            self._loop.remove_writer(master)

    def _on_readable(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            chunk = os.read(master, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave side closed, VPCS exited
            chunk = b""
        if not chunk:
            self._loop.remove_reader(master)
            self._hung_up()
            return
        self._deliver(chunk)

    def _deliver(self, chunk: bytes) -> None:
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
