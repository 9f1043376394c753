"""Where emu keeps files that outlive a run (caches), shared by the core and plugins."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EMU_CACHE_DIR``, else ``$XDG_CACHE_HOME/emu``, else ``~/.cache/emu``."""
    explicit = os.environ.get("EMU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emu"
