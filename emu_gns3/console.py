"""Consoles as GNS3 sees them: the node's own telnet port, its WebSocket bridge, its reset.

The node's console is served by the host already (:mod:`emucore.telnetd`, one server per
node for any number of clients), so the front end adds no server of its own: it reports
``node.console``'s port, the console WebSocket is one more telnet client of it, and
``console/reset`` restarts that server (:data:`~emucore.telnetd.CONSOLE_SERVER`) without
touching the emulator. As GNS3's compute does, the WebSocket carries the telnet stream as it
is (binary out, text in): the web UI's terminal understands the few negotiation bytes.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

from emu_gns3.errors import Conflict
from emucore.node import Node
from emucore.telnetd import CONSOLE_SERVER

CONNECT_TIMEOUT = 10.0


def telnet_address(node: Node) -> tuple[str, int]:
    """Where the running node's telnet console listens.

    :raises Conflict: the node does not run, or its console is not telnet.
    """
    console = node.console
    if not node.is_running or console is None or console.type != "telnet":
        raise Conflict(f"node {node.name!r} has no telnet console running (is it started?)")
    return console.host, console.port


async def bridge(ws: web.WebSocketResponse, node: Node) -> None:
    """Join a prepared WebSocket to the node's telnet console until either side ends.

    Output is not buffered here: a WebSocket that does not read stops this client's reads,
    and the console server drops a client that falls too far behind.
    """
    host, port = telnet_address(node)
    try:
        connecting = asyncio.open_connection(host, port)
        reader, writer = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        await ws.close(message=f"cannot reach the console of {node.name}: {exc}".encode()[:120])
        return

    async def output() -> None:
        while chunk := await reader.read(65536):
            await ws.send_bytes(chunk)

    async def typing() -> None:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                writer.write(message.data.encode())
            elif message.type == WSMsgType.BINARY:
                writer.write(message.data)
            else:
                continue
            await writer.drain()

    tasks = [asyncio.create_task(output()), asyncio.create_task(typing())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def reset(node: Node) -> None:
    """Restart the node's console server: every client is disconnected, the port stays (the
    server keeps listening: a stop meanwhile closes it for good).

    A node that does not run, or whose console no telnet server serves, has nothing to
    reset (GNS3's compute answers such a request with success too).
    """
    server = node.stash.get(CONSOLE_SERVER, None)
    if server is None or not node.is_running:
        return
    await server.restart()
