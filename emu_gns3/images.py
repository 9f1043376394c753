"""Images the controller uploads (``POST /qemu/images/{file}``) and lists.

An upload lands in the first of the host's image directories under a plain file name
(checked as everywhere: no directory part, no leading dot). It is written to a hidden
temporary file in the same directory and linked to its name only when complete, so a node
never sees half an image; an existing image is never replaced, because nodes may use it as
the base of their linked clones (emu never writes a base image).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from emu_gns3.bodies import FILE_NAME
from emu_gns3.errors import Conflict, Forbidden
from emucore.models import HostSettings


def upload_directory(settings: HostSettings) -> Path:
    """Where uploads go: the first image directory.

    :raises Conflict: the host has no image directory.
    """
    if not settings.image_dirs:
        raise Conflict("this compute has no image directory to upload to (emu serve --image-dir)")
    return Path(settings.image_dirs[0])


def checked_name(filename: str) -> str:
    """``filename`` if it is a plain file name.

    :raises Forbidden: it has a directory part, a leading dot or odd characters.
    """
    if not re.fullmatch(FILE_NAME, filename):
        raise Forbidden(
            f"image name {filename!r} is not allowed: a plain file name is needed"
            " (letters, digits, '_', '.', '+', '-'; no directory, no leading dot)"
        )
    return filename


async def receive(settings: HostSettings, filename: str, chunks: AsyncIterator[bytes]) -> Path:
    """Write an uploaded image; the name appears only once the file is complete.

    :raises Forbidden: a bad name.
    :raises Conflict: the image exists, or the disk refused the write.
    """
    directory = upload_directory(settings)
    target = directory / checked_name(filename)
    if target.exists():
        raise Conflict(f"image {filename!r} exists already; emu never replaces an image")
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".upload-{secrets.token_hex(8)}-{filename}"
    try:
        with partial.open("xb") as out:
            async for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o644)
        os.link(partial, target)  # fails if the name appeared meanwhile: nothing is replaced
    except FileExistsError:
        raise Conflict(f"image {filename!r} exists already; emu never replaces an image") from None
    except OSError as exc:
        raise Conflict(f"cannot write image {filename!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
    return target


def listing(settings: HostSettings) -> list[dict[str, Any]]:
    """The images of every image directory (GNS3's ``filename``, ``path``, ``filesize``)."""
    found = []
    for directory in settings.image_dirs:
        with contextlib.suppress(OSError):
            for entry in sorted(Path(directory).iterdir()):
                if entry.is_file() and not entry.name.startswith("."):
                    size = entry.stat().st_size
                    found.append({"filename": entry.name, "path": str(entry), "filesize": size})
    return found
