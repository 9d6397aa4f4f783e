"""Validate a checkpoint of N changed files: Corral's validator path vs the raw `git diff-tree` call alone.

Builds a real repository with a base commit and a checkpoint commit changing N files (a realistic
mix: source edits, new files, a dependency manifest, an executable, a symlink), then times, in the
same run and alternating:

- baseline: `git diff-tree -r -p --no-renames PARENT COMMIT` as a subprocess, output read, nothing else;
- cold: Corral's validation as the validator runs it (the trees compared and the changed blobs
  read from the object store, line counts from the checkpoint's numstat, every policy rule,
  git's own files compared) with an empty finding cache;
- spawned: the same with one `git diff-tree --raw -p` process per checkpoint (the previous way);
- warm: the same with the per-file cache filled (the checkpoint validated again, e.g. redelivered);
- in-process: parsing and every rule alone, on the git output captured once (no subprocess).

Prints p50 / p90 of each and the ratio to the baseline. Target: p50 <= 10 ms at N = 100.

    python bench/validate.py [--files 100] [--runs 200]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.checkpoints import parse_numstat
from actors.gitobjects import ObjectReader
from actors.policy import (
    FindingCache,
    Policy,
    git_diff_args,
    git_protection_paths,
    git_tampering,
    parse_diff,
    read_diff,
)
from bench.common import print_result


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=b@example.com", "-c", "user.name=b", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def build(root: Path, files: int) -> tuple[Path, str, str]:
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    src = repo / "src"
    src.mkdir()
    for i in range(files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}\n\n" for j in range(20))
        (src / f"mod{i}.py").write_text(body)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD")
    edited = files - 4
    for i in range(edited):
        path = src / f"mod{i}.py"
        path.write_text(path.read_text().replace("return x * 3\n", "return x * 3 + 1  # changed\n") + "# tail\n")
    (repo / "requirements.txt").write_text("requests==2.32.3\n")
    tool = repo / "tool.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (repo / "link").symlink_to("src/mod0.py")
    (repo / "NOTES.md").write_text("# notes\n" + "line\n" * 30)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "checkpoint")
    return repo, base, git(repo, "rev-parse", "HEAD")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo, base, commit = build(Path(tmp), args.files)
        policy = Policy()
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        baseline_cmd = ["git", "diff-tree", "-r", "-p", "--no-renames", base, commit]
        snapshot = git_protection_paths(repo)

        def baseline() -> None:
            subprocess.run(baseline_cmd, cwd=repo, capture_output=True, env=env, check=True)

        reader = ObjectReader(repo)
        # The checkpoint event carries its numstat (the checkpointer computes it anyway).
        numstat = parse_numstat(git(repo, "diff-tree", "-r", "--numstat", "--no-renames", base, commit))
        stats = {f.path: (f.added, f.deleted) for f in numstat}

        def validate(cache: FindingCache, *, spawn: bool = False) -> int:
            if spawn:
                changes = read_diff(repo, base, commit)
            else:
                changes = reader.diff(
                    base,
                    commit,
                    stats=stats,
                    known=lambda c: policy.file_key(c) in cache,
                )
            violations = policy.check_files(changes, cache=cache)
            violations += [policy.violation(f) for f in git_tampering(snapshot, git_protection_paths(repo))]
            return len(changes)

        diff_text = subprocess.run(
            git_diff_args(base, commit), cwd=repo, capture_output=True, env=env, check=True
        ).stdout.decode()

        def in_process() -> None:  # Corral's own work: parse and evaluate, the git output given
            policy.check_files(parse_diff(diff_text), cache=FindingCache())

        changed = validate(FindingCache())
        warm_cache = FindingCache()
        validate(warm_cache)
        times: dict[str, list[float]] = {"baseline": [], "cold": [], "warm": [], "spawned": [], "in-process": []}
        for _ in range(5):  # warm-up
            baseline()
            validate(FindingCache())
        for _ in range(args.runs):
            for name in times:
                started = time.perf_counter()
                if name == "baseline":
                    baseline()
                elif name == "in-process":
                    in_process()
                elif name == "spawned":
                    validate(FindingCache(), spawn=True)
                else:
                    validate(FindingCache() if name == "cold" else warm_cache)
                times[name].append((time.perf_counter() - started) * 1000)
        reader.close()
    base_p50 = statistics.median(times["baseline"])
    print(f"checkpoint: {changed} changed files, {args.runs} runs each, Python {sys.version.split()[0]}")
    print(f"{'path':<10} {'p50 ms':>8} {'p90 ms':>8} {'ratio (p50)':>12}")
    for name in times:
        p50 = statistics.median(times[name])
        print(f"{name:<10} {p50:8.2f} {pct(times[name], 0.9):8.2f} {p50 / base_p50:11.2f}x")
    cold = statistics.median(times["cold"])
    print(f"target p50 <= 10 ms for 100 files: {'met' if cold <= 10 else 'NOT met'} (cold {cold:.2f} ms)")
    print_result(
        "validate",
        "cold_p50_ms",
        cold,
        "baseline_p50_ms",
        base_p50,
        ratio=cold / base_p50,
        target="cold p50 <= 10 ms (100 files)",
        met=cold <= 10,
        warm_p50_ms=statistics.median(times["warm"]),
        files=changed,
        runs=args.runs,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
