"""Node bodies in, node JSON out: GNS3's flat node properties against the emulator's class.

The controller keeps every key of the node JSON a compute returned and sends them all back
(on updates, and when it reopens a project), together with keys of its own templates. So a
body is filtered to the emulator's property fields (``EmulatorInfo.properties``) and the
rest is ignored; keys emu knows nothing of whose value would change a node (``tpm: true``)
are reported back as a ``log.warning`` notification, never silently dropped. ``console`` is
answered with the port the running node's console really has (the host picks one at each
start unless the property sets it), so the controller replays that port: an update carrying
it unchanged changes nothing (see :meth:`~emu_gns3.compute.ComputeProject.update_node`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from emu_gns3.errors import ImageMissingError
from emucore.convert import default_converter
from emucore.models import HostSettings, NodeStatus
from emucore.node import Node

# Keys of the node JSON that are answers, not properties: replayed by the controller.
ANSWER_KEYS = frozenset(
    ("name", "node_id", "project_id", "compute_id", "node_directory", "status", "command_line")
)
# GNS3's values that mean "nothing asked for" for keys emu lacks.
_NEUTRAL: tuple[Any, ...] = (None, "", False, 0, "none", [], {})
# GNS3 node statuses: emu's transitional ones show as the status they leave.
_STATUS = {
    NodeStatus.STOPPED: "stopped",
    NodeStatus.STARTING: "stopped",
    NodeStatus.STARTED: "started",
    NodeStatus.SUSPENDED: "suspended",
    NodeStatus.STOPPING: "started",
}


def gns3_status(status: NodeStatus) -> str:
    """The GNS3 status (``stopped``, ``started``, ``suspended``) of an emu status."""
    return _STATUS[status]


def split_properties(
    body: Mapping[str, Any], properties: type[Any]
) -> tuple[dict[str, Any], list[str]]:
    """The body's emulator properties, and the unknown keys it asked something of.

    :return: the keys that are fields of ``properties``, and
        ``key=value`` for each other key whose value is not neutral.
    """
    fields = {field.name for field in attrs.fields(properties)}
    known = {k: v for k, v in body.items() if k in fields}
    ignored = [
        f"{key}={value!r}"
        for key, value in body.items()
        if key not in fields
        and key not in ANSWER_KEYS
        and not key.endswith(("_md5sum", "_backed"))
        and not any(value == neutral and type(value) is type(neutral) for neutral in _NEUTRAL)
        and value is not None
    ]
    return known, ignored


def missing_image(properties: type[Any], values: Mapping[str, Any], settings: HostSettings) -> None:
    """Refuse the first image a node names that no image directory holds.

    Image fields are the properties class's fields whose metadata has ``image``; only
    relative names are checked (the emulator checks absolute paths at start).

    :raises ImageMissingError: the controller then uploads the file and tries again.
    """
    for field in attrs.fields(properties):
        value = values.get(field.name)
        if "image" not in field.metadata or not isinstance(value, str) or not value:
            continue
        if os.path.isabs(value):
            continue
        if not any((Path(d) / value).is_file() for d in settings.image_dirs):
            raise ImageMissingError(value, field.name)


def render(node: Node, project_id: str, console: int | None) -> dict[str, Any]:
    """The node JSON GNS3's controller expects: identity, status, console and properties.

    Properties left unset (``""``, ``None``) are left out: the controller reads some that it
    finds as values (a ``mac_address`` of ``""`` breaks its port list).
    """
    properties = default_converter().unstructure(node.properties)
    answer: dict[str, Any] = {k: v for k, v in properties.items() if v not in ("", None)}
    answer.update(
        {
            "name": node.name,
            "node_id": str(node.config.id),
            "project_id": project_id,
            "node_directory": str(node.directory),
            "status": gns3_status(node.status),
            "command_line": shlex.join(node.argv),
            "console": console,
        }
    )
    return answer
