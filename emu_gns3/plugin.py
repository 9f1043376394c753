"""The ``gns3`` plugin: ``emu serve`` (a GNS3 compute), and ``emu run --controller`` (a lab
run on a GNS3 controller's computes).

Nothing heavy is imported here (``emu`` builds its parser for every command); the server's
modules, the controller client and aiohttp are imported when they are used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from emucore import hookimpl
from emucore.errors import ConfigError

if TYPE_CHECKING:
    from emucore.lab import LabSpec
    from emucore.models import HostSettings
    from emucore.runner import LabRunner

CONTROLLER_PASSWORD_ENV = "EMU_GNS3_CONTROLLER_PASSWORD"


@hookimpl(trylast=True)
def emu_add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``emu serve``, and the ``--controller`` options of ``emu run``."""
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

    run = subparsers.choices.get("run")
    if run is None:
        return
    group = run.add_argument_group("on a GNS3 controller (the gns3 plugin)")
    group.add_argument(
        "--controller",
        metavar="URL",
        help="run the lab on this GNS3 controller's computes instead of on this host",
    )
    group.add_argument(
        "--controller-user", default="admin", help="the controller user to log in as (admin)"
    )
    group.add_argument(
        "--controller-password-file",
        type=Path,
        help=f"file whose first line is that user's password (or ${CONTROLLER_PASSWORD_ENV})",
    )


def _serve(args: argparse.Namespace) -> int:
    from emu_gns3.serve import main

    return main(args)


@hookimpl(trylast=True)
def emu_lab_runner(
    lab: LabSpec, lab_file: Path, settings: HostSettings, options: argparse.Namespace
) -> LabRunner | None:
    """``emu run --controller URL``: a runner that runs the lab on the controller's computes."""
    url = getattr(options, "controller", None)
    if not url:
        return None
    from emu_gns3.controller import ControllerAccess, base_url
    from emu_gns3.labrun import ControllerLabRunner

    access = ControllerAccess(base_url(url), options.controller_user, _password(options))
    return ControllerLabRunner(
        lab,
        lab_file,
        access=access,
        settings=settings,
        project_dir=options.project_dir,
        jobs=options.jobs,
    )


def _password(options: argparse.Namespace) -> str:
    """The controller password: ``--controller-password-file``, else the environment.

    :raises ConfigError: neither gives one.
    """
    path: Path | None = options.controller_password_file
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
        if lines and lines[0]:
            return lines[0]
        raise ConfigError(str(path), ["the first line must be the controller password"])
    password = os.environ.get(CONTROLLER_PASSWORD_ENV, "")
    if not password:
        raise ConfigError(
            "--controller",
            [
                f"give the password of {options.controller_user!r} with"
                f" --controller-password-file or ${CONTROLLER_PASSWORD_ENV}"
            ],
        )
    return password
