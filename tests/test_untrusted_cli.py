"""``emu`` run on hostile labs and a hostile host: every attack or fault fails safely.

Each test runs the ``emu`` command as a user would (a subprocess, real VPCS or QEMU) on a lab
that tries something — a capture over the lab file, links planted in its ``.emu`` tree, a
kernel parameter smuggled in an interface name — or on a host that fails it (read-only or
full file system, a closed pipe, a signal). It checks the exit code, that the error is one
line naming the file or field (never a traceback), that victims keep their bytes and that no
emulator is left running. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emucore.models import NodeEvent, NodeStatus
from emucore.progress import Progress
from tests.helpers import emulators_mentioning, wait_for_line

EMU = [sys.executable, "-m", "emucore.cli"]
ENV = {**os.environ, "EMU_QEMU_KVM": "off"}
SECRET = b"victim: emu must never write here\n"

VPCS_LAB = """
name = "hostile"

[nodes.pc1]
emulator = "vpcs"
ip = "10.0.0.1/24"

[nodes.pc2]
emulator = "vpcs"
ip = "10.0.0.2/24"

[[links]]
endpoints = ["pc1:0", "pc2:0"]
"""


def emu(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMU, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=cwd
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The run's error: exactly one line on stderr starting with ``emu: error:``."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("emu: error:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]


def victim(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def write_lab(directory: Path, text: str, name: str = "lab.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def vpcs_lab(tmp_path: Path) -> Path:
    return write_lab(tmp_path / "lab", VPCS_LAB)


def no_emulator_left(directory: Path) -> None:
    assert emulators_mentioning(str(directory)) == {}


# -- 4. a capture's file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("lab.toml", "must name a .pcap file"),
        ("../outside.pcap", "must be a path inside the lab's directory"),
        ("/tmp/anywhere.pcap", "must be a path inside the lab's directory"),
    ],
)
def test_a_capture_file_must_be_a_pcap_inside_the_lab(
    vpcs_lab: Path, file: str, problem: str
) -> None:
    vpcs_lab.write_text(VPCS_LAB + f'\n[[captures]]\nendpoint = "pc1:0"\nfile = "{file}"\n')
    written = vpcs_lab.read_bytes()
    done = emu("run", str(vpcs_lab), "--check")
    assert done.returncode == 2
    line = one_error_line(done)
    assert f"{vpcs_lab}: $.captures[0].file: {problem}" in line
    assert vpcs_lab.read_bytes() == written  # the lab as written above, untouched by emu
    assert not (vpcs_lab.parent / ".emu" / "hostile" / "project-files").exists()


@pytest.mark.parametrize("planted", ["a text file", "a link to a victim", "a hard link"])
def test_a_capture_never_replaces_what_is_not_a_capture(vpcs_lab: Path, planted: str) -> None:
    other = victim(vpcs_lab.parent.parent / "elsewhere" / "victim.pcap")
    target = vpcs_lab.parent / "captures" / "pc1.pcap"
    target.parent.mkdir()
    if planted == "a text file":
        target.write_text("my notes, not a capture\n")
    elif planted == "a link to a victim":
        target.symlink_to(other)
    else:
        target.hardlink_to(other)
    before = target.read_bytes() if planted == "a text file" else SECRET
    vpcs_lab.write_text(
        VPCS_LAB + '\n[[captures]]\nendpoint = "pc1:0"\nfile = "captures/pc1.pcap"\n'
    )
    done = emu("run", str(vpcs_lab), "--check")
    assert done.returncode == 2
    assert "$.captures[0].file:" in one_error_line(done)
    assert target.read_bytes() == before
    assert other.read_bytes() == SECRET
    no_emulator_left(vpcs_lab.parent)


# -- 5. links planted in the lab's .emu tree --------------------------------------------------


def test_links_planted_in_the_project_tree_are_never_followed(vpcs_lab: Path) -> None:
    project = vpcs_lab.parent / ".emu" / "hostile"
    elsewhere = vpcs_lab.parent.parent / "elsewhere"
    planted = {"emu.lock": victim(elsewhere / "lock"), "state.json": victim(elsewhere / "state")}
    project.mkdir(parents=True)
    for name, target in planted.items():
        (project / name).symlink_to(target)
    # The VPCS nodes' own files too: node ids derive from the project directory and name.
    done = emu("run", str(vpcs_lab), "--check", "--json")
    assert done.returncode == 0, done.stderr
    directories = [Path(n["directory"]) for n in json.loads(done.stdout)["nodes"]]
    for directory in directories:
        for name in ("startup.vpc", "vpcs.log", "vpcs.pid"):
            (directory / name).unlink(missing_ok=True)
            (directory / name).symlink_to(victim(elsewhere / f"{directory.name}-{name}"))
    done = emu("run", str(vpcs_lab), "--check")
    assert done.returncode == 0, done.stderr
    for target in [*planted.values(), *elsewhere.glob("*-*")]:
        assert target.read_bytes() == SECRET, target
    no_emulator_left(vpcs_lab.parent)


def test_a_planted_project_directory_link_is_refused(vpcs_lab: Path) -> None:
    elsewhere = vpcs_lab.parent.parent / "elsewhere"
    elsewhere.mkdir()
    (vpcs_lab.parent / ".emu").symlink_to(elsewhere)
    done = emu("run", str(vpcs_lab), "--check")
    assert done.returncode == 1
    assert f"{vpcs_lab.parent / '.emu'} is a symbolic link to {elsewhere}" in one_error_line(done)
    assert list(elsewhere.iterdir()) == []


# -- 6. every interruption is a failure --------------------------------------------------------

SLOW_CHECK = '\n[[checks]]\nnode = "pc1"\ncommand = "sleep 30"\nexpect = "never printed"\n'


@pytest.mark.parametrize(
    ("signal_number", "code", "json_output"),
    [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
    ids=["sigterm", "sigint-json"],
)
def test_a_signal_during_the_checks_is_a_failure(
    vpcs_lab: Path, signal_number: int, code: int, json_output: bool
) -> None:
    vpcs_lab.write_text(VPCS_LAB + SLOW_CHECK)
    argv = [*EMU, "run", str(vpcs_lab), "--check", *(["--json"] if json_output else [])]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            # The progress view says which check runs (it used to show nothing for seconds).
            wait_for_line(run.stderr, "check 1/1: pc1: sleep 30", timeout=120)
            run.send_signal(signal_number)
            run.wait(60)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.stderr is not None
        assert run.stdout is not None
        name = signal.Signals(signal_number).name
        said = run.stderr.read()
        assert run.returncode == code, said
        assert f"emu: {name} while running the checks (0 of 1 done)" in said
        if json_output:
            interrupted = json.loads(run.stdout.read())["interrupted"]
            assert interrupted == {
                "signal": name,
                "while": "running the checks (0 of 1 done)",
                "exit_code": code,
            }
    no_emulator_left(vpcs_lab.parent)


def test_exec_interrupted_is_a_failure(vpcs_lab: Path) -> None:
    argv = [*EMU, "run", str(vpcs_lab), "--exec", "pc1", "sleep 30", "--expect", "never"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            wait_for_line(run.stderr, "check 1/1: pc1: sleep 30", timeout=120)
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) == 143
        finally:
            if run.poll() is None:
                run.kill()
    no_emulator_left(vpcs_lab.parent)


def test_check_without_checks_starts_reports_and_stops(vpcs_lab: Path) -> None:
    done = emu("run", str(vpcs_lab), "--check", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["checks"] == []
    assert {node["status"] for node in state["nodes"]} == {"started"}
    no_emulator_left(vpcs_lab.parent)


# -- 7. the host fails us: one line, no traceback -----------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root can mount; removed at the end)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_read_only_lab_directory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m") as mounted:
        lab = write_lab(mounted, VPCS_LAB)
        subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
        done = emu("run", str(lab), "--check")
    assert done.returncode == 1
    assert one_error_line(done) == f"emu: error: {mounted / '.emu'}: Read-only file system"


def test_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", "64k") as mounted:
        lab = write_lab(mounted, VPCS_LAB)
        with (mounted / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        done = emu("run", str(lab), "--check")
        lock = mounted / ".emu" / "hostile" / "emu.lock"
        assert done.returncode == 1
        assert one_error_line(done) == f"emu: error: {lock}: No space left on device"
        no_emulator_left(mounted)


def test_state_that_cannot_be_written_names_its_file(tmp_path: Path) -> None:
    from emucore.lab import load_lab
    from emucore.runner import LabRunner

    with tmpfs(tmp_path / "full", "64k") as mounted:
        lab_file = write_lab(mounted, VPCS_LAB)
        runner = LabRunner(load_lab({"name": "hostile"}, str(lab_file)), lab_file)
        runner.make_project_dir()
        with (mounted / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        with pytest.raises(OSError, match="No space left") as caught:
            runner.write_state()
    assert caught.value.filename == str(runner.project_dir / "state.json")


def test_a_binary_lab_file(tmp_path: Path) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_bytes(b'name = "x"\n\xff\xfe\x00garbage')
    done = emu("run", str(lab))
    assert done.returncode == 2
    assert one_error_line(done) == f"emu: error: {lab}: not UTF-8 text (byte 0xff at 11)"


def test_a_closed_pipe() -> None:
    with subprocess.Popen(
        [*EMU, "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    ) as listing:
        assert listing.stdout is not None
        assert listing.stderr is not None
        listing.stdout.close()  # as `| head -0` would: the reader is gone before emu writes
        assert listing.wait(60) == 1
        said = listing.stderr.read()
    assert said == "emu: error: standard output: the reader went away (broken pipe)\n"


# -- 8. emu console after a SIGKILLed run -------------------------------------------------------


def test_console_of_a_killed_run_does_not_connect_to_a_stranger(vpcs_lab: Path) -> None:
    argv = [*EMU, "run", str(vpcs_lab)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            wait_for_line(run.stderr, "Running. Ctrl-C stops the lab.", timeout=120)
        finally:
            run.kill()
        run.wait(30)
    state_file = vpcs_lab.parent / ".emu" / "hostile" / "state.json"
    state = json.loads(state_file.read_text())
    port = next(n["console"]["port"] for n in state["nodes"] if n["name"] == "pc1")
    with socket.socket() as stranger:  # whatever listens on the old port now
        stranger.bind(("127.0.0.1", port))
        stranger.listen(1)
        stranger.setblocking(False)
        done = emu("console", str(vpcs_lab), "pc1")
        with pytest.raises(BlockingIOError):
            stranger.accept()
    assert done.returncode == 1
    assert one_error_line(done) == (
        f"emu: error: lab 'hostile' is not running (the state a dead run left, pid {run.pid},"
        " was removed)"
    )
    assert not state_file.exists()
    no_emulator_left(vpcs_lab.parent)


# -- 9 and 11: names, interface names, ports ----------------------------------------------------


def test_an_interface_name_cannot_smuggle_a_kernel_parameter(tmp_path: Path) -> None:
    lab = write_lab(
        tmp_path,
        'name = "k"\n[nodes.a]\nemulator = "qemu"\nimage = "tiny"\n'
        'ips = { "eth1 init=/bin/sh" = "10.0.1.1/24" }\n',
    )
    done = emu("run", str(lab), "--check")
    assert done.returncode == 2
    assert "$.nodes.a.ips: 'eth1 init=/bin/sh' is not an interface name" in one_error_line(done)


def test_a_node_name_that_cannot_be_linked_is_refused(tmp_path: Path) -> None:
    lab = write_lab(tmp_path, 'name = "n"\n[nodes."r1:0"]\nemulator = "vpcs"\n')
    done = emu("run", str(lab), "--check")
    assert done.returncode == 2
    assert "$.nodes.'r1:0': a node name must be" in one_error_line(done)


def test_two_nodes_cannot_ask_for_the_same_console_port(tmp_path: Path) -> None:
    lab = write_lab(
        tmp_path,
        'name = "p"\n[nodes.a]\nemulator = "vpcs"\nconsole = 5123\n'
        '[nodes.b]\nemulator = "qemu"\nconsole = 5123\n',
    )
    done = emu("run", str(lab), "--check")
    assert done.returncode == 2
    assert "$.nodes.b.console: port 5123 is already taken by node 'a'" in one_error_line(done)


def test_a_host_wide_warning_is_shown_once() -> None:
    """Every QEMU node falls back to TCG for the same reason: the progress view says it once."""
    import io

    stream = io.StringIO()
    progress = Progress(stream, ["a", "b"], live=False)
    for node in ("a", "b"):
        message = "KVM is not usable: ...; using TCG (much slower)"
        progress.on_event(NodeEvent(node, "warning", message, NodeStatus.STARTING, "", True))
    assert stream.getvalue().count("KVM is not usable") == 1
    assert "host: warning: KVM is not usable" in stream.getvalue()


def test_qemu_qmp_retries_are_not_errors_for_the_user(tmp_path: Path) -> None:
    """QEMU creates its QMP socket a moment before it listens: the refused attempts in
    between are normal, and qemu.qmp's own error lines about them reach emu's logger at
    debug level only, never the handlers a user sees (the root logger's)."""
    import asyncio

    from emu_qemu.qmp import Monitor, QmpError

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    shown, debug = Kept(), Kept()
    root, emu_qmp = logging.getLogger(), logging.getLogger("emu.qemu.qmp")
    path = tmp_path / "qmp.sock"
    refusing = socket.socket(socket.AF_UNIX)
    refusing.bind(str(path))  # exists, refuses connections: not listening
    attempts = iter(range(5))

    async def connect() -> None:
        await Monitor.connect(
            path, timeout=5, command_timeout=1, alive=lambda: next(attempts, None) is not None
        )

    root.addHandler(shown)
    emu_qmp.addHandler(debug)
    level = emu_qmp.level
    emu_qmp.setLevel(logging.DEBUG)
    try:
        with pytest.raises(QmpError):
            asyncio.run(connect())
    finally:
        root.removeHandler(shown)
        emu_qmp.removeHandler(debug)
        emu_qmp.setLevel(level)
        refusing.close()
    assert [r for r in shown.records if r.name.startswith("qemu.qmp")] == []
    assert all(r.levelno == logging.DEBUG for r in debug.records)
    assert any("Failed to establish" in r.getMessage() for r in debug.records)
