"""Typed, emulator-scoped calls into the plugin manager, every one through pluggy.

pluggy does not type-check hook calls and calls every plugin; :class:`NodeHooks` fixes both:
each method has the spec's signature, and only plugins scoped to the node's emulator kind
(``EMULATOR = kind``) or to no kind take part.

**May be async.** A spec marked with :func:`may_be_async` (the one source of truth; its
return annotation says ``Awaitable`` too) lets implementations return awaitables. Such a
hook is called one implementation at a time, each result awaited before the next
implementation is called, in pluggy's order (tryfirst, plain, trylast). Each of those calls
still goes through pluggy's hook execution (a caller holding that one implementation), so
``add_hookcall_monitoring`` and tracing see every call. Calling them all first would run a
synchronous implementation before the body of an asynchronous one called earlier, and leave
coroutines un-awaited when a later implementation raises. Wrappers cannot take part (they
would see un-run coroutines): :class:`~emucore.plugins.EmuPluginManager` refuses them when a
plugin registers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from emucore.records import ArgFragment, SavedState

if TYPE_CHECKING:
    from emucore.models import Nio
    from emucore.node import Node

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "emu_may_be_async"


def may_be_async(spec: F) -> F:
    """Mark a hook spec whose implementations may return awaitables (see the module
    docstring); use it on the specs of your own hooks as emu does on its own."""
    setattr(spec, _MARK, True)
    return spec


def is_may_be_async(caller: pluggy.HookCaller) -> bool:
    """Whether the hook ``caller`` calls was declared with :func:`may_be_async`."""
    spec = caller.spec
    return spec is not None and bool(getattr(spec.function, _MARK, False))


def emulator_kind(plugin: object) -> str | None:
    """The emulator kind a plugin is scoped to (its ``EMULATOR`` attribute), if any."""
    kind = getattr(plugin, "EMULATOR", None)
    return kind if isinstance(kind, str) else None


async def call_each(
    manager: pluggy.PluginManager,
    name: str,
    kind: str | None = None,
    until: Callable[[Any], bool] | None = None,
    /,
    **kwargs: Any,
) -> list[Any]:
    """Call the *may be async* hook ``name`` one implementation at a time, awaiting each
    result before the next implementation is called.

    :param name: the hook (positional only, like ``kind`` and ``until``: the hook's own
        arguments, given as keywords, may have any name).
    :param kind: only plugins of this emulator kind, or of none, take part (``None``: all).
    :param until: stop after the first result for which it is true (a hook where one
        implementation takes the request: the later ones are not called).
    :return: the non-``None`` results, in call order.
    """
    caller: pluggy.HookCaller = getattr(manager.hook, name)
    plugins = manager.get_plugins()
    results = []
    for impl in reversed(caller.get_hookimpls()):
        if kind is not None and emulator_kind(impl.plugin) not in (None, kind):
            continue
        one = manager.subset_hook_caller(name, [p for p in plugins if p is not impl.plugin])
        for result in one(**kwargs):
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                results.append(result)
            if until is not None and until(result):
                return results
    return results


def _taken(result: Any) -> bool:
    return result is True


def join_fragments(fragments: Sequence[ArgFragment]) -> list[str]:
    """Sort fragments by position (stable) and concatenate their arguments."""
    ordered = sorted(fragments, key=lambda fragment: fragment.position)
    return [arg for fragment in ordered for arg in fragment.args]


class NodeHooks:
    """The hooks of one emulator kind, with typed signatures.

    :ivar manager: the plugin manager.
    :ivar emulator: the emulator kind.
    """

    def __init__(self, manager: pluggy.PluginManager, emulator: str) -> None:
        self.manager = manager
        self.emulator = emulator

    def caller(self, name: str) -> pluggy.HookCaller:
        """The hook ``name`` restricted to plugins of this kind or of no kind."""
        others = [
            plugin
            for plugin in self.manager.get_plugins()
            if emulator_kind(plugin) not in (None, self.emulator)
        ]
        return self.manager.subset_hook_caller(name, others)

    def call_first(self, name: str, **kwargs: Any) -> Any:
        """Call the *firstresult*, sync hook ``name`` (an emulator's own hook, declared in a
        spec module of the ``emucore.hookspecs`` entry point group).

        :return: the first non-``None`` result, ``None`` when no plugin answered or none
            implements it.
        """
        if not hasattr(self.manager.hook, name):
            return None
        return self.caller(name)(**kwargs)

    async def _each(
        self, hook: str, until: Callable[[Any], bool] | None = None, /, **kwargs: Any
    ) -> list[Any]:
        # Positional-only: a hook may have an argument called "name".
        return await call_each(self.manager, hook, self.emulator, until, **kwargs)

    def node_created(self, node: Node) -> None:
        """Call ``emu_node_created``."""
        self.caller("emu_node_created")(node=node)

    async def prepare(self, node: Node) -> None:
        """Call ``emu_prepare`` and await each result."""
        await self._each("emu_prepare", node=node)

    async def prepare_disks(self, node: Node) -> None:
        """Call ``emu_prepare_disks`` and await each result."""
        await self._each("emu_prepare_disks", node=node)

    def build_fragments(self, node: Node) -> list[ArgFragment]:
        """Call ``emu_build_args``: the fragments, in hook call order."""
        results = self.caller("emu_build_args")(node=node)
        return [fragment for fragments in results for fragment in fragments]

    def build_args(self, node: Node) -> list[str]:
        """Call ``emu_build_args`` and join the fragments into one argv."""
        return join_fragments(self.build_fragments(node))

    async def start(self, node: Node, argv: Sequence[str]) -> None:
        """Call ``emu_start``."""
        await self._each("emu_start", node=node, argv=argv)

    async def started(self, node: Node) -> None:
        """Call ``emu_started``."""
        await self._each("emu_started", node=node)

    async def stop(self, node: Node) -> None:
        """Call ``emu_stop``."""
        await self._each("emu_stop", node=node)

    async def stopped(self, node: Node) -> None:
        """Call ``emu_stopped``."""
        await self._each("emu_stopped", node=node)

    async def suspend(self, node: Node) -> None:
        """Call ``emu_suspend``."""
        await self._each("emu_suspend", node=node)

    async def resume(self, node: Node) -> None:
        """Call ``emu_resume``."""
        await self._each("emu_resume", node=node)

    async def reload(self, node: Node) -> None:
        """Call ``emu_reload``."""
        await self._each("emu_reload", node=node)

    async def attach_nio(self, node: Node, adapter: int, nio: Nio) -> None:
        """Call ``emu_attach_nio``."""
        await self._each("emu_attach_nio", node=node, adapter=adapter, nio=nio)

    async def update_nio(self, node: Node, adapter: int, old: Nio, new: Nio) -> None:
        """Call ``emu_update_nio``."""
        await self._each("emu_update_nio", node=node, adapter=adapter, old=old, new=new)

    async def detach_nio(self, node: Node, adapter: int, nio: Nio) -> None:
        """Call ``emu_detach_nio``."""
        await self._each("emu_detach_nio", node=node, adapter=adapter, nio=nio)

    async def set_link(self, node: Node, adapter: int, up: bool) -> None:
        """Call ``emu_set_link``."""
        await self._each("emu_set_link", node=node, adapter=adapter, up=up)

    async def capture(self, node: Node, adapter: int, path: Path) -> bool:
        """Call ``emu_capture``; whether an implementation took the capture."""
        results = await self._each("emu_capture", node=node, adapter=adapter, path=path)
        return any(result is True for result in results)

    async def stop_capture(self, node: Node, adapter: int) -> None:
        """Call ``emu_stop_capture``."""
        await self._each("emu_stop_capture", node=node, adapter=adapter)

    async def close(self, node: Node) -> None:
        """Call ``emu_close``."""
        await self._each("emu_close", node=node)

    def live_properties(self, node: Node) -> set[str]:
        """Call ``emu_live_properties``: every property some plugin can change live."""
        results = self.caller("emu_live_properties")(node=node)
        return {name for names in results for name in names}

    async def update_running(self, node: Node, previous: Any, changed: frozenset[str]) -> None:
        """Call ``emu_update_running``."""
        await self._each("emu_update_running", node=node, previous=previous, changed=changed)

    async def node_info(self, node: Node) -> dict[str, Any]:
        """Call ``emu_node_info`` and merge the answers (the first answer for a key wins)."""
        merged: dict[str, Any] = {}
        for answer in await self._each("emu_node_info", node=node):
            for key, value in answer.items():
                merged.setdefault(key, value)
        return merged

    async def create_disk_image(self, node: Node, name: str, options: Mapping[str, Any]) -> bool:
        """Call ``emu_create_disk_image``; whether an implementation created the image."""
        results = await self._each(
            "emu_create_disk_image", _taken, node=node, name=name, options=options
        )
        return any(result is True for result in results)

    async def resize_disk_image(self, node: Node, name: str, extend: int) -> bool:
        """Call ``emu_resize_disk_image``; whether an implementation resized the image."""
        results = await self._each(
            "emu_resize_disk_image", _taken, node=node, name=name, extend=extend
        )
        return any(result is True for result in results)

    async def delete_disk_image(self, node: Node, name: str) -> bool:
        """Call ``emu_delete_disk_image``; whether an implementation deleted the image."""
        results = await self._each("emu_delete_disk_image", _taken, node=node, name=name)
        return any(result is True for result in results)

    async def save_state(self, node: Node, name: str) -> bool:
        """Call ``emu_save_state``; whether an implementation saved the state."""
        results = await self._each("emu_save_state", _taken, node=node, name=name)
        return any(result is True for result in results)

    async def restore_state(self, node: Node, name: str) -> bool:
        """Call ``emu_restore_state``; whether an implementation restores the state."""
        results = await self._each("emu_restore_state", _taken, node=node, name=name)
        return any(result is True for result in results)

    async def list_states(self, node: Node) -> list[SavedState] | None:
        """Call ``emu_list_states``: the states, or ``None`` when no implementation answered
        (no plugin of this emulator handles states)."""
        answers = await self._each("emu_list_states", node=node)
        if not answers:
            return None
        return [state for states in answers for state in states]

    async def delete_state(self, node: Node, name: str) -> bool:
        """Call ``emu_delete_state``; whether an implementation deleted the state."""
        results = await self._each("emu_delete_state", _taken, node=node, name=name)
        return any(result is True for result in results)
