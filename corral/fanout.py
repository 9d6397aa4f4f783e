"""Best-of-N: `corral fanout` runs one task N times from one base, a judge ranks them; `corral pick` keeps one.

    corral fanout --agents claude-code:2,codex:1 --repo PATH [--judge "pytest -q"] "TASK"
    corral fanout --agents command:3 --repo PATH --judge "make test" -- ./my-agent.sh
    corral pick EXEC_ID

Every execution of a fan-out starts from the same commit (the base resolved once) and carries the
labels `fanout` (the fan-out's id) and `fanout_slot` (1..N), and `CORRAL_FANOUT_SLOT` in its
environment. Once all have ended, the judge (a shell line) runs in each one's worktree as an
execution of its own (sandboxed and recorded like any, label `fanout_judge`). The ranking: judge
passed first (exit code 0; without a judge, the agent's own exit code 0), then the smallest change
(lines added and deleted against the base, untracked files included). `corral pick` removes the
other executions' worktrees and branches (their checkpoints stay under refs/corral/<id>/) and keeps
the winner's for `corral commit` / `corral pr` as usual. See docs/orchestration.md#best-of-n.
"""

import argparse
import asyncio
import subprocess
from pathlib import Path
from typing import Any, Final

from actors.errors import WorkspaceError
from actors.worktree import repo_root, resolve_commit
from corral import render
from corral.client import Client, RunSpec
from corral.errors import NotFound, UsageError
from corral.home import Home
from events.ids import new_execution_id

MAX_FANOUT: Final = 16
AGENTS: Final = ("command", "claude-code", "codex", "gemini", "aider")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral fanout` and `corral pick` to `sub`; return {command name: handler(home, args)}."""
    fanout = sub.add_parser("fanout", help="best-of-N: one task, N agents from one base, ranked by a judge")
    fanout.add_argument("--agents", required=True, metavar="AGENT:N,...", help="e.g. claude-code:2,codex:1")
    fanout.add_argument("--repo", default=".", help="git repository to branch from (default: .)")
    fanout.add_argument("--base", default="HEAD", help="commit or ref every run starts from (default: HEAD)")
    fanout.add_argument("--judge", metavar="CMD", help="a shell line run in each worktree; exit 0 ranks first")
    fanout.add_argument("--template", "-t", help="a template of corral.toml for every run")
    fanout.add_argument("--json", action="store_true")
    fanout.add_argument("task", nargs="?", help="the task text (agents); with `command`, the program after --")
    fanout.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] for command:N")
    pick = sub.add_parser("pick", help="keep one execution of a fan-out; remove the others' worktrees")
    pick.add_argument("execution_id", metavar="EXEC_ID")
    pick.add_argument("--json", action="store_true")
    return {"fanout": cmd_fanout, "pick": cmd_pick}


def parse_agents(text: str) -> list[str]:
    """`claude-code:2,codex:1` as one agent name per run, in order."""
    runs: list[str] = []
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        if name not in AGENTS:
            raise UsageError(f"--agents: unknown agent {name!r} (known: {', '.join(AGENTS)})")
        if count and not (count.isdigit() and int(count) >= 1):
            raise UsageError(f"--agents: {part!r}: the count after ':' is a number of runs, 1 or more")
        runs += [name] * (int(count) if count else 1)
    if not 2 <= len(runs) <= MAX_FANOUT:
        raise UsageError(f"--agents: {len(runs)} runs; a fan-out has 2 to {MAX_FANOUT}")
    return runs


def change_size(worktree: str, base: str) -> int | None:
    """Lines added and deleted in the worktree against `base`, untracked files counted whole."""
    if not Path(worktree).is_dir():
        return None

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", worktree, *args], capture_output=True, text=True, timeout=60, check=False)
        return done.stdout if done.returncode == 0 else ""

    total = 0
    for line in git("diff", "--numstat", base).splitlines():
        added, deleted, _ = [*line.split("\t", 2), "", ""][:3]
        total += (int(added) if added.isdigit() else 0) + (int(deleted) if deleted.isdigit() else 0)
    for name in git("ls-files", "--others", "--exclude-standard", "-z").split("\0"):
        if name:
            try:
                total += len((Path(worktree) / name).read_bytes().splitlines())
            except OSError:
                continue
    return total


async def cmd_fanout(home: Home, args: Any) -> int:
    runs = parse_agents(args.agents)
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    task = args.task
    if task and all(a == "command" for a in runs):  # argparse puts the program after -- in TASK
        command, task = [task, *command], None
    if "command" in runs and not command:
        raise UsageError("command:N runs the program after --: corral fanout --agents command:3 -- ./agent.sh")
    if any(a != "command" for a in runs) and not task:
        raise UsageError("agents need a task: corral fanout --agents claude-code:2 'what to do'")
    try:
        repo = repo_root(args.repo)
        base = resolve_commit(repo, args.base)  # one base for all, even if the branch moves meanwhile
    except WorkspaceError as exc:
        raise UsageError(str(exc)) from None
    fanout_id = new_execution_id()
    async with Client.connect(home) as client:
        ids: list[tuple[str, str]] = []
        for slot, agent in enumerate(runs, start=1):
            spec = RunSpec.model_validate(
                {
                    "repo": str(repo),
                    "base": base,
                    "agent": None if agent == "command" else agent,
                    "task": task,
                    "command": command if agent == "command" else [],
                    "template": args.template,
                    "labels": {"fanout": fanout_id, "fanout_slot": str(slot)},
                    "env": {"CORRAL_FANOUT_SLOT": str(slot)},
                }
            )
            ids.append((await client.submit(spec), agent))
        if not args.json:
            print(f"fan-out {fanout_id}: {len(ids)} runs from {base[:12]}: {', '.join(i for i, _ in ids)}", flush=True)
        ended = await asyncio.gather(*(client.wait(i) for i, _ in ids))
        judged: dict[str, dict[str, Any]] = {}
        if args.judge:
            judged = await _judge(client, ids, ended, args.judge, fanout_id, repo, base)
        ranking = []
        for (execution_id, agent), status in zip(ids, ended, strict=True):
            worktree = status.get("worktree")
            verdict = judged.get(execution_id, {})
            size = await asyncio.to_thread(change_size, worktree, base) if worktree else None
            passed = verdict.get("exit_code") == 0 if args.judge else status.get("exit_code") == 0
            ranking.append(
                {
                    "execution_id": execution_id,
                    "agent": agent,
                    "exit_code": status.get("exit_code"),
                    "judge_execution_id": verdict.get("execution_id"),
                    "judge_exit_code": verdict.get("exit_code"),
                    "passed": passed,
                    "lines_changed": size,
                    "worktree": worktree,
                }
            )
    ranking.sort(key=lambda r: (not r["passed"], r["lines_changed"] if r["lines_changed"] is not None else 1 << 62))
    for rank, row in enumerate(ranking, start=1):
        row["rank"] = rank
    if args.json:
        render.print_json({"fanout_id": fanout_id, "base": base, "ranking": ranking})
    else:
        columns = ["rank", "execution_id", "agent", "exit_code", "judge_exit_code", "passed", "lines_changed"]
        print(render.table(columns, [[r[c] for c in columns] for r in ranking]))
        best = ranking[0]
        if best["passed"]:
            print(f"best: {best['execution_id']}; keep it with `corral pick {best['execution_id']}`")
        else:
            print("none passed; look at them with `corral diff EXEC_ID`")
    return 0 if ranking[0]["passed"] else 1


async def _judge(
    client: Client,
    ids: list[tuple[str, str]],
    ended: list[dict[str, Any]],
    judge: str,
    fanout_id: str,
    repo: Path,
    base: str,
) -> dict[str, dict[str, Any]]:
    """Run the judge in each worktree, as an execution there; {execution id: its judge's status}."""
    started: dict[str, str] = {}
    for (execution_id, _), status in zip(ids, ended, strict=True):
        worktree = status.get("worktree")
        if not worktree:
            continue
        spec = RunSpec.model_validate(
            {"repo": str(repo), "base": base, "command": ["sh", "-c", judge], "labels": {"fanout_judge": fanout_id}}
        )
        judge_id, request = await client.build_request(spec)
        request = request.model_copy(update={"worktree": worktree})
        await client.publish_request(judge_id, request)
        started[execution_id] = judge_id
    results = await asyncio.gather(*(client.wait(j) for j in started.values()))
    return {
        execution_id: {"execution_id": judge_id, "exit_code": result.get("exit_code")}
        for (execution_id, judge_id), result in zip(started.items(), results, strict=True)
    }


async def cmd_pick(home: Home, args: Any) -> int:
    from corral.ops.worktrees import _prune_one, inventory

    async with Client.connect(home) as client:
        winner = await client.resolve(args.execution_id)
        rows = await client.records(
            "SELECT execution_id, data->'labels'->>'fanout' AS fanout FROM events "
            "WHERE type = 'execution.requested' AND data->'labels'->>'fanout' IS NOT NULL"
        )
        fanout = next((r["fanout"] for r in rows if r["execution_id"] == winner), None)
        if fanout is None:
            raise NotFound(f"{winner} is not part of a fan-out (`corral fanout` labels its runs `fanout`)")
        losers = sorted(r["execution_id"] for r in rows if r["fanout"] == fanout and r["execution_id"] != winner)
        items = {i.execution_id: i for i in await inventory(home, client.system)}
        busy = [i for i in losers if i in items and items[i].live]
        if busy or (winner in items and items[winner].live):
            raise UsageError(f"fan-out {fanout} still runs ({', '.join(busy) or winner}); pick once every run ended")
        outcomes = []
        for execution_id in losers:
            item = items.get(execution_id)
            if item is None:
                continue  # no worktree left (removed before, or it never got one)
            outcomes.append(await _prune_one(client.system, item, force=True, dry_run=False))
    removed = [o.execution_id for o in outcomes if o.action == "removed"]
    failed = [f"{o.execution_id}: {o.reason}" for o in outcomes if o.action not in ("removed",)]
    if args.json:
        render.print_json({"fanout_id": fanout, "kept": winner, "removed": removed, "failed": failed})
    else:
        print(f"kept {winner}; removed the worktrees of {', '.join(removed) or 'none'}")
        for line in failed:
            print(f"could not remove {line}")
    return 1 if failed else 0
