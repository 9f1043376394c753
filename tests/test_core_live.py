"""The core's generic node operations beyond start and stop: changes to a running node,
disk images in the node directory, and what plugins report about a node.

Driven with the toy emulator (no process behind it) and small plugins made here; QEMU's
implementations are tested against the real QEMU in test_qemu_cdrom.py,
test_qemu_disk_images.py and test_qemu_checksums.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pytest

from emucore import hookimpl
from emucore.errors import ConfigError, NodeError, NodeStateError
from emucore.models import Project
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from emucore.session import Session
from tests.toy_emulator import make_toy


class LiveFlavour:
    """Changes ``flavour`` of a running toy node; refuses the value ``"bitter"``."""

    EMULATOR = "toy"

    def __init__(self) -> None:
        self.applied: list[tuple[str, str, frozenset[str]]] = []

    @hookimpl
    def emu_live_properties(self, node: Node) -> Collection[str]:
        return ["flavour"]

    @hookimpl
    async def emu_update_running(self, node: Node, previous: Any, changed: frozenset[str]) -> None:
        await asyncio.sleep(0)
        if node.properties.flavour == "spicy" and previous.flavour == "spicy":
            raise AssertionError("called without a change")
        self.applied.append((previous.flavour, node.properties.flavour, changed))


class DiskFiles:
    """Disk images as plain files; ``taken`` says whether it answers at all."""

    EMULATOR = "toy"

    def __init__(self, taken: bool = True) -> None:
        self.taken = taken
        self.calls: list[str] = []

    @hookimpl
    async def emu_create_disk_image(
        self, node: Node, name: str, options: Mapping[str, Any]
    ) -> bool:
        self.calls.append(f"create {name}")
        if self.taken:
            (node.directory / name).write_bytes(b"\0" * int(options["size"]))
        return self.taken

    @hookimpl
    def emu_resize_disk_image(self, node: Node, name: str, extend: int) -> bool:
        self.calls.append(f"resize {name} {extend}")
        if self.taken:
            with (node.directory / name).open("ab") as image:
                image.write(b"\0" * extend)
        return self.taken

    @hookimpl
    def emu_delete_disk_image(self, node: Node, name: str) -> bool:
        self.calls.append(f"delete {name}")
        if self.taken:
            (node.directory / name).unlink()
        return self.taken


def session_with(tmp_path: Path, *plugins: tuple[str, object]) -> Session:
    manager = make_plugin_manager(entry_points=False, plugins=[("toy", make_toy("toy")), *plugins])
    return Session(Project.for_directory(tmp_path), plugins=manager)


def test_a_running_node_takes_the_changes_a_plugin_can_apply_live(tmp_path: Path) -> None:
    live = LiveFlavour()

    async def body() -> None:
        async with session_with(tmp_path, ("live", live)) as session:
            node = session.add_node({"name": "n1", "emulator": "toy", "ram": 64})
            await node.start()
            await session.update_node("n1", {"flavour": "spicy"})
            assert node.properties.flavour == "spicy"
            assert live.applied == [("plain", "spicy", frozenset({"flavour"}))]
            # Replayed unchanged (as GNS3's controller does): nothing to apply.
            await session.update_node("n1", {"flavour": "spicy", "ram": 64})
            assert len(live.applied) == 1
            # Anything else is refused before anything is applied, the live ones named.
            with pytest.raises(NodeStateError, match=r"cannot change ram while the node is"):
                await session.update_node("n1", {"flavour": "plain", "ram": 128})
            assert (node.properties.flavour, node.properties.ram) == ("spicy", 64)
            assert len(live.applied) == 1
            with pytest.raises(NodeStateError, match=r"can change flavour while it runs"):
                await session.update_node("n1", {"ram": 128})
            # The name is the host's: it changes on a running node too, nothing to apply.
            await session.update_node("n1", {"name": "n2"})
            assert session.node("n2") is node
            await node.suspend()
            await session.update_node("n2", {"flavour": "plain"})
            assert live.applied[-1] == ("spicy", "plain", frozenset({"flavour"}))
            await node.stop()
            await session.update_node("n2", {"ram": 128})  # stopped: anything goes
            assert len(live.applied) == 2

    asyncio.run(body())


def test_without_a_live_plugin_a_running_node_refuses_every_change(tmp_path: Path) -> None:
    async def body() -> None:
        async with session_with(tmp_path) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            await node.start()
            with pytest.raises(
                NodeStateError,
                match=r"cannot change flavour while the node is started; stop it first$",
            ):
                await session.update_node("n1", {"flavour": "spicy"})
            with pytest.raises(ConfigError, match=r"\$\.ram: must be an integer"):
                await session.update_node("n1", {"ram": "lots"})
            assert node.properties.flavour == "plain"

    asyncio.run(body())


def test_a_failed_live_change_leaves_the_previous_description(tmp_path: Path) -> None:
    class Refusing(LiveFlavour):
        @hookimpl
        async def emu_update_running(
            self, node: Node, previous: Any, changed: frozenset[str]
        ) -> None:
            raise NodeError(node.name, "flavour: the guest does not like it")

    async def body() -> None:
        async with session_with(tmp_path, ("refusing", Refusing())) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            await node.start()
            with pytest.raises(NodeError, match="does not like it"):
                await session.update_node("n1", {"flavour": "spicy"})
            assert node.properties.flavour == "plain"

    asyncio.run(body())


def test_a_change_the_plugins_refuse_is_never_applied_live(tmp_path: Path) -> None:
    """``emu_node_created`` checks the new description before the running emulator gets it."""
    live = LiveFlavour()

    class NoSpice:
        EMULATOR = "toy"

        @hookimpl
        def emu_node_created(self, node: Node) -> None:
            if node.properties.flavour == "spicy":
                raise ConfigError(f"node {node.name!r}", ["$.flavour: no spice here"])

    async def body() -> None:
        async with session_with(tmp_path, ("live", live), ("nospice", NoSpice())) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            await node.start()
            with pytest.raises(ConfigError, match="no spice here"):
                await session.update_node("n1", {"flavour": "spicy"})
            assert node.properties.flavour == "plain"
            assert live.applied == []  # the emulator never saw the refused change

    asyncio.run(body())


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../escape.qcow2", "plain file name"),
        ("sub/disk.qcow2", "plain file name"),
        (".hidden.qcow2", "must not start with a dot"),
        ("", "non-empty string"),
        ("x" * 256, "plain file name"),
        ("new\nline.img", "plain file name"),
        (7, "non-empty string"),
    ],
)
def test_disk_image_names_are_plain_file_names(tmp_path: Path, name: Any, problem: str) -> None:
    disks = DiskFiles()

    async def body() -> None:
        async with session_with(tmp_path, ("disks", disks)) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            for operation in (
                node.create_disk_image(name, {"size": 4}),
                node.resize_disk_image(name, 1),
                node.delete_disk_image(name),
            ):
                with pytest.raises(NodeError, match=problem):
                    await operation
        assert disks.calls == []

    asyncio.run(body())


def test_disk_images_are_created_anytime_but_resized_and_deleted_only_when_stopped(
    tmp_path: Path,
) -> None:
    first, second = DiskFiles(), DiskFiles()

    async def body() -> None:
        async with session_with(tmp_path, ("first", first), ("second", second)) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            await node.create_disk_image("a.img", {"size": 4})
            await node.resize_disk_image("a.img", 2)
            assert (node.directory / "a.img").stat().st_size == 6
            await node.start()
            await node.create_disk_image("b.img", {"size": 1})
            with pytest.raises(NodeStateError, match=r"cannot resize a\.img: the node is started"):
                await node.resize_disk_image("a.img", 1)
            with pytest.raises(NodeStateError, match=r"cannot delete b\.img: the node is started"):
                await node.delete_disk_image("b.img")
            await node.stop()
            with pytest.raises(NodeError, match="extend: must be a positive number of MiB"):
                await node.resize_disk_image("a.img", 0)
            await node.delete_disk_image("b.img")
            assert not (node.directory / "b.img").exists()
        # One plugin took each request; the other was never asked (the last registered
        # runs first among plain implementations).
        assert first.calls == []
        assert second.calls == ["create a.img", "resize a.img 2", "create b.img", "delete b.img"]

    asyncio.run(body())


def test_a_disk_image_request_no_plugin_takes_is_refused(tmp_path: Path) -> None:
    declining = DiskFiles(taken=False)

    async def body() -> None:
        async with session_with(tmp_path, ("declining", declining)) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            with pytest.raises(NodeError, match="no plugin of 'toy' creates disk images"):
                await node.create_disk_image("a.img", {"size": 1})
            with pytest.raises(NodeError, match="no plugin of 'toy' resizes disk images"):
                await node.resize_disk_image("a.img", 1)
            with pytest.raises(NodeError, match="no plugin of 'toy' deletes disk images"):
                await node.delete_disk_image("a.img")
        assert declining.calls == ["create a.img", "resize a.img 1", "delete a.img"]

    asyncio.run(body())


def test_node_info_merges_what_plugins_report_the_first_answer_winning(tmp_path: Path) -> None:
    class Builtin:
        EMULATOR = "toy"

        @hookimpl(trylast=True)
        async def emu_node_info(self, node: Node) -> Mapping[str, Any]:
            await asyncio.sleep(0)
            return {"checksum": "builtin", "aux": 5000}

    class ThirdParty:
        EMULATOR = "toy"

        @hookimpl
        def emu_node_info(self, node: Node) -> Mapping[str, Any]:
            return {"checksum": "mine", "status_note": node.status.value}

    class Silent:
        @hookimpl
        def emu_node_info(self, node: Node) -> None:
            return None

    async def body() -> None:
        plugins = (("builtin", Builtin()), ("third", ThirdParty()), ("silent", Silent()))
        async with session_with(tmp_path, *plugins) as session:
            node = session.add_node({"name": "n1", "emulator": "toy"})
            assert await node.info() == {
                "checksum": "mine",
                "status_note": "stopped",
                "aux": 5000,
            }
            async with session_with(tmp_path / "bare") as bare:
                assert await bare.add_node({"name": "n2", "emulator": "toy"}).info() == {}

    asyncio.run(body())
