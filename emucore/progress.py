"""Show what a lab's nodes are doing while it starts: a live table on a terminal, plain lines
otherwise (logs, CI)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

from emucore.models import NodeEvent


class Progress:
    """Receives node events (subscribe :meth:`on_event`) and shows them on ``stream``."""

    def __init__(self, stream: TextIO, nodes: Sequence[str], live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.started = time.monotonic()
        self.rows: dict[str, str] = dict.fromkeys(nodes, "waiting")
        self._drawn = 0
        self._width = max((len(n) for n in nodes), default=4)
        self._host_wide: set[tuple[str, str]] = set()
        self._active = True  # the table is drawn until finish()

    def on_event(self, event: NodeEvent) -> None:
        """Record and show one event; a host-wide one only the first time."""
        if event.host_wide:
            if (event.kind, event.message) in self._host_wide:
                return
            self._host_wide.add((event.kind, event.message))
            self.note("host", f"{event.kind}: {event.message}")
            return
        elapsed = time.monotonic() - self.started
        if event.kind == "status":
            self.rows[event.node] = f"{event.status.value} ({elapsed:.1f}s)"
        if self.live and event.kind == "status":
            self._redraw()
            return
        if event.kind != "status" or not self.live:
            self._clear()
            line = f"[{elapsed:6.1f}s] {event.node}: {event.message}"
            if event.kind in ("warning", "error"):
                line = f"[{elapsed:6.1f}s] {event.node}: {event.kind}: {event.message}"
            print(line, file=self.stream, flush=True)
            if event.details and event.kind == "error":
                print(event.details, file=self.stream, flush=True)
            if self.live:
                self._redraw()

    def note(self, subject: str, message: str) -> None:
        """Show one line about ``subject`` (the host, a check), above a live table."""
        elapsed = time.monotonic() - self.started
        self._clear()
        print(f"[{elapsed:6.1f}s] {subject}: {message}", file=self.stream, flush=True)
        if self.live and self._active:
            self._redraw()

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self) -> None:
        self._clear()
        for name, text in self.rows.items():
            self.stream.write(f"  {name:<{self._width}}  {text}\n")
        self._drawn = len(self.rows)
        self.stream.flush()

    def finish(self) -> None:
        """Leave the last table on screen (a live display) and stop drawing."""
        self._drawn = 0
        self._active = False
