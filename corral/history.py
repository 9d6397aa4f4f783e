"""History: search, compare, replay, fork, export, and `ps --tree` lineage.

Every command reads the DuckDB projections through the running projector (`commands.query`),
or starts the embedded system for its own duration, like `corral sql`. Replay and fork append a
new `execution.requested` built from the recorded one and follow it like `corral run`.
"""

import argparse
import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from actors.approver import DecisionRefused, submit_decision
from corral import render
from corral.client import Client, ForkPlan, ReplayPlan, StoredEvent, check_search
from corral.commands import TERMINAL_TYPES, _run_and_follow, cmd_ps
from corral.errors import UsageError
from corral.home import Home, SystemLock
from corral.ops.base import (
    export_query,
    info,
    parse_since,
    sql_text,
    start_background_system,
)
from corral.ops.history import required_literal as required_literal  # re-exported (moved to corral/ops)
from corral.ops.history import search as search
from corral.system import open_system
from events.subjects import execution_events
from events.types import ApprovalDecisionSubmitted, ExecutionRequested, InputRequested

DEFAULT_LIMIT: Final = 50

# Tables written by `corral export`, with the condition that keeps rows since a time / a sequence.
EXPORT_TABLES: Final = {
    "executions": (
        "requested_at >= {t} OR ended_at >= {t} OR ended_at IS NULL",
        "updated_seq >= {s}",
    ),
    "events": ("ts >= {t}", "seq >= {s}"),
    "output": ("ts >= {t}", "seq >= {s}"),
    "checkpoints": ("ts >= {t}", "seq >= {s}"),
    "files_changed": ("last_ts >= {t}", "last_seq >= {s}"),
    "approvals": (
        "requested_at >= {t} OR decided_at >= {t}",
        "requested_seq >= {s} OR decided_seq >= {s}",
    ),
    "validations": ("ts >= {t}", "seq >= {s}"),
    "inputs": ("ts >= {t}", "seq >= {s}"),
    "usage": ("ts >= {t}", "seq >= {s}"),
    "tool_calls": ("ts >= {t}", "seq >= {s}"),
    "rejected_events": ("seq >= (SELECT coalesce(min(seq), 0) FROM events WHERE ts >= {t})", "seq >= {s}"),
    # orchestration (docs/orchestration.md): a run, a stage or a ticket that began or changed since then
    "pipelines": ("requested_at >= {t} OR finished_at >= {t} OR finished_at IS NULL", "updated_seq >= {s}"),
    "stages": (
        "started_at >= {t} OR finished_at >= {t} OR finished_at IS NULL",
        "started_seq >= {s} OR finished_seq >= {s}",
    ),
    "tickets": ("created_at >= {t} OR finished_at >= {t} OR finished_at IS NULL", "updated_seq >= {s}"),
}


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    search = sub.add_parser("search", help="search output text and event payloads")
    search.add_argument("text", metavar="TEXT", help="text to find (case-insensitive), or a regex with --regex")
    search.add_argument("--regex", "-e", action="store_true", help="TEXT is a regular expression (RE2 syntax)")
    search.add_argument("--exec", dest="execution_id", metavar="ID", help="only this execution")
    search.add_argument("--type", dest="event_type", metavar="T", help="only this event type (`output`, `approval.*`)")
    search.add_argument("--since", metavar="D", help="only events since a duration ago (10m, 2d) or a sequence")
    search.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"newest N hits (default {DEFAULT_LIMIT})")
    search.add_argument("--json", action="store_true")

    compare = sub.add_parser(
        "compare", help="two or more executions side by side: outcome, cost, files, tree diff, timeline"
    )
    compare.add_argument("a", metavar="EXEC_A")
    compare.add_argument("b", metavar="EXEC_B")
    compare.add_argument("more", nargs="*", metavar="EXEC", help="more executions (up to 10 in all)")
    compare.add_argument("--json", action="store_true")

    replay = sub.add_parser("replay", help="run a recorded execution again (same request, inputs, approvals)")
    replay.add_argument("execution_id", metavar="EXEC_ID")
    replay.add_argument("--ask-approvals", action="store_true", help="leave approvals to a human this time")
    replay.add_argument("--speed", type=float, default=1.0, help="re-send inputs X times faster (default 1)")
    replay.add_argument("--detach", "-d", action="store_true", help="print the new execution id and return")
    replay.add_argument("--quiet", "-q", action="store_true", help="only the agent's own output")

    fork = sub.add_parser("fork", help="start a new execution from a checkpoint of another")
    fork.add_argument("execution_id", metavar="EXEC_ID")
    _fork_options(fork)
    fork.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] instead of the original")

    export = sub.add_parser("export", help="write every table as Parquet for offline analysis")
    export.add_argument("--parquet", required=True, metavar="DIR", help="directory to create (must not exist)")
    export.add_argument("--since", metavar="D", help="only rows since a duration ago (10m, 2d) or a sequence")

    # `corral ps --tree` is answered here (the option is corral/cli.py's: `corral ps` parses without
    # this module, corral/cli.py main)
    return {
        "search": cmd_search,
        "compare": cmd_compare,
        "replay": cmd_replay,
        "fork": cmd_fork,
        "export": cmd_export,
        "ps": cmd_ps_tree,
    }


def _fork_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--at", metavar="CHECKPOINT", help="checkpoint number (or its ref or commit); required")
    parser.add_argument("--prompt", help="the new task (replaces the original task in the command)")
    parser.add_argument(
        "--new-session",
        action="store_true",
        help="with --prompt: start a new conversation instead of continuing the agent's recorded session",
    )
    parser.add_argument("--detach", "-d", action="store_true", help="print the new execution id and return")
    parser.add_argument("--quiet", "-q", action="store_true", help="only the agent's own output")


class _OptionsParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(message)


def fork_arguments(args: Any) -> tuple[Any, list[str]]:
    """Options typed after EXEC_ID land in the REMAINDER: parse them; return (args, command)."""
    rest = list(args.command)
    head, command = (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
    if head:
        parser = _OptionsParser(prog="corral fork", add_help=False)
        _fork_options(parser)
        parser.parse_args(head, namespace=args)
    if not args.at:
        raise UsageError("--at CHECKPOINT is required (`corral sql 'SELECT * FROM checkpoints'` lists them)")
    return args, command


# --- helpers -----------------------------------------------------------------------------------


# --- search ------------------------------------------------------------------------------------


async def cmd_search(home: Home, args: Any) -> int:
    # bad input is said before anything starts
    check_search(args.text, regex=args.regex, event_type=args.event_type, since=args.since, limit=args.limit)
    async with Client.connect(home, actors=("projector",)) as client:
        hits = await client.search(
            args.text,
            regex=args.regex,
            execution_id=args.execution_id,
            event_type=args.event_type,
            since=args.since,
            limit=args.limit,
        )
    if args.json:
        render.print_json(
            [{k: hit[k] for k in ("seq", "execution_id", "ts", "type", "snippet", "text")} for hit in hits]
        )
        return 0
    if not hits:
        info(f"no match for {args.text!r}")
        return 1
    for hit in hits:
        ts = str(hit["ts"])[:19].replace("T", " ")
        print(f"{hit['execution_id']}  {ts}  {hit['type']:<20} {hit['snippet']}")
    if len(hits) == args.limit:
        info(f"showing the newest {args.limit} hits; narrow with --exec/--type/--since or raise --limit")
    return 0


# --- export ------------------------------------------------------------------------------------


def _export_target(text: str) -> tuple[Path, Path]:
    """The directory to create and the hidden one written first (renamed when complete)."""
    target = Path(text).expanduser().absolute()
    if target.exists():
        raise UsageError(f"{target} already exists; give a new directory")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent} is not a directory")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.mkdir()
    return target, partial


async def cmd_export(home: Home, args: Any) -> int:
    time_or_seq = parse_since(args.since) if args.since else None
    target, partial = _export_target(args.parquet)
    try:
        counts: dict[str, int] = {}
        async with open_system(home, actors=("projector",)) as system:
            for table, (by_time, by_seq) in EXPORT_TABLES.items():
                where = ""
                if time_or_seq and "start_seq" in time_or_seq:
                    where = "WHERE " + by_seq.format(s=int(time_or_seq["start_seq"]))
                elif time_or_seq:
                    stamp = f"{sql_text(time_or_seq['start_time'].isoformat())}::TIMESTAMPTZ"
                    where = "WHERE " + by_time.format(t=stamp)
                # written by the projector's sandboxed DuckDB in its own directory, then moved here
                path = partial / f"{table}.parquet"
                counts[table] = await export_query(system, f"SELECT * FROM {table} {where}", path)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary = ", ".join(f"{table} {n:,}" for table, n in counts.items())
    info(f"exported {len(counts)} tables to {target}: {summary}")
    return 0


# --- ps --tree ---------------------------------------------------------------------------------


async def cmd_ps_tree(home: Home, args: Any) -> int:
    if not getattr(args, "tree", False):
        return await cmd_ps(home, args)
    async with Client.connect(home, actors=("projector",)) as client:
        found = await client.records(
            "SELECT execution_id, state, exit_code, signal, requested_at, duration_s, command, replay_of, fork_of, "
            "fork_checkpoint, retry_of, (SELECT any_value(r.data->>'resume_session') FROM events r "
            "WHERE r.execution_id = executions.execution_id AND r.type = 'execution.requested') AS resume_session "
            "FROM executions ORDER BY requested_at, execution_id",
            max_rows=100000,
        )
    by_id = {row["execution_id"]: {**row, "children": []} for row in found}
    roots = []
    for row in by_id.values():
        parent = row["replay_of"] or row["fork_of"] or row["retry_of"]
        row["relation"] = (
            "replay" if row["replay_of"] else f"fork@{row['fork_checkpoint']}" if row["fork_of"] else "retry"
        )
        if parent and parent in by_id:
            by_id[parent]["children"].append(row)
        else:
            if not parent:
                row["relation"] = None
            roots.append(row)
    if args.json:
        render.print_json(roots)
        return 0
    if not roots:
        info("no executions")
        return 0

    def line(row: dict[str, Any]) -> str:
        ended = "-" if row["exit_code"] is None else f"exit {row['exit_code']}"
        if row["signal"] is not None:
            ended = f"sig {row['signal']}"
        command = render.cell(row["command"])
        relation = f"{row['relation']} " if row["relation"] else ""
        if row["resume_session"]:  # a fork (or follow-up) continuing an agent session
            relation += f"(session {row['resume_session']}) "
        duration = render.human_duration(row["duration_s"])
        return f"{relation}{row['execution_id']}  {row['state']}  {ended}  {duration}  {command}"

    def walk(row: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        print(line(row) if top else f"{prefix}{'└─ ' if last else '├─ '}{line(row)}")
        inner = "" if top else prefix + ("   " if last else "│  ")
        for i, child in enumerate(row["children"]):
            walk(child, inner, i == len(row["children"]) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return 0


# --- recorded executions -----------------------------------------------------------------------


async def _start(client: Client, execution_id: str, request: ExecutionRequested, args: Any) -> int:
    """Publish the request and follow it like `corral run` (or print the id with --detach)."""
    if args.detach:
        await client.publish_request(execution_id, request)
        print(execution_id)
        return 0
    return await _run_and_follow(client.system, execution_id, request, quiet=args.quiet)


@contextlib.asynccontextmanager
async def _client_for(home: Home, detach: bool) -> AsyncIterator[Client]:
    """A client of the system to run on: with --detach, a background `corral up` (started if none runs)."""
    if detach and not SystemLock(home).is_held_elsewhere():
        pid = start_background_system(home)
        info(f"started a background system (corral up, pid {pid}, log {home.up_log}); stop it with `corral down`")
    async with Client.connect(home) as client:
        yield client


# --- replay ------------------------------------------------------------------------------------


async def cmd_replay(home: Home, args: Any) -> int:
    if not args.speed > 0:
        raise UsageError("--speed must be more than 0")
    async with Client.connect(home, actors=("projector",)) as client:
        plan: ReplayPlan = await client.plan_replay(args.execution_id, ask_approvals=args.ask_approvals)
    original, request, inputs, decisions = plan.replay_of, plan.request, plan.inputs, plan.decisions
    if args.detach and (inputs or any(d is not None for d in decisions)):
        info(
            f"{original} had {len(inputs)} input(s) and {len(decisions)} approval(s); "
            "--detach does not re-send them (run without --detach to replay them)"
        )
    execution_id = plan.execution_id
    async with _client_for(home, args.detach) as client:
        if not args.quiet:
            info(f"{execution_id}: replay of {original} from {request.base[:12]}")
        if args.detach:
            return await _start(client, execution_id, request, args)
        return await _start_feeding(client, execution_id, request, args, inputs, decisions, args.speed)


async def _start_feeding(
    client: Client,
    execution_id: str,
    request: ExecutionRequested,
    args: Any,
    inputs: list[tuple[float, str]],
    decisions: list[dict[str, Any] | None],
    speed: float,
    *,
    by: str = "replay",
) -> int:
    """Start and follow the execution while recorded inputs and approval decisions are re-sent (`_feed`)."""
    done = asyncio.Event()
    feeder = asyncio.create_task(_feed(client, execution_id, inputs, decisions, speed, done, by=by))
    try:
        code = await _start(client, execution_id, request, args)
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await feeder
    if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
        info(f"{execution_id}: re-sending inputs or approvals failed: {feeder.exception()}")
    return code


async def _feed(
    client: Client,
    execution_id: str,
    inputs: list[tuple[float, str]],
    decisions: list[dict[str, Any] | None],
    speed: float,
    done: asyncio.Event,
    *,
    by: str = "replay",
) -> None:
    """Re-send recorded inputs at their offsets from the start, and answer approvals in order.

    The inputs are `input.requested` with `requested_by` `by` (`replay`, or `fork`).
    """
    pending: set[asyncio.Task[None]] = set()
    asked = 0

    async def send_inputs(started: datetime) -> None:
        for offset, text in inputs:
            delay = (started.timestamp() + offset / speed) - datetime.now(UTC).timestamp()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.append(execution_id, InputRequested(text=text, requested_by=by))

    async def on_event(stored: StoredEvent) -> bool:
        nonlocal asked
        kind = stored.type
        if kind == "output":
            return False
        event = orjson.loads(stored.data)
        if kind == "execution.started" and inputs:
            started = datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
            task = asyncio.create_task(send_inputs(started))
            pending.add(task)
        elif kind == "approval.requested":
            decision = decisions[asked] if asked < len(decisions) else None
            asked += 1
            if decision is not None:
                submitted = ApprovalDecisionSubmitted(approval_id=event["data"]["approval_id"], **decision)
                try:  # through the approvers, as this NATS user (docs/security.md)
                    await submit_decision(client.system.bus, execution_id, submitted, causation_id=event["id"])
                except DecisionRefused as exc:
                    info(f"{execution_id}: the recorded decision of {submitted.approval_id} was not re-sent: {exc}")
        return kind in TERMINAL_TYPES

    try:
        await client.read_events(on_event, subject=execution_events(execution_id), done=done)
    finally:
        for task in pending:
            task.cancel()


# --- fork --------------------------------------------------------------------------------------


async def cmd_fork(home: Home, args: Any) -> int:
    args, command = fork_arguments(args)
    if command and args.prompt is not None:
        raise UsageError("give either --prompt or -- COMMAND, not both")
    if args.new_session and args.prompt is None:
        raise UsageError("--new-session goes with --prompt TEXT (the task of the new conversation)")
    async with Client.connect(home, actors=("projector",)) as client:
        planned: ForkPlan = await client.plan_fork(
            args.execution_id, at=args.at, prompt=args.prompt, command=command, new_session=args.new_session
        )
    request, checkpoint, inputs, later = planned.request, planned.checkpoint, planned.inputs, planned.later
    continues, not_continued = planned.continues, planned.not_continued
    original, execution_id = planned.fork_of, planned.execution_id
    if not_continued:
        info(f"{execution_id}: the conversation of {original} is not continued: {not_continued}")
    resend = _fork_inputs(
        execution_id,
        original,
        int(checkpoint["n"]),
        inputs,
        later,
        how="command" if command else "continues" if continues else "prompt" if args.prompt is not None else "same",
        detach=args.detach,
        quiet=args.quiet,
    )
    async with _client_for(home, args.detach) as client:
        if not args.quiet:
            continued = f", continuing {continues}" if continues else ""
            info(
                f"{execution_id}: fork of {original} at checkpoint {checkpoint['n']} "
                f"({checkpoint['commit'][:12]}){continued}"
            )
        if resend:  # at their offsets from the fork's start, as `corral replay` does
            return await _start_feeding(client, execution_id, request, args, resend, [], 1.0, by="fork")
        return await _start(client, execution_id, request, args)


def _inputs(count: int) -> str:
    return f"{count:,} input{'' if count == 1 else 's'}"


def _fork_inputs(
    execution_id: str,
    original: str,
    n: int,
    inputs: list[tuple[float, str]],
    later: int,
    *,
    how: str,
    detach: bool,
    quiet: bool,
) -> list[tuple[float, str]]:
    """The inputs a fork re-sends (those the original got before checkpoint n), saying what is not sent.

    Only a fork running the original command again gets them, and only while the CLI follows it;
    `how` is `same`, `command` (-- COMMAND), `prompt` (a new task) or `continues` (an agent
    conversation continued, which holds them already).
    """
    send = f"send input with `corral input {execution_id} TEXT`"
    if how == "continues":
        if inputs or later:
            info(
                f"{execution_id}: the {_inputs(len(inputs) + later)} {original} got are not re-sent: "
                "the conversation the fork continues already holds them"
            )
        return []
    if how in ("command", "prompt"):
        if inputs:
            why = "the fork runs another command" if how == "command" else "the fork has a new task"
            info(
                f"{execution_id}: the {_inputs(len(inputs))} {original} got before checkpoint {n} "
                f"are not re-sent: {why}; {send}"
            )
        return []
    if detach:
        if inputs:
            info(
                f"{execution_id}: --detach does not re-send the {_inputs(len(inputs))} {original} got before "
                f"checkpoint {n} (run without --detach to re-send them); {send}"
            )
        return []
    verb = "is" if later == 1 else "are"
    after = f"the {_inputs(later)} it got after checkpoint {n} {verb} not ({send})" if later else ""
    if inputs and not quiet:
        info(
            f"{execution_id}: re-sending the {_inputs(len(inputs))} {original} got before checkpoint {n}"
            + (f"; {after}" if after else "")
        )
    elif not inputs and later:
        info(f"{execution_id}: no input is re-sent: {original} got its {_inputs(later)} after checkpoint {n}; {send}")
    elif later:
        info(f"{execution_id}: {after}")
    return inputs


# --- compare -----------------------------------------------------------------------------------


async def cmd_compare(home: Home, args: Any) -> int:
    if args.more:
        return await _compare_many(home, [args.a, args.b, *args.more], as_json=args.json)
    async with Client.connect(home, actors=("projector",)) as client:
        compared = await client.compare(args.a, args.b)
    if args.json:
        render.print_json(compared)
        return 0
    a, b, diff, timeline = compared["a"], compared["b"], compared["tree_diff"], compared["timeline"]
    lines = [
        ("execution", a["execution_id"], b["execution_id"]),
        ("command", render.cell(a["command"]), render.cell(b["command"])),
        ("base", f"{a['base']} {(a['base_commit'] or '')[:12]}", f"{b['base']} {(b['base_commit'] or '')[:12]}"),
        ("outcome", _outcome(a), _outcome(b)),
        ("duration", render.human_duration(a["duration_s"]), render.human_duration(b["duration_s"])),
        (
            "tokens in/out",
            f"{a['input_tokens'] or 0:,}/{a['output_tokens'] or 0:,}",
            f"{b['input_tokens'] or 0:,}/{b['output_tokens'] or 0:,}",
        ),
        ("cost", f"${a['cost_usd'] or 0:.4f}", f"${b['cost_usd'] or 0:.4f}"),
        ("checkpoints", str(len(a["checkpoints"])), str(len(b["checkpoints"]))),
        ("session", _session(a), _session(b)),
        ("final tree", (a["final_tree"] or "-")[:12], (b["final_tree"] or "-")[:12]),
        ("files changed", _files(a), _files(b)),
    ]
    print(render.table(["", "A", "B"], [list(line) for line in lines]))
    print()
    if diff["same_tree"]:
        print("final trees: identical")
    elif diff["stat"] is not None:
        print(f"final trees differ (git diff --stat A B):\n{diff['stat'] or '(no file differences)'}")
    else:
        print(f"final trees: cannot diff: {diff['error']}")
    print()
    print("timeline (aligned by event type):")
    width = max([len(_side(p["a"])) for p in timeline] + [1])
    for pair in timeline:
        mark = " " if pair["a"] and pair["b"] else "≠"
        print(f"  {_side(pair['a']).ljust(width)}  {mark}  {_side(pair['b'])}".rstrip())
    return 0


def _outcome(s: dict[str, Any]) -> str:
    if s["signal"] is not None:
        return f"{s['state']} (signal {s['signal']})"
    return f"{s['state']} (exit {s['exit_code']}, {s['exit_reason'] or '-'})"


def _session(s: dict[str, Any]) -> str:
    continued = f" (continues {s['resume_session']})" if s["resume_session"] else ""
    return f"{s['session_id'] or '-'}{continued}"


def _files(s: dict[str, Any]) -> str:
    return f"{len(s['files_changed'])} " + render.cell(", ".join(f["path"] for f in s["files_changed"][:5]))


def _side(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    count = f" ×{entry['count']}" if entry["count"] > 1 else ""
    return f"+{entry['offset_s']:.1f}s {entry['type']}{count}"


async def _compare_many(home: Home, prefixes: list[str], *, as_json: bool) -> int:
    """`corral compare A B C ...`: one column per execution (A, B, C, ...), each final tree against A's,
    the N timelines aligned by event type."""
    async with Client.connect(home, actors=("projector",)) as client:
        compared = await client.compare_many(prefixes)
    if as_json:
        render.print_json(compared)
        return 0
    runs = compared["executions"]
    letters = [chr(ord("A") + i) for i in range(len(runs))]
    lines = [
        ("execution", *[s["execution_id"] for s in runs]),
        ("command", *[render.cell(s["command"]) for s in runs]),
        ("base", *[f"{s['base']} {(s['base_commit'] or '')[:12]}" for s in runs]),
        ("outcome", *[_outcome(s) for s in runs]),
        ("duration", *[render.human_duration(s["duration_s"]) for s in runs]),
        ("tokens in/out", *[f"{s['input_tokens'] or 0:,}/{s['output_tokens'] or 0:,}" for s in runs]),
        ("cost", *[f"${s['cost_usd'] or 0:.4f}" for s in runs]),
        ("checkpoints", *[str(len(s["checkpoints"])) for s in runs]),
        ("session", *[_session(s) for s in runs]),
        ("final tree", *[(s["final_tree"] or "-")[:12] for s in runs]),
        ("files changed", *[_files(s) for s in runs]),
    ]
    print(render.table(["", *letters], [list(line) for line in lines]))
    print()
    for letter, diff in zip(letters[1:], compared["tree_diffs"], strict=True):
        if diff["same_tree"]:
            print(f"final trees of A and {letter}: identical")
        elif diff["stat"] is not None:
            stat = diff["stat"] or "(no file differences)"
            print(f"final trees of A and {letter} differ (git diff --stat A {letter}):\n{stat}")
        else:
            print(f"final trees of A and {letter}: cannot diff: {diff['error']}")
    print()
    print(f"timeline (aligned by event type; columns {' '.join(letters)}):")
    widths = [max([len(_side(row[i])) for row in compared["timeline"]] + [1]) for i in range(len(runs))]
    for row in compared["timeline"]:
        mark = " " if all(row) else "≠"
        cells = "  ".join(_side(entry).ljust(width) for entry, width in zip(row, widths, strict=True))
        print(f"  {mark}  {cells}".rstrip())
    return 0
