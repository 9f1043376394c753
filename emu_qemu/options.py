"""The node's ``options``: extra QEMU arguments, with placeholders, checked for safety.

Options are split like a shell would (``shlex``), placeholders are replaced inside each
argument after splitting (so a name with spaces stays one argument), and only then checked
against :mod:`emu_qemu.optionpolicy` (an allow-list of options, read the way QEMU reads
them): anything that could reach host files, devices or sockets is refused unless the host
sets ``HostSettings.allow_unsafe_options``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from emu_qemu import positions
from emu_qemu.console import console_port
from emu_qemu.optionpolicy import unsafe_options
from emu_qemu.qemuopts import escape
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.node import Node
from emucore.records import ArgFragment

EMULATOR = "qemu"

PLACEHOLDER = re.compile(r"%(?:vm-name|vm-id|project-id|project-path|console-port)%")


def _raw_placeholders(node: Node) -> dict[str, str]:
    console = node.console.port if node.console else console_port(node)
    return {
        "%vm-name%": node.name,
        "%vm-id%": str(node.config.id),
        "%project-id%": str(node.project.id),
        "%project-path%": str(node.project.directory),
        "%console-port%": str(console),
    }


def placeholders(node: Node) -> dict[str, str]:
    """The values of ``%vm-name%``, ``%vm-id%``, ``%project-id%``, ``%project-path%`` and
    ``%console-port%`` (a real port: the console module picks one up front when options use
    it), with commas doubled: most QEMU arguments are option strings, and a name or path must
    not add keys to the user's option."""
    return {key: escape(value) for key, value in _raw_placeholders(node).items()}


def user_argv(node: Node) -> list[str]:
    """The node's options as argv items, placeholders replaced once (not yet safety-checked).

    :raises ConfigError: a placeholder that stands for a whole item of an option string has
        a value QEMU would read as a key (``=``) or join to the item before (leading ``,``).
    """
    options: str = node.properties.options
    try:
        words = shlex.split(options)
    except ValueError as exc:  # the property validator catches this first
        raise ConfigError(f"node {node.name!r}", [f"$.options: {exc}"]) from None
    if "%" not in options:
        return words
    raw, escaped = _raw_placeholders(node), placeholders(node)
    problems = [
        problem
        for word in words
        if not word.startswith("-")
        for item in _items_of(word)
        if (problem := _placeholder_misplaced(item, raw))
    ]
    if problems:
        raise ConfigError(f"node {node.name!r}", problems)
    # One pass: placeholder text inside a value (a node named "%vm-id%") stays as it is.
    return [PLACEHOLDER.sub(lambda match: escaped[match.group(0)], word) for word in words]


def _placeholder_misplaced(item: str, raw: dict[str, str]) -> str:
    """Why a placeholder in ``item`` could change what QEMU reads, or ''.

    Placeholders belong in values: in a key (``%vm-name%=x``) the node's name would choose
    the key; as a whole item, a value holding ``=`` becomes a key=value, and a leading comma
    joins the item before.
    """
    key, sep, _ = item.partition("=")
    found = PLACEHOLDER.search(key) if sep else None
    if found:
        return f"$.options: {found.group(0)} cannot stand in a key ({item!r}); use it in a value"
    if item in raw and ("=" in raw[item] or raw[item].startswith(",")):
        return (
            f"$.options: {item} stands for a whole item here, and its value {raw[item]!r} would"
            f" reach QEMU as a key=value; write it as the value of a key (e.g. product={item})"
        )
    return ""


def _items_of(word: str) -> list[str]:
    """The items of an option string as written (split at single commas, not at ``,,``)."""
    return [item.replace("\0", ",") for item in word.replace(",,", "\0").split(",")]


def check_options(node: Node, argv: Sequence[str] | None = None) -> None:
    """Refuse unsafe options unless the host allows them.

    :param argv: the node's :func:`user_argv`, when the caller has it already.
    :raises ConfigError: naming the ``options`` field and each unsafe option.
    """
    if node.settings.allow_unsafe_options:
        return
    unsafe = unsafe_options(user_argv(node) if argv is None else argv)
    if unsafe:
        listed = ", ".join(dict.fromkeys(unsafe))
        raise ConfigError(
            f"node {node.name!r}",
            [
                f"$.options: {listed} could reach host files, devices or sockets, or are not"
                " among the options a node may set (see the QEMU node reference); use the"
                " node's properties instead, or let the host allow unsafe options"
                " (HostSettings.allow_unsafe_options)"
            ],
        )


@hookimpl(trylast=True)
def emu_node_created(node: Node) -> None:
    """Refuse misplaced placeholders and unsafe options as soon as the node is described."""
    check_options(node, user_argv(node))


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """The user's options, last, so they can refine what emu generated."""
    argv = user_argv(node)
    check_options(node, argv)
    return [ArgFragment(positions.USER_OPTIONS, argv, "qemu.options")]
