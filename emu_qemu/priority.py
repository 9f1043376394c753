"""Process priority: GNS3's names mapped to nice values, applied once QEMU runs."""

from __future__ import annotations

import os

from emu_qemu.contract import QemuNode, qemu_pid
from emucore import hookimpl

EMULATOR = "qemu"

NICE = {"realtime": -20, "very high": -15, "high": -5, "normal": 0, "low": 5, "very low": 19}


@hookimpl(trylast=True)
def emu_started(node: QemuNode) -> None:
    """renice QEMU; a host that may not raise priority gets a warning, not a failure."""
    pid = qemu_pid(node)
    nice = NICE[node.properties.process_priority]
    if pid is None or nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except PermissionError:
        node.emit(
            "warning",
            f"process_priority: not allowed to set nice {nice} ({node.properties.process_priority})"
            " as this user; QEMU keeps the default priority",
        )
