"""UDP port allocation for tunnels: per host, collision-free, released on detach and close."""

from __future__ import annotations

import random
import socket
import threading

from emucore.errors import PortError

# Shared by every allocator in the process: two sessions on one host never get the same port.
_taken: set[tuple[str, int]] = set()
_lock = threading.Lock()


class PortAllocator:
    """Hands out UDP ports from ``[low, high]`` on ``host``.

    A port is free when no allocator of this process holds it and it can be bound right now
    (another program may hold it). The emulator or the relay binds it later; a collision in
    between fails loudly at start. Each allocator begins at a random place in the range, so
    two emu processes on one host (two labs, a lab and ``emu serve``) choosing ports at the
    same moment rarely pick the same one (from ``low``, they did at once).
    """

    def __init__(self, host: str, ports: tuple[int, int]) -> None:
        self.host = host
        self.low, self.high = ports
        self._next = random.randint(self.low, self.high)
        self.held: set[int] = set()

    def allocate(self) -> int:
        """A free port, now held by this allocator.

        :raises PortError: every port of the range is taken.
        """
        with _lock:
            span = self.high - self.low + 1
            for offset in range(span):
                port = self.low + (self._next - self.low + offset) % span
                if (self.host, port) not in _taken and _bindable(self.host, port):
                    self._next = port + 1 if port < self.high else self.low
                    _taken.add((self.host, port))
                    self.held.add(port)
                    return port
        raise PortError(
            f"no free UDP port in {self.low}-{self.high} on {self.host};"
            " widen HostSettings.udp_ports or close other labs"
        )

    def reserve(self, port: int) -> None:
        """Hold a port chosen by the user.

        :raises PortError: the port is held already or cannot be bound.
        """
        with _lock:
            if (self.host, port) in _taken or not _bindable(self.host, port):
                raise PortError(f"UDP port {port} on {self.host} is already in use")
            _taken.add((self.host, port))
            self.held.add(port)

    def release(self, port: int) -> None:
        """Give a port back (no-op if this allocator does not hold it)."""
        with _lock:
            if port in self.held:
                self.held.discard(port)
                _taken.discard((self.host, port))

    def release_all(self) -> None:
        """Give back every port this allocator holds."""
        for port in list(self.held):
            self.release(port)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
