"""Sphinx configuration for emu's documentation: Markdown pages (myst-parser) and autodoc.

Build: ``.venv/bin/sphinx-build -W -n --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Document the checkout itself, whether or not emu is installed in the running interpreter.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "emu"
author = "the emu maintainers"
copyright = "the emu maintainers"
release = "0.1.0"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}

html_theme = "alabaster"
html_title = "emu"
html_theme_options = {"description": "network-lab emulators as plugins", "fixed_sidebar": True}

nitpicky = True
# Standard library and third-party names in signatures: no intersphinx (builds run offline).
nitpick_ignore_regex = [
    (
        "py:class",
        r"(?!emucore\.)([\w.]+\.)?(Awaitable|Sequence|Mapping|Iterable|Callable|Iterator|Any"
        r"|Path|Queue|UUID|TracebackType|T|D|Enum|PluginManager|HookCaller|HookimplMarker"
        r"|_SubParsersAction|ArgumentParser|AsyncIterator|Pattern|Match|Future|StreamReader"
        r"|StreamWriter|socket|TimerHandle|Server|Namespace)",
    ),
    ("py:class", r"emucore\.stash\.(T|D)"),
    ("py:class", r"emucore\.(hooks\.F|node\.P|node\.S)"),
]

# Hook specs import their argument types under TYPE_CHECKING, so autodoc sees bare names:
# send each to the object the reference documents.
SHORT_NAMES = {
    "Node": "emucore.node.Node",
    "Nio": "emucore.models.Nio",
    "HostSettings": "emucore.models.HostSettings",
    "NodeConfig": "emucore.models.NodeConfig",
    "Project": "emucore.models.Project",
    "LinkFilters": "emucore.models.LinkFilters",
    "Link": "emucore.links.Link",
    "ArgFragment": "emucore.records.ArgFragment",
    "CheckResult": "emucore.records.CheckResult",
    "EmulatorInfo": "emucore.records.EmulatorInfo",
    "Stash": "emucore.stash.Stash",
    "NodeEvent": "emucore.models.NodeEvent",
    "LabImage": "emucore.records.LabImage",
    "TelnetConsole": "emucore.telnet.TelnetConsole",
    "ConsoleError": "emucore.telnet.ConsoleError",
    "NodeStatus": "emucore.models.NodeStatus",
    "NodeStateError": "emucore.errors.NodeStateError",
    "NodeError": "emucore.errors.NodeError",
    "ConfigError": "emucore.errors.ConfigError",
    "PluginError": "emucore.errors.PluginError",
    "PortError": "emucore.errors.PortError",
    "EmuError": "emucore.errors.EmuError",
    "LabRunner": "emucore.runner.LabRunner",
    "LabSpec": "emucore.lab.LabSpec",
}


def _resolve_short_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve ``Node`` as ``emucore.node.Node`` (and the other names in SHORT_NAMES)."""
    if node.get("refdomain") != "py":
        return None
    target = SHORT_NAMES.get(node.get("reftarget", ""))
    if target is None:
        return None
    domain = env.get_domain("py")
    for kind in ("class", "exc", "data", "obj"):
        found = domain.resolve_xref(env, node["refdoc"], app.builder, kind, target, node, contnode)
        if found is not None:
            return found
    return None


def setup(app: Any) -> None:
    """Register the short-name resolver."""
    app.connect("missing-reference", _resolve_short_name)
