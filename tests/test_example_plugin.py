"""The example third-party plugin (examples/emu-sandbox), installed for real with pip.

It wraps one QEMU hook to add ``-sandbox`` to every QEMU node; nothing in emu_qemu changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emu_qemu.contract import qemu_pid
from emu_tests.guest import TinyGuest
from emucore.models import HostSettings, Project
from emucore.plugins import describe_plugins, make_plugin_manager
from emucore.session import Session

EXAMPLE = Path(__file__).parents[1] / "examples" / "emu-sandbox"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --target`` of the example into a fresh directory.

    Built with the environment's hatchling when it has one (no index needed), else in pip's
    usual isolated build environment.
    """
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "emu-sandbox"
    # Built from a copy: the build must not leave files in the repository.
    shutil.copytree(EXAMPLE, source)
    offline = importlib.util.find_spec("hatchling") is not None
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *(("--no-build-isolation", "--no-index") if offline else ()),
            *("--target", str(target), str(source)),
        ],
        check=True,
        timeout=300,
    )
    return target


@pytest.fixture
def with_example(installed_example: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed example on ``sys.path`` for this test only."""
    monkeypatch.syspath_prepend(str(installed_example))
    importlib.invalidate_caches()
    yield installed_example
    sys.modules.pop("emu_sandbox", None)


def qemu_description(guest: TinyGuest, name: str = "r1") -> dict[str, Any]:
    return {
        "name": name,
        "emulator": "qemu",
        "ram": 128,
        "adapter_type": "virtio-net-pci",
        "kernel_image": str(guest.kernel),
        "initrd": str(guest.initrd),
        "kernel_command_line": guest.kernel_command_line(hostname=name),
    }


def sandbox_values(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "-sandbox"]


def test_without_the_install_there_is_no_sandbox_plugin(emu_run: Any, tmp_path: Path) -> None:
    manager = make_plugin_manager(environ={})
    assert manager.get_plugin("sandbox") is None
    session = Session(Project.for_directory(tmp_path), plugins=manager)
    node = session.add_node({"name": "r1", "emulator": "qemu", "ram": 64})
    assert sandbox_values(emu_run(node.dry_run())) == []


def test_the_installed_plugin_adds_the_sandbox_to_qemu_nodes_only(
    with_example: Path, emu_run: Any, tmp_path: Path
) -> None:
    installed = {p.name for p in with_example.iterdir()}
    assert {"emu_sandbox", "emu_sandbox-0.1.0.dist-info"} <= installed
    manager = make_plugin_manager(environ={})
    (row,) = [row for row in describe_plugins(manager) if row["name"] == "sandbox"]
    assert row["distribution"] == "emu-sandbox 0.1.0"
    assert row["emulator"] == "qemu"
    assert row["hooks"] == ["emu_build_args"]
    assert row["module"] == "emu_sandbox"
    assert Path(str(sys.modules["emu_sandbox"].__file__)).is_relative_to(with_example)

    session = Session(Project.for_directory(tmp_path), plugins=manager)
    qemu = session.add_node({"name": "r1", "emulator": "qemu", "ram": 64})
    argv = emu_run(qemu.dry_run())
    assert sandbox_values(argv) == [SANDBOX]
    # Placed among the control options, before the boot options, as its position says.
    assert argv.index("-qmp") < argv.index("-sandbox") < argv.index("-boot")
    pc = session.add_node({"name": "pc1", "emulator": "vpcs"})  # scoped out: untouched
    assert "-sandbox" not in emu_run(pc.dry_run())

    blocked = make_plugin_manager(environ={"EMU_BLOCK_PLUGINS": "sandbox"})
    other = Session(Project.for_directory(tmp_path / "b"), plugins=blocked)
    node = other.add_node({"name": "r1", "emulator": "qemu", "ram": 64})
    assert sandbox_values(emu_run(node.dry_run())) == []


def test_a_plugin_that_set_the_sandbox_already_is_left_alone(
    with_example: Path, emu_run: Any, tmp_path: Path
) -> None:
    from emu_qemu import positions
    from emucore import hookimpl
    from emucore.records import ArgFragment

    class Strict:
        EMULATOR = "qemu"

        @hookimpl
        def emu_build_args(self, node: Any) -> list[ArgFragment]:
            return [ArgFragment(positions.CONTROL, ("-sandbox", "on"), "strict")]

    manager = make_plugin_manager(environ={}, plugins=[("strict", Strict())])
    session = Session(Project.for_directory(tmp_path), plugins=manager)
    node = session.add_node({"name": "r1", "emulator": "qemu", "ram": 64})
    assert sandbox_values(emu_run(node.dry_run())) == ["on"]


@pytest.mark.qemu
def test_qemu_runs_a_guest_under_the_sandbox(
    with_example: Path,
    emu_run: Any,
    emu_settings: HostSettings,
    tiny_guest: TinyGuest,
    qemu_binary: Path,
    guest_console: Any,
    tmp_path: Path,
) -> None:
    manager = make_plugin_manager(environ={})
    session = Session(Project.for_directory(tmp_path), settings=emu_settings, plugins=manager)
    plain = Session(
        Project.for_directory(tmp_path / "plain"),
        settings=emu_settings,
        plugins=make_plugin_manager(environ={"EMU_BLOCK_PLUGINS": "sandbox"}),
    )

    async def body() -> None:
        sandboxed = session.add_node(qemu_description(tiny_guest, "r1"))
        unsandboxed = plain.add_node(qemu_description(tiny_guest, "r2"))
        await sandboxed.start()
        await unsandboxed.start()
        assert sandbox_values(sandboxed.argv) == [SANDBOX]
        # QEMU installed its seccomp filter; the same QEMU without the plugin has none.
        assert seccomp_mode(qemu_pid(sandboxed)) == 2
        assert seccomp_mode(qemu_pid(unsandboxed)) == 0
        console = await guest_console(sandboxed)  # the guest boots to its shell
        status, out = await console.run("echo sandboxed-$((6*7))")
        assert (status, out) == (0, "sandboxed-42")

    try:
        emu_run(body())
    finally:
        emu_run(session.close())
        emu_run(plain.close())


def seccomp_mode(pid: int | None) -> int:
    """The ``Seccomp:`` line of a process's status (0 none, 2 filter)."""
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Seccomp:\s+(\d+)$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))
