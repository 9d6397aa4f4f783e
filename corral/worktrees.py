"""Worktree lifecycle and pull requests: `corral worktrees`, `corral worktrees prune`, `corral pr`.

Corral makes one worktree per execution at `$CORRAL_HOME/worktrees/<id>` on branch `corral/<id>`
(actors/spawner.py). This module lists them with what they hold, removes finished ones past the
retention policy without ever losing work that exists nowhere else, and opens pull requests for
an execution's branch through a GitHub-shaped forge (corral/forge.py). See docs/worktrees.md and
docs/pr.md.
"""

import argparse
import sys
from typing import Any

from corral import render
from corral.client import Client
from corral.config import format_size
from corral.errors import UsageError
from corral.home import Home
from corral.ops.base import info
from events.units import parse_duration


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


# --- corral worktrees ------------------------------------------------------------------------------


async def cmd_worktrees(home: Home, args: Any) -> int:
    if getattr(args, "action", None) == "prune":
        return await cmd_prune(home, args)
    async with Client.connect(home, actors=("projector",)) as client:
        items = await client.worktrees(orphans=args.orphans)
    if args.json:
        render.print_json(items)
        return 0
    if not items:
        info(("no orphaned worktrees" if args.orphans else "no worktrees") + f" under {home.worktrees}")
        return 0
    print(
        render.table(
            ["execution", "state", "age", "disk", "unmerged", "uncommitted", "path", "note"],
            [
                [
                    item["execution_id"],
                    item["state"],
                    render.human_duration(item["age_s"]) if item["age_s"] is not None else None,
                    format_size(item["disk_bytes"]) if item["disk_bytes"] is not None else None,
                    _count(item["unmerged_commits"]),
                    _count(item["uncommitted_files"]),
                    item["path"],
                    item["problem"] or (f"orphan: {item['orphan']}" if item["orphan"] else None),
                ]
                for item in items
            ],
        )
    )
    return 0


# --- corral worktrees prune ----------------------------------------------------------------------


async def cmd_prune(home: Home, args: Any) -> int:
    if args.older_than is not None:
        try:  # said before anything starts
            parse_duration(args.older_than)
        except ValueError as exc:
            raise UsageError(f"--older-than: {exc}") from None
    tty = sys.stderr.isatty() and not args.json
    async with Client.connect(home, actors=("projector",)) as client:
        plan = await client.prune_plan(older_than=args.older_than)
        outcomes: list[dict[str, Any]] = plan["outcomes"]
        candidates = plan["candidates"]
        for n, item in enumerate(candidates, 1):
            if tty:
                sys.stderr.write(f"\rcorral: pruning {n}/{len(candidates)}: {item['execution_id']}\x1b[K")
                sys.stderr.flush()
            outcome = await client.prune_worktree(item, force=args.force, dry_run=args.dry_run)
            outcomes.append(outcome)
            if not args.json:
                if tty:
                    sys.stderr.write("\r\x1b[K")
                print(_describe(outcome), flush=True)
    if args.json:
        render.print_json(outcomes)
    else:
        _summary(outcomes, dry_run=args.dry_run, retention_text=plan["retention"])
    return 1 if any(o["action"] in ("refused", "failed") for o in outcomes) else 0


def _describe(outcome: dict[str, Any]) -> str:
    freed = outcome["freed_bytes"]
    size = f", {format_size(freed)}" if freed else ""
    what = f"{outcome['execution_id']}  {outcome['path']} and branch {outcome['branch']}{size} ({outcome['reason']})"
    if outcome["action"] == "removed":
        return f"removed  {what}"
    if outcome["action"] == "would-remove":
        return f"would remove  {what}"
    if outcome["action"] == "refused":
        return f"REFUSED  {outcome['execution_id']}  {outcome['reason']}"
    return f"{outcome['action'].upper()}  {outcome['execution_id']}  {outcome['reason']}"


def _summary(outcomes: list[dict[str, Any]], *, dry_run: bool, retention_text: str) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome["action"]] = counts.get(outcome["action"], 0) + 1
    freed = sum(o["freed_bytes"] or 0 for o in outcomes if o["action"] in ("removed", "would-remove"))
    done = counts.get("would-remove" if dry_run else "removed", 0)
    parts = [f"{'would remove' if dry_run else 'removed'} {done} worktree{'s' if done != 1 else ''}"]
    if freed:
        parts[0] += f" ({format_size(freed)})"
    if counts.get("refused"):
        parts.append(f"refused {counts['refused']} holding work (see above; --force deletes them)")
    if counts.get("failed"):
        parts.append(f"{counts['failed']} failed")
    if counts.get("kept"):
        parts.append(f"kept {counts['kept']} within the retention of {retention_text}")
    if counts.get("skipped"):
        parts.append(f"skipped {counts['skipped']} of live executions")
    info("; ".join(parts) + (" (dry run: nothing changed)" if dry_run else ""))


# --- corral pr -----------------------------------------------------------------------------------


async def cmd_pr(home: Home, args: Any) -> int:
    if not (args.title or "").strip():
        raise UsageError("--title must not be empty")
    async with Client.connect(home, actors=("projector",)) as client:
        result = await client.pr(
            args.execution_id, title=args.title, body=args.body, base=args.base, remote=args.remote
        )
    execution_id = result["execution_id"]
    uncommitted = result.pop("uncommitted")
    if args.json:
        render.print_json(result)
    else:
        if uncommitted:
            info(f"note: {uncommitted} uncommitted file(s) in the worktree are not part of the pull request")
        print(result["url"])
        info(
            f"{execution_id}: pull request #{result['number']} opened: {result['branch']} → {result['base']} "
            f"({result['commits']} commit{'s' if result['commits'] != 1 else ''}, pushed to {result['remote']})"
        )
    return 0


# --- parsers -------------------------------------------------------------------------------------


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    worktrees = sub.add_parser(
        "worktrees", help="every worktree Corral made: state, disk usage, unmerged commits, uncommitted work"
    )
    worktrees.add_argument("--orphans", action="store_true", help="only those with no live execution")
    worktrees.add_argument("--json", action="store_true")
    actions = worktrees.add_subparsers(dest="action", metavar="ACTION")
    prune = actions.add_parser(
        "prune", help="remove finished worktrees past the retention policy (never ones holding work, unless --force)"
    )
    prune.add_argument("--older-than", metavar="D", help="retention, e.g. 7d or 12h (default: [worktrees] retention)")
    prune.add_argument("--force", action="store_true", help="also remove worktrees holding unmerged/uncommitted work")
    prune.add_argument("--dry-run", "-n", action="store_true", help="say what would be removed; change nothing")
    prune.add_argument("--json", action="store_true")

    pr = sub.add_parser("pr", help="push an execution's branch and open a pull request on the forge")
    pr.add_argument("execution_id", metavar="EXEC_ID")
    pr.add_argument("--title", required=True, metavar="T")
    pr.add_argument("--body", metavar="B")
    pr.add_argument("--base", metavar="BRANCH", help="branch to merge into (default: the forge's default branch)")
    pr.add_argument("--remote", metavar="NAME", help="git remote to push to (default: [forge] remote, origin)")
    pr.add_argument("--json", action="store_true")
    return {"worktrees": cmd_worktrees, "pr": cmd_pr}
