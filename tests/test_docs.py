"""The documentation is complete and builds.

Fails when a hook spec lacks its docstring (or one of its parts) or is missing from the
reference, when a fixture or command-line option of the emu pytest plugins, an emulator
property or host setting, an unsafe QEMU option, an argv position, an ``emu`` subcommand,
option or exit code is not documented, and when Sphinx reports any warning (``-W -n``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
from _pytest.fixtures import getfixturemarker

import emu_tests
from emu_qemu import optionpolicy
from emu_qemu.properties import CustomAdapter, QemuProperties
from emucore import cli, hookspecs
from emucore.models import HostSettings
from emucore.plugins import emulators, make_plugin_manager

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Emulators whose plugins live in this repository, and so must have a page here.
OWN_PACKAGES = ("emu_qemu", "emu_vpcs")


def page(name: str) -> str:
    """The Markdown source of ``docs/<name>``."""
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The text under the first heading line that contains ``heading``, up to the next
    heading of the same or a higher level ('' when there is no such heading)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"(#+) ", line)
        if match and heading in line:
            level = len(match.group(1))
            body = []
            for following in lines[index + 1 :]:
                other = re.match(r"(#+) ", following)
                if other and len(other.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body)
    return ""


def has_heading(text: str, name: str) -> bool:
    """Whether a heading line of ``text`` names ``name`` in backticks."""
    return re.search(rf"^#+ .*`{re.escape(name)}`", text, re.MULTILINE) is not None


# -- the build -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML docs as ``scripts/test`` does, nitpicky; fails on any warning."""
    from sphinx.cmd.build import build_main

    out = tmp_path_factory.mktemp("docs")
    log = out / "warnings.txt"
    args = ["-W", "--keep-going", "-n", "-q", "-w", str(log), "-b", "html"]
    with warnings.catch_warnings():
        # Sphinx's own deprecation notices about extensions are not documentation problems.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        code = build_main([*args, "-d", str(out / "doctrees"), str(DOCS), str(out / "html")])
    reported = log.read_text() if log.exists() else ""
    assert code == 0, f"sphinx-build failed:\n{reported}"
    return out / "html"


def test_the_docs_build_without_warnings(built_docs: Path) -> None:
    assert (built_docs / "index.html").exists()
    assert (built_docs / "hooks.html").exists()


# -- hook specs ------------------------------------------------------------------------------


def hook_specs() -> list[str]:
    """The names of the hook specifications in ``emucore.hookspecs``."""
    return sorted(
        name
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("emu_") and hasattr(function, "emucore_spec")
    )


def test_there_are_hook_specs() -> None:
    assert len(hook_specs()) >= 10


@pytest.mark.parametrize("name", hook_specs())
def test_a_hook_spec_has_a_docstring_in_the_required_shape(name: str) -> None:
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    assert doc, f"{name} has no docstring"
    summary = doc.split("\n\n", 1)[0]
    assert summary.endswith("."), f"{name}: the summary is one sentence ending with a period"
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{name}: no ':param {parameter}:'"
    assert ":return:" in doc, f"{name}: no ':return:'"
    first_wins = function.emucore_spec.get("firstresult", False)
    says_first = re.search(r"first non-``?None``? (result )?wins|stops at the first", doc)
    if first_wins:
        assert says_first, f"{name} is firstresult: say that the first non-None result wins"
    else:
        assert "collected" in doc, f"{name}: say that its results are collected"
    is_async = "Awaitable" in str(inspect.signature(function).return_annotation)
    if is_async:
        assert "May be async." in doc, f"{name} returns an Awaitable: say 'May be async.'"
        assert not first_wins, f"{name}: an async hook cannot be firstresult (see the async rule)"
    else:
        assert re.search(r"\bSync\.", doc), f"{name}: say 'Sync.'"


@pytest.mark.parametrize("name", hook_specs())
def test_a_hook_spec_is_in_the_reference(name: str, built_docs: Path) -> None:
    reference = (built_docs / "hooks.html").read_text()
    in_reference = f'id="emucore.hookspecs.{name}"' in reference
    assert in_reference or f"`{name}`" in page("hooks.md"), f"{name} is not in hooks.md"


# -- pytest fixtures and options -------------------------------------------------------------


def emu_pytest_modules() -> list[ModuleType]:
    """Every module of ``emu_tests`` and every pytest11 entry point of an emu distribution."""
    names = {f"emu_tests.{info.name}" for info in pkgutil.iter_modules(emu_tests.__path__)}
    for entry in entry_points(group="pytest11"):
        dist = entry.dist.name if entry.dist is not None else ""
        if entry.module.startswith("emu") or dist.startswith("emu"):
            names.add(entry.module)
    return [importlib.import_module(name) for name in sorted(names)]


def fixtures() -> list[str]:
    """The names of the fixtures the emu pytest plugins define."""
    found = set()
    for module in emu_pytest_modules():
        for attribute, value in vars(module).items():
            marker = getfixturemarker(value)
            if marker is not None:
                found.add(marker.name or attribute)
    return sorted(found)


class _OptionRecorder:
    """Stands in for pytest's parser: records the names ``pytest_addoption`` adds."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def getgroup(self, *_args: Any, **_kwargs: Any) -> _OptionRecorder:
        return self

    def addoption(self, *names: str, **_kwargs: Any) -> None:
        self.names += names

    def addini(self, *_args: Any, **_kwargs: Any) -> None:
        pass


def command_line_options() -> list[str]:
    """The command-line options the emu pytest plugins add."""
    recorder = _OptionRecorder()
    for module in emu_pytest_modules():
        add: Callable[[Any], None] | None = getattr(module, "pytest_addoption", None)
        if add is not None:
            add(recorder)
    return sorted(recorder.names)


def test_there_are_fixtures_and_options() -> None:
    assert {"emu_run", "emu_session", "qemu_node"} <= set(fixtures())
    assert "--emu-qemu" in command_line_options()


@pytest.mark.parametrize("name", fixtures())
def test_a_fixture_is_documented_with_an_example(name: str) -> None:
    text = page("fixtures.md")
    assert has_heading(text, name), f"fixtures.md has no heading for the fixture {name}"
    heading = next(line for line in text.splitlines() if re.match(rf"#+ .*`{name}`", line))
    assert "```python" in section(text, heading), f"fixtures.md: {name} has no example"


@pytest.mark.parametrize("option", command_line_options())
def test_a_pytest_option_is_documented(option: str) -> None:
    assert f"`{option}`" in page("fixtures.md"), f"fixtures.md does not mention {option}"


# -- emulator properties and settings --------------------------------------------------------


def own_emulators() -> Iterator[tuple[str, Any, Any]]:
    """(kind, properties class, settings class) of the emulators this repository ships."""
    for kind, info in sorted(emulators(make_plugin_manager(environ={})).items()):
        if info.properties.__module__.split(".")[0] in OWN_PACKAGES:
            yield kind, info.properties, info.settings


def property_cases() -> list[tuple[str, str]]:
    return [(kind, f.name) for kind, cls, _ in own_emulators() for f in attrs.fields(cls)]


def setting_cases() -> list[tuple[str, str]]:
    cases = [("qemu", f.name) for f in attrs.fields(HostSettings)]
    cases += [("qemu", f.name) for f in attrs.fields(CustomAdapter)]
    for kind, _, settings in own_emulators():
        if settings is not None:
            cases += [(kind, f.name) for f in attrs.fields(settings)]
    return cases


def test_qemu_is_among_the_documented_emulators() -> None:
    assert "qemu" in {kind for kind, _, _ in own_emulators()}


@pytest.mark.parametrize(("kind", "name"), property_cases())
def test_a_node_property_has_its_section(kind: str, name: str) -> None:
    text = page(f"{kind}-node.md")
    assert has_heading(text, name), f"{kind}-node.md has no heading for the property {name}"


@pytest.mark.parametrize("name", [f.name for f in attrs.fields(QemuProperties)])
def test_a_qemu_property_says_what_it_puts_on_the_command_line(name: str) -> None:
    text = page("qemu-node.md")
    heading = next(line for line in text.splitlines() if re.match(rf"#+ .*`{name}`", line))
    assert "argv" in section(text, heading), f"qemu-node.md: {name} does not say its argv"


@pytest.mark.parametrize(("kind", "name"), setting_cases())
def test_a_setting_is_documented(kind: str, name: str) -> None:
    assert f"`{name}`" in page(f"{kind}-node.md"), f"{kind}-node.md does not mention {name}"


@pytest.mark.parametrize(
    "name",
    sorted(
        optionpolicy.FLAGS
        | set(optionpolicy.ALLOWED)
        | optionpolicy.UNSAFE_KEYS
        | optionpolicy.UNSAFE_DEVICES
    )
    + [f"{prefix}*" for prefix in optionpolicy.UNSAFE_DEVICE_PREFIXES],
)
def test_the_option_policy_is_listed(name: str) -> None:
    text = section(page("qemu-node.md"), "What is refused")
    assert f"`{name}`" in text, f"qemu-node.md does not list {name} of the option policy"


def position_cases() -> list[tuple[str, str, int]]:
    """(page, name, value) of each argv position constant of the emulators shipped here."""
    cases = []
    for package in OWN_PACKAGES:
        try:
            module = importlib.import_module(f"{package}.positions")
        except ImportError:
            continue
        kind = package.removeprefix("emu_")
        cases += [(f"{kind}-node.md", n, v) for n, v in vars(module).items() if n.isupper()]
    return cases


@pytest.mark.parametrize(("page_name", "name", "value"), position_cases())
def test_an_argv_position_is_in_the_table(page_name: str, name: str, value: int) -> None:
    row = rf"^\|\s*{value}\s*\|\s*`{name}`\s*\|"
    assert re.search(row, page(page_name), re.MULTILINE), f"{page_name}: no row for {name}"


# -- the CLI ---------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``emu`` subcommands and their parsers."""
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("emu has no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    ]


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_a_subcommand_and_its_options_are_documented(command: str) -> None:
    text = page("cli.md")
    assert has_heading(text, f"emu {command}"), f"cli.md has no section 'emu {command}'"
    body = section(text, f"`emu {command}`")
    for option in option_strings(subcommands()[command]):
        assert f"`{option}" in body, f"cli.md: emu {command} {option} is not documented"


def test_the_global_options_and_exit_codes_are_documented() -> None:
    text = page("cli.md")
    for option in option_strings(cli.build_parser()):
        assert f"`{option}`" in text, f"cli.md: emu {option} is not documented"
    codes = section(text, "Exit codes")
    for name, value in vars(cli).items():
        if name.startswith("EXIT_"):
            assert re.search(rf"^\|\s*{value}\s*\|", codes, re.MULTILINE), f"no exit code {value}"
