"""A TPM 2.0 for the guest (``tpm``): one swtpm per node, its state in the node directory.

**Order.** swtpm starts at each start in ``emu_prepare``, before QEMU, and is stopped in
``emu_stopped``, after QEMU is gone; it also ends by itself when QEMU hangs up
(``--terminate``). It is a supervised child like QEMU (death signal, pidfile, exit watched),
so a host killed by SIGKILL takes it along.

**The socket.** The host binds swtpm's control socket, ``swtpm.sock`` (0600) in the node
directory, and hands it to swtpm as a descriptor (``--ctrl type=unixio,fd=N``): QEMU, which
connects to it while it starts, never races swtpm's own bind, and no path reaches swtpm's
option strings, which have no escape for a comma. swtpm runs in the node directory and
keeps its state in ``tpm/`` there (``--tpmstate dir=tpm``): the TPM's persistent memory,
kept across restarts. Its output goes to ``swtpm.log``.

**Failure.** A swtpm that exits with an error (at start or while the node runs), or that
logged an error by the time it is stopped (a TPM state it cannot read: swtpm stays up, QEMU
fails to start), is an ``error`` event carrying the tail of ``swtpm.log``.

QEMU: ``-chardev socket,id=tpm0chr,path=swtpm.sock -tpmdev emulator,id=tpm0,chardev=tpm0chr
-device tpm-tis,tpmdev=tpm0`` (``tpm-tis-device`` on Arm, ``tpm-spapr`` on POWER).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from emu_qemu import positions
from emu_qemu.contract import QemuNode, binary
from emu_qemu.properties import QemuSettings, host_qemu_settings
from emu_qemu.qemuopts import opts
from emucore import hookimpl
from emucore.errors import EmuError, ImageError, NodeError
from emucore.files import UnsafePathError, check_regular, create_file, private_dir, unix_listener
from emucore.models import HostSettings, NodeStatus
from emucore.process import Supervised, log_tail
from emucore.records import ArgFragment, CheckResult
from emucore.stash import StashKey

EMULATOR = "qemu"

SOCKET_NAME = "swtpm.sock"
STATE_DIR = "tpm"
LOG_NAME = "swtpm.log"
PIDFILE_NAME = "swtpm.pid"
CHARDEV_ID = "tpm0chr"
TPMDEV_ID = "tpm0"
# The TPM's front end QEMU offers on each kind of machine.
_DEVICE = {"aarch64": "tpm-tis-device", "arm": "tpm-tis-device", "ppc64": "tpm-spapr"}
_X86 = ("x86_64", "i386")

SWTPM = StashKey[Supervised]()
REPORTED = StashKey[bool]()  # swtpm's exit was reported already


def swtpm_program(settings: QemuSettings) -> str | None:
    """The swtpm program ``swtpm_path`` names: that path, or the name looked up in
    ``binary_dirs`` then on ``PATH`` (``None``: not found)."""
    wanted = settings.swtpm_path
    if os.path.isabs(wanted):
        return wanted if os.access(wanted, os.X_OK) else None
    search = os.pathsep.join([*map(str, settings.binary_dirs), os.environ.get("PATH", "")])
    return shutil.which(wanted, path=search)


def find_swtpm(node: QemuNode) -> str:
    """The swtpm program the host's settings name (``swtpm_path``).

    :raises NodeError: not found, saying how to install it.
    """
    wanted = node.emulator_settings.swtpm_path
    found = swtpm_program(node.emulator_settings)
    if found is None:
        raise NodeError(
            node.name,
            f"tpm: the TPM emulator {wanted!r} is not installed (Debian: apt-get install swtpm),"
            " or set the host setting swtpm_path",
        )
    return found


def _tpm_device(node: QemuNode) -> str:
    platform = binary(node).platform
    device = "tpm-tis" if platform in _X86 else _DEVICE.get(platform)
    if device is None:
        raise NodeError(node.name, f"tpm: QEMU offers no TPM device on {platform} machines")
    return device


def _state_dir(node: QemuNode) -> Path:
    """``tpm/`` in the node directory, holding nothing but regular files (swtpm writes them
    by name: a planted link there would redirect its writes)."""
    try:
        state = private_dir(node.directory, STATE_DIR)
        for entry in state.iterdir():
            check_regular(entry, "tpm: a file of the TPM state")
    except UnsafePathError as exc:
        raise ImageError(node.name, str(exc)) from None
    return state


@hookimpl(trylast=True)
async def emu_prepare(node: QemuNode) -> None:
    """At a start: start swtpm on a socket the host bound (dry runs only check it exists)."""
    if not node.properties.tpm:
        return
    program = find_swtpm(node)
    _tpm_device(node)
    if node.status is not NodeStatus.STARTING:
        return
    _state_dir(node)
    listener = unix_listener(node.directory, SOCKET_NAME)
    log_path = node.directory / LOG_NAME
    argv = [program, "socket", "--tpm2", "--tpmstate", f"dir={STATE_DIR}", "--terminate"]
    argv += ["--ctrl", f"type=unixio,fd={listener.fileno()}", "--log", "fd=1,level=1"]
    try:
        with create_file(log_path) as log:
            node.stash[SWTPM] = await Supervised.start(
                argv,
                cwd=node.directory,
                pidfile=node.directory / PIDFILE_NAME,
                output=log,
                pass_fds=[listener.fileno()],
                on_exit=lambda returncode: _exited(node, returncode, log_path),
            )
    finally:
        listener.close()  # swtpm holds it now; once swtpm is gone, QEMU's connect fails


def _exited(node: QemuNode, returncode: int, log_path: Path) -> None:
    # swtpm ends by itself when QEMU hangs up (code 0): only a failure is news.
    if returncode != 0:
        node.stash[REPORTED] = True
        message = f"tpm: swtpm exited with code {returncode}"
        node.emit("error", message, log_tail(log_path))


def _report_errors(node: QemuNode) -> None:
    """swtpm stays up when the TPM fails to initialise (QEMU then fails): its log says why."""
    if node.stash.pop(REPORTED, False):
        return
    tail = log_tail(node.directory / LOG_NAME)
    if any("error" in line.lower() for line in tail.splitlines()):
        node.emit("error", "tpm: swtpm reported an error", tail)


@hookimpl(trylast=True)
def emu_build_args(node: QemuNode) -> Sequence[ArgFragment]:
    """QEMU's TPM: a client of swtpm's socket (relative to the node directory)."""
    if not node.properties.tpm:
        return []
    args = ["-chardev", opts("socket", {"id": CHARDEV_ID, "path": SOCKET_NAME})]
    args += ["-tpmdev", opts("emulator", {"id": TPMDEV_ID, "chardev": CHARDEV_ID})]
    args += ["-device", opts(_tpm_device(node), {"tpmdev": TPMDEV_ID})]
    return [ArgFragment(positions.DEVICES, args, "qemu.tpm")]


@hookimpl(trylast=True)
async def emu_stopped(node: QemuNode) -> None:
    """QEMU is gone: stop swtpm for sure (bounded), remove its socket."""
    swtpm = node.stash.pop(SWTPM, None)
    if swtpm is not None:
        await swtpm.stop()
        _report_errors(node)
    (node.directory / SOCKET_NAME).unlink(missing_ok=True)


@hookimpl
def emu_check(settings: HostSettings) -> list[CheckResult]:
    """Report whether swtpm is installed (nodes with ``tpm`` need it), found as a start
    finds it."""
    try:
        found = swtpm_program(host_qemu_settings(settings))
    except EmuError as exc:
        return [CheckResult("swtpm", False, str(exc))]
    if found is None:
        return [
            CheckResult("swtpm", False, "not found: nodes with tpm need it (apt-get install swtpm)")
        ]
    return [CheckResult("swtpm", True, found)]
