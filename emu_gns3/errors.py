"""The one place where errors become HTTP answers: ``{"message": ...}`` with GNS3's status.

Handlers raise; :func:`error_response` chooses the status: the front end's own errors carry
one, a :class:`~emucore.errors.ConfigError` (a bad body or property) is 422 like GNS3's schema
validation, every other :class:`~emucore.errors.EmuError` is a conflict (409) the controller
passes to its client as it is. Anything else is a bug: 500 with a one-line message, the
traceback goes to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

from emucore.errors import ConfigError, EmuError, NodeError

log = logging.getLogger("emu.gns3")


class HttpError(EmuError):
    """An error with its own HTTP status.

    :ivar status: the HTTP status code.
    :ivar extra: more keys for the JSON body.
    """

    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra


class BadRequest(HttpError):
    """The request cannot be read (not JSON, not an object)."""

    status = 400


class Unauthorized(HttpError):
    """Missing or wrong HTTP Basic credentials."""

    status = 401


class Forbidden(HttpError):
    """A file name that would leave its directory."""

    status = 403


class NotFound(HttpError):
    """No such project, node, NIO or capture."""

    status = 404


class Conflict(HttpError):
    """The request cannot be done now or at all (a refused GNS3 feature says why)."""

    status = 409


class ImageMissingError(Conflict):
    """A node names an image the compute does not have: the controller uploads it and retries.

    The class name is part of the protocol: the controller looks for it in ``exception``.
    """

    def __init__(self, image: str, field: str) -> None:
        super().__init__(
            f"{field}: image {image!r} is not in this compute's image directories",
            image=image,
            exception="ImageMissingError",
        )


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body answering ``exc``."""
    if isinstance(exc, HttpError):
        return exc.status, {"message": str(exc), **exc.extra}
    if isinstance(exc, ConfigError):
        return 422, {"message": str(exc)}
    if isinstance(exc, NodeError):
        return 409, {"message": str(exc), "exception": type(exc).__name__}
    if isinstance(exc, EmuError):
        return 409, {"message": str(exc)}
    log.error("internal error", exc_info=exc)
    return 500, {"message": f"internal error of the emu compute: {type(exc).__name__}: {exc}"}
