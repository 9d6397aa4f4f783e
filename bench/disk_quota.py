"""Disk quota benchmark: making an execution's worktree with and without a kernel quota.

The spawner's path (actors/worktree.py `add_worktree` and `remove_worktree`) on a repository of
`--files` files, alternating in the same run: `git worktree add` alone, and image + mkfs.ext4 +
loop mount + `git worktree add` into it (actors/diskquota.py). Removal is timed too.

    .venv/bin/python bench/disk_quota.py [--files 200] [--rounds 20] [--disk 1G]
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import diskquota
from actors.worktree import add_worktree, remove_worktree
from bench.common import print_result
from corral.config import parse_size


def make_repo(path: Path, files: int) -> str:
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True)
    for i in range(files):
        (path / f"f{i:05}.txt").write_text(f"file {i}\n" * 20)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    env = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", *env, "commit", "-q", "-m", "base"], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(values) * 1000:6.1f} ms  p95 {p95 * 1000:6.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--disk", default="1G")
    args = parser.parse_args()
    if diskquota.unavailable():
        print(f"no kernel quota here: {diskquota.unavailable()}")
        print_result("disk_quota", "add_p50_ms", None, "baseline_add_p50_ms", None, ratio=None, target="none", met=None)
        raise SystemExit(1)
    limit = parse_size(args.disk)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        commit = make_repo(repo, args.files)
        worktrees = Path(tmp) / "home" / "worktrees"
        add: dict[str, list[float]] = {"plain": [], "quota": []}
        remove: dict[str, list[float]] = {"plain": [], "quota": []}
        for n in range(args.rounds):
            for kind in ("plain", "quota"):
                path = worktrees / f"{kind}{n}"
                started = time.perf_counter()
                await add_worktree(
                    repo, path, branch=f"b/{kind}{n}", commit=commit, disk_bytes=limit if kind == "quota" else None
                )
                add[kind].append(time.perf_counter() - started)
                assert diskquota.is_mounted(path) == (kind == "quota")
                started = time.perf_counter()
                await remove_worktree(repo, path, branch=f"b/{kind}{n}")
                remove[kind].append(time.perf_counter() - started)
        print(f"{args.rounds} rounds, {args.files} files, --disk {args.disk}")
        for kind in ("plain", "quota"):
            print(f"  add {kind:5}  {ms(add[kind])}    remove {kind:5}  {ms(remove[kind])}")
        extra = statistics.median(add["quota"]) - statistics.median(add["plain"])
        print(f"  the quota adds {extra * 1000:.1f} ms (p50) to making a worktree")
        quota, plain = statistics.median(add["quota"]) * 1000, statistics.median(add["plain"]) * 1000
        print_result(
            "disk_quota",
            "add_p50_ms",
            quota,
            "baseline_add_p50_ms",
            plain,
            ratio=quota / plain,
            target="none (the quota's cost is reported)",
            met=None,
            remove_p50_ms=statistics.median(remove["quota"]) * 1000,
            baseline_remove_p50_ms=statistics.median(remove["plain"]) * 1000,
            files=args.files,
            rounds=args.rounds,
        )


if __name__ == "__main__":
    asyncio.run(main())
