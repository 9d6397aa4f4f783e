"""An execution's worktree as the log knows it: checkpoints, changed files, diffs; checkpoint, commit
and rollback requests confirmed by the checkpointer."""

from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from actors.checkpointer import NOTHING_CHANGED
from actors.checkpoints import CheckpointError, numstat, unified_diff
from corral.errors import Conflict, CorralError, UsageError
from corral.home import Home
from corral.ops import shadow_view
from corral.ops.control import request_and_wait
from corral.ops.workspace import Workspace, _file_rows, _live_tree, _name_status
from corral.system import System
from events.subjects import STREAM, event_subject
from events.types import CheckpointRequested, CommitRequested, RollbackRequested
from replay.history import follow

ROLLBACK_TIMEOUT_S = 45.0


async def _stored(system: System, subject: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def on(seq: int, msg: Msg) -> None:
        found.append({**orjson.loads(msg.data), "seq": seq})

    await follow(system.bus.js, subject, on, stop_when_caught_up=True)
    return found


async def workspace(system: System, execution_id: str) -> Workspace:
    try:
        msg = await system.bus.js.get_last_msg(STREAM, event_subject(execution_id, "workspace.created"))
    except NotFoundError:
        raise CorralError(
            f"{execution_id} has no worktree (yet): it is queued, or failed before one was made; "
            f"`corral status {execution_id}` tells which"
        ) from None
    data = orjson.loads(msg.data or b"{}")["data"]
    checkpoints = [
        {**e["data"], "ts": e["ts"], "seq": e["seq"], "actor": e["actor"]}
        for e in await _stored(system, event_subject(execution_id, "checkpoint.created"))
    ]
    checkpoints.sort(key=lambda cp: cp["n"])
    return Workspace(
        execution_id,
        Path(data["path"]),
        Path(data["repo"]),
        data["branch"],
        data["base_commit"],
        checkpoints,
        Path(data["shadow"]) if data.get("shadow") else None,
    )


async def changed_files(
    home: Home, ws: Workspace, since_cp: str | None, *, pending: bool = False
) -> list[dict[str, Any]]:
    """Files changed from checkpoint `since_cp` (or the base commit) to the worktree as it is now."""
    _, since = ws.checkpoint(since_cp) if since_cp is not None else (0, ws.base_commit)
    if ws.shadow is not None:  # promoted and pending apart (docs/shadow.md)
        return await shadow_view.changed_files(home, ws, since, pending)
    try:
        now = await _live_tree(home, ws)
        stats = await numstat(ws.repo, since, now)
        status = await _name_status(ws.repo, since, now)
    except CheckpointError as exc:
        raise CorralError(f"cannot read the changes of {ws.execution_id}: {exc.reason}") from None
    return _file_rows(stats, status)


async def diff_of(
    home: Home, ws: Workspace, paths: list[str], from_cp: str | None, to_cp: str | None, *, pending: bool = False
) -> dict[str, Any]:
    """{execution_id, from, to, diff}: from checkpoint `from_cp` (or the base) to `to_cp` (or now)."""
    relative = ws.relative_paths(paths) if paths else []
    _, old = ws.checkpoint(from_cp) if from_cp is not None else (0, ws.base_commit)
    if ws.shadow is not None and to_cp is None:  # promoted and pending apart (docs/shadow.md)
        return await shadow_view.diff_of(home, ws, old, [p for p in relative if p != "."], pending)
    try:
        new = ws.checkpoint(to_cp)[1] if to_cp is not None else await _live_tree(home, ws)
        text = await unified_diff(ws.repo, old, new, [p for p in relative if p != "."])
    except CheckpointError as exc:
        raise CorralError(f"cannot diff {ws.execution_id}: {exc.reason}") from None
    return {"execution_id": ws.execution_id, "from": old, "to": new, "diff": text}


async def take_checkpoint(
    system: System, ws: Workspace, *, actor_name: str = "cli"
) -> tuple[dict[str, Any] | None, str | None]:
    """Have the checkpointer take a checkpoint now: (its checkpoint.created event, None), or
    (None, "nothing changed since checkpoint N") when nothing changed since the last one."""
    if not ws.present:
        raise Conflict(f"the worktree of {ws.execution_id} is gone ({ws.path}); there is nothing to checkpoint")
    try:
        answer = await request_and_wait(
            system,
            ws.execution_id,
            CheckpointRequested(trigger="demand"),
            ("checkpoint.created",),
            actor="checkpointer",
            actor_name=actor_name,
        )
    except CorralError as exc:
        if NOTHING_CHANGED in exc.message:
            return None, exc.message.split(": ", 1)[-1]
        raise
    return answer, None


async def commit_changes(
    system: System, ws: Workspace, message: str, paths: list[str], *, actor_name: str = "cli"
) -> dict[str, Any]:
    """Commit the worktree (or these paths) on the execution's branch: the change.committed event."""
    if not message.strip():
        raise UsageError("the commit message is empty; give one with -m")
    if not ws.present:
        raise Conflict(f"the worktree of {ws.execution_id} is gone ({ws.path}); there is nothing to commit")
    relative = ws.relative_paths(paths) if paths else []
    return await request_and_wait(
        system,
        ws.execution_id,
        CommitRequested(message=message, paths=tuple(relative)),
        ("change.committed",),
        actor="checkpointer",
        actor_name=actor_name,
    )


async def rollback_to(
    system: System, ws: Workspace, to_cp: str | None, paths: list[str], *, actor_name: str = "cli"
) -> tuple[int, list[str], dict[str, Any]]:
    """Restore the worktree (or these paths) to checkpoint `to_cp` (default: the last; 0 = the base):
    (checkpoint number, paths, the change.rolled_back event)."""
    if not ws.present:
        raise Conflict(f"the worktree of {ws.execution_id} is gone ({ws.path}); there is nothing to roll back")
    if to_cp is None and not ws.checkpoints:
        raise Conflict(f"{ws.execution_id} has no checkpoint to roll back to; give --to 0 for its base commit")
    n = ws.checkpoint(to_cp)[0] if to_cp is not None else int(ws.checkpoints[-1]["n"])
    relative = ws.relative_paths(paths) if paths else []
    answer = await request_and_wait(
        system,
        ws.execution_id,
        RollbackRequested(to_checkpoint=n, paths=tuple(p for p in relative if p != ".")),
        ("change.rolled_back",),
        timeout_s=ROLLBACK_TIMEOUT_S,
        actor="checkpointer",
        actor_name=actor_name,
    )
    return n, relative, answer
