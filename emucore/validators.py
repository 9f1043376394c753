"""attrs validators whose messages read well after the field path: ``$.ram: must be ...``.

The converter (``emucore.convert``) prints ``"$.<path>: <message>"``, so a message here never
repeats the field name; it says what is allowed and what was given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

# Control characters would break log lines, console titles and QEMU's option parser.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def in_range(low: float, high: float) -> Validator:
    """Accept a number between ``low`` and ``high`` inclusive."""

    def check(_inst: Any, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be {_fmt(low)}..{_fmt(high)}, got {value!r}")

    return check


def one_of(choices: Collection[str]) -> Validator:
    """Accept one of ``choices`` (strings)."""

    def check(_inst: Any, _attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            allowed = ", ".join(sorted(choices))
            raise ValueError(f"must be one of {allowed}; got {value!r}")

    return check


def matches(pattern: str, what: str) -> Validator:
    """Accept a string fully matching ``pattern``; ``what`` describes it in the error."""
    compiled = re.compile(pattern)

    def check(_inst: Any, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}; got {value!r}")

    return check


def printable(max_length: int, *, allow_empty: bool = False) -> Validator:
    """Accept a string of at most ``max_length`` characters with no control characters."""

    def check(_inst: Any, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not value and not allow_empty:
            raise ValueError("must not be empty")
        if len(value) > max_length:
            raise ValueError(f"must be at most {max_length} characters, got {len(value)}")
        if _CONTROL.search(value):
            raise ValueError(f"must not contain control characters; got {value!r}")

    return check


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
