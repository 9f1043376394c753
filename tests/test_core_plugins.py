"""Plugin loading, blocking, and emulator kinds side by side."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from pathlib import Path

import pytest

from emucore import hookimpl
from emucore.errors import ConfigError, PluginError
from emucore.models import Project
from emucore.node import Node
from emucore.plugins import describe_plugins, make_plugin_manager
from emucore.session import Session
from tests.toy_emulator import make_toy

BUILT_IN = {
    "qemu",
    "qemu.binary",
    "qemu.accel",
    "qemu.machine",
    "qemu.boot",
    "qemu.disks",
    "qemu.network",
    "qemu.console",
    "qemu.process",
    "qemu.priority",
    "qemu.throttle",
    "qemu.capture",
    "qemu.options",
}


def test_importing_emucore_loads_no_plugin() -> None:
    code = "import sys, emucore, emucore.session; print([m for m in sys.modules if 'emu_' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_manager_loads_the_installed_plugins() -> None:
    manager = make_plugin_manager(environ={})
    names = {row["name"] for row in describe_plugins(manager) if not row["blocked"]}
    assert names >= BUILT_IN


def test_blocking_by_argument_and_by_environment() -> None:
    manager = make_plugin_manager(
        blocked=["qemu.throttle"], environ={"EMU_BLOCK_PLUGINS": "no:qemu.console, qemu.priority"}
    )
    rows = {row["name"]: row for row in describe_plugins(manager)}
    assert {name for name, row in rows.items() if row["blocked"]} == {
        "qemu.throttle",
        "qemu.console",
        "qemu.priority",
    }
    assert manager.get_plugin("qemu.disks") is not None
    assert manager.get_plugin("qemu.console") is None


def test_a_plugin_with_a_wrong_hook_signature_is_refused() -> None:
    broken = types.ModuleType("broken")

    @hookimpl
    def emu_build_args(node: Node, colour: str) -> None:  # no such argument in the spec
        pass

    broken.emu_build_args = emu_build_args  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="broken"):
        make_plugin_manager(entry_points=False, plugins=[("broken", broken)])


def session_with(tmp_path: Path, *plugins: types.ModuleType) -> Session:
    manager = make_plugin_manager(
        entry_points=False, plugins=[(plugin.__name__, plugin) for plugin in plugins]
    )
    return Session(Project.for_directory(tmp_path), plugins=manager)


def test_two_emulators_never_see_each_others_nodes(tmp_path: Path) -> None:
    alpha, beta = make_toy("alpha"), make_toy("beta")
    watcher = types.ModuleType("watcher")  # no EMULATOR: sees every node
    seen: list[str] = []

    @hookimpl
    def emu_node_created(node: Node) -> None:
        seen.append(node.name)

    watcher.emu_node_created = emu_node_created  # type: ignore[attr-defined]
    session = session_with(tmp_path, alpha, beta, watcher)
    a = session.add_node({"name": "a1", "emulator": "alpha"})
    b = session.add_node({"name": "b1", "emulator": "beta", "ram": 128})

    async def run() -> None:
        await a.start()
        await b.start()
        await session.close()

    asyncio.run(run())
    assert {node for _, node in alpha.calls} == {"a1"}
    assert {node for _, node in beta.calls} == {"b1"}
    assert ("start", "a1") in alpha.calls
    assert ("start", "b1") in beta.calls
    assert a.argv == ["alpha", "--ram=64"]
    assert b.argv == ["beta", "--ram=128"]
    assert seen == ["a1", "b1"]


def test_two_plugins_providing_one_kind_is_an_error(tmp_path: Path) -> None:
    first, second = make_toy("alpha"), make_toy("alpha")
    second.__name__ = "alpha_again"
    session = session_with(tmp_path, first, second)
    with pytest.raises(PluginError, match="two plugins provide the emulator 'alpha'"):
        session.add_node({"name": "a1", "emulator": "alpha"})


def test_an_unknown_kind_names_the_loaded_ones(tmp_path: Path) -> None:
    session = session_with(tmp_path, make_toy("alpha"))
    with pytest.raises(
        ConfigError, match=r"node 'g': \$.emulator: no plugin provides 'gamma' \(loaded: alpha\)"
    ):
        session.add_node({"name": "g", "emulator": "gamma"})


def test_node_descriptions_are_checked_by_the_emulators_class(tmp_path: Path) -> None:
    session = session_with(tmp_path, make_toy("alpha"))
    with pytest.raises(ConfigError) as caught:
        session.add_node(
            {
                "name": "a1",
                "emulator": "alpha",
                "adapters": 900,
                "flavour": "sweet",
                "colour": "red",
                "nios": {"3": {"type": "tap", "device": "tap0"}},
            }
        )
    assert str(caught.value) == (
        "node 'a1': $.adapters: must be 0..275, got 900;"
        " $.flavour: must be one of plain, spicy; got 'sweet';"
        " $.colour: unknown key (did you mean 'flavour'?)"
    )
    with pytest.raises(ConfigError, match=r"\$.nios\[3\]: adapter 3 does not exist"):
        session.add_node(
            {"name": "a1", "emulator": "alpha", "nios": {"3": {"type": "tap", "device": "t"}}}
        )
    with pytest.raises(ConfigError, match=r"\$.node_id: must be a UUID"):
        session.add_node({"name": "a1", "emulator": "alpha", "node_id": "nope"})
    with pytest.raises(ConfigError, match=r"\$.emulator: required"):
        session.add_node({"name": "a1"})


def test_names_are_unique_and_ids_stable(tmp_path: Path) -> None:
    first = session_with(tmp_path, make_toy("alpha")).add_node({"name": "a1", "emulator": "alpha"})
    again = session_with(tmp_path, make_toy("alpha"))
    second = again.add_node({"name": "a1", "emulator": "alpha"})
    assert first.config.id == second.config.id
    assert second.directory == tmp_path / "project-files" / "alpha" / str(second.config.id)
    with pytest.raises(ConfigError, match="a node with this name exists"):
        again.add_node({"name": "a1", "emulator": "alpha"})


def test_may_be_async_hooks_run_one_implementation_at_a_time(tmp_path: Path) -> None:
    order: list[str] = []
    early, late = types.ModuleType("early"), types.ModuleType("late")

    @hookimpl(tryfirst=True)
    async def emu_stop(node: Node) -> None:  # async, called first
        await asyncio.sleep(0)
        order.append("async body")

    @hookimpl(trylast=True)
    def emu_stop_sync(node: Node) -> None:  # sync, called after: must see the async one done
        order.append("sync body")

    early.emu_stop = emu_stop  # type: ignore[attr-defined]
    late.emu_stop = emu_stop_sync  # type: ignore[attr-defined]
    session = session_with(tmp_path, make_toy("alpha"), early, late)
    node = session.add_node({"name": "a1", "emulator": "alpha"})

    async def run() -> None:
        await node.start()
        await node.stop()

    asyncio.run(run())
    assert order == ["async body", "sync body"]


def test_wrappers_are_refused_on_may_be_async_hooks(tmp_path: Path) -> None:
    wrapping = types.ModuleType("wrapping")

    @hookimpl(wrapper=True)
    def emu_start(node: Node, argv: list[str]) -> object:
        return (yield)

    wrapping.emu_start = emu_start  # type: ignore[attr-defined]
    # Refused when the plugin registers, not at a node's first start.
    with pytest.raises(
        PluginError, match="'wrapping': emu_start may be async, so it cannot be wrapped"
    ):
        session_with(tmp_path, make_toy("alpha"), wrapping)
    manager = make_plugin_manager(entry_points=False)
    with pytest.raises(PluginError, match="emu_start may be async"):
        manager.register(wrapping, name="wrapping")
    assert manager.get_plugin("wrapping") is None


def test_a_lab_runner_uses_the_plugin_manager_it_is_given(tmp_path: Path) -> None:
    """emu run hands its manager (the one that asked emu_lab_runner) to the runner: a lab of
    an emulator known only to that manager builds."""
    from emucore.lab import load_lab
    from emucore.runner import LabRunner

    manager = make_plugin_manager(entry_points=False, plugins=[("toy", make_toy("toy"))])
    lab_file = tmp_path / "lab.toml"
    lab = load_lab({"name": "l", "nodes": {"a": {"emulator": "toy"}}}, str(lab_file))
    session = LabRunner(lab, lab_file, plugins=manager).build()
    assert session.plugins is manager
    assert session.nodes["a"].emulator == "toy"
