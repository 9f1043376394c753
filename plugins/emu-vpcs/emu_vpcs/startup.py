"""The startup script, ``startup.vpc`` in the node directory, that VPCS runs at each start.

Its text is ``startup_script`` when set; otherwise emu writes one ``ip`` command from the
``ip`` and ``gateway`` properties (or an empty script). It is written afresh at each start,
so what VPCS' ``save`` command writes there does not last: whatever should survive a
restart belongs in ``startup_script``. The script's absolute path
is VPCS' last argument, which also names the node directory in the command line (the
pidfile's marker).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from emu_vpcs import positions
from emu_vpcs.properties import VpcsNode, parse_interface
from emucore import hookimpl
from emucore.files import write_atomic
from emucore.models import NodeStatus
from emucore.records import ArgFragment

EMULATOR = "vpcs"

SCRIPT_NAME = "startup.vpc"


def script_path(node: VpcsNode) -> Path:
    """Where the node's startup script is written."""
    return node.directory / SCRIPT_NAME


def script_text(node: VpcsNode) -> str:
    """The startup script the node's properties describe."""
    props = node.properties
    if props.startup_script:
        lines = props.startup_script.splitlines()
    elif props.ip:
        interface = parse_interface(props.ip)
        command = f"ip {interface.ip} /{interface.network.prefixlen}"
        lines = [f"{command} {props.gateway}" if props.gateway else command]
    else:
        lines = []
    return "".join(f"{line}\n" for line in lines)


@hookimpl(trylast=True)
def emu_prepare(node: VpcsNode) -> None:
    """Write the script at each start (a dry run writes nothing)."""
    if node.status is NodeStatus.STARTING:
        write_atomic(script_path(node), script_text(node))


@hookimpl(trylast=True)
def emu_build_args(node: VpcsNode) -> Sequence[ArgFragment]:
    """The script's absolute path, VPCS' one positional argument, last."""
    return [ArgFragment(positions.STARTUP_SCRIPT, (str(script_path(node)),), "vpcs.startup")]
