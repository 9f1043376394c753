"""The node's MAC address, ``00:50:79:66:68:XX``: VPCS lets only the last byte be chosen (``-m``).

``mac_address`` fixes XX. Otherwise XX is derived from the project and node ids, so a node
keeps its MAC across runs and hosts, and moves to the next free value when another VPCS node
of the same project (in this process) holds it: two PCs with one MAC on a segment would
steal each other's frames. With one byte there are 256 MACs per project.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

from emu_vpcs import positions
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.node import Node
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"

MAC_BYTE = StashKey[int]()

# (project id, last byte) -> (node id, node name) of the VPCS node holding that MAC.
_holders: dict[tuple[uuid.UUID, int], tuple[uuid.UUID, str]] = {}


def _derived(node: Node) -> int:
    digest = hashlib.sha256(f"{node.project.id}/{node.config.id}".encode()).digest()
    return digest[0]


def _holder(node: Node, byte: int) -> str | None:
    """The name of another node holding ``byte`` in the node's project, if any."""
    held = _holders.get((node.project.id, byte))
    return held[1] if held is not None and held[0] != node.config.id else None


@hookimpl(trylast=True)
def emu_node_created(node: Node) -> None:
    """Claim the node's MAC within its project.

    :raises ConfigError: ``mac_address`` is held by another VPCS node, or all 256 are taken.
    """
    where = f"node {node.name!r}"
    wanted = node.properties.mac_address
    if wanted:
        byte = int(wanted[-2:], 16)
        other = _holder(node, byte)
        if other is not None:
            raise ConfigError(
                where,
                [f"$.mac_address: {wanted} is held by VPCS node {other!r}; choose another"],
            )
    else:
        start = _derived(node)
        free = (b % 256 for b in range(start, start + 256) if _holder(node, b % 256) is None)
        byte = next(free, -1)
        if byte < 0:
            raise ConfigError(
                where, ["$.mac_address: all 256 VPCS MAC addresses of this project are taken"]
            )
    _holders[(node.project.id, byte)] = (node.config.id, node.name)
    node.stash[MAC_BYTE] = byte


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """``-m XX``: the last byte of the MAC address."""
    return [ArgFragment(positions.MAC, ("-m", str(node.stash[MAC_BYTE])), "vpcs.mac")]


@hookimpl(trylast=True)
def emu_close(node: Node) -> None:
    """Give the MAC back to the project."""
    byte = node.stash.pop(MAC_BYTE, None)
    key = (node.project.id, byte) if byte is not None else None
    if key is not None and _holders.get(key, (None, ""))[0] == node.config.id:
        del _holders[key]
