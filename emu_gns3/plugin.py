"""The ``gns3`` plugin: adds ``emu serve`` to the ``emu`` command.

Nothing heavy is imported here (``emu`` builds its parser for every command); the server's
modules and aiohttp are imported when ``emu serve`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emucore import hookimpl


@hookimpl(trylast=True)
def emu_add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``emu serve``."""
    serve = subparsers.add_parser(
        "serve", help="serve GNS3's compute API, so a GNS3 controller runs emu's nodes"
    )
    serve.add_argument("--config", type=Path, help="compute settings file (TOML or JSON)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port to listen on (default 3080)")
    serve.add_argument("--user", help="HTTP Basic user the controller logs in with")
    serve.add_argument(
        "--password-file", type=Path, help="file whose first line is the HTTP Basic password"
    )
    serve.add_argument(
        "--password", help="the HTTP Basic password (visible to other users: prefer a file)"
    )
    serve.add_argument("--gns3-version", help="version reported to the controller (default 3.0.6)")
    serve.add_argument("--projects-dir", type=Path, help="where project files go")
    serve.add_argument("--settings", type=Path, help="host settings file (TOML or JSON)")
    serve.add_argument(
        "--image-dir",
        action="append",
        type=Path,
        default=[],
        help="image directory (repeatable); uploads go to the first one",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from emu_gns3.serve import main

    return main(args)
