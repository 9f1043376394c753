"""CPU quotas for child processes, by the kernel's control groups (cgroup v2 or v1).

A group is a directory ``<hierarchy>/emu/<name>`` of a cgroup file system:

* cgroup v2 (one hierarchy whose ``cgroup.controllers`` lists ``cpu``): the quota is
  ``cpu.max`` (``<quota µs> <period µs>``, or ``max``), the usage ``usage_usec`` in
  ``cpu.stat``. The cpu controller reaches the group through ``+cpu`` in the
  ``cgroup.subtree_control`` of the hierarchy's root and of ``emu/``, which therefore never
  holds a process itself (v2 allows processes in leaves only, the root excepted).
* cgroup v1 (one hierarchy per controller): the quota is ``cpu.cfs_quota_us`` against
  ``cpu.cfs_period_us`` (``-1``: none) in the ``cpu`` hierarchy; the usage is
  ``cpuacct.usage`` (ns), in the same directory when ``cpu,cpuacct`` are mounted together,
  else in a group of the same name in the ``cpuacct`` hierarchy.

v2 is preferred where its cpu controller is available; on hybrid hosts the controller is
bound to v1 and v2 does not list it. Writing a pid to ``cgroup.procs`` moves all the
threads of that process at once (the kernel holds off thread creation meanwhile); threads
created later are born in the group, and so are children. A group without processes is
removed with ``rmdir``.

Leftovers: a group outlives a host that died. Its processes die with the host, but the
directory stays, so the caller names groups to find them again (a node's id) and
:func:`make_group` removes a leftover of the same name first. Whatever is still in it was
put there by emu or descends from such a process (membership, unlike a pid, cannot pass to
a stranger), so it is killed.

This module registers no hooks and names no emulator: an emulator plugin uses it, and a
plugin that makes a group for a node's emulator before the start stores it under
:data:`NODE_CGROUP`, where the emulator's process module finds it right after the spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

import attrs

from emucore.process import kill_and_wait
from emucore.stash import StashKey

PARENT = "emu"
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses less
MOUNTS = Path("/proc/self/mounts")
OWN_CGROUPS = Path("/proc/self/cgroup")


class CgroupError(Exception):
    """No cgroup could be found, made, written or removed; the message says which and why."""


@attrs.frozen
class Hierarchy:
    """Where this host's CPU quotas can live.

    :ivar version: 2 or 1.
    :ivar root: the directory ``emu/`` is made in (a v2 cgroup, or v1's ``cpu`` hierarchy).
    :ivar mount: the mount point of ``root``'s hierarchy.
    :ivar usage_root: the directory holding the usage counters' ``emu/``: ``root`` itself
        (v2, or v1 with ``cpu,cpuacct`` together), v1's ``cpuacct`` hierarchy, or ``None``.
    :ivar usage_mount: the mount point of ``usage_root``'s hierarchy.
    """

    version: int
    root: Path
    mount: Path
    usage_root: Path | None = None
    usage_mount: Path | None = None

    @property
    def label(self) -> str:
        """``cgroup v2`` or ``cgroup v1``."""
        return f"cgroup v{self.version}"

    def group(self, name: str) -> CpuGroup:
        """The group ``emu/<name>`` (which may not exist).

        :raises CgroupError: ``name`` is empty, holds ``/``, starts with ``.`` (``..``
            included) or is longer than 200 characters.
        """
        return CpuGroup(self, name)

    def describe(self, name: str = "<name>") -> str:
        """Where the quota and the usage live, for messages and ``emu check``.

        :param name: what stands for a group's name.
        """
        where = f"{self.label}: CPU quota in {self.root / PARENT / name}"
        if self.usage_root is not None and self.usage_root != self.root:
            where += f", usage in {self.usage_root / PARENT / name}"
        return where


def _unescape(field: str) -> str:
    # /proc/self/mounts writes a space as \040, a tab as \011, a backslash as \134.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _cgroup_mounts(mounts: Path) -> list[tuple[Path, str, set[str]]]:
    """(mount point, ``cgroup`` or ``cgroup2``, options) of each cgroup file system."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {mounts}: {exc.strerror}") from None
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            found.append((Path(_unescape(fields[1])), fields[2], set(fields[3].split(","))))
    return found


def _controllers(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def find_hierarchy(root: Path | None = None, mounts: Path = MOUNTS) -> Hierarchy:
    """The hierarchy CPU quotas go into: v2 if its cpu controller is available, else v1.

    Nothing is written; :func:`make_group` finds out whether the host may write there.

    :param root: a cgroup directory chosen by the host (e.g. a subtree delegated to its
        user); by default the root of the mounted hierarchy.
    :param mounts: the mount table to read.
    :raises CgroupError: no usable hierarchy, or ``root`` is not a cgroup with a cpu controller.
    """
    cgroup_mounts = _cgroup_mounts(mounts)
    if root is not None:
        return _hierarchy_at(root, cgroup_mounts)
    for mount, kind, _ in cgroup_mounts:
        if kind == "cgroup2" and "cpu" in _controllers(mount):
            return Hierarchy(2, mount, mount, mount, mount)
    v1 = [(mount, options) for mount, kind, options in cgroup_mounts if kind == "cgroup"]
    cpu = next((mount for mount, options in v1 if "cpu" in options), None)
    acct = next((mount for mount, options in v1 if "cpuacct" in options), None)
    if cpu is not None:
        return Hierarchy(1, cpu, cpu, acct, acct)
    raise CgroupError("no cgroup hierarchy with a cpu controller is mounted")


def _hierarchy_at(root: Path, cgroup_mounts: list[tuple[Path, str, set[str]]]) -> Hierarchy:
    owners = [m for m in cgroup_mounts if root == m[0] or m[0] in root.parents]
    if not owners or not root.is_dir():
        raise CgroupError(f"{root} is not a directory of a mounted cgroup file system")
    mount, kind, options = max(owners, key=lambda m: len(m[0].parts))
    if kind == "cgroup2":
        if "cpu" not in _controllers(root):
            raise CgroupError(
                f"{root}: the cpu controller is not available there (enable it with +cpu in"
                " the cgroup.subtree_control of its parent)"
            )
        return Hierarchy(2, root, mount, root, mount)
    if "cpu" not in options:
        raise CgroupError(f"{root} is not in a cgroup v1 hierarchy with the cpu controller")
    usage = root if "cpuacct" in options else None
    return Hierarchy(1, root, mount, usage, mount if usage else None)


def _write(path: Path, text: str) -> None:
    # Never O_CREAT: a missing interface file means this is no cgroup, not a file to make.
    try:
        descriptor = os.open(path, os.O_WRONLY)
        try:
            os.write(descriptor, text.encode())
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise CgroupError(f"cannot write {text!r} to {path}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot make the cgroup {path}: {exc.strerror}") from None


def _enable_cpu(directory: Path) -> None:
    """v2: let the children of ``directory`` use the cpu controller."""
    if "cpu" not in _read(directory / "cgroup.subtree_control").split():
        _write(directory / "cgroup.subtree_control", "+cpu")


@attrs.frozen
class CpuGroup:
    """The group ``emu/<name>`` of a hierarchy: a CPU quota for the processes put in it.

    :ivar hierarchy: where it lives.
    :ivar name: its name under ``emu/``.
    """

    hierarchy: Hierarchy
    name: str = attrs.field()

    @name.validator
    def _check_name(self, _: object, name: str) -> None:
        # The name becomes a directory under emu/: never another place, nor a hidden one.
        if not name or name.startswith(".") or "/" in name or "\0" in name or len(name) > 200:
            raise CgroupError(
                f"{name!r} cannot name a cgroup: use 1-200 characters, no '/', no leading '.'"
            )

    @property
    def path(self) -> Path:
        """The group's directory (the one holding the quota)."""
        return self.hierarchy.root / PARENT / self.name

    @property
    def usage_path(self) -> Path | None:
        """The directory holding the usage counter (may be :attr:`path` itself)."""
        usage_root = self.hierarchy.usage_root
        return None if usage_root is None else usage_root / PARENT / self.name

    @property
    def directories(self) -> tuple[Path, ...]:
        """Every directory of the group: one per hierarchy it spans."""
        usage = self.usage_path
        if usage is None or usage == self.path:
            return (self.path,)
        return (self.path, usage)

    def exists(self) -> bool:
        """Whether any directory of the group exists."""
        return any(directory.is_dir() for directory in self.directories)

    def set_quota(self, percent: int) -> None:
        """Let the group's processes use ``percent`` % of one CPU (0: no limit).

        :raises CgroupError: the quota could not be written.
        """
        if self.hierarchy.version == 2:
            quota = max(MIN_QUOTA_US, percent * PERIOD_US // 100)
            _write(self.path / "cpu.max", f"{quota} {PERIOD_US}" if percent else f"max {PERIOD_US}")
            return
        period = int(_read(self.path / "cpu.cfs_period_us"))
        quota = max(MIN_QUOTA_US, percent * period // 100)
        _write(self.path / "cpu.cfs_quota_us", str(quota) if percent else "-1")

    def quota_percent(self) -> int:
        """The quota in force, read back from the kernel, in % of one CPU (0: none)."""
        if self.hierarchy.version == 2:
            quota, period = _read(self.path / "cpu.max").split()
            return 0 if quota == "max" else round(int(quota) * 100 / int(period))
        quota_us = int(_read(self.path / "cpu.cfs_quota_us"))
        period_us = int(_read(self.path / "cpu.cfs_period_us"))
        return 0 if quota_us < 0 else round(quota_us * 100 / period_us)

    def add(self, pid: int) -> None:
        """Move process ``pid``, all its threads, into the group (again: a no-op).

        :raises CgroupError: the host may not, or the process is gone.
        """
        for directory in self.directories:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """The processes in the group (none when it does not exist)."""
        found: set[int] = set()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        return sorted(found)

    def usage(self) -> float | None:
        """CPU seconds used by the group's processes so far, by the kernel's own counter;
        ``None`` where the hierarchy has none."""
        usage = self.usage_path
        if usage is None:
            return None
        if self.hierarchy.version == 2:
            for line in _read(usage / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return None
        return int(_read(usage / "cpuacct.usage")) / 1e9

    async def remove(self, timeout: float = 5.0) -> list[int]:
        """Kill what is left in the group, wait for it, remove the group (bounded).

        cgroup v2's ``cgroup.kill`` kills by membership where the kernel has it (5.14);
        elsewhere each pid is held by a pidfd and killed only if ``/proc/<pid>/cgroup``
        still names this group then, so a reused pid is never killed.

        :return: the pids killed.
        :raises CgroupError: the group could not be removed.
        """
        pids = self.pids()
        if pids and self.hierarchy.version == 2 and (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1")  # by membership: no pid can be reused
            await self._rmdir(timeout)
            return pids
        killed = []
        for pid in pids:
            # A pid read from cgroup.procs may be reused before the pidfd holds it: the
            # process the pidfd holds is killed only if it is still in this group.
            with contextlib.suppress(ProcessLookupError):
                killed.append(await kill_and_wait(pid, timeout, self._holds))
        await self._rmdir(timeout)
        return killed

    def _holds(self, pid: int) -> bool:
        """Whether ``/proc/<pid>/cgroup`` names this group."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        suffix = f"/{PARENT}/{self.name}"
        return any(line.endswith(suffix) for line in lines)

    async def dissolve(self, timeout: float = 5.0) -> None:
        """Move the group's processes back to the host's own cgroup, then remove the group.

        The processes keep running, without a quota.

        :raises CgroupError: a process could not be moved or the group not be removed.
        """
        homes = [_own_cgroup(self.hierarchy.mount, self.hierarchy.version)]
        if self.usage_path not in (None, self.path) and self.hierarchy.usage_mount is not None:
            homes.append(_own_cgroup(self.hierarchy.usage_mount, self.hierarchy.version))
        for pid in self.pids():
            for home in homes:
                try:
                    _write(home / "cgroup.procs", str(pid))
                except CgroupError:
                    if Path(f"/proc/{pid}").exists():  # else it exited meanwhile: fine
                        raise
        await self._rmdir(timeout)

    async def _rmdir(self, timeout: float) -> None:
        # A killed process leaves its group during its exit: allow a few retries.
        deadline = asyncio.get_running_loop().time() + timeout
        for directory in self.directories:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        raise CgroupError(f"cannot remove {directory}: {exc.strerror}") from None
                    await asyncio.sleep(0.02)


def _own_cgroup(mount: Path, version: int) -> Path:
    """This process's cgroup in the hierarchy mounted at ``mount`` (from /proc/self/cgroup)."""
    mounts = {m: options for m, _, options in _cgroup_mounts(MOUNTS)}
    wanted = mounts.get(mount, set())
    for line in _read(OWN_CGROUPS).splitlines():
        number, controllers, path = line.split(":", 2)
        listed = set(controllers.split(",")) if controllers else set()
        if (version == 2 and number == "0" and not listed) or (version == 1 and listed & wanted):
            return mount / path.lstrip("/")
    raise CgroupError(f"this process has no cgroup in the hierarchy at {mount}")


def prepare_parent(hierarchy: Hierarchy) -> None:
    """Make ``emu/`` in each hierarchy and, on v2, hand the cpu controller down to it.

    :raises CgroupError: the host may not (not root, read-only cgroup file system, or a v2
        cgroup that holds processes and so cannot hand controllers down).
    """
    if hierarchy.version == 2:
        _enable_cpu(hierarchy.root)
    _mkdir(hierarchy.root / PARENT)
    if hierarchy.version == 2:
        _enable_cpu(hierarchy.root / PARENT)
    if hierarchy.usage_root is not None and hierarchy.usage_root != hierarchy.root:
        _mkdir(hierarchy.usage_root / PARENT)


async def make_group(hierarchy: Hierarchy, name: str, timeout: float = 5.0) -> CpuGroup:
    """Make the group ``emu/<name>``, first removing a leftover of that name (see above).

    :param hierarchy: where (see :func:`find_hierarchy`).
    :param name: a name that identifies its owner across host restarts (a node's id).
    :param timeout: seconds to wait for a leftover's processes to die.
    :raises CgroupError: it could not be made.
    """
    group = hierarchy.group(name)
    await group.remove(timeout)
    prepare_parent(hierarchy)
    for directory in group.directories:
        _mkdir(directory)
    return group


async def probe(hierarchy: Hierarchy) -> None:
    """Make, limit, read and remove a throwaway group: whether quotas work here.

    :raises CgroupError: they do not, saying why.
    """
    group = await make_group(hierarchy, f"probe-{os.getpid()}")
    try:
        group.set_quota(50)
        if group.quota_percent() != 50:
            raise CgroupError(f"{group.path}: the quota written did not read back")
        group.usage()
    finally:
        await group.remove()


NODE_CGROUP = StashKey[CpuGroup]()
"""The group a plugin made for a node's emulator before ``emu_start``. The emulator's
process module adds the process right after spawning it, before any guest code runs; the
plugin that made the group checks, and adds it itself if needed, once the emulator runs."""
