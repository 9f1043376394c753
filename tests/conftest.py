"""Shared test helpers: QEMU nodes in a temporary lab, paused real QEMUs, throwaway plugins.

No pytest-asyncio: helpers run coroutines with ``asyncio.run`` (one loop per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from qemu.qmp import ConnectError, QMPClient

from emucore.cgroups import Hierarchy
from emucore.claims import Claims
from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.session import Session
from tests.gns3_controller import GNS3SERVER, Controller, gns3_controller
from tests.helpers import writable_hierarchy

T = TypeVar("T")

QEMU_TIMEOUT = 20.0


def run(work: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``work`` on a fresh event loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(work, timeout))


def option_items(option: str) -> list[tuple[str, str]]:
    """Split a QEMU option string as QEMU does: ``,,`` is a literal comma.

    :return: ``(key, value)`` per item; a bare item (``e1000`` in ``e1000,mac=...``) has key ``""``.
    """
    items: list[str] = [""]
    index = 0
    while index < len(option):
        if option.startswith(",,", index):
            items[-1] += ","
            index += 2
        elif option[index] == ",":
            items.append("")
            index += 1
        else:
            items[-1] += option[index]
            index += 1
    pairs = [item.partition("=") for item in items]
    return [(key, value) if sep else ("", key) for key, sep, value in pairs]


def values_of(argv: list[str], flag: str) -> list[str]:
    """The argument following each occurrence of ``flag`` in ``argv``."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


@pytest.fixture
def kvm_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TCG only (``EMU_QEMU_KVM=off``): KVM guests hang on this host, and nothing probes."""
    monkeypatch.setenv("EMU_QEMU_KVM", "off")


@attrs.define
class QemuLab:
    """A project directory with an image directory, and the sessions made in it.

    :ivar root: the test's temporary directory.
    :ivar images: the image directory (``image_dirs`` of :meth:`settings`).
    :ivar project: the project, in ``root/project``.
    """

    root: Path
    images: Path
    project: Project
    sessions: list[Session] = attrs.field(factory=list)

    def image(self, name: str, size: str = "16M", fmt: str = "qcow2") -> Path:
        """Create an image with the real ``qemu-img`` in the image directory."""
        path = self.images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True, timeout=30
        )
        return path

    def settings(self, **overrides: Any) -> HostSettings:
        """Host settings with :attr:`images` as the image directory, plus ``overrides``."""
        return HostSettings(**{"image_dirs": (self.images,), **overrides})

    def session(
        self,
        settings: HostSettings | None = None,
        project: Project | None = None,
        claims: Claims | None = None,
        **overrides: Any,
    ) -> Session:
        """A session on :attr:`project` (or ``project``), closed at teardown; ``claims``
        shared with other sessions, as a host running several projects does."""
        settings = settings or self.settings(**overrides)
        session = Session(project or self.project, settings=settings, claims=claims)
        self.sessions.append(session)
        return session

    def node(self, session: Session | None = None, /, **description: Any) -> Node:
        """Add a QEMU node (named ``R1`` unless ``name`` is given) to ``session`` or a new one."""
        session = session or self.session()
        return session.add_node({"name": "R1", "emulator": "qemu", **description})

    def argv(self, session: Session | None = None, /, **description: Any) -> list[str]:
        """The dry-run argv of a new node."""
        return run(self.node(session, **description).dry_run())

    def close(self) -> None:
        """Close every session (releases images claimed by nodes without linked clones)."""
        for session in self.sessions:
            run(session.close())


@pytest.fixture
def qemu_lab(tmp_path: Path) -> Iterator[QemuLab]:
    """A :class:`QemuLab` in ``tmp_path``."""
    images = tmp_path / "images"
    images.mkdir()
    lab = QemuLab(tmp_path, images, Project.for_directory(tmp_path / "project"))
    try:
        yield lab
    finally:
        lab.close()


@attrs.frozen
class PausedQemu:
    """What a real QEMU, started paused with a node's argv, said before it quit.

    :ivar status: ``query-status``.
    :ivar peripherals: the ids of the ``-device``s (``qom-list /machine/peripheral``).
    :ivar blocks: ``query-block``.
    :ivar chardevs: ``query-chardev``.
    :ivar extra: the result of the caller's own query.
    :ivar returncode: QEMU's exit code after ``quit``.
    :ivar stderr: everything QEMU wrote to stderr.
    """

    status: dict[str, Any]
    peripherals: frozenset[str]
    blocks: list[dict[str, Any]]
    chardevs: list[dict[str, Any]]
    extra: Any
    returncode: int
    stderr: str


Query = Callable[[QMPClient], Awaitable[Any]]


async def run_paused(
    node: Node, argv: list[str], spawned: list[int], query: Query | None = None
) -> PausedQemu:
    """Start the real QEMU with ``argv`` (which holds ``-S`` and ``-qmp unix:qmp.sock``) in
    the node directory, ask it a few questions over QMP, ``quit`` it, and wait for its exit.

    QEMU is killed if anything fails; its pid goes to ``spawned``.
    """
    node.directory.mkdir(parents=True, exist_ok=True)
    (node.directory / "qmp.sock").unlink(missing_ok=True)
    # The serial console connects to the host's socket as QEMU starts: listen as a host does.
    console = (
        await _console_listener(node.directory) if "path=console.sock" in argv_text(argv) else None
    )
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=node.directory,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    spawned.append(process.pid)
    assert process.stderr is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    # The socket path may exceed the 107 bytes of sun_path: reach it through a directory fd.
    dir_fd = os.open(node.directory, os.O_PATH | os.O_DIRECTORY)
    client = QMPClient(node.name)
    try:
        await _connect(client, f"/proc/self/fd/{dir_fd}/qmp.sock", process, stderr, node.directory)
        status: Any = await client.execute("query-status")
        peripherals: Any = await client.execute("qom-list", {"path": "/machine/peripheral"})
        blocks: Any = await client.execute("query-block")
        chardevs: Any = await client.execute("query-chardev")
        extra = await query(client) if query else None
        await client.execute("quit")
        returncode = await asyncio.wait_for(process.wait(), QEMU_TIMEOUT)
        return PausedQemu(
            status,
            frozenset(p["name"] for p in peripherals if p["type"].startswith("child<")),
            blocks,
            chardevs,
            extra,
            returncode,
            (await stderr).decode(errors="replace"),
        )
    finally:
        with contextlib.suppress(Exception):  # after quit the reader task ends with EOFError
            await client.disconnect()
        os.close(dir_fd)
        if process.returncode is None:
            process.kill()
            await process.wait()
        stderr.cancel()
        if console is not None:
            console.close()


def argv_text(argv: list[str]) -> str:
    """The argv as one string, to look for an option in it."""
    return " ".join(argv)


async def _console_listener(directory: Path) -> asyncio.Server:
    """Accept (and ignore) QEMU's serial console connection on ``console.sock``."""
    (directory / "console.sock").unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        return await asyncio.start_unix_server(
            lambda _r, _w: None, path=f"/proc/self/fd/{dir_fd}/console.sock"
        )
    finally:
        os.close(dir_fd)


async def _connect(
    client: QMPClient,
    address: str,
    process: asyncio.subprocess.Process,
    stderr: asyncio.Future[bytes],
    directory: Path,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QEMU_TIMEOUT
    while True:
        # QEMU creates its socket a few ms after it starts, and listens just after binding
        # it (a connect in between is refused); there is no event to wait for.
        if (directory / "qmp.sock").exists():
            try:
                await asyncio.wait_for(client.connect(address), QEMU_TIMEOUT)
                return
            except (ConnectError, OSError):
                pass
        if process.returncode is not None:
            error = (await stderr).decode(errors="replace")
            raise AssertionError(f"QEMU exited ({process.returncode}) before QMP: {error}")
        if loop.time() > deadline:
            raise AssertionError(f"QEMU's QMP socket accepted no connection in {QEMU_TIMEOUT} s")
        await asyncio.sleep(0.01)


def running_qemu(pid: int) -> bool:
    """Whether ``pid`` is a QEMU that still runs (a reused pid of another program is not)."""
    try:
        return b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="session")
def spawned_qemus() -> Iterator[list[int]]:
    """Pids of every QEMU the tests started through :func:`qemu_paused`; none may outlive
    the session."""
    pids: list[int] = []
    yield pids
    assert [pid for pid in pids if running_qemu(pid)] == []


@pytest.fixture
def qemu_paused(
    spawned_qemus: list[int],
) -> Callable[..., PausedQemu]:
    """``qemu_paused(node, argv, query=None)``: :func:`run_paused` on a fresh event loop."""

    def launch(node: Node, argv: list[str], query: Query | None = None) -> PausedQemu:
        return run(run_paused(node, argv, spawned_qemus, query))

    return launch


@pytest.fixture
def make_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Path]]:
    """Factory: a throwaway installed distribution, visible to ``importlib.metadata`` for
    this test only.

    ``make_distribution("emu-sandbox", {"emu_sandbox": SOURCE}, {"sandbox": "emu_sandbox"})``
    writes ``emu_sandbox.py`` and ``emu_sandbox-0.1.dist-info/`` (``METADATA`` and an
    ``entry_points.txt`` declaring the entry points in ``group``, by default
    ``emucore.plugins``) into a new directory put first on ``sys.path``. Its modules are
    forgotten (``sys.modules``) at teardown.
    """
    imported: list[str] = []

    def make(
        name: str,
        modules: Mapping[str, str],
        entry_points: Mapping[str, str],
        group: str = "emucore.plugins",
        version: str = "0.1",
    ) -> Path:
        root = tmp_path / f"site-{name}"
        root.mkdir()
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            imported.append(module)
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = [f"[{group}]", *(f"{ep} = {target}" for ep, target in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(root))  # also clears importlib's finder caches
        return root

    yield make
    for module in imported:
        sys.modules.pop(module, None)


@pytest.fixture(scope="session")
def cgroup_hierarchy() -> Hierarchy:
    """This host's cgroup hierarchy, where emu can make groups with a CPU quota; skips,
    saying why, on a host where it cannot (the real thing does not exist there)."""
    found = writable_hierarchy()
    if found is None:
        pytest.skip("no cgroup with a cpu controller can be written on this host")
    return found


@pytest.fixture(scope="session")
def gns3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """One unmodified GNS3 3.0.6 controller (``.venv-gns3``) for every test that drives emu
    through one, started at first use. Each test module registers its own computes and
    removes them when it ends (``tests.gns3_controller.register``/``unregister``)."""
    if not GNS3SERVER.exists():
        pytest.skip("run ./scripts/setup: no .venv-gns3 with gns3-server")
    with gns3_controller(tmp_path_factory.mktemp("gns3-controller")) as controller:
        yield controller
