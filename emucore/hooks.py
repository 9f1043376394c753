"""Typed, emulator-scoped calls into the plugin manager.

pluggy does not type-check hook calls and calls every plugin; :class:`NodeHooks` fixes both:
each method has the spec's signature, and only plugins scoped to the node's emulator kind
(``EMULATOR = kind``) or to no kind take part. It also applies the async rule of
:mod:`emucore.hookspecs`: implementations are called and awaited one by one, in call order.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from emucore.errors import PluginError
from emucore.plugins import emulator_kind
from emucore.records import ArgFragment

if TYPE_CHECKING:
    from emucore.models import Nio
    from emucore.node import Node


async def call_in_order(caller: pluggy.HookCaller, **kwargs: Any) -> list[Any]:
    """Call a *may be async* hook one implementation at a time, awaiting each result before
    the next implementation is called (pluggy's order: tryfirst, normal, trylast).

    Calling them all first would run a synchronous implementation before the body of an
    asynchronous one called earlier, and leave already-made coroutines un-awaited when a
    later implementation raises.

    :return: the non-``None`` results.
    :raises PluginError: a wrapper implements the hook (wrappers would see un-run
        coroutines; use tryfirst/trylast instead).
    """
    results = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {caller.name} may be async, so it cannot be"
                " wrapped; use tryfirst or trylast to run before or after the others"
            )
        result = impl.function(**{name: kwargs[name] for name in impl.argnames})
        if inspect.isawaitable(result):
            result = await result
        if result is not None:
            results.append(result)
    return results


def join_fragments(fragments: Sequence[ArgFragment]) -> list[str]:
    """Sort fragments by position (stable) and concatenate their arguments."""
    ordered = sorted(fragments, key=lambda fragment: fragment.position)
    return [arg for fragment in ordered for arg in fragment.args]


class NodeHooks:
    """The hooks of one emulator kind, with typed signatures."""

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

    def node_created(self, node: Node) -> None:
        """Call ``emu_node_created``."""
        self.caller("emu_node_created")(node=node)

    async def prepare(self, node: Node) -> None:
        """Call ``emu_prepare`` and await each result."""
        await call_in_order(self.caller("emu_prepare"), node=node)

    async def prepare_disks(self, node: Node) -> None:
        """Call ``emu_prepare_disks`` and await each result."""
        await call_in_order(self.caller("emu_prepare_disks"), node=node)

    def build_fragments(self, node: Node) -> list[ArgFragment]:
        """Call ``emu_build_args``: the fragments, in hook call order."""
        results = self.caller("emu_build_args")(node=node)
        return [fragment for fragments in results for fragment in fragments]

    def build_args(self, node: Node) -> list[str]:
        """Call ``emu_build_args`` and join the fragments into one argv."""
        return join_fragments(self.build_fragments(node))

    async def start(self, node: Node, argv: Sequence[str]) -> None:
        """Call ``emu_start``."""
        await call_in_order(self.caller("emu_start"), node=node, argv=argv)

    async def started(self, node: Node) -> None:
        """Call ``emu_started``."""
        await call_in_order(self.caller("emu_started"), node=node)

    async def stop(self, node: Node) -> None:
        """Call ``emu_stop``."""
        await call_in_order(self.caller("emu_stop"), node=node)

    async def stopped(self, node: Node) -> None:
        """Call ``emu_stopped``."""
        await call_in_order(self.caller("emu_stopped"), node=node)

    async def suspend(self, node: Node) -> None:
        """Call ``emu_suspend``."""
        await call_in_order(self.caller("emu_suspend"), node=node)

    async def resume(self, node: Node) -> None:
        """Call ``emu_resume``."""
        await call_in_order(self.caller("emu_resume"), node=node)

    async def reload(self, node: Node) -> None:
        """Call ``emu_reload``."""
        await call_in_order(self.caller("emu_reload"), node=node)

    async def attach_nio(self, node: Node, adapter: int, nio: Nio) -> None:
        """Call ``emu_attach_nio``."""
        await call_in_order(self.caller("emu_attach_nio"), node=node, adapter=adapter, nio=nio)

    async def update_nio(self, node: Node, adapter: int, old: Nio, new: Nio) -> None:
        """Call ``emu_update_nio``."""
        call = self.caller("emu_update_nio")
        await call_in_order(call, node=node, adapter=adapter, old=old, new=new)

    async def detach_nio(self, node: Node, adapter: int, nio: Nio) -> None:
        """Call ``emu_detach_nio``."""
        await call_in_order(self.caller("emu_detach_nio"), node=node, adapter=adapter, nio=nio)

    async def set_link(self, node: Node, adapter: int, up: bool) -> None:
        """Call ``emu_set_link``."""
        await call_in_order(self.caller("emu_set_link"), node=node, adapter=adapter, up=up)

    async def capture(self, node: Node, adapter: int, path: Path) -> bool:
        """Call ``emu_capture``; whether an implementation took the capture."""
        call = self.caller("emu_capture")
        results = await call_in_order(call, node=node, adapter=adapter, path=path)
        return any(result is True for result in results)

    async def stop_capture(self, node: Node, adapter: int) -> None:
        """Call ``emu_stop_capture``."""
        await call_in_order(self.caller("emu_stop_capture"), node=node, adapter=adapter)

    async def close(self, node: Node) -> None:
        """Call ``emu_close``."""
        await call_in_order(self.caller("emu_close"), node=node)
