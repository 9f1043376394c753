"""``emu``: the reference host. The work is done elsewhere (runner, session); this module
parses arguments and prints.

Exit codes: 0 success (for ``emu run --check`` or ``--exec``: every check passed), 1 a node,
a check or a host check failed, the lab is already running, or the host failed us (a
read-only or full disk, a closed pipe), 2 bad input (file, field, option), 130 and 143
``emu run`` ended by SIGINT (Ctrl-C) or SIGTERM, whatever it was doing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from emucore.console import attach
from emucore.convert import structure
from emucore.errors import ConfigError, EmuError
from emucore.files import read_text
from emucore.hooks import call_each
from emucore.lab import CheckSpec, load_lab
from emucore.models import HostSettings, Project
from emucore.plugins import describe_plugins, make_plugin_manager
from emucore.progress import Progress
from emucore.records import CheckResult
from emucore.runner import STATE_NAME, LabLock, LabRunner, project_dir_for
from emucore.session import Session
from emucore.snapshots import checked_name
from emucore.tasks import finish

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SIGNAL_EXIT = 128  # a run ended by signal N exits 128 + N, as a shell reports it


def read_data(path: Path) -> Any:
    """Read a JSON or TOML file (by extension; anything else is tried as JSON, then TOML).

    :raises ConfigError: unreadable or not parseable, naming the file.
    """
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path), [f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at {exc.start})"]
        ) from None
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
        message = str(exc)
        if not message.startswith(str(args.node_file)):  # plugins name the node, not the file
            message = f"{args.node_file}: {message}"
        print(f"emu: error: {message}", file=sys.stderr)
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


def cmd_run(args: argparse.Namespace) -> int:
    """Run a lab (see :mod:`emucore.runner`); exit codes in the module docstring."""
    lab_file = Path(args.lab_file)
    lab = load_lab(read_data(lab_file), str(lab_file))
    checks = [*lab.checks] if args.check else []
    if len(args.exec) != len(args.expect):
        raise ConfigError("emu run", ["each --exec NODE COMMAND needs one --expect REGEX"])
    for (node, command), expect in zip(args.exec, args.expect, strict=True):
        checks.append(
            structure({"node": node, "command": command, "expect": expect}, CheckSpec, "--exec")
        )
    for check in checks:
        if check.node not in lab.nodes:
            raise ConfigError("--exec", [f"no node named {check.node!r} in {lab_file}"])
    if args.save is not None:
        checked_name(args.save, "--save")
        if args.clean:
            raise ConfigError(
                "--clean", ["deletes the nodes' files, and the state --save keeps there with them"]
            )
    if args.from_state is not None:
        checked_name(args.from_state, "--from")
    settings = load_settings(args.settings)
    if not args.verbose:  # the progress display shows the events; the log would repeat them
        logging.getLogger("emu").setLevel(logging.CRITICAL)
    plugins = make_plugin_manager(blocked=settings.blocked_plugins)
    # A plugin may run the lab elsewhere (emu_lab_runner), driven here as a local run is.
    taken = plugins.hook.emu_lab_runner(lab=lab, lab_file=lab_file, settings=settings, options=args)
    if taken is not None and (args.save is not None or args.from_state is not None):
        option = "--save" if args.save is not None else "--from"
        raise ConfigError(
            option,
            [
                "lab snapshots are kept by the nodes on this host: they work for local runs"
                " only, not for a lab run elsewhere (leave out the options that send it there)"
            ],
        )
    runner: LabRunner = taken or LabRunner(
        lab,
        lab_file,
        settings=settings,
        project_dir=args.project_dir,
        jobs=args.jobs,
        from_state=args.from_state,
        plugins=plugins,  # one manager: the plugins are loaded once
    )
    return asyncio.run(_run_lab(runner, checks, args))


async def _run_lab(runner: LabRunner, checks: list[CheckSpec], args: argparse.Namespace) -> int:
    runner.make_project_dir()
    lock = LabLock(runner.project_dir)
    lock.acquire()
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    signalled: list[int] = []
    checking = bool(args.check or checks)
    doing = ["starting the lab"]
    stopping = [False]

    def on_signal(number: int) -> None:
        if not signalled:  # the first signal stops the lab; later ones wait for that
            signalled.append(number)
            cancel_until_stopping()

    def cancel_until_stopping() -> None:
        # Python 3.11's wait_for loses a cancellation that arrives as what it waits for
        # completes (in a library, at any await): cancel again until the run is stopping.
        # A node cancelled during its start's cleanup waits for it however often it is
        # cancelled (emucore.tasks.finish), so the repeats cannot cut a cleanup short.
        if not stopping[0] and not main.done():
            main.cancel()
            loop.call_later(0.2, cancel_until_stopping)

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)
    code = EXIT_OK
    try:
        session = runner.build()
        progress = Progress(sys.stderr, list(session.nodes))
        session.events.subscribe(progress.on_event)
        try:
            await runner.start()
        finally:
            progress.finish()
        runner.write_state()
        state = runner.state()
        if checking:
            doing[0] = f"running the checks (none of {len(checks)} done)"

            def on_check(index: int, spec: CheckSpec) -> None:
                doing[0] = f"running the checks ({index} of {len(checks)} done)"
                progress.note(f"check {index + 1}/{len(checks)}", f"{spec.node}: {spec.command}")

            outcomes = await runner.check(checks, on_check)
            if args.check:
                outcomes += runner.check_captures()
            state = runner.state()  # again: the captures now hold the checks' traffic
            state["checks"] = [o.as_dict() for o in outcomes]
            code = EXIT_OK if all(o.passed for o in outcomes) else EXIT_FAILED
        if args.save is not None:
            state["saved"] = await _save_lab(runner, args.save, code, checking, progress, doing)
        if args.json:
            print(json.dumps(state, indent=1), flush=True)
        else:
            print_nodes(state)
            print_checks(state.get("checks", []))
            print_saved(state.get("saved"), args.save)
        if args.save is not None and state["saved"] is None:
            code = EXIT_FAILED
        if not checking and args.save is None:
            doing[0] = "running the lab"
            if not args.json:
                print("Running. Ctrl-C stops the lab.", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # until a signal cancels us
    except asyncio.CancelledError:
        stopping[0] = True
        if not signalled:
            raise
        code = SIGNAL_EXIT + signalled[0]
        name = signal.Signals(signalled[0]).name
        print(f"emu: {name} while {doing[0]}; stopping the lab", file=sys.stderr, flush=True)
        if args.json:
            interrupted = {"signal": name, "while": doing[0], "exit_code": code}
            print(json.dumps({**runner.state(), "interrupted": interrupted}, indent=1))
    finally:
        stopping[0] = True
        with contextlib.suppress(asyncio.CancelledError):
            await finish(runner.stop(clean=args.clean))  # every node down before the unlock
        runner.remove_state()
        lock.release()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
    return code


async def _save_lab(
    runner: LabRunner, name: str, code: int, checked: bool, progress: Progress, doing: list[str]
) -> dict[str, Any] | None:
    """``--save``: once the checks passed (or the shells answer), the lab's snapshot."""
    if code != EXIT_OK:
        progress.note("lab", f"not saved as {name!r}: a check failed")
        return None
    if not checked:
        doing[0] = "waiting for the nodes' shells before saving"
        progress.note("lab", "waiting for the nodes' shells")
        await runner.shells_ready()
    doing[0] = f"saving the lab as {name!r}"
    progress.note("lab", f"saving as {name!r}")
    fresh = await runner.save(name)
    saved = sorted(set(runner.session.nodes if runner.session else ()) - set(fresh))
    return {"name": name, "nodes": saved, "started_afresh": fresh}


def print_saved(saved: dict[str, Any] | None, name: str | None) -> None:
    """What ``--save`` saved, or that it did not."""
    if name is None:
        return
    if saved is None:
        print(f"lab not saved as {name!r}: a check failed")
    else:
        print(f"saved as {name!r}: {', '.join(saved['nodes']) or 'no node'}")
        if saved["started_afresh"]:
            fresh = ", ".join(saved["started_afresh"])
            print(f"not saved (their emulator cannot; --from starts them afresh): {fresh}")
    sys.stdout.flush()


def cmd_snapshots(args: argparse.Namespace) -> int:
    """List a lab's snapshots (``emu run --save``), or delete one."""
    lab_file = Path(args.lab_file)
    lab = load_lab(read_data(lab_file), str(lab_file))
    if args.delete is not None:
        checked_name(args.delete, "--delete")
    settings = load_settings(args.settings)
    logging.getLogger("emu").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    runner = LabRunner(lab, lab_file, settings=settings, project_dir=args.project_dir)
    return asyncio.run(_snapshots(runner, args))


async def _snapshots(runner: LabRunner, args: argparse.Namespace) -> int:
    lock: LabLock | None = None
    try:
        runner.build()
        if args.delete is not None:
            runner.make_project_dir()
            lock = LabLock(runner.project_dir)
            lock.acquire()  # a running lab holds its states open
            freed = await runner.delete_snapshot(args.delete)
            if args.json:
                print(json.dumps({"deleted": args.delete, "freed": freed}, indent=1))
            else:
                print(f"deleted {args.delete!r}: {_size(freed)} freed")
            return EXIT_OK
        found, stateless = await runner.snapshots()
    finally:
        await runner.stop()
        if lock is not None:
            lock.release()
    rows: list[dict[str, Any]] = [
        {
            "name": snapshot.name,
            "size": snapshot.size,
            "saved": _when(snapshot.saved),
            "nodes": sorted(snapshot.states),
            "missing": list(snapshot.missing),
        }
        for snapshot in found
    ]
    if args.json:
        print(json.dumps({"snapshots": rows, "not_saving": stateless}, indent=1))
        return EXIT_OK
    table = [("SNAPSHOT", "SIZE", "SAVED", "NODES")]
    for row in rows:
        nodes = ", ".join(row["nodes"])
        if row["missing"]:
            nodes += f" (missing: {', '.join(row['missing'])})"
        table.append((row["name"], _size(row["size"]), row["saved"], nodes))
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if stateless:
        print(
            f"not saved (their emulator cannot; --from starts them afresh): {', '.join(stateless)}"
        )
    return EXIT_OK


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def print_nodes(state: dict[str, Any]) -> None:
    """The table of nodes: name, emulator, status, console."""
    rows = [("NODE", "EMULATOR", "STATUS", "CONSOLE")]
    for node in state["nodes"]:
        console = node["console"]
        where = f"{console['type']}://{console['host']}:{console['port']}" if console else "-"
        rows.append((node["name"], node["emulator"], node["status"], where))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for capture in state["captures"]:
        counts = ""
        if "frames" in capture:
            counts = (
                f": {capture['frames']} frames, ICMP echo {capture['icmp_requests']} requests"
                f" / {capture['icmp_replies']} replies"
            )
        print(f"capture {capture['endpoint']} -> {capture['file']}{counts}")
    sys.stdout.flush()


def print_checks(checks: list[dict[str, Any]]) -> None:
    """One line per check: passed or FAILED, with the output of failed ones."""
    for check in checks:
        verdict = "passed" if check["passed"] else "FAILED"
        print(f"check {check['node']}: {check['command']!r} expects /{check['expect']}/: {verdict}")
        if not check["passed"]:
            print("  " + check["output"].replace("\n", "\n  ")[-2000:])
    if checks:
        passed = sum(1 for c in checks if c["passed"])
        print(f"{passed}/{len(checks)} checks passed")
    sys.stdout.flush()


def cmd_console(args: argparse.Namespace) -> int:
    """Attach the terminal to a node's console in a running lab (Ctrl-] leaves)."""
    lab_file = Path(args.lab_file)
    lab = load_lab(read_data(lab_file), str(lab_file))
    project_dir = args.project_dir or project_dir_for(lab_file, lab)
    state_file = project_dir / STATE_NAME
    holder = LabLock.holder(project_dir)
    try:
        state = json.loads(read_text(state_file))
    except (OSError, ValueError):
        state = None
    if holder is None or not isinstance(state, dict) or state.get("pid") != holder:
        # A run killed by SIGKILL leaves state.json behind, but not its lock: the ports it
        # names may belong to anyone by now.
        left = ""
        if holder is None and state is not None:
            state_file.unlink(missing_ok=True)
            left = f" (the state a dead run left, pid {state.get('pid')}, was removed)"
        print(f"emu: error: lab {lab.name!r} is not running{left}", file=sys.stderr)
        return EXIT_FAILED
    nodes = {node["name"]: node for node in state["nodes"]}
    node = nodes.get(args.node)
    if node is None or not node["console"]:
        known = ", ".join(sorted(nodes))
        print(f"emu: error: no node {args.node!r} with a console (nodes: {known})", file=sys.stderr)
        return EXIT_USAGE
    console = node["console"]
    if console["type"] != "telnet":
        print(f"{console['type']}://{console['host']}:{console['port']}")
        return EXIT_OK
    return asyncio.run(attach(console["host"], console["port"]))


def cmd_check(args: argparse.Namespace) -> int:
    """Report what each plugin needs on this host (binaries, KVM, helpers)."""
    settings = load_settings(args.settings)
    manager = make_plugin_manager(blocked=settings.blocked_plugins)

    async def collect() -> list[CheckResult]:
        results = await call_each(manager, "emu_check", settings=settings)
        return [item for batch in results for item in batch]

    results = asyncio.run(collect())
    for directory in settings.image_dirs:
        results.append(
            CheckResult(
                f"image dir {directory}",
                directory.is_dir(),
                "exists" if directory.is_dir() else "missing",
            )
        )
    if args.json:
        print(json.dumps([attrs.asdict(r) for r in results], indent=1))
    else:
        for result in results:
            print(f"{'ok ' if result.ok else 'NO '} {result.subject:<24} {result.detail}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


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

    run = sub.add_parser("run", help="run a lab file until Ctrl-C (or until its checks ran)")
    run.add_argument("lab_file", help="the lab, TOML")
    run.add_argument("--jobs", type=int, default=None, help="nodes started at once (default: CPUs)")
    run.add_argument("--check", action="store_true", help="run the lab's [[checks]], then stop")
    run.add_argument(
        "--exec",
        nargs=2,
        action="append",
        default=[],
        metavar=("NODE", "COMMAND"),
        help="type COMMAND on NODE's console once started, then stop (with --expect)",
    )
    run.add_argument(
        "--expect", action="append", default=[], metavar="REGEX", help="what --exec must show"
    )
    run.add_argument("--json", action="store_true", help="print the lab's state as JSON")
    run.add_argument("--clean", action="store_true", help="delete the nodes' files at the end")
    run.add_argument("--settings", type=Path, help="host settings file (TOML or JSON)")
    run.add_argument("--project-dir", type=Path, help="where node files go (default .emu/NAME)")
    run.add_argument(
        "--save",
        metavar="NAME",
        help="once started (and checked, with --check), save every node's state as NAME; stop",
    )
    run.add_argument(
        "--from",
        dest="from_state",
        metavar="NAME",
        help="resume every node from the snapshot NAME (emu run --save) instead of booting",
    )
    run.set_defaults(func=cmd_run)

    snaps = sub.add_parser(
        "snapshots", help="list a lab's snapshots (emu run --save), or delete one"
    )
    snaps.add_argument("lab_file", help="the lab, TOML")
    snaps.add_argument(
        "--delete", metavar="NAME", help="delete the snapshot NAME, freeing its space"
    )
    snaps.add_argument("--json", action="store_true", help="machine-readable output")
    snaps.add_argument("--settings", type=Path, help="host settings file (TOML or JSON)")
    snaps.add_argument("--project-dir", type=Path, help="as given to emu run")
    snaps.set_defaults(func=cmd_snapshots)

    console = sub.add_parser("console", help="attach to a node's console in a running lab")
    console.add_argument("lab_file", help="the lab, TOML")
    console.add_argument("node", help="the node's name")
    console.add_argument("--project-dir", type=Path, help="as given to emu run")
    console.set_defaults(func=cmd_console)

    check = sub.add_parser("check", help="check QEMU, KVM, helpers and image directories")
    check.add_argument("--settings", type=Path, help="host settings file (TOML or JSON)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_check)

    # Front ends shipped as plugins (emu serve) add their own commands.
    make_plugin_manager().hook.emu_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emu`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="emu: %(message)s"
    )
    if args.verbose:  # -v: also what emu and its plugins log at debug level
        logging.getLogger("emu").setLevel(logging.DEBUG)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EmuError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (emu plugins | head): say so once; nothing more goes to stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("emu: error: standard output: the reader went away (broken pipe)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"emu: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED


def describe_os_error(error: OSError) -> str:
    """``FILE: cause`` for an error of the host (read-only file system, full disk...)."""
    cause = error.strerror or str(error)
    return f"{error.filename}: {cause}" if error.filename else cause


if __name__ == "__main__":
    sys.exit(main())
