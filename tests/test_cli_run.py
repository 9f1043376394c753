"""``emu`` as a user runs it: a subprocess on real QEMU, reading lab files."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import processes_mentioning, wait_for_line

EMU = [sys.executable, "-m", "emucore.cli"]
ENV = {**os.environ, "EMU_QEMU_KVM": "off"}

LAB = """
name = "trial"

[nodes.a]
emulator = "qemu"
image = "tiny"
ip = "10.0.0.1/24"

[nodes.b]
emulator = "qemu"
image = "tiny"
ip = "10.0.0.2/24"

[[links]]
endpoints = ["a:0", "b:0"]
filters = { delay = 10 }

[[captures]]
endpoint = "a:0"

[[checks]]
node = "a"
command = "ping -c 3 10.0.0.2"
expect = "3 packets received"
"""


@pytest.fixture
def lab_file(tmp_path: Path, tiny_guest: object) -> Path:
    path = tmp_path / "lab.toml"
    path.write_text(LAB)
    return path


@pytest.mark.qemu
def test_a_lab_with_checks_runs_and_stops(lab_file: Path) -> None:
    done = subprocess.run(
        [*EMU, "run", str(lab_file), "--check", "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert {n["name"]: n["status"] for n in state["nodes"]} == {"a": "started", "b": "started"}
    assert all(n["console"]["port"] > 0 for n in state["nodes"])
    assert state["checks"][0]["passed"] is True
    capture = state["captures"][0]
    assert capture["icmp_requests"] >= 3
    assert capture["icmp_replies"] >= 3
    assert Path(capture["file"]).exists()
    assert state["links"][0]["relay"] is True  # the delay needs one
    assert processes_mentioning(str(lab_file.parent / ".emu")) == {}


@pytest.mark.qemu
def test_the_demo_passes(tmp_path: Path, tiny_guest: object) -> None:
    demo = Path(__file__).parent.parent / "examples" / "demo.toml"
    lab = tmp_path / "demo.toml"  # a copy: its captures and node files go to tmp_path
    lab.write_text(demo.read_text())
    done = subprocess.run(
        [*EMU, "run", str(lab), "--check", "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads(done.stdout)
    assert {n["name"]: n["emulator"] for n in state["nodes"]} == {
        "a": "qemu",
        "b": "qemu",
        "pc": "vpcs",
    }
    assert all(check["passed"] for check in state["checks"])
    assert len(state["checks"]) == 4  # three consoles and the capture
    assert processes_mentioning(str(tmp_path)) == {}
    # A new user reads no error while QEMU opens its QMP socket (qemu.qmp's own log lines).
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == []


@pytest.mark.qemu
def test_several_checks_on_one_tiny_guest(tmp_path: Path, tiny_guest: object) -> None:
    """Each check opens the guest's console anew; the terminal state one leaves (echo off)
    must not trip the next."""
    lab = tmp_path / "checks.toml"
    checks = "".join(
        f'[[checks]]\nnode = "a"\ncommand = "echo check-{n}-$((6*7))"\nexpect = "check-{n}-42"\n'
        for n in range(3)
    )
    lab.write_text(f'name = "checks"\n[nodes.a]\nemulator = "qemu"\nimage = "tiny"\n{checks}')
    done = subprocess.run(
        [*EMU, "run", str(lab), "--check", "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [c["passed"] for c in json.loads(done.stdout)["checks"]] == [True, True, True]


@pytest.mark.qemu
def test_a_failing_check_fails_the_run(lab_file: Path) -> None:
    done = subprocess.run(
        [
            *EMU,
            "run",
            str(lab_file),
            "--exec",
            "a",
            "ping -c 1 -W 1 10.0.0.99",
            "--expect",
            "1 packets received",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "0/1 checks passed" in done.stdout


def test_a_typo_gets_one_line_naming_file_node_and_field(tmp_path: Path) -> None:
    lab = tmp_path / "typo.toml"
    lab.write_text(LAB.replace('ip = "10.0.0.2/24"', 'ip = "10.0.0.2/24"\nrma = 512'))
    done = subprocess.run(
        [*EMU, "run", str(lab)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines == [f"emu: error: {lab}: $.nodes.b.rma: unknown key (did you mean 'ram'?)"]


def test_bad_links_and_toml_are_named(tmp_path: Path) -> None:
    lab = tmp_path / "links.toml"
    lab.write_text(LAB + '\n[[links]]\nendpoints = ["a:0", "c:1"]\n')
    done = subprocess.run(
        [*EMU, "run", str(lab)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 2
    assert "$.links[1].endpoints: a:0 is already used by links[0]" in done.stderr
    assert "$.links[1].endpoints: no node named 'c' (nodes: a, b)" in done.stderr
    lab.write_text("name = [")
    done = subprocess.run(
        [*EMU, "run", str(lab)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"emu: error: {lab}: not valid TOML")


def test_bad_adapters_and_addresses_are_bad_input(tmp_path: Path) -> None:
    lab = tmp_path / "bad.toml"
    lab.write_text(
        LAB.replace('ip = "10.0.0.2/24"', 'ip = "10.0.0.2"\ngateway = "10.0.0.300"').replace(
            'endpoints = ["a:0", "b:0"]', 'endpoints = ["a:0", "b:3"]'
        )
    )
    done = subprocess.run(
        [*EMU, "run", str(lab)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"emu: error: {lab}: $.nodes.b.ip: must be address/prefix, e.g. 10.0.0.1/24; got"
        " '10.0.0.2'; $.nodes.b.gateway: must be an IP address; got '10.0.0.300'"
    )
    lab.write_text(LAB.replace('endpoints = ["a:0", "b:0"]', 'endpoints = ["a:0", "b:3"]'))
    done = subprocess.run(
        [*EMU, "run", str(lab)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 2
    assert "$.links[0].endpoints: b:3 does not exist (b has 1 adapters)" in done.stderr


@pytest.fixture
def running_lab(lab_file: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [*EMU, "run", str(lab_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@pytest.mark.qemu
def test_sigterm_during_start_leaves_nothing_behind(
    lab_file: Path, running_lab: subprocess.Popen[str]
) -> None:
    wait_for_line(running_lab.stderr, "starting", timeout=120)
    running_lab.send_signal(signal.SIGTERM)
    assert running_lab.wait(60) == 143
    assert "emu: SIGTERM while starting the lab; stopping the lab" in running_lab.stderr.read()
    assert processes_mentioning(str(lab_file.parent / ".emu")) == {}


@pytest.mark.qemu
def test_a_running_lab_is_locked_has_consoles_and_stops_on_sigterm(
    lab_file: Path, running_lab: subprocess.Popen[str]
) -> None:
    wait_for_line(running_lab.stderr, "Running. Ctrl-C stops the lab.", timeout=120)
    second = subprocess.run(
        [*EMU, "run", str(lab_file)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert second.returncode == 1
    assert f"already running (emu run, pid {running_lab.pid})" in second.stderr

    # emu console on a real terminal (a pty): type a command, see its output, leave with ^].
    pid, terminal = pty.fork()
    if pid == 0:
        os.execvpe(EMU[0], [*EMU, "console", str(lab_file), "b"], ENV)
    try:
        output = b""
        deadline = time.monotonic() + 60
        while b"hello-5" not in output and time.monotonic() < deadline:
            os.write(terminal, b"echo hello-$((2+3))\r")
            ready, _, _ = select.select([terminal], [], [], 1.0)
            if ready:
                output += os.read(terminal, 4096)
        assert b"hello-5" in output
        os.write(terminal, b"\x1d")
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(terminal)

    running_lab.send_signal(signal.SIGTERM)
    assert running_lab.wait(60) == 143  # stopped by a signal, as a shell would report it
    assert "emu: SIGTERM while running the lab; stopping the lab" in running_lab.stderr.read()
    assert processes_mentioning(str(lab_file.parent / ".emu")) == {}
    assert not (lab_file.parent / ".emu" / "trial" / "state.json").exists()


def test_listings_have_json() -> None:
    plugins = subprocess.run(
        [*EMU, "plugins", "--json"], capture_output=True, text=True, env=ENV, check=True
    )
    assert "qemu.network" in {row["name"] for row in json.loads(plugins.stdout)}
    check = subprocess.run(
        [*EMU, "check", "--json"], capture_output=True, text=True, env=ENV, timeout=120
    )
    results = {row["subject"]: row for row in json.loads(check.stdout)}
    assert results["qemu-system-x86_64"]["ok"] is True
    assert results["kvm"]["ok"] is True  # EMU_QEMU_KVM=off: not used, so not a problem
    assert results["kvm"]["detail"].startswith("not used: KVM is turned off")
    auto = subprocess.run(
        [*EMU, "check", "--json"],
        capture_output=True,
        text=True,
        env={**ENV, "EMU_QEMU_KVM": "auto"},
        timeout=120,
    )
    assert auto.returncode == 1
    kvm = {row["subject"]: row for row in json.loads(auto.stdout)}["kvm"]
    assert kvm["ok"] is False  # this host's KVM hangs guests: the probe says so
    throttling = results["cpu_throttling"]
    assert throttling["ok"] is True
    assert throttling["detail"].startswith(("cgroup v2: ", "cgroup v1: ", "cpulimit: "))
