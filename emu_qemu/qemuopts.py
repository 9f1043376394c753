"""Build QEMU option strings (``driver,key=value,...``) that cannot be injected into.

QEMU splits option strings at commas and reads ``,,`` as a literal comma. Every value we
place inside such a string goes through :func:`escape`, so a file named
``x.qcow2,if=none,file=/etc/shadow`` stays one file name. Keys are ours, never the user's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_KEY = re.compile(r"[a-z][a-z0-9_.\-]*")

Value = str | int | bool


def escape(value: str) -> str:
    """Double every comma, QEMU's escape inside an option string."""
    return value.replace(",", ",,")


def render(value: Value) -> str:
    """A value as QEMU reads it: booleans as on/off, strings escaped."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def opts(head: str | None, pairs: Mapping[str, Value | None]) -> str:
    """``head,key=value,...`` with each value escaped; ``None`` values are left out.

    :param head: the implied first item (a driver or device type), or ``None``.
    :param pairs: keys (ours, checked) and values (anyone's, escaped).
    """
    items = [] if head is None else [escape(head)]
    for key, value in pairs.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a QEMU option key: {key!r}")
        if value is not None:
            items.append(f"{key}={render(value)}")
    return ",".join(items)
