"""Which QEMU binary runs a node: from ``qemu_path`` or ``platform``, with its version.

The version is read from ``-version`` once per binary (keyed by path, size and mtime).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from emu_qemu import positions
from emu_qemu.properties import PLATFORMS, QemuProperties, QemuSettings
from emucore import hookimpl
from emucore.errors import NodeError
from emucore.models import HostSettings
from emucore.node import Node
from emucore.paths import find_program
from emucore.records import ArgFragment, CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"

DEFAULT_PLATFORM = "x86_64"
_VERSION = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")


@attrs.frozen
class QemuBinary:
    """A QEMU system emulator binary.

    :ivar path: absolute path.
    :ivar platform: the emulated architecture (``x86_64``...).
    :ivar version: ``(major, minor, micro)``.
    """

    path: Path
    platform: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        """The version as ``7.2.22``."""
        return ".".join(map(str, self.version))


BINARY = StashKey[QemuBinary]()


class BinaryError(NodeError):
    """The QEMU binary is missing, not executable, or not a QEMU."""


def platform_of(binary_name: str) -> str | None:
    """The platform a binary name implies (``qemu-system-arm`` → ``arm``, ``qemu-kvm`` → x86_64)."""
    if binary_name == "qemu-kvm":
        return "x86_64"
    match = re.fullmatch(r"qemu-system-([a-z0-9_]+)(?:\.exe)?", binary_name)
    return match.group(1) if match else None


def find_binary(props: QemuProperties, settings: QemuSettings | None, node: str) -> QemuBinary:
    """Resolve the node's binary from ``qemu_path`` (or ``platform``) and read its version.

    :raises BinaryError: naming the property that led to a missing or unusable binary.
    """
    if props.qemu_path:
        field, wanted = "qemu_path", props.qemu_path
    else:
        field = "platform"
        wanted = f"qemu-system-{props.platform or DEFAULT_PLATFORM}"
    try:
        path = find_program(wanted, settings.binary_dirs if settings else ())
    except LookupError as exc:
        raise BinaryError(node, f"{field}: QEMU binary {exc}") from None
    platform = platform_of(path.name)
    if platform is None or platform not in PLATFORMS:
        raise BinaryError(
            node, f"{field}: cannot tell the platform of {path.name!r} (expected qemu-system-ARCH)"
        )
    if props.platform and props.qemu_path and props.platform != platform:
        raise BinaryError(
            node,
            f"platform: {props.platform!r} does not match qemu_path {path.name!r} ({platform})",
        )
    stat = path.stat()
    version = _read_version(path, stat.st_size, stat.st_mtime_ns)
    if version is None:
        raise BinaryError(node, f"{field}: {str(path)!r} did not report a QEMU version")
    return QemuBinary(path, platform, version)


@functools.cache
def _read_version(path: Path, _size: int, _mtime: int) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [str(path), "-version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out)
    if not match:
        return None
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def binary_of(node: Node) -> QemuBinary:
    """The node's binary, resolved once per start (``emu_prepare``) or now."""
    found = node.stash.get(BINARY, None)
    if found is None:
        found = find_binary(node.properties, node.emulator_settings, node.name)
        node.stash[BINARY] = found
    return found


@hookimpl(trylast=True)
async def emu_prepare(node: Node) -> None:
    """Resolve the binary afresh at each start (it may have been upgraded), in a thread: the
    first ``-version`` of a binary may take a while."""
    node.stash[BINARY] = await asyncio.to_thread(
        find_binary, node.properties, node.emulator_settings, node.name
    )


@hookimpl(trylast=True)
def emu_build_args(node: Node) -> Sequence[ArgFragment]:
    """The binary is argv[0]."""
    return [ArgFragment(positions.PROGRAM, (str(binary_of(node).path),), "qemu.binary")]


@hookimpl
def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report the QEMU binaries found in the host's binary_dirs and on PATH."""
    raw = settings.emulators.get("qemu", {})
    dirs = [str(d) for d in raw.get("binary_dirs", ())] if isinstance(raw, Mapping) else []
    search = os.pathsep.join([*dirs, os.environ.get("PATH", "")])
    results = []
    for platform in ("x86_64", "i386", "aarch64", "arm"):
        name = f"qemu-system-{platform}"
        located = shutil.which(name, path=search)
        if located is None:
            if platform == DEFAULT_PLATFORM:
                results.append(
                    CheckResult(name, False, "not found on PATH; apt-get install qemu-system-x86")
                )
            continue
        path = Path(located)
        stat = path.stat()
        version = _read_version(path, stat.st_size, stat.st_mtime_ns)
        detail = (
            f"{path}, version {'.'.join(map(str, version))}" if version else f"{path}, no version"
        )
        results.append(CheckResult(name, version is not None, detail))
    qemu_img = shutil.which("qemu-img")
    results.append(
        CheckResult(
            "qemu-img", qemu_img is not None, qemu_img or "not found; apt-get install qemu-utils"
        )
    )
    return results
