"""QEMU node properties (GNS3's names, so a GNS3 node description works as it is) and settings.

Every field is documented in ``docs/qemu-node.md`` with its default and the argv it produces.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import attrs

from emucore.convert import structure
from emucore.models import HostSettings
from emucore.validators import in_range, matches, one_of, printable

PLATFORMS = frozenset(
    "aarch64 alpha arm cris hppa i386 loongarch64 m68k microblaze microblazeel mips mips64"
    " mips64el mipsel nios2 or1k ppc ppc64 riscv32 riscv64 rx s390x sh4 sh4eb sparc sparc64"
    " tricore x86_64 xtensa xtensaeb".split()
)

# PCI NIC models QEMU 7.2 offers; GNS3's "virtio" means virtio-net-pci.
ADAPTER_TYPES = frozenset(
    "e1000 e1000-82544gc e1000-82545em e1000e i82550 i82551 i82557a i82557b i82557c i82558a"
    " i82558b i82559a i82559b i82559c i82559er i82562 i82801 ne2k_pci pcnet rtl8139 tulip"
    " virtio virtio-net-pci vmxnet3".split()
)

DISK_INTERFACES = frozenset(
    ("ide", "sata", "scsi", "virtio", "nvme", "sd", "mtd", "floppy", "pflash", "none")
)
BOOT_PRIORITIES = frozenset(("c", "d", "n", "cn", "cd", "dn", "dc", "nc", "nd"))
CONSOLE_TYPES = frozenset(("telnet", "vnc", "spice", "spice+agent", "none"))
ON_CLOSE = frozenset(("power_off", "shutdown_signal", "save_vm_state"))
PROCESS_PRIORITIES = frozenset(("realtime", "very high", "high", "normal", "low", "very low"))
DRIVES = ("a", "b", "c", "d")

MAX_ADAPTERS = 275
VNC_BASE_PORT = 5900
_MAC = r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}"


def _empty_or(validator: Any) -> Any:
    """``validator``, but ``""`` (not set) passes: its message lists no empty choice."""

    def check(inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
        if value:
            validator(inst, attr, value)

    return check


def _unicast_mac(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value:
        return
    matches(_MAC, "a MAC address like 0c:12:34:56:78:00")(_inst, _attr, value)
    if int(value[:2], 16) & 1:
        raise ValueError(f"must be a unicast MAC address (first byte even); got {value!r}")


def _base_mac(inst: QemuProperties, _attr: attrs.Attribute[Any], value: str) -> None:
    _unicast_mac(inst, _attr, value)
    if not value:
        return
    # Adapter n gets base + n: that sum must not carry into the first byte (multicast bit).
    base = int(value.replace(":", ""), 16)
    if (base + max(inst.adapters - 1, 0)) >> 40 != base >> 40:
        raise ValueError(
            f"leaves no room for {inst.adapters} adapters: base + adapter number would change"
            f" the first byte; choose a base whose last bytes are lower; got {value!r}"
        )


def _shell_words(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split into arguments ({exc}): {value!r}") from None


def _refuse_legacy(_inst: Any, _attr: attrs.Attribute[Any], value: bool) -> None:
    if value:
        raise ValueError(
            "is not supported: it produces '-net nic,vlan=...', which QEMU removed in 3.0;"
            " set it to false (emu connects adapters with -netdev)"
        )


def _at_least_cpus(inst: QemuProperties, _attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is None or value == inst.cpus:
        return  # unset (as many as cpus), or the same as cpus: cpus' own check speaks for it
    in_range(1, 255)(inst, _attr, value)
    if value < inst.cpus:
        raise ValueError(f"must be at least cpus ({inst.cpus}); got {value}")


@attrs.frozen
class CustomAdapter:
    """Per-adapter overrides (GNS3 ``custom_adapters`` items).

    :ivar adapter_number: which adapter (0-based).
    :ivar adapter_type: NIC model for this adapter instead of ``adapter_type``.
    :ivar mac_address: MAC address for this adapter instead of the derived one.
    :ivar port_name: GNS3's label for the port; kept for compatibility, not used.
    """

    adapter_number: int = attrs.field(validator=in_range(0, MAX_ADAPTERS - 1))
    adapter_type: str = attrs.field(default="", validator=_empty_or(one_of(ADAPTER_TYPES)))
    mac_address: str = attrs.field(default="", validator=_unicast_mac)
    port_name: str = attrs.field(default="", validator=printable(100, allow_empty=True))


def _custom_adapters(
    inst: QemuProperties, _attr: attrs.Attribute[Any], value: tuple[CustomAdapter, ...]
) -> None:
    seen: set[int] = set()
    for item in value:
        if item.adapter_number >= inst.adapters:
            raise ValueError(
                f"adapter_number {item.adapter_number} does not exist"
                f" (the node has {inst.adapters} adapters)"
            )
        if item.adapter_number in seen:
            raise ValueError(f"adapter_number {item.adapter_number} appears twice")
        seen.add(item.adapter_number)


def _image(what: str) -> Any:
    return attrs.field(
        default="", validator=printable(4096, allow_empty=True), metadata={"image": what}
    )


def _cdrom_without_hdc(inst: QemuProperties, _attr: attrs.Attribute[Any], value: str) -> None:
    printable(4096, allow_empty=True)(inst, _attr, value)
    if value and inst.hdc_disk_image:
        raise ValueError(
            "cannot be used together with hdc_disk_image: the cdrom takes the hdc slot"
            " (IDE index 2); move that disk to hdd_disk_image"
        )


def _console_port(inst: QemuProperties, _attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is None:
        return
    in_range(0, 65535)(inst, _attr, value)
    # VNC listens on display (port - 5900): a lower port cannot be expressed.
    if inst.console_type == "vnc" and 0 < value < VNC_BASE_PORT:
        raise ValueError(f"must be {VNC_BASE_PORT} or more for a VNC console; got {value}")


def _aux_port(inst: QemuProperties, _attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is None:
        return
    in_range(0, 65535)(inst, _attr, value)
    if inst.aux_type == "vnc" and 0 < value < VNC_BASE_PORT:
        raise ValueError(f"must be {VNC_BASE_PORT} or more for a VNC console; got {value}")
    if value and value == inst.console and inst.console_type != "none":
        raise ValueError(f"must differ from the console port; got {value} for both")


def _aux_type(inst: QemuProperties, _attr: attrs.Attribute[Any], value: str) -> None:
    one_of(CONSOLE_TYPES)(inst, _attr, value)
    graphical = ("vnc", "spice", "spice+agent")
    both = {value, inst.console_type}
    # One VNC server and one SPICE server per QEMU: a second of a kind has nowhere to go.
    if value in graphical and (value == inst.console_type or both == {"spice", "spice+agent"}):
        raise ValueError(
            f"cannot be {value!r} when console_type is {inst.console_type!r}: QEMU has one"
            " display server of each kind; use telnet (a second serial port) or another kind"
        )


def _uefi_without_bios(inst: QemuProperties, _attr: attrs.Attribute[Any], value: bool) -> None:
    if value and inst.bios_image:
        raise ValueError(
            "cannot be used together with bios_image: UEFI boots the OVMF firmware;"
            " remove bios_image or set uefi = false"
        )


@attrs.frozen
class QemuProperties:
    """The properties of a QEMU node (see ``docs/qemu-node.md``)."""

    qemu_path: str = attrs.field(default="", validator=printable(4096, allow_empty=True))
    platform: str = attrs.field(default="", validator=_empty_or(one_of(PLATFORMS)))
    ram: int = attrs.field(default=256, validator=in_range(1, 1 << 22))
    cpus: int = attrs.field(default=1, validator=in_range(1, 255))
    # Unset means as many as cpus, also after cpus changes: a node asking for 4 CPUs must not
    # be refused for a maxcpus it never set (GNS3's controller replays what it was given).
    maxcpus: int | None = attrs.field(default=None, validator=_at_least_cpus)
    adapters: int = attrs.field(default=1, validator=in_range(0, MAX_ADAPTERS))
    adapter_type: str = attrs.field(default="e1000", validator=one_of(ADAPTER_TYPES))
    custom_adapters: tuple[CustomAdapter, ...] = attrs.field(default=(), validator=_custom_adapters)
    mac_address: str = attrs.field(default="", validator=_base_mac)
    hda_disk_image: str = _image("disk")
    hdb_disk_image: str = _image("disk")
    hdc_disk_image: str = _image("disk")
    hdd_disk_image: str = _image("disk")
    hda_disk_interface: str = attrs.field(default="none", validator=one_of(DISK_INTERFACES))
    hdb_disk_interface: str = attrs.field(default="none", validator=one_of(DISK_INTERFACES))
    hdc_disk_interface: str = attrs.field(default="none", validator=one_of(DISK_INTERFACES))
    hdd_disk_interface: str = attrs.field(default="none", validator=one_of(DISK_INTERFACES))
    cdrom_image: str = attrs.field(
        default="", validator=_cdrom_without_hdc, metadata={"image": "cdrom"}
    )
    bios_image: str = _image("bios")
    initrd: str = _image("initrd")
    kernel_image: str = _image("kernel")
    kernel_command_line: str = attrs.field(default="", validator=printable(4096, allow_empty=True))
    boot_priority: str = attrs.field(default="c", validator=one_of(BOOT_PRIORITIES))
    console: int | None = attrs.field(default=None, validator=_console_port)
    console_type: str = attrs.field(default="telnet", validator=one_of(CONSOLE_TYPES))
    aux: int | None = attrs.field(default=None, validator=_aux_port)
    aux_type: str = attrs.field(default="none", validator=_aux_type)
    uefi: bool = attrs.field(default=False, validator=_uefi_without_bios)
    tpm: bool = False
    linked_clone: bool = True
    on_close: str = attrs.field(default="power_off", validator=one_of(ON_CLOSE))
    cpu_throttling: int = attrs.field(default=0, validator=in_range(0, 800))
    process_priority: str = attrs.field(default="low", validator=one_of(PROCESS_PRIORITIES))
    options: str = attrs.field(
        default="", validator=[printable(10_000, allow_empty=True), _shell_words]
    )
    legacy_networking: bool = attrs.field(default=False, validator=_refuse_legacy)

    @property
    def adapter_count(self) -> int:
        """The number of network adapters."""
        return self.adapters

    def disk_image(self, drive: str) -> str:
        """``hd<drive>_disk_image`` (drive is a, b, c or d)."""
        value: str = getattr(self, f"hd{drive}_disk_image")
        return value

    def disk_interface(self, drive: str) -> str:
        """``hd<drive>_disk_interface``, with GNS3's fail-safe: ``none`` means ``ide``."""
        value: str = getattr(self, f"hd{drive}_disk_interface")
        return "ide" if value == "none" else value


KVM_MODES = frozenset(("auto", "require", "off"))
THROTTLING_MECHANISMS = frozenset(("auto", "cgroup", "cpulimit"))


def _absolute_or_empty(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if value and not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")


@attrs.frozen
class QemuSettings:
    """The host's settings for QEMU nodes (``HostSettings.emulators["qemu"]``).

    :ivar kvm: ``auto`` (KVM when a functional probe passes, else TCG with a warning),
        ``require`` (fail when KVM does not work) or ``off`` (always TCG).
    :ivar kvm_probe_kernel: a Linux kernel the KVM probe boots; by default one linked in
        ``<cache>/kernels`` (the tiny guest's, once built), else ``/boot/vmlinuz-*``.
    :ivar kvm_probe_timeout: seconds the probe kernel gets to reach its panic under KVM.
    :ivar binary_dirs: directories searched for QEMU binaries before ``PATH``.
    :ivar powerdown_timeout: seconds a guest gets to power off after an ACPI shutdown request.
    :ivar qmp_timeout: seconds any QMP command may take.
    :ivar start_timeout: seconds QEMU gets to open its QMP socket.
    :ivar terminate_timeout: seconds QEMU gets to exit after SIGTERM (it flushes and closes
        its disks) before SIGKILL.
    :ivar cpu_throttling_mechanism: how ``cpu_throttling`` is enforced: ``auto`` (a cgroup
        CPU quota, else cpulimit with a warning), ``cgroup`` (fail when no cgroup can be
        used) or ``cpulimit``.
    :ivar cgroup_root: the cgroup directory the nodes' groups go under (``emu/<node id>``);
        by default the root of the mounted hierarchy (cgroup v2 if its cpu controller is
        available, else v1's ``cpu``).
    :ivar ovmf_code: the UEFI firmware (read-only) nodes with ``uefi`` boot; a bare file
        name, or a path that does not exist, is looked up in the image directories.
    :ivar ovmf_vars: the UEFI variable store each node with ``uefi`` gets a copy of.
    :ivar swtpm_path: the TPM emulator for nodes with ``tpm``: a name looked up in
        ``binary_dirs`` then ``PATH``, or an absolute path.
    :ivar savevm_timeout: seconds saving or restoring a VM's state may take.
    """

    kvm: str = attrs.field(default="auto", validator=one_of(KVM_MODES))
    kvm_probe_kernel: str = ""
    kvm_probe_timeout: float = attrs.field(default=10.0, validator=in_range(0.5, 600))
    binary_dirs: tuple[Path, ...] = ()
    powerdown_timeout: float = attrs.field(default=10.0, validator=in_range(0, 3600))
    qmp_timeout: float = attrs.field(default=10.0, validator=in_range(0.1, 600))
    start_timeout: float = attrs.field(default=20.0, validator=in_range(0.5, 600))
    terminate_timeout: float = attrs.field(default=15.0, validator=in_range(0.5, 600))
    cpu_throttling_mechanism: str = attrs.field(
        default="auto", validator=one_of(THROTTLING_MECHANISMS)
    )
    cgroup_root: str = attrs.field(
        default="", validator=[printable(4096, allow_empty=True), _absolute_or_empty]
    )
    ovmf_code: str = attrs.field(
        default="/usr/share/OVMF/OVMF_CODE_4M.fd", validator=printable(4096)
    )
    ovmf_vars: str = attrs.field(
        default="/usr/share/OVMF/OVMF_VARS_4M.fd", validator=printable(4096)
    )
    swtpm_path: str = attrs.field(default="swtpm", validator=printable(4096))
    savevm_timeout: float = attrs.field(default=120.0, validator=in_range(1, 3600))


def host_qemu_settings(settings: HostSettings) -> QemuSettings:
    """The host's QEMU settings (``settings.emulators["qemu"]``), structured: what a node's
    ``emulator_settings`` is, for the hooks that have only the host's settings
    (``emu_check``).

    :raises ConfigError: they are invalid.
    """
    raw = settings.emulators.get("qemu", {})
    qemu_settings: QemuSettings = structure(dict(raw), QemuSettings, "settings.emulators.qemu")
    return qemu_settings
