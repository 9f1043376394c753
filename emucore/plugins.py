"""Build the plugin manager: specs, block list, entry points, in that order.

Nothing is loaded at import time. A host calls :func:`make_plugin_manager` once and passes
the manager to :class:`emucore.session.Session`; tests build a fresh one per test.

Besides the core's specs (:mod:`emucore.hookspecs`), a distribution may declare hooks of its
own (QEMU's pieces share the binary through one) in a spec module named in the
``emucore.hookspecs`` entry point group: the specs belong to the distribution, not to a
plugin, so blocking the plugin that implements them leaves the spec (and a clear "nobody
implements it" for the callers) in place.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import pluggy

from emucore import hookspecs
from emucore.errors import PluginError
from emucore.hooks import emulator_kind, is_may_be_async
from emucore.records import EmulatorInfo

PROJECT_NAME = "emucore"
ENTRY_POINT_GROUP = "emucore.plugins"
SPEC_ENTRY_POINT_GROUP = "emucore.hookspecs"
BLOCK_ENV = "EMU_BLOCK_PLUGINS"


class EmuPluginManager(pluggy.PluginManager):
    """A plugin manager that refuses, at registration, a wrapper on a *may be async* hook
    (see :mod:`emucore.hooks`): it would see coroutines that have not run."""

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register ``plugin`` like pluggy does, then check its wrappers.

        :raises PluginError: a wrapper implements a *may be async* hook.
        """
        registered = super().register(plugin, name)
        if registered is None:
            return None
        for caller in self.get_hookcallers(plugin) or ():
            if not is_may_be_async(caller):
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    self.unregister(plugin)
                    raise PluginError(
                        f"plugin {registered!r}: {caller.name} may be async, so it cannot be"
                        " wrapped; use tryfirst or trylast to run before or after the others"
                    )
        return registered


def blocked_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Plugin names listed in ``EMU_BLOCK_PLUGINS`` (comma-separated; ``no:`` prefix allowed)."""
    value = (os.environ if environ is None else environ).get(BLOCK_ENV, "")
    names = (item.strip() for item in value.split(","))
    return [name.removeprefix("no:") for name in names if name]


def make_plugin_manager(
    *,
    blocked: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
    entry_points: bool = True,
    environ: Mapping[str, str] | None = None,
) -> pluggy.PluginManager:
    """A plugin manager with emu's hook specs and the installed plugins.

    :param blocked: plugin names not to load, as with ``pytest -p no:NAME``; joined with
        the names in ``EMU_BLOCK_PLUGINS``.
    :param plugins: extra ``(name, plugin)`` pairs to register after the entry points (a host
        or a test adding its own plugin without installing it).
    :param entry_points: load the ``emucore.plugins`` entry points (turn off for tests that
        want only ``plugins``).
    :param environ: where to read ``EMU_BLOCK_PLUGINS``; defaults to ``os.environ``.
    :raises PluginError: a plugin implements a hook that does not exist or with wrong
        arguments, or fails to import.
    """
    manager = EmuPluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name in [*blocked, *blocked_from_env(environ)]:
        manager.set_blocked(name)
    # Even without plugin entry points: plugins registered by hand may implement them. Specs
    # are blocked by their own entry point's name ("qemu.hookspecs"), not by a plugin's.
    for entry_point in importlib.metadata.entry_points(group=SPEC_ENTRY_POINT_GROUP):
        if manager.is_blocked(entry_point.name):
            continue
        try:
            manager.add_hookspecs(entry_point.load())
        except ImportError as exc:
            raise PluginError(f"hook specs {entry_point.value!r} failed to import: {exc}") from exc
    try:
        if entry_points:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name, plugin in plugins:
            if not manager.is_blocked(name):
                manager.register(plugin, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} is invalid: {exc}") from exc
    except ImportError as exc:
        raise PluginError(f"a plugin failed to import: {exc}") from exc
    return manager


def emulators(manager: pluggy.PluginManager) -> dict[str, EmulatorInfo]:
    """The emulator kinds the loaded plugins provide, by name.

    :raises PluginError: two plugins provide the same kind.
    """
    found: dict[str, EmulatorInfo] = {}
    for infos in manager.hook.emu_emulators():
        for info in infos:
            if info.name in found:
                raise PluginError(
                    f"two plugins provide the emulator {info.name!r}; block one of them"
                    f" ({BLOCK_ENV}=NAME)"
                )
            found[info.name] = info
    return found


def describe_plugins(manager: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Registered and blocked plugins, for ``emu plugins``: name, module, entry point, hooks."""
    dist_of = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    rows: list[dict[str, Any]] = []
    for name, plugin in sorted(manager.list_name_plugin(), key=lambda pair: pair[0]):
        if plugin is None:
            rows.append({"name": name, "blocked": True})
            continue
        dist = dist_of.get(id(plugin))
        rows.append(
            {
                "name": name,
                "blocked": False,
                "module": plugin.__name__ if isinstance(plugin, ModuleType) else repr(plugin),
                "distribution": f"{dist.project_name} {dist.version}" if dist else None,
                "emulator": emulator_kind(plugin),
                "hooks": sorted(c.name for c in manager.get_hookcallers(plugin) or ()),
            }
        )
    return rows
