"""The machine itself: name, UUID, memory, CPUs, and no devices or displays by default."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from emu_qemu import positions
from emu_qemu.contract import QemuNode
from emu_qemu.qemuopts import opts
from emu_qemu.userargs import user_argv
from emucore import hookimpl
from emucore.records import ArgFragment

EMULATOR = "qemu"


def available_memory_mib() -> int | None:
    """MemAvailable from /proc/meminfo, in MiB (None where unknown)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


@hookimpl(trylast=True)
def emu_prepare(node: QemuNode) -> None:
    """Warn when the host has less free memory than the node asks for."""
    available = available_memory_mib()
    if available is not None and node.properties.ram > available:
        node.emit(
            "warning",
            f"ram: the node asks for {node.properties.ram} MiB but the host has only"
            f" {available} MiB available; it may swap or be killed",
        )


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """``-name``, ``-uuid`` (unless the user's options set one), ``-m``, ``-smp`` and
    ``-nodefaults -no-user-config -display none``: devices and displays are added by the
    plugins that need them, never by QEMU's defaults or a host config file."""
    props = node.properties
    # "guest=" explicitly: a bare name is QEMU's implied key, so a name like "process=x"
    # would set another key instead.
    identity = ["-name", opts(None, {"guest": node.name})]
    if "-uuid" not in user_argv(node):
        identity += ["-uuid", str(node.config.id)]
    resources = [
        "-m",
        f"{props.ram}M",
        "-smp",
        opts(None, {"cpus": props.cpus, "maxcpus": props.maxcpus or props.cpus}),
    ]
    control = ["-nodefaults", "-no-user-config", "-display", "none"]
    return [
        ArgFragment(positions.IDENTITY, identity, "qemu.machine"),
        ArgFragment(positions.RESOURCES, resources, "qemu.machine"),
        ArgFragment(positions.CONTROL, control, "qemu.machine"),
    ]
