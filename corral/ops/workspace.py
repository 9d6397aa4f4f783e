"""An execution's worktree as the log records it, and its trees and file rows (no request sent):
shared by corral/ops/changes.py and corral/ops/shadow_view.py."""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.checkpoints import FileStat, git, snapshot_tree
from corral.errors import CorralError, NotFound, UsageError
from corral.home import Home


@dataclass
class Workspace:
    execution_id: str
    path: Path
    repo: Path
    branch: str
    base_commit: str
    checkpoints: list[dict[str, Any]]
    shadow: Path | None = None  # workspace = "shadow": its overlay's directory (corral/shadow_view.py)

    @property
    def present(self) -> bool:
        return self.path.is_dir()

    def checkpoint(self, text: str | None) -> tuple[int, str]:
        """(n, commit) of a checkpoint named on the command line; 0 is the base commit."""
        if text is None:
            raise UsageError("no checkpoint given")
        spec = text.strip().lstrip("#")
        if spec in ("base", "0"):
            return 0, self.base_commit
        if not spec.isdigit():
            raise UsageError(
                f"{text!r} is not a checkpoint number; `corral checkpoints {self.execution_id}` lists them"
            )
        n = int(spec)
        for cp in self.checkpoints:
            if cp["n"] == n:
                return n, str(cp["commit"])
        known = f"it has 1..{self.checkpoints[-1]['n']}" if self.checkpoints else "it has none yet"
        raise NotFound(f"{self.execution_id} has no checkpoint {n} ({known}; 0 = the base commit)")

    def relative_paths(self, paths: list[str]) -> list[str]:
        """Paths inside the worktree, relative to its root; anything outside is an error."""
        out = []
        root = self.path.resolve()
        for raw in paths:
            candidate = Path(raw)
            if not candidate.is_absolute():
                here = Path.cwd().resolve()
                candidate = (here / candidate) if root in (here, *here.parents) else (root / candidate)
            resolved = Path(os.path.normpath(candidate))
            if resolved != root and root not in resolved.parents:
                raise UsageError(f"{raw!r} is outside the worktree of {self.execution_id} ({root})")
            rel = resolved.relative_to(root).as_posix()
            if rel == ".git" or rel.startswith(".git/"):
                raise UsageError(f"{raw!r} is inside .git; Corral never touches it")
            out.append(rel or ".")
        return out


async def _live_tree(home: Home, ws: Workspace) -> str:
    """A tree of the worktree as it is now (written through a scratch index; nothing recorded)."""
    if not ws.present:
        if ws.checkpoints:
            return str(ws.checkpoints[-1]["tree"])
        raise CorralError(f"the worktree of {ws.execution_id} is gone and it has no checkpoint")
    home.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.tmp) as scratch:
        return await snapshot_tree(ws.path, Path(scratch) / "index")


def _file_rows(stats: list[FileStat], status: dict[str, str]) -> list[dict[str, Any]]:
    return [{"path": s.path, "status": status.get(s.path, "M"), "added": s.added, "deleted": s.deleted} for s in stats]


async def _name_status(repo: Path, old: str, new: str, paths: list[str] | None = None) -> dict[str, str]:
    args = ["diff-tree", "-r", "--name-status", "--no-renames", old, new]
    if paths:
        args += ["--", *paths]
    _, out, _ = await git(*args, cwd=repo)
    status = {}
    for line in out.splitlines():
        code, _, path = line.partition("\t")
        status[path] = code[:1]
    return status
