"""Where each QEMU plugin puts its fragment of the command line (``ArgFragment.position``).

A third-party plugin adding options picks a number between these; equal positions keep
hook call order.
"""

PROGRAM = 0  # qemu.binary: the binary itself
ACCEL = 10  # qemu.accel: -accel, -machine
IDENTITY = 20  # qemu.machine: -name, -uuid
RESOURCES = 30  # qemu.machine: -m, -smp
CONTROL = 40  # qemu.machine / qemu.process: -nodefaults, -display, -qmp, -S
FIRMWARE = 45  # qemu.uefi: the OVMF flash drives
BOOT = 50  # qemu.boot: -boot, -bios, -kernel, -initrd, -append
DISKS = 60  # qemu.disks: controllers, -drive, -device
NETWORK = 70  # qemu.network: -netdev, -device, PCI bridges
CONSOLE = 80  # qemu.console: -chardev/-serial, -vnc, -spice and the display adapter
DEVICES = 90  # qemu.tpm: -chardev/-tpmdev/-device of the TPM
USER_OPTIONS = 100  # qemu.options: the node's "options", always last
