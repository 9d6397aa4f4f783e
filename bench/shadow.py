"""Shadow workspace benchmark: what a checkpoint and a promotion cost with `workspace = "shadow"`.

A 1,000-file worktree; each round the agent changed 10 files. Measured in the same run,
alternating:

- direct: the checkpoint's tree of a worktree holding the 10 changes (temporary index,
  `git add -A`, write-tree), what a `direct` execution pays;
- shadow: the same tree built from the clean worktree plus an upper layer holding the 10 changes
  (actors/shadow.py `merged_tree`), what a shadow checkpoint pays;
- promotion: writing the 10 validated files from that tree into the worktree (`promote`).

The upper layer is a plain directory here (no mount is needed to read it, as the checkpointer
reads it on the host). The ratio is shadow / direct (lower is better).

    .venv/bin/python bench/shadow.py [--files 1000] [--changed 10] [--rounds 30]
"""

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import shadow
from actors.checkpoints import snapshot_tree_skipping
from bench.common import print_result

IDENTITY = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]


def make_worktree(root: Path, files: int) -> tuple[Path, Path]:
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for i in range(files):
        d = repo / f"d{i % 20}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), *IDENTITY, "commit", "-qm", "init"], check=True)
    direct = root / "worktrees" / "direct"
    shadowed = root / "worktrees" / "shadow1"
    for wt, branch in ((direct, "a"), (shadowed, "b")):
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "-b", branch, str(wt)], check=True)
    return direct, shadowed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        direct, shadowed = make_worktree(root, args.files)
        layers = shadow.prepare(shadowed)
        upper = shadow.upper_of(layers)
        direct_ms, shadow_ms, promote_ms = [], [], []
        for n in range(args.rounds):
            names = [f"d{(n + k) % 20}/f{(n * args.changed + k) % args.files}.txt" for k in range(args.changed)]
            for name in names:
                (direct / name).write_text(f"round {n}\n")
                (upper / name).parent.mkdir(parents=True, exist_ok=True)
                (upper / name).write_text(f"round {n}\n")
            started = time.perf_counter()
            await snapshot_tree_skipping(direct, root / "direct.index", max_file_bytes=0)
            direct_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            tree, _ = await shadow.merged_tree(shadowed, root / "shadow.index", layers, max_file_bytes=0)
            shadow_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            done, _ = await shadow.promote(shadowed, layers, root / "promoted.index", tree, set())
            promote_ms.append((time.perf_counter() - started) * 1000)
            assert sorted(done) == sorted(set(names)), (done, names)
        shutil.rmtree(layers, ignore_errors=True)
    d, s, p = (statistics.median(x) for x in (direct_ms, shadow_ms, promote_ms))
    print(f"{args.files} files, {args.changed} changed per round, {args.rounds} rounds (p50):")
    print(f"  direct checkpoint tree   {d:7.1f} ms")
    print(f"  shadow checkpoint tree   {s:7.1f} ms  ({s / d:.2f}x direct)")
    print(f"  promotion of the changes {p:7.1f} ms")
    print_result(
        "shadow",
        "shadow_tree_p50_ms",
        round(s, 2),
        "direct_tree_p50_ms",
        round(d, 2),
        ratio=round(s / d, 3),
        target="a shadow checkpoint costs at most 3x a direct one",
        met=s <= 3 * d,
        promote_p50_ms=round(p, 2),
    )


if __name__ == "__main__":
    asyncio.run(main())
