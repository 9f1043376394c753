"""The ``lab`` fixture's helper: link nodes of the test's session, or run a whole lab file."""

from __future__ import annotations

from pathlib import Path

from emucore.lab import load_lab, parse_endpoint
from emucore.links import Link
from emucore.models import LinkFilters
from emucore.node import Node
from emucore.runner import LabRunner
from emucore.session import Session


class LabHelper:
    """Links for ``emu_session`` nodes, and lab files run on the test's event loop.

    :ivar session: the test's session (``emu_session``).
    :ivar runners: the lab files started with :meth:`start`, stopped at teardown.
    """

    def __init__(self, session: Session, directory: Path) -> None:
        self.session = session
        self.directory = directory
        self.runners: list[LabRunner] = []

    async def link(self, a: str | Node, b: str | Node, filters: LinkFilters | None = None) -> Link:
        """Link two endpoints, each a node, a node name (adapter 0) or ``"name:adapter"``."""
        (a_node, a_adapter), (b_node, b_adapter) = (self._endpoint(end) for end in (a, b))
        return await self.session.link(a_node, a_adapter, b_node, b_adapter, filters)

    def _endpoint(self, end: str | Node) -> tuple[Node, int]:
        if isinstance(end, Node):
            return end, 0
        name, adapter = parse_endpoint(end)
        return self.session.node(name), adapter

    async def start(self, toml_text: str, name: str = "lab") -> LabRunner:
        """Validate and start a lab file's text (its own session and nodes) in the test's
        directory; it is stopped at teardown."""
        import tomllib

        path = self.directory / f"{name}.toml"
        path.write_text(toml_text)
        runner = LabRunner(load_lab(tomllib.loads(toml_text), str(path)), path)
        self.runners.append(runner)
        await runner.start()
        return runner

    async def stop(self) -> None:
        """Stop every lab started with :meth:`start`."""
        for runner in self.runners:
            await runner.stop()
        self.runners.clear()
