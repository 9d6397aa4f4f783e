"""Resource limits and disk usage, with real child processes and real files."""

import math
import os
import select
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from actors import limits
from actors.limits import (
    PER_PROCESS,
    CgroupLimit,
    CgroupV1Limit,
    cgroup_v1_available,
    cgroup_v2_available,
    describe_limits,
    disk_usage,
    execution_group,
    group_paths,
    make_preexec,
    remove_groups,
)

PY = sys.executable
MB = 1024 * 1024
ALLOCATE = (
    "import sys\n"
    "try:\n"
    "    big = b'x' * (1024 * 1024 * 1024)\n"
    "    print('allocated 1GB')\n"
    "except MemoryError:\n"
    "    print('MemoryError')\n"
    "small = b'y' * (10 * 1024 * 1024)\n"
    "print('allocated 10MB', len(small))\n"
)


def run_child(code: str, preexec: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [PY, "-c", code], preexec_fn=preexec, capture_output=True, text=True, timeout=60
    )


def test_nothing_to_apply_gives_none() -> None:
    assert make_preexec(None, None) is None


@pytest.mark.parametrize(("memory", "cpus"), [(0, None), (-1, None), (None, 0), (None, -0.5), (None, float("nan"))])
def test_bad_values_are_rejected(memory: int | None, cpus: float | None) -> None:
    with pytest.raises(ValueError, match=r"must be (a )?positive"):
        make_preexec(memory, cpus)


def test_memory_limit_fails_big_allocations_only() -> None:
    result = run_child(ALLOCATE, make_preexec(200 * MB, None))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["MemoryError", f"allocated 10MB {10 * MB}"]


def test_memory_limit_is_set_hard_in_the_child() -> None:
    code = "import resource\nprint(*resource.getrlimit(resource.RLIMIT_AS))\n"
    result = run_child(code, make_preexec(200 * MB, None))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(200 * MB), str(200 * MB)]


def test_without_limit_the_allocation_works() -> None:
    # The control for the test above: this machine can allocate 1 GB when nothing limits it.
    result = run_child(ALLOCATE, None)
    if "MemoryError" in result.stdout:
        pytest.skip("this machine cannot allocate 1 GB even without a limit")
    assert result.stdout.splitlines()[0] == "allocated 1GB"


def _allowed() -> set[int]:
    return os.sched_getaffinity(0)


@pytest.mark.parametrize("cpus", [0.5, 1, 1.5, 2.5])
def test_affinity_gives_ceil_cpus(cpus: float) -> None:
    allowed = _allowed()
    if len(allowed) < 2:
        pytest.skip("only one CPU: affinity cannot be narrowed")
    if math.ceil(cpus) >= len(allowed):
        pytest.skip(f"ceil({cpus}) covers all {len(allowed)} CPUs of this machine: nothing to narrow")
    result = run_child("import os\nprint(*sorted(os.sched_getaffinity(0)))\n", make_preexec(None, cpus))
    assert result.returncode == 0, result.stderr
    got = {int(x) for x in result.stdout.split()}
    assert len(got) == math.ceil(cpus)
    assert got <= allowed


def test_affinity_covering_every_cpu_changes_nothing() -> None:
    allowed = _allowed()
    assert make_preexec(None, float(len(allowed))) is None
    assert make_preexec(None, len(allowed) + 3.0) is None


def test_memory_and_cpus_together() -> None:
    allowed = _allowed()
    if len(allowed) < 2:
        pytest.skip("only one CPU: affinity cannot be narrowed")
    code = "import os, resource\nprint(len(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_AS)[0])\n"
    result = run_child(code, make_preexec(300 * MB, 1))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", str(300 * MB)]


def test_describe_limits() -> None:
    if cgroup_v2_available():
        assert describe_limits() == "cgroup v2"
    elif cgroup_v1_available():
        assert describe_limits() == "cgroup v1 (memory, cpu, pids, freezer)"
    else:
        assert describe_limits() == PER_PROCESS == "per process (rlimit+affinity)"


def test_cpu_max_value() -> None:
    assert CgroupLimit.cpu_max(1.5) == "150000 100000"
    assert CgroupLimit.cpu_max(0.25) == "25000 100000"
    assert CgroupLimit.cpu_max(0.001) == "1000 100000"  # the kernel's minimum quota


@pytest.mark.skipif(
    not cgroup_v2_available(),
    reason="cgroup v2 is not usable here (no unified hierarchy at /sys/fs/cgroup, or no writable "
    "group with the memory and cpu controllers; set CORRAL_CGROUP to a delegated group)",
)
def test_cgroup_limit_applies_and_cleans_up() -> None:
    group = CgroupLimit(f"corral-test-{uuid.uuid4().hex[:8]}", memory_bytes=200 * MB, cpus=0.5)
    try:
        assert (group.path / "memory.max").read_text().strip() == str(200 * MB)
        assert (group.path / "cpu.max").read_text().strip() == "50000 100000"
        # joined before exec: the child reports its own cgroup, then touches 1 GB and is OOM-killed
        code = "print(open('/proc/self/cgroup').read().strip(), flush=True)\nbig = b'x' * (1024 * 1024 * 1024)\n"
        result = run_child(code, group.join_preexec())
        assert result.stdout.strip().endswith("/" + group.path.name)
        assert result.returncode == -signal.SIGKILL
        # a running process moved in with add()
        sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
        try:
            group.add(sleeper.pid)
            assert sleeper.pid in group.pids()
        finally:
            group.close()  # kills what is left, removes the group
            sleeper.wait(timeout=30)
        assert sleeper.returncode == -signal.SIGKILL
        assert not group.path.exists()
    finally:
        if group.path.exists():
            group.close()


@pytest.mark.skipif(
    Path("/sys/fs/cgroup/cgroup.controllers").is_file(), reason="unified hierarchy: availability depends on delegation"
)
def test_no_unified_hierarchy_means_v1_or_rlimits() -> None:
    assert not cgroup_v2_available()
    assert describe_limits() == (CgroupV1Limit.description if cgroup_v1_available() else PER_PROCESS)


# cgroup v1 (this machine's): real groups, real processes

needs_v1 = pytest.mark.skipif(
    not cgroup_v1_available(),
    reason="cgroup v1 is not usable here (no memory, cpu, pids and freezer hierarchies mounted under "
    "/sys/fs/cgroup that this user may create groups in)",
)
FORK_TREE = (
    "import os, sys, time\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "print('forked', flush=True)\n"
    "time.sleep(60)\n"
)


def _name() -> str:
    return f"corral-test-{uuid.uuid4().hex[:8]}"


@needs_v1
def test_v1_group_applies_every_limit_and_cleans_up() -> None:
    group = CgroupV1Limit(_name(), memory_bytes=100 * MB, cpus=0.5, pids_max=20)
    try:
        assert {p.parent.name for p in group.paths} == {"corral"}
        memory, cpu, pids = group.dirs["memory"], group.dirs["cpu"], group.dirs["pids"]
        assert int((memory / "memory.limit_in_bytes").read_text()) == 100 * MB
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (pids / "pids.max").read_text().strip() == "20"
        # joined before exec in every hierarchy; 300 MB of touched memory: the OOM killer ends it
        code = "print(open('/proc/self/cgroup').read(), flush=True)\nbig = b'x' * (300 * 1024 * 1024)\n"
        result = run_child(code, group.join_preexec())
        for controller in ("memory", "cpu", "pids", "freezer"):
            assert any(
                controller in line.split(":")[1].split(",") and line.endswith("/corral/" + group.dirs["pids"].name)
                for line in result.stdout.splitlines()
            ), result.stdout
        assert result.returncode == -signal.SIGKILL
        assert group.oom_kills() >= 1
        assert group.memory_peak() is not None and group.memory_peak() <= 100 * MB  # type: ignore[operator]
        # 30 forks under pids.max 20: refused past it, counted
        forks = (
            "import os, time\nn = 0\ntry:\n    for _ in range(30):\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
            "print(n, flush=True)\n"
        )
        forker = subprocess.Popen([PY, "-c", forks], preexec_fn=group.join_preexec(), stdout=subprocess.PIPE, text=True)
        assert forker.stdout is not None and int(forker.stdout.readline()) < 20
        assert group.pids_refused() >= 1
        assert group.pids()  # the sleeping children
    finally:
        group.close()
    assert not any(path.exists() for path in group.paths)
    assert not group.pids()


@needs_v1
def test_v1_oom_eventfd_turns_readable_at_an_oom_kill_only() -> None:
    group = CgroupV1Limit(_name(), memory_bytes=64 * MB)
    try:
        fd = group.oom_events()
        assert fd is not None and group.oom_events() == fd  # made once
        small = run_child("big = b'x' * (8 * 1024 * 1024)\n", group.join_preexec())
        assert small.returncode == 0
        assert select.select([fd], [], [], 0.5)[0] == []  # no OOM, no event
        big = run_child("big = b'x' * (300 * 1024 * 1024)\n", group.join_preexec())
        assert big.returncode == -signal.SIGKILL
        assert select.select([fd], [], [], 10)[0] == [fd], "no event from the kernel after an OOM kill"
        assert os.eventfd_read(fd) >= 1 and group.oom_kills() >= 1
    finally:
        group.close()
    assert group.oom_events() is None  # closed with the group
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


@needs_v1
def test_v1_freeze_stops_a_forking_tree_at_once_and_kill_leaves_nothing() -> None:
    group = CgroupV1Limit(_name(), pids_max=200)
    child = subprocess.Popen(
        [PY, "-c", FORK_TREE, "20"], preexec_fn=group.join_preexec(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "forked\n"
        assert group.freeze()
        members = sorted(group.pids())
        assert len(members) == 21
        assert all(Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "D" for pid in members)
        group.thaw()
        assert not group.frozen()
        assert group.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
        assert group.pids() == []
    finally:
        group.close()


@needs_v1
def test_remove_groups_kills_and_removes_what_a_dead_shim_left() -> None:
    group = execution_group(_name(), 200 * MB, 1.0, 100)
    assert isinstance(group, CgroupV1Limit)
    assert sorted(group.paths) == sorted(group_paths(group.dirs["pids"].name))
    child = subprocess.Popen(
        [PY, "-c", FORK_TREE, "5"], preexec_fn=group.join_preexec(), stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "forked\n"
    assert remove_groups(group.paths) == []
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not any(path.exists() for path in group.paths)
    assert remove_groups(group.paths) == []  # already gone: nothing to do


# disk usage


def _blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_disk_usage_of_known_files(tmp_path: Path) -> None:
    root = tmp_path / "wt"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(MB))
    (root / "sub" / "b.bin").write_bytes(os.urandom(300 * 1024))
    (root / "sub" / "deeper" / "c.txt").write_text("hello\n")
    (root / "empty").mkdir()
    paths = [
        root,
        root / "sub",
        root / "sub" / "deeper",
        root / "empty",
        root / "a.bin",
        root / "sub" / "b.bin",
        root / "sub" / "deeper" / "c.txt",
    ]
    expected = sum(_blocks(p) for p in paths)
    assert expected >= MB + 300 * 1024
    assert disk_usage(root) == expected


def test_disk_usage_counts_hard_links_once_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "wt"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(4 * MB))
    (root / "a.bin").write_bytes(os.urandom(MB))
    before = disk_usage(root) - _blocks(root)  # the directory itself may grow with entries
    os.link(root / "a.bin", root / "a-link.bin")
    (root / "to-big").symlink_to(outside / "big.bin")
    (root / "to-outside").symlink_to(outside, target_is_directory=True)
    after = disk_usage(root) - _blocks(root)
    assert after == before + _blocks(root / "to-big") + _blocks(root / "to-outside")
    assert after < 2 * MB  # neither the second link nor the 4 MB behind the symlinks


def test_disk_usage_of_a_sparse_file_is_what_it_occupies(tmp_path: Path) -> None:
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(100 * MB)
    assert disk_usage(tmp_path) < MB


@pytest.mark.skipif(shutil.which("du") is None, reason="no du(1)")
def test_disk_usage_agrees_with_du(tmp_path: Path) -> None:
    # A small tree with some variety; du -sxB1 is the reference.
    root = tmp_path / "wt"
    for i in range(30):
        d = root / f"d{i % 5}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(i * 1000))
    os.link(root / "d1" / "e1" / "f1", root / "d2" / "hard")
    (root / "d3" / "sym").symlink_to(root / "d1")
    du = subprocess.run(["du", "-sxB1", str(root)], capture_output=True, text=True, check=True)
    assert disk_usage(root) == int(du.stdout.split()[0])


def test_disk_usage_of_missing_path_and_of_a_file(tmp_path: Path) -> None:
    assert disk_usage(tmp_path / "nope") == 0
    (tmp_path / "f").write_bytes(os.urandom(50_000))
    assert disk_usage(tmp_path / "f") == _blocks(tmp_path / "f")


# cgroup v2's freezer and kill, where a v2 hierarchy is mounted at all (a hybrid set-up's
# /sys/fs/cgroup/unified has no resource controllers, but freezes and kills like any v2 group)

UNIFIED = next(
    (p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")) if (p / "cgroup.controllers").is_file()),
    None,
)


@pytest.mark.skipif(
    UNIFIED is None or not os.access(UNIFIED, os.W_OK), reason="no writable cgroup v2 hierarchy mounted"
)
def test_v2_group_freezes_and_kills_a_forking_tree() -> None:
    assert UNIFIED is not None
    hybrid = Path("/sys/fs/cgroup/unified") == UNIFIED
    base = UNIFIED if hybrid else (limits._cgroup_base() or UNIFIED)  # on a v2 machine: our own group
    try:
        group = CgroupLimit(_name(), base=base)
    except OSError as exc:
        pytest.skip(f"cannot make a v2 group in {base}: {exc}")
    child = subprocess.Popen(
        [PY, "-c", FORK_TREE, "10"], preexec_fn=group.join_preexec(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "forked\n"
        assert group.freeze() and group.frozen()
        assert len(group.pids()) == 11
        group.thaw()
        assert not group.frozen()
        assert group.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        group.close()
    assert not group.path.exists()
