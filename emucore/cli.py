"""``emu``: the reference host. Subcommands live in their own modules; this one dispatches.

Exit codes: 0 success, 1 a node or check failed, 2 bad input (file, field, option),
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from emucore.convert import structure
from emucore.errors import ConfigError, EmuError
from emucore.models import HostSettings, Project
from emucore.plugins import describe_plugins, make_plugin_manager
from emucore.session import Session

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def read_data(path: Path) -> Any:
    """Read a JSON or TOML file (by extension; anything else is tried as JSON, then TOML).

    :raises ConfigError: unreadable or not parseable, naming the file.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    parsers = {".json": [_json], ".toml": [_toml]}.get(path.suffix, [_json, _toml])
    errors = []
    for parse in parsers:
        try:
            return parse(text)
        except ValueError as exc:
            errors.append(str(exc))
    kinds = "/".join(parse.__name__[1:].upper() for parse in parsers)
    raise ConfigError(str(path), [f"not valid {kinds}: {errors[-1]}"])


def _json(text: str) -> Any:
    return json.loads(text)


def _toml(text: str) -> Any:
    return tomllib.loads(text)


def load_settings(path: Path | None, image_dirs: Sequence[Path] = ()) -> HostSettings:
    """Host settings from a TOML/JSON file (or defaults), plus extra image directories."""
    data: dict[str, Any] = dict(read_data(path)) if path else {}
    settings = structure(data, HostSettings, str(path) if path else "settings")
    if image_dirs:
        extra = tuple(Path(d).absolute() for d in image_dirs)
        settings = HostSettings(**{**_fields(settings), "image_dirs": settings.image_dirs + extra})
    return settings


def _fields(settings: HostSettings) -> dict[str, Any]:
    return attrs.asdict(settings, recurse=False)


def cmd_argv(args: argparse.Namespace) -> int:
    """Print the command line a node description would start, as a JSON array.

    Anything wrong with the description (fields, images, binary) is bad input: exit 2.
    """
    try:
        argv = _dry_run(args)
    except EmuError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(argv, indent=None if args.compact else 1))
    return EXIT_OK


def _dry_run(args: argparse.Namespace) -> list[str]:
    node_file = Path(args.node_file)
    description = read_data(node_file)
    if not isinstance(description, dict):
        raise ConfigError(str(node_file), ["$: must be a table of node properties"])
    image_dirs = [*args.image_dir] or [node_file.parent]
    settings = load_settings(args.settings, image_dirs)
    if args.allow_unsafe:
        settings = HostSettings(**{**_fields(settings), "allow_unsafe_options": True})
    project = Project.for_directory(Path(args.project_dir or node_file.parent))
    session = Session(project, settings=settings)
    kind = description.get("emulator", "qemu")
    node = session.add_node(description, emulator=kind, where=str(node_file))
    return asyncio.run(node.dry_run())


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the loaded and blocked plugins."""
    manager = make_plugin_manager(blocked=args.block)
    rows = describe_plugins(manager)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    for row in rows:
        if row["blocked"]:
            print(f"{row['name']:<18} blocked")
        else:
            where = row["distribution"] or "registered by the host"
            print(f"{row['name']:<18} {row['module']:<24} {where}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``emu`` argument parser."""
    parser = argparse.ArgumentParser(prog="emu", description="Run network-lab emulators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    argv = sub.add_parser("argv", help="print the command line of a node description (dry run)")
    argv.add_argument("node_file", help="node description, JSON or TOML (GNS3 property names)")
    argv.add_argument("--project-dir", help="project directory (default: the file's directory)")
    argv.add_argument(
        "--image-dir", action="append", type=Path, default=[], help="image directory (repeatable)"
    )
    argv.add_argument("--settings", type=Path, help="host settings file (TOML or JSON)")
    argv.add_argument("--allow-unsafe", action="store_true", help="accept unsafe user options")
    argv.add_argument("--compact", action="store_true", help="print the array on one line")
    argv.set_defaults(func=cmd_argv)

    plugins = sub.add_parser("plugins", help="list loaded and blocked plugins")
    plugins.add_argument("--block", action="append", default=[], help="block a plugin by name")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emu`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="emu: %(message)s"
    )
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EmuError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
