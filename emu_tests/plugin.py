"""The ``emu`` pytest plugin: fixtures for emu plugin authors (and emu's own tests).

Registered through the ``pytest11`` entry point, so installing emu makes the fixtures
available. This module imports only pytest at load time; emu and QEMU helpers are imported
inside the fixtures, so a test session that does not use them pays nothing.

There is no pytest-asyncio here: :func:`emu_run` runs coroutines on one event loop per
test, and every node the fixtures start is stopped on that loop at teardown, whether the
test passed or not. See ``docs/fixtures.md`` for examples.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from emu_tests.vpcs_fixtures import vpcs_console, vpcs_node  # noqa: F401 - fixtures

if TYPE_CHECKING:
    import pluggy

    from emu_tests.guest import TinyGuest
    from emu_tests.lab import LabHelper
    from emu_tests.warm import SavedLab
    from emucore.models import HostSettings, Project
    from emucore.node import Node
    from emucore.runner import LabRunner
    from emucore.session import Session
    from emucore.telnet import TelnetConsole

T = TypeVar("T")

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options to point the fixtures at another QEMU or guest."""
    group = parser.getgroup("emu", "emu fixtures")
    group.addoption(
        "--emu-qemu",
        default=os.environ.get("EMU_QEMU_BINARY", "qemu-system-x86_64"),
        help="QEMU binary for qemu_node (default: qemu-system-x86_64 on PATH, or $EMU_QEMU_BINARY)",
    )
    group.addoption(
        "--emu-kernel", default=None, help="guest kernel for qemu_node instead of the tiny guest"
    )
    group.addoption(
        "--emu-initrd", default=None, help="guest initrd for qemu_node instead of the tiny guest"
    )
    group.addoption(
        "--emu-kvm",
        default=os.environ.get("EMU_TEST_KVM", "off"),
        choices=("auto", "require", "off"),
        help="KVM mode of test nodes (default off: tests run under TCG)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the markers the fixtures use."""
    config.addinivalue_line("markers", "qemu: the test boots real QEMU guests")


@pytest.fixture
def emu_run() -> Iterator[Runner]:
    """Run a coroutine to completion on this test's event loop: ``emu_run(node.start())``.

    Every call uses the same loop, so nodes, consoles and relays made in one call can be
    used in the next. Fixtures register their cleanups on it; the loop closes last.
    """
    import asyncio

    runner = asyncio.Runner()
    try:
        yield runner.run
    finally:
        runner.close()


@pytest.fixture
def emu_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager with the installed plugins; ``register`` adds one for this test."""
    from emucore.plugins import make_plugin_manager

    return make_plugin_manager()


@pytest.fixture
def emu_project(tmp_path: Path) -> Project:
    """A project in a temporary directory (``project.directory``)."""
    from emucore.models import Project

    directory = tmp_path / "project"
    directory.mkdir()
    return Project.for_directory(directory, name="test")


@pytest.fixture(scope="session")
def qemu_binary(pytestconfig: pytest.Config) -> Path:
    """The QEMU binary the fixtures use; skips (saying why) only where QEMU is absent."""
    wanted = str(pytestconfig.getoption("emu_qemu"))
    found = shutil.which(wanted)
    if found is None:
        pytest.skip(f"QEMU binary {wanted!r} is not installed (apt-get install qemu-system-x86)")
    return Path(found)


@pytest.fixture(scope="session")
def tiny_guest(pytestconfig: pytest.Config) -> TinyGuest:
    """The tiny bootable guest (kernel + busybox initramfs), built once and cached.

    ``--emu-kernel``/``--emu-initrd`` replace it. A build failure is an error, not a skip.
    """
    from emu_tests.guest import TinyGuest, build_tiny_guest

    kernel, initrd = pytestconfig.getoption("emu_kernel"), pytestconfig.getoption("emu_initrd")
    if kernel and initrd:
        return TinyGuest(Path(kernel), Path(initrd), "custom")
    return build_tiny_guest()


@pytest.fixture
def emu_settings(
    pytestconfig: pytest.Config, tiny_guest: TinyGuest, tmp_path: Path
) -> HostSettings:
    """Host settings for tests: the guest's and ``tmp_path/images`` as image directories."""
    from emucore.models import HostSettings

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    kvm = str(pytestconfig.getoption("emu_kvm"))
    return HostSettings(
        image_dirs=(images, tiny_guest.kernel.parent, tiny_guest.initrd.parent),
        emulators={"qemu": {"kvm": kvm, "powerdown_timeout": 10.0}},
    )


@pytest.fixture
def emu_session(
    emu_project: Project,
    emu_settings: HostSettings,
    emu_plugin_manager: pluggy.PluginManager,
    emu_run: Runner,
) -> Iterator[Session]:
    """A session on ``emu_project``; every node in it is stopped and closed at teardown."""
    from emucore.session import Session

    session = Session(emu_project, settings=emu_settings, plugins=emu_plugin_manager)
    try:
        yield session
    finally:
        emu_run(session.close())


@pytest.fixture
def qemu_node(
    emu_session: Session, tiny_guest: TinyGuest, qemu_binary: Path
) -> Callable[..., Awaitable[Node]]:
    """Factory: ``node = await qemu_node("r1", ip="10.0.0.1/24", adapters=2)`` boots the
    tiny guest under QEMU (started unless ``start=False``); extra keywords are QEMU node
    properties. Nodes are stopped at teardown, even when the test fails.
    """
    counter = iter(range(1, 1000))

    async def make(
        name: str | None = None,
        *,
        ip: str | None = None,
        extra_ips: dict[str, str] | None = None,
        start: bool = True,
        **properties: Any,
    ) -> Node:
        name = name or f"qemu{next(counter)}"
        description: dict[str, Any] = {
            "name": name,
            "emulator": "qemu",
            "qemu_path": str(qemu_binary),
            "ram": 128,
            "adapter_type": "virtio-net-pci",
            "kernel_image": str(tiny_guest.kernel),
            "initrd": str(tiny_guest.initrd),
            "kernel_command_line": tiny_guest.kernel_command_line(
                ip=ip, hostname=name, extra_ips=extra_ips or {}
            ),
        }
        description.update(properties)
        node = emu_session.add_node(description)
        if start:
            await node.start()
        return node

    return make


@pytest.fixture
def lab(emu_session: Session, emu_run: Runner, tmp_path: Path) -> Iterator[LabHelper]:
    """Wire the test's nodes: ``await lab.link("a:0", "b:1")`` (names or nodes; adapter 0 by
    default; ``filters=LinkFilters(...)`` for impairments). ``await lab.start(toml_text)``
    runs a whole lab file instead. Everything is stopped at teardown.
    """
    from emu_tests.lab import LabHelper

    helper = LabHelper(emu_session, tmp_path)
    try:
        yield helper
    finally:
        emu_run(helper.stop())


@pytest.fixture
def guest_console(emu_run: Runner) -> Iterator[Callable[[Node], Awaitable[TelnetConsole]]]:
    """Factory: ``console = await guest_console(node)`` connects to a running tiny guest's
    telnet console and waits for its shell prompt; closed at teardown.

    ``await console.run("ip addr")`` returns ``(status, output)``; ``expect`` and ``send``
    are there for anything else.
    """
    from emu_tests.console import console_factory, open_guest_console

    with console_factory(emu_run, open_guest_console) as connect:
        yield connect


@pytest.fixture(scope="session")
def saved_lab(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SavedLab]]:
    """Factory, once per test session: ``saved = saved_lab("labs/ospf.toml", check=True)``
    boots the lab (a path relative to pytest's root directory), runs its checks with
    ``check`` (each must pass), waits for its nodes' shells and saves it as a snapshot;
    asked again for the same file, it gives the same snapshot. Pass it to ``warm_lab``.
    The snapshots are deleted when the session ends.
    """
    from emu_tests.warm import SavedLabs
    from emucore.models import HostSettings

    kvm = str(pytestconfig.getoption("emu_kvm"))
    labs = SavedLabs(
        tmp_path_factory.mktemp("saved-labs"), HostSettings(emulators={"qemu": {"kvm": kvm}})
    )

    def save(lab_file: str | Path, check: bool = False) -> SavedLab:
        path = Path(lab_file)
        return labs.get(path if path.is_absolute() else pytestconfig.rootpath / path, check)

    try:
        yield save
    finally:
        labs.remove()


@pytest.fixture
def warm_lab(emu_run: Runner) -> Iterator[Callable[[SavedLab], Awaitable[LabRunner]]]:
    """Factory: ``lab = await warm_lab(saved)`` starts the lab ``saved_lab`` saved, from its
    snapshot: every guest goes on where it was saved, without a boot. ``lab`` is a
    :class:`~emucore.runner.LabRunner` (``lab.session.node("r1")``, ``lab.check(...)``);
    it is stopped at teardown, even when the test fails.
    """
    runners: list[LabRunner] = []

    async def start(saved: SavedLab) -> LabRunner:
        runner = saved.runner()
        runners.append(runner)
        await runner.start()
        return runner

    try:
        yield start
    finally:
        for runner in runners:
            emu_run(runner.stop())
