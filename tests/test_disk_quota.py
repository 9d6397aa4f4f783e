"""Disk quotas the kernel enforces (issue 15, item 4), tried as a hostile agent would.

Real loop-mounted ext4 images (actors/diskquota.py), real `corral up` and `corral run` agents,
real git. The agents write past `--disk` and must be *stopped* (ENOSPC inside the agent) and
recorded (`limit.exceeded`, limit `disk`), not just noticed afterwards. Nothing may be left:
no mount in /proc/mounts, no image. Checkpoints must not copy a huge file into `.git`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from actors import diskquota
from actors.limits import disk_usage
from tests.conftest import Cli
from tests.test_control import detach, events, start_up, status, stop_up, wait_state, wait_until
from tests.test_control import up as up  # the fixture

MB = 1 << 20

pytestmark = pytest.mark.skipif(
    diskquota.unavailable() is not None, reason=f"no kernel disk quota here: {diskquota.unavailable()}"
)


def mounted_at(path: Path) -> bool:
    """Whether /proc/mounts lists a mount at path (what an operator would check)."""
    target = os.path.realpath(path)
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_text().splitlines())


def allocated(root: Path) -> int:
    """Bytes the files under root occupy (st_blocks), the worktree's .git link included."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def disk_events(cli: Cli, execution_id: str) -> list[dict[str, Any]]:
    return [
        data
        for e in events(cli, execution_id)
        if e["type"] == "limit.exceeded" and (data := json.loads(e["data"]))["limit"] == "disk"
    ]


def logs(cli: Cli, execution_id: str) -> str:
    return cli("logs", execution_id, check=True).stdout


def prune_all(cli: Cli) -> None:
    done = cli("worktrees", "prune", "--older-than", "0s", "--force", "--json")
    assert done.returncode == 0, done.stderr


# --- the module, on its own ---------------------------------------------------------------------


def test_an_image_holds_the_limit_and_goes_without_a_trace(tmp_path: Path) -> None:
    worktrees = tmp_path / "home" / "worktrees"
    for limit in (1 * MB, 100 * MB, 3 << 30):
        worktree = worktrees / "quota"
        image = diskquota.create(worktree, limit)
        assert image == tmp_path / "home" / "disks" / "quota.img"
        assert mounted_at(worktree) and list(worktree.iterdir()) == []  # lost+found removed: git wants it empty
        _, usable = diskquota.usage(worktree)
        assert limit < usable <= limit + max(16 * 4096, limit // 2000), (limit, usable)  # about the limit
        assert image.stat().st_blocks * 512 < 8 * MB  # sparse: the size is not taken from the host's disk
        assert image.stat().st_mode & 0o777 == 0o600  # it holds the worktree: for Corral's user only
        assert diskquota.quota_mounts(tmp_path) == [worktree]
        assert diskquota.release(worktree)
        assert not mounted_at(worktree) and not worktree.exists() and not image.exists()
    assert diskquota.release(worktrees / "never-made") is False


def test_without_root_the_quota_is_polled_and_status_says_so() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that is not root any more (its effective uid), asking afresh
        try:
            os.close(read)
            os.setegid(65534)
            os.seteuid(65534)
            reason = diskquota.unavailable.__wrapped__()
            answer = f"{reason}\n{diskquota.POLLED if reason else diskquota.KERNEL}"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer.splitlines() == ["not root: loop mounts need CAP_SYS_ADMIN", "polled every 2 s"]
    assert diskquota.describe() == "kernel quota (loop ext4)"


# --- hostile agents under corral run -------------------------------------------------------------

FALLOCATE = """
import errno, os, time
fd = os.open("big.bin", os.O_CREAT | os.O_WRONLY)
try:
    os.posix_fallocate(fd, 0, 2 << 30)
    print("fallocate: 2 GB allocated", flush=True)
except OSError as exc:
    print("fallocate failed:", errno.errorcode[exc.errno], flush=True)
time.sleep(600)
"""


def test_fallocate_of_2_gb_under_100m_fails_with_enospc(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, "--disk", "100M", "--", sys.executable, "-c", FALLOCATE)
    paused = wait_state(cli, execution_id, "paused", timeout=60)  # the documented reaction: paused at the quota
    assert paused["disk"] == "kernel quota (loop ext4)"
    worktree = Path(paused["worktree"])
    assert mounted_at(worktree)
    assert "fallocate failed: ENOSPC" in logs(cli, execution_id)
    big = worktree / "big.bin"
    assert big.stat().st_size <= 100 * MB + MB and big.stat().st_blocks * 512 <= 100 * MB + MB  # not 2 GB
    assert allocated(worktree) <= 100 * MB + MB
    [exceeded] = disk_events(cli, execution_id)[:1]
    assert exceeded["maximum"] == 100 * MB and 100 * MB < exceeded["value"] <= 100 * MB + MB
    cli("cancel", execution_id, "--grace", "0", check=True)
    wait_state(cli, execution_id, "exited", "cancelled")
    # the worktree is kept after the run, mount included; removing it removes both
    assert mounted_at(worktree)
    prune_all(cli)
    assert not mounted_at(worktree) and not worktree.exists()
    assert list((cli.home / "disks").iterdir()) == []
    assert not any(str(worktree) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())


DD_LOOP = (
    "i=0; while dd if=/dev/zero of=f$i bs=1M count=8 status=none 2>&1; do i=$((i+1)); done; "
    'echo "dd stopped after $i files"; sleep 600'
)


def test_dd_in_a_loop_stops_at_the_limit(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, "--disk", "50M", "--", "sh", "-c", DD_LOOP)
    paused = wait_state(cli, execution_id, "paused", timeout=60)
    worktree = Path(paused["worktree"])
    output = wait_until(lambda: "dd stopped" in (text := logs(cli, execution_id)) and text, 30, "dd to stop")
    assert "No space left on device" in str(output)
    assert 45 * MB < allocated(worktree) <= 50 * MB + MB  # the limit, not a byte of the next 8 MB chunk
    assert disk_events(cli, execution_id)[0]["maximum"] == 50 * MB
    cli("cancel", execution_id, "--grace", "0", check=True)
    wait_state(cli, execution_id, "exited", "cancelled")
    prune_all(cli)
    assert not mounted_at(worktree) and not (cli.home / "disks" / f"{execution_id}.img").exists()


def test_a_quota_worktree_is_a_worktree_and_comes_back_after_a_reboot(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        agent = "echo kept > kept.txt; echo 'line two' >> README.md"
        done = cli("run", "--repo", str(repo), "--disk", "20M", "--", "sh", "-c", agent)
        assert done.returncode == 0, done.stderr
        execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
        shown = status(cli, execution_id)
        worktree = Path(shown["worktree"])
        assert shown["disk"] == "kernel quota (loop ext4)" and mounted_at(worktree)
        # checkpoints, diff and changes read it like any worktree
        diff = cli("diff", execution_id, check=True).stdout
        assert "+kept" in diff and "+line two" in diff
        changed = {row["path"] for row in json.loads(cli("changes", execution_id, "--json", check=True).stdout)}
        assert {"kept.txt", "README.md"} <= changed
        # a reboot: the mount is gone, the image is not; `corral up` mounts it again
        stop_up(cli, up)
        subprocess.run(["umount", str(worktree)], check=True)
        assert not mounted_at(worktree) and not (worktree / "kept.txt").exists()
        up = start_up(cli)
        wait_until(lambda: mounted_at(worktree), 30, "corral up to remount the image")
        assert (worktree / "kept.txt").read_text() == "kept\n"
        porcelain = subprocess.run(["git", "status", "--porcelain"], cwd=worktree, capture_output=True, text=True)
        assert "kept.txt" in porcelain.stdout
        # and so does the next `corral worktrees`, without corral up
        subprocess.run(["umount", str(worktree)], check=True)
        rows = json.loads(cli("worktrees", "--json", check=True).stdout)
        assert mounted_at(worktree)
        [row] = [r for r in rows if r["execution_id"] == execution_id]
        assert row["uncommitted_files"] == 2 and row["problem"] is None
    finally:
        stop_up(cli, up)
    prune_all(cli)
    assert not mounted_at(worktree) and list((cli.home / "disks").iterdir()) == []


# --- checkpoints never copy a huge file into .git --------------------------------------------------

HUGE = """
import os, time
chunk = os.urandom(1 << 20)  # 300 different-looking MiB for zlib: a repeat 1 MiB apart is beyond its window
with open("huge.bin", "wb") as f:
    for _ in range(300):
        f.write(chunk)
with open("small.txt", "w") as f:
    f.write("small\\n")
print("written", flush=True)
time.sleep(600)
"""


def test_a_pause_checkpoint_leaves_a_300_mb_file_out_of_git(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    git_dir = repo / ".git"
    before = disk_usage(git_dir)
    execution_id = detach(cli, repo, "--disk", "400M", "--", sys.executable, "-c", HUGE)
    wait_until(lambda: "written" in logs(cli, execution_id), 60, "the agent to write its files")
    cli("pause", execution_id, check=True)

    def pause_checkpoint() -> dict[str, Any] | None:
        for e in events(cli, execution_id):
            if e["type"] == "checkpoint.created" and (data := json.loads(e["data"]))["trigger"] == "pause":
                return dict(data)
        return None

    checkpoint = wait_until(pause_checkpoint, 60, "the pause checkpoint")
    assert isinstance(checkpoint, dict)
    assert checkpoint["skipped"] == [{"path": "huge.bin", "size": 300 * MB}]
    assert [f["path"] for f in checkpoint["files"]] == ["small.txt"]
    tree = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", checkpoint["commit"]], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    assert "small.txt" in tree and "huge.bin" not in tree

    def flagged() -> list[dict[str, Any]]:
        return [
            v
            for e in events(cli, execution_id)
            if e["type"] == "validation.failed" and json.loads(e["data"])["checkpoint"] == checkpoint["n"]
            for v in json.loads(e["data"])["violations"]
        ]

    violations = wait_until(flagged, 60, "the validator's verdict")
    assert isinstance(violations, list)
    [size_rule] = [v for v in violations if v["rule"] == "max_file_size"]
    assert size_rule["path"] == "huge.bin" and size_rule["severity"] == "warning"
    # a diff of the live worktree stages it too: it must not copy the file either
    assert "small.txt" in cli("diff", execution_id, check=True).stdout
    assert disk_usage(git_dir) - before < 10 * MB  # not 300 MB more
    cli("cancel", execution_id, "--grace", "0", check=True)


def test_an_agent_that_dies_of_its_enospc_still_leaves_the_quota_on_record(
    cli: Cli, repo: Path, up: subprocess.Popen[str]
) -> None:
    crash = "open('big.bin', 'wb').write(b'x' * 4_000_000)"  # OSError: the agent ends before any poll
    done = cli("run", "--repo", str(repo), "--disk", "1M", "--", sys.executable, "-c", crash)
    assert done.returncode == 1 and "No space left on device" in done.stderr, done.stderr
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
    kinds = [e["type"] for e in events(cli, execution_id)]
    assert kinds.index("limit.exceeded") < kinds.index("execution.exited")
    [exceeded] = disk_events(cli, execution_id)
    assert exceeded["maximum"] == MB < exceeded["value"]


def test_the_agent_cannot_unmount_or_grow_its_quota(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    images = cli.home / "disks"
    escape = (
        'umount "$PWD" 2>&1; echo "umount rc=$?"; '
        f'truncate -s 10G {images}/*.img 2>&1; echo "truncate rc=$?"; '
        "dd if=/dev/zero of=fill bs=1M count=64 status=none 2>&1; echo dd rc=$?; sleep 600"
    )
    execution_id = detach(cli, repo, "--disk", "20M", "--", "sh", "-c", escape)
    paused = wait_state(cli, execution_id, "paused", timeout=60)  # the quota held: full, recorded, paused
    worktree = Path(paused["worktree"])
    output = str(wait_until(lambda: "dd rc=" in (text := logs(cli, execution_id)) and text, 30, "the agent's tries"))
    assert "umount rc=0" not in output and "truncate rc=0" not in output, output
    assert "No space left on device" in output
    assert mounted_at(worktree)
    [image] = list(images.iterdir())
    assert image.stat().st_size < 40 * MB  # not grown to 10G
    assert allocated(worktree) <= 20 * MB + MB
    cli("cancel", execution_id, "--grace", "0", check=True)


def test_where_no_loop_mount_can_be_made_the_quota_is_polled(cli: Cli, repo: Path) -> None:
    cli.env[diskquota.ENV] = "poll"  # what a machine without root or loop devices gets
    up = start_up(cli)
    try:
        execution_id = detach(
            cli, repo, "--disk", "10M", "--", "sh", "-c", "head -c 30000000 /dev/zero > big.bin; sleep 600"
        )
        paused = wait_state(cli, execution_id, "paused", timeout=60)
        assert paused["disk"] == "polled every 2 s"
        worktree = Path(paused["worktree"])
        assert not mounted_at(worktree) and not (cli.home / "disks").exists()
        assert (worktree / "big.bin").stat().st_size == 30_000_000  # after the fact: the poll pauses, nothing refuses
        [exceeded] = disk_events(cli, execution_id)
        assert exceeded["value"] > exceeded["maximum"] == 10 * MB
        cli("cancel", execution_id, "--grace", "0", check=True)
    finally:
        stop_up(cli, up)


def test_cancelled_while_its_worktree_is_made_leaves_no_mount_or_image(
    cli: Cli, repo: Path, up: subprocess.Popen[str]
) -> None:
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\nsleep 4\n")  # `git worktree add` runs it: the add (into the mount) takes 4 s
    hook.chmod(0o755)
    execution_id = detach(cli, repo, "--disk", "20M", "--spawn-timeout", "1s", "--", "true")
    final = wait_state(cli, execution_id, "exited")
    assert final["exit_reason"] == "cancelled"
    worktree = cli.home / "worktrees" / execution_id
    assert not worktree.exists() and not mounted_at(worktree)
    assert list((cli.home / "disks").iterdir()) == []
