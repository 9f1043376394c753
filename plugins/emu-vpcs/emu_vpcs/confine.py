"""Launcher that confines VPCS, then becomes it: ``python -I -S confine.py [--seccomp] VPCS ARGS``.

It runs as a file, with the standard library only (no ``site``, no emu import), between the
host's fork and VPCS' exec; the process keeps its pid, its ``PR_SET_PDEATHSIG`` and its
session through ``execv``. It does two things:

* makes its stdin, the pty the host holds, its controlling terminal. When the host dies its
  side of the pty closes and the kernel sends VPCS SIGHUP (a second guarantee next to the
  death signal), and Ctrl-C typed on the console interrupts VPCS' ping as on a real terminal.
* with ``--seccomp``, installs a seccomp filter (after ``PR_SET_NO_NEW_PRIVS``) that makes
  every way of creating a process fail: ``fork``, ``vfork``, ``clone`` without
  ``CLONE_THREAD`` (threads stay allowed) and ``clone3`` (``ENOSYS``, so glibc falls back to
  ``clone`` for its threads). VPCS' ``!`` command, which runs host commands through a shell
  as the host's user, then does nothing, and VPCS can have no child that outlives it.

On failure it prints why to its stderr, which the host logs, and exits with status 126.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import termios

EXIT_FAILED = 126

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR, _ARCH = 0, 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of syscall argument ``index`` (little-endian machines)."""
    return 16 + 8 * index


_CLONE_THREAD = 0x00010000
# x86_64 syscalls with this bit set are the x32 ABI, with numbers of their own.
_X32_BIT = 0x40000000

# machine: (audit arch, {syscall: number}); -1 where the machine has no such call.
_MACHINES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "fork": -1, "vfork": -1, "clone3": 435}),
}


class ConfineError(Exception):
    """The confinement cannot be set up on this machine."""


def _program(machine: str) -> list[tuple[int, int, int, int]]:
    """The seccomp filter for ``machine`` as ``(code, jt, jf, k)`` instructions.

    Each check is a block that returns or falls through to the next block; ``jt``/``jf``
    count the instructions skipped.
    """
    try:
        arch, calls = _MACHINES[machine]
    except KeyError:
        raise ConfineError(f"no seccomp filter for this machine ({machine})") from None
    deny = (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM)
    allow = (_RET_K, 0, 0, _RET_ALLOW)
    program = [(_LD_W_ABS, 0, 0, _ARCH), (_JEQ_K, 1, 0, arch), deny]  # another ABI: refuse all
    program += [(_LD_W_ABS, 0, 0, _NR), (_JGE_K, 0, 1, _X32_BIT), deny]
    # clone3 passes its flags in a struct a filter cannot read: ENOSYS makes glibc use clone.
    program += [(_JEQ_K, 0, 1, calls["clone3"]), (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]
    for name in ("fork", "vfork"):
        if calls[name] >= 0:
            program += [(_JEQ_K, 0, 1, calls[name]), deny]
    # clone: a thread (CLONE_THREAD) is allowed, a process is not.
    program += [(_JEQ_K, 0, 4, calls["clone"]), (_LD_W_ABS, 0, 0, _arg_low(0))]
    program += [(_JSET_K, 0, 1, _CLONE_THREAD), allow, deny]
    program.append(allow)
    return program


def install_seccomp(machine: str) -> None:
    """Forbid process creation to this process and to what it execs.

    :raises ConfineError: the machine is not supported or the kernel refused the filter.
    """
    program = _program(machine)
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class _Fprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = _Fprog(len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise ConfineError(f"PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise ConfineError(
            f"the kernel refused the seccomp filter: {os.strerror(ctypes.get_errno())}"
        )


def main(argv: list[str]) -> int:
    """Confine this process as asked, then exec VPCS (never returns on success)."""
    seccomp = argv[:1] == ["--seccomp"]
    command = argv[1:] if seccomp else argv
    if not command:
        print("usage: confine.py [--seccomp] VPCS [ARGS...]", file=sys.stderr)
        return EXIT_FAILED
    try:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if seccomp:
            install_seccomp(os.uname().machine)
    except ConfineError as exc:
        print(
            f"emu-vpcs: cannot confine VPCS: {exc}. Where seccomp is not available, set the"
            " host setting emulators.vpcs.confine = false (VPCS' '!' command then runs host"
            " commands)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OSError as exc:
        print(f"emu-vpcs: cannot give VPCS its terminal: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        os.execv(command[0], command)
    except OSError as exc:
        print(f"emu-vpcs: cannot run {command[0]}: {exc}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
