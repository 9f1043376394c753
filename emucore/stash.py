"""Typed per-node storage for plugins: state lives on the node, behaviour in hook modules.

A plugin declares a key once, at module level, and reads and writes its own state through
it; mypy checks the type, and two plugins cannot clash by picking the same string::

    QMP = StashKey[QMPClient]()
    node.stash[QMP] = client
    client = node.stash[QMP]
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key for :class:`Stash`; its identity is the key, its type parameter the value type."""

    __slots__ = ()


class Stash:
    """A mapping from :class:`StashKey` to values of the key's type."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        """The value for ``key``, or ``default`` when it is not set."""
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        """The value for ``key``, storing ``default`` first when it is not set."""
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def pop(self, key: StashKey[T], default: D) -> T | D:
        """Remove ``key`` and return its value, or ``default`` when it is not set."""
        return cast("T | D", self._data.pop(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
