"""Graphical and auxiliary consoles: VNC and SPICE answer their protocols on the reported
ports, and an auxiliary telnet console is a second serial port with the guest's shell.

The tests start the real qemu-system-x86_64; the ones with a shell boot the tiny guest.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from emu_tests.console import wait_for_prompt
from emucore.errors import ConfigError
from emucore.node import Node
from emucore.session import Session
from emucore.telnet import TelnetConsole
from tests.conftest import QemuLab, values_of

NodeFactory = Callable[..., Awaitable[Node]]

pytestmark = pytest.mark.qemu

TIMEOUT = 10.0


async def rfb_version(host: str, port: int) -> bytes:
    """A VNC server's first words: its RFB protocol version (``RFB 003.008\\n``); answering
    with the same version gets its security types."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        version = await asyncio.wait_for(reader.readexactly(12), TIMEOUT)
        writer.write(version)
        count = (await asyncio.wait_for(reader.readexactly(1), TIMEOUT))[0]
        types = await asyncio.wait_for(reader.readexactly(count), TIMEOUT)
        assert 1 in types  # "None": no password, as emu's VNC consoles are
        return version
    finally:
        writer.close()


async def spice_link(host: str, port: int) -> tuple[bytes, int, int]:
    """A SPICE link handshake for the main channel: the reply's magic, major version and
    error code (0: accepted)."""
    # SpiceLinkMess: connection id, channel type (1: main), channel id, no capabilities.
    message = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)
    header = b"REDQ" + struct.pack("<III", 2, 2, len(message))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        writer.write(header + message)
        reply = await asyncio.wait_for(reader.readexactly(20), TIMEOUT)
        major, _minor, _size, error = struct.unpack("<IIII", reply[4:20])
        return reply[:4], major, error
    finally:
        writer.close()


def test_vnc_console_and_a_telnet_aux_console_on_the_guest_serial_port(
    emu_run: Any, qemu_node: NodeFactory
) -> None:
    async def body() -> None:
        node = await qemu_node("screen", console_type="vnc", aux_type="telnet")
        assert node.console is not None
        assert node.console.type == "vnc"
        assert await rfb_version(node.console.host, node.console.port) == b"RFB 003.008\n"
        info = await node.info()
        aux = await TelnetConsole.connect(node.console.host, info["aux"], name="aux")
        try:
            await wait_for_prompt(aux)
            # With a graphical console the aux console is the guest's first serial port.
            status, out = await aux.run("echo aux-$((6*7)) on $(tty)")
            assert (status, out) == (0, "aux-42 on /dev/ttyS0")
        finally:
            await aux.close()
        log = (node.directory / "aux.log").read_text(errors="replace")
        assert "aux-42" in log
        await node.stop()
        assert "aux" not in await node.info()
        assert not (node.directory / "aux.sock").exists()

    emu_run(body())


def test_spice_with_agent_and_a_vnc_aux_console(
    emu_run: Any, emu_session: Session, qemu_binary: Path
) -> None:
    """No guest needed: the display servers answer as soon as QEMU runs (SeaBIOS idles)."""

    async def body() -> None:
        description = {"name": "spicy", "emulator": "qemu", "qemu_path": str(qemu_binary)}
        description |= {"ram": 32, "console_type": "spice+agent", "aux_type": "vnc"}
        node = emu_session.add_node(description)
        await node.start()
        assert node.console is not None
        assert node.console.type == "spice"
        magic, major, error = await spice_link(node.console.host, node.console.port)
        assert (magic, major, error) == (b"REDQ", 2, 0)
        aux = (await node.info())["aux"]
        assert await rfb_version(node.console.host, aux) == b"RFB 003.008\n"
        # The agent's channel is there for the guest's spice-vdagent.
        assert "virtserialport,bus=spice-serial0.0,chardev=vdagent,name=com.redhat.spice.0" in (
            values_of(node.argv, "-device")
        )
        assert values_of(node.argv, "-vga") == ["qxl"]

    emu_run(body())


def test_aux_console_argv_and_refusals(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(aux_type="telnet")
    assert values_of(argv, "-serial") == ["chardev:console0", "chardev:aux0"]
    assert "socket,id=aux0,path=aux.sock" in values_of(argv, "-chardev")
    for console, aux in [("vnc", "vnc"), ("spice", "spice+agent"), ("spice+agent", "spice")]:
        with pytest.raises(ConfigError, match=r"\$\.aux_type: cannot be"):
            qemu_lab.node(name=f"R-{aux}", console_type=console, aux_type=aux)
    with pytest.raises(ConfigError, match=r"\$\.aux: must differ from the console port"):
        qemu_lab.node(name="same", console=5950, aux=5950, aux_type="telnet")
    with pytest.raises(ConfigError, match=r"\$\.aux: must be 5900 or more for a VNC console"):
        qemu_lab.node(name="low", aux=5000, aux_type="vnc")
    # A fixed aux port belongs to one node at a time, like a console port.
    session = qemu_lab.session()
    qemu_lab.node(session, name="first", aux=6001, aux_type="telnet")
    with pytest.raises(
        ConfigError, match=r"\$\.console: port 6001 is already taken by node .first."
    ):
        qemu_lab.node(session, name="second", console=6001)
