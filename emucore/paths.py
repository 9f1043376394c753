"""Where emu keeps files that outlive a run (caches) and finds the programs it runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    """``$EMU_CACHE_DIR``, else ``$XDG_CACHE_HOME/emu``, else ``~/.cache/emu``."""
    explicit = os.environ.get("EMU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emu"


def probe_kernels_dir() -> Path:
    """``<cache>/kernels``: Linux kernels that plugins may boot to probe the host (a
    functional KVM check); whoever builds a kernel may link it here."""
    return cache_dir() / "kernels"


def search_dirs(extra: Sequence[Path] = ()) -> list[Path]:
    """Where programs are looked up: ``extra`` (a host's ``binary_dirs``), then ``PATH``."""
    path = [Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    return [*extra, *path]


def find_program(wanted: str, extra_dirs: Sequence[Path] = ()) -> Path:
    """The program ``wanted`` names: a bare name looked up in :func:`search_dirs`, or a path
    that must lie in one of those directories.

    A node description is untrusted: a path to any executable on the host must not become
    the emulator emu runs, so a path outside the search directories is refused.

    :raises LookupError: not found, not an executable file, or outside the search dirs.
    """
    dirs = search_dirs(extra_dirs)
    shown = os.pathsep.join(map(str, dirs))
    if os.sep not in wanted:
        located = shutil.which(wanted, path=shown)
        if located is None:
            raise LookupError(f"{wanted!r} not found (searched {shown})")
        path = Path(located).absolute()
    else:
        path = Path(wanted).absolute()
        trusted = {d.resolve() for d in dirs if d.is_absolute()}
        if path.resolve().parent not in trusted and path.parent.resolve() not in trusted:
            raise LookupError(
                f"{wanted!r} is not in the host's binary directories or on PATH ({shown});"
                " name a program there, or add its directory to the host's binary_dirs"
            )
    if not path.exists():
        raise LookupError(f"{wanted!r} not found")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise LookupError(f"{str(path)!r} is not an executable file")
    return path
