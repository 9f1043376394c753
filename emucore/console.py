"""``emu console``: join the terminal to a node's telnet console until Ctrl-] is pressed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty

from emucore.telnet import TelnetConsole

ESCAPE = b"\x1d"  # Ctrl-], as in telnet


async def attach(host: str, port: int) -> int:
    """Copy the console to stdout and stdin to the console; raw mode on a terminal."""
    console = await TelnetConsole.connect(host, port)
    saved = termios.tcgetattr(sys.stdin) if sys.stdin.isatty() else None
    if saved is not None:
        print(f"Connected to {host}:{port}. Ctrl-] leaves.\r", flush=True)
        tty.setraw(sys.stdin)
    try:
        await _pump(console)
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
        await console.close()
    return 0


async def _pump(console: TelnetConsole) -> None:
    """Until the console closes, stdin ends, or Ctrl-] is typed."""
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno()
    try:
        loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 1024)))
        reading = True
    except PermissionError:  # a regular file or /dev/null cannot be watched: show output only
        reading = False

    async def show() -> None:
        while text := await console.read():
            sys.stdout.write(text)
            sys.stdout.flush()

    async def type_keys() -> None:
        while (data := await keys.get()) and ESCAPE not in data:
            await console.send(data.decode(errors="replace"))

    tasks = [asyncio.create_task(show())]
    if reading:
        tasks.append(asyncio.create_task(type_keys()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if reading:
            loop.remove_reader(fd)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
