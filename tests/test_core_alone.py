"""The core runs a lab with none of our emulators, images or front ends importable.

A third party's distribution provides a toy emulator and a lab image; the ``emu run``
command runs a lab of two toy nodes joined by an impaired link, with a capture, in a Python
where importing ``emu_qemu``, ``emu_vpcs``, ``emu_tests`` or ``emu_gns3`` fails. So the core
names no emulator, property, image or package of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

TOY = '''
"""A toy emulator and a toy image, as a third party would ship them."""
import asyncio
import attrs
from emucore import hookimpl
from emucore.records import ArgFragment, EmulatorInfo, LabImage

EMULATOR = "toy"

@attrs.frozen
class ToyProperties:
    adapters: int = 1
    colour: str = "grey"

    @property
    def adapter_count(self) -> int:
        return self.adapters

@hookimpl
def emu_emulators():
    return [EmulatorInfo("toy", ToyProperties, description="a toy")]

@hookimpl
def emu_lab_image(image, node, table, settings):
    if image != "toy-box":
        return None
    description = {k: v for k, v in table.items() if k != "image"}
    return LabImage({**description, "emulator": "toy", "colour": "blue"})

@hookimpl
def emu_build_args(node):
    return [ArgFragment(0, ["toy", node.properties.colour])]

@hookimpl
async def emu_start(node, argv):
    await asyncio.sleep(0)
'''

LAB = """
name = "alone"

[nodes.a]
emulator = "toy"
colour = "red"

[nodes.b]
image = "toy-box"

[[links]]
endpoints = ["a:0", "b:0"]
filters = { delay = 5 }

[[captures]]
endpoint = "a:0"
"""

RUN = """
import importlib.abc, importlib.metadata, os, sys
ours = ("emu_qemu", "emu_vpcs", "emu_tests", "emu_gns3")
names = [
    point.name
    for group in ("emucore.plugins", "emucore.hookspecs")
    for point in importlib.metadata.entry_points(group=group)
    if point.value.split(".")[0] in ours
]

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in ours:
            raise ImportError(f"{fullname} may not be imported here")
        return None

sys.meta_path.insert(0, Refuse())
os.environ["EMU_BLOCK_PLUGINS"] = ",".join(names)
from emucore.cli import main
code = main(["run", sys.argv[1], "--check", "--json"])
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in ours), file=sys.stderr)
sys.exit(code)
"""


def test_the_core_runs_a_lab_of_a_third_party_emulator_alone(
    tmp_path: Path, make_distribution: Callable[..., Path]
) -> None:
    site = make_distribution(
        "emu-toy", {"emu_toy": TOY}, {"toy": "emu_toy"}, group="emucore.plugins"
    )
    lab = tmp_path / "lab" / "alone.toml"
    lab.parent.mkdir()
    lab.write_text(LAB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN), str(lab)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr
    state = json.loads(done.stdout)
    assert {(n["name"], n["emulator"], n["status"]) for n in state["nodes"]} == {
        ("a", "toy", "started"),
        ("b", "toy", "started"),
    }
    assert state["links"] == [
        {"endpoints": ["a:0", "b:0"], "relay": True, "filters": state["links"][0]["filters"]}
    ]
    assert Path(state["captures"][0]["file"]).read_bytes()[:4] in (
        b"\xd4\xc3\xb2\xa1",
        b"\xa1\xb2\xc3\xd4",
    )
