"""Packet capture on any adapter of a running node, with QEMU's ``filter-dump``.

The filter sits on the NIC's side of the adapter's hub (netdev ``nic<n>``), so it sees the
frames of both directions and keeps capturing across live relinks: the capture belongs to
the adapter, not to the link. It is added and removed over QMP (``object-add`` /
``object-del``) without restarting the node.
"""

from __future__ import annotations

from pathlib import Path

from emu_qemu.contract import QemuNode, monitor_of
from emucore import hookimpl

EMULATOR = "qemu"


def filter_id(adapter: int) -> str:
    """The QOM id of the capture filter on ``adapter``."""
    return f"capture{adapter}"


@hookimpl(trylast=True)
async def emu_capture(node: QemuNode, adapter: int, path: Path) -> bool:
    """Add a ``filter-dump`` writing pcap to ``path``."""
    arguments = {"qom-type": "filter-dump", "id": filter_id(adapter), "netdev": f"nic{adapter}"}
    await monitor_of(node).execute("object-add", arguments | {"file": str(path)})
    return True


@hookimpl(trylast=True)
async def emu_stop_capture(node: QemuNode, adapter: int) -> None:
    """Remove the filter; QEMU closes the file."""
    await monitor_of(node).execute("object-del", {"id": filter_id(adapter)})
