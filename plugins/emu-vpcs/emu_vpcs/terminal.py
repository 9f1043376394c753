"""VPCS' terminal as the host holds it: the master side of a pty, shared by every console client.

VPCS runs in the foreground with a pty as stdin, stdout and stderr (its ``-p`` daemon mode
forks, and a forked child loses the death signal that ties it to the host). The host reads
the master side all the time, so VPCS never blocks on a full terminal, and hands each chunk
to the log file (``vpcs.log``) and to every listener (the telnet console's clients): a
:class:`~emucore.consoles.ConsoleHub`. What a client types goes to the master side, hence to
VPCS, in the way VPCS can take it (both seen with Debian's VPCS 0.8):

* cut to lines of at most 127 characters: VPCS reads a line into a fixed buffer and crashes
  (SIGSEGV) on lines of about 144 characters or more; 127 never crashed it, even 200 KB;
* one line at a time, each once VPCS shows its prompt again: VPCS reads whatever is
  waiting at once and keeps only the first line of it, so a pasted script lost every line
  but the first. Ctrl-C is passed at once (it interrupts a ``ping``) and drops the lines
  typed ahead, as a terminal does.

A :class:`Terminal` lives as long as the node runs and outlives a VPCS restart (a relink):
each VPCS process gets a new pty through :meth:`Terminal.open_pty`, and listeners stay.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pty
import re
import struct
import termios
from pathlib import Path

from emucore.consoles import INPUT_LIMIT, ConsoleHub
from emucore.errors import NodeStateError
from emucore.node import Node
from emucore.stash import StashKey

log = logging.getLogger("emu.vpcs")

_READ_SIZE = 65536
_ROWS, _COLUMNS = 24, 80
# VPCS' prompt, "VPCS> " or "<pcname>> ", printed after "\r" once it reads a new line.
PROMPT = re.compile(rb"\r[^\r\n>]{1,64}> ")
_PROMPT_AT_END = re.compile(PROMPT.pattern + rb"$")
# Typed-ahead lines wait this long for a prompt before they are sent anyway.
PROMPT_WAIT = 10.0
CTRL_C = 0x03
# The longest line VPCS is given; the rest of a longer line is dropped (see above).
MAX_LINE = 127
_LINE_ENDS = b"\r\n\x03"  # Enter, and Ctrl-C, which abandons the line
_ERASE = b"\x08\x7f"


class LineCutter:
    """Drops what a client types beyond :data:`MAX_LINE` characters on one line.

    Control characters always pass (VPCS' line editing and history keys); a line end or
    Ctrl-C starts a new line, a backspace shortens it.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._length = 0

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` VPCS may read."""
        out = bytearray()
        for byte in data:
            if byte in _LINE_ENDS:
                self._length = 0
            elif byte in _ERASE:
                self._length = max(0, self._length - 1)
            elif byte >= 0x20:
                if self._length >= self.limit:
                    continue
                self._length += 1
            out.append(byte)
        return bytes(out)


class Terminal(ConsoleHub):
    """The master side of VPCS' pty, its log, and who listens to it.

    :ivar log_path: where everything VPCS prints is written.
    """

    def __init__(self, log_path: Path) -> None:
        """Open (truncate) ``log_path``; no pty yet: see :meth:`open_pty`."""
        super().__init__(log_path)
        self._master: int | None = None
        self._pending = bytearray()
        self._lines = LineCutter()
        self._ready = False  # VPCS shows its prompt: it reads the next line now
        self._recent = bytearray()  # the end of what VPCS printed, to see its prompt
        self._give_up: asyncio.TimerHandle | None = None

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
        self._set_ready(False)
        self.hung_up()

    def close(self) -> None:
        """Close the pty and the log; listeners are dropped."""
        self.close_pty()
        super().close()

    def write(self, data: bytes) -> None:
        """Type ``data`` into VPCS the way it can take it (see the module docstring); dropped
        when no pty is open or too much is queued."""
        data = self._lines.feed(data)
        if self._master is None or not data:
            return
        if len(self._pending) + len(data) > INPUT_LIMIT:
            log.warning("%s: console input dropped: VPCS does not read it", self.log_path)
            return
        self._pending += data
        self._flush()

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None

    def _prompt_late(self) -> None:
        log.warning("%s: VPCS showed no prompt in %g s; typing on", self.log_path, PROMPT_WAIT)
        self._set_ready(True)
        self._flush()

    def _flush(self) -> None:
        master = self._master
        if master is None:
            return
        interrupt = self._pending.find(CTRL_C)
        if interrupt >= 0 and not self._ready:
            del self._pending[:interrupt]  # the lines typed ahead go with the interrupt
        if not self._ready and self._pending[:1] != bytes([CTRL_C]):
            return
        end = next((i for i, byte in enumerate(self._pending) if byte in _LINE_ENDS), -1)
        chunk = bytes(self._pending if end < 0 else self._pending[: end + 1])
        try:
            written = os.write(master, chunk)
        except BlockingIOError:
            written = 0
        except OSError:
            self._pending.clear()  # VPCS is gone; the reader sees the hangup
            return
        del self._pending[:written]
        if written == len(chunk) and end >= 0:
            self._set_ready(False)  # a line went in: the next waits for the prompt
            self._give_up = self._loop.call_later(PROMPT_WAIT, self._prompt_late)
        if self._pending and written < len(chunk):
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
            self.hung_up()
            return
        self.deliver(chunk)
        self._recent = (self._recent + chunk)[-256:]
        if _PROMPT_AT_END.search(self._recent):
            self._set_ready(True)
            if self._pending:
                self._flush()


TERMINAL = StashKey[Terminal]()
"""The node's terminal while it runs: set by ``vpcs.process``, served by ``vpcs.console``."""


def terminal_of(node: Node) -> Terminal:
    """The node's terminal (while it runs).

    :raises NodeStateError: the node is not running.
    """
    terminal = node.stash.get(TERMINAL, None)
    if terminal is None:
        raise NodeStateError(node.name, "VPCS is not running")
    return terminal
