"""A session: one project open on this host, with its nodes, ports and events.

This is what a host program holds::

    async with Session(Project.for_directory(path)) as session:
        node = session.add_node({"name": "R1", "emulator": "qemu", "ram": 256})
        await node.start()
    # leaving the block stops and closes every node
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pluggy

from emucore.claims import Claims
from emucore.convert import default_converter, structure
from emucore.errors import ConfigError, EmuError, PluginError
from emucore.events import EventBus
from emucore.hooks import NodeHooks
from emucore.links import Endpoint, Link
from emucore.models import HostSettings, LinkFilters, Nio, NodeConfig, Project, UdpNio
from emucore.node import Node
from emucore.plugins import emulators, make_plugin_manager
from emucore.ports import PortAllocator
from emucore.records import EmulatorInfo
from emucore.tunnels import Tunnel

_NIOS: Any = Mapping[int, Nio]

# Keys the core reads from a node description; every other key is an emulator property.
_CORE_KEYS = ("name", "node_id", "emulator", "nios")


class Session:
    """The nodes of one project and what they share.

    :ivar project: the project.
    :ivar settings: the host's settings.
    :ivar plugins: the plugin manager (one per session unless the host passes its own; then
        ``settings.blocked_plugins`` is the host's business, as the manager is built already).
    :ivar events: every node's events.
    :ivar ports: UDP port allocator for tunnels.
    :ivar nodes: the nodes by name.
    :ivar links: the links made with :meth:`link`.
    :ivar tunnels: the tunnels made with :meth:`tunnel`.
    :ivar claims: what must be unique among nodes: this session's, or the host's when it
        passes one shared by all its sessions (:mod:`emucore.claims`).
    """

    def __init__(
        self,
        project: Project,
        *,
        settings: HostSettings | None = None,
        plugins: pluggy.PluginManager | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.project = project
        self.settings = settings or HostSettings()
        self.plugins = plugins or make_plugin_manager(blocked=self.settings.blocked_plugins)
        self.events = EventBus()
        self.ports = PortAllocator(self.settings.udp_host, self.settings.udp_ports)
        self.claims = claims or Claims()
        self.nodes: dict[str, Node] = {}
        self.links: list[Link] = []
        self.tunnels: list[Tunnel] = []
        self._emulators: dict[str, EmulatorInfo] | None = None
        self._emulator_settings: dict[str, Any] = {}

    @property
    def emulators(self) -> dict[str, EmulatorInfo]:
        """The emulator kinds the loaded plugins provide."""
        if self._emulators is None:
            self._emulators = emulators(self.plugins)
        return self._emulators

    def emulator(self, kind: str) -> EmulatorInfo:
        """The emulator ``kind``.

        :raises PluginError: no loaded plugin provides it.
        """
        try:
            return self.emulators[kind]
        except KeyError:
            known = ", ".join(sorted(self.emulators)) or "none"
            raise PluginError(
                f"no plugin provides the emulator {kind!r} (loaded: {known});"
                " is its package installed, or is it blocked?"
            ) from None

    def emulator_settings(self, kind: str) -> Any:
        """The host's settings for emulator ``kind``, structured by its settings class."""
        if kind not in self._emulator_settings:
            info = self.emulator(kind)
            raw = self.settings.emulators.get(kind, {})
            if info.settings is None:
                if raw:
                    raise ConfigError(f"settings for {kind}", ["$: this emulator has no settings"])
                self._emulator_settings[kind] = None
            else:
                where = f"settings.emulators.{kind}"
                self._emulator_settings[kind] = structure(dict(raw), info.settings, where)
        return self._emulator_settings[kind]

    def node_config(
        self, description: Mapping[str, Any], *, emulator: str | None = None, where: str = ""
    ) -> NodeConfig:
        """Validate a node description (GNS3-style flat properties) into a NodeConfig.

        :param description: ``name``, optional ``node_id``, ``emulator`` (unless given as
            an argument), optional ``nios`` and the emulator's properties.
        :param emulator: the emulator kind, when the description does not say it.
        :param where: where the description came from, for error messages.
        :raises ConfigError: listing every bad field.
        """
        if not isinstance(description, Mapping):
            raise ConfigError(
                where, [f"$: must be a table of node properties, got {description!r}"]
            )
        kind = emulator or description.get("emulator")
        name = description.get("name")
        where = where or (f"node {name!r}" if isinstance(name, str) else "node")
        if not isinstance(kind, str):
            raise ConfigError(where, ['$.emulator: required (e.g. "qemu")'])
        if kind not in self.emulators:
            known = ", ".join(sorted(self.emulators)) or "none"
            problem = (
                f"$.emulator: no plugin provides {kind!r} (loaded: {known});"
                " is its package installed, or is it blocked?"
            )
            raise ConfigError(where, [problem])
        info = self.emulators[kind]
        problems: list[str] = []
        properties = {k: v for k, v in description.items() if k not in _CORE_KEYS}
        props = _collect(problems, "$", properties, info.properties)
        nios = _collect(problems, "$.nios", description.get("nios", {}), _NIOS)
        node_id = description.get("node_id") or str(self._node_id(name))
        header = {"name": name, "emulator": kind, "id": node_id, "properties": None}
        config = _collect(problems, "$", header, NodeConfig)
        problems = [p.replace("$.id:", "$.node_id:", 1) for p in problems]
        if config is not None and nios is not None and props is not None:
            count = props.adapter_count
            problems += [
                f"$.nios[{n}]: adapter {n} does not exist (the node has {count})"
                for n in nios
                if n >= count
            ]
        if problems:
            raise ConfigError(where, problems)
        return NodeConfig(config.name, kind, config.id, props, nios)

    def _node_id(self, name: Any) -> uuid.UUID:
        # Same project + same name = same id = same directory: overlays survive a re-run.
        return uuid.uuid5(self.project.id, str(name))

    def add_node(
        self, description: Mapping[str, Any], *, emulator: str | None = None, where: str = ""
    ) -> Node:
        """Create a node from its description (see :meth:`node_config`); it starts stopped.

        :raises ConfigError: the description is invalid or the name is taken.
        """
        config = self.node_config(description, emulator=emulator, where=where)
        return self.add_node_config(config)

    def add_node_config(self, config: NodeConfig) -> Node:
        """Create a node from an already validated :class:`NodeConfig`."""
        if config.name in self.nodes:
            raise ConfigError(f"node {config.name!r}", ["$.name: a node with this name exists"])
        node = Node(
            config,
            project=self.project,
            hooks=NodeHooks(self.plugins, config.emulator),
            events=self.events,
            ports=self.ports,
            settings=self.settings,
            emulator_settings=self.emulator_settings(config.emulator),
            adapter_count=config.properties.adapter_count,
            claims=self.claims,
        )
        self._created(node)
        self.nodes[config.name] = node
        return node

    def _created(self, node: Node) -> None:
        """``emu_node_created``, with what the node claims released when it is refused."""
        try:
            node.hooks.node_created(node)
        except BaseException:
            self.claims.release(node)
            raise

    def node(self, name: str) -> Node:
        """The node called ``name``.

        :raises EmuError: there is none.
        """
        try:
            return self.nodes[name]
        except KeyError:
            raise EmuError(f"no node named {name!r} in this project") from None

    async def update_node(self, name: str, changes: Mapping[str, Any], *, where: str = "") -> Node:
        """Change properties (or the name) of a node; the others keep their values.

        The node's current properties, overlaid with ``changes``, are validated like a new
        description (every bad field reported at once), then the emulator's plugins check the
        node again (``emu_node_created``, and its claims) before a running node takes the
        change; on any failure the node stays as it was. A running
        node takes only the properties its plugins can change live (``emu_live_properties``,
        applied through ``emu_update_running``, see :meth:`Node.reconfigure
        <emucore.node.Node.reconfigure>`); the name may always change.

        :param name: the node's current name.
        :param changes: properties to change, and ``name`` to rename it.
        :param where: where the changes came from, for error messages.
        :raises ConfigError: the result is invalid, or the new name is taken.
        :raises NodeStateError: the node runs and a property that cannot change live would
            change.
        """
        node = self.node(name)
        current = default_converter().unstructure(node.properties)
        description = {**current, **changes, "node_id": str(node.config.id)}
        description.setdefault("name", node.name)
        config = self.node_config(description, emulator=node.emulator, where=where)
        if config.name != name and config.name in self.nodes:
            raise ConfigError(where or f"node {name!r}", ["$.name: a node with this name exists"])
        released = False

        def check() -> None:  # the node has the new description now, nothing applied yet
            nonlocal released
            self.claims.release(node)  # claimed again for what the node is now
            released = True
            self._created(node)

        try:
            await node.reconfigure(config, config.properties.adapter_count, check)
        except BaseException:
            if released:  # the node has its previous description back: claim for it again
                self.claims.release(node)
                self._created(node)
            raise
        del self.nodes[name]
        self.nodes[config.name] = node
        return node

    async def remove_node(self, name: str) -> None:
        """Stop and close a node and forget it."""
        node = self.node(name)
        try:
            await node.close()
        finally:
            self.claims.release(node)
        del self.nodes[name]

    async def link(
        self,
        a: str | Node,
        a_adapter: int,
        b: str | Node,
        b_adapter: int,
        filters: LinkFilters | None = None,
    ) -> Link:
        """Connect two adapters with a UDP link (through a relay when ``filters`` impair).

        Works on stopped and running nodes alike; a running node is relinked live.

        :raises NodeError: an adapter does not exist or is connected already.
        """
        ends = [
            Endpoint(self._as_node(node), adapter)
            for node, adapter in ((a, a_adapter), (b, b_adapter))
        ]
        for end in ends:
            end.node.adapter(end.adapter)  # raises when it does not exist
        link = Link(ends[0], ends[1], self.ports)
        await link.connect(filters)
        self.links.append(link)
        return link

    async def unlink(self, link: Link) -> None:
        """Disconnect a link and give its ports back."""
        self.links.remove(link)
        await link.disconnect()

    async def tunnel(
        self, node: str | Node, adapter: int, nio: UdpNio, filters: LinkFilters | None = None
    ) -> Tunnel:
        """Connect an adapter to a UDP peer outside the session (see :mod:`emucore.tunnels`).

        ``nio.local_port`` is where the peer sends; allocate it from the session's ``ports``
        (or it is reserved now); it goes back to the allocator with :meth:`untunnel`.

        :raises NodeError: the adapter does not exist or is connected already.
        :raises PortError: ``nio.local_port`` is taken.
        """
        tunnel = Tunnel(Endpoint(self._as_node(node), adapter), nio, self.ports)
        await tunnel.connect(filters)
        self.tunnels.append(tunnel)
        return tunnel

    async def untunnel(self, tunnel: Tunnel) -> None:
        """Disconnect a tunnel and give its ports back."""
        self.tunnels.remove(tunnel)
        await tunnel.disconnect()

    def _as_node(self, node: str | Node) -> Node:
        return node if isinstance(node, Node) else self.node(node)

    async def close(self) -> None:
        """Stop and close every node, concurrently; then remove the links and their ports."""
        results = await asyncio.gather(
            *(node.close() for node in self.nodes.values()), return_exceptions=True
        )
        for node in self.nodes.values():
            self.claims.release(node)
        for link in list(self.links):
            self.links.remove(link)
            with contextlib.suppress(EmuError):
                await link.disconnect()
        for tunnel in list(self.tunnels):
            self.tunnels.remove(tunnel)
            with contextlib.suppress(EmuError):
                await tunnel.disconnect()
        self.ports.release_all()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _collect(problems: list[str], prefix: str, data: Any, cls: Any) -> Any:
    """Structure ``data``; on failure add its problems (under ``prefix``) and return None."""
    try:
        return structure(data, cls)
    except ConfigError as exc:
        problems += [prefix + problem.removeprefix("$") for problem in exc.problems]
        return None
