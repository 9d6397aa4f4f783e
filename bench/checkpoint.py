"""Checkpoint benchmark: a 1,000-file worktree with 10 changed files per checkpoint.

Corral's checkpointer (the real actor's checkpoint path: temporary index, write-tree,
commit-tree, create-only update-ref, numstat, and `checkpoint.created` stored in JetStream)
is measured beside the raw git plumbing alone (temporary index + write-tree + commit-tree +
update-ref) on the same worktree in the same run, alternating, after the same edits.

    .venv/bin/python bench/checkpoint.py [--files 1000] [--changed 10] [--rounds 40]
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.bus import connect_bus
from actors.checkpointer import Checkpointer, _Execution
from bench.common import print_result
from corral.server import EmbeddedServer
from events.ids import new_execution_id
from events.stream import ensure_event_stream

IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {})}, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_worktree(root: Path, files: int) -> tuple[Path, Path, str]:
    repo = root / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    for i in range(files):
        d = repo / f"pkg{i % 20}"
        d.mkdir(exist_ok=True)
        (d / f"module_{i}.py").write_text("".join(f"line {j} of module {i}\n" for j in range(40)))
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "base", cwd=repo, env=IDENTITY)
    base = sh("git", "rev-parse", "HEAD", cwd=repo)
    worktree = root / "worktree"
    sh("git", "worktree", "add", "-q", "-b", "corral/bench", str(worktree), base, cwd=repo)
    return repo, worktree, base


def edit(worktree: Path, round_no: int, changed: int, files: int) -> None:
    for k in range(changed):
        i = (round_no * changed + k) % files
        path = worktree / f"pkg{i % 20}" / f"module_{i}.py"
        with path.open("a") as f:
            f.write(f"edit {round_no}\n")


def raw_checkpoint(worktree: Path, index: Path, parent: str, n: int) -> str:
    env = {"GIT_INDEX_FILE": str(index)}
    sh("git", "add", "-A", cwd=worktree, env=env)
    tree = sh("git", "write-tree", cwd=worktree, env=env)
    commit = sh("git", "commit-tree", tree, "-p", parent, "-m", f"raw {n}", cwd=worktree, env=IDENTITY)
    sh("git", "update-ref", f"refs/raw/{n}", commit, cwd=worktree)
    return commit


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo, worktree, base = make_worktree(tmp, args.files)
        server = EmbeddedServer(tmp / "nats", log_file=tmp / "nats.log").start()
        try:
            bus = await connect_bus(server.url)
            await ensure_event_stream(bus.js)
            checkpointer = Checkpointer(bus, state_dir=tmp / "state")
            checkpointer.caught_up.set()
            ex = _Execution(new_execution_id(), worktree=worktree, repo=str(repo), base_commit=base, started=True)
            raw_index = tmp / "raw.index"
            sh(
                "cp",
                sh("git", "rev-parse", "--path-format=absolute", "--git-path", "index", cwd=worktree),
                str(raw_index),
                cwd=tmp,
            )
            raw_parent = base
            corral_ms: list[float] = []
            raw_ms: list[float] = []
            # One warm-up each (first index fill), then alternate.
            edit(worktree, 0, args.changed, args.files)
            raw_parent = raw_checkpoint(worktree, raw_index, raw_parent, 0)
            await checkpointer.checkpoint(ex, "interval", None)
            for r in range(1, args.rounds + 1):
                edit(worktree, r, args.changed, args.files)
                started = time.perf_counter()
                raw_parent = await asyncio.to_thread(raw_checkpoint, worktree, raw_index, raw_parent, r)
                raw_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                snap = await checkpointer.checkpoint(ex, "interval", None)
                corral_ms.append((time.perf_counter() - started) * 1000)
                if snap is None or len(snap.files) != args.changed:
                    raise SystemExit(f"unexpected checkpoint: {snap}")
                if r % 10 == 0:
                    print(f"  {r}/{args.rounds} rounds", file=sys.stderr, flush=True)
            await bus.close()
        finally:
            server.stop()
    raw_p50, corral_p50 = statistics.median(raw_ms), statistics.median(corral_ms)
    print(f"checkpoint of a {args.files}-file worktree, {args.changed} changed files, {args.rounds} rounds")
    print(f"  raw git plumbing (tmp index + write-tree + commit-tree + update-ref): p50 {raw_p50:.1f} ms")
    print(f"  corral checkpointer (+ numstat + checkpoint.created stored):         p50 {corral_p50:.1f} ms")
    print(f"  ratio corral/raw: {corral_p50 / raw_p50:.2f}x (target <= 1.5x)")
    ratio = corral_p50 / raw_p50
    print_result(
        "checkpoint",
        "p50_ms",
        corral_p50,
        "baseline_p50_ms",
        raw_p50,
        ratio=ratio,
        target="<= 1.5x the raw git plumbing (p50)",
        met=ratio <= 1.5,
        files=args.files,
        changed=args.changed,
        rounds=args.rounds,
    )


if __name__ == "__main__":
    asyncio.run(main())
