"""`corral changes` / `corral diff` of a shadow workspace (docs/shadow.md): promoted and pending apart.

The real worktree is the promoted state; what the agent sees is the worktree with its overlay's
upper layer over it (actors/shadow.py `merged_tree`). A change is *promoted* when the real
worktree has it, *pending* when only the upper layer has it (not validated yet, or held for an
approval). Nothing is recorded: the trees are written through scratch indexes.
"""

import tempfile
from pathlib import Path
from typing import Any

from actors.checkpoints import CheckpointError, numstat, unified_diff
from actors.shadow import merged_tree
from corral.errors import CorralError
from corral.home import Home
from corral.ops.workspace import Workspace, _file_rows, _live_tree, _name_status


async def trees(home: Home, ws: Workspace) -> tuple[str, str]:
    """(the promoted tree: the real worktree now, the tree the agent sees: with its upper layer)."""
    promoted = await _live_tree(home, ws)
    if not ws.present or ws.shadow is None or not ws.shadow.is_dir():
        return promoted, promoted
    home.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.tmp) as scratch:
        seen, _ = await merged_tree(ws.path, Path(scratch) / "index", ws.shadow, max_file_bytes=0)
    return promoted, seen


async def changed_files(home: Home, ws: Workspace, since: str, pending_only: bool) -> list[dict[str, Any]]:
    """Rows of `corral changes` with `state`: "promoted" (in the worktree) or "pending" (only in the
    agent's upper layer); from `since` to what the agent sees."""
    try:
        promoted, seen = await trees(home, ws)
        pending = {s.path for s in await numstat(ws.repo, promoted, seen)}
        rows = _file_rows(await numstat(ws.repo, since, seen), await _name_status(ws.repo, since, seen))
    except CheckpointError as exc:
        raise CorralError(f"cannot read the changes of {ws.execution_id}: {exc.reason}") from None
    for row in rows:
        row["state"] = "pending" if row["path"] in pending else "promoted"
    return [r for r in rows if r["state"] == "pending"] if pending_only else rows


async def diff_of(home: Home, ws: Workspace, old: str, paths: list[str], pending_only: bool) -> dict[str, Any]:
    """{execution_id, from, to, diff, pending, workspace}: `diff` from `old` to the promoted worktree,
    `pending` from the promoted worktree to what the agent sees; with `pending_only`, `diff` is that."""
    try:
        promoted, seen = await trees(home, ws)
        pending = await unified_diff(ws.repo, promoted, seen, paths)
        if pending_only:
            return {
                "execution_id": ws.execution_id,
                "from": promoted,
                "to": seen,
                "diff": pending,
                "workspace": "shadow",
            }
        text = await unified_diff(ws.repo, old, promoted, paths)
    except CheckpointError as exc:
        raise CorralError(f"cannot diff {ws.execution_id}: {exc.reason}") from None
    return {
        "execution_id": ws.execution_id,
        "from": old,
        "to": promoted,
        "diff": text,
        "pending": pending,
        "workspace": "shadow",
    }
