"""Checkpoints and change management: checkpoint, checkpoints, changes, diff, commit, rollback.

Reading commands (checkpoints, changes, diff) read the log and git directly: they need no
projection and no running actor. Acting commands (checkpoint, commit, rollback) append a
request and wait for the checkpointer's answer, like every control command.
"""

import argparse
import sys
from typing import Any

from corral import render
from corral.client import Client
from corral.errors import UsageError
from corral.home import Home
from corral.ops.base import info


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    p = sub.add_parser("checkpoint", help="take a checkpoint of an execution's worktree now")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("checkpoints", help="an execution's checkpoint chain: n, time, trigger, commit, files, +/-")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("changes", help="files the agent changed, with lines added and deleted")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--since", metavar="CP", help="from this checkpoint (default: the base commit)")
    p.add_argument("--pending", action="store_true", help="shadow workspace: only the changes not promoted yet")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("diff", help="unified diff of what the agent changed")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("path", nargs="*", metavar="PATH", help="only these files or directories")
    p.add_argument("--from", dest="from_cp", metavar="CP", help="checkpoint to diff from (default: base commit)")
    p.add_argument("--to", dest="to_cp", metavar="CP", help="checkpoint to diff to (default: the worktree now)")
    p.add_argument("--pending", action="store_true", help="shadow workspace: only the changes not promoted yet")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("commit", help="a real commit on the execution's branch")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("path", nargs="*", metavar="PATH", help="only these paths (default: everything)")
    p.add_argument("-m", "--message", required=True, metavar="MSG")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", help="restore the worktree (or the named files) to a checkpoint")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("path", nargs="*", metavar="PATH", help="only these files or directories")
    p.add_argument("--to", dest="to_cp", metavar="CP", help="checkpoint number, 0 = base (default: the latest)")
    p.add_argument("--json", action="store_true")
    return {
        "checkpoint": cmd_checkpoint,
        "checkpoints": cmd_checkpoints,
        "changes": cmd_changes,
        "diff": cmd_diff,
        "commit": cmd_commit,
        "rollback": cmd_rollback,
    }


# --- reading commands ----------------------------------------------------------------------------


def _totals(files: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(f.get("added") or 0 for f in files), sum(f.get("deleted") or 0 for f in files)


def _checkpoint_number(text: str) -> int:
    """The number of a checkpoint named on the command line, once the client accepted it (0: the base)."""
    spec = text.strip().lstrip("#")
    return 0 if spec in ("base", "0") else int(spec)


async def cmd_checkpoints(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=()) as client:
        ws = await client.workspace(args.execution_id)
    execution_id, checkpoints = ws["execution_id"], ws["checkpoints"]
    if args.json:
        render.print_json(checkpoints)
        return 0
    if not checkpoints:
        info(f"{execution_id} has no checkpoints yet; `corral checkpoint {execution_id}` takes one")
        return 0
    rows = []
    for cp in checkpoints:
        added, deleted = _totals(cp["files"])
        rows.append(
            [
                cp["n"],
                cp["ts"][:19].replace("T", " "),
                cp["trigger"],
                cp["commit"][:12],
                len(cp["files"]),
                f"+{added} -{deleted}",
                f"{cp['duration_ms']:.0f} ms",
            ]
        )
    print(render.table(["n", "time (utc)", "trigger", "commit", "files", "+/-", "took"], rows))
    return 0


async def cmd_changes(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=()) as client:
        ws = await client.workspace(args.execution_id)
        rows = await client.changes(ws["execution_id"], since=args.since, pending=getattr(args, "pending", False))
    if args.json:
        render.print_json(rows)
        return 0
    since_n = _checkpoint_number(args.since) if args.since is not None else 0
    origin = f"checkpoint {since_n}" if since_n else f"base {ws['base_commit'][:12]}"
    if not rows:
        info(f"{ws['execution_id']}: no changes since {origin}")
        return 0
    added, deleted = _totals(rows)
    if ws["shadow"] is not None:
        _print_shadow_rows(rows)
    else:
        print(
            render.table(
                ["status", "path", "+", "-"], [[r["status"], r["path"], r["added"], r["deleted"]] for r in rows]
            )
        )
    info(f"{len(rows)} files changed since {origin}, +{added} -{deleted}")
    return 0


async def cmd_diff(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=()) as client:
        result = await client.diff(
            args.execution_id, paths=list(args.path or []), from_cp=args.from_cp, to_cp=args.to_cp, pending=args.pending
        )
    if args.json:
        render.print_json(result)
    else:
        sys.stdout.write(result["diff"])
        if result.get("pending"):  # a shadow workspace: what is not promoted yet, apart
            sys.stdout.write("# pending: in the agent's shadow workspace, not promoted into the worktree yet\n")
            sys.stdout.write(result["pending"])
    return 0


def _print_shadow_rows(rows: list[dict[str, Any]]) -> None:
    """`corral changes` of a shadow workspace: a state column, and how many of each."""
    table = [[r["state"], r["status"], r["path"], r["added"], r["deleted"]] for r in rows]
    print(render.table(["state", "status", "path", "+", "-"], table))
    waiting = sum(1 for r in rows if r["state"] == "pending")
    info(f"{len(rows) - waiting} promoted into the worktree, {waiting} pending (corral diff ID --pending shows them)")


# --- acting commands -----------------------------------------------------------------------------


async def cmd_checkpoint(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=("checkpointer",)) as client:
        answer = await client.checkpoint(args.execution_id)
    execution_id = answer["execution_id"]
    if answer.get("type") != "checkpoint.created":  # nothing changed since the last one
        info(f"{execution_id}: {answer['reason']}; no checkpoint taken")
        if args.json:
            render.print_json({"execution_id": execution_id, "checkpoint": None})
        return 0
    data = answer["data"]
    added, deleted = _totals(data["files"])
    if args.json:
        render.print_json(answer)
    else:
        print(
            f"{execution_id}: checkpoint {data['n']} ({data['commit'][:12]}): {len(data['files'])} files, "
            f"+{added} -{deleted}, {data['duration_ms']:.0f} ms"
        )
    return 0


async def cmd_commit(home: Home, args: Any) -> int:
    if not args.message.strip():
        raise UsageError("the commit message is empty; give one with -m")
    async with Client.connect(home, actors=("checkpointer",)) as client:
        ws = await client.workspace(args.execution_id)
        answer = await client.commit(ws["execution_id"], args.message, list(args.path or []))
    if args.json:
        render.print_json(answer)
    else:
        print(f"{ws['execution_id']}: committed {answer['data']['commit'][:12]} on {ws['branch']}")
    return 0


async def cmd_rollback(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=("checkpointer",)) as client:
        answer = await client.rollback(args.execution_id, to_cp=args.to_cp, paths=list(args.path or []))
    data = answer["data"]
    if args.json:
        render.print_json(answer)
    else:
        what = "the whole worktree" if not args.path else f"{len(data['paths'])} path(s)"
        n = data["to_checkpoint"]
        target = f"checkpoint {n}" if n else "the base commit"
        after = f"; now checkpoint {data['checkpoint']}" if data.get("checkpoint") else ""
        print(f"{answer['execution_id']}: rolled back {what} to {target}{after}")
    return 0
