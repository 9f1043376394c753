"""Third-party plugins change the QEMU command line through real entry points only.

Each plugin here is a throwaway distribution (``make_distribution`` in conftest.py): a module
file and a ``NAME-0.1.dist-info`` with ``entry_points.txt`` on ``sys.path``, so
``importlib.metadata`` finds it as it would an installed package, and ``make_plugin_manager``
loads it with the built-ins. Nothing is registered directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import pytest
from qemu.qmp import QMPClient

from emucore.plugins import describe_plugins, make_plugin_manager
from emucore.session import Session
from tests.conftest import PausedQemu, QemuLab, run, values_of

pytestmark = pytest.mark.usefixtures("kvm_off")

# (a) wraps emu_build_args: every QEMU node gets QEMU's seccomp sandbox.
SANDBOX = '''
"""Turn on QEMU's seccomp sandbox for every QEMU node."""

from emu_qemu import positions
from emucore import hookimpl
from emucore.records import ArgFragment

EMULATOR = "qemu"


@hookimpl(wrapper=True)
def emu_build_args(node):
    """Append -sandbox on after everything the other plugins contributed."""
    result = yield
    return [*result, [ArgFragment(positions.CONSOLE + 5, ("-sandbox", "on"), "sandbox")]]
'''

# (b) replaces qemu.console: the serial port on a UNIX socket in the node directory.
UNIX_CONSOLE = '''
"""The node's serial console on a UNIX socket, console.sock, in the node directory."""

from emu_qemu import positions
from emu_qemu.qemuopts import opts
from emucore import hookimpl
from emucore.models import ConsoleInfo
from emucore.records import ArgFragment

EMULATOR = "qemu"
SOCKET = "console.sock"


@hookimpl
def emu_build_args(node):
    """-chardev socket,path=console.sock and the first serial port on it."""
    chardev = opts("socket", {"id": "serial0", "path": SOCKET, "server": True, "wait": False})
    args = ["-chardev", chardev, "-serial", "chardev:serial0"]
    return [ArgFragment(positions.CONSOLE, args, "unix-console")]


@hookimpl
def emu_started(node):
    """Publish where the console is."""
    node.console = ConsoleInfo("unix", str(node.directory / SOCKET), 0)
'''


def install_sandbox(make_distribution: Callable[..., Path]) -> None:
    make_distribution(
        "emu-sandbox", {"emu_sandbox_plugin": SANDBOX}, {"sandbox": "emu_sandbox_plugin"}
    )


def install_unix_console(make_distribution: Callable[..., Path]) -> None:
    make_distribution(
        "emu-unix-console",
        {"emu_unix_console_plugin": UNIX_CONSOLE},
        {"unix-console": "emu_unix_console_plugin"},
    )


def node_with(lab: QemuLab, manager: pluggy.PluginManager, **description: Any) -> Any:
    session = Session(lab.project, settings=lab.settings(), plugins=manager)
    lab.sessions.append(session)
    return lab.node(session, **description)


def test_the_distribution_is_loaded_through_its_entry_point(
    make_distribution: Callable[..., Path],
) -> None:
    install_sandbox(make_distribution)
    rows = {row["name"]: row for row in describe_plugins(make_plugin_manager(environ={}))}
    assert rows["sandbox"]["distribution"] == "emu-sandbox 0.1"
    assert rows["sandbox"]["module"] == "emu_sandbox_plugin"
    assert rows["sandbox"]["emulator"] == "qemu"
    assert rows["sandbox"]["hooks"] == ["emu_build_args"]


def test_without_the_distribution_nothing_changes(qemu_lab: QemuLab) -> None:
    manager = make_plugin_manager(environ={})
    assert manager.get_plugin("sandbox") is None
    assert "-sandbox" not in qemu_lab.argv(qemu_lab.session())


def test_a_wrapper_adds_sandbox_to_every_qemu_node(
    qemu_lab: QemuLab,
    make_distribution: Callable[..., Path],
    qemu_paused: Callable[..., PausedQemu],
) -> None:
    plain = qemu_lab.argv(name="plain")
    install_sandbox(make_distribution)
    manager = make_plugin_manager(environ={})
    for name, options in (("R1", ""), ("R2", "-rtc base=utc")):
        node = node_with(qemu_lab, manager, name=name, options=options, console_type="vnc")
        argv = run(node.dry_run())
        assert values_of(argv, "-sandbox") == ["on"]
        # After the console (position 85), before the user's options, which stay last.
        assert argv.index("-sandbox") > argv.index("-vnc")
        assert argv[len(argv) - len(options.split()) :] == options.split()
    # Apart from it, the command line is the built-ins' own.
    node = node_with(qemu_lab, manager, name="plain")
    argv = run(node.dry_run())
    i = argv.index("-sandbox")
    assert argv[:i] + argv[i + 2 :] == plain
    qemu = qemu_paused(node, argv)
    assert (qemu.status["status"], qemu.returncode) == ("prelaunch", 0)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_plugin_replaces_the_built_in_console(
    qemu_lab: QemuLab,
    make_distribution: Callable[..., Path],
    qemu_paused: Callable[..., PausedQemu],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    built_in = qemu_lab.argv(name="before")
    assert "chardev:console0" in built_in
    install_unix_console(make_distribution)
    if how == "argument":
        manager = make_plugin_manager(blocked=["qemu.console"], environ={})
    else:
        monkeypatch.setenv("EMU_BLOCK_PLUGINS", "qemu.console")
        manager = make_plugin_manager()
    assert manager.get_plugin("qemu.console") is None
    assert manager.get_plugin("unix-console") is not None

    node = node_with(qemu_lab, manager, name="before")
    argv = run(node.dry_run())
    assert values_of(argv, "-chardev") == ["socket,id=serial0,path=console.sock,server=on,wait=off"]
    assert values_of(argv, "-serial") == ["chardev:serial0"]
    assert not any("console0" in word or "telnet" in word for word in argv)
    # Only the console changed.
    strip = {"-chardev", "-serial"}
    unchanged = [w for i, w in enumerate(argv) if w not in strip and argv[i - 1] not in strip]
    expected = [
        w for i, w in enumerate(built_in) if w not in strip and built_in[i - 1] not in strip
    ]
    assert unchanged == expected

    async def console_socket(client: QMPClient) -> bool:
        listening: bool = (node.directory / "console.sock").is_socket()
        return listening

    qemu = qemu_paused(node, argv, console_socket)
    assert (qemu.status["status"], qemu.returncode) == ("prelaunch", 0)
    labels = {c["label"]: c["filename"] for c in qemu.chardevs}
    assert "console0" not in labels
    assert labels["serial0"] == "disconnected:unix:console.sock,server=on"
    assert qemu.extra is True  # QEMU listened in the node directory
