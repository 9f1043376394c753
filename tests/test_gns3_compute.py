"""The compute's bookkeeping around the core, driven without HTTP or a controller: a toy
emulator named ``vpcs`` (a GNS3 node type; no process behind it) and a small plugin whose
node info answers when the test lets it. ``tests/test_gns3.py`` runs the real controller."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emu_gns3.compute import Compute
from emucore import hookimpl
from emucore.models import HostSettings
from emucore.node import Node
from emucore.plugins import make_plugin_manager
from tests.conftest import run
from tests.toy_emulator import make_toy


class GatedInfo:
    """Node info whose n-th call answers ``{"checksum": "answer-n"}`` once ``release[n]`` is
    set; ``entered[n]`` is set when the n-th call begins."""

    EMULATOR = "vpcs"

    def __init__(self, calls: int) -> None:
        self.entered = [asyncio.Event() for _ in range(calls)]
        self.release = [asyncio.Event() for _ in range(calls)]
        self.calls = 0

    @hookimpl
    async def emu_node_info(self, node: Node) -> Mapping[str, Any]:
        number = self.calls
        self.calls += 1
        self.entered[number].set()
        await self.release[number].wait()
        return {"checksum": f"answer-{number}"}


def test_a_late_node_info_answer_does_not_replace_a_newer_one(tmp_path: Path) -> None:
    async def body() -> None:
        gated = GatedInfo(2)
        plugins = make_plugin_manager(
            entry_points=False, plugins=[("toy", make_toy("vpcs")), ("gated", gated)]
        )
        compute = Compute(HostSettings(), plugins, tmp_path)
        project = compute.open_project(uuid.uuid4(), "p")
        try:
            with compute.notifier.listen() as messages:
                entry = project.add_node("vpcs", {"name": "pc"})  # the first, slow refresh
                await gated.entered[0].wait()
                project.refresh_info(entry)  # a second one (a status change, say)
                await gated.entered[1].wait()
                gated.release[1].set()
                gated.release[0].set()  # the older answer comes last
                await asyncio.gather(*project._refreshing, return_exceptions=True)
                assert entry.info == {"checksum": "answer-1"}
                published = [messages.get_nowait() for _ in range(messages.qsize())]
            updates = [m for m in published if m is not None and m["action"] == "node.updated"]
            assert [u["event"]["checksum"] for u in updates] == ["answer-1"]
        finally:
            await compute.close()

    run(body())
