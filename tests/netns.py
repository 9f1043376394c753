"""Two "hosts" on one machine: two network namespaces joined by a veth pair.

::

    root namespace (controller, tests)          namespace A              namespace B
      uplink-r 10.S.1.1 ──── veth ──── uplink-a 10.S.1.2
      route 10.S.0.0/24 via 10.S.1.2             wire-a 10.S.0.1 ── veth ── wire-b 10.S.0.2
                                                 (forwards)                 default via 10.S.0.1

The two hosts (``10.S.0.1`` and ``10.S.0.2``) share one wire, as two machines on a LAN; what
crosses between them never leaves that veth pair. The root namespace reaches both through A,
which forwards (``ip_forward`` is a setting of each namespace, so the machine's own is not
touched). ``S`` is a subnet no route of the machine uses, and every name carries a random
token, so runs of other engineers at the same time do not collide. Everything is removed when
the block ends, also after a failure: deleting a namespace deletes its veth ends, and a veth
pair goes with either end, and the root's route with its device.

Where namespaces cannot be made (not root), :func:`two_hosts_or_loopback` gives two loopback
addresses instead (``127.0.0.2``, ``127.0.0.3``): the same protocol, without the isolation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"


class NamespaceError(Exception):
    """The namespaces cannot be made here (not root, no ``ip``, no netns support)."""


@attrs.frozen
class Hosts:
    """Two namespaces on one wire, reachable from the root namespace.

    :ivar names: the namespaces (A, B); empty names for loopback addresses.
    :ivar addresses: each host's address on the wire (A, B).
    :ivar wire: the veth ends of the wire (A's, B's).
    """

    names: tuple[str, str]
    addresses: tuple[str, str]
    wire: tuple[str, str] = ("", "")

    @property
    def isolated(self) -> bool:
        """Whether the hosts are namespaces (else two loopback addresses of the machine)."""
        return bool(self.names[0])

    def prefix(self, host: int) -> list[str]:
        """What runs a command inside host ``host`` (0 or 1): ``ip netns exec NS``, which
        execs the command (its pid is the command's); nothing for loopback addresses."""
        return [IP, "netns", "exec", self.names[host]] if self.isolated else []

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``."""
        return [*self.prefix(host), *argv]

    def wire_packets(self, host: int) -> int:
        """Packets host ``host`` sent on the wire so far (its veth end's counter)."""
        assert self.isolated, "loopback hosts have no wire of their own"
        stats = Path(f"/sys/class/net/{self.wire[host]}/statistics/tx_packets")
        argv = self.command(host, ["cat", str(stats)])
        return int(subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout)


def _ip(*args: str, namespace: str | None = None) -> None:
    argv = [IP, *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    routes = subprocess.run(
        [IP, "-4", "-o", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    found = []
    for line in routes.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable"):
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(first, strict=False))
    return found


def _free_subnet() -> int:
    """An ``S`` such that no route of the machine touches ``10.S.0.0/16``."""
    used = _used_networks()
    candidates = list(range(200, 250))
    secrets.SystemRandom().shuffle(candidates)
    for second in candidates:
        block = ipaddress.IPv4Network(f"10.{second}.0.0/16")
        if not any(block.overlaps(network) for network in used):
            return second
    raise NamespaceError("no free 10.x.0.0/16 block for the test namespaces")


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Make the two namespaces; remove them when the block ends.

    :raises NamespaceError: they cannot be made (the caller skips or fails with the reason).
    """
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root")
    token = secrets.token_hex(3)
    names = (f"emu-{token}-a", f"emu-{token}-b")
    wire = (f"ew{token}a", f"ew{token}b")
    uplink = (f"eu{token}r", f"eu{token}a")
    try:
        for attempt in range(5):
            second = _free_subnet()
            try:
                for name in names:
                    _ip("netns", "add", name)
                _setup(names, wire, uplink, second)
                break
            except NamespaceError:
                _remove(names, uplink[0])  # another run took the subnet meanwhile: again
                if attempt == 4:
                    raise
        yield Hosts(names, (f"10.{second}.0.1", f"10.{second}.0.2"), wire)
    finally:
        _remove(names, uplink[0])


def _remove(names: tuple[str, str], uplink: str) -> None:
    """Delete the namespaces (their veth ends go with them) and the root's veth end (which
    takes its route along); what does not exist is skipped."""
    with contextlib.suppress(NamespaceError):
        _ip("link", "del", uplink)
    for name in names:
        with contextlib.suppress(NamespaceError):
            _ip("netns", "del", name)


def _setup(
    names: tuple[str, str], wire: tuple[str, str], uplink: tuple[str, str], second: int
) -> None:
    a, b = names
    net = f"10.{second}"
    _ip("link", "add", wire[0], "netns", a, "type", "veth", "peer", "name", wire[1], "netns", b)
    _ip("link", "add", uplink[0], "type", "veth", "peer", "name", uplink[1], "netns", a)
    _ip("addr", "add", f"{net}.1.1/24", "dev", uplink[0])
    _ip("link", "set", uplink[0], "up")
    _ip("addr", "add", f"{net}.1.2/24", "dev", uplink[1], namespace=a)
    _ip("addr", "add", f"{net}.0.1/24", "dev", wire[0], namespace=a)
    _ip("addr", "add", f"{net}.0.2/24", "dev", wire[1], namespace=b)
    for namespace, device in ((a, uplink[1]), (a, wire[0]), (b, wire[1])):
        _ip("link", "set", device, "up", namespace=namespace)
    for namespace in names:
        _ip("link", "set", "lo", "up", namespace=namespace)
    _ip("route", "add", f"{net}.0.0/24", "via", f"{net}.1.2", "dev", uplink[0])
    _ip("route", "add", "default", "via", f"{net}.0.1", namespace=b)
    done = subprocess.run(
        [IP, "netns", "exec", a, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise NamespaceError(f"ip_forward in {a}: {done.stderr.strip()}")


@contextlib.contextmanager
def two_hosts_or_loopback() -> Iterator[Hosts]:
    """:func:`two_hosts`, or two loopback addresses where namespaces cannot be made (said
    in a warning: the tests of what crosses the wire between the hosts then check less)."""
    try:
        with two_hosts() as hosts:
            yield hosts
            return
    except NamespaceError as exc:
        warnings.warn(f"two loopback addresses instead of network namespaces: {exc}", stacklevel=2)
    yield Hosts(("", ""), ("127.0.0.2", "127.0.0.3"))
