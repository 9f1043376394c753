"""The guest CID of a node: its vsock address, unique on the host (``%guest-cid%``).

A guest with a ``vhost-vsock-pci`` device is reached from the host at its CID, so two guests
of one host must never share one (QEMU would fail to start the second). As in GNS3, a node
gets its console port as CID when it has a fixed one, else the lowest free CID from 3 (0–2
are reserved). The CID is claimed on the host's :class:`~emucore.claims.Claims` the first time
the node's options use ``%guest-cid%`` (when the node is created), and given back with the
node. Not a plugin: :mod:`emu_qemu.userargs` replaces the placeholder, :mod:`emu_qemu.options`
lets ``-device vhost-vsock-pci,guest-cid=<the node's CID>`` through.
"""

from __future__ import annotations

from itertools import chain

from emu_qemu.contract import QemuNode
from emucore.errors import ConfigError

KIND = "guest cid"
FIRST, LAST = 3, 65535


def claimed_cid(node: QemuNode) -> int | None:
    """The CID the node holds, if it claimed one."""
    held = [key for kind, key in node.claims.held_by(node) if kind == KIND]
    return held[0] if held and isinstance(held[0], int) else None


def claim_guest_cid(node: QemuNode) -> int:
    """The node's CID, claimed now if it holds none yet.

    :raises ConfigError: every CID from 3 to 65535 is taken.
    """
    held = claimed_cid(node)
    if held is not None:
        return held
    props = node.properties
    preferred = [props.console] if props.console and props.console_type != "none" else []
    for cid in chain(preferred, range(FIRST, LAST + 1)):
        if cid >= FIRST and node.claims.take(node, KIND, cid) is None:
            return cid
    raise ConfigError(
        f"node {node.name!r}",
        [f"$.options: no free guest CID is left for %guest-cid% ({FIRST}-{LAST} are taken)"],
    )
