"""A minimal emulator plugin for testing the core alone (no process behind it).

It exists to test emucore's state machine, dispatch and converter without QEMU; tests of
real emulators live in the test_qemu_* and test_vpcs_* files.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Sequence
from typing import Any

import attrs

from emucore import hookimpl
from emucore.node import Node
from emucore.records import ArgFragment, EmulatorInfo
from emucore.validators import in_range, one_of


@attrs.frozen
class ToyProperties:
    adapters: int = attrs.field(default=1, validator=in_range(0, 275))
    ram: int = attrs.field(default=64, validator=in_range(1, 4096))
    flavour: str = attrs.field(default="plain", validator=one_of({"plain", "spicy"}))

    @property
    def adapter_count(self) -> int:
        return self.adapters


def make_toy(kind: str = "toy", delay: float = 0.0) -> types.ModuleType:
    """A plugin module providing emulator ``kind``; it records every hook call."""
    module = types.ModuleType(f"{kind}_plugin")
    module.EMULATOR = kind  # type: ignore[attr-defined]
    calls: list[tuple[str, str]] = []
    module.calls = calls  # type: ignore[attr-defined]
    failures: dict[str, Exception] = {}
    module.failures = failures  # type: ignore[attr-defined]

    busy: set[str] = set()
    module.overlaps = overlaps = []  # type: ignore[attr-defined]

    entered: dict[str, asyncio.Event] = {}
    module.entered = entered  # type: ignore[attr-defined]

    async def step(name: str, node: Node) -> None:
        calls.append((name, node.name))
        if name in entered:
            entered[name].set()
        if node.name in busy:  # two hook runs at once on one node: the lock failed
            overlaps.append((name, node.name))
        busy.add(node.name)
        try:
            if delay:
                await asyncio.sleep(delay)
            if name in failures:
                raise failures[name]
        finally:
            busy.discard(node.name)

    @hookimpl
    def emu_emulators() -> Sequence[EmulatorInfo]:
        return [EmulatorInfo(kind, ToyProperties)]

    @hookimpl
    def emu_build_args(node: Node) -> Sequence[ArgFragment]:
        calls.append(("build_args", node.name))
        return [ArgFragment(0, [kind]), ArgFragment(10, [f"--ram={node.properties.ram}"])]

    def lifecycle(name: str) -> Any:
        async def impl(node: Node, **_: Any) -> None:
            await step(name, node)

        impl.__name__ = f"emu_{name}"
        return impl

    @hookimpl
    async def emu_attach_nio(node: Node, adapter: int, nio: Any) -> None:
        await step(f"attach {adapter}", node)

    @hookimpl
    async def emu_update_nio(node: Node, adapter: int, old: Any, new: Any) -> None:
        await step(f"update {adapter}", node)

    @hookimpl
    async def emu_detach_nio(node: Node, adapter: int, nio: Any) -> None:
        await step(f"detach {adapter}", node)

    @hookimpl
    async def emu_set_link(node: Node, adapter: int, up: bool) -> None:
        await step(f"link {adapter} {'up' if up else 'down'}", node)

    @hookimpl
    async def emu_capture(node: Node, adapter: int, path: Any) -> bool:
        await step(f"capture {adapter}", node)
        return adapter == 0  # only adapter 0 can be captured

    @hookimpl
    async def emu_stop_capture(node: Node, adapter: int) -> None:
        await step(f"stop capture {adapter}", node)

    for impl in (emu_attach_nio, emu_update_nio, emu_detach_nio, emu_set_link):
        setattr(module, impl.__name__, impl)
    module.emu_capture = emu_capture  # type: ignore[attr-defined]
    module.emu_stop_capture = emu_stop_capture  # type: ignore[attr-defined]

    for name in ("start", "started", "stop", "suspend", "resume", "reload", "close"):
        setattr(module, f"emu_{name}", hookimpl(_signature(name, lifecycle(name))))
    module.emu_emulators = emu_emulators  # type: ignore[attr-defined]
    module.emu_build_args = emu_build_args  # type: ignore[attr-defined]
    return module


def _signature(name: str, impl: Any) -> Any:
    # pluggy checks argument names against the spec: give each impl the spec's names.
    if name == "start":

        async def start(node: Node, argv: Sequence[str]) -> None:
            await impl(node)

        return start

    async def other(node: Node) -> None:
        await impl(node)

    return other
