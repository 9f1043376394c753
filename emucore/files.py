"""The files emu makes in a project tree, made so that nothing planted there redirects them.

A project directory may come from someone else: a lab unpacked from an archive can hold
symbolic links (or FIFOs, or directories) where emu is about to write ``qemu.log``, a pidfile
or a linked clone. Following such a link would write, truncate or hand to a guest whatever it
points at. Every file emu, or a program emu starts, opens in a project tree is therefore made
through this module:

* directories: :func:`private_dir` walks from a trusted root and refuses any component that
  is a symbolic link or not a directory (it creates the missing ones, mode 0700);
* files emu owns (logs, pidfiles, scripts, state): :func:`create_file` and
  :func:`write_atomic` open with ``O_NOFOLLOW``; a symbolic link in the way is *removed*, never
  followed, so its target is untouched;
* files that hold data (disks, captures): :func:`check_regular` refuses anything but a
  regular file with one name, and says what is in the way;
* files a child process opens by name (a capture QEMU writes, a log VPCS appends to):
  :func:`prepare_for_child` leaves a fresh regular file at the path first;
* sockets a child connects to (a serial console, a TPM emulator's control channel):
  :func:`unix_listener` binds them itself, mode 0600, in place of whatever was there.

The threat is a planted tree, not a concurrent attacker on the same machine: the checks run
just before use, in emu's own process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import IO, Any

from emucore.errors import EmuError

_NOFOLLOW_CREATE = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_WRITE = os.O_WRONLY | _NOFOLLOW_CREATE
_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(EmuError):
    """A path in a project tree is not what emu made: a symbolic link, a FIFO, a hard link."""


def describe(path: Path) -> str:
    """What is at ``path``, for an error message (``a symbolic link to /etc``...)."""
    try:
        info = path.lstat()
    except OSError:
        return "missing"
    if stat.S_ISLNK(info.st_mode):
        with contextlib.suppress(OSError):
            return f"a symbolic link to {os.readlink(path)}"
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISREG(info.st_mode):
        links = info.st_nlink
        return "a regular file" if links == 1 else f"a regular file with {links} hard links"
    return "a special file (FIFO, socket or device)"


def private_dir(root: Path, *parts: str | Path) -> Path:
    """``root/parts...``, each component below ``root`` a real directory (created 0700).

    :param root: a directory the caller trusts (it is created with its parents if missing).
    :param parts: relative components; none may be absolute or ``..``.
    :raises UnsafePathError: a component exists and is a symbolic link or not a directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for part in Path(*parts).parts if parts else ():
        if part in ("..", "/") or os.sep in part:
            raise UnsafePathError(f"{root}: {part!r} cannot be part of a project path")
        current = current / part
        try:
            current.mkdir(mode=0o700)
            continue
        except FileExistsError:
            pass
        info = current.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(
                f"{current} is {describe(current)}, not a directory emu made;"
                " remove it (emu never follows links in a project tree)"
            )
    return current


def capture_directory(project: Path, path: Path) -> Path:
    """The directory of the capture file ``path``, ready for the file.

    Inside ``project`` the directories on the way are made as :func:`private_dir` makes
    them: a link planted there (``captures -> /elsewhere``) is refused, never followed.
    Outside ``project`` the host program chose the place: its directory must exist, and
    emu creates nothing there.

    :raises UnsafePathError: ``path`` holds ``..``, a directory on its way inside
        ``project`` is a link or not a directory, or its directory outside ``project`` is
        missing; the message names ``path``.
    """
    project = project.absolute()
    if ".." in path.parts:
        raise UnsafePathError(f"capture file {path}: '..' cannot be part of a capture path")
    if not path.is_relative_to(project) or path == project:
        if not path.parent.is_dir():
            raise UnsafePathError(
                f"capture file {path}: {path.parent} is {describe(path.parent)}; outside the"
                f" project directory {project} emu creates no directory"
            )
        return path.parent
    try:
        return private_dir(project, *path.relative_to(project).parent.parts)
    except UnsafePathError as exc:
        raise UnsafePathError(f"capture file {path}: {exc}") from None


def _unlink_if_link(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink():
            path.unlink()


def create_file(
    path: Path, mode: str = "w", *, append: bool = False, buffering: int = -1
) -> IO[Any]:
    """Open a file emu owns for writing, never through a symbolic link.

    A symbolic link at ``path`` is removed first (its target stays untouched); anything else
    that is not a regular file is refused.

    :param mode: ``"w"`` (text) or ``"wb"`` (binary); with ``+`` (``"a+"``) also readable.
    :param append: keep what the file holds and write at its end; else truncate it.
    :param buffering: as for the built-in ``open`` (0: unbuffered, binary only).
    :raises UnsafePathError: something other than a regular file or a link is at ``path``.
    :raises OSError: the file cannot be created (read-only directory, full disk...).
    """
    _unlink_if_link(path)
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    flags = access | _NOFOLLOW_CREATE | (os.O_APPEND if append else os.O_TRUNC)
    refused = f"{path} is {{}}; emu only writes regular files there"
    if path.exists() and not path.is_file():
        raise UnsafePathError(refused.format(describe(path)))
    fd = os.open(path, flags | os.O_NONBLOCK, 0o600)  # O_NONBLOCK: a FIFO must not hang us
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(refused.format(describe(path)))
        os.set_blocking(fd, True)
        return open(fd, mode, buffering=buffering, closefd=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` at once (a temporary file renamed over it).

    The rename replaces a symbolic link at ``path`` itself, never its target.

    :raises OSError: the directory is read-only or the disk is full.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _unlink_if_link(temporary)
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(temporary, _NOFOLLOW_WRITE | os.O_TRUNC | os.O_EXCL, 0o600)
        try:
            with open(fd, "wb", closefd=True) as handle:
                handle.write(payload)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    except OSError as exc:
        raise named(exc, path) from exc


def named(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` (a write or flush error does not say which file it hit)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror, str(path))


def read_text(path: Path, limit: int = 1 << 20) -> str:
    """Read a file emu wrote, never through a symbolic link (at most ``limit`` bytes).

    :raises OSError: missing, unreadable, or a symbolic link (``ELOOP``).
    """
    fd = os.open(path, _NOFOLLOW_READ | os.O_NONBLOCK)
    with open(fd, "rb", closefd=True) as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return handle.read(limit).decode(errors="replace")


def check_regular(path: Path, what: str, *, missing_ok: bool = True) -> bool:
    """Refuse ``path`` unless it is a regular file with one name (or absent, if allowed).

    :param what: how the caller names the file in errors (``the linked clone of hda``).
    :return: whether the file exists.
    :raises UnsafePathError: naming what is there instead and what to do.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        if missing_ok:
            return False
        raise UnsafePathError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise UnsafePathError(
            f"{what} {path} is {describe(path)}, not a file emu made;"
            " move it away (emu never follows links in a project tree)"
        )
    return True


def prepare_for_child(path: Path) -> Path:
    """Leave a fresh, empty regular file at ``path`` for a child process that opens it by
    name (a symbolic link in the way is removed, not followed).

    :raises UnsafePathError: a directory or special file is in the way.
    """
    with create_file(path, "wb"):
        pass
    return path


# sun_path holds 107 bytes: a longer path is reached through a directory descriptor.
_SUN_PATH_MAX = 107


def unix_listener(directory: Path, name: str, backlog: int = 1) -> socket.socket:
    """A UNIX stream socket listening at ``directory/name`` (mode 0600), for a child process
    to connect to; whatever was at that path (a stale socket, a planted link) is removed
    first. A path longer than a socket address may be is reached through a directory
    descriptor.

    :param name: a plain file name.
    :param backlog: the connections that may wait to be accepted.
    :raises OSError: the socket cannot be bound (read-only directory...).
    """
    path = directory / name
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = None
    try:
        address = str(path)
        if len(address) > _SUN_PATH_MAX:
            dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
            address = f"/proc/self/fd/{dir_fd}/{name}"
        listener.bind(address)
        path.chmod(0o600)
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return listener
