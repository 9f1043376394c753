"""The functional KVM probe (emu_qemu/kvm.py), for real, on this host.

/dev/kvm exists here and a 16-byte real-mode program runs under it, but a Linux kernel hangs
right after the BIOS (see /work/shared/QEMU-NOTES.md). The probe must see through that: it
boots the tiny guest's kernel under KVM and calls KVM "not usable" when the kernel does not
reach its panic in time. Each test points ``EMU_CACHE_DIR`` at its own directory and empties
the in-memory cache, so an earlier verdict cannot hide the probe.

A working KVM cannot exist on this host. The tests of that path use a FAKE QEMU (a shell
script that answers like a QEMU whose guests run under KVM) and say so; they test the probe's
logic and the argv it leads to, not KVM.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from emu_qemu import kvm
from emu_qemu.properties import QemuProperties
from emu_qemu.qemubinary import QemuBinary, find_binary
from emu_tests.guest import build_tiny_guest
from emucore.errors import ConfigError, NodeError
from emucore.models import NodeEvent
from tests.conftest import QemuLab, run, values_of

TIMEOUT = 3.0
HANG_REASON = (
    f"a Linux kernel did not finish booting under KVM within {TIMEOUT:g} s"
    " (guests hang on this host's KVM)"
)


@pytest.fixture(scope="module")
def kernel() -> Path:
    """The tiny guest's kernel (built once and cached by emu_tests.guest)."""
    return build_tiny_guest().kernel


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """A clean probe cache (on disk and in memory); yields the argv of every QEMU the probe runs."""
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EMU_QEMU_KVM", raising=False)
    monkeypatch.setattr(kvm, "_memory", {})
    started: list[list[str]] = []
    real_run = kvm._run

    async def spy(argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
        started.append(list(argv))
        return await real_run(argv, timeout)

    monkeypatch.setattr(kvm, "_run", spy)
    return started


def real_binary() -> QemuBinary:
    return find_binary(QemuProperties(), None, "test")


def qemu_settings(kernel: Path, mode: str) -> dict[str, Any]:
    return {"kvm": mode, "kvm_probe_kernel": str(kernel), "kvm_probe_timeout": TIMEOUT}


def node_events(lab: QemuLab, mode: str, kernel: Path, **description: Any) -> Any:
    """A node under ``mode``, the events it published, and its dry run (or its error)."""
    # The fake QEMUs live in the lab's bin directory: the host trusts it for binaries.
    trusted = {"binary_dirs": [str(lab.root / "bin")]}
    session = lab.session(emulators={"qemu": qemu_settings(kernel, mode) | trusted})
    events: list[NodeEvent] = []
    session.events.subscribe(events.append)
    node = lab.node(session, **description)
    try:
        return node, events, run(node.dry_run())
    except NodeError as exc:
        return node, events, exc


# -- the real probe on this host ---------------------------------------------------------------


def test_probe_says_kvm_is_not_usable_here(kernel: Path, probes: list[list[str]]) -> None:
    binary = real_binary()
    began = time.monotonic()
    probe = run(kvm.probe_kvm(binary, kernel, TIMEOUT))
    took = time.monotonic() - began
    assert probe == kvm.KvmProbe(False, HANG_REASON)
    # Real-mode code does run under KVM here (the shallow probe would say "usable"); the
    # kernel is what hangs, and it was given the whole timeout.
    rom, booted = probes
    assert "-bios" in rom
    assert values_of(booted, "-kernel") == [str(kernel)]
    assert values_of(booted, "-accel") == ["kvm"]
    assert took >= TIMEOUT

    # Cached in memory: the second call runs nothing and returns at once.
    began = time.monotonic()
    assert run(kvm.probe_kvm(binary, kernel, TIMEOUT)) == probe
    assert time.monotonic() - began < 0.5
    assert len(probes) == 2

    # Cached on disk too: a new process (empty memory) does not probe again.
    kvm._memory.clear()
    assert run(kvm.probe_kvm(binary, kernel, TIMEOUT)) == probe
    assert len(probes) == 2
    (entry,) = json.loads((Path(os.environ["EMU_CACHE_DIR"]) / "kvm-probe.json").read_text())
    assert str(binary.path) in entry
    assert str(kernel) in entry


def test_auto_mode_falls_back_to_tcg_with_a_warning(
    qemu_lab: QemuLab, kernel: Path, probes: list[list[str]]
) -> None:
    node, events, argv = node_events(qemu_lab, "auto", kernel)
    assert values_of(argv, "-accel") == ["tcg"]
    assert "smm=off" not in " ".join(argv)
    warnings = [(e.node, e.message) for e in events if e.kind == "warning"]
    assert warnings == [("R1", f"KVM is not usable: {HANG_REASON}; using TCG (much slower)")]
    assert node.stash[kvm.ACCEL] == kvm.Accel("tcg", warnings[0][1])
    assert len(probes) == 2


def test_require_mode_fails_naming_the_node(
    qemu_lab: QemuLab, kernel: Path, probes: list[list[str]]
) -> None:
    _, _, error = node_events(qemu_lab, "require", kernel, name="edge-1")
    assert isinstance(error, NodeError)
    assert str(error) == f"node 'edge-1': kvm is required but not usable: {HANG_REASON}"


def test_off_mode_uses_tcg_and_never_probes(
    qemu_lab: QemuLab, kernel: Path, probes: list[list[str]]
) -> None:
    _, events, argv = node_events(qemu_lab, "off", kernel)
    assert values_of(argv, "-accel") == ["tcg"]
    assert [e for e in events if e.kind == "warning"] == []
    assert probes == []


def test_environment_beats_the_settings(
    qemu_lab: QemuLab,
    kernel: Path,
    probes: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMU_QEMU_KVM", "off")
    _, _, argv = node_events(qemu_lab, "require", kernel)
    assert values_of(argv, "-accel") == ["tcg"]
    assert probes == []
    monkeypatch.setenv("EMU_QEMU_KVM", "yes")
    with pytest.raises(ConfigError, match="EMU_QEMU_KVM: must be auto, require or off; got 'yes'"):
        node_events(qemu_lab, "auto", kernel, name="R2")


def exits_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends within ``timeout`` seconds (a pidfd turns readable then)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


# -- what a working KVM would lead to: a FAKE QEMU, because none can exist on this host ---------

FAKE_QEMU = """\
#!/bin/sh
# FAKE qemu-system-x86_64 for tests: KVM guests hang on this host, so a QEMU whose guests
# really run under KVM cannot exist here. This script answers as such a QEMU would.
case " $* " in
  *" -version "*) echo "QEMU emulator version 7.2.22"; exit 0 ;;
  *" -bios "*) {rom} ;;
  *" -kernel "*) {kernel} ;;
esac
exit 1
"""
# isa-debug-exit turns the probe program's "out 0xf4, 0x2a" into exit code (0x2a << 1) | 1.
ROM_RUNS = "exit 85"
KERNEL_PANICS = 'echo "Kernel panic - not syncing: VFS: Unable to mount root fs"; exit 0'


def fake_qemu(directory: Path, rom: str = ROM_RUNS, kernel: str = KERNEL_PANICS) -> QemuBinary:
    """A FAKE QEMU (see FAKE_QEMU) named qemu-system-x86_64 in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "qemu-system-x86_64"
    path.write_text(FAKE_QEMU.format(rom=rom, kernel=kernel))
    path.chmod(0o755)
    return QemuBinary(path, "x86_64", (7, 2, 22))


@pytest.mark.parametrize(
    ("rom", "kernel_step", "expected", "runs"),
    [
        (ROM_RUNS, KERNEL_PANICS, "a Linux kernel booted under KVM (vmlinuz", 2),
        (ROM_RUNS, "exit 0", "a Linux kernel under KVM exited (0) before it booted", 2),
        ("exit 1", KERNEL_PANICS, "a 16-byte test program did not run under KVM (exit 1)", 1),
    ],
    ids=["fake-kvm-works", "fake-kernel-dies", "fake-rom-fails"],
)
def test_probe_verdicts_with_a_fake_qemu(
    tmp_path: Path,
    kernel: Path,
    probes: list[list[str]],
    rom: str,
    kernel_step: str,
    expected: str,
    runs: int,
) -> None:
    fake = fake_qemu(tmp_path / "bin", rom, kernel_step)
    probe = run(kvm.probe_kvm(fake, kernel, TIMEOUT))
    assert probe.usable is expected.startswith("a Linux kernel booted")
    assert probe.reason.startswith(expected)
    assert len(probes) == runs


def test_shallow_probe_without_a_kernel(tmp_path: Path, probes: list[list[str]]) -> None:
    probe = run(kvm.probe_kvm(fake_qemu(tmp_path / "bin"), None, TIMEOUT))
    assert probe == kvm.KvmProbe(
        True, "KVM runs real-mode code (shallow probe: no kernel found to boot)"
    )
    assert len(probes) == 1


def test_usable_kvm_gives_accel_kvm_with_a_fake_qemu(
    qemu_lab: QemuLab, kernel: Path, probes: list[list[str]]
) -> None:
    fake = fake_qemu(qemu_lab.root / "bin")
    _, events, argv = node_events(qemu_lab, "require", kernel, qemu_path=str(fake.path))
    assert argv[0] == str(fake.path)
    assert argv[1:5] == ["-accel", "kvm", "-machine", "smm=off"]
    assert [e for e in events if e.kind == "warning"] == []


def test_kvm_cannot_run_another_architecture(
    qemu_lab: QemuLab, kernel: Path, probes: list[list[str]]
) -> None:
    fake = qemu_lab.root / "bin" / "qemu-system-aarch64"
    fake_qemu(qemu_lab.root / "bin").path.rename(fake)
    _, events, argv = node_events(qemu_lab, "auto", kernel, qemu_path=str(fake))
    assert values_of(argv, "-accel") == ["tcg"]
    assert [e.message for e in events if e.kind == "warning"] == [
        "KVM cannot run aarch64 guests on this x86_64 host"
    ]
    _, _, error = node_events(qemu_lab, "require", kernel, name="R2", qemu_path=str(fake))
    assert str(error) == (
        "node 'R2': kvm is required but KVM cannot run aarch64 guests on this x86_64 host"
    )
    assert probes == []


def test_a_cancelled_probe_leaves_no_process_and_a_later_loop_can_probe(
    tmp_path: Path, kernel: Path, probes: list[list[str]]
) -> None:
    """Two nodes probing at once, given up (a start cancelled), then probing again later."""
    pids = tmp_path / "pids"
    release = tmp_path / "release"
    slow_rom = f"echo $$ >> {pids}; [ -e {release} ] && exit 85; exec sleep 60"
    fake = fake_qemu(tmp_path / "bin", slow_rom)

    async def two_probes() -> list[Any]:
        # return_exceptions: once cancelled, wait until both probes have finished cleaning up.
        probing = (kvm.probe_kvm(fake, kernel, 30) for _ in "ab")
        return list(await asyncio.gather(*probing, return_exceptions=True))

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(two_probes(), 0.5))
    (pid,) = pids.read_text().split()
    assert exits_within(int(pid), 5.0), "the cancelled probe left its QEMU running"
    release.touch()
    verdicts = run(two_probes(), timeout=20)
    assert [getattr(p, "usable", p) for p in verdicts] == [True, True]
    assert len(probes) == 3  # the cancelled ROM run, then one probe for both nodes
