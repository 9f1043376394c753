"""Choose the accelerator: KVM only when a functional probe shows that guests really run.

``/dev/kvm`` existing proves little: on some hosts (nested virtualisation, CPUs missing
features) KVM accepts a guest that then hangs right after the BIOS. So the probe boots a Linux
kernel under KVM with no root file system and waits for its panic (``-no-reboot`` turns the
reboot into an exit). A host without any kernel gets a shallower probe: 16 bytes of real-mode
code that write to an exit port. Results are cached per binary, kernel and host kernel, in
memory and in ``<cache>/kvm-probe.json`` (one day), since a failing probe costs its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import platform
import signal
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import attrs

from emu_qemu import positions
from emu_qemu.contract import QemuNode, binary
from emu_qemu.properties import QemuProperties, QemuSettings, host_qemu_settings
from emu_qemu.qemubinary import QemuBinary, find_binary
from emucore import hookimpl
from emucore.errors import ConfigError, EmuError, NodeError
from emucore.models import HostSettings
from emucore.paths import cache_dir, probe_kernels_dir
from emucore.process import signal_child, spawn
from emucore.records import ArgFragment, CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"
MODE_ENV = "EMU_QEMU_KVM"
CACHE_SECONDS = 24 * 3600
log = logging.getLogger("emu.qemu")

# Which QEMU platforms a host architecture can accelerate.
_HOST_PLATFORMS = {"x86_64": {"x86_64", "i386"}, "aarch64": {"aarch64", "arm"}}

# Reset vector code: mov al, 0x2a; out 0xf4, al; hlt. isa-debug-exit makes QEMU exit (0x2a<<1)|1.
_ROM_CODE = bytes((0xB0, 0x2A, 0xE6, 0xF4, 0xF4))
_ROM_EXIT = 0x55


@attrs.frozen
class Accel:
    """The accelerator decision for a node.

    :ivar name: ``kvm`` or ``tcg``.
    :ivar reason: why (shown in the warning and by ``emu check``).
    """

    name: str
    reason: str


@attrs.frozen
class KvmProbe:
    """The outcome of probing KVM with one binary."""

    usable: bool
    reason: str


ACCEL = StashKey[Accel]()
_memory: dict[str, KvmProbe] = {}
# Per event loop: an asyncio.Lock that once made a task wait is bound to that loop for good.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def kvm_mode(settings: QemuSettings | None) -> str:
    """``auto``, ``require`` or ``off``: ``EMU_QEMU_KVM`` wins over the host's settings.

    :raises ConfigError: ``EMU_QEMU_KVM`` holds something else.
    """
    mode = os.environ.get(MODE_ENV) or (settings.kvm if settings else "auto")
    if mode not in ("auto", "require", "off"):
        raise ConfigError(
            "environment", [f"{MODE_ENV}: must be auto, require or off; got {mode!r}"]
        )
    return mode


def probe_kernel(settings: QemuSettings | None) -> Path | None:
    """The kernel the probe boots: configured, one in ``<cache>/kernels``
    (:func:`emucore.paths.probe_kernels_dir`, where emu's tiny guest links its own), or the
    host's."""
    if settings and settings.kvm_probe_kernel:
        return Path(settings.kvm_probe_kernel)
    candidates = sorted(glob.glob(str(probe_kernels_dir() / "*")))
    candidates += sorted(glob.glob("/boot/vmlinuz-*"))
    readable = [Path(c) for c in candidates if os.access(c, os.R_OK)]
    return readable[-1] if readable else None


async def probe_kvm(binary: QemuBinary, kernel: Path | None, timeout: float) -> KvmProbe:
    """Whether guests run under KVM with ``binary`` (cached; one probe at a time per key)."""
    if not os.path.exists("/dev/kvm"):
        return KvmProbe(False, "/dev/kvm does not exist (no KVM on this host)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmProbe(False, "/dev/kvm is not readable and writable by this user (kvm group?)")
    key = _cache_key(binary, kernel)
    locks = _locks.setdefault(asyncio.get_running_loop(), {})
    async with locks.setdefault(key, asyncio.Lock()):
        cached = _memory.get(key) or _load_cached(key)
        if cached is None:
            cached = await _run_probe(binary, kernel, timeout)
            _store_cached(key, cached)
        _memory[key] = cached
        return cached


async def _run_probe(binary: QemuBinary, kernel: Path | None, timeout: float) -> KvmProbe:
    base = [str(binary.path), "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"]
    with tempfile.TemporaryDirectory(prefix="emu-kvm-probe-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(b"\xf4" * (65536 - 16) + _ROM_CODE.ljust(16, b"\xf4"))
        argv = [
            *base,
            "-m",
            "16",
            "-bios",
            str(rom),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ]
        code, _ = await _run(argv, timeout)
        if code != _ROM_EXIT:
            return KvmProbe(False, f"a 16-byte test program did not run under KVM (exit {code})")
    if kernel is None:
        return KvmProbe(True, "KVM runs real-mode code (shallow probe: no kernel found to boot)")
    argv = [*base, "-m", "128", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel)]
    argv += ["-append", "console=ttyS0 panic=-1 root=/dev/null"]
    code, output = await _run(argv, timeout)
    if code is None:
        return KvmProbe(
            False,
            f"a Linux kernel did not finish booting under KVM within {timeout:g} s"
            " (guests hang on this host's KVM)",
        )
    if "Kernel panic" not in output:
        return KvmProbe(False, f"a Linux kernel under KVM exited ({code}) before it booted")
    return KvmProbe(True, f"a Linux kernel booted under KVM ({kernel.name})")


async def _run(argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv``; its exit code (``None`` on timeout, then killed) and its output."""
    # spawn: a probe hanging under a broken KVM must not outlive a host that dies meanwhile.
    process = await spawn(argv, output=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
        return process.returncode, out.decode(errors="replace")
    except TimeoutError:
        return None, ""
    finally:
        # Also on cancellation (a start given up, Ctrl-C): never leave a probe QEMU behind.
        if process.returncode is None:
            signal_child(process, signal.SIGKILL)
            await asyncio.shield(process.wait())


def _cache_key(binary: QemuBinary, kernel: Path | None) -> str:
    stat = binary.path.stat()
    return "|".join(
        (
            str(binary.path),
            str(stat.st_size),
            str(stat.st_mtime_ns),
            str(kernel),
            platform.release(),
        )
    )


def _cache_file() -> Path:
    return cache_dir() / "kvm-probe.json"


def _load_cached(key: str) -> KvmProbe | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entry = json.loads(_cache_file().read_text())[key]
        if time.time() - entry["time"] < CACHE_SECONDS:
            return KvmProbe(bool(entry["usable"]), str(entry["reason"]))
    return None


def _store_cached(key: str, probe: KvmProbe) -> None:
    path = _cache_file()
    with contextlib.suppress(OSError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = json.loads(path.read_text()) if path.exists() else {}
        entries[key] = {"usable": probe.usable, "reason": probe.reason, "time": time.time()}
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(path)


async def choose_accel(binary: QemuBinary, settings: QemuSettings | None, node: str) -> Accel:
    """KVM or TCG for ``binary`` under the host's mode.

    :raises NodeError: mode ``require`` and KVM is not usable.
    """
    mode = kvm_mode(settings)
    if mode == "off":
        return Accel("tcg", "KVM is turned off (kvm = off)")
    host = platform.machine()
    if binary.platform not in _HOST_PLATFORMS.get(host, set()):
        reason = f"KVM cannot run {binary.platform} guests on this {host} host"
        if mode == "require":
            raise NodeError(node, f"kvm is required but {reason}")
        return Accel("tcg", reason)
    timeout = settings.kvm_probe_timeout if settings else 10.0
    probe = await probe_kvm(binary, probe_kernel(settings), timeout)
    if probe.usable:
        return Accel("kvm", probe.reason)
    if mode == "require":
        raise NodeError(node, f"kvm is required but not usable: {probe.reason}")
    return Accel("tcg", f"KVM is not usable: {probe.reason}; using TCG (much slower)")


@hookimpl(trylast=True)
async def emu_prepare(node: QemuNode) -> None:
    """Decide the accelerator for this start; warn when KVM was wanted but is not usable."""
    accel = await choose_accel(binary(node), node.emulator_settings, node.name)
    node.stash[ACCEL] = accel
    if accel.name == "tcg" and kvm_mode(node.emulator_settings) == "auto":
        node.emit("warning", accel.reason, host_wide=True)


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """``-accel kvm|tcg``; x86 under KVM also gets ``-machine smm=off`` (SeaBIOS hangs without)."""
    accel = node.stash.get(ACCEL, None)
    if accel is None:
        # A dry run without emu_prepare: never probe here (it may take seconds).
        accel = Accel("tcg", "not probed")
    args = ["-accel", accel.name]
    if accel.name == "kvm" and binary(node).platform in ("x86_64", "i386"):
        args += ["-machine", "smm=off"]
    return [ArgFragment(positions.ACCEL, args, "qemu.accel")]


@hookimpl
async def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report the KVM probe's verdict for the default binary, under the host's settings."""
    try:
        qemu_settings = host_qemu_settings(settings)
        default = find_binary(QemuProperties(), qemu_settings, "emu check")
        accel = await choose_accel(default, qemu_settings, "emu check")
    except EmuError as exc:
        return [CheckResult("kvm", False, str(exc))]
    if accel.name == "tcg" and kvm_mode(qemu_settings) == "off":
        return [CheckResult("kvm", True, f"not used: {accel.reason}")]
    return [CheckResult("kvm", accel.name == "kvm", accel.reason)]
