"""The ``qemu`` emulator kind: its node properties and host settings."""

from __future__ import annotations

from collections.abc import Sequence

from emu_qemu.properties import QemuProperties, QemuSettings
from emucore import hookimpl
from emucore.records import EmulatorInfo

EMULATOR = "qemu"


@hookimpl
def emu_emulators() -> Sequence[EmulatorInfo]:
    """Declare the ``qemu`` kind."""
    return [
        EmulatorInfo(
            name="qemu",
            properties=QemuProperties,
            settings=QemuSettings,
            description="QEMU virtual machines (GNS3-compatible node properties)",
        )
    ]
