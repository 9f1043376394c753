"""The QEMU command line, property by property, module by module (dry runs: nothing starts).

Every node here is built through a real session (the installed plugins, the real QEMU binary
for ``-version``, real ``qemu-img`` for linked clones) and its argv taken from
``node.dry_run()``. Option strings are read back with :func:`tests.conftest.option_items`,
which splits them the way QEMU does (``,,`` is a literal comma), so a test sees what QEMU
would see. That QEMU really accepts these command lines is tested in test_qemu_accepts.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu_qemu.contract import binary as binary_of
from emu_qemu.disks import overlay_path
from emu_qemu.properties import MAX_ADAPTERS
from emu_qemu.qemubinary import BinaryError, platform_of
from emucore.claims import Claims
from emucore.errors import ConfigError, EmuError, ImageError
from emucore.models import Project
from emucore.session import Session
from tests.conftest import QemuLab, option_items, run, values_of

pytestmark = pytest.mark.usefixtures("kvm_off")

QEMU = Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64").absolute()
EMU = Path(sys.executable).parent / "emu"


def items(option: str) -> dict[str, str]:
    """An option string as a dict (the bare first item under key ``""``)."""
    pairs = option_items(option)
    assert len({key for key, _ in pairs}) == len(pairs), f"duplicate key in {option!r}"
    return dict(pairs)


def after(argv: list[str], *words: str) -> bool:
    """Whether ``words`` appear in ``argv`` as one consecutive run."""
    n = len(words)
    return any(argv[i : i + n] == list(words) for i in range(len(argv) - n + 1))


def devices(argv: list[str]) -> list[dict[str, str]]:
    return [items(value) for value in values_of(argv, "-device")]


def nics(argv: list[str]) -> list[dict[str, str]]:
    return [d for d in devices(argv) if d.get("id", "").startswith("adapter")]


def refused(
    lab: QemuLab,
    error: type[EmuError] = ConfigError,
    session: Session | None = None,
    **description: Any,
) -> str:
    """The message of the error that creating the node, or its dry run, raises."""
    with pytest.raises(error) as info:
        lab.argv(session, **description) if session else lab.argv(**description)
    return str(info.value)


def with_binary_dir(lab: QemuLab, directory: Path) -> Session:
    """A session whose host trusts ``directory`` for QEMU binaries."""
    return lab.session(lab.settings(emulators={"qemu": {"binary_dirs": [str(directory)]}}))


def fake_binary(directory: Path, name: str, script: str = "", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(script or "#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


# -- binary and platform (emu_qemu/binary.py) --------------------------------------------------


def test_default_binary_is_qemu_system_x86_64(qemu_lab: QemuLab) -> None:
    node = qemu_lab.node()
    argv = run(node.dry_run())
    assert argv[0] == str(QEMU)
    version = subprocess.run([QEMU, "-version"], capture_output=True, text=True).stdout
    binary = binary_of(node)
    assert binary.platform == "x86_64"
    assert f"version {binary.version_text}" in version


@pytest.mark.parametrize("qemu_path", [str(QEMU), "qemu-system-x86_64"], ids=["path", "name"])
def test_qemu_path(qemu_lab: QemuLab, qemu_path: str) -> None:
    assert qemu_lab.argv(qemu_path=qemu_path)[0] == str(QEMU)


def test_platform_picks_the_binary(qemu_lab: QemuLab) -> None:
    i386 = shutil.which("qemu-system-i386")
    assert i386, "Debian's qemu-system-x86 ships qemu-system-i386 too"
    assert qemu_lab.argv(platform="i386")[0] == str(Path(i386).absolute())


def test_binary_dirs_come_before_path(qemu_lab: QemuLab) -> None:
    bin_dir = qemu_lab.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(QEMU)
    settings = qemu_lab.settings(emulators={"qemu": {"binary_dirs": [str(bin_dir)]}})
    argv = qemu_lab.argv(qemu_lab.session(settings))
    assert argv[0] == str(bin_dir / "qemu-system-x86_64")


def test_missing_binary(qemu_lab: QemuLab) -> None:
    bin_dir = qemu_lab.root / "bin"
    missing = str(bin_dir / "qemu-system-x86_64")
    session = with_binary_dir(qemu_lab, bin_dir)
    message = refused(qemu_lab, BinaryError, session, qemu_path=missing)
    assert message == f"node 'R1': qemu_path: QEMU binary {missing!r} not found"


def test_binary_outside_the_binary_dirs_is_refused(qemu_lab: QemuLab) -> None:
    """A node description must not pick any executable of the host as its emulator."""
    planted = fake_binary(
        qemu_lab.root / "elsewhere", "qemu-system-x86_64", "#!/bin/sh\ntouch ran\n"
    )
    message = refused(qemu_lab, BinaryError, qemu_path=str(planted))
    assert message.startswith("node 'R1': qemu_path: QEMU binary ")
    assert "is not in the host's binary directories or on PATH" in message
    assert not (qemu_lab.root / "ran").exists()


def test_platform_without_binary(qemu_lab: QemuLab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(qemu_lab.root / "empty"))
    message = refused(qemu_lab, BinaryError, platform="arm")
    assert "node 'R1': platform: QEMU binary 'qemu-system-arm' not found" in message


@pytest.mark.parametrize("what", ["not-executable", "directory"])
def test_binary_that_is_not_an_executable_file(qemu_lab: QemuLab, what: str) -> None:
    if what == "directory":
        path = qemu_lab.root / "bin" / "qemu-system-x86_64"
        path.mkdir(parents=True)
    else:
        path = fake_binary(qemu_lab.root / "bin", "qemu-system-x86_64", mode=0o644)
    session = with_binary_dir(qemu_lab, qemu_lab.root / "bin")
    message = refused(qemu_lab, BinaryError, session, qemu_path=str(path))
    assert message == f"node 'R1': qemu_path: QEMU binary {str(path)!r} is not an executable file"


def test_binary_that_is_not_qemu(qemu_lab: QemuLab) -> None:
    silent = fake_binary(qemu_lab.root / "bin", "qemu-system-x86_64")
    session = with_binary_dir(qemu_lab, qemu_lab.root / "bin")
    message = refused(qemu_lab, BinaryError, session, qemu_path=str(silent))
    assert message.endswith("did not report a QEMU version")
    message = refused(qemu_lab, BinaryError, qemu_path="/bin/true")
    assert "cannot tell the platform of 'true' (expected qemu-system-ARCH)" in message


def test_unknown_platform(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, platform="z80")
    assert "$.platform: must be one of aarch64, alpha, arm," in message
    assert message.endswith("got 'z80'")


def test_qemu_kvm_name_means_x86_64(qemu_lab: QemuLab) -> None:
    link = qemu_lab.root / "bin" / "qemu-kvm"
    link.parent.mkdir()
    link.symlink_to(QEMU)
    node = qemu_lab.node(qemu_path=str(link), platform="x86_64")
    assert run(node.dry_run())[0] == str(link)
    assert binary_of(node).platform == "x86_64"


def test_platform_must_match_qemu_path(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, BinaryError, qemu_path=str(QEMU), platform="arm")
    assert message == (
        "node 'R1': platform: 'arm' does not match qemu_path 'qemu-system-x86_64' (x86_64)"
    )


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("qemu-system-x86_64", "x86_64"),
        ("qemu-system-aarch64", "aarch64"),
        ("qemu-system-mips64el", "mips64el"),
        ("qemu-system-x86_64.exe", "x86_64"),
        ("qemu-kvm", "x86_64"),
        ("qemu-img", None),
        ("kvm", None),
    ],
)
def test_platform_of(name: str, platform: str | None) -> None:
    assert platform_of(name) == platform


# -- machine: name, uuid, memory, CPUs (emu_qemu/machine.py, emu_qemu/kvm.py) ------------------


def test_machine_defaults(qemu_lab: QemuLab) -> None:
    node = qemu_lab.node()
    argv = run(node.dry_run())
    assert after(argv, "-accel", "tcg")
    assert "smm=off" not in argv
    assert after(argv, "-name", "guest=R1")
    assert after(argv, "-uuid", str(node.config.id))
    assert after(argv, "-m", "256M")
    assert after(argv, "-smp", "cpus=1,maxcpus=1")
    assert after(argv, "-nodefaults", "-no-user-config", "-display", "none")
    assert after(argv, "-S", "-qmp", "unix:qmp.sock,server=on,wait=off")


def test_ram(qemu_lab: QemuLab) -> None:
    assert after(qemu_lab.argv(ram=1536), "-m", "1536M")
    assert "$.ram: must be 1..4194304, got 0" in refused(qemu_lab, ram=0)
    assert "$.ram: must be an integer, got str '512'" in refused(qemu_lab, ram="512")


@pytest.mark.parametrize(
    ("cpus", "maxcpus", "smp"),
    [(2, 4, "cpus=2,maxcpus=4"), (4, None, "cpus=4,maxcpus=4"), (1, 8, "cpus=1,maxcpus=8")],
)
def test_cpus(qemu_lab: QemuLab, cpus: int, maxcpus: int | None, smp: str) -> None:
    description: dict[str, Any] = {"cpus": cpus}
    if maxcpus is not None:
        description["maxcpus"] = maxcpus
    assert values_of(qemu_lab.argv(**description), "-smp") == [smp]


def test_maxcpus_below_cpus_is_refused(qemu_lab: QemuLab) -> None:
    assert "$.maxcpus: must be at least cpus (4); got 2" in refused(qemu_lab, cpus=4, maxcpus=2)
    assert "$.cpus: must be 1..255, got 0" in refused(qemu_lab, cpus=0)


def test_user_uuid_replaces_ours(qemu_lab: QemuLab) -> None:
    mine = "12345678-1234-5678-1234-567812345678"
    argv = qemu_lab.argv(options=f"-uuid {mine}")
    assert values_of(argv, "-uuid") == [mine]


# -- network adapters, MACs and NIOs (emu_qemu/network.py) -------------------------------------


def test_no_adapters(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(adapters=0)
    assert "-netdev" not in argv
    assert nics(argv) == []


def test_one_adapter(qemu_lab: QemuLab) -> None:
    node = qemu_lab.node(mac_address="0c:12:34:56:78:00")
    argv = run(node.dry_run())
    start = argv.index("-netdev")
    assert argv[start : start + 6] == [
        "-netdev",
        "hubport,id=nic0,hubid=0",
        "-netdev",
        "hubport,id=sink0,hubid=0",
        "-device",
        "e1000,netdev=nic0,mac=0c:12:34:56:78:00,id=adapter0",
    ]


@pytest.mark.parametrize("adapters", [40, MAX_ADAPTERS])
def test_many_adapters_use_pci_bridges(qemu_lab: QemuLab, adapters: int) -> None:
    argv = qemu_lab.argv(adapters=adapters)
    found = nics(argv)
    assert [d["id"] for d in found] == [f"adapter{n}" for n in range(adapters)]
    assert len({d["mac"] for d in found}) == adapters
    bridges = [d for d in devices(argv) if d[""] == "pci-bridge"]
    assert len(bridges) == -(-(adapters - 12) // 31)
    assert [d["chassis_nr"] for d in bridges] == [str(n + 1) for n in range(len(bridges))]
    assert all("bus" not in d for d in found[:12])
    placed = {(d["bus"], d["addr"]) for d in found[12:]}
    assert len(placed) == adapters - 12
    assert found[12]["bus"] == "pci-bridge0"
    assert found[12]["addr"] == "0x1"
    assert found[-1]["bus"] == f"pci-bridge{len(bridges) - 1}"
    assert 1 <= int(found[-1]["addr"], 16) <= 31
    assert [d[""] for d in devices(argv)[: len(bridges)]] == ["pci-bridge"] * len(bridges)


@pytest.mark.parametrize("adapters", [MAX_ADAPTERS + 1, 900, -1])
def test_too_many_adapters(qemu_lab: QemuLab, adapters: int) -> None:
    message = refused(qemu_lab, adapters=adapters)
    assert message == f"node 'R1': $.adapters: must be 0..275, got {adapters}"


@pytest.mark.parametrize(
    ("adapter_type", "device"),
    [("virtio", "virtio-net-pci"), ("virtio-net-pci", "virtio-net-pci"), ("vmxnet3", "vmxnet3")],
)
def test_adapter_type(qemu_lab: QemuLab, adapter_type: str, device: str) -> None:
    found = nics(qemu_lab.argv(adapters=3, adapter_type=adapter_type))
    assert [d[""] for d in found] == [device] * 3


def test_unknown_adapter_type(qemu_lab: QemuLab) -> None:
    assert "$.adapter_type: must be one of e1000, " in refused(qemu_lab, adapter_type="ne2000")


def test_custom_adapters(qemu_lab: QemuLab) -> None:
    custom = [
        {"adapter_number": 1, "adapter_type": "rtl8139", "mac_address": "0E:00:00:00:00:AA"},
        {"adapter_number": 2, "adapter_type": "virtio"},
        {"adapter_number": 3, "mac_address": "0e:00:00:00:00:bb", "port_name": "Gi0/3"},
    ]
    argv = qemu_lab.argv(adapters=4, mac_address="0c:00:00:00:00:00", custom_adapters=custom)
    assert [(d[""], d["mac"]) for d in nics(argv)] == [
        ("e1000", "0c:00:00:00:00:00"),
        ("rtl8139", "0e:00:00:00:00:aa"),
        ("virtio-net-pci", "0c:00:00:00:00:02"),
        ("e1000", "0e:00:00:00:00:bb"),
    ]


@pytest.mark.parametrize(
    ("custom", "problem"),
    [
        (
            [{"adapter_number": 2}],
            "$.custom_adapters: adapter_number 2 does not exist (the node has 2 adapters)",
        ),
        ([{"adapter_number": 275}], "$.custom_adapters[0].adapter_number: must be 0..274, got 275"),
        ([{"adapter_number": 1}, {"adapter_number": 1}], "adapter_number 1 appears twice"),
        (
            [{"adapter_number": 0, "mac_address": "01:00:5e:00:00:01"}],
            "$.custom_adapters[0].mac_address: must be a unicast MAC address",
        ),
        ([{"adapter_number": 0, "adapter_type": "e100"}], "$.custom_adapters[0].adapter_type"),
        ([{"adapter_number": 0, "colour": "red"}], "$.custom_adapters[0].colour: unknown key"),
    ],
)
def test_bad_custom_adapters(qemu_lab: QemuLab, custom: list[Any], problem: str) -> None:
    assert problem in refused(qemu_lab, adapters=2, custom_adapters=custom)


def test_base_mac_plus_adapter_number(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(adapters=3, mac_address="0c:12:34:56:78:fe")
    assert [d["mac"] for d in nics(argv)] == [
        "0c:12:34:56:78:fe",
        "0c:12:34:56:78:ff",
        "0c:12:34:56:79:00",
    ]


def test_derived_mac_is_stable_and_locally_administered(qemu_lab: QemuLab) -> None:
    first = [d["mac"] for d in nics(qemu_lab.argv(adapters=3))]
    again = [d["mac"] for d in nics(qemu_lab.argv(qemu_lab.session(), adapters=3))]
    other = [d["mac"] for d in nics(qemu_lab.argv(name="R2", adapters=3))]
    assert first == again
    assert set(first).isdisjoint(other)
    for mac in first + other:
        first_byte = int(mac[:2], 16)
        assert first_byte & 0b10, f"{mac} is not locally administered"
        assert not first_byte & 0b01, f"{mac} is multicast"
    assert [int(m.replace(":", ""), 16) - int(first[0].replace(":", ""), 16) for m in first] == [
        0,
        1,
        2,
    ]


def test_derived_mac_depends_on_the_project(qemu_lab: QemuLab) -> None:
    first = nics(qemu_lab.argv())[0]["mac"]
    qemu_lab.project = Project.for_directory(qemu_lab.root / "other")
    assert nics(qemu_lab.argv())[0]["mac"] != first


@pytest.mark.parametrize(
    ("mac", "adapters", "problem"),
    [
        ("01:00:5e:00:00:01", 1, "must be a unicast MAC address (first byte even)"),
        ("0c:12:34:56:78", 1, "must be a MAC address like 0c:12:34:56:78:00"),
        ("0c:ff:ff:ff:ff:fe", 3, "leaves no room for 3 adapters"),
    ],
)
def test_bad_base_mac(qemu_lab: QemuLab, mac: str, adapters: int, problem: str) -> None:
    message = refused(qemu_lab, mac_address=mac, adapters=adapters)
    assert f"$.mac_address: {problem}" in message


def test_udp_and_tap_nios(qemu_lab: QemuLab) -> None:
    nios = {
        "0": {"type": "nio_udp", "lport": 20000, "rhost": "192.0.2.7", "rport": 20001},
        "2": {"type": "nio_tap", "tap_device": "tap-lab.1"},
    }
    argv = qemu_lab.argv(adapters=3, nios=nios)
    netdevs = values_of(argv, "-netdev")
    assert netdevs == [
        "hubport,id=nic0,hubid=0",
        "hubport,id=sink0,hubid=0",
        "dgram,id=link0,local.type=inet,local.host=127.0.0.1,local.port=20000,"
        "remote.type=inet,remote.host=192.0.2.7,remote.port=20001",
        "hubport,id=linkport0,hubid=0,netdev=link0",
        "hubport,id=nic1,hubid=1",
        "hubport,id=sink1,hubid=1",
        "hubport,id=nic2,hubid=2",
        "hubport,id=sink2,hubid=2",
        "tap,id=link2,ifname=tap-lab.1,script=no,downscript=no",
        "hubport,id=linkport2,hubid=2,netdev=link2",
    ]


@pytest.mark.parametrize(
    ("nio", "problem"),
    [
        ({"type": "nio_tap", "tap_device": "tap0,script=/x"}, "$.nios[0].device: must be a"),
        ({"type": "tap", "device": "a-very-long-interface"}, "$.nios[0].device: must be a"),
        (
            {"type": "nio_udp", "lport": 1, "rhost": "h,localaddr=x", "rport": 2},
            "$.nios[0].remote_host: must be a host name or IP address",
        ),
        ({"type": "nio_udp", "lport": 0, "rhost": "h", "rport": 2}, "$.nios[0].local_port"),
        ({"type": "nio_vde"}, "$.nios[0]: NIO 'type' must be one of"),
    ],
)
def test_bad_nios(qemu_lab: QemuLab, nio: dict[str, Any], problem: str) -> None:
    assert problem in refused(qemu_lab, nios={0: nio})


def test_nio_on_a_missing_adapter(qemu_lab: QemuLab) -> None:
    nio = {"type": "nio_tap", "tap_device": "tap0"}
    message = refused(qemu_lab, adapters=2, nios={"2": nio})
    assert "$.nios[2]: adapter 2 does not exist (the node has 2)" in message


# -- disks (emu_qemu/disks.py) -----------------------------------------------------------------


def drive_args(lab: QemuLab, interface: str, fmt: str = "qcow2", **extra: Any) -> list[str]:
    """The disk fragment of a node with one hda image (used directly: no linked clone)."""
    lab.image(f"disk.{fmt}", fmt=fmt)
    argv = lab.argv(
        hda_disk_image=f"disk.{fmt}", hda_disk_interface=interface, linked_clone=False, **extra
    )
    start = argv.index("-boot") + 2
    end = argv.index("-netdev")
    return argv[start:end]


@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        ("ide", ["-drive", "file={img},format=qcow2,id=drive0,if=ide,index=0,media=disk"]),
        ("none", ["-drive", "file={img},format=qcow2,id=drive0,if=ide,index=0,media=disk"]),
        ("virtio", ["-drive", "file={img},format=qcow2,id=drive0,if=virtio,index=0,media=disk"]),
        ("floppy", ["-drive", "file={img},format=qcow2,id=drive0,if=floppy"]),
        ("pflash", ["-drive", "file={img},format=qcow2,id=drive0,if=pflash"]),
        (
            "sata",
            [
                *("-device", "ahci,id=ahci0"),
                *("-drive", "file={img},format=qcow2,id=drive0,if=none"),
                *("-device", "ide-hd,drive=drive0,bus=ahci0.0,id=disk0"),
            ],
        ),
        (
            "scsi",
            [
                *("-device", "virtio-scsi-pci,id=scsi0"),
                *("-drive", "file={img},format=qcow2,id=drive0,if=none"),
                *("-device", "scsi-hd,drive=drive0,bus=scsi0.0,id=disk0"),
            ],
        ),
        (
            "nvme",
            [
                *("-drive", "file={img},format=qcow2,id=drive0,if=none"),
                *("-device", "nvme,drive=drive0,serial=emu0,id=disk0"),
            ],
        ),
        (
            "sd",
            [
                *("-device", "sdhci-pci,id=sdhci0"),
                *("-drive", "file={img},format=qcow2,id=drive0,if=none"),
                *("-device", "sd-card,drive=drive0,id=disk0"),
            ],
        ),
    ],
)
def test_disk_interfaces(qemu_lab: QemuLab, interface: str, expected: list[str]) -> None:
    image = str(qemu_lab.images / "disk.qcow2")
    assert drive_args(qemu_lab, interface) == [a.format(img=image) for a in expected]


def test_raw_image_format_is_sniffed(qemu_lab: QemuLab) -> None:
    (drive,) = [a for a in drive_args(qemu_lab, "ide", fmt="raw") if a.startswith("file=")]
    assert items(drive)["format"] == "raw"


def test_mtd_is_refused_on_x86(qemu_lab: QemuLab) -> None:
    qemu_lab.image("disk.qcow2")
    message = refused(qemu_lab, hda_disk_image="disk.qcow2", hda_disk_interface="mtd")
    assert "$.hda_disk_interface: mtd (flash) disks do not exist on x86 machines" in message


def test_unknown_disk_interface(qemu_lab: QemuLab) -> None:
    assert "$.hdb_disk_interface: must be one of" in refused(qemu_lab, hdb_disk_interface="usb")


def test_one_controller_for_several_disks(qemu_lab: QemuLab) -> None:
    for name in "abcd":
        qemu_lab.image(f"{name}.qcow2")
    argv = qemu_lab.argv(
        **{f"hd{n}_disk_image": f"{n}.qcow2" for n in "abcd"},
        **{f"hd{n}_disk_interface": "sata" for n in "abc"},
        hdd_disk_interface="nvme",
    )
    found = devices(argv)
    assert [d for d in found if d[""] == "ahci"] == [{"": "ahci", "id": "ahci0"}]
    assert [(d["drive"], d.get("bus")) for d in found if d[""] in ("ide-hd", "nvme")] == [
        ("drive0", "ahci0.0"),
        ("drive1", "ahci0.1"),
        ("drive2", "ahci0.2"),
        ("drive3", None),
    ]
    assert [d["serial"] for d in found if d[""] == "nvme"] == ["emu3"]


def test_cdrom(qemu_lab: QemuLab) -> None:
    iso = qemu_lab.image("live.iso", "1M", "raw")
    argv = qemu_lab.argv(cdrom_image="live.iso", boot_priority="d")
    cdrom = f"file={iso},format=raw,id=cdrom0,if=ide,index=2,media=cdrom,readonly=on"
    assert after(argv, "-drive", cdrom)
    assert after(argv, "-boot", "order=d")


def test_cdrom_and_hdc_are_refused_together(qemu_lab: QemuLab) -> None:
    qemu_lab.image("live.iso", "1M", "raw")
    qemu_lab.image("c.qcow2")
    message = refused(qemu_lab, cdrom_image="live.iso", hdc_disk_image="c.qcow2")
    assert "$.cdrom_image: cannot be used together with hdc_disk_image" in message


def test_linked_clone_uses_an_overlay(qemu_lab: QemuLab) -> None:
    base = qemu_lab.image("base.qcow2")
    node = qemu_lab.node(hda_disk_image="base.qcow2")
    dry = run(node.dry_run())
    overlay = overlay_path(node, "a")
    assert overlay.parent == node.directory
    assert not overlay.exists()  # a dry run creates nothing
    expected = f"file={overlay},format=qcow2,id=drive0,if=ide,index=0,media=disk"
    assert after(dry, "-drive", expected)
    assert not any(str(base) in word for word in dry)
    run(node.prepare_disks())
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["full-backing-filename"] == str(base)
    assert run(node.dry_run()) == dry


def test_without_linked_clone_the_base_is_used(qemu_lab: QemuLab) -> None:
    base = qemu_lab.image("base.qcow2")
    node = qemu_lab.node(hda_disk_image="base.qcow2", linked_clone=False)
    run(node.prepare_disks())
    argv = run(node.dry_run())
    assert after(argv, "-drive", f"file={base},format=qcow2,id=drive0,if=ide,index=0,media=disk")
    assert not overlay_path(node, "a").exists()


def test_an_image_without_linked_clone_belongs_to_one_node(qemu_lab: QemuLab) -> None:
    qemu_lab.image("base.qcow2")
    host = Claims()  # the host runs two projects: their nodes share the images
    session = qemu_lab.session(claims=host)
    qemu_lab.node(session, name="A", hda_disk_image="base.qcow2", linked_clone=False)
    with pytest.raises(ImageError, match="already used by node 'A' without linked_clone"):
        qemu_lab.node(session, name="B", hdb_disk_image="base.qcow2", linked_clone=False)
    other = Project.for_directory(qemu_lab.root / "other")
    other_project = qemu_lab.session(project=other, claims=host)
    with pytest.raises(ImageError, match="already used by node 'A'"):
        qemu_lab.node(other_project, name="C", hda_disk_image="base.qcow2", linked_clone=False)
    qemu_lab.node(session, name="D", hda_disk_image="base.qcow2")  # linked clones share it
    run(session.remove_node("A"))
    qemu_lab.node(session, name="B", hda_disk_image="base.qcow2", linked_clone=False)


# -- images: where they may come from (emu_qemu/images.py) ------------------------------------


def test_relative_names_are_looked_up_in_each_image_dir(qemu_lab: QemuLab) -> None:
    second = qemu_lab.root / "more-images"
    second.mkdir()
    (second / "sub").mkdir()
    (second / "sub" / "kernel").write_bytes(b"k")
    settings = qemu_lab.settings(image_dirs=(qemu_lab.images, second))
    argv = qemu_lab.argv(qemu_lab.session(settings), kernel_image="sub/kernel")
    assert after(argv, "-kernel", str(second / "sub" / "kernel"))


def test_image_not_found(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, ImageError, hda_disk_image="nope.qcow2")
    assert message == (
        "node 'R1': hda_disk_image: image 'nope.qcow2' not found in the image directories"
        f" ({qemu_lab.images})"
    )


def outside(lab: QemuLab) -> Path:
    secret = lab.root / "outside" / "secret.qcow2"
    secret.parent.mkdir()
    secret.write_bytes(b"secret")
    return secret


@pytest.mark.parametrize(
    "field", ["hda_disk_image", "hdd_disk_image", "cdrom_image", "bios_image", "kernel_image"]
)
def test_absolute_path_outside_the_image_dirs(qemu_lab: QemuLab, field: str) -> None:
    secret = outside(qemu_lab)
    message = refused(qemu_lab, ImageError, **{field: str(secret)})
    assert f"{field}: {str(secret)!r} is outside the image directories" in message
    session = qemu_lab.session(allow_images_outside=True)
    argv = qemu_lab.argv(session, linked_clone=False, **{field: str(secret)})
    assert any(str(secret) in word for word in argv)


def test_absolute_path_inside_an_image_dir(qemu_lab: QemuLab) -> None:
    kernel = qemu_lab.images / "vmlinuz"
    kernel.write_bytes(b"k")
    assert after(qemu_lab.argv(kernel_image=str(kernel)), "-kernel", str(kernel))


def test_dot_dot_cannot_leave_the_image_dirs(qemu_lab: QemuLab) -> None:
    outside(qemu_lab)
    message = refused(qemu_lab, ImageError, hda_disk_image="../outside/secret.qcow2")
    assert "is outside the image directories" in message


def test_symlinks_cannot_leave_the_image_dirs(qemu_lab: QemuLab) -> None:
    (qemu_lab.images / "link.qcow2").symlink_to(outside(qemu_lab))
    message = refused(qemu_lab, ImageError, hda_disk_image="link.qcow2")
    assert "'link.qcow2' is outside the image directories" in message
    base = qemu_lab.image("real.qcow2")
    (qemu_lab.images / "alias.qcow2").symlink_to(base)
    argv = qemu_lab.argv(hda_disk_image="alias.qcow2", linked_clone=False)
    assert any(f"file={qemu_lab.images / 'alias.qcow2'}," in word for word in argv)


def test_an_image_must_be_a_file(qemu_lab: QemuLab) -> None:
    (qemu_lab.images / "folder").mkdir()
    message = refused(qemu_lab, ImageError, cdrom_image="folder")
    assert message == "node 'R1': cdrom_image: 'folder' is not a file"


# -- boot (emu_qemu/boot.py) -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["c", "d", "n", "cn", "dc"])
def test_boot_priority(qemu_lab: QemuLab, order: str) -> None:
    assert values_of(qemu_lab.argv(boot_priority=order), "-boot") == [f"order={order}"]


def test_bad_boot_priority(qemu_lab: QemuLab) -> None:
    assert "$.boot_priority: must be one of c, cd, cn, d" in refused(qemu_lab, boot_priority="x")


def test_bios(qemu_lab: QemuLab) -> None:
    (qemu_lab.images / "bios.bin").write_bytes(b"\0" * 65536)
    argv = qemu_lab.argv(bios_image="bios.bin")
    assert after(argv, "-boot", "order=c", "-bios", str(qemu_lab.images / "bios.bin"))


def test_kernel_initrd_and_command_line(qemu_lab: QemuLab) -> None:
    for name in ("vmlinuz", "initrd,1.gz"):
        (qemu_lab.images / name).write_bytes(b"x")
    argv = qemu_lab.argv(
        kernel_image="vmlinuz",
        initrd="initrd,1.gz",
        kernel_command_line="console=ttyS0 a=b,c",
    )
    assert after(
        argv,
        *("-kernel", str(qemu_lab.images / "vmlinuz")),
        *("-initrd", str(qemu_lab.images / "initrd,1.gz")),  # a plain path, not an option string
        *("-append", "console=ttyS0 a=b,c"),
    )


@pytest.mark.parametrize(
    ("field", "value"), [("initrd", "initrd.gz"), ("kernel_command_line", "quiet")]
)
def test_kernel_extras_need_a_kernel(qemu_lab: QemuLab, field: str, value: str) -> None:
    (qemu_lab.images / "initrd.gz").write_bytes(b"x")
    message = refused(qemu_lab, ConfigError, **{field: value})
    assert f"$.{field}: needs kernel_image" in message


# -- console (emu_qemu/console.py) -------------------------------------------------------------


def console_args(argv: list[str]) -> list[str]:
    start = next(i for i, a in enumerate(argv) if a in ("-chardev", "-vnc", "-spice"))
    return argv[start:]


TELNET_CONSOLE = ["-chardev", "socket,id=console0,path=console.sock", "-serial", "chardev:console0"]


def test_console_telnet(qemu_lab: QemuLab) -> None:
    """The serial port is a client of the host's socket; the host serves telnet."""
    node = qemu_lab.node()
    assert console_args(run(node.dry_run())) == TELNET_CONSOLE


def test_console_telnet_port_and_host_stay_out_of_qemu(qemu_lab: QemuLab) -> None:
    session = qemu_lab.session(console_host="::1")
    assert console_args(qemu_lab.argv(session, console=5000)) == TELNET_CONSOLE


@pytest.mark.parametrize(
    ("port", "expected"),
    [(None, "127.0.0.1:0,to=99"), (0, "127.0.0.1:0,to=99"), (5905, "127.0.0.1:5")],
)
def test_console_vnc(qemu_lab: QemuLab, port: int | None, expected: str) -> None:
    argv = qemu_lab.argv(console_type="vnc", console=port)
    assert console_args(argv) == ["-vnc", expected, "-vga", "std"]


def test_console_vnc_port_below_5900(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, console_type="vnc", console=5000)
    assert "$.console: must be 5900 or more for a VNC console; got 5000" in message


def test_console_spice(qemu_lab: QemuLab) -> None:
    args = console_args(qemu_lab.argv(console_type="spice"))
    assert args[0] == "-spice"
    spice = items(args[1])
    assert set(spice) == {"addr", "port", "disable-ticketing"}
    assert spice["addr"] == "127.0.0.1"
    assert spice["disable-ticketing"] == "on"
    assert 0 < int(spice["port"]) < 65536
    assert args[2:] == ["-vga", "qxl"]
    fixed = console_args(qemu_lab.argv(name="R2", console_type="spice", console=5930))
    assert fixed[:2] == ["-spice", "addr=127.0.0.1,port=5930,disable-ticketing=on"]


def test_console_none(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(console_type="none", console=5000)
    assert not {"-chardev", "-serial", "-vnc", "-spice", "-vga"} & set(argv)


def test_bad_console(qemu_lab: QemuLab) -> None:
    assert "$.console_type: must be one of none, spice, spice+agent, telnet, vnc" in refused(
        qemu_lab, console_type="serial"
    )
    assert "$.console: must be 0..65535, got 70000" in refused(qemu_lab, console=70000)


# -- properties without argv: on_close, cpu_throttling, process_priority ----------------------


@pytest.mark.parametrize(
    ("field", "good", "bad", "problem"),
    [
        ("on_close", ["power_off", "shutdown_signal"], "explode", "must be one of power_off,"),
        ("cpu_throttling", [0, 1, 800], 801, "must be 0..800, got 801"),
        ("cpu_throttling", [0], -1, "must be 0..800, got -1"),
        (
            "process_priority",
            ["realtime", "very high", "high", "normal", "low", "very low"],
            "urgent",
            "must be one of high, low, normal, realtime, very high, very low; got 'urgent'",
        ),
    ],
)
def test_properties_that_act_after_start(
    qemu_lab: QemuLab, field: str, good: list[Any], bad: Any, problem: str
) -> None:
    reference = qemu_lab.argv(name="ref")
    for index, value in enumerate(good):
        # Applied once QEMU runs (QMP, renice, cpulimit): the command line does not change.
        assert qemu_lab.argv(name="ref", **{field: value}) == reference, (field, value, index)
    assert f"$.{field}: {problem}" in refused(qemu_lab, **{field: bad})


def test_legacy_networking(qemu_lab: QemuLab) -> None:
    assert qemu_lab.argv(legacy_networking=False) == qemu_lab.argv()
    message = refused(qemu_lab, legacy_networking=True)
    assert "$.legacy_networking: is not supported: it produces '-net nic,vlan=...'" in message


def test_unknown_key_is_named(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, hda_disk_imag="a.qcow2", colour="red")
    assert "$.hda_disk_imag: unknown key (did you mean 'hda_disk_image'?)" in message
    assert "$.colour: unknown key" in message


def test_every_bad_field_is_reported_at_once(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, ram=0, adapters=900, console_type="x")
    assert all(f"$.{f}:" in message for f in ("ram", "adapters", "console_type"))


# -- options (emu_qemu/options.py) -------------------------------------------------------------


def test_options_placeholders(qemu_lab: QemuLab) -> None:
    options = (
        "-smbios 'type=1,product=%vm-name%,serial=%vm-id%'"
        " -smbios type=2,manufacturer=%project-id%,product=%project-path%,version=%console-port%"
    )
    node = qemu_lab.node(name="my router", console=5000, options=options)
    argv = run(node.dry_run())
    assert argv[-4:] == [
        "-smbios",
        f"type=1,product=my router,serial={node.config.id}",
        "-smbios",
        f"type=2,manufacturer={qemu_lab.project.id},product={qemu_lab.project.directory},"
        "version=5000",
    ]


def test_console_port_placeholder_is_the_real_port(qemu_lab: QemuLab) -> None:
    # QEMU cannot tell its VNC port before it binds, so a port is chosen up front for it
    # (a telnet console's port is the host's: see test_qemu_lifecycle).
    argv = qemu_lab.argv(console_type="vnc", options="-smbios type=1,version=%console-port%")
    port = int(argv[-1].removeprefix("type=1,version="))
    assert port > 5900
    assert f"127.0.0.1:{port - 5900}" in values_of(argv, "-vnc")


def test_placeholder_values_cannot_add_keys(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(name="r1,serial=evil", options="-smbios type=1,product=%vm-name%")
    assert argv[-1] == "type=1,product=r1,,serial=evil"


def test_options_that_cannot_be_split(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, options="-cpu 'max")
    assert "$.options: cannot be split into arguments (No closing quotation)" in message


SAFE_OPTIONS = (
    "-cpu max -machine q35 -device virtio-rng-pci -device usb-tablet -usb -nographic"
    " -smbios type=1,product=vios -rtc base=utc -global kvm-pit.lost_tick_policy=discard"
    " -boot menu=on -no-hpet"
)


def test_safe_options_come_last(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(options=SAFE_OPTIONS)
    assert argv[-len(SAFE_OPTIONS.split()) :] == SAFE_OPTIONS.split()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ("-drive file=/etc/shadow", "-drive"),
        ("--netdev user,id=n9", "-netdev"),
        ("--chardev=x", "-chardev"),
        ("-hda /etc/shadow", "-hda"),
        ("-set drive.drive0.file=/etc/shadow", "-set"),
        ("-device e1000,romfile=/etc/shadow", "-device romfile="),
        ("-global e1000.romfile=/etc/shadow", "-global romfile="),
        ("-global driver=e1000,property=romfile,value=/etc/shadow", "-global romfile="),
        ("-device loader,addr=0x1000,file=/etc/shadow", "-device loader"),
        ("-device vfio-pci,host=0000:01:00.0", "-device vfio-pci"),
        ("-fw_cfg name=opt/x,file=/etc/shadow", "-fw_cfg file="),
        ("-machine q35,kernel=/etc/shadow", "-machine kernel="),
        ("-boot menu=on,splash=/etc/shadow", "-boot splash="),
        ("-mem-path /dev/shm/x", "-mem-path"),
        ("-s", "-s"),
        ("-display vnc=0.0.0.0:1", "-display"),
    ],
)
def test_unsafe_options(qemu_lab: QemuLab, options: str, named: str) -> None:
    message = refused(qemu_lab, options=f"-cpu max {options}")
    listed = message.split("$.options: ", 1)[1].split(" could reach host files")[0]
    assert named in listed.split(", ")
    assert "HostSettings.allow_unsafe_options" in message
    allowed = qemu_lab.argv(qemu_lab.session(allow_unsafe_options=True), options=options)
    assert allowed[-len(options.split()) :] == options.split()


def test_a_placeholder_cannot_smuggle_a_key(qemu_lab: QemuLab) -> None:
    argv = qemu_lab.argv(name="a,file=/etc/shadow", options="-smbios type=1,product=%vm-name%")
    assert argv[-1] == "type=1,product=a,,file=/etc/shadow"  # one product name, no file=


# -- escaping: nothing a user names can add an option to QEMU's option strings ---------------


def test_file_name_with_a_comma(qemu_lab: QemuLab) -> None:
    base = qemu_lab.image("a,b.qcow2")
    argv = qemu_lab.argv(hda_disk_image="a,b.qcow2", linked_clone=False)
    drive = f"file={qemu_lab.images}/a,,b.qcow2,format=qcow2,id=drive0,if=ide,index=0,media=disk"
    assert after(argv, "-drive", drive)
    assert items(drive)["file"] == str(base)


def test_file_name_that_tries_to_inject_options(qemu_lab: QemuLab) -> None:
    name = "x.qcow2,if=none,file=/etc/shadow"
    base = qemu_lab.image(name)
    argv = qemu_lab.argv(hda_disk_image=name, linked_clone=False)
    drive = (
        f"file={qemu_lab.images}/x.qcow2,,if=none,,file=/etc/shadow,"
        "format=qcow2,id=drive0,if=ide,index=0,media=disk"
    )
    assert values_of(argv, "-drive") == [drive]
    assert items(drive) == {
        "file": str(base),
        "format": "qcow2",
        "id": "drive0",
        "if": "ide",
        "index": "0",
        "media": "disk",
    }


@pytest.mark.parametrize("name", ["R,1", "process=evil", "a,,b", "debug-threads=on"])
def test_node_name_stays_the_name(qemu_lab: QemuLab, name: str) -> None:
    (value,) = values_of(qemu_lab.argv(name=name), "-name")
    assert option_items(value) == [("guest", name)]


def test_project_directory_with_commas(qemu_lab: QemuLab) -> None:
    qemu_lab.project = Project.for_directory(qemu_lab.root / "p,logfile=/etc/x")
    qemu_lab.image("a.qcow2")
    node = qemu_lab.node(hda_disk_image="a.qcow2")
    argv = run(node.dry_run())
    (drive,) = values_of(argv, "-drive")
    assert items(drive)["file"] == str(overlay_path(node, "a"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"),
        min_size=1,
        max_size=40,
    ).filter(lambda name: name not in (".", ".."))
)
def test_any_file_name_is_one_file(qemu_lab: QemuLab, name: str) -> None:
    path = qemu_lab.images / name
    path.write_bytes(b"\0" * 512)
    try:
        argv = qemu_lab.argv(name="R", hda_disk_image=name, linked_clone=False)
    finally:
        path.unlink()
    (drive,) = values_of(argv, "-drive")
    assert items(drive) == {
        "file": str(path),
        "format": "raw",
        "id": "drive0",
        "if": "ide",
        "index": "0",
        "media": "disk",
    }


# -- order of the fragments --------------------------------------------------------------------


def test_fragment_order(qemu_lab: QemuLab) -> None:
    """Documented in emu_qemu.positions: program, accel, identity, resources, control,
    boot, disks, network, console, user options."""
    qemu_lab.image("a.qcow2")
    options = "-device virtio-rng-pci -rtc base=utc"
    argv = qemu_lab.argv(hda_disk_image="a.qcow2", adapters=2, options=options)
    assert argv[0] == str(QEMU)
    firsts = ["-accel", "-name", "-m", "-nodefaults", "-qmp", "-boot", "-drive", "-netdev"]
    firsts += ["-chardev"]
    positions = [argv.index(flag) for flag in firsts]
    assert positions == sorted(positions)
    assert argv[-4:] == options.split()
    assert argv.index("-chardev") < len(argv) - 4


# -- the emu argv command ----------------------------------------------------------------------


def emu_argv(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMU_QEMU_KVM": "off", "EMU_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(
        [str(EMU), "argv", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


NODE_JSON = {
    "name": "R1",
    "ram": 128,
    "adapters": 2,
    "hda_disk_image": "disk.qcow2",
    "nios": {
        "0": {"type": "nio_udp", "lport": 20000, "rhost": "127.0.0.1", "rport": 20001},
        "1": {"type": "nio_tap", "tap_device": "tap0"},
    },
}

NODE_TOML = """\
name = "R1"
ram = 128
adapters = 2
hda_disk_image = "disk.qcow2"

[nios.0]
type = "nio_udp"
lport = 20000
rhost = "127.0.0.1"
rport = 20001

[nios.1]
type = "nio_tap"
tap_device = "tap0"
"""


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_emu_argv_command(qemu_lab: QemuLab, kind: str) -> None:
    qemu_lab.image("disk.qcow2")
    node_file = qemu_lab.images / f"r1.{kind}"
    node_file.write_text(json.dumps(NODE_JSON) if kind == "json" else NODE_TOML)
    done = emu_argv(node_file, cwd=qemu_lab.root)
    assert (done.returncode, done.stderr) == (0, "")
    argv = json.loads(done.stdout)
    assert argv[0] == str(QEMU)
    assert after(argv, "-m", "128M")
    netdevs = values_of(argv, "-netdev")
    assert "tap,id=link1,ifname=tap0,script=no,downscript=no" in netdevs
    assert any(n.startswith("dgram,id=link0,local.type=inet") for n in netdevs)
    # Same description, same argv: the file's form does not matter.
    qemu_lab.project = Project.for_directory(qemu_lab.images)
    node = qemu_lab.node(**{k: v for k, v in NODE_JSON.items() if k != "name"})
    assert argv == run(node.dry_run())


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"name": "R1", "ram": "lots"}', "$.ram: must be an integer, got str 'lots'"),
        ('{"name": "R1", "adapters": 900}', "$.adapters: must be 0..275, got 900"),
        ('{"name": "R1", "hda_disk_imag": "x"}', "$.hda_disk_imag: unknown key"),
        (
            '{"name": "R1", "nios": {"0": {"type": "nio_tap", "tap_device": "a,b"}}}',
            "].device: must be a network interface name",
        ),
        ('{"name": "R1", "ram": ', "not valid JSON"),
        ("[1, 2]", "$: must be a table of node properties"),
    ],
)
def test_emu_argv_bad_input(tmp_path: Path, content: str, field: str) -> None:
    node_file = tmp_path / "bad.json"
    node_file.write_text(content)
    done = emu_argv(node_file, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"emu: error: {node_file}: ")
    assert field in line


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('options = "-drive file=/etc/shadow"', "$.options: -drive"),
        ('initrd = "initrd.gz"', "$.initrd: needs kernel_image"),
        ('hda_disk_image = "missing.qcow2"', "hda_disk_image: image 'missing.qcow2' not found"),
    ],
)
def test_emu_argv_bad_input_found_by_plugins(tmp_path: Path, content: str, field: str) -> None:
    node_file = tmp_path / "r1.toml"
    node_file.write_text(f'name = "R1"\n{content}\n')
    (tmp_path / "initrd.gz").write_bytes(b"x")
    done = emu_argv(node_file, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert field in line
    assert str(node_file) in line


def test_a_placeholder_cannot_stand_in_a_key(qemu_lab: QemuLab) -> None:
    message = refused(qemu_lab, name="romfile", options="-device e1000,%vm-name%=/etc/passwd")
    assert "$.options: %vm-name% cannot stand in a key ('%vm-name%=/etc/passwd')" in message
