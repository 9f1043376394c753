"""Labs as code: a TOML file describing nodes, links, captures and checks.

::

    name = "demo"

    [nodes.a]
    emulator = "qemu"
    image = "tiny"          # an image a plugin provides (emu_lab_image): here emu's tiny guest
    ip = "10.0.0.1/24"      # keys the image reads: eth0's address
    ips = { eth1 = "10.0.1.1/24" }   # and other interfaces' addresses

    [nodes.pc]
    emulator = "vpcs"
    ip = "10.0.0.2/24"

    [[links]]
    endpoints = ["a:0", "pc:0"]
    filters = { delay = 20, loss = 5 }

    [[captures]]
    endpoint = "a:0"        # file defaults to captures/a-0.pcap in the lab directory

    [[checks]]
    node = "a"
    command = "ping -c 3 10.0.0.2"
    expect = "3 packets received"

Node tables hold the emulator's own properties (for QEMU, GNS3's names), or an ``image``
that a plugin turns into them; validation errors name the file, the node or link, and the
field. This module names no emulator and no image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import attrs

from emucore.convert import structure
from emucore.errors import ConfigError
from emucore.models import LinkFilters
from emucore.validators import matches, printable

# A node's name is also the first half of an endpoint ("node:adapter") and a host name.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_ENDPOINT = r"[^:\s]+(:\d+)?"


@attrs.frozen
class LinkSpec:
    """A link between two ``node:adapter`` endpoints (adapter 0 when omitted)."""

    endpoints: tuple[str, str] = attrs.field(
        validator=attrs.validators.deep_iterable(matches(_ENDPOINT, "'node:adapter'"))
    )
    filters: LinkFilters = attrs.field(factory=LinkFilters)

    def parsed(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """The endpoints as ``(node, adapter)`` pairs."""
        first, second = (parse_endpoint(e) for e in self.endpoints)
        return first, second


def _capture_file(_inst: Any, _attr: attrs.Attribute[str], value: str) -> None:
    printable(1024, allow_empty=True)(_inst, _attr, value)
    if not value:
        return
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"must be a path inside the lab's directory, relative to the lab file; got {value!r}"
        )
    if path.suffix != ".pcap":
        raise ValueError(f"must name a .pcap file; got {value!r}")


@attrs.frozen
class CaptureSpec:
    """A pcap capture on an endpoint for the whole run.

    :ivar file: a ``.pcap`` file inside the lab's directory, relative to the lab file
        (default ``captures/<node>-<adapter>.pcap``); an existing file there that is not a
        capture is never replaced.
    :ivar expect_icmp: with ``emu run --check``, the capture must hold an ICMP echo request
        and reply once the checks ran (a check of its own in the summary).
    """

    endpoint: str = attrs.field(validator=matches(_ENDPOINT, "'node:adapter'"))
    file: str = attrs.field(default="", validator=_capture_file)
    expect_icmp: bool = False


@attrs.frozen
class CheckSpec:
    """A command typed on a node's console and a regular expression its output must show."""

    node: str
    command: str = attrs.field(validator=printable(1000))
    expect: str = attrs.field(validator=printable(1000))
    timeout: float = 60.0

    @expect.validator
    def _compiles(self, _attr: attrs.Attribute[str], value: str) -> None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from None


@attrs.frozen
class LabSpec:
    """A lab file, validated (node properties are checked later, by each emulator)."""

    name: str = attrs.field(
        validator=matches(
            r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", "a lab name (letters, digits, _ . -)"
        )
    )
    nodes: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    links: tuple[LinkSpec, ...] = ()
    captures: tuple[CaptureSpec, ...] = ()
    checks: tuple[CheckSpec, ...] = ()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"a:1"`` → ``("a", 1)``; ``"a"`` → ``("a", 0)``."""
    node, _, adapter = endpoint.partition(":")
    return node, int(adapter or 0)


def load_lab(data: Any, where: str) -> LabSpec:
    """Validate a lab's data; cross-references (nodes named by links, captures, checks) too.

    :raises ConfigError: listing every problem, prefixed by ``where`` (the file).
    """
    lab = structure(data, LabSpec, where)
    problems: list[str] = []
    for name, table in lab.nodes.items():
        if not NODE_NAME.fullmatch(name):
            problems.append(
                f"$.nodes.{name!r}: a node name must be 1-64 letters, digits, '_', '.' or '-',"
                " starting with a letter or digit (links name it as 'node:adapter')"
            )
        if not isinstance(table, Mapping):
            problems.append(f"$.nodes.{name}: must be a table of node properties")
    used: dict[tuple[str, int], str] = {}
    for index, link in enumerate(lab.links):
        for endpoint in link.parsed():
            problems += _unknown_node(lab, endpoint[0], f"$.links[{index}].endpoints")
            if endpoint in used:
                problems.append(
                    f"$.links[{index}].endpoints: {endpoint[0]}:{endpoint[1]} is already used by"
                    f" {used[endpoint]}"
                )
            used[endpoint] = f"links[{index}]"
    for index, capture in enumerate(lab.captures):
        problems += _unknown_node(
            lab, parse_endpoint(capture.endpoint)[0], f"$.captures[{index}].endpoint"
        )
    for index, check in enumerate(lab.checks):
        problems += _unknown_node(lab, check.node, f"$.checks[{index}].node")
    if problems:
        raise ConfigError(where, problems)
    return lab


def _unknown_node(lab: LabSpec, name: str, path: str) -> list[str]:
    if name in lab.nodes:
        return []
    known = ", ".join(sorted(lab.nodes)) or "none"
    return [f"{path}: no node named {name!r} (nodes: {known})"]
