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

# Keys are ours, a small fixed set: each is checked once, not at every start.
_checked_keys: set[str] = set()


def escape(value: str) -> str:
    """Double every comma, QEMU's escape inside an option string."""
    return value.replace(",", ",,")


def opts(head: str | None, pairs: Mapping[str, Value | None]) -> str:
    """``head,key=value,...`` with each value escaped; ``None`` values are left out.

    :param head: the implied first item (a driver or device type), or ``None``.
    :param pairs: keys (ours, checked) and values (anyone's, escaped).
    """
    items = [] if head is None else [head.replace(",", ",,")]
    for key, value in pairs.items():
        if key not in _checked_keys:
            if not _KEY.fullmatch(key):
                raise ValueError(f"not a QEMU option key: {key!r}")
            _checked_keys.add(key)
        # Inlined rather than a helper: this runs for every adapter at every start.
        if value is True:
            items.append(f"{key}=on")
        elif value is False:
            items.append(f"{key}=off")
        elif isinstance(value, int):
            items.append(f"{key}={value}")  # no comma to escape
        elif value is not None:  # a str, or anything else a caller passes: escaped
            items.append(f"{key}={str(value).replace(',', ',,')}")
    return ",".join(items)
