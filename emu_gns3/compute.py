"""The compute's state: projects (one emu session each), their nodes, tunnels and captures.

Every operation here translates one GNS3 request into calls of the core's API
(:class:`~emucore.session.Session`, :class:`~emucore.node.Node`,
:class:`~emucore.tunnels.Tunnel`) and keeps what GNS3 has and emu does not: node ids as the
controller's keys, the capture file of each adapter. The HTTP layer (:mod:`emu_gns3.app`)
parses bodies and renders answers around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pluggy

from emu_gns3 import filters as gns3_filters
from emu_gns3 import nodes
from emu_gns3.bodies import CaptureStart, UdpNioBody
from emu_gns3.errors import Conflict, NotFound
from emu_gns3.hostload import check_memory
from emu_gns3.notifications import Notifier
from emucore.claims import Claims
from emucore.convert import default_converter, structure
from emucore.errors import ConfigError, EmuError
from emucore.models import HostSettings, Nio, NodeEvent, NodeStatus, Project, UdpNio
from emucore.node import Node
from emucore.pcap import follow
from emucore.plugins import emulators
from emucore.records import EmulatorInfo
from emucore.session import Session
from emucore.tunnels import Tunnel

log = logging.getLogger("emu.gns3")

# GNS3's node types (its NodeType enum) that an emu emulator of the same name can serve.
GNS3_NODE_TYPES = frozenset(("qemu", "vpcs", "docker", "dynamips", "iou", "virtualbox", "vmware"))
CAPTURES = "captures"


@attrs.define(eq=False)
class NodeEntry:
    """What the front end keeps per node.

    :ivar node: the core's node.
    :ivar captures: the capture file of each captured adapter.
    :ivar info: what the node's plugins last reported beside its properties
        (``Node.info()``: image checksums, the aux console's port), shown in the node JSON.
    :ivar refreshing: the running refresh of ``info``, if any (a newer one cancels it).
    """

    node: Node
    captures: dict[int, Path] = attrs.Factory(dict)
    info: dict[str, Any] = attrs.Factory(dict)
    refreshing: asyncio.Task[None] | None = None

    def public_console(self) -> int | None:
        """The ``console`` port GNS3 shows: the real one while the node runs, else the
        ``console`` property (``None`` when the host picks one at each start)."""
        if self.node.console is not None:
            return self.node.console.port
        port: int | None = getattr(self.node.properties, "console", None)
        return port


class ComputeProject:
    """One GNS3 project on this compute: an emu session and the front end's bookkeeping."""

    def __init__(self, compute: Compute, project: Project) -> None:
        self.compute = compute
        self.id = str(project.id)
        self.session = Session(
            project, settings=compute.settings, plugins=compute.plugins, claims=compute.claims
        )
        self.nodes: dict[str, NodeEntry] = {}
        self.tunnels: dict[tuple[str, int], Tunnel] = {}
        self._refreshing: set[asyncio.Task[None]] = set()
        self._unsubscribe = self.session.events.subscribe(self._on_event)

    @property
    def name(self) -> str:
        """The project's name."""
        return self.session.project.name

    def as_dict(self) -> dict[str, Any]:
        """The project JSON."""
        return {"name": self.name, "project_id": self.id, "variables": None}

    def node(self, node_id: str, kind: str | None = None) -> NodeEntry:
        """The node ``node_id`` (of emulator ``kind``, when given).

        :raises NotFound: there is none.
        """
        entry = self.nodes.get(node_id)
        if entry is None or (kind is not None and entry.node.emulator != kind):
            raise NotFound(
                f"no {kind or ''} node {node_id} in project {self.id}".replace("  ", " ")
            )
        return entry

    def render(self, entry: NodeEntry) -> dict[str, Any]:
        """The node JSON of ``entry``, with what its plugins last reported."""
        return nodes.render(entry.node, self.id, entry.public_console()) | entry.info

    def refresh_info(self, entry: NodeEntry) -> None:
        """Ask the node's plugins again (in the background: a first checksum of a large
        image takes seconds) and send ``node.updated`` when the answer changed. A refresh
        still running is cancelled: its answer, finishing later, would be older."""
        if entry.refreshing is not None:
            entry.refreshing.cancel()
        task = asyncio.get_running_loop().create_task(self._refresh(entry))
        entry.refreshing = task
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, entry: NodeEntry) -> None:
        try:
            info = await entry.node.info()
        except EmuError as exc:
            log.warning("%s: no node info: %s", entry.node.name, exc)
            return
        if info != entry.info and entry.node.name in self.session.nodes:
            entry.info = info
            self.compute.notifier.publish("node.updated", self.render(entry))

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, event: NodeEvent) -> None:
        entry = next((e for e in self.nodes.values() if e.node.name == event.node), None)
        if entry is None:
            return
        if event.kind == "status":
            if entry.node.status not in (NodeStatus.STARTING, NodeStatus.STOPPING):
                # GNS3 has neither: the next event tells the outcome.
                self.compute.notifier.publish("node.updated", self.render(entry))
                self.refresh_info(entry)  # a started node's aux port, say
        else:
            message = f"{event.node}: {event.message}"
            if event.details:
                message += f"\n{event.details}"
            self.compute.notifier.publish(f"log.{event.kind}", {"message": message}, self.id)

    # -- nodes -----------------------------------------------------------------------------

    def add_node(self, kind: str, body: Mapping[str, Any]) -> NodeEntry:
        """Create a node of emulator ``kind`` from a GNS3 node body (``name``, ``node_id``,
        properties); a ``node_id`` the project has already answers with that node.

        :raises NotFound: no loaded emulator serves ``kind``.
        :raises ImageMissingError: an image is not in the image directories.
        :raises ConfigError: a bad property (every one named).
        """
        info = self.compute.emulator(kind)
        node_id = body.get("node_id")
        if isinstance(node_id, str) and node_id in self.nodes:
            return self.node(node_id, kind)  # a controller reopening what it left
        properties, ignored = nodes.split_properties(body, info.properties)
        name = body.get("name")
        where = f"node {name!r}" if isinstance(name, str) else "node"
        nodes.missing_image(info.properties, properties, self.compute.settings)
        description = {"name": name, "node_id": node_id or str(uuid.uuid4()), **properties}
        node = self.session.add_node(description, emulator=kind, where=where)
        entry = NodeEntry(node)
        self.nodes[str(node.config.id)] = entry
        self._warn_ignored(node.name, ignored)
        self.refresh_info(entry)
        return entry

    async def update_node(self, entry: NodeEntry, body: Mapping[str, Any]) -> None:
        """Apply a GNS3 node update; what it replays unchanged changes nothing. On a running
        node the emulator takes what it can change live (a CD-ROM swap...); the core refuses
        the rest (409, naming what can and cannot change live)."""
        node = entry.node
        info = self.compute.emulator(node.emulator)
        properties, ignored = nodes.split_properties(body, info.properties)
        if "console" in properties and properties["console"] == entry.public_console():
            del properties["console"]  # the port it reported, replayed: no change
        for key, value in entry.info.items():  # what the plugins reported (aux), replayed
            if key in properties and properties[key] == value:
                del properties[key]
        current = self.session.node(node.name).properties
        changes = {k: v for k, v in properties.items() if _differs(current, k, v)}
        name = body.get("name", node.name)
        if name != node.name:
            changes["name"] = name
        if changes:
            nodes.missing_image(info.properties, changes, self.compute.settings)
            await self.session.update_node(node.name, changes, where=f"node {node.name!r}")
            self.refresh_info(entry)  # new images, new checksums
        self._warn_ignored(node.name, ignored)

    async def act(self, entry: NodeEntry, action: str) -> None:
        """Start, stop, suspend, resume or reload a node; a start is refused (409) when the
        host lacks the RAM the node asks for (see :func:`~emu_gns3.hostload.check_memory`).
        """
        node = entry.node
        if action == "start" and node.status is NodeStatus.STOPPED:
            check_memory(node)
        await getattr(node, action)()

    def _warn_ignored(self, name: str, ignored: list[str]) -> None:
        if ignored:
            message = f"{name}: ignored what emu does not implement: {', '.join(ignored)}"
            self.compute.notifier.publish("log.warning", {"message": message}, self.id)

    async def delete_node(self, entry: NodeEntry) -> None:
        """Disconnect, stop and forget a node; its files stay until the project is deleted."""
        node_id = str(entry.node.config.id)
        for (owner, adapter), tunnel in list(self.tunnels.items()):
            if owner == node_id:
                del self.tunnels[(owner, adapter)]
                await self.session.untunnel(tunnel)
        await self.session.remove_node(entry.node.name)
        del self.nodes[node_id]
        self.compute.notifier.publish("node.deleted", self.render(entry))

    # -- NIOs ------------------------------------------------------------------------------

    def tunnel(self, entry: NodeEntry, adapter: int, port: int) -> Tunnel:
        """The tunnel on an adapter.

        :raises NotFound: the adapter has none.
        """
        self._check_port(entry, adapter, port)
        tunnel = self.tunnels.get((str(entry.node.config.id), adapter))
        if tunnel is None:
            raise NotFound(f"node {entry.node.name!r}: adapter {adapter} has no NIO")
        return tunnel

    def _check_port(self, entry: NodeEntry, adapter: int, port: int) -> None:
        count = len(entry.node.adapters)
        if port != 0 or not 0 <= adapter < count:
            raise NotFound(
                f"node {entry.node.name!r} has no adapter {adapter} port {port}"
                f" (adapters 0..{count - 1}, each with port 0)"
            )

    async def add_nio(self, entry: NodeEntry, adapter: int, port: int, body: UdpNioBody) -> None:
        """Connect an adapter to a UDP peer, with the link's filters if this end has them."""
        self._check_port(entry, adapter, port)
        impairments, down = gns3_filters.translate(body.filters, "nio")
        nio = _udp_nio(body)
        key = (str(entry.node.config.id), adapter)
        old = self.tunnels.pop(key, None)
        if old is not None:
            await self.session.untunnel(old)
        tunnel = await self.session.tunnel(entry.node, adapter, nio, impairments)
        self.tunnels[key] = tunnel
        if down or body.suspend:
            await tunnel.set_up(False)

    async def update_nio(self, entry: NodeEntry, adapter: int, port: int, body: UdpNioBody) -> None:
        """Change a tunnel's filters and state (suspend, ``frequency_drop [-1]``) live."""
        tunnel = self.tunnel(entry, adapter, port)
        impairments, down = gns3_filters.translate(body.filters, "nio")
        if _udp_nio(body) != tunnel.nio:
            raise Conflict(
                f"node {entry.node.name!r} adapter {adapter}: a NIO's ports cannot change;"
                " delete the NIO and add the new one"
            )
        await tunnel.set_filters(impairments)
        up = not (down or body.suspend)
        if entry.node.adapter(adapter).link_up != up:
            await tunnel.set_up(up)

    async def delete_nio(self, entry: NodeEntry, adapter: int, port: int) -> None:
        """Disconnect an adapter; the guest sees its link go down."""
        tunnel = self.tunnel(entry, adapter, port)
        del self.tunnels[(str(entry.node.config.id), adapter)]
        entry.captures.pop(adapter, None)
        await self.session.untunnel(tunnel)

    # -- captures --------------------------------------------------------------------------

    async def start_capture(
        self, entry: NodeEntry, adapter: int, port: int, body: CaptureStart
    ) -> Path:
        """Capture an adapter's frames to ``<project>/project-files/captures/<name>``."""
        tunnel = self._linked(entry, adapter, port, "capture")
        path = self.session.project.directory / "project-files" / CAPTURES / body.capture_file_name
        await tunnel.start_capture(path)
        entry.captures[adapter] = path
        return path

    async def stop_capture(self, entry: NodeEntry, adapter: int, port: int) -> None:
        """Stop an adapter's capture; the file stays."""
        tunnel = self._linked(entry, adapter, port, "stop a capture")
        await tunnel.stop_capture()
        entry.captures.pop(adapter, None)

    def stream_capture(
        self, entry: NodeEntry, adapter: int, port: int, listening: Callable[[], bool]
    ) -> AsyncIterator[bytes]:
        """The capture's bytes, as written, until it stops or ``listening()`` turns false.

        :raises Conflict: no capture runs on the adapter.
        """
        tunnel = self._linked(entry, adapter, port, "stream a capture")
        path = entry.captures.get(adapter)
        if path is None or not tunnel.capturing:
            raise Conflict(
                f"node {entry.node.name!r} adapter {adapter}: nothing to stream, no capture runs"
            )
        return follow(path, lambda: listening() and tunnel.capturing and adapter in entry.captures)

    def _linked(self, entry: NodeEntry, adapter: int, port: int, action: str) -> Tunnel:
        try:
            return self.tunnel(entry, adapter, port)
        except NotFound:
            self._check_port(entry, adapter, port)
            raise Conflict(
                f"node {entry.node.name!r}: cannot {action} on adapter {adapter}, it has no NIO"
                " (link it first)"
            ) from None

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every node and free every port; the files stay."""
        self._unsubscribe()
        for task in list(self._refreshing):
            task.cancel()
        self.tunnels.clear()
        await self.session.close()


def _differs(current: Any, key: str, value: Any) -> bool:
    """Whether ``value`` (JSON) differs from the property ``key`` of ``current``."""
    return bool(default_converter().unstructure(getattr(current, key)) != value)


def _udp_nio(body: UdpNioBody) -> UdpNio:
    data = {"type": "nio_udp", "lport": body.lport, "rhost": body.rhost, "rport": body.rport}
    try:
        nio: Nio = structure(data, Nio, "nio")  # type: ignore[arg-type]
    except ConfigError as exc:
        names = {"local_port": "lport", "remote_host": "rhost", "remote_port": "rport"}
        problems = list(exc.problems)
        for emu, gns3 in names.items():
            problems = [p.replace(f"$.{emu}:", f"$.{gns3}:") for p in problems]
        raise ConfigError("nio", problems) from None
    assert isinstance(nio, UdpNio)
    return nio


class Compute:
    """Every project this compute serves, the plugins and settings they share, and the
    notification stream.

    :ivar settings: the host settings every session uses.
    :ivar plugins: one plugin manager for every session.
    :ivar projects_dir: where project directories are made.
    :ivar notifier: the notification stream.
    :ivar claims: shared by every project's session: a fixed console port or an image used
        without linked clones belongs to one node of this host at a time.
    """

    def __init__(
        self, settings: HostSettings, plugins: pluggy.PluginManager, projects_dir: Path
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.projects_dir = projects_dir
        self.claims = Claims()
        self.notifier = Notifier()
        self.projects: dict[str, ComputeProject] = {}
        self.emulators = emulators(plugins)

    def node_types(self) -> list[str]:
        """The GNS3 node types served: loaded emulators GNS3 knows by the same name."""
        return sorted(kind for kind in self.emulators if kind in GNS3_NODE_TYPES)

    def emulator(self, kind: str) -> EmulatorInfo:
        """The emulator serving GNS3 node type ``kind``.

        :raises NotFound: none does.
        """
        if kind not in self.node_types():
            served = ", ".join(self.node_types()) or "none"
            raise NotFound(f"this compute has no {kind!r} nodes (it serves: {served})")
        return self.emulators[kind]

    def project(self, project_id: str) -> ComputeProject:
        """The open project ``project_id``.

        :raises NotFound: it is not open here.
        """
        try:
            return self.projects[project_id]
        except KeyError:
            raise NotFound(f"project {project_id} is not open on this compute") from None

    def open_project(self, project_id: uuid.UUID, name: str) -> ComputeProject:
        """Open a project (an open one is answered as it is: a controller reconnecting)."""
        key = str(project_id)
        if key not in self.projects:
            directory = self.projects_dir / key
            directory.mkdir(parents=True, exist_ok=True)
            self.projects[key] = ComputeProject(self, Project(project_id, directory, name))
        return self.projects[key]

    async def close_project(self, project_id: str) -> None:
        """Stop the project's nodes and forget it; its files stay for a reopening."""
        project = self.project(project_id)
        del self.projects[project_id]
        await project.close()

    async def delete_project(self, project_id: str) -> None:
        """Close the project and delete its directory."""
        project = self.project(project_id)
        await self.close_project(project_id)
        directory = project.session.project.directory
        if directory.parent == self.projects_dir:
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def close(self) -> None:
        """Close every project (``emu serve`` is stopping)."""
        for project_id in list(self.projects):
            with contextlib.suppress(Exception):
                await self.close_project(project_id)
