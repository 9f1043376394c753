"""``emu serve``: run the compute API until SIGTERM or Ctrl-C, then stop every node.

The nodes' processes are spawned by the core (:func:`emucore.process.spawn`) with a death
signal, so even a ``SIGKILL``ed ``emu serve`` leaves no emulator behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from emu_gns3.settings import ServeSettings
from emucore.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, load_settings, read_data
from emucore.convert import structure
from emucore.errors import ConfigError, EmuError
from emucore.models import HostSettings

PASSWORD_ENV = "EMU_GNS3_PASSWORD"
log = logging.getLogger("emu.gns3")


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The settings from ``--config``, the options and ``EMU_GNS3_PASSWORD`` (in rising order
    of precedence: file, environment, options).

    :raises ConfigError: a bad or missing field, naming it.
    """
    data: dict[str, Any] = dict(read_data(args.config)) if args.config else {}
    if os.environ.get(PASSWORD_ENV):
        data["password"] = os.environ[PASSWORD_ENV]
    if args.password_file:
        try:
            lines = args.password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(str(args.password_file), [f"cannot read: {exc.strerror}"]) from None
        data["password"] = lines[0] if lines else ""
    options = {
        "host": args.host,
        "port": args.port,
        "user": args.user,
        "password": args.password,
        "version": args.gns3_version,
        "projects_dir": str(args.projects_dir) if args.projects_dir else None,
    }
    data.update({key: value for key, value in options.items() if value is not None})
    return structure(data, ServeSettings, str(args.config) if args.config else "emu serve")


def main(args: argparse.Namespace) -> int:
    """Run ``emu serve`` (exit codes as for every ``emu`` command)."""
    try:
        import aiohttp  # noqa: F401 - only to say clearly when it is missing
    except ImportError:
        print("emu: error: emu serve needs aiohttp: pip install 'emu[gns3]'", file=sys.stderr)
        return EXIT_FAILED
    settings = serve_settings(args)
    host_settings = load_settings(args.settings, args.image_dir)
    try:
        asyncio.run(serve(settings, host_settings))
    except OSError as exc:
        print(
            f"emu: error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return EXIT_FAILED
    except EmuError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    return EXIT_OK


async def serve(settings: ServeSettings, host_settings: HostSettings) -> None:
    """Serve until SIGTERM or SIGINT; then close every project (stopping every node)."""
    from aiohttp import web

    from emu_gns3.app import make_app
    from emu_gns3.compute import Compute
    from emucore.plugins import make_plugin_manager

    plugins = make_plugin_manager(blocked=host_settings.blocked_plugins)
    settings.projects_dir.mkdir(parents=True, exist_ok=True)
    compute = Compute(host_settings, plugins, Path(settings.projects_dir).absolute())
    runner = web.AppRunner(
        make_app(compute, settings), access_log=None, handle_signals=False, shutdown_timeout=5
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        types = ", ".join(compute.node_types()) or "none"
        print(
            f"emu serve: GNS3 compute {settings.version} on http://{settings.host}:{settings.port}"
            f" (nodes: {types})",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        print("emu serve: stopping every node", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            await compute.close()
        # Closes the WebSockets (on_shutdown) before it waits for the handlers to end.
        await runner.cleanup()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
