"""emu core: models, hook specs, plugin loading and the node runtime.

Importing this package loads no plugin; :func:`emucore.plugins.make_plugin_manager` does.
Plugins import :data:`hookimpl` to mark their hook implementations.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("emucore")
"""Marker for hook implementations: ``@hookimpl`` or ``@hookimpl(trylast=True)``."""

hookspec = pluggy.HookspecMarker("emucore")
"""Marker for hook specs, for an emulator that declares hooks of its own (in a spec module
named in the ``emucore.hookspecs`` entry point group)."""

__all__ = ["__version__", "hookimpl", "hookspec"]
