"""How ``emu serve`` listens and whom it lets in (``--config`` file fields, or options)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from emu_gns3 import GNS3_VERSION
from emucore.validators import in_range, matches, printable


def _default_projects_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "emu" / "gns3-projects"


def _password(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError(
            "must not be empty: the compute runs emulators for whoever knows it"
            " (set it with --password-file, EMU_GNS3_PASSWORD or the config file)"
        )
    printable(1024)(_inst, _attr, value)


@attrs.frozen
class ServeSettings:
    """What ``emu serve`` needs besides the host settings.

    :ivar host: the address to listen on (``127.0.0.1`` unless told otherwise).
    :ivar port: the TCP port of the API (GNS3's default is 3080).
    :ivar user: the HTTP Basic user the controller logs in with (its
        ``[Server] compute_username``).
    :ivar password: the HTTP Basic password (its ``compute_password``); required.
    :ivar version: the version reported to the controller, which must equal its own.
    :ivar projects_dir: where each project's files go (``<projects_dir>/<project id>``).
    :ivar ping_interval: seconds between the ``ping`` notifications carrying the host's load.
    """

    user: str = attrs.field(validator=printable(100))
    password: str = attrs.field(repr=False, validator=_password)
    host: str = attrs.field(
        default="127.0.0.1",
        validator=matches(r"[A-Za-z0-9_.:\-]{1,253}", "a host name or IP address"),
    )
    port: int = attrs.field(default=3080, validator=in_range(1, 65535))
    version: str = attrs.field(
        default=GNS3_VERSION, validator=matches(r"[0-9A-Za-z.+\-]{1,40}", "a version")
    )
    projects_dir: Path = attrs.field(factory=_default_projects_dir)
    ping_interval: float = attrs.field(default=5.0, validator=in_range(0.1, 60))
