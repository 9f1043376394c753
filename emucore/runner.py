"""Run a lab: create its nodes, wire its links, start everything, capture, check, stop.

This is the engine behind ``emu run``; the CLI only parses arguments and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from emucore.errors import ConfigError, EmuError
from emucore.lab import TINY, CheckSpec, LabSpec, parse_endpoint, tiny_guest_node
from emucore.links import Link
from emucore.models import HostSettings, Project
from emucore.node import Node
from emucore.pcap import icmp_echoes, read_frames
from emucore.relay import SIDES
from emucore.session import Session
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
        """Take the lock.

        :raises LabLockedError: another process holds it (its pid is in the message).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise LabLockedError(
                f"this lab is already running (emu run, pid {holder}); stop it first"
                f" (Ctrl-C in its terminal, or kill {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Give the lock back."""
        if self._file is not None:
            self._file.close()
            self._file = None


class LabRunner:
    """One lab, run once.

    :ivar session: the session holding the lab's nodes.
    :ivar links: the links, in file order.
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
    ) -> None:
        self.lab = lab
        self.lab_file = lab_file
        self.project_dir = project_dir or project_dir_for(lab_file, lab)
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self._base_settings = settings or HostSettings()
        self.session: Session | None = None
        self.links: list[Link] = []
        self._tiny_nodes: set[str] = set()
        self.started_ok = False

    # -- building ---------------------------------------------------------------------------

    def build(self) -> Session:
        """Validate every node against its emulator and create the session (nothing runs)."""
        settings = self._base_settings
        tables = dict(self.lab.nodes)
        if any(table.get("image") == TINY for table in tables.values()):
            tables, settings = self._with_tiny_guest(tables, settings)
        self.session = Session(
            Project.for_directory(self.project_dir, self.lab.name), settings=settings
        )
        problems: list[str] = []
        for name, table in tables.items():
            if "image" in table and table.get("image") != TINY:
                problems.append(
                    f"$.nodes.{name}.image: only {TINY!r} is built in;"
                    " use the emulator's image properties"
                )
                continue
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

    def _with_tiny_guest(
        self, tables: dict[str, Mapping[str, Any]], settings: HostSettings
    ) -> tuple[dict[str, Mapping[str, Any]], HostSettings]:
        from emu_tests.guest import build_tiny_guest

        guest = build_tiny_guest()
        result: dict[str, Mapping[str, Any]] = {}
        for name, table in tables.items():
            if table.get("image") != TINY:
                result[name] = table
                continue
            self._tiny_nodes.add(name)
            problems = _tiny_addresses(table, f"$.nodes.{name}")
            if problems:
                raise ConfigError(str(self.lab_file), problems)
            ips = table.get("ips", {})
            try:
                command_line = guest.kernel_command_line(
                    ip=table.get("ip"), gateway=table.get("gateway"), hostname=name, extra_ips=ips
                )
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(self.lab_file), [f"$.nodes.{name}: {exc}"]) from None
            result[name] = tiny_guest_node(table, guest.kernel, guest.initrd, command_line)
        dirs = (*settings.image_dirs, guest.kernel.parent, guest.initrd.parent)
        return result, attrs.evolve(settings, image_dirs=dirs)

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Wire the links, then start every node (at most ``jobs`` at once), then captures.

        Links are made while the nodes are stopped, so every emulator starts already
        connected. Any failure stops what was started before it is raised.
        """
        session = self.session or self.build()
        for spec in self.lab.links:
            (a, a_adapter), (b, b_adapter) = spec.parsed()
            self.links.append(await session.link(a, a_adapter, b, b_adapter, spec.filters))
        limit = asyncio.Semaphore(self.jobs)

        async def start_one(node: Node) -> None:
            async with limit:
                await node.start()

        results = await asyncio.gather(
            *(start_one(node) for node in session.nodes.values()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        for capture in self.lab.captures:
            await self._start_capture(capture.endpoint, capture.file)
        self.started_ok = True

    async def _start_capture(self, endpoint: str, file: str) -> None:
        node_name, adapter = parse_endpoint(endpoint)
        path = self.capture_path(endpoint, file)
        for link in self.links:
            for side in SIDES:
                end = link.end(side)
                if end.node.name == node_name and end.adapter == adapter:
                    await link.start_capture(path, side)
                    return
        assert self.session is not None
        await self.session.node(node_name).start_capture(adapter, path)

    def capture_path(self, endpoint: str, file: str) -> Path:
        """Where the capture of ``endpoint`` goes (relative paths are relative to the lab file)."""
        node, adapter = parse_endpoint(endpoint)
        relative = Path(file) if file else Path("captures") / f"{node}-{adapter}.pcap"
        return relative if relative.is_absolute() else self.lab_file.absolute().parent / relative

    async def check(self, checks: Sequence[CheckSpec]) -> list[CheckOutcome]:
        """Run each check on its node's console, in order."""
        assert self.session is not None
        outcomes = []
        for spec in checks:
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
        if node.name in self._tiny_nodes:
            from emu_tests.console import open_guest_console

            console = await open_guest_console(node)
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
        """Write ``state.json`` in the project directory (``emu console`` reads it)."""
        path = self.project_dir / STATE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.state(), indent=1))
        temporary.replace(path)
        return path

    def remove_state(self) -> None:
        """Remove ``state.json`` (the lab no longer runs)."""
        (self.project_dir / STATE_NAME).unlink(missing_ok=True)


def _tiny_addresses(table: Mapping[str, Any], path: str) -> list[str]:
    """Check a tiny-guest node's ``ip``, ``ips`` and ``gateway`` on the host (the guest would
    only complain on its console)."""
    ips = table.get("ips", {})
    if not isinstance(ips, Mapping):
        return [f'{path}.ips: must be a table of interface = "address/prefix"']
    addresses = {"ip": table.get("ip")} | {f"ips.{name}": value for name, value in ips.items()}
    problems = [
        f"{path}.{key}: must be address/prefix, e.g. 10.0.0.1/24; got {value!r}"
        for key, value in addresses.items()
        if value is not None and not _interfaces(value)
    ]
    gateway = table.get("gateway")
    if gateway is not None:
        try:
            ipaddress.ip_address(str(gateway))
        except ValueError:
            problems.append(f"{path}.gateway: must be an IP address; got {gateway!r}")
    return problems


def _interfaces(value: object) -> bool:
    """Whether ``value`` is comma-separated address/prefix items (``10.0.0.1/24,fd00::1/64``)."""
    if not isinstance(value, str):
        return False
    try:
        return all("/" in item and ipaddress.ip_interface(item) for item in value.split(","))
    except ValueError:
        return False
