"""Warm labs for test suites: a lab booted once per test session, saved as a snapshot, and
started from it for each test (the ``saved_lab`` and ``warm_lab`` fixtures).

A suite of fifty lab tests then pays one boot: each test gets the lab back at the moment it
was saved, in about the time a QEMU takes to start, with every disk as it was then (what an
earlier test wrote is gone). The lab file is copied into the session's temporary directory,
so its nodes' files and its captures land there, not beside the original.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import tomllib
from pathlib import Path

import attrs

from emucore.errors import EmuError
from emucore.lab import load_lab
from emucore.models import HostSettings
from emucore.runner import LabRunner

STATE = "pytest-warm"


@attrs.frozen
class SavedLab:
    """A lab booted and saved once (see :class:`SavedLabs`).

    :ivar lab_file: the copy of the lab file the runs use.
    :ivar project_dir: where its nodes' files (and their saved states) are.
    :ivar state: the snapshot's name.
    :ivar settings: the host settings its runs use.
    """

    lab_file: Path
    project_dir: Path
    state: str
    settings: HostSettings

    def runner(self) -> LabRunner:
        """A runner that starts the lab from the snapshot (not started yet)."""
        lab = load_lab(tomllib.loads(self.lab_file.read_text()), str(self.lab_file))
        return LabRunner(
            lab,
            self.lab_file,
            settings=self.settings,
            project_dir=self.project_dir,
            from_state=self.state,
        )


class SavedLabs:
    """The labs of a test session, each booted and saved once, by lab file and ``check``.

    :ivar directory: where the copies of the lab files and their nodes' files go.
    :ivar settings: the host settings of every run.
    """

    def __init__(self, directory: Path, settings: HostSettings) -> None:
        self.directory = directory
        self.settings = settings
        self._saved: dict[tuple[Path, bool], SavedLab] = {}

    def get(self, lab_file: Path, check: bool = False) -> SavedLab:
        """The lab saved once: booted, its checks run with ``check`` (each must pass), its
        nodes' shells answering, then saved.

        :raises EmuError: the lab did not start, or a check failed (with its output).
        """
        key = (lab_file.resolve(), check)
        if key not in self._saved:
            # Its own directory, also after a lab that failed to boot or save.
            target = Path(tempfile.mkdtemp(prefix="lab", dir=self.directory))
            copy = target / lab_file.name
            shutil.copyfile(lab_file, copy)
            saved = SavedLab(copy, target / ".emu", STATE, self.settings)
            with asyncio.Runner() as runner:
                runner.run(_boot_and_save(saved, check))
            self._saved[key] = saved
        return self._saved[key]

    def remove(self) -> None:
        """Delete the saved labs' files (their snapshots with them)."""
        for saved in self._saved.values():
            shutil.rmtree(saved.project_dir, ignore_errors=True)
        self._saved.clear()


async def _boot_and_save(saved: SavedLab, check: bool) -> None:
    lab = load_lab(tomllib.loads(saved.lab_file.read_text()), str(saved.lab_file))
    runner = LabRunner(lab, saved.lab_file, settings=saved.settings, project_dir=saved.project_dir)
    try:
        await runner.start()
        if check:
            outcomes = await runner.check(lab.checks) + runner.check_captures()
            failed = [outcome for outcome in outcomes if not outcome.passed]
            if failed:
                first = failed[0]
                raise EmuError(
                    f"{saved.lab_file.name}: check on {first.node} failed before the lab was"
                    f" saved: {first.command!r} did not show /{first.expect}/:\n{first.output}"
                )
        await runner.shells_ready()
        await runner.save(saved.state)
    finally:
        await runner.stop()
