"""The real qemu-system-x86_64 accepts every command line the QEMU plugin generates.

Each case builds a node, takes the argv of its dry run (which holds ``-S`` and ``-qmp
unix:qmp.sock``), starts QEMU with it in the node directory, and asks QEMU over QMP what it
built: it must be paused before launch, hold every ``-device`` and ``-drive`` of the argv
(the files QEMU opened are compared with the paths given), then ``quit`` with exit code 0
and no stderr line other than the hub warnings explained below. QEMU is killed if anything
fails; a module fixture checks that no QEMU of these tests is left behind.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from qemu.qmp import QMPClient

from emu_qemu.disks import overlay_path
from emu_qemu.network import adapter_mac
from emu_qemu.properties import ADAPTER_TYPES
from emucore.models import Project
from emucore.node import Node
from tests.conftest import PausedQemu, QemuLab, option_items, run, running_qemu, values_of

if TYPE_CHECKING:
    from emu_tests.guest import TinyGuest

pytestmark = pytest.mark.usefixtures("kvm_off")

TAP_DEVICE = "emutap0"

# Every adapter is a hub with the NIC and a "sink" port (see emu_qemu.network); QEMU warns
# about the sink's missing peer at startup. These, and VNC saying where it listens, are the
# only stderr lines allowed.
HUB_WARNINGS = (
    "qemu-system-x86_64: warning: hub port sink{n} has no peer",
    "qemu-system-x86_64: warning: hub {n} is not connected to host network",
    "qemu-system-x86_64: warning: netdev sink{n} has no peer",
)
VNC_NOTICE = re.compile(r"VNC server running on 127\.0\.0\.1:59\d\d")


def from_argv(argv: list[str], flag: str, key: str) -> list[str]:
    """The ``key`` values of every ``flag`` option in ``argv`` that has one."""
    return [v for opt in values_of(argv, flag) for k, v in option_items(opt) if k == key]


def assert_accepted(node: Node, argv: list[str], qemu: PausedQemu) -> None:
    """What every case must show: paused, every device and drive built, clean exit."""
    assert qemu.status["status"] == "prelaunch"
    assert qemu.status["running"] is False
    assert qemu.returncode == 0, qemu.stderr
    allowed = {w.format(n=n) for w in HUB_WARNINGS for n in range(len(node.adapters))}
    unexpected = [
        line
        for line in qemu.stderr.splitlines()
        if line not in allowed and not VNC_NOTICE.fullmatch(line)
    ]
    assert unexpected == []
    assert set(from_argv(argv, "-device", "id")) <= set(qemu.peripherals)
    opened = {block["inserted"]["file"] for block in qemu.blocks if "inserted" in block}
    assert opened == set(from_argv(argv, "-drive", "file"))


def qmp_get(path: str, prop: str) -> Callable[[QMPClient], Any]:
    async def query(client: QMPClient) -> Any:
        return await client.execute("qom-get", {"path": path, "property": prop})

    return query


def hmp(command: str) -> Callable[[QMPClient], Any]:
    async def query(client: QMPClient) -> Any:
        return await client.execute("human-monitor-command", {"command-line": command})

    return query


def free_port(kind: int = socket.SOCK_STREAM, low: int = 0) -> int:
    """A port nothing listens on right now (from ``low`` upwards, else any)."""
    for port in [*range(low, low + 100)] if low else [0]:
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = probe.getsockname()[1]
            return chosen
    raise AssertionError(f"no free port from {low}")


@pytest.fixture(scope="module", autouse=True)
def no_qemu_left(
    spawned_qemus: list[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """After the module: none of its QEMUs runs (other engineers' QEMUs are left alone)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    listed = subprocess.run(["pgrep", "-a", "qemu"], capture_output=True, text=True).stdout
    assert [line for line in listed.splitlines() if base in line] == []
    assert [pid for pid in spawned_qemus if running_qemu(pid)] == []


@pytest.fixture(scope="module")
def tap_device() -> Iterator[str]:
    """A host TAP device for the test, deleted afterwards."""
    created = subprocess.run(
        ["ip", "tuntap", "add", "dev", TAP_DEVICE, "mode", "tap"], capture_output=True, text=True
    )
    assert created.returncode == 0, f"cannot create {TAP_DEVICE}: {created.stderr}"
    try:
        yield TAP_DEVICE
    finally:
        subprocess.run(["ip", "link", "delete", TAP_DEVICE], check=True)


def launch(
    lab: QemuLab,
    qemu_paused: Callable[..., PausedQemu],
    query: Callable[[QMPClient], Any] | None = None,
    *,
    prepare_disks: bool = False,
    settings: dict[str, Any] | None = None,
    **description: Any,
) -> tuple[Node, list[str], PausedQemu]:
    """Build the node, (prepare its disks,) take its dry-run argv and run it paused."""
    node = lab.node(lab.session(**(settings or {})), **description)
    if prepare_disks:
        run(node.prepare_disks())
    argv = run(node.dry_run())
    qemu = qemu_paused(node, argv, query)
    assert_accepted(node, argv, qemu)
    return node, argv, qemu


# -- disks -----------------------------------------------------------------------------------

INTERFACES = ("ide", "sata", "scsi", "virtio", "nvme", "sd", "floppy", "pflash", "none")
# An SD card must be a power of 2; x86 firmware flash (pflash) must fit in 8 MiB.
SIZES = {"pflash": "1M"}


@pytest.mark.parametrize("linked_clone", [True, False], ids=["linked", "base"])
@pytest.mark.parametrize("interface", INTERFACES)
def test_disk_interface(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], interface: str, linked_clone: bool
) -> None:
    fmt = "qcow2" if linked_clone else "raw"
    base = qemu_lab.image(f"disk.{fmt}", SIZES.get(interface, "16M"), fmt)
    node, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        prepare_disks=linked_clone,
        hda_disk_image=base.name,
        hda_disk_interface=interface,
        linked_clone=linked_clone,
    )
    (block,) = qemu.blocks
    inserted = block["inserted"]
    if linked_clone:
        assert inserted["file"] == str(overlay_path(node, "a"))
        assert inserted["backing_file"] == str(base)
    else:
        assert inserted["file"] == str(base)
        assert "backing_file" not in inserted
    assert inserted["drv"] == fmt or linked_clone
    if interface in ("sata", "scsi", "nvme", "sd"):
        assert "disk0" in qemu.peripherals


def test_four_disks_and_a_cdrom(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    for name in ("a", "b", "d"):
        qemu_lab.image(f"{name}.qcow2")
    iso = qemu_lab.image("live.iso", "1M", "raw")
    _, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        prepare_disks=True,
        hda_disk_image="a.qcow2",
        hda_disk_interface="sata",
        hdb_disk_image="b.qcow2",
        hdb_disk_interface="scsi",
        hdd_disk_image="d.qcow2",
        hdd_disk_interface="nvme",
        cdrom_image="live.iso",
        boot_priority="dc",
    )
    (cdrom,) = [b for b in qemu.blocks if b["inserted"]["file"] == str(iso)]
    assert cdrom["removable"] is True
    assert cdrom["inserted"]["ro"] is True
    assert {b["device"] for b in qemu.blocks} >= {"drive0", "drive1", "drive3"}


def test_every_drive_on_ide(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    images: dict[str, Any] = {f"hd{name}_disk_image": f"{name}.qcow2" for name in "abcd"}
    for name in "abcd":
        qemu_lab.image(f"{name}.qcow2")
    launch(qemu_lab, qemu_paused, prepare_disks=True, **images)


# -- escaping: QEMU opens exactly the file named, whatever its name --------------------------


@pytest.mark.parametrize("linked_clone", [True, False], ids=["linked", "base"])
@pytest.mark.parametrize("name", ["a,b.qcow2", "x.qcow2,if=none,file=/etc/shadow"])
def test_file_names_with_commas(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], name: str, linked_clone: bool
) -> None:
    base = qemu_lab.image(name)
    node, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        prepare_disks=linked_clone,
        hda_disk_image=name,
        linked_clone=linked_clone,
    )
    (block,) = qemu.blocks
    if linked_clone:
        assert block["inserted"]["file"] == str(overlay_path(node, "a"))
        assert block["inserted"]["backing_file"] == str(base)
    else:
        assert block["inserted"]["file"] == str(base)
    assert block["device"] == "drive0"  # not "none": no if=... was injected either


@pytest.mark.parametrize("name", ["R,1", "process=evil", "a,,b=c"])
def test_node_names_reach_qemu_unchanged(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], name: str
) -> None:
    async def query_name(client: QMPClient) -> Any:
        return await client.execute("query-name")

    _, _, qemu = launch(qemu_lab, qemu_paused, query_name, name=name)
    assert qemu.extra == {"name": name}


def test_project_directory_with_a_comma(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]
) -> None:
    qemu_lab.project = Project.for_directory(qemu_lab.root / "lab,if=none")
    qemu_lab.image("a.qcow2")
    node, _, qemu = launch(qemu_lab, qemu_paused, prepare_disks=True, hda_disk_image="a.qcow2")
    assert qemu.blocks[0]["inserted"]["file"] == str(overlay_path(node, "a"))
    assert "lab,if=none" in str(overlay_path(node, "a"))


# -- network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [0, 1, 40, 275])
def test_adapters(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], adapters: int) -> None:
    last = f"/machine/peripheral/adapter{adapters - 1}"
    query = qmp_get(last, "mac") if adapters else None
    node, _, qemu = launch(qemu_lab, qemu_paused, query, adapters=adapters)
    nics = {name for name in qemu.peripherals if name.startswith("adapter")}
    assert nics == {f"adapter{n}" for n in range(adapters)}
    bridges = {name for name in qemu.peripherals if name.startswith("pci-bridge")}
    assert len(bridges) == (0 if adapters <= 12 else -(-(adapters - 12) // 31))
    if adapters:
        assert qemu.extra == adapter_mac(node, adapters - 1)


def test_custom_adapters_every_model(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]
) -> None:
    models = sorted(ADAPTER_TYPES)
    custom = [
        {"adapter_number": n, "adapter_type": model, "mac_address": f"0e:00:00:00:01:{n:02x}"}
        for n, model in enumerate(models)
    ]

    async def models_and_macs(client: QMPClient) -> list[tuple[Any, Any]]:
        found: list[tuple[Any, Any]] = []
        for n in range(len(models)):
            path = f"/machine/peripheral/adapter{n}"
            mac = await client.execute("qom-get", {"path": path, "property": "mac"})
            kind = await client.execute("qom-get", {"path": path, "property": "type"})
            found.append((kind, mac))
        return found

    _, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        models_and_macs,
        adapters=len(models),
        custom_adapters=custom,
    )
    expected = [
        ("virtio-net-pci" if model == "virtio" else model, f"0e:00:00:00:01:{n:02x}")
        for n, model in enumerate(models)
    ]
    assert qemu.extra == expected


def test_udp_nio(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    local, remote = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    nio = {"type": "nio_udp", "lport": local, "rhost": "127.0.0.1", "rport": remote}
    _, _, qemu = launch(qemu_lab, qemu_paused, hmp("info network"), adapters=2, nios={0: nio})
    assert f"link0: index=0,type=dgram,udp=127.0.0.1:{local}/127.0.0.1:{remote}" in qemu.extra


def test_tap_nio(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], tap_device: str
) -> None:
    nio = {"type": "nio_tap", "tap_device": tap_device}
    _, _, qemu = launch(qemu_lab, qemu_paused, hmp("info network"), nios={0: nio})
    assert f"link0: index=0,type=tap,ifname={tap_device}" in qemu.extra


# -- consoles --------------------------------------------------------------------------------


def test_console_telnet(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    """QEMU's serial port connects to the socket the host listens on (the host serves the
    telnet port; QEMU opens none)."""
    _, _, qemu = launch(qemu_lab, qemu_paused, console_type="telnet", console=free_port())
    (console,) = [c for c in qemu.chardevs if c["label"] == "console0"]
    assert console["filename"].startswith("unix:")
    assert console["frontend-open"] is True


def vnc_query(client: QMPClient) -> Any:
    return client.execute("query-vnc")


@pytest.mark.parametrize("fixed", [False, True], ids=["any-port", "fixed-port"])
def test_console_vnc(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], fixed: bool
) -> None:
    port = free_port(low=5950) if fixed else None
    _, _, qemu = launch(qemu_lab, qemu_paused, vnc_query, console_type="vnc", console=port)
    assert qemu.extra["enabled"] is True
    assert int(qemu.extra["service"]) == port if fixed else int(qemu.extra["service"]) >= 5900


def test_console_spice(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    async def spice(client: QMPClient) -> Any:
        return await client.execute("query-spice")

    _, argv, qemu = launch(qemu_lab, qemu_paused, spice, console_type="spice")
    assert qemu.extra["enabled"] is True
    assert from_argv(argv, "-spice", "port") == [str(qemu.extra["port"])]


def test_console_none(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    _, _, qemu = launch(qemu_lab, qemu_paused, vnc_query, console_type="none")
    assert [c for c in qemu.chardevs if c["label"] == "console0"] == []
    assert qemu.extra["enabled"] is False


# -- boot, machine, options ------------------------------------------------------------------


def test_kernel_boot(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu], tiny_guest: TinyGuest
) -> None:
    dirs = (qemu_lab.images, tiny_guest.kernel.parent, tiny_guest.initrd.parent)

    async def boot(client: QMPClient) -> list[Any]:
        props = ("kernel", "initrd", "append")
        return [await client.execute("qom-get", {"path": "/machine", "property": p}) for p in props]

    _, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        boot,
        settings={"image_dirs": dirs},
        kernel_image=tiny_guest.kernel.name,
        initrd=tiny_guest.initrd.name,
        kernel_command_line="console=ttyS0 emu.test=a,b",
    )
    assert qemu.extra == [
        str(tiny_guest.kernel),
        str(tiny_guest.initrd),
        "console=ttyS0 emu.test=a,b",
    ]


def test_bios_image(qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]) -> None:
    bios = qemu_lab.images / "bios,1.bin"
    shutil.copy("/usr/share/seabios/bios.bin", bios)
    _, _, qemu = launch(
        qemu_lab, qemu_paused, qmp_get("/machine", "firmware"), bios_image=bios.name
    )
    assert qemu.extra == str(bios)


def test_resources_and_safe_options(
    qemu_lab: QemuLab, qemu_paused: Callable[..., PausedQemu]
) -> None:
    async def resources(client: QMPClient) -> tuple[int, int, Any]:
        cpus: Any = await client.execute("query-cpus-fast")
        memory: Any = await client.execute("query-memory-size-summary")
        qtree: Any = await client.execute("human-monitor-command", {"command-line": "info qtree"})
        return len(cpus), memory["base-memory"], "virtio-rng-pci" in qtree

    _, _, qemu = launch(
        qemu_lab,
        qemu_paused,
        resources,
        cpus=2,
        maxcpus=4,
        ram=96,
        options="-device virtio-rng-pci,id=rng0 -smbios type=1,product=%vm-name% -rtc base=utc",
    )
    assert qemu.extra == (2, 96 << 20, True)
    assert "rng0" in qemu.peripherals
