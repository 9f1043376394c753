"""A node's ``options`` as argv items: split like a shell would, placeholders replaced once.

Not a plugin: ``qemu.options`` checks and emits them, ``qemu.machine`` looks for the user's
own ``-uuid`` in them. Placeholders are replaced inside each argument after splitting (so a
name with spaces stays one argument), with commas doubled.
"""

from __future__ import annotations

import re
import shlex

from emu_qemu.contract import QemuNode, console_port
from emu_qemu.guestcid import claim_guest_cid
from emu_qemu.qemuopts import escape
from emucore.errors import ConfigError

PLACEHOLDER = re.compile(r"%(?:vm-name|vm-id|project-id|project-path|console-port|guest-cid)%")


def _raw_placeholders(node: QemuNode) -> dict[str, str]:
    console = node.console.port if node.console else console_port(node)
    values = {
        "%vm-name%": node.name,
        "%vm-id%": str(node.config.id),
        "%project-id%": str(node.project.id),
        "%project-path%": str(node.project.directory),
        "%console-port%": str(console),
    }
    if "%guest-cid%" in node.properties.options:  # claimed only by nodes that use it
        values["%guest-cid%"] = str(claim_guest_cid(node))
    return values


def placeholders(node: QemuNode) -> dict[str, str]:
    """The values of ``%vm-name%``, ``%vm-id%``, ``%project-id%``, ``%project-path%``,
    ``%console-port%`` (a real port: the console module picks one up front when options use
    it) and ``%guest-cid%`` (claimed, unique on the host: :mod:`emu_qemu.guestcid`), with
    commas doubled: most QEMU arguments are option strings, and a name or path must not add
    keys to the user's option."""
    return {key: escape(value) for key, value in _raw_placeholders(node).items()}


def user_argv(node: QemuNode) -> list[str]:
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
