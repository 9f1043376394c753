"""The node runtime: one node's state, its state machine and its lock.

A :class:`Node` holds state only; behaviour lives in hook implementations, which the node
calls through :class:`~emucore.hooks.NodeHooks`. Every public operation takes the node's
asyncio lock, so concurrent calls run one after another and each sees the state the previous
one left::

    stopped → starting → started ⇄ suspended
                  ↓          ↓          ↓
               stopped ← stopping ←─────┘
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Generic, cast

import attrs
from typing_extensions import TypeVar

from emucore.claims import Claims
from emucore.errors import (
    CaptureUnsupportedError,
    EmuError,
    NodeError,
    NodeStateError,
    StateUnsupportedError,
)
from emucore.events import EventBus
from emucore.files import capture_directory, prepare_for_child, private_dir
from emucore.hooks import NodeHooks
from emucore.models import (
    Adapter,
    ConsoleInfo,
    HostSettings,
    Nio,
    NodeConfig,
    NodeEvent,
    NodeStatus,
    Project,
)
from emucore.ports import PortAllocator
from emucore.records import SavedState
from emucore.stash import Stash
from emucore.tasks import finish

log = logging.getLogger("emu")

RUNNING = (NodeStatus.STARTED, NodeStatus.SUSPENDED)

# The emulator's properties and settings classes. A plugin names them in its hook
# implementations (``Node[QemuProperties, QemuSettings]``), so mypy checks what it reads;
# the core and hosts write plain ``Node`` (both default to Any).
P = TypeVar("P", default=Any)
S = TypeVar("S", default=Any)


class Node(Generic[P, S]):
    """A node of a project, running or not.

    Generic in its emulator's properties class ``P`` and settings class ``S``: a plugin
    annotates ``node: Node[MyProperties, MySettings]`` and needs no ``isinstance``.

    :ivar config: the validated description.
    :ivar project: the project it belongs to.
    :ivar settings: the host's settings.
    :ivar emulator_settings: the host's settings for this emulator (its settings class).
    :ivar directory: the node's working directory, ``<project>/project-files/<kind>/<id>``.
    :ivar status: where the node is in its life.
    :ivar console: how to reach its console while it runs.
    :ivar argv: the command line of the last start.
    :ivar stash: per-plugin state (see :mod:`emucore.stash`).
    :ivar ports: the UDP port allocator of the session.
    :ivar claims: what must be unique among nodes (see :mod:`emucore.claims`); a plugin
        claims in ``emu_node_created``, the session releases.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        project: Project,
        hooks: NodeHooks,
        events: EventBus,
        ports: PortAllocator,
        settings: HostSettings,
        emulator_settings: S,
        adapter_count: int = 0,
        claims: Claims | None = None,
    ) -> None:
        self.config = config
        self.project = project
        self.settings = settings
        self.emulator_settings = emulator_settings
        self.ports = ports
        self.claims = claims or Claims()
        self.directory = project.directory / "project-files" / config.emulator / str(config.id)
        self.status = NodeStatus.STOPPED
        self.console: ConsoleInfo | None = None
        self.argv: list[str] = []
        self.stash = Stash()
        self.hooks = hooks
        self.adapters = tuple(
            Adapter(number, config.nios.get(number)) for number in range(adapter_count)
        )
        self._events = events
        self._lock = asyncio.Lock()
        self._exit_tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # -- identity --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The node's name."""
        return self.config.name

    @property
    def emulator(self) -> str:
        """The emulator kind."""
        return self.config.emulator

    @property
    def properties(self) -> P:
        """The emulator's properties object (an instance of its properties class)."""
        return cast(P, self.config.properties)

    @property
    def is_running(self) -> bool:
        """Started or suspended: the emulator process exists."""
        return self.status in RUNNING

    def __repr__(self) -> str:
        return f"<Node {self.name!r} {self.emulator} {self.status.value}>"

    # -- events ----------------------------------------------------------------------------

    def emit(self, kind: str, message: str, details: str = "", *, host_wide: bool = False) -> None:
        """Publish an ``info``, ``warning`` or ``error`` event about this node.

        :param host_wide: the message is about the host (every node would say the same, e.g.
            KVM is unusable): hosts show it once.
        """
        event = NodeEvent(self.name, kind, message, self.status, details, host_wide)
        self._events.publish(event)

    def _set_status(self, status: NodeStatus, message: str = "") -> None:
        self.status = status
        self._events.publish(NodeEvent(self.name, "status", message or status.value, status))

    # -- lifecycle -------------------------------------------------------------------------

    def make_directory(self) -> Path:
        """Create the node's directory, refusing links planted anywhere below the project
        directory (see :mod:`emucore.files`).

        :raises UnsafePathError: a component is a symbolic link or not a directory.
        """
        relative = self.directory.relative_to(self.project.directory)
        return private_dir(self.project.directory, relative)

    async def prepare_disks(self) -> None:
        """Prepare disks now (e.g. linked clones) instead of at the first start."""
        async with self._lock:
            self._refuse_if_closed("prepare disks")
            self.make_directory()
            await self._guard("prepare", self.hooks.prepare(self))
            await self._guard("prepare disks", self.hooks.prepare_disks(self))

    async def dry_run(self) -> list[str]:
        """The command line a start would use now; nothing is started or created."""
        async with self._lock:
            await self._guard("prepare", self.hooks.prepare(self))
            return self.hooks.build_args(self)

    async def start(self, *, state: str | None = None) -> None:
        """Start the node; a suspended node is resumed, a started one left alone.

        :param state: resume from the state saved under this name (:meth:`save_state`)
            instead of booting: the plugins check and arrange it in ``emu_restore_state``,
            after ``emu_prepare`` and before the disks are touched
            (``emu_prepare_disks``). Only a stopped node can.
        :raises StateUnsupportedError: ``state`` was given and no plugin of the node's
            emulator restores states (the node stays stopped).
        :raises NodeStateError: ``state`` was given and the node runs.
        """
        if state is not None:
            state = state_name(self.name, state)
        async with self._lock:
            self._refuse_if_closed("start")
            if state is not None and self.status is not NodeStatus.STOPPED:
                raise NodeStateError(
                    self.name,
                    f"cannot resume from the saved state {state!r}: the node is"
                    f" {self.status.value}; stop it first",
                )
            if self.status is NodeStatus.SUSPENDED:
                await self._resume()
                return
            if self.status is NodeStatus.STARTED:
                return
            self._set_status(NodeStatus.STARTING)
            try:
                self.make_directory()
                await self.hooks.prepare(self)
                if state is not None and not await self.hooks.restore_state(self, state):
                    raise StateUnsupportedError(
                        self.name, f"no plugin of {self.emulator!r} restores saved states"
                    )
                await self.hooks.prepare_disks(self)
                self.argv = self.hooks.build_args(self)
                await self.hooks.start(self, self.argv)
                await self.hooks.started(self)
            except BaseException as exc:
                # A cancelled start (Ctrl-C) must still take its processes down, and keep
                # the lock until they are down, however often it is cancelled again.
                await finish(self._stop_after_failure())
                if isinstance(exc, EmuError | asyncio.CancelledError):
                    raise
                if isinstance(exc, Exception):
                    raise NodeError(self.name, f"start failed: {exc}") from exc
                raise
            self._set_status(NodeStatus.STARTED)

    async def _stop_after_failure(self) -> None:
        try:
            await self._stop_hooks()
        except Exception as exc:
            log.exception("%s: cleanup after a failed start failed", self.name)
            self.emit("error", f"cleanup after a failed start failed: {exc}")
        self.console = None
        self._set_status(NodeStatus.STOPPED, "start failed")

    async def stop(self) -> None:
        """Stop the node (no-op when stopped); bounded: plugins end with a kill."""
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        if self.status is NodeStatus.STOPPED:
            return
        self._set_status(NodeStatus.STOPPING)
        try:
            await finish(self._stop_hooks())
        finally:
            self.console = None
            self._set_status(NodeStatus.STOPPED)

    async def _stop_hooks(self) -> None:
        """``emu_stop``, then ``emu_stopped`` even when a stop implementation failed."""
        try:
            await self.hooks.stop(self)
        finally:
            await self.hooks.stopped(self)

    async def suspend(self) -> None:
        """Pause a started node (no-op when suspended)."""
        async with self._lock:
            if self.status is NodeStatus.SUSPENDED:
                return
            self._require(NodeStatus.STARTED, "suspend")
            await self._guard("suspend", self.hooks.suspend(self))
            self._set_status(NodeStatus.SUSPENDED)

    async def resume(self) -> None:
        """Let a suspended node run (no-op when started)."""
        async with self._lock:
            if self.status is NodeStatus.STARTED:
                return
            self._require(NodeStatus.SUSPENDED, "resume")
            await self._resume()

    async def _resume(self) -> None:
        await self._guard("resume", self.hooks.resume(self))
        self._set_status(NodeStatus.STARTED)

    async def reload(self) -> None:
        """Reset a running node as a power cycle would; it runs afterwards."""
        async with self._lock:
            self._require_running("reload")
            await self._guard("reload", self.hooks.reload(self))
            self._set_status(NodeStatus.STARTED, "reloaded")

    async def close(self) -> None:
        """Stop the node and release what it holds; it cannot be used afterwards."""
        async with self._lock:
            if self.closed:
                return
            await self._stop()
            try:
                await self._guard("close", self.hooks.close(self))
            finally:
                self.closed = True

    async def reconfigure(
        self, config: NodeConfig, adapter_count: int, check: Callable[[], None] | None = None
    ) -> None:
        """Replace the description of a node (validated by the host, e.g. with
        :meth:`Session.update_node <emucore.session.Session.update_node>`).

        On a stopped node anything may change; adapters that remain keep their NIOs, new
        ones start unconnected. On a running node only properties that some plugin names in
        ``emu_live_properties`` may change (the name may too: it is the host's); they are
        applied through ``emu_update_running``, and the previous description is put back
        if that fails.

        :param config: the new description; its ``id`` and ``emulator`` must not change.
        :param adapter_count: the adapter count of the new properties.
        :param check: called once the node has the new description, before a running node
            takes it live (the host's checks: plugins, claims); when it raises, the node
            gets its previous description back and nothing was applied.
        :raises NodeStateError: the node was closed, or runs and a property that cannot
            change live would change (nothing is changed then).
        :raises NodeError: an adapter that would disappear is connected.
        """
        async with self._lock:
            self._refuse_if_closed("change the node")
            if config.id != self.config.id or config.emulator != self.emulator:
                raise NodeError(self.name, "the node id and the emulator cannot change")
            if self.is_running:
                await self._reconfigure_running(config, check)
                return
            self._require(NodeStatus.STOPPED, "change the node")
            connected = [a.number for a in self.adapters[adapter_count:] if a.nio is not None]
            if connected:
                raise NodeError(
                    self.name,
                    f"adapter {connected[0]} is connected; disconnect it before lowering the"
                    f" adapter count to {adapter_count}",
                )
            previous, adapters = self.config, self.adapters
            self.config = config
            self.adapters = tuple(
                self.adapters[n] if n < len(self.adapters) else Adapter(n, config.nios.get(n))
                for n in range(adapter_count)
            )
            try:
                if check is not None:
                    check()
            except BaseException:
                self.config, self.adapters = previous, adapters
                raise

    async def _reconfigure_running(
        self, config: NodeConfig, check: Callable[[], None] | None
    ) -> None:
        changed = frozenset(changed_properties(self.config.properties, config.properties))
        live = self.hooks.live_properties(self) if changed else set()
        refused = sorted(changed - live)
        if refused:
            can = f" (it can change {', '.join(sorted(live))} while it runs)" if live else ""
            raise NodeStateError(
                self.name,
                f"cannot change {', '.join(refused)} while the node is {self.status.value};"
                f" stop it first{can}",
            )
        previous = self.config
        self.config = config
        try:
            if check is not None:
                check()  # before anything is applied to the running emulator
            if changed:
                work = self.hooks.update_running(self, previous.properties, changed)
                await self._guard("change", work)
        except BaseException:
            self.config = previous
            raise

    # -- disk images -----------------------------------------------------------------------

    async def create_disk_image(self, name: str, options: Mapping[str, Any]) -> None:
        """Create an empty disk image ``name`` in the node's directory (its emulator's
        plugins check ``options``: format, size...).

        :raises NodeError: the name is not a plain file name, or no plugin creates images.
        """
        async with self._lock:
            self._refuse_if_closed("create a disk image")
            checked = disk_image_name(self.name, name)
            self.make_directory()
            work = self.hooks.create_disk_image(self, checked, options)
            if not await self._guard("create disk image", work):
                raise NodeError(self.name, f"no plugin of {self.emulator!r} creates disk images")

    async def resize_disk_image(self, name: str, extend: int) -> None:
        """Make the disk image ``name`` in the node's directory ``extend`` MiB larger.

        :raises NodeStateError: the node runs (its emulator may have the image open).
        :raises NodeError: a bad name or size, or no plugin resizes images.
        """
        async with self._lock:
            self._refuse_if_closed("resize a disk image")
            checked = disk_image_name(self.name, name)
            self._require(NodeStatus.STOPPED, f"resize {checked}")
            if isinstance(extend, bool) or not isinstance(extend, int) or extend < 1:
                raise NodeError(
                    self.name, f"extend: must be a positive number of MiB, got {extend!r}"
                )
            work = self.hooks.resize_disk_image(self, checked, extend)
            if not await self._guard("resize disk image", work):
                raise NodeError(self.name, f"no plugin of {self.emulator!r} resizes disk images")

    async def delete_disk_image(self, name: str) -> None:
        """Delete the disk image ``name`` from the node's directory.

        :raises NodeStateError: the node runs (its emulator may have the image open).
        :raises NodeError: a bad name, or no plugin deletes images.
        """
        async with self._lock:
            self._refuse_if_closed("delete a disk image")
            checked = disk_image_name(self.name, name)
            self._require(NodeStatus.STOPPED, f"delete {checked}")
            work = self.hooks.delete_disk_image(self, checked)
            if not await self._guard("delete disk image", work):
                raise NodeError(self.name, f"no plugin of {self.emulator!r} deletes disk images")

    async def info(self) -> dict[str, Any]:
        """What the node's plugins report beside its properties (``emu_node_info``): image
        checksums, the port of a second console... Does not wait for a running operation
        (a start may hold the node's lock for a while)."""
        return await self._guard("info", self.hooks.node_info(self))  # type: ignore[no-any-return]

    # -- saved states ----------------------------------------------------------------------

    async def save_state(self, name: str) -> None:
        """Save the running node's whole state (machine and disks) under ``name``, for a
        later :meth:`start` with ``state=name``; a state of that name is replaced. The node
        stays as it was (running or suspended).

        :raises NodeError: ``name`` is not a state name (1-64 letters, digits, ``_ . -``).
        :raises NodeStateError: the node is not running.
        :raises StateUnsupportedError: no plugin of the node's emulator saves states.
        """
        checked = state_name(self.name, name)
        async with self._lock:
            self._require_running(f"save the state {checked!r}")
            if not await self._guard("save state", self.hooks.save_state(self, checked)):
                raise StateUnsupportedError(
                    self.name, f"no plugin of {self.emulator!r} saves running states"
                )

    async def states(self) -> list[SavedState]:
        """The states saved for this node (``emu_list_states``), by name.

        :raises StateUnsupportedError: no plugin of the node's emulator handles states.
        """
        async with self._lock:
            found = await self._guard("list states", self.hooks.list_states(self))
        if found is None:
            raise StateUnsupportedError(
                self.name, f"no plugin of {self.emulator!r} saves running states"
            )
        return sorted(found, key=lambda state: state.name)

    async def delete_state(self, name: str) -> None:
        """Delete the state saved under ``name``, freeing its space.

        :raises NodeStateError: the node runs.
        :raises NodeError: a bad name, or no such state.
        :raises StateUnsupportedError: no plugin of the node's emulator handles states.
        """
        checked = state_name(self.name, name)
        async with self._lock:
            self._refuse_if_closed("delete a saved state")
            self._require(NodeStatus.STOPPED, f"delete the saved state {checked!r}")
            if not await self._guard("delete state", self.hooks.delete_state(self, checked)):
                raise StateUnsupportedError(
                    self.name, f"no plugin of {self.emulator!r} saves running states"
                )

    # -- network ---------------------------------------------------------------------------

    async def attach_nio(self, adapter: int, nio: Nio) -> None:
        """Connect ``adapter`` to ``nio``; on a running node live, replacing any NIO it has."""
        async with self._lock:
            current = self._adapter(adapter)
            old = current.nio
            changed = attrs.evolve(current, nio=nio)
            if old == nio:
                return
            if old is None:
                await self._changing(changed, current, "attach", self.hooks.attach_nio, nio)
            else:
                await self._changing(changed, current, "relink", self.hooks.update_nio, old, nio)

    async def detach_nio(self, adapter: int) -> None:
        """Disconnect ``adapter`` (no-op if it has no NIO); the guest keeps its NIC."""
        async with self._lock:
            current = self._adapter(adapter)
            if current.nio is None:
                return
            changed = attrs.evolve(current, nio=None)
            await self._changing(changed, current, "detach", self.hooks.detach_nio, current.nio)

    async def set_link(self, adapter: int, up: bool) -> None:
        """Take an adapter's link down or up as the guest sees it, keeping its NIO."""
        async with self._lock:
            current = self._adapter(adapter)
            changed = attrs.evolve(current, link_up=up)
            await self._changing(changed, current, "set link", self.hooks.set_link, up)

    async def _changing(
        self,
        changed: Adapter,
        current: Adapter,
        action: str,
        hook: Callable[..., Awaitable[None]],
        *args: Any,
    ) -> None:
        """Record ``changed``, then (on a running node) call ``hook(self, adapter, *args)``:
        the hooks, and whatever they rebuild (a command line), see the adapter as it is
        becoming. ``current`` is put back when they fail."""
        self._replace_adapter(changed)
        if not self.is_running:
            return
        try:
            await self._guard(action, hook(self, changed.number, *args))
        except BaseException:
            self._replace_adapter(current)
            raise

    async def start_capture(self, adapter: int, path: Path) -> None:
        """Write the frames crossing ``adapter`` to the pcap file ``path``.

        :param path: inside the project directory, the directories on its way are made
            (0700) and a link planted among them is refused; outside it (a place the host
            program chose, e.g. next to a lab file), its directory must exist.
        :raises UnsafePathError: see :func:`~emucore.files.capture_directory`; the message
            names the capture file.
        :raises NodeStateError: the node is not running, or the adapter is captured already.
        :raises CaptureUnsupportedError: no plugin can capture on this adapter.
        """
        async with self._lock:
            current = self._adapter(adapter)
            self._require_running("capture")
            if current.capture is not None:
                raise NodeStateError(
                    self.name,
                    f"adapter {adapter} is already captured to {current.capture};"
                    " stop that capture first",
                )
            path = Path(path).absolute()
            capture_directory(self.project.directory, path)
            # The emulator opens the file by name: leave it a fresh regular file, so a link
            # planted there is never followed.
            prepare_for_child(path)
            taken = await self._guard("capture", self.hooks.capture(self, adapter, path))
            if not taken:
                raise CaptureUnsupportedError(
                    self.name, f"no plugin can capture on adapter {adapter}"
                )
            self._replace_adapter(attrs.evolve(current, capture=path))

    async def stop_capture(self, adapter: int) -> None:
        """Stop the capture on ``adapter``; the file stays.

        :raises NodeStateError: no capture runs on that adapter.
        """
        async with self._lock:
            current = self._adapter(adapter)
            if current.capture is None:
                raise NodeStateError(self.name, f"adapter {adapter} is not being captured")
            try:
                if self.is_running:
                    await self._guard("stop capture", self.hooks.stop_capture(self, adapter))
            finally:
                self._replace_adapter(attrs.evolve(current, capture=None))

    def adapter(self, number: int) -> Adapter:
        """Adapter ``number``.

        :raises NodeError: the node has no such adapter.
        """
        return self._adapter(number)

    def _adapter(self, number: int) -> Adapter:
        if not 0 <= number < len(self.adapters):
            raise NodeError(
                self.name, f"adapter {number} does not exist (adapters 0..{len(self.adapters) - 1})"
            )
        return self.adapters[number]

    def _replace_adapter(self, adapter: Adapter) -> None:
        adapters = list(self.adapters)
        adapters[adapter.number] = adapter
        self.adapters = tuple(adapters)

    # -- emulator exits --------------------------------------------------------------------

    def emulator_exited(
        self, returncode: int | None, log_tail: str = "", message: str = "", kind: str = "error"
    ) -> None:
        """Called by the emulator plugin the moment its process ended on its own.

        While the node is started or suspended, the node is cleaned up through ``emu_stop``,
        becomes stopped, and an event of ``kind`` (``error`` unless the plugin knows the guest
        powered off on purpose: ``info``) carries ``message``, the exit code and
        ``log_tail``. During a start or a stop this is expected and ignored here.
        """
        if self.status not in RUNNING:
            return
        message = message or f"emulator exited unexpectedly (exit code {returncode})"
        work = self._after_exit(message, log_tail, kind)
        task = asyncio.get_running_loop().create_task(work)
        self._exit_tasks.add(task)
        task.add_done_callback(self._exit_tasks.discard)

    async def _after_exit(self, message: str, log_tail: str, kind: str) -> None:
        async with self._lock:
            if self.status not in RUNNING:
                return
            await self._stop()
            self.emit(kind, message, log_tail)

    # -- helpers ---------------------------------------------------------------------------

    def _refuse_if_closed(self, action: str) -> None:
        if self.closed:
            raise NodeStateError(self.name, f"cannot {action}: the node was closed")

    def _require(self, status: NodeStatus, action: str) -> None:
        if self.status is not status:
            raise NodeStateError(
                self.name, f"cannot {action}: the node is {self.status.value}, not {status.value}"
            )

    def _require_running(self, action: str) -> None:
        if self.status not in RUNNING:
            raise NodeStateError(
                self.name, f"cannot {action}: the node is {self.status.value}, not running"
            )

    async def _guard(self, action: str, work: Any) -> Any:
        """Await ``work``; wrap unexpected exceptions in a NodeError naming the action."""
        try:
            return await work
        except EmuError:
            raise
        except Exception as exc:
            raise NodeError(self.name, f"{action} failed: {exc}") from exc


def changed_properties(old: Any, new: Any) -> list[str]:
    """The names of the fields whose values differ between two properties objects of the
    same attrs class."""
    return [f.name for f in attrs.fields(type(old)) if getattr(old, f.name) != getattr(new, f.name)]


_MAX_NAME = 255


def disk_image_name(node: str, name: Any) -> str:
    """``name`` if it is a plain file name a node directory may hold: no directory part,
    not hidden (no leading dot), printable, at most 255 characters.

    :raises NodeError: naming what is wrong.
    """
    if not isinstance(name, str) or not name:
        raise NodeError(node, f"disk image name: must be a non-empty string, got {name!r}")
    if len(name) > _MAX_NAME or not name.isprintable() or "/" in name or "\\" in name:
        raise NodeError(
            node,
            f"disk image name {name[:60]!r}: must be a plain file name (at most {_MAX_NAME}"
            " printable characters, no / or \\)",
        )
    if name.startswith("."):
        raise NodeError(node, f"disk image name {name!r}: must not start with a dot")
    return name


# A state name is also part of file contents and snapshot tags, never a path.
STATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def state_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a saved state, or ``None`` when it can: 1-64 letters,
    digits, ``_``, ``.`` or ``-``, starting with a letter or digit (no path, no space)."""
    if isinstance(name, str) and STATE_NAME.fullmatch(name):
        return None
    shown = repr(name[:70]) if isinstance(name, str) else repr(name)
    return (
        f"{shown} is not a state name: 1-64 letters, digits, '_', '.' or '-', starting with"
        " a letter or digit"
    )


def state_name(node: str, name: Any) -> str:
    """``name`` if it can name a saved state (see :func:`state_name_problem`).

    :raises NodeError: naming what is wrong.
    """
    problem = state_name_problem(name)
    if problem is not None:
        raise NodeError(node, f"saved state: {problem}")
    return str(name)
