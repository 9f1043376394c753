"""The request bodies the controller sends, as attrs classes for emu's strict converter.

Node bodies are not here: their properties are the emulator's own class (see
:mod:`emu_gns3.nodes`). Keys the controller sends but emu does not use are listed as fields
that are accepted and ignored, so a typo in a key it does use is still refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from emu_gns3.errors import BadRequest
from emucore.convert import structure
from emucore.validators import matches, one_of, printable

T = TypeVar("T")

# A plain file name: no directory part, no leading dot, nothing a shell or QEMU would read.
FILE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,254}"


@attrs.frozen
class ProjectCreate:
    """``POST /projects``.

    :ivar name: shown in messages only.
    :ivar project_id: the project's UUID, chosen by the controller.
    :ivar path: the controller's own directory for the project (ignored: a remote compute
        keeps its files in its own ``projects_dir``).
    :ivar variables: GNS3 project variables (ignored: emu nodes do not use them).
    """

    name: str = attrs.field(default="", validator=printable(100, allow_empty=True))
    project_id: uuid.UUID | None = None
    path: str = ""
    variables: Any = None


@attrs.frozen
class ProjectUpdate:
    """``PUT /projects/{project_id}``: only ``variables`` (ignored, see :class:`ProjectCreate`)."""

    variables: Any = None


@attrs.frozen
class UdpNioBody:
    """``POST|PUT .../adapters/{a}/ports/{p}/nio``: a UDP tunnel, its filters, its state.

    :ivar type: ``nio_udp`` (TAP and Ethernet NIOs are refused).
    :ivar lport: the local port (allocated by ``ports/udp`` before).
    :ivar rhost: the peer's address.
    :ivar rport: the peer's port.
    :ivar filters: GNS3 link filters, by name (see :mod:`emu_gns3.filters`).
    :ivar suspend: the link is suspended.
    """

    type: str = attrs.field(validator=one_of(("nio_udp",)))
    lport: int
    rhost: str
    rport: int
    filters: Mapping[str, tuple[Any, ...]] = attrs.field(factory=dict)
    suspend: bool = False


@attrs.frozen
class CaptureStart:
    """``POST .../capture/start``.

    :ivar capture_file_name: a plain file name, written in the project's ``captures``.
    :ivar data_link_type: only ``DLT_EN10MB`` (Ethernet).
    """

    capture_file_name: str = attrs.field(validator=matches(FILE_NAME, "a plain file name"))
    data_link_type: str = attrs.field(default="DLT_EN10MB", validator=one_of(("DLT_EN10MB",)))


def parse_json(raw: bytes, what: str) -> Any:
    """The JSON value of a request body (an empty body is ``{}``).

    :raises BadRequest: not JSON.
    """
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what}: the body is not valid JSON: {exc}") from None


def parse_body(raw: bytes, cls: type[T], what: str) -> T:
    """Structure a request body into ``cls``.

    :raises BadRequest: not JSON.
    :raises ConfigError: a field is missing, unknown or wrong (422).
    """
    return structure(parse_json(raw, what), cls, what)
