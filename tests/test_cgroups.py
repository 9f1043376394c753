"""emucore.cgroups: finding the hierarchy, and real groups with real quotas on this host.

The tests with real groups need a cgroup this host lets us write (root, a writable cgroup
file system); they skip, saying why, where there is none (``cgroup_hierarchy``). Finding
the hierarchy is also tested on made-up mount tables and directories: a cgroup v2
hierarchy with the cpu controller cannot exist on a host whose cpu controller is bound to
v1, as here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from emucore.cgroups import (
    PARENT,
    CgroupError,
    Hierarchy,
    find_hierarchy,
    make_group,
)


@pytest.fixture
def group_name(cgroup_hierarchy: Hierarchy) -> Iterator[str]:
    """A name for a test group; whatever the test leaves under it is removed after."""
    name = f"test-{uuid.uuid4()}"
    yield name
    asyncio.run(cgroup_hierarchy.group(name).remove())


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that sleeps until killed (killed after the test in any case)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def cgroup_of(pid: int, hierarchy: Hierarchy) -> str:
    """The path of ``pid``'s cgroup in ``hierarchy``, from ``/proc/<pid>/cgroup``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        if (hierarchy.version == 2 and number == "0") or "cpu" in names:
            return path
    raise AssertionError(f"no cpu cgroup for {pid}")


def test_a_group_holds_a_busy_process_to_its_quota(
    cgroup_hierarchy: Hierarchy, group_name: str
) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        group = asyncio.run(make_group(cgroup_hierarchy, group_name))
        group.set_quota(30)
        assert group.quota_percent() == 30  # read back from the kernel's own file
        group.add(busy.pid)
        assert group.pids() == [busy.pid]
        assert cgroup_of(busy.pid, cgroup_hierarchy) == f"/{PARENT}/{group_name}"
        used, began = group.usage(), time.monotonic()
        time.sleep(3)  # a measurement window, not a wait for something to happen
        used_after, ended = group.usage(), time.monotonic()
        assert used is not None
        assert used_after is not None
        share = (used_after - used) / (ended - began)
        assert 0.15 < share < 0.33, share  # the kernel's usage counter, not the setting
    finally:
        busy.kill()
        busy.wait()


def test_dissolve_lets_the_processes_run_on_outside_and_removes_the_group(
    cgroup_hierarchy: Hierarchy, group_name: str, sleeper: subprocess.Popen[bytes]
) -> None:
    group = asyncio.run(make_group(cgroup_hierarchy, group_name))
    group.add(sleeper.pid)
    own = cgroup_of(os.getpid(), cgroup_hierarchy)
    asyncio.run(group.dissolve())
    assert not group.exists()
    assert sleeper.poll() is None
    assert cgroup_of(sleeper.pid, cgroup_hierarchy) == own  # back where it was born


def test_a_leftover_group_is_emptied_and_removed_before_a_new_one_is_made(
    cgroup_hierarchy: Hierarchy, group_name: str, sleeper: subprocess.Popen[bytes]
) -> None:
    leftover = asyncio.run(make_group(cgroup_hierarchy, group_name))
    leftover.set_quota(10)
    leftover.add(sleeper.pid)
    fresh = asyncio.run(make_group(cgroup_hierarchy, group_name))
    assert sleeper.wait(10) == -signal.SIGKILL
    assert fresh.pids() == []
    assert fresh.quota_percent() == 0  # a new group, not the old one


def test_remove_kills_no_process_that_is_not_in_the_group(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pid read from cgroup.procs may be reused by a stranger before it is killed: the
    reuse is made here by a group whose cgroup.procs lists a process that is not in it (a
    made-up v1 hierarchy in a temporary directory: no kernel file to lie)."""
    group = Hierarchy(1, tmp_path, tmp_path).group("node")
    group.path.mkdir(parents=True)
    (group.path / "cgroup.procs").write_text(f"{sleeper.pid}\n")
    monkeypatch.setattr(Path, "rmdir", lambda self: None)  # not a cgroup: nothing to remove
    assert asyncio.run(group.remove(timeout=5)) == []
    assert sleeper.poll() is None  # spared


def test_an_empty_leftover_is_removed(cgroup_hierarchy: Hierarchy, group_name: str) -> None:
    group = asyncio.run(make_group(cgroup_hierarchy, group_name))
    assert group.exists()
    assert asyncio.run(group.remove()) == []
    assert not group.exists()
    assert asyncio.run(group.remove()) == []  # removing what is not there is fine


def test_a_group_under_a_chosen_root(cgroup_hierarchy: Hierarchy, group_name: str) -> None:
    chosen = find_hierarchy(cgroup_hierarchy.root / PARENT)
    assert chosen.version == cgroup_hierarchy.version
    assert chosen.mount == cgroup_hierarchy.mount
    group = asyncio.run(make_group(chosen, group_name))
    try:
        assert group.path == cgroup_hierarchy.root / PARENT / PARENT / group_name
        group.set_quota(20)
        assert group.quota_percent() == 20
    finally:
        asyncio.run(group.remove())
        (cgroup_hierarchy.root / PARENT / PARENT).rmdir()


# -- finding the hierarchy in made-up mount tables ------------------------------------------


def mounts_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def cgroup_dir(path: Path, controllers: str = "") -> Path:
    """A directory standing in for a v2 cgroup (see the module docstring for why)."""
    path.mkdir(parents=True)
    (path / "cgroup.controllers").write_text(controllers + "\n")
    return path


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../../x", "", "a\0b", "x" * 201])
def test_a_group_name_that_is_not_one_directory_under_emu_is_refused(
    tmp_path: Path, name: str
) -> None:
    hierarchy = Hierarchy(1, tmp_path, tmp_path)
    with pytest.raises(CgroupError, match="cannot name a cgroup"):
        hierarchy.group(name)
    assert hierarchy.group("node-1.a_b").path == tmp_path / PARENT / "node-1.a_b"


def test_v2_wins_where_it_has_the_cpu_controller(tmp_path: Path) -> None:
    v2 = cgroup_dir(tmp_path / "unified", "cpuset cpu io memory")
    mounts = mounts_file(
        tmp_path,
        f"cgroup {tmp_path}/cpu cgroup rw,relatime,cpu 0 0",
        f"cgroup2 {v2} cgroup2 rw,nosuid 0 0",
    )
    assert find_hierarchy(mounts=mounts) == Hierarchy(2, v2, v2, v2, v2)


def test_v1_where_the_cpu_controller_is_bound_to_it(tmp_path: Path) -> None:
    v2 = cgroup_dir(tmp_path / "unified", "hugetlb")  # a hybrid host, as this one
    mounts = mounts_file(
        tmp_path,
        f"cgroup2 {v2} cgroup2 rw 0 0",
        f"cgroup {tmp_path}/cpuset cgroup rw,cpuset 0 0",
        f"cgroup {tmp_path}/cpuacct cgroup rw,cpuacct 0 0",
        f"cgroup {tmp_path}/cpu cgroup rw,relatime,cpu 0 0",
    )
    cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
    found = find_hierarchy(mounts=mounts)
    assert found == Hierarchy(1, cpu, cpu, acct, acct)
    group = found.group("n1")
    assert group.directories == (cpu / PARENT / "n1", acct / PARENT / "n1")


def test_v1_with_cpu_and_cpuacct_mounted_together(tmp_path: Path) -> None:
    both = tmp_path / "cpu,cpuacct"
    mounts = mounts_file(tmp_path, f"cgroup {both} cgroup rw,cpu,cpuacct 0 0")
    found = find_hierarchy(mounts=mounts)
    assert found == Hierarchy(1, both, both, both, both)
    assert found.group("n1").directories == (both / PARENT / "n1",)


def test_an_escaped_mount_point(tmp_path: Path) -> None:
    v2 = cgroup_dir(tmp_path / "a b", "cpu")
    mounts = mounts_file(tmp_path, f"cgroup2 {tmp_path}/a\\040b cgroup2 rw 0 0")
    assert find_hierarchy(mounts=mounts).root == v2


def test_no_cpu_controller_anywhere(tmp_path: Path) -> None:
    v2 = cgroup_dir(tmp_path / "unified", "memory pids")
    mounts = mounts_file(
        tmp_path,
        f"cgroup2 {v2} cgroup2 rw 0 0",
        "proc /proc proc rw 0 0",
        "cgroup /x cgroup rw,pids 0 0",
    )
    with pytest.raises(CgroupError, match="no cgroup hierarchy with a cpu controller"):
        find_hierarchy(mounts=mounts)


def test_a_chosen_root_must_be_a_cgroup_with_the_cpu_controller(tmp_path: Path) -> None:
    v2 = cgroup_dir(tmp_path / "unified", "cpu")
    child = cgroup_dir(v2 / "delegated", "memory")
    mounts = mounts_file(tmp_path, f"cgroup2 {v2} cgroup2 rw 0 0")
    with pytest.raises(CgroupError, match=r"not a directory of a mounted cgroup file system"):
        find_hierarchy(tmp_path / "elsewhere", mounts=mounts)
    with pytest.raises(CgroupError, match=r"delegated: the cpu controller is not available"):
        find_hierarchy(child, mounts=mounts)
    (child / "cgroup.controllers").write_text("cpu memory\n")
    assert find_hierarchy(child, mounts=mounts) == Hierarchy(2, child, v2, child, v2)


def test_nothing_is_written_where_there_is_no_cgroup(tmp_path: Path) -> None:
    # A made-up v1 hierarchy: a plain directory has no interface files, and emu creates none.
    root = tmp_path / "cpu"
    root.mkdir()
    mounts = mounts_file(tmp_path, f"cgroup {root} cgroup rw,cpu 0 0")
    group = asyncio.run(make_group(find_hierarchy(mounts=mounts), "n1"))
    with pytest.raises(CgroupError, match=r"cannot read .*cpu\.cfs_period_us"):
        group.set_quota(50)
    with pytest.raises(CgroupError, match=r"cannot write '1' to .*cgroup\.procs"):
        group.add(1)
    assert sorted(p.name for p in group.path.iterdir()) == []
