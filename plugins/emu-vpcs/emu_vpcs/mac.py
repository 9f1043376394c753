"""The node's MAC address, ``00:50:79:66:68:XX``: VPCS lets only the last byte be chosen (``-m``).

``mac_address`` fixes XX. Otherwise XX is derived from the project and node ids, so a node
keeps its MAC across runs and hosts, and moves to the next free value when another VPCS node
of the same project (in this process) holds it: two PCs with one MAC on a segment would
steal each other's frames. With one byte there are 256 MACs per project.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from emu_vpcs import positions
from emu_vpcs.properties import VpcsNode
from emucore import hookimpl
from emucore.errors import ConfigError
from emucore.records import ArgFragment
from emucore.stash import StashKey

EMULATOR = "vpcs"

MAC_BYTE = StashKey[int]()


def _derived(node: VpcsNode) -> int:
    digest = hashlib.sha256(f"{node.project.id}/{node.config.id}".encode()).digest()
    return digest[0]


def _take(node: VpcsNode, byte: int) -> VpcsNode | None:
    """Claim ``byte`` in the node's project; the node holding it already, if another."""
    other: VpcsNode | None = node.claims.take(node, "VPCS MAC", (node.project.id, byte))
    return other


@hookimpl(trylast=True)
def emu_node_created(node: VpcsNode) -> None:
    """Claim the node's MAC within its project (the session releases the claim).

    :raises ConfigError: ``mac_address`` is held by another VPCS node, or all 256 are taken.
    """
    where = f"node {node.name!r}"
    wanted = node.properties.mac_address
    if wanted:
        byte = int(wanted[-2:], 16)
        other = _take(node, byte)
        if other is not None:
            raise ConfigError(
                where,
                [f"$.mac_address: {wanted} is held by VPCS node {other.name!r}; choose another"],
            )
    else:
        start = _derived(node)
        free = (b % 256 for b in range(start, start + 256) if _take(node, b % 256) is None)
        byte = next(free, -1)
        if byte < 0:
            raise ConfigError(
                where, ["$.mac_address: all 256 VPCS MAC addresses of this project are taken"]
            )
    node.stash[MAC_BYTE] = byte


@hookimpl(trylast=True)
def emu_build_args(node: VpcsNode) -> Sequence[ArgFragment]:
    """``-m XX``: the last byte of the MAC address."""
    return [ArgFragment(positions.MAC, ("-m", str(node.stash[MAC_BYTE])), "vpcs.mac")]
