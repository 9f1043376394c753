"""Which VPCS binary runs a node (``vpcs_path`` or ``vpcs`` on the search path), and its version.

The version is read from ``vpcs -v`` once per binary (keyed by path, size and mtime).
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs

from emu_vpcs import positions
from emu_vpcs.properties import VpcsNode, VpcsSettings
from emucore import hookimpl
from emucore.convert import structure
from emucore.errors import ConfigError, NodeError
from emucore.models import HostSettings
from emucore.paths import find_program
from emucore.records import ArgFragment, CheckResult
from emucore.stash import StashKey

EMULATOR = "vpcs"

_VERSION = re.compile(r"version (\d+\.\d+\w*)")


@attrs.frozen
class VpcsBinary:
    """A VPCS binary.

    :ivar path: absolute path.
    :ivar version: as VPCS prints it (``0.5b2``).
    """

    path: Path
    version: str


BINARY = StashKey[VpcsBinary]()


class BinaryError(NodeError):
    """The VPCS binary is missing, not executable, or not VPCS."""


def locate(wanted: str, settings: VpcsSettings) -> VpcsBinary:
    """Resolve ``wanted`` (a path, or a name looked up on the search path) and read its version.

    :raises LookupError: saying what is wrong with the binary and what to do.
    """
    try:
        path = find_program(wanted, settings.binary_dirs)
    except LookupError as exc:
        raise LookupError(f"VPCS binary {exc}; Debian: apt-get install vpcs") from None
    stat = path.stat()
    version = _read_version(path, stat.st_size, stat.st_mtime_ns)
    if version is None:
        raise LookupError(f"{str(path)!r} did not report a VPCS version (-v)")
    return VpcsBinary(path, version)


@functools.cache
def _read_version(path: Path, _size: int, _mtime: int) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "-v"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    return match.group(1) if match and "Virtual PC Simulator" in out else None


def binary_of(node: VpcsNode) -> VpcsBinary:
    """The node's binary, resolved once per start (``emu_prepare``) or now."""
    found = node.stash.get(BINARY, None)
    if found is None:
        wanted = node.properties.vpcs_path or "vpcs"
        try:
            found = locate(wanted, node.emulator_settings)
        except LookupError as exc:
            raise BinaryError(node.name, f"vpcs_path: {exc}") from None
        node.stash[BINARY] = found
    return found


@hookimpl(trylast=True)
def emu_prepare(node: VpcsNode) -> None:
    """Resolve the binary afresh at each start (it may have been upgraded)."""
    node.stash.pop(BINARY, None)
    binary_of(node)


@hookimpl(trylast=True)
def emu_build_args(node: VpcsNode) -> Sequence[ArgFragment]:
    """The binary is argv[0]."""
    return [ArgFragment(positions.PROGRAM, (str(binary_of(node).path),), "vpcs.binary")]


@hookimpl
def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report the ``vpcs`` binary found on the search path, with its version."""
    try:
        vpcs_settings = structure(
            dict(settings.emulators.get("vpcs", {})), VpcsSettings, "settings.emulators.vpcs"
        )
        binary = locate("vpcs", vpcs_settings)
    except (ConfigError, LookupError) as exc:
        return [CheckResult("vpcs", False, str(exc))]
    return [CheckResult("vpcs", True, f"{binary.path}, version {binary.version}")]
