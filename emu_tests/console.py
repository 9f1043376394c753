"""Reach the tiny guest's shell on a node's telnet console."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from emu_tests.guest import PROMPT, READY_MARKER
from emucore.errors import NodeError
from emucore.node import Node
from emucore.telnet import ConsoleError, TelnetConsole


@contextlib.contextmanager
def console_factory(
    run: Callable[[Coroutine[Any, Any, Any]], Any],
    opener: Callable[[Node], Awaitable[TelnetConsole]],
) -> Iterator[Callable[[Node], Awaitable[TelnetConsole]]]:
    """A factory opening consoles with ``opener``; each is closed (through ``run``, the test's
    event loop) when the ``with`` block ends. The console fixtures are made of it."""
    opened: list[TelnetConsole] = []

    async def connect(node: Node) -> TelnetConsole:
        console = await opener(node)
        opened.append(console)
        return console

    try:
        yield connect
    finally:
        for console in opened:
            run(console.close())


async def open_guest_console(node: Node, timeout: float = 90.0) -> TelnetConsole:
    """Connect to ``node``'s console and wait until the guest's shell prompt shows.

    The guest may still be booting, or may have booted long ago (its prompt then went out
    before we connected), so Enter is pressed every second until a prompt answers.
    """
    if node.console is None or node.console.type != "telnet":
        raise NodeError(node.name, "has no telnet console (is it running?)")
    console = await TelnetConsole.connect(node.console.host, node.console.port, name=node.name)
    try:
        await wait_for_prompt(console, timeout)
    except BaseException:
        await console.close()
        raise
    return console


async def wait_for_prompt(console: TelnetConsole, timeout: float = 90.0) -> None:
    """Wait for the boot marker or a shell prompt, pressing Enter meanwhile: at once (a
    guest resumed from a saved state printed its prompt long ago), after 0.2 s, then once a
    second (a booting guest would only pile the Enters up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wait = 0.2
    await console.sendline()
    while True:
        try:
            await console.expect(f"{READY_MARKER}|{PROMPT}", timeout=wait)
            break
        except ConsoleError:
            if loop.time() >= deadline:
                raise
            await console.sendline()
            wait = 1.0
    # No echo: output comes back clean, and busybox ash stops querying the cursor position
    # and wrapping long command lines. The marker skips the prompts our Enters produced.
    marker = f"EMU{secrets.token_hex(4)}"
    await console.sendline(f"stty -echo; echo {marker}-synced")
    # The marker as printed, not as echoed in the typed command (with echo on, typed during
    # boot, the line shows before the shell runs it). With echo left off by an earlier
    # session, the output follows the prompt on the same line: no anchor to a line start.
    synced = re.compile(rf"(?<!echo ){marker}-synced")
    await console.expect(synced, timeout=max(1.0, deadline - loop.time()))
    await console.expect(PROMPT, timeout=10)
    console.prompt = re.escape(PROMPT)
