"""``emu run LAB.toml --controller URL``: a lab file run on a GNS3 controller's computes.

The lab is read, its images resolved and every node validated here exactly as for a local run
(:meth:`LabRunner.build <emucore.runner.LabRunner.build>`: bad input is refused before the
controller hears of it); then, through the controller's REST API:

1. a project ``emu-<lab>-<random>`` is created with ``auto_close``, and its notification
   WebSocket is held open for the whole run: if ``emu run`` dies, the controller closes the
   project a few seconds later and the computes stop its nodes;
2. each node is placed on a compute: the one its table names (``compute = "name"``, a name
   or id of a compute registered with the controller), else the compute with the fewest of
   the lab's nodes so far (ties: by name), among those the controller can connect;
3. image files the nodes name (kernel, initrd, disks: the properties marked as images) that
   exist on this host are uploaded to the controller, once per content (its MD5): the
   controller uploads them on to a compute that lacks them;
4. nodes are created, links made with their filters (GNS3's names, see
   :mod:`emu_gns3.filters`), nodes started (``--jobs`` at once), each counted as started
   when the controller says so, and captures started on the links, their pcap streams
   written to the same files as a local run's;
5. checks run on the nodes' telnet consoles, reached at the console host and port the
   controller reports, as a local run reaches its own;
6. at the end the captures stop (their streams end with the last frame) and the project is
   deleted, which stops every node on every compute.

The local session's nodes never start: they hold the validated descriptions, and their
``console`` is set to the remote console so that the checks (and an image's ``open_shell``)
find it. Status changes come from the controller's notifications and go to the session's
event bus, so ``emu run``'s progress display, ``--json``, ``state.json`` (hence
``emu console``) and exit codes work as for a local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from emu_gns3 import filters as gns3_filters
from emu_gns3.controller import Controller, ControllerAccess, ControllerError
from emucore.convert import default_converter, structure
from emucore.digests import md5
from emucore.errors import ConfigError, EmuError, NodeError
from emucore.files import create_file
from emucore.lab import CheckSpec, LabSpec, parse_endpoint
from emucore.models import ConsoleInfo, HostSettings, NodeEvent, NodeStatus
from emucore.node import Node
from emucore.runner import CheckOutcome, LabRunner
from emucore.session import Session
from emucore.validators import printable

PLACEMENT_KEY = "compute"
# How long a started node may take to be reported started by the controller.
STATUS_TIMEOUT = 120.0
# How long the end of a capture stream may take once the capture stopped.
STREAM_END_TIMEOUT = 30.0
_STATUSES = {status.value: status for status in NodeStatus}


@attrs.define
class RemoteNode:
    """A lab node as the controller knows it.

    :ivar node_id: the controller's id.
    :ivar compute: the name of the compute it runs on.
    :ivar answer: the controller's latest node JSON.
    """

    node_id: str
    compute: str
    answer: dict[str, Any] = attrs.Factory(dict)

    @property
    def status(self) -> str:
        """``started``, ``stopped`` or ``suspended``."""
        return str(self.answer.get("status", "stopped"))

    @property
    def node_status(self) -> NodeStatus:
        """:attr:`status` as emu's."""
        return _STATUSES.get(self.status, NodeStatus.STOPPED)


@attrs.frozen
class Placement:
    """What a lab node's table may say about where it runs (read, then removed).

    :ivar compute: the name or id of a compute registered with the controller.
    """

    compute: str = attrs.field(validator=printable(200))


def split_placement(lab: LabSpec) -> tuple[LabSpec, dict[str, str], list[str]]:
    """The lab without ``compute`` keys, the compute asked for each node, and the problems.

    :return: ``(lab, {node: compute}, problems)``.
    """
    wanted: dict[str, str] = {}
    problems: list[str] = []
    tables: dict[str, Mapping[str, Any]] = {}
    for name, table in lab.nodes.items():
        if PLACEMENT_KEY in table:
            try:
                placement = structure({PLACEMENT_KEY: table[PLACEMENT_KEY]}, Placement, name)
                wanted[name] = placement.compute
            except ConfigError as exc:
                problems += [p.replace("$", f"$.nodes.{name}", 1) for p in exc.problems]
            table = {k: v for k, v in table.items() if k != PLACEMENT_KEY}
        tables[name] = table
    return attrs.evolve(lab, nodes=tables), wanted, problems


def place(
    nodes: Sequence[str],
    wanted: Mapping[str, str],
    computes: Sequence[Mapping[str, Any]],
    unreachable: Mapping[str, str],
) -> tuple[dict[str, Mapping[str, Any]], list[str], list[str]]:
    """Choose a compute for each node.

    :param nodes: the lab's nodes, in lab order.
    :param wanted: the compute a node's table names (by name or id).
    :param computes: the controller's computes (``GET /v3/computes``).
    :param unreachable: why the controller could not connect a compute, by compute id.
    :return: ``({node: compute}, bad_input, unavailable)``: problems with the lab file, and
        computes that exist but cannot take a node now.
    """
    by_key = {str(c.get("name")): c for c in computes} | {str(c["compute_id"]): c for c in computes}
    states = (f"{c.get('name')} ({_state(c, unreachable)})" for c in computes)
    known = ", ".join(sorted(states)) or "none"
    usable = [c for c in computes if str(c["compute_id"]) not in unreachable]
    chosen: dict[str, Mapping[str, Any]] = {}
    bad: list[str] = []
    unavailable: list[str] = []
    for name, key in wanted.items():
        compute = by_key.get(key)
        if compute is None:
            bad.append(
                f"$.nodes.{name}.{PLACEMENT_KEY}: the controller has no compute {key!r}"
                f" (computes: {known})"
            )
        elif problem := unreachable.get(str(compute["compute_id"])):
            unavailable.append(f"node {name!r}: compute {key!r} is unreachable: {problem}")
        else:
            chosen[name] = compute
    for name in nodes:
        if name in wanted:
            continue
        if not usable:
            unavailable.append(f"node {name!r}: no compute to run it on (computes: {known})")
            continue
        chosen[name] = min(usable, key=_least_loaded(chosen.values()))
    return chosen, bad, unavailable


def _least_loaded(chosen: Iterable[Mapping[str, Any]]) -> Callable[[Mapping[str, Any]], Any]:
    """A sort key: the compute with the fewest nodes chosen so far, then by name."""
    counts = Counter(str(c["compute_id"]) for c in chosen)
    return lambda compute: (counts[str(compute["compute_id"])], str(compute.get("name")))


def _state(compute: Mapping[str, Any], unreachable: Mapping[str, str]) -> str:
    return "unreachable" if str(compute["compute_id"]) in unreachable else "connected"


def link_problems(lab: LabSpec) -> list[str]:
    """What a GNS3 link cannot carry: rate limits, one-way filters, fractional percentages;
    captures on adapters without a link (the controller captures links)."""
    problems = []
    for index, link in enumerate(lab.links):
        where = f"$.links[{index}].filters"
        filters = link.filters
        if filters.rate:
            problems.append(f"{where}.rate: GNS3 links have no rate limit; run the lab locally")
        if filters.direction != "both":
            problems.append(f"{where}.direction: GNS3 filters act in both directions")
        for field in ("loss", "corruption"):
            value = getattr(filters, field)
            if value != int(value):
                problems.append(f"{where}.{field}: GNS3 takes whole percents, got {value}")
    linked = {endpoint for link in lab.links for endpoint in link.parsed()}
    for index, capture in enumerate(lab.captures):
        if parse_endpoint(capture.endpoint) not in linked:
            problems.append(
                f"$.captures[{index}].endpoint: {capture.endpoint} has no link; a GNS3"
                " controller captures links only"
            )
    return problems


class ControllerLabRunner(LabRunner):
    """One lab, run once on a GNS3 controller's computes.

    :ivar access: the controller and the user to log in as.
    :ivar project_id: the controller's project, once created.
    :ivar remote: the lab's nodes as the controller knows them, by name.
    """

    def __init__(
        self,
        lab: LabSpec,
        lab_file: Path,
        *,
        access: ControllerAccess,
        settings: HostSettings | None = None,
        project_dir: Path | None = None,
        jobs: int | None = None,
    ) -> None:
        local, self._wanted, self._problems = split_placement(lab)
        super().__init__(local, lab_file, settings=settings, project_dir=project_dir, jobs=jobs)
        self.access = access
        self.project_id: str | None = None
        self.remote: dict[str, RemoteNode] = {}
        self._controller: Controller | None = None
        self._links: list[str] = []
        self._changed = asyncio.Condition()
        self._watcher: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._captures: dict[str, asyncio.Task[None]] = {}
        self._images: dict[Path, str] | None = None
        self._image_names: dict[str, str] = {}
        # Nodes whose start the runner is doing: it publishes their statuses itself.
        self._starting: set[str] = set()
        self._names: dict[str, str] = {}  # node id -> name, for the notifications

    # -- building ---------------------------------------------------------------------------

    def build(self) -> Session:
        """Validate the lab as for a local run, plus what a GNS3 controller cannot do."""
        problems = list(self._problems)
        try:
            session = super().build()
        except ConfigError as exc:
            problems = [*problems, *exc.problems]
            session = None
        problems += link_problems(self.lab)
        if problems or session is None:
            raise ConfigError(str(self.lab_file), problems)
        return session

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the project, place and create the nodes, link, start, capture."""
        session = self.session or self.build()
        controller = self._controller = await Controller.connect(self.access)
        computes = await controller.call("GET", "/computes")
        unreachable = await _connect(controller, computes)
        placement, bad, unavailable = place(
            list(session.nodes), self._wanted, computes, unreachable
        )
        if bad:
            raise ConfigError(str(self.lab_file), bad)
        if unavailable:
            raise EmuError("; ".join(unavailable))
        name = f"emu-{self.lab.name}-{secrets.token_hex(3)}"
        project = await controller.call("POST", "/projects", {"name": name, "auto_close": True})
        self.project_id = str(project["project_id"])
        self._ws = await controller.notifications(self.project_id)
        self._watcher = asyncio.create_task(self._watch(self._ws))
        for node_name, node in session.nodes.items():
            compute = placement[node_name]
            body = {
                "name": node_name,
                "node_type": node.emulator,
                "compute_id": compute["compute_id"],
                "properties": await self._properties(node),
            }
            answer = await self._call(node_name, "POST", self._path("nodes"), body)
            remote = RemoteNode(str(answer["node_id"]), str(compute.get("name")), answer)
            self.remote[node_name] = remote
            self._names[remote.node_id] = node_name
        for spec in self.lab.links:
            ends = [
                {"node_id": self.remote[n].node_id, "adapter_number": a, "port_number": 0}
                for n, a in spec.parsed()
            ]
            link: dict[str, Any] = {"nodes": ends}
            if filters := gns3_filters.describe(spec.filters):
                link["filters"] = filters
            where = f"link {spec.endpoints[0]} - {spec.endpoints[1]}"
            self._links.append(
                str((await self._call(where, "POST", self._path("links"), link))["link_id"])
            )
        limit = asyncio.Semaphore(self.jobs)

        async def start_one(node: Node) -> None:
            async with limit:
                await self._start_node(node)

        results = await asyncio.gather(
            *(start_one(node) for node in session.nodes.values()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        for index, capture in enumerate(self.lab.captures):
            await self._start_capture_stream(index, capture.endpoint, capture.file)
        self.started_ok = True

    def _path(self, *parts: str) -> str:
        return "/".join(["", "projects", str(self.project_id), *parts])

    async def _call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        assert self._controller is not None
        try:
            return await self._controller.call(method, path, body)
        except ControllerError as exc:
            raise ControllerError(f"{what}: the controller refused: {exc}", exc.status) from None

    async def _properties(self, node: Node) -> dict[str, Any]:
        """The node's validated properties as GNS3 takes them; image files this host has are
        uploaded to the controller and named by the name they have there."""
        properties = default_converter().unstructure(node.properties)
        answer = {k: v for k, v in properties.items() if v not in ("", None)}
        for field in attrs.fields(type(node.properties)):
            value = answer.get(field.name)
            if "image" not in field.metadata or not isinstance(value, str):
                continue
            local = self._local_image(value)
            if local is not None:
                answer[field.name] = await self._upload(local)
        return answer

    def _local_image(self, value: str) -> Path | None:
        candidates = [Path(value)] if Path(value).is_absolute() else []
        assert self.session is not None
        candidates += [Path(d) / value for d in self.session.settings.image_dirs]
        return next((c for c in candidates if c.is_file()), None)

    async def _upload(self, path: Path) -> str:
        """The controller's name for the image file ``path``, uploading it if it lacks it."""
        assert self._controller is not None
        if self._images is None:
            listing = await self._controller.call("GET", "/images")
            self._images = {}
            self._image_names = {str(i["checksum"]): str(i["filename"]) for i in listing}
        if path in self._images:
            return self._images[path]
        checksum = await md5(path)  # as the controller lists its images by; read once
        name = self._image_names.get(checksum)
        if name is None:
            name = path.name
            if name in self._image_names.values():  # another content by that name
                name = f"{path.stem}-{checksum[:8]}{path.suffix}"
            answer = await self._controller.upload(f"/images/upload/{name}", path)
            name = str(answer.get("filename", name)) if isinstance(answer, dict) else name
            self._image_names[checksum] = name
        self._images[path] = name
        return name

    async def _start_node(self, node: Node) -> None:
        remote = self.remote[node.name]
        self._starting.add(node.name)
        self._publish(node.name, NodeStatus.STARTING, f"starting on {remote.compute}")
        try:
            await self._call(
                f"node {node.name!r}", "POST", self._path("nodes", remote.node_id, "start"), {}
            )
            await self._wait_for(node.name, "started")
        except BaseException as exc:
            self._publish(node.name, NodeStatus.STOPPED, "start failed")
            if isinstance(exc, ControllerError):
                raise NodeError(node.name, str(exc)) from None
            raise
        finally:
            self._starting.discard(node.name)
        self._mirror_console(node)
        self._publish(node.name, NodeStatus.STARTED, f"started on {remote.compute}")

    async def _wait_for(self, name: str, status: str) -> None:
        """Until the controller reports the node in ``status`` (it learns it from the
        compute's notification, which may come after the request's answer)."""
        remote = self.remote[name]
        try:
            async with asyncio.timeout(STATUS_TIMEOUT), self._changed:
                await self._changed.wait_for(lambda: remote.status == status)
        except TimeoutError:
            remote.answer = await self._call(
                f"node {name!r}", "GET", self._path("nodes", remote.node_id)
            )
            if remote.status != status:
                raise NodeError(
                    name, f"the controller still says {remote.status}, not {status}"
                ) from None

    def _mirror_console(self, node: Node) -> None:
        """Point the local node's console at the remote one (for checks, ``emu console``)."""
        answer = self.remote[node.name].answer
        kind, port = answer.get("console_type"), answer.get("console")
        if isinstance(kind, str) and isinstance(port, int) and kind != "none":
            node.console = ConsoleInfo(kind, str(answer.get("console_host")), port)

    def _publish(self, name: str, status: NodeStatus, message: str) -> None:
        assert self.session is not None
        self.session.events.publish(NodeEvent(name, "status", message, status))

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Follow the project's notifications: node statuses and the computes' messages."""
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                notification = json.loads(message.data)
                action, event = notification["action"], notification["event"]
                if action == "node.updated":
                    # None for a node not yet created here: its creation's answer has it.
                    name = self._names.get(str(event.get("node_id")))
                    if name is not None:
                        self._node_updated(name, event)
                        async with self._changed:
                            self._changed.notify_all()
                elif action in ("log.warning", "log.error"):
                    self._log(action.partition(".")[2], str(event.get("message", "")))

    def _node_updated(self, name: str, event: dict[str, Any]) -> None:
        """Take the controller's node JSON; publish a status change made elsewhere (the GUI,
        a compute stopping), not one of the runner's own starts."""
        remote = self.remote[name]
        before = remote.node_status
        remote.answer = event
        after = remote.node_status
        if after == before or name in self._starting:
            return
        if after == NodeStatus.STARTED:
            assert self.session is not None
            self._mirror_console(self.session.nodes[name])
            verb = "resumed" if before == NodeStatus.SUSPENDED else "started"
            self._publish(name, after, f"{verb} on {remote.compute}")
        else:
            self._publish(name, after, f"{after.value} on {remote.compute}")

    def _log(self, kind: str, message: str) -> None:
        """A compute's warning or error: about a lab node when it starts with its name."""
        assert self.session is not None
        node, _, text = message.partition(": ")
        if node in self.remote and text:
            status = self.remote[node].node_status
            self.session.events.publish(NodeEvent(node, kind, text, status))
        else:
            about = NodeEvent("controller", kind, message, NodeStatus.STARTED, host_wide=True)
            self.session.events.publish(about)

    # -- captures ---------------------------------------------------------------------------

    def _link_of(self, endpoint: str) -> str:
        wanted = parse_endpoint(endpoint)
        for spec, link_id in zip(self.lab.links, self._links, strict=True):
            if wanted in spec.parsed():
                return link_id
        raise AssertionError(f"{endpoint}: no link (refused by build)")

    async def _start_capture_stream(self, index: int, endpoint: str, file: str) -> None:
        """Capture the endpoint's link on the controller and write its stream to the file a
        local run would write."""
        assert self._controller is not None
        path = self.capture_path(endpoint, file)
        self._prepare_capture_file(path, f"$.captures[{index}].file")
        link_id = self._link_of(endpoint)
        await self._call(
            f"capture {endpoint}",
            "POST",
            self._path("links", link_id, "capture", "start"),
            {"data_link_type": "DLT_EN10MB"},
        )
        chunks = self._controller.stream(self._path("links", link_id, "capture", "stream"))
        self._captures[link_id] = asyncio.create_task(_write(chunks, path))

    async def _stop_captures(self) -> None:
        """Stop every capture and wait until its stream ended: the files are then complete."""
        for link_id, task in list(self._captures.items()):
            with contextlib.suppress(EmuError):
                await self._call("capture", "POST", self._path("links", link_id, "capture", "stop"))
            with contextlib.suppress(TimeoutError, EmuError, OSError):
                await asyncio.wait_for(asyncio.shield(task), STREAM_END_TIMEOUT)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EmuError, OSError):
                await task
        self._captures.clear()

    async def check(
        self,
        checks: Sequence[CheckSpec],
        on_check: Callable[[int, CheckSpec], None] | None = None,
    ) -> list[CheckOutcome]:
        """Run the checks on the remote consoles, then stop the captures so that their files
        hold everything up to now (the run ends after its checks)."""
        outcomes = await super().check(checks, on_check)
        await self._stop_captures()
        return outcomes

    # -- the end ----------------------------------------------------------------------------

    async def stop(self, clean: bool = False) -> None:
        """Stop the captures, delete the project (its nodes stop on every compute), log out."""
        try:
            if self._controller is not None:
                await self._stop_captures()
                if self.project_id is not None:
                    try:
                        await self._controller.call("DELETE", self._path())
                    except EmuError as exc:
                        print(
                            f"emu: warning: project {self.project_id} could not be deleted on"
                            f" {self.access.url}: {exc}",
                            file=sys.stderr,
                        )
                    for name in self.remote:
                        self._publish(name, NodeStatus.STOPPED, "project deleted")
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._watcher
            if self._ws is not None:
                await self._ws.close()
            if self._controller is not None:
                await self._controller.close()
            await super().stop(clean=False)  # the local nodes never ran

    # -- reporting --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The lab's state as for a local run, from the controller's view of the nodes, plus
        the controller, the project and each node's compute."""
        state = super().state()
        for entry in state["nodes"]:
            remote = self.remote.get(entry["name"])
            if remote is None:
                continue
            answer = remote.answer
            entry["status"] = remote.status
            entry["compute"] = remote.compute
            entry["directory"] = answer.get("node_directory")
            port, host = answer.get("console"), answer.get("console_host")
            kind = answer.get("console_type")
            running = remote.status in ("started", "suspended")
            entry["console"] = (
                {"type": kind, "host": host, "port": port}
                if running and isinstance(port, int) and kind not in (None, "none")
                else None
            )
        state["links"] = [
            {
                "endpoints": [f"{n}:{a}" for n, a in spec.parsed()],
                "relay": spec.filters.active,  # the compute puts a relay where filters are
                "filters": attrs.asdict(spec.filters),
            }
            for spec in self.lab.links
        ]
        state["controller"] = {"url": self.access.url, "project_id": self.project_id}
        return state


async def _connect(controller: Controller, computes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Have the controller connect every compute (a no-op for one that is connected); why
    it could not, by compute id."""

    async def connect(compute_id: str) -> str:
        try:
            await controller.call("POST", f"/computes/{compute_id}/connect")
        except ControllerError as exc:
            return str(exc)
        return ""

    ids = [str(c["compute_id"]) for c in computes]
    problems = await asyncio.gather(*(connect(i) for i in ids))
    return {i: problem for i, problem in zip(ids, problems, strict=True) if problem}


async def _write(chunks: Any, path: Path) -> None:
    """Write a pcap stream to ``path`` as it comes (never through a planted link)."""
    with create_file(path, "wb", buffering=0) as out:
        async for chunk in chunks:
            out.write(chunk)
