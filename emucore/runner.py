"""Run a lab: create its nodes, wire its links, start everything, capture, check, stop.

This is the engine behind ``emu run``; the CLI only parses arguments and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import pluggy

from emucore import snapshots as lab_snapshots
from emucore.errors import ConfigError, EmuError
from emucore.files import (
    UnsafePathError,
    check_regular,
    create_file,
    named,
    prepare_for_child,
    private_dir,
    write_atomic,
)
from emucore.lab import CheckSpec, LabSpec, parse_endpoint
from emucore.links import Link
from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.pcap import icmp_echoes, read_frames
from emucore.plugins import make_plugin_manager
from emucore.relay import SIDES
from emucore.session import Session
from emucore.tasks import all_ended
from emucore.telnet import TelnetConsole

STATE_NAME = "state.json"
LOCK_NAME = "emu.lock"


class LabLockedError(EmuError):
    """Another ``emu run`` holds the lab."""


@attrs.frozen
class CheckOutcome:
    """The result of one check: did the node's console show what was expected."""

    node: str
    command: str
    expect: str
    passed: bool
    output: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)


def project_dir_for(lab_file: Path, lab: LabSpec) -> Path:
    """Where a lab keeps its nodes' files: ``.emu/<lab name>`` next to the lab file."""
    return lab_file.absolute().parent / ".emu" / lab.name


class LabLock:
    """An exclusive lock on a lab's project directory; dies with its process."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock (the project directory must exist: see
        :meth:`LabRunner.make_project_dir`).

        :raises LabLockedError: another process holds it (its pid is in the message).
        :raises OSError: the lock file cannot be written (naming it).
        """
        handle = create_file(self.path, "a+", append=True)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise LabLockedError(
                f"this lab is already running (emu run, pid {holder}); stop it first"
                f" (Ctrl-C in its terminal, or kill {holder})"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as exc:
            with contextlib.suppress(OSError):  # closing flushes again, and fails again
                handle.close()
            raise named(exc, self.path) from exc
        self._file = handle

    def release(self) -> None:
        """Give the lock back."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def holder(cls, directory: Path) -> int | None:
        """The pid of the live ``emu run`` holding the lab's lock, or ``None`` when nobody
        holds it (a run that died leaves its files but not its lock)."""
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with open(fd) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(handle)
                return int(holder) if holder.isdigit() else None
            return None


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read(32).strip() or "?"


class LabRunner:
    """One lab, run once.

    :ivar session: the session holding the lab's nodes.
    :ivar links: the links, in file order.
    :ivar from_state: the snapshot :meth:`start` resumes the nodes from (``None``: boot).
    :ivar restored: the nodes the last :meth:`start` resumed from ``from_state``.
    :ivar started_afresh: the nodes it started afresh although ``from_state`` was given
        (their emulator saves no state: VPCS).
    :ivar started_ok: every node started and every capture runs.
    """

    def __init__(
        self,
        lab: LabSpec,
        lab_file: Path,
        *,
        settings: HostSettings | None = None,
        project_dir: Path | None = None,
        jobs: int | None = None,
        from_state: str | None = None,
        plugins: pluggy.PluginManager | None = None,
    ) -> None:
        """Nothing is read or started yet (see :meth:`build` and :meth:`start`).

        :param plugins: the plugin manager the session uses; by default one is made at
            :meth:`build`, with the plugins ``settings`` blocks left out.
        """
        self.lab = lab
        self._plugins = plugins
        self.from_state = from_state
        self.lab_file = lab_file
        self._chosen_dir = project_dir
        self.project_dir = project_dir or project_dir_for(lab_file, lab)
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self._base_settings = settings or HostSettings()
        self.session: Session | None = None
        self.links: list[Link] = []
        # Nodes whose image says how to reach their shell (see LabImage.open_shell).
        self._shells: dict[str, Callable[[Node], Awaitable[TelnetConsole]]] = {}
        # Nodes whose image says what a restored node needs (LabImage.after_restore).
        self._after_restore: dict[str, Callable[[Node], Awaitable[None]]] = {}
        self.restored: list[str] = []
        self.started_afresh: list[str] = []
        self.started_ok = False

    # -- building ---------------------------------------------------------------------------

    def make_project_dir(self) -> Path:
        """Create the project directory: ``.emu/<name>`` next to the lab file, checked for
        planted links from the lab's directory down (or the directory the host chose).

        :raises UnsafePathError: a component is a symbolic link or not a directory.
        :raises OSError: it cannot be created (read-only file system...), naming it.
        """
        if self._chosen_dir is not None:
            return private_dir(self._chosen_dir)
        return private_dir(self.lab_file.absolute().parent, ".emu", self.lab.name)

    def build(self) -> Session:
        """Validate every node against its emulator and create the session (nothing runs).

        A node with ``image = NAME`` is described by the plugin that provides that image
        (``emu_lab_image``).
        """
        plugins = (
            self._plugins
            if self._plugins is not None
            else make_plugin_manager(blocked=self._base_settings.blocked_plugins)
        )
        tables, settings, problems = self._resolve_images(plugins)
        project = Project.for_directory(self.project_dir, self.lab.name)
        self.session = Session(project, settings=settings, plugins=plugins)
        for name, table in tables.items():
            try:
                self.session.add_node({**table, "name": name})
            except ConfigError as exc:
                problems += [p.replace("$", f"$.nodes.{name}", 1) for p in exc.problems]
            except EmuError as exc:
                problems.append(f"$.nodes.{name}: {exc}")
        for index, spec in enumerate(self.lab.links):
            for name, adapter in spec.parsed():
                node = self.session.nodes.get(name)
                if node is not None and adapter >= len(node.adapters):
                    problems.append(
                        f"$.links[{index}].endpoints: {name}:{adapter} does not exist"
                        f" ({name} has {len(node.adapters)} adapters)"
                    )
        if problems:
            raise ConfigError(str(self.lab_file), problems)
        return self.session

    def _resolve_images(
        self, plugins: pluggy.PluginManager
    ) -> tuple[dict[str, Mapping[str, Any]], HostSettings, list[str]]:
        """Each node's description, with ``image = NAME`` resolved by its plugin; the host
        settings with the images' directories (and suggested emulator settings) added."""
        settings = self._base_settings
        tables: dict[str, Mapping[str, Any]] = {}
        dirs = list(settings.image_dirs)
        suggested: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for name, table in self.lab.nodes.items():
            image, where = table.get("image"), f"$.nodes.{name}"
            if image is None:
                tables[name] = table
                continue
            try:
                found = plugins.hook.emu_lab_image(
                    image=image, node=name, table=table, settings=settings
                )
            except ConfigError as exc:
                problems += [p.replace("$", where, 1) for p in exc.problems]
                continue
            if found is None:
                problems.append(
                    f"{where}.image: no plugin provides the image {image!r};"
                    " describe the node with its emulator's properties instead"
                )
                continue
            tables[name] = found.description
            dirs += [d for d in found.image_dirs if d not in dirs]
            for kind, values in found.emulator_settings.items():
                suggested.setdefault(kind, {}).update(values)
            if found.open_shell is not None:
                self._shells[name] = found.open_shell
            if found.after_restore is not None:
                self._after_restore[name] = found.after_restore
        emulators = {kind: dict(values) for kind, values in suggested.items()}
        for kind, values in settings.emulators.items():  # the host's own settings win
            emulators[kind] = {**emulators.get(kind, {}), **values}
        return tables, attrs.evolve(settings, image_dirs=tuple(dirs), emulators=emulators), problems

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Wire the links, then start every node (at most ``jobs`` at once), then captures.

        Links are made while the nodes are stopped, so every emulator starts already
        connected. With ``from_state``, every node that can resumes from that snapshot
        (checked for all before any starts), the others start afresh with an ``info``
        event saying so, and the images' ``after_restore`` run (the tiny guest's clock).
        Any failure stops what was started before it is raised.

        :raises ConfigError: a node that can save states has no state called ``from_state``.
        """
        session = self.session or self.build()
        resuming: list[str] = []
        if self.from_state is not None:
            resuming, self.started_afresh = await lab_snapshots.restore_plan(
                session, self.from_state, str(self.lab_file)
            )
        for spec in self.lab.links:
            (a, a_adapter), (b, b_adapter) = spec.parsed()
            self.links.append(await session.link(a, a_adapter, b, b_adapter, spec.filters))
        limit = asyncio.Semaphore(self.jobs)

        async def start_one(node: Node) -> None:
            async with limit:
                await node.start(state=self.from_state if node.name in resuming else None)

        # Nodes started afresh first: they boot, where the others only load a state.
        nodes = sorted(session.nodes.values(), key=lambda node: node.name in resuming)
        await all_ended(start_one(node) for node in nodes)
        self.restored = resuming
        await all_ended(
            self._after_restore[name](session.node(name))
            for name in resuming
            if name in self._after_restore
        )
        for index, capture in enumerate(self.lab.captures):
            await self._start_capture(index, capture.endpoint, capture.file)
        self.started_ok = True

    async def _start_capture(self, index: int, endpoint: str, file: str) -> None:
        node_name, adapter = parse_endpoint(endpoint)
        path = self.capture_path(endpoint, file)
        self._prepare_capture_file(path, f"$.captures[{index}].file")
        for link in self.links:
            for side in SIDES:
                end = link.end(side)
                if end.node.name == node_name and end.adapter == adapter:
                    await link.start_capture(path, side)
                    return
        assert self.session is not None
        await self.session.node(node_name).start_capture(adapter, path)

    def capture_path(self, endpoint: str, file: str) -> Path:
        """Where the capture of ``endpoint`` goes: ``file`` (validated as a relative path
        inside the lab's directory) or ``captures/<node>-<adapter>.pcap``."""
        node, adapter = parse_endpoint(endpoint)
        relative = Path(file) if file else Path("captures") / f"{node}-{adapter}.pcap"
        return self.lab_file.absolute().parent / relative

    def _prepare_capture_file(self, path: Path, field: str) -> None:
        """Refuse to replace anything but an earlier capture; never follow a planted link."""
        lab_dir = self.lab_file.absolute().parent
        try:
            private_dir(lab_dir, *path.relative_to(lab_dir).parent.parts)
            if check_regular(path, f"{self.lab_file}: {field}:") and not _is_capture(path):
                raise ConfigError(
                    str(self.lab_file),
                    [f"{field}: {path} exists and is not a pcap capture; emu never replaces it"],
                )
            prepare_for_child(path)
        except UnsafePathError as exc:
            raise ConfigError(str(self.lab_file), [f"{field}: {exc}"]) from None

    async def check(
        self,
        checks: Sequence[CheckSpec],
        on_check: Callable[[int, CheckSpec], None] | None = None,
    ) -> list[CheckOutcome]:
        """Run each check on its node's console, in order.

        :param on_check: called with the index and the check as each one begins (progress).
        """
        assert self.session is not None
        outcomes = []
        for index, spec in enumerate(checks):
            if on_check is not None:
                on_check(index, spec)
            node = self.session.node(spec.node)
            try:
                output = await self._run_on_console(node, spec)
                passed = re.search(spec.expect, output) is not None
            except EmuError as exc:
                output, passed = str(exc), False
            outcomes.append(CheckOutcome(spec.node, spec.command, spec.expect, passed, output))
        return outcomes

    def check_captures(self) -> list[CheckOutcome]:
        """An outcome per capture marked ``expect_icmp``: it holds an echo request and reply."""
        outcomes = []
        for capture in self.lab.captures:
            if not capture.expect_icmp:
                continue
            summary = self._capture_summary(capture.endpoint, capture.file)
            passed = summary.get("icmp_requests", 0) > 0 and summary.get("icmp_replies", 0) > 0
            node = parse_endpoint(capture.endpoint)[0]
            what = f"capture {capture.endpoint}"
            outcomes.append(
                CheckOutcome(node, what, "ICMP echo request and reply", passed, str(summary))
            )
        return outcomes

    async def _run_on_console(self, node: Node, spec: CheckSpec) -> str:
        open_shell = self._shells.get(node.name)
        if open_shell is not None:
            console = await open_shell(node)
            try:
                _, output = await console.run(spec.command, timeout=spec.timeout)
                return output
            finally:
                await console.close()
        if node.console is None:
            raise EmuError(f"node {node.name!r} has no console to run {spec.command!r} on")
        async with await TelnetConsole.connect(
            node.console.host, node.console.port, name=node.name
        ) as console:
            await console.sendline()
            await console.expect(r"[>#$] *$|[>#$] *\r?\n", timeout=spec.timeout)
            start = len(console.transcript)
            await console.sendline(spec.command)
            with contextlib.suppress(EmuError):
                await console.expect(spec.expect, timeout=spec.timeout)
            return console.transcript[start:]

    async def shells_ready(self) -> None:
        """Wait until every node whose image says how to reach its shell (``open_shell``)
        answers there: the guests booted (or resumed)."""
        assert self.session is not None
        session = self.session

        async def one(name: str, open_shell: Callable[[Node], Awaitable[TelnetConsole]]) -> None:
            console = await open_shell(session.node(name))
            await console.close()

        await asyncio.gather(*(one(name, shell) for name, shell in self._shells.items()))

    async def save(self, name: str) -> list[str]:
        """Save the running lab as the snapshot ``name`` (see :mod:`emucore.snapshots`):
        every node that can, paused together, then running again.

        :return: the nodes whose emulator saves no state (a restore starts them afresh).
        :raises ConfigError: ``name`` is not a state name.
        """
        assert self.session is not None
        return await lab_snapshots.save(self.session, name)

    async def snapshots(self) -> tuple[list[lab_snapshots.LabSnapshot], list[str]]:
        """The lab's snapshots, and the nodes whose emulator saves no state (builds the
        session if needed; nothing starts)."""
        session = self.session or self.build()
        return await lab_snapshots.snapshots(session)

    async def delete_snapshot(self, name: str) -> int:
        """Delete the snapshot ``name`` from every node (stopped) holding it.

        :return: the bytes given back to the file system.
        :raises ConfigError: there is no such snapshot.
        """
        session = self.session or self.build()
        return await lab_snapshots.delete(session, name, str(self.lab_file))

    async def stop(self, clean: bool = False) -> None:
        """Stop and close every node, remove the links; with ``clean``, delete node files."""
        if self.session is not None:
            await self.session.close()
        if clean:
            import shutil

            shutil.rmtree(self.project_dir / "project-files", ignore_errors=True)

    # -- reporting --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The lab's state for ``--json`` and ``state.json``: nodes, links, captures."""
        nodes = []
        if self.session is not None:
            for node in self.session.nodes.values():
                console = node.console
                nodes.append(
                    {
                        "name": node.name,
                        "emulator": node.emulator,
                        "status": node.status.value,
                        "console": None
                        if console is None
                        else {"type": console.type, "host": console.host, "port": console.port},
                        "directory": str(node.directory),
                        "from_state": self.from_state if node.name in self.restored else None,
                    }
                )
        links = [
            {
                "endpoints": [str(link.a), str(link.b)],
                "relay": link.relay is not None,
                "filters": attrs.asdict(link.filters),
            }
            for link in self.links
        ]
        captures = [self._capture_summary(c.endpoint, c.file) for c in self.lab.captures]
        return {
            "lab": self.lab.name,
            "pid": os.getpid(),
            "nodes": nodes,
            "links": links,
            "captures": captures,
        }

    def _capture_summary(self, endpoint: str, file: str) -> dict[str, Any]:
        path = self.capture_path(endpoint, file)
        summary: dict[str, Any] = {"endpoint": endpoint, "file": str(path)}
        with contextlib.suppress(OSError, ValueError):
            frames = read_frames(path)
            requests, replies = icmp_echoes(frames)
            summary |= {"frames": len(frames), "icmp_requests": requests, "icmp_replies": replies}
        return summary

    def write_state(self) -> Path:
        """Write ``state.json`` in the project directory (``emu console`` reads it).

        :raises OSError: naming the file (read-only directory, full disk).
        """
        path = self.project_dir / STATE_NAME
        write_atomic(path, json.dumps(self.state(), indent=1))
        return path

    def remove_state(self) -> None:
        """Remove ``state.json`` (the lab no longer runs)."""
        (self.project_dir / STATE_NAME).unlink(missing_ok=True)


_PCAP_MAGICS = (
    b"\xa1\xb2\xc3\xd4",
    b"\xd4\xc3\xb2\xa1",
    b"\xa1\xb2\x3c\x4d",
    b"\x4d\x3c\xb2\xa1",
    b"\x0a\x0d\x0d\x0a",  # pcapng
)


def _is_capture(path: Path) -> bool:
    """Whether ``path`` is empty or starts like a pcap or pcapng file."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head == b"" or head in _PCAP_MAGICS
