"""Finding a QEMU binary and what it is: its platform (from its name) and its version.

Not a plugin: ``qemu.binary`` answers ``emu_qemu_binary`` with it, and ``emu check``
reports use it. The version is read from ``-version`` once per binary (path, size, mtime).
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import attrs

from emu_qemu.properties import PLATFORMS, QemuProperties, QemuSettings
from emucore.errors import NodeError
from emucore.paths import find_program

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
    version = read_version(path, stat.st_size, stat.st_mtime_ns)
    if version is None:
        raise BinaryError(node, f"{field}: {str(path)!r} did not report a QEMU version")
    return QemuBinary(path, platform, version)


@functools.cache
def read_version(path: Path, _size: int, _mtime: int) -> tuple[int, int, int] | None:
    """``(major, minor, micro)`` from ``PATH -version`` (cached by path, size and mtime)."""
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
