"""The ``vpcs`` emulator kind: its node properties and host settings."""

from __future__ import annotations

from collections.abc import Sequence

from emu_vpcs.properties import VpcsProperties, VpcsSettings
from emucore import hookimpl
from emucore.records import EmulatorInfo

EMULATOR = "vpcs"


@hookimpl
def emu_emulators() -> Sequence[EmulatorInfo]:
    """Declare the ``vpcs`` kind."""
    return [
        EmulatorInfo(
            name="vpcs",
            properties=VpcsProperties,
            settings=VpcsSettings,
            description="VPCS virtual PCs: ping, trace and DHCP on one Ethernet port",
        )
    ]
