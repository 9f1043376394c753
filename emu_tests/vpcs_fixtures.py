"""Fixtures for VPCS nodes (the ``emu-vpcs`` plugin): ``vpcs_node`` and ``vpcs_console``.

Like :mod:`emu_tests.plugin`, this module imports only pytest at load time. ::

    def test_ping(emu_run, vpcs_node, vpcs_console):
        async def body():
            pc1 = await vpcs_node("pc1", ip="10.0.0.1/24")
            console = await vpcs_console(pc1)
            print(await vpcs_command(console, "show ip"))
        emu_run(body())
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from emucore.node import Node
    from emucore.session import Session
    from emucore.telnet import TelnetConsole

# VPCS' prompt: "VPCS> " (or "<pcname>> "), printed after a carriage return.
VPCS_PROMPT = r"\r[^\r\n>]{1,64}> "


@pytest.fixture
def vpcs_node(emu_session: Session) -> Callable[..., Awaitable[Node]]:
    """Factory: ``node = await vpcs_node("pc1", ip="10.0.0.2/24")`` adds a VPCS node to
    ``emu_session`` and starts it (unless ``start=False``); extra keywords are VPCS node
    properties (``gateway``, ``startup_script``, ``nios``...). Nodes are stopped at teardown
    with the session, even when the test fails.

    Skips where the ``vpcs`` binary is missing; fails when the emu-vpcs plugin is not
    installed (``pip install -e plugins/emu-vpcs``).
    """
    if shutil.which("vpcs") is None:
        pytest.skip("the vpcs binary is not installed (apt-get install vpcs)")
    if "vpcs" not in emu_session.emulators:
        pytest.fail("the emu-vpcs plugin is not installed: pip install -e plugins/emu-vpcs")
    counter = iter(range(1, 1000))

    async def make(name: str | None = None, *, start: bool = True, **properties: Any) -> Node:
        description = {"name": name or f"pc{next(counter)}", "emulator": "vpcs", **properties}
        node = emu_session.add_node(description)
        if start:
            await node.start()
        return node

    return make


async def open_vpcs_console(node: Node, timeout: float = 30.0) -> TelnetConsole:
    """Connect to a running VPCS node's console and wait until its prompt answers.

    Enter is pressed once a second until a prompt shows (VPCS printed its first one before
    anyone listened); then an ``echo`` of a fresh marker skips the prompts those Enters
    produced, so the next :func:`vpcs_command` reads only its own output.
    """
    import asyncio
    import re
    import secrets

    from emucore.errors import NodeError
    from emucore.telnet import ConsoleError, TelnetConsole

    if node.console is None or node.console.type != "telnet":
        raise NodeError(node.name, "has no telnet console (is it running?)")
    console = await TelnetConsole.connect(node.console.host, node.console.port, name=node.name)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await console.sendline()
            try:
                await console.expect(VPCS_PROMPT, timeout=1.0)
                break
            except ConsoleError:
                if loop.time() >= deadline:
                    raise
        marker = f"EMU{secrets.token_hex(4)}"
        await console.sendline(f"echo {marker}")
        # Anchored at a line start: the echoed command line starts with "echo".
        await console.expect(re.compile(rf"^{marker}\r?$", re.MULTILINE), timeout=10)
        await console.expect(VPCS_PROMPT, timeout=10)
    except BaseException:
        await console.close()
        raise
    return console


async def vpcs_command(console: TelnetConsole, command: str, timeout: float = 30.0) -> str:
    """Type ``command`` at the VPCS prompt and wait for the prompt that follows it.

    The output starts after VPCS' echo of the command line, so prompts that other clients
    of the same console caused before are skipped.

    :return: what the command printed, without the echoed command line and the prompt,
        carriage returns removed.
    """
    import re

    await console.sendline(command)
    echo = await console.expect(re.escape(command) + r"\r*\n", timeout)
    prompt = await console.expect(VPCS_PROMPT, timeout)
    return console.transcript[echo.end() : prompt.start()].replace("\r", "").strip()


@pytest.fixture
def vpcs_console(emu_run: Any) -> Iterator[Callable[[Node], Awaitable[TelnetConsole]]]:
    """Factory: ``console = await vpcs_console(node)`` opens a running VPCS node's console at
    its prompt (:func:`open_vpcs_console`); closed at teardown. Run commands with
    :func:`vpcs_command`.
    """
    from emu_tests.console import console_factory

    with console_factory(emu_run, open_vpcs_console) as connect:
        yield connect
