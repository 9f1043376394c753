"""Things only one node may have at a time: a fixed console port, an image used without a
linked clone, a range of MAC addresses.

A :class:`Claims` registry belongs to the host, not to a module: a session makes its own
unless the host passes one (``Session(..., claims=...)``), and a host running several
projects at once (``emu serve``) shares one between their sessions, so that two projects
cannot both be promised the same port. A claim belongs to a node; the session releases a
node's claims when the node is closed or removed, or when its creation fails, so a plugin
only claims (in ``emu_node_created``) and never has to release.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from emucore.errors import ConfigError

if TYPE_CHECKING:
    from emucore.node import Node


class Claims:
    """Who holds what, by kind (``"tcp port"``) and key (``5000``)."""

    def __init__(self) -> None:
        self._holders: dict[tuple[str, Hashable], Node] = {}
        self._ranges: dict[tuple[str, Hashable], dict[Node, tuple[int, int]]] = {}

    def take(self, node: Node, kind: str, key: Hashable) -> Node | None:
        """Claim ``key`` of ``kind`` for ``node``.

        :return: ``None`` when ``node`` holds it now (also when it held it already), else
            the other node that holds it (nothing is claimed then).
        """
        holder = self._holders.setdefault((kind, key), node)
        return None if holder is node else holder

    def take_range(
        self, node: Node, kind: str, scope: Hashable, low: int, high: int
    ) -> Node | None:
        """Claim the integers ``[low, high)`` of ``kind`` within ``scope`` (a project id...).

        :return: ``None`` when claimed (a previous range of ``node`` is replaced), else the
            node whose range overlaps (nothing is claimed then).
        """
        ranges = self._ranges.setdefault((kind, scope), {})
        for other, (other_low, other_high) in ranges.items():
            if other is not node and low < other_high and other_low < high:
                return other
        ranges[node] = (low, high)
        return None

    def release(self, node: Node) -> None:
        """Give back everything ``node`` holds."""
        self._holders = {key: holder for key, holder in self._holders.items() if holder is not node}
        for ranges in self._ranges.values():
            ranges.pop(node, None)

    def held_by(self, node: Node) -> list[tuple[str, Hashable]]:
        """``(kind, key)`` of each single claim ``node`` holds."""
        return [key for key, holder in self._holders.items() if holder is node]


def claim_tcp_port(node: Node, port: int, field: str) -> None:
    """Claim a fixed TCP port a node's property asks for (its console...).

    :raises ConfigError: another node holds it; the error names ``field``.
    """
    other = node.claims.take(node, "tcp port", port)
    if other is not None:
        raise ConfigError(
            f"node {node.name!r}",
            [f"$.{field}: port {port} is already taken by node {other.name!r}; choose another"],
        )
