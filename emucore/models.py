"""The data emu works on: projects, nodes, adapters, NIOs, link filters, settings.

All models are frozen attrs classes built from plain dicts by :mod:`emucore.convert`; a change
is a new value (``attrs.evolve``), never an edit in place. Emulator-specific node properties
are the emulator plugin's own attrs class (see :class:`emucore.plugins.EmulatorInfo`).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from emucore.validators import in_range, matches, one_of, printable

# One namespace for every id emu derives, so the same names give the same ids on any host.
EMU_NAMESPACE = uuid.UUID("6f1f3c1e-6c5b-4c59-9a52-2f7e8f0d4a11")

# Host names or IP literals: no comma, space or '=' can reach an option string through them.
_HOST_PATTERN = r"[A-Za-z0-9_.:\-]{1,253}"
# Linux interface names: at most 15 characters (IFNAMSIZ - 1).
_IFNAME_PATTERN = r"[A-Za-z0-9_.\-]{1,15}"


def _absolute(path: str | Path) -> Path:
    return Path(path).absolute()


class NodeStatus(enum.Enum):
    """Where a node is in its life: ``stopped → starting → started ⇄ suspended → stopping``."""

    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    SUSPENDED = "suspended"
    STOPPING = "stopping"


@attrs.frozen
class Project:
    """A directory that holds the working files of a set of nodes.

    :ivar id: stable identifier; node ids and MAC addresses are derived from it.
    :ivar directory: absolute path; each node works in a subdirectory of it.
    :ivar name: shown to users only.
    """

    id: uuid.UUID
    directory: Path = attrs.field(converter=_absolute)
    name: str = attrs.field(default="", validator=printable(100, allow_empty=True))

    @classmethod
    def for_directory(cls, directory: Path, name: str = "") -> Project:
        """A project whose id is derived from its absolute directory (stable across runs)."""
        directory = Path(directory).absolute()
        return cls(uuid.uuid5(EMU_NAMESPACE, str(directory)), directory, name)


@attrs.frozen
class UdpNio:
    """Raw Ethernet frames carried in UDP datagrams (the format of QEMU, VPCS, Dynamips, GNS3).

    :ivar local_port: where this end receives.
    :ivar remote_host: where this end sends (a host name or IP literal).
    :ivar remote_port: where this end sends.
    """

    local_port: int = attrs.field(validator=in_range(1, 65535))
    remote_host: str = attrs.field(validator=matches(_HOST_PATTERN, "a host name or IP address"))
    remote_port: int = attrs.field(validator=in_range(1, 65535))


@attrs.frozen
class TapNio:
    """A host TAP device (created beforehand, e.g. ``ip tuntap add dev tap0 mode tap``).

    :ivar device: the interface name.
    """

    device: str = attrs.field(
        validator=matches(_IFNAME_PATTERN, "a network interface name (1-15 of A-Z a-z 0-9 _ . -)")
    )


Nio = UdpNio | TapNio


@attrs.frozen
class LinkFilters:
    """Impairments applied to every frame crossing a link, in both directions.

    A value of 0 means "off". Any non-zero value puts a relay on the link.

    :ivar loss: percentage of frames dropped (0-100).
    :ivar delay: milliseconds added to every frame.
    :ivar jitter: milliseconds of random variation around ``delay`` (never below 0).
    :ivar corruption: percentage of frames with one bit flipped past the Ethernet header (0-100).
    :ivar rate: bandwidth limit in kbit/s (0 = unlimited).
    :ivar direction: which frames suffer: ``both`` directions (default; a ping then loses
        ``1 - (1 - loss)²`` and its RTT grows by twice the delay), or only ``a_to_b`` or
        ``b_to_a`` (like netem on one interface).
    :ivar drop_every: drop one frame in every ``drop_every`` of each direction, counted
        (0 = off; GNS3's ``frequency_drop``).
    """

    loss: float = attrs.field(default=0.0, validator=in_range(0, 100))
    delay: int = attrs.field(default=0, validator=in_range(0, 60_000))
    jitter: int = attrs.field(default=0, validator=in_range(0, 60_000))
    corruption: float = attrs.field(default=0.0, validator=in_range(0, 100))
    rate: int = attrs.field(default=0, validator=in_range(0, 100_000_000))
    direction: str = attrs.field(default="both", validator=one_of(("both", "a_to_b", "b_to_a")))
    drop_every: int = attrs.field(default=0, validator=in_range(0, 1_000_000))

    @property
    def active(self) -> bool:
        """Whether any impairment is set."""
        impairments = (self.loss, self.delay, self.jitter, self.corruption, self.rate)
        return any((*impairments, self.drop_every))


@attrs.frozen
class Adapter:
    """A node's network adapter as the runtime sees it.

    :ivar number: 0-based adapter number.
    :ivar nio: what the adapter is connected to, or ``None`` (link down in the guest).
    :ivar link_up: ``False`` after a link suspend; the adapter keeps its NIO.
    :ivar capture: the pcap file being written for this adapter, if any.
    """

    number: int
    nio: Nio | None = None
    link_up: bool = True
    capture: Path | None = None


@attrs.frozen
class ConsoleInfo:
    """How to reach a running node's console.

    :ivar type: ``telnet``, ``vnc``, ``spice`` or an emulator-specific kind.
    :ivar host: address the console listens on.
    :ivar port: the real TCP port (never 0 once the node runs).
    """

    type: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.type}://{self.host}:{self.port}"


@attrs.frozen
class NodeConfig:
    """What a host asks for: one node of one emulator.

    :ivar name: unique within a project; used in messages and passed to the emulator.
    :ivar emulator: the emulator kind (``qemu``, ``vpcs``, ...) that runs the node.
    :ivar id: stable identifier; derived from the project id and the name when not given.
    :ivar properties: the emulator's own properties (an instance of its properties class).
    :ivar nios: NIOs to connect at start, keyed by adapter number.
    """

    name: str = attrs.field(validator=printable(100))
    emulator: str = attrs.field(validator=matches(r"[a-z][a-z0-9_\-]*", "an emulator kind"))
    id: uuid.UUID
    properties: Any
    nios: Mapping[int, Nio] = attrs.field(factory=dict)


@attrs.frozen
class HostSettings:
    """What the host (lab controller, CLI, test suite) allows and provides.

    :ivar image_dirs: where images given by relative name are looked up, in order.
    :ivar allow_images_outside: accept absolute image paths outside ``image_dirs``.
    :ivar allow_unsafe_options: accept user options that could touch host files or add
        backends behind emu's back (QEMU ``-drive``, ``-netdev``, ...).
    :ivar console_host: address consoles listen on.
    :ivar udp_host: address UDP tunnels bind to.
    :ivar udp_ports: inclusive range UDP tunnel ports are allocated from.
    :ivar emulators: per-emulator settings, keyed by emulator kind, structured by the
        emulator's settings class.
    :ivar blocked_plugins: plugin names not to load (like ``pytest -p no:NAME``).
    """

    image_dirs: tuple[Path, ...] = ()
    allow_images_outside: bool = False
    allow_unsafe_options: bool = False
    console_host: str = attrs.field(
        default="127.0.0.1", validator=matches(_HOST_PATTERN, "a host name or IP address")
    )
    udp_host: str = attrs.field(
        default="127.0.0.1", validator=matches(_HOST_PATTERN, "a host name or IP address")
    )
    udp_ports: tuple[int, int] = attrs.field(default=(20000, 29999))
    emulators: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    blocked_plugins: tuple[str, ...] = ()

    @udp_ports.validator
    def _check_ports(self, _attr: attrs.Attribute[Any], value: tuple[int, int]) -> None:
        low, high = value
        if not 1024 <= low <= high <= 65535:
            raise ValueError(f"must be a range LOW, HIGH within 1024..65535; got {value!r}")


EVENT_KINDS = ("status", "info", "warning", "error")


@attrs.frozen
class NodeEvent:
    """Something a host may want to show: a status change, a warning, an error.

    :ivar node: the node's name.
    :ivar kind: ``status``, ``info``, ``warning`` or ``error``.
    :ivar message: one line for a user.
    :ivar status: the node's status after the event.
    :ivar details: more text, e.g. the tail of the emulator's log for an error.
    :ivar host_wide: the event is about the host, not this node (KVM unusable, a missing
        helper): every node may report it, and a host shows it once.
    """

    node: str
    kind: str = attrs.field(validator=one_of(EVENT_KINDS))
    message: str
    status: NodeStatus
    details: str = ""
    host_wide: bool = False
