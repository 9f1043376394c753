"""A QMP connection to one QEMU, with a timeout on every command (``qemu.qmp`` has none).

QEMU listens on ``qmp.sock`` in the node directory (it runs with that directory as its
working directory, so the path in argv is short whatever the project path). A UNIX socket
path is limited to 107 bytes, so when the absolute path is longer the client connects
through ``/proc/self/fd/<dirfd>/qmp.sock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from emucore.errors import EmuError

log = logging.getLogger("emu.qemu.qmp")

SOCKET_NAME = "qmp.sock"
_SUN_PATH_MAX = 107


class _ToDebug(logging.Handler):
    """Hands qemu.qmp's records to ``emu.qemu.qmp`` at debug level."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("qemu.qmp: %s", record.getMessage())


def quiet_library_log() -> None:
    """qemu.qmp logs a refused connection as an error, though the first attempts are
    refused by design (QEMU creates its socket a moment before it listens): its records go
    to ``emu.qemu.qmp`` at debug level, shown by ``emu -v`` only."""
    library = logging.getLogger("qemu.qmp")
    if not any(isinstance(handler, _ToDebug) for handler in library.handlers):
        library.addHandler(_ToDebug())
        library.propagate = False


class QmpError(EmuError):
    """A QMP command failed, timed out, or the connection is gone."""


class Monitor:
    """One QMP connection; every command bounded by ``timeout`` seconds.

    :ivar client: the ``qemu.qmp`` client (for event listeners).
    """

    def __init__(self, client: QMPClient, timeout: float, dir_fd: int | None) -> None:
        self.client = client
        self.timeout = timeout
        self._dir_fd = dir_fd

    @classmethod
    async def connect(
        cls, socket_path: Path, *, timeout: float, command_timeout: float, alive: Callable[[], bool]
    ) -> Monitor:
        """Connect as soon as QEMU opened its socket.

        :param socket_path: the socket QEMU listens on.
        :param timeout: give up after this many seconds.
        :param command_timeout: the bound for each later command.
        :param alive: tells whether QEMU still runs (stop waiting when it died).
        :raises QmpError: timeout, or QEMU gone.
        """
        quiet_library_log()
        address, dir_fd = _address(socket_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client = QMPClient(socket_path.parent.name)
        try:
            while True:
                # QEMU creates the socket a few ms after it starts; there is no event for it.
                # Connecting only once it exists keeps qemu.qmp from logging failed attempts.
                if socket_path.exists():
                    try:
                        left = max(0.1, deadline - loop.time())
                        await asyncio.wait_for(client.connect(address), left)
                        return cls(client, command_timeout, dir_fd)
                    except (ConnectError, OSError, TimeoutError) as exc:
                        error: Exception | None = exc
                else:
                    error = None
                if not alive():
                    message = "QEMU exited before its QMP socket accepted a connection"
                    raise QmpError(message) from error
                if loop.time() >= deadline:
                    message = f"QMP socket {socket_path} not ready after {timeout:g} s"
                    raise QmpError(message) from error
                await asyncio.sleep(0.002)
        except BaseException:
            _close_fd(dir_fd)
            await _quiet_disconnect(client)
            raise

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command and return its result.

        :raises QmpError: QEMU refused it (with its message), timed out, or is gone.
        """
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), self.timeout)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc}") from exc
        except TimeoutError:
            raise QmpError(f"QMP {command} got no answer within {self.timeout:g} s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {command}: connection lost ({exc or type(exc).__name__})") from exc

    def listener(self, *names: str) -> EventListener:
        """A registered listener for the QMP events ``names``."""
        listener = EventListener(names or None)
        self.client.register_listener(listener)
        return listener

    async def close(self) -> None:
        """Disconnect, swallowing what a dead QEMU makes the client raise."""
        await _quiet_disconnect(self.client)
        _close_fd(self._dir_fd)
        self._dir_fd = None


async def _quiet_disconnect(client: QMPClient) -> None:
    # After QEMU quit or was killed, disconnect() re-raises the reader task's EOFError.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 5)


def _address(socket_path: Path) -> tuple[str, int | None]:
    if len(str(socket_path)) <= _SUN_PATH_MAX:
        return str(socket_path), None
    dir_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dir_fd}/{socket_path.name}", dir_fd


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
