"""A tiny bootable Linux guest (Debian cloud kernel + static busybox) for tests and demos.

`build_tiny_guest()` downloads the kernel package with apt, unpacks it with dpkg and writes a
gzip'd newc initramfs holding busybox, a few modules and `/init` (`guest_init.sh`). Everything
lands in a cache directory and is reused; the initramfs name carries a hash of its inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import attrs

from emucore.errors import EmuError
from emucore.paths import probe_kernels_dir

READY_MARKER = "EMU-GUEST-READY"
PROMPT = "emu-guest# "

# Bump when the initramfs layout changes without any input changing.
BUILDER_VERSION = "2"

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
HOST_BUSYBOX = Path("/bin/busybox")
APT_LISTS = Path("/var/lib/apt/lists")
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")

# Load order: each module after the ones it needs (the .deb has no modules.dep).
REQUIRED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "evdev",
    "button",
)
# The cloud kernel does not build e1000 at all; vmxnet3 is its one emulated non-virtio NIC.
OPTIONAL_MODULES = ("e1000", "vmxnet3")
# Shipped but not loaded at boot (probing costs boot time): a test loads them when it needs
# them, in this order, with `load_on_demand`: the IDE CD-ROM (libata, ata_piix, sr_mod) and
# the UEFI variables' file system (efivarfs).
ON_DEMAND_MODULES = (
    "scsi_common",
    "scsi_mod",
    "libata",
    "ata_piix",
    "cdrom",
    "sr_mod",
    "efivarfs",
)

# Under TCG every printk on the serial line and every crypto self-test (~0.3 s) costs boot
# time; a throwaway test guest needs neither, nor CPU vulnerability mitigations.
# init_on_free: freed pages are zeroed, and QEMU saves a zero page as a flag, so a saved
# state of a 128 MiB guest is 54 MiB instead of 91 (restored in 0.1 s instead of 0.2);
# the boot takes no longer.
BOOT_PARAMETERS = (
    "console=ttyS0",
    "quiet",
    "cryptomgr.notests",
    "mitigations=off",
    "init_on_free=1",
)

QUERY_TIMEOUT = 60.0
DOWNLOAD_TIMEOUT = 600.0
UNPACK_TIMEOUT = 300.0

_NO_EXTRA_IPS: Mapping[str, str] = MappingProxyType({})


class GuestBuildError(EmuError):
    """The tiny guest could not be built; the message says what failed and what to do."""


@attrs.frozen
class TinyGuest:
    """A kernel and an initramfs ready for `qemu-system-x86_64 -kernel K -initrd I`.

    :ivar kernel: the bzImage.
    :ivar initrd: the gzip'd newc initramfs.
    :ivar version: the kernel release, as `uname -r` prints it.
    """

    kernel: Path
    initrd: Path
    version: str

    def kernel_command_line(
        self,
        *,
        ip: str | None = None,
        gateway: str | None = None,
        hostname: str | None = None,
        extra_ips: Mapping[str, str] = _NO_EXTRA_IPS,
    ) -> str:
        """Return the `-append` text: serial console plus the guest's network settings.

        :param ip: address(es) of eth0 in CIDR form, comma-separated (`10.0.0.1/24`).
        :param gateway: default gateway address.
        :param hostname: the guest's host name (the prompt stays `PROMPT`).
        :param extra_ips: interface name to CIDR address(es), e.g. `{"eth1": "10.0.1.1/24"}`.
        :return: the kernel command line; it never contains a value with white space.
        """
        words = list(BOOT_PARAMETERS)
        settings = {"emu.ip": ip, "emu.gw": gateway, "emu.hostname": hostname}
        for name in extra_ips:
            if not _INTERFACE.fullmatch(name):
                raise ValueError(f"{name!r} is not an interface name (a-z, then a-z0-9, ≤ 15)")
        settings.update({f"emu.ip.{name}": value for name, value in extra_ips.items()})
        for key, value in settings.items():
            if value is not None:
                words.append(f"{key}={_checked_word(key, value)}")
        return " ".join(words)


_INTERFACE = re.compile(r"[a-z][a-z0-9]{0,14}")


def _checked_word(key: str, value: str) -> str:
    """Reject values that would split into several kernel parameters."""
    if not value or any(char.isspace() or char == '"' for char in value):
        raise ValueError(f"{key}={value!r}: empty, white space and quotes cannot be passed")
    return value


def build_tiny_guest(cache_dir: Path | None = None) -> TinyGuest:
    """Build the tiny guest, or reuse the cached one when none of its inputs changed.

    :param cache_dir: where downloads and builds live; default `$EMU_TINY_GUEST_CACHE`, else
        `$XDG_CACHE_HOME/emu/tiny-guest`, else `~/.cache/emu/tiny-guest`.
    :return: the kernel, initramfs and kernel version.
    :raises GuestBuildError: apt/dpkg missing, a download failing, a module missing.
    """
    cache = default_cache_dir() if cache_dir is None else cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        tree = _unpacked_package(cache, _kernel_package_name(cache))
        kernel, version = _kernel_image(tree)
        modules = {name: _module_bytes(path) for name, path in _module_files(tree, version).items()}
        _check_load_order(modules)
        busybox = _busybox_binary(cache)
        initrd = _initramfs(cache, busybox, modules)
        _offer_for_probes(kernel)
    return TinyGuest(kernel=kernel, initrd=initrd, version=version)


def _offer_for_probes(kernel: Path) -> None:
    """Link the kernel into emu's probe kernels (QEMU's KVM probe boots one of them)."""
    link = probe_kernels_dir() / "tiny-guest-vmlinuz"
    with contextlib.suppress(OSError):
        link.parent.mkdir(parents=True, exist_ok=True)
        if not (link.is_symlink() and link.resolve() == kernel.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(kernel.absolute())


def default_cache_dir() -> Path:
    """Return the cache directory used when `build_tiny_guest` is given none."""
    if override := os.environ.get("EMU_TINY_GUEST_CACHE"):
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "emu" / "tiny-guest"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialize builders sharing a cache, so parallel test workers download only once."""
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _run(argv: Sequence[str], *, timeout: float, hint: str, cwd: Path | None = None) -> str:
    """Run a host tool and return its stdout; every failure becomes a GuestBuildError."""
    command = " ".join(argv)
    if shutil.which(argv[0]) is None:
        raise GuestBuildError(
            f"{argv[0]} not found: the tiny guest is built from Debian packages,"
            " so it needs a Debian or Ubuntu host with apt and dpkg"
        )
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"`{command}` did not finish in {timeout:.0f} s; {hint}") from None
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        raise GuestBuildError(
            f"`{command}` failed (exit {done.returncode}): {detail[-800:]}\n{hint}"
        )
    return done.stdout


def _kernel_package_name(cache: Path) -> str:
    """Return the versioned kernel package that the metapackage depends on right now."""
    memo = cache / "kernel-package"
    stamp = _apt_lists_stamp()
    if memo.exists():
        recorded_stamp, _, name = memo.read_text().strip().partition(" ")
        if recorded_stamp == stamp and (cache / "packages" / name).is_dir():
            return name
        if shutil.which("apt-cache") is None and (cache / "packages" / name).is_dir():
            return name  # a cache restored onto a host without apt still works
    name = _resolve_kernel_package()
    memo.write_text(f"{stamp} {name}\n")
    return name


def _apt_lists_stamp() -> str:
    """Return a token that changes when `apt-get update` brings new package lists."""
    # apt-cache takes ~1 s where its binary cache is disabled (Docker images), so remember.
    with contextlib.suppress(OSError):
        return str(APT_LISTS.stat().st_mtime_ns)
    return "unknown"


def _resolve_kernel_package() -> str:
    """Ask apt which linux-image-* the metapackage depends on."""
    hint = "run `apt-get update` and check that Debian's main archive is in the apt sources"
    output = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], timeout=QUERY_TIMEOUT, hint=hint)
    for line in output.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and name.startswith("linux-image-"):
            return name.strip("<>")
    raise GuestBuildError(f"{KERNEL_METAPACKAGE} names no linux-image-* dependency; {hint}")


def _unpacked_package(cache: Path, package: str) -> Path:
    """Return the package's file tree, downloading and unpacking it only the first time."""
    tree = cache / "packages" / package
    if tree.is_dir():
        return tree
    deb = _downloaded_deb(cache / "debs", package)
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=tree.parent))
    try:
        hint = f"{deb} may be damaged: delete it and retry"
        _run(["dpkg", "-x", str(deb), str(staging)], timeout=UNPACK_TIMEOUT, hint=hint)
        # Appears whole or not at all: an interrupted unpack is never taken for a good one.
        staging.rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def _downloaded_deb(debs: Path, package: str) -> Path:
    """Return the package's .deb in `debs`, fetching it with `apt-get download` if absent."""
    debs.mkdir(parents=True, exist_ok=True)
    if found := sorted(debs.glob(f"{package}_*.deb")):
        return found[-1]
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=debs))
    try:
        hint = "run `apt-get update` and check network access to the Debian mirror"
        _run(
            ["apt-get", "download", "-o", "Acquire::http::Timeout=30", package],
            cwd=staging,
            timeout=DOWNLOAD_TIMEOUT,
            hint=hint,
        )
        fetched = sorted(staging.glob(f"{package}_*.deb"))
        if not fetched:
            raise GuestBuildError(f"apt-get download {package} left no .deb; {hint}")
        return fetched[-1].rename(debs / fetched[-1].name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _kernel_image(tree: Path) -> tuple[Path, str]:
    """Return the package's vmlinuz and the kernel release its modules are built for."""
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    releases = sorted(path.name for path in (tree / "lib" / "modules").glob("*"))
    if len(images) != 1 or len(releases) != 1:
        raise GuestBuildError(
            f"{tree} should hold one boot/vmlinuz-* and one lib/modules/* (found"
            f" {len(images)} and {len(releases)}): delete {tree} and retry"
        )
    return images[0], releases[0]


def _module_files(tree: Path, version: str) -> dict[str, Path]:
    """Map each wanted module that exists as a file to its path, in load order."""
    root = tree / "lib" / "modules" / version
    available = {_module_name(path): path for path in (root / "kernel").rglob("*.ko*")}
    builtin = {_module_name(Path(line)) for line in _read_lines(root / "modules.builtin")}
    missing = [m for m in REQUIRED_MODULES if m not in available and m not in builtin]
    if missing:
        raise GuestBuildError(
            f"kernel {version} in {tree} has no module {', '.join(missing)}: the tiny guest"
            f" needs it; {KERNEL_METAPACKAGE} may have changed, so update REQUIRED_MODULES"
        )
    wanted = REQUIRED_MODULES + OPTIONAL_MODULES + ON_DEMAND_MODULES
    return {name: available[name] for name in wanted if name in available}


def _module_name(path: Path) -> str:
    """Return the module name of `x/y/virtio-net.ko.xz`: `virtio_net`."""
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _read_lines(path: Path) -> list[str]:
    """Return the non-empty lines of a text file, or none if it does not exist."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def _module_bytes(path: Path) -> bytes:
    """Return the module as insmod wants it: busybox insmod cannot read compressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise GuestBuildError(
        f"{path}: modules compressed this way cannot be unpacked with the Python standard"
        " library; use a kernel package whose modules are plain, .xz or .gz"
    )


def _check_load_order(modules: Mapping[str, bytes]) -> None:
    """Fail at build time, not with "unknown symbol" at boot, if a module precedes its deps."""
    loaded: set[str] = set()
    for name, data in modules.items():
        found = re.search(rb"\0depends=([^\0]*)\0", data)
        needed = found.group(1).decode().split(",") if found and found.group(1) else []
        if missing := [dep for dep in needed if dep not in loaded]:
            raise GuestBuildError(
                f"module {name} needs {', '.join(missing)} loaded before it: add it ahead of"
                f" {name} in REQUIRED_MODULES (emu_tests/guest.py)"
            )
        loaded.add(name)


def _busybox_binary(cache: Path) -> Path:
    """Return a static x86-64 busybox: the host's if it is one, else the Debian package's."""
    if HOST_BUSYBOX.is_file() and _is_static_x86_64(HOST_BUSYBOX.read_bytes()):
        return HOST_BUSYBOX
    packaged = _unpacked_package(cache, BUSYBOX_PACKAGE) / "bin" / "busybox"
    if not _is_static_x86_64(packaged.read_bytes()):
        raise GuestBuildError(f"{packaged} is not a static x86-64 executable; delete it")
    return packaged


def _is_static_x86_64(elf: bytes) -> bool:
    """Tell whether an ELF file is x86-64 and needs no dynamic loader (no PT_INTERP)."""
    if elf[:5] != b"\x7fELF\x02" or int.from_bytes(elf[0x12:0x14], "little") != 0x3E:
        return False
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    types = (elf[phoff + i * phentsize : phoff + i * phentsize + 4] for i in range(phnum))
    return all(int.from_bytes(kind, "little") != 3 for kind in types)


def _initramfs(cache: Path, busybox: Path, modules: Mapping[str, bytes]) -> Path:
    """Return the cached initramfs for these inputs, writing it if it is not there yet."""
    files = _initramfs_files(busybox, modules)
    digest = hashlib.sha256(BUILDER_VERSION.encode())
    for name, (_, data) in files.items():
        digest.update(f"\0{name}\0{len(data)}\0".encode())
        digest.update(data)
    target = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if not target.exists():
        archive = gzip.compress(_newc_archive(files), compresslevel=9, mtime=0)
        _write_atomically(target, archive)
    return target


# Directories, symlinks and device nodes of the image; files come from _initramfs_files().
_SKELETON: tuple[tuple[str, int, bytes], ...] = (
    ("bin", 0o040755, b""),
    ("dev", 0o040755, b""),
    ("etc", 0o040755, b""),
    ("lib", 0o040755, b""),
    ("lib/modules", 0o040755, b""),
    ("proc", 0o040555, b""),
    ("root", 0o040700, b""),
    ("run", 0o040755, b""),
    ("sys", 0o040555, b""),
    ("tmp", 0o041777, b""),
    ("usr", 0o040755, b""),
    ("sbin", 0o120777, b"bin"),
    ("usr/bin", 0o120777, b"../bin"),
    ("usr/sbin", 0o120777, b"../bin"),
)
# The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
_CONSOLE = ("dev/console", 0o020600, (5, 1))


def _initramfs_files(busybox: Path, modules: Mapping[str, bytes]) -> dict[str, tuple[int, bytes]]:
    """Return every regular file of the image: path to (mode, content)."""
    load_order = "".join(f"{name}\n" for name in REQUIRED_MODULES + OPTIONAL_MODULES)
    on_demand = "".join(f"{name}\n" for name in ON_DEMAND_MODULES if name in modules)
    files = {
        "init": (0o100755, INIT_SCRIPT.read_bytes()),
        "bin/busybox": (0o100755, busybox.read_bytes()),
        "lib/modules/load-order": (0o100644, load_order.encode()),
        "lib/modules/on-demand": (0o100644, on_demand.encode()),
    }
    for name, data in modules.items():
        files[f"lib/modules/{name}.ko"] = (0o100644, data)
    return files


def _newc_archive(files: Mapping[str, tuple[int, bytes]]) -> bytes:
    """Return a newc ("070701") cpio archive of the skeleton, /dev/console and `files`."""
    out = bytearray()
    entries = [(name, mode, data, (0, 0)) for name, mode, data in _SKELETON]
    entries.append((_CONSOLE[0], _CONSOLE[1], b"", _CONSOLE[2]))
    entries += [(name, mode, data, (0, 0)) for name, (mode, data) in files.items()]
    for inode, (name, mode, data, rdev) in enumerate(entries, start=1):
        out += _newc_entry(inode, name, mode, data, rdev)
    out += _newc_entry(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def _newc_entry(inode: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    """Return one newc record: header, NUL-terminated name and data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    links = 2 if mode & 0o170000 == 0o040000 else 1
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (inode, mode, 0, 0, links, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % field for field in fields)
    return _padded(header + encoded) + _padded(data)


def _padded(chunk: bytes) -> bytes:
    """Pad to a multiple of 4 bytes with NULs, as newc wants for headers and data."""
    return chunk + b"\0" * (-len(chunk) % 4)


def _write_atomically(target: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half an image."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as temp:
        temp.write(data)
    os.chmod(temp.name, 0o644)
    os.replace(temp.name, target)


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) the tiny guest and print its kernel, initrd and version as JSON."""
    parser = argparse.ArgumentParser(prog="python -m emu_tests.guest", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    try:
        guest = build_tiny_guest(args.cache_dir)
    except GuestBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    paths = {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "version": guest.version}
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
