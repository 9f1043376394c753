"""The rules of the design, checked on the source with ``ast``.

* The core (``emucore``) imports nothing of ours: no emulator, no image, no front end.
* A hook module (a module registered as a plugin through the ``emucore.plugins`` entry
  points) never imports another hook module: what pieces share goes through a hook or a
  module that registers no hooks (``emu_qemu.contract``, ``emu_vpcs.terminal``...), so
  blocking one built-in takes nothing with it but itself.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

OURS = ("emucore", "emu_qemu", "emu_vpcs", "emu_tests", "emu_gns3", "emu_sandbox")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a source file imports, anywhere in it (``from a import b`` gives both
    ``a`` and ``a.b``, since ``b`` may be a module); ``package`` resolves relative imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # A relative import counts as what it names (``from .process import x``).
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def source_of(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    assert spec.origin is not None, module
    return Path(spec.origin)


def hook_modules() -> list[str]:
    """The modules registered as plugins by the installed distributions of ours."""
    points = importlib.metadata.entry_points(group="emucore.plugins")
    return sorted({p.value for p in points if p.value.split(".")[0] in OURS})


def core_modules() -> list[Path]:
    return sorted(source_of("emucore").parent.glob("*.py"))


@pytest.mark.parametrize("path", core_modules(), ids=lambda path: path.name)
def test_the_core_imports_nothing_of_ours(path: Path) -> None:
    foreign = {m for m in imported_modules(path, "emucore") if m.split(".")[0] in OURS[1:]}
    assert foreign == set(), f"emucore/{path.name} imports {sorted(foreign)}"


def test_there_are_hook_modules_to_check() -> None:
    assert {"emu_qemu.binary", "emu_qemu.process", "emu_vpcs.network"} <= set(hook_modules())


@pytest.mark.parametrize("module", hook_modules())
def test_a_hook_module_imports_no_other_hook_module(module: str) -> None:
    others = set(hook_modules()) - {module}
    imported = imported_modules(source_of(module), module.rpartition(".")[0]) & others
    assert imported == set(), f"{module} imports the hook module(s) {sorted(imported)}"
