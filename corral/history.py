"""History: search, compare, replay, fork, export, and `ps --tree` lineage.

Every command reads the DuckDB projections through the running projector (`commands.query`),
or starts the embedded system for its own duration, like `corral sql`. Replay and fork append a
new `execution.requested` built from the recorded one and follow it like `corral run`.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import difflib
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson
from nats.aio.msg import Msg

from actors.approver import DecisionRefused, submit_decision
from corral import render
from corral.commands import TERMINAL_TYPES, _run_and_follow, cmd_ps
from corral.errors import NotFound, UsageError
from corral.home import Home, SystemLock
from corral.ops.base import (
    check_command,
    export_query,
    info,
    parse_since,
    query,
    resolve_execution_id,
    start_background_system,
)
from corral.system import System, open_system
from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import execution_events
from events.types import EVENT_TYPES, ApprovalDecisionSubmitted, ExecutionRequested, InputRequested
from replay.history import follow

DEFAULT_LIMIT: Final = 50
SNIPPET_BEFORE: Final = 40
SNIPPET_AFTER: Final = 80
SECRET_NAME: Final = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

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

    compare = sub.add_parser("compare", help="two executions side by side: outcome, cost, files, tree diff, timeline")
    compare.add_argument("a", metavar="EXEC_A")
    compare.add_argument("b", metavar="EXEC_B")
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

    ps = sub.choices.get("ps")
    if ps is not None:
        ps.add_argument("--tree", action="store_true", help="every execution, with replays, forks and retries nested")
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


def sql_text(value: str) -> str:
    """Quote a string as a DuckDB literal."""
    if "\0" in value:
        raise UsageError("text must not contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


async def rows(system: System, sql: str, *, max_rows: int = 100000) -> list[dict[str, Any]]:
    result = await query(system, sql, max_rows=max_rows)
    return render.records(result["columns"], result["rows"])


def _since_filter(text: str | None, *, ts: str = "ts", seq: str = "seq") -> str:
    if not text:
        return ""
    since = parse_since(text)
    if "start_seq" in since:
        return f"{seq} >= {int(since['start_seq'])}"
    return f"{ts} >= {sql_text(since['start_time'].isoformat())}::TIMESTAMPTZ"


def _type_filter(event_type: str | None) -> str:
    if not event_type:
        return ""
    if event_type.endswith("*"):
        prefix = event_type.rstrip("*")
        if not any(name.startswith(prefix) for name in EVENT_TYPES):
            raise UsageError(f"no event type starts with {prefix!r}; `corral schema --list` names them")
        return f"starts_with(type, {sql_text(prefix)})"
    if event_type not in EVENT_TYPES:
        raise UsageError(f"unknown event type {event_type!r}; `corral schema --list` names them")
    return f"type = {sql_text(event_type)}"


def check_regex(pattern: str) -> None:
    """Raise a UsageError naming the problem when DuckDB (RE2) cannot compile the pattern."""
    con = duckdb.connect()
    try:
        con.execute("SELECT regexp_matches('', ?)", [pattern])
    except duckdb.Error as exc:
        detail = str(exc).split("Error:", 1)[-1].strip()
        raise UsageError(f"invalid regular expression {pattern!r}: {detail}") from None
    finally:
        con.close()


def snippet(text: str, pattern: str, *, regex: bool) -> str:
    """A short piece of `text` around the first match, on one line."""
    try:
        match = re.search(pattern if regex else re.escape(pattern), text, 0 if regex else re.IGNORECASE)
    except re.error:  # RE2 syntax Python does not know: show the start
        match = None
    start, end = (match.start(), match.end()) if match else (0, 0)
    lo, hi = max(start - SNIPPET_BEFORE, 0), min(end + SNIPPET_AFTER, len(text))
    piece = text[lo:hi].replace("\r", "").replace("\n", "⏎").replace("\t", " ")
    return ("…" if lo > 0 else "") + piece + ("…" if hi < len(text) else "")


# --- search ------------------------------------------------------------------------------------


Fetch = Callable[[str], Awaitable[list[dict[str, Any]]]]


_BREAKS: Final = frozenset("^$.()")
_QUANTIFIERS: Final = frozenset("*?{")
_CANDIDATES: Final = 2000  # at most this many events are named by sequence number; more are scanned


def required_literal(pattern: str) -> str | None:
    """The longest run of plain characters (3 or more) that every match of `pattern` contains, or
    None when there is none or the pattern is beyond this simple reading (alternation, flags and
    (?...) groups, \\x \\p \\Q and numbered escapes, POSIX classes). Only runs outside groups
    count, and a character a quantifier makes optional is dropped, so the run is certain.

    `contains(text, run)` is a cheap, exact prefilter to RE2 (DuckDB does not extract literals).
    """
    if "|" in pattern or "(?" in pattern or "[:" in pattern or re.search(r"\\[xpPQ0-9]", pattern):
        return None
    best, run, depth, i = "", "", 0, 0
    while i < len(pattern):
        c = pattern[i]
        literal = None
        if c == "\\":
            escaped = pattern[i + 1 : i + 2]
            if escaped and not escaped.isalnum():
                literal = escaped
            i += 2
        elif c == "[":  # a class: skip it ("[]" and "[^]" start with a literal "]")
            i += 2 if pattern[i + 1 : i + 2] == "]" else 3 if pattern[i + 1 : i + 3] == "^]" else 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c in _QUANTIFIERS:  # the character before it was left out of the run already
            if c == "{":
                end = pattern.find("}", i)
                if end < 0:
                    return None
                i = end
            i += 1
        else:
            depth += c == "("
            depth -= c == ")"
            literal = None if c in _BREAKS or c == "+" else c
            i += 1
        if literal is not None and depth == 0 and pattern[i : i + 1] not in _QUANTIFIERS:
            run += literal
            best = max(best, run, key=len)
        else:
            if literal is not None and depth == 0 and pattern[i : i + 1] == "+":
                best = max(best, run + literal, key=len)
            run = ""
    return best if len(best) >= 3 else None


HIT_KEYS: Final = ("seq", "execution_id", "ts", "type", "text")


def _with_candidates(output_sql: str, filters: list[str], literal: str, limit: int) -> str:
    """The output hits of `output_sql`, each with `others`: how many other events could still be
    among the newest `limit` (newer than the oldest hit when there are `limit` hits) and may match
    (their lowercased payload in `search` contains the literal); one row of NULLs and `others`
    when there is no output hit. Most often `others` is 0 and this is the search's only query.
    """
    needle = f"lower({sql_text(literal)})"  # lower() maps each character alone, as in _regex_other_events
    candidate = f"CASE WHEN type <> 'output' THEN contains(text, {needle}) END"  # the type filter first
    where = " AND ".join([*filters, "type <> 'output'", candidate])
    return (
        f"WITH o AS ({output_sql}), "
        f"b AS (SELECT CASE WHEN count(*) >= {limit} THEN min(seq) ELSE 0 END AS s FROM o), "
        f"c AS (SELECT count(*) AS others FROM search JOIN b ON search.seq > b.s WHERE {where}) "
        "SELECT o.*, c.others FROM c LEFT JOIN o ON true ORDER BY o.seq DESC"
    )


async def _regex_other_events(
    fetch: Fetch, filters: list[str], pattern: str, literal: str | None, hits: list[dict[str, Any]], limit: int
) -> list[dict[str, Any]]:
    """The newest `limit` events other than output whose payload matches `pattern` (SQL-quoted).

    Reading `events.data` decompresses whole row groups, output payloads included (most of
    them): the cost of a full scan, whatever the type filter. Two things avoid most of it. With
    `limit` output hits already, only newer events can still be among the newest: the seq bound
    lets DuckDB skip older row groups by their zone maps. And with a literal every match
    contains, the `search` table (the lowercased payloads, uncompressed, so a type filter reads
    only those rows) names the few candidates first; often none, and `events` is not read.
    """
    where = [*filters, "type <> 'output'"]
    if len(hits) >= limit:
        where.append(f"seq > {min(int(h['seq']) for h in hits)}")
    if literal:
        # lower() maps each character alone: a payload containing `literal` contains it lowercased
        needle = f"lower({sql_text(literal)})"
        found = await fetch(
            f"SELECT count(*) AS n, CASE WHEN count(*) <= {_CANDIDATES} THEN list(seq) END AS seqs FROM search "
            f"WHERE {' AND '.join(where)} AND CASE WHEN type <> 'output' THEN contains(text, {needle}) END"
        )
        if not found or not found[0]["n"]:
            return []
        if found[0]["seqs"]:
            seqs = [int(s) for s in found[0]["seqs"]]
            where.append(f"seq BETWEEN {min(seqs)} AND {max(seqs)} AND seq IN ({', '.join(map(str, seqs))})")
        where.append(f"contains(CAST(data AS VARCHAR), {sql_text(literal)})")
    where.append(f"regexp_matches(CAST(data AS VARCHAR), {pattern})")
    return await fetch(
        f"SELECT seq, execution_id, ts, type, CAST(data AS VARCHAR) AS text FROM events "
        f"WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT {limit}"
    )


async def search(
    fetch: Fetch,
    text: str,
    *,
    regex: bool,
    execution_id: str | None,
    event_type: str | None,
    since: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The newest `limit` hits as {seq, execution_id, ts, type, text}; `fetch` runs one SQL query.

    A plain text is found in the `search` table (lowercased text of every event, stored
    uncompressed): one substring scan, newest first with a LIMIT (DuckDB's top-N), filters
    first. Only then are the hits' original texts read, by sequence number. A regular
    expression runs on the original text (case matters unless it says (?i)): output rows, and
    the payloads of the other events.
    """
    filters = [f for f in (_type_filter(event_type), _since_filter(since)) if f]
    if execution_id:
        filters.append(f"execution_id = {sql_text(execution_id)}")
    order = f"ORDER BY seq DESC LIMIT {limit}"
    if not regex:
        where = " AND ".join([*filters, f"contains(text, {sql_text(text.lower())})"])
        hits = await fetch(f"SELECT seq, execution_id, ts, type FROM search WHERE {where} {order}")
        output = [h["seq"] for h in hits if h["type"] == "output"]
        others = [h["seq"] for h in hits if h["type"] != "output"]
        texts: dict[int, str] = {}
        if output:
            found = await fetch(f"SELECT seq, text FROM output WHERE seq IN ({', '.join(map(str, output))})")
            texts.update((r["seq"], r["text"]) for r in found)
        if others:
            found = await fetch(
                f"SELECT seq, CAST(data AS VARCHAR) AS text FROM events WHERE seq IN ({', '.join(map(str, others))})"
            )
            texts.update((r["seq"], r["text"]) for r in found)
        return [{**h, "text": texts.get(h["seq"], "")} for h in hits]
    pattern = sql_text(text)
    literal = required_literal(text)
    prefix = (event_type or "").rstrip("*")
    hits = []
    payloads = event_type != "output"  # the other events' payloads are searched too
    if event_type is None or event_type == "output" or (event_type.endswith("*") and "output".startswith(prefix)):
        must = [f"contains(text, {sql_text(literal)})"] if literal else []
        where = " AND ".join([*filters, *must, f"regexp_matches(text, {pattern})"])
        sql = f"SELECT seq, execution_id, ts, 'output' AS type, text FROM output WHERE {where} {order}"
        if payloads and literal:
            found = await fetch(_with_candidates(sql, filters, literal, limit))
            hits = [{k: r[k] for k in HIT_KEYS} for r in found if r["seq"] is not None]
            payloads = bool(found and found[0]["others"])
        else:
            hits = await fetch(sql)
    if payloads:
        hits += await _regex_other_events(fetch, filters, pattern, literal, hits, limit)
    return sorted(hits, key=lambda h: -int(h["seq"]))[:limit]


async def search_hits(
    system: System,
    text: str,
    *,
    regex: bool = False,
    execution_id: str | None = None,
    event_type: str | None = None,
    since: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """`corral search` (and GET /api/search): checked input, the hits with their snippets."""
    if not text:
        raise UsageError("nothing to search for; give TEXT")
    if limit < 1:
        raise UsageError("--limit must be 1 or more")
    if regex:
        check_regex(text)
    sql_text(text)
    _type_filter(event_type)
    _since_filter(since)

    async def fetch(sql: str) -> list[dict[str, Any]]:
        return await rows(system, sql, max_rows=limit)

    hits = await search(
        fetch, text, regex=regex, execution_id=execution_id, event_type=event_type, since=since, limit=limit
    )
    return [
        {
            **{k: hit[k] for k in ("seq", "execution_id", "ts", "type", "text")},
            "snippet": snippet(hit["text"] or "", text, regex=regex),
        }
        for hit in hits
    ]


async def cmd_search(home: Home, args: Any) -> int:
    if not args.text:
        raise UsageError("nothing to search for; give TEXT")
    if args.limit < 1:
        raise UsageError("--limit must be 1 or more")
    if args.regex:
        check_regex(args.text)
    sql_text(args.text)  # bad input is said before anything starts
    _type_filter(args.event_type)
    _since_filter(args.since)
    async with open_system(home, actors=("projector",)) as system:
        execution_id = await resolve_execution_id(system, args.execution_id) if args.execution_id else None
        hits = await search_hits(
            system,
            args.text,
            regex=args.regex,
            execution_id=execution_id,
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
    async with open_system(home, actors=("projector",)) as system:
        found = await rows(
            system,
            "SELECT execution_id, state, exit_code, signal, requested_at, duration_s, command, replay_of, fork_of, "
            "fork_checkpoint, retry_of, (SELECT any_value(r.data->>'resume_session') FROM events r "
            "WHERE r.execution_id = executions.execution_id AND r.type = 'execution.requested') AS resume_session "
            "FROM executions ORDER BY requested_at, execution_id",
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


async def recorded_request(system: System, execution_id: str) -> ExecutionRequested:
    found = await rows(
        system,
        f"SELECT data FROM events WHERE execution_id = {sql_text(execution_id)} "
        "AND type = 'execution.requested' ORDER BY seq LIMIT 1",
    )
    if not found:
        raise NotFound(f"{execution_id} has no recorded request in the projections")
    return ExecutionRequested.model_validate(orjson.loads(found[0]["data"]))


async def execution_row(system: System, execution_id: str) -> dict[str, Any]:
    found = await rows(system, f"SELECT * FROM executions WHERE execution_id = {sql_text(execution_id)}")
    if not found:
        raise NotFound(f"{execution_id} is not in the projections yet")
    return found[0]


def without_secrets(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    kept = {k: v for k, v in env.items() if not SECRET_NAME.search(k)}
    return kept, sorted(set(env) - set(kept))


def _require_commit(repo: str, commit: str, what: str) -> None:
    if not os.path.isdir(repo):
        raise UsageError(f"the repository {repo} is gone")
    if not _commit_exists(repo, commit):
        raise UsageError(f"{what} is no longer in {repo}")


def _commit_exists(repo: str, commit: str) -> bool:
    result = subprocess.run(
        ["git", "-C", repo, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, check=False
    )
    return result.returncode == 0


async def _start(home: Home, system: System, execution_id: str, request: ExecutionRequested, args: Any) -> int:
    """Publish the request and follow it like `corral run` (or print the id with --detach)."""
    if args.detach:
        await system.bus.publisher.publish(new_event(execution_id, request, actor="cli"))
        print(execution_id)
        return 0
    return await _run_and_follow(system, execution_id, request, quiet=args.quiet)


@contextlib.asynccontextmanager
async def _system_for(home: Home, detach: bool) -> Any:
    """A system to run on: with --detach, a background `corral up` (started if none runs)."""
    if detach and not SystemLock(home).is_held_elsewhere():
        pid = start_background_system(home)
        info(f"started a background system (corral up, pid {pid}, log {home.up_log}); stop it with `corral down`")
    async with open_system(home) as system:
        yield system


# --- replay ------------------------------------------------------------------------------------


async def cmd_replay(home: Home, args: Any) -> int:
    if not args.speed > 0:
        raise UsageError("--speed must be more than 0")
    async with open_system(home, actors=("projector",)) as system:
        original = await resolve_execution_id(system, args.execution_id)
        request, inputs, decisions = await _replay_plan(system, original, ask_approvals=args.ask_approvals)
    if args.detach and (inputs or any(d is not None for d in decisions)):
        info(
            f"{original} had {len(inputs)} input(s) and {len(decisions)} approval(s); "
            "--detach does not re-send them (run without --detach to replay them)"
        )
    execution_id = new_execution_id()
    async with _system_for(home, args.detach) as system:
        if not args.quiet:
            info(f"{execution_id}: replay of {original} from {request.base[:12]}")
        if args.detach:
            return await _start(home, system, execution_id, request, args)
        return await _start_feeding(home, system, execution_id, request, args, inputs, decisions, args.speed)


async def _start_feeding(
    home: Home,
    system: System,
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
    feeder = asyncio.create_task(_feed(system, execution_id, inputs, decisions, speed, done, by=by))
    try:
        code = await _start(home, system, execution_id, request, args)
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await feeder
    if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
        info(f"{execution_id}: re-sending inputs or approvals failed: {feeder.exception()}")
    return code


async def _replay_plan(
    system: System, original: str, *, ask_approvals: bool
) -> tuple[ExecutionRequested, list[tuple[float, str]], list[dict[str, Any] | None]]:
    recorded = await recorded_request(system, original)
    row = await execution_row(system, original)
    base = row.get("base_commit") or recorded.base
    _require_commit(recorded.repo, base, f"the base commit {base} of {original}")
    env, dropped = without_secrets(dict(recorded.env))
    if dropped:
        info(f"not replaying secret-looking environment: {', '.join(dropped)}")
    request = recorded.model_copy(
        update={
            "base": base,
            "env": env,
            "replay_of": original,
            "fork_of": None,
            "fork_checkpoint": None,
            "attempt": 1,
            "retry_of": None,
            "requested_by": os.environ.get("USER"),
        }
    )
    inputs, _ = await recorded_inputs(system, original)
    approvals = await rows(
        system,
        f"SELECT status, choice, note, decided_by FROM approvals WHERE execution_id = {sql_text(original)} "
        "ORDER BY requested_seq NULLS LAST",
    )
    decisions: list[dict[str, Any] | None] = []
    for approval in approvals:
        if ask_approvals or approval["status"] not in ("granted", "denied"):
            decisions.append(None)
        else:
            decisions.append(
                {
                    "approve": approval["status"] == "granted",
                    "choice": approval["choice"],
                    "note": approval["note"],
                    "decided_by": f"replay of {original}"
                    + (f" ({approval['decided_by']})" if approval["decided_by"] else ""),
                }
            )
    return ExecutionRequested.model_validate(request.model_dump()), inputs, decisions


async def recorded_inputs(
    system: System, original: str, *, before_seq: int | None = None
) -> tuple[list[tuple[float, str]], int]:
    """The inputs delivered to `original` as (offset from its start, text), in order, and how many came later.

    Only those delivered before the event `before_seq` (a fork's checkpoint) when given; the
    count is of those at or after it. Approval lines Corral wrote to the agent are left out: a
    replay's or fork's approvals get their own lines.
    """
    found = await rows(
        system, f"SELECT seq, offset_s, text FROM inputs WHERE execution_id = {sql_text(original)} ORDER BY seq"
    )
    kept = [r for r in found if not _approval_line(str(r["text"]))]
    before = [r for r in kept if before_seq is None or int(r["seq"]) < before_seq]
    return [(float(r["offset_s"] or 0.0), str(r["text"])) for r in before], len(kept) - len(before)


def _approval_line(text: str) -> bool:
    """Is a delivered input one of the approval lines Corral wrote to the agent (actors/approver.approval_line)?

    Re-sent, the original's `approval_registered` / `approval_decision` would answer the replay's
    agent with the original's approval, past the replay's own (and past --ask-approvals).
    """
    try:
        line = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(line, dict) and line.get("corral") in ("approval_registered", "approval_decision")


async def _feed(
    system: System,
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
    publisher = system.bus.publisher
    pending: set[asyncio.Task[None]] = set()
    asked = 0

    async def send_inputs(started: datetime) -> None:
        for offset, text in inputs:
            delay = (started.timestamp() + offset / speed) - datetime.now(UTC).timestamp()
            if delay > 0:
                await asyncio.sleep(delay)
            await publisher.publish(new_event(execution_id, InputRequested(text=text, requested_by=by), actor="cli"))

    async def on_event(seq: int, msg: Msg) -> bool:
        nonlocal asked
        kind = msg.subject.split(".", 3)[3]
        if kind == "output":
            return False
        event = orjson.loads(msg.data)
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
                    await submit_decision(system.bus, execution_id, submitted, causation_id=event["id"])
                except DecisionRefused as exc:
                    info(f"{execution_id}: the recorded decision of {submitted.approval_id} was not re-sent: {exc}")
        return kind in TERMINAL_TYPES

    try:
        await follow(system.bus.js, execution_events(execution_id), on_event, done=done)
    finally:
        for task in pending:
            task.cancel()


# --- fork --------------------------------------------------------------------------------------


async def find_checkpoint(system: System, execution_id: str, at: str) -> dict[str, Any]:
    """The checkpoint `at` (a number, refs/corral/<id>/<n>, <id>/<n> or a commit) of execution_id."""
    text = at.strip()
    match = re.fullmatch(r"(?:refs/corral/)?([a-z0-9]{8})/(\d+)", text)
    if text.isdigit():
        where = f"execution_id = {sql_text(execution_id)} AND n = {int(text)}"
    elif match:
        where = f"execution_id = {sql_text(match.group(1))} AND n = {int(match.group(2))}"
    elif re.fullmatch(r"[0-9a-f]{4,40}", text):
        where = f'starts_with("commit", {sql_text(text)})'
    else:
        raise UsageError(f"--at expects a checkpoint number, refs/corral/<id>/<n> or a commit; got {at!r}")
    found = await rows(system, f'SELECT execution_id, n, seq, ref, "commit", tree FROM checkpoints WHERE {where}')
    if not found:
        listed = await rows(
            system, f"SELECT n FROM checkpoints WHERE execution_id = {sql_text(execution_id)} ORDER BY n"
        )
        have = ", ".join(str(r["n"]) for r in listed) or "none"
        raise NotFound(f"{execution_id} has no checkpoint {at!r} (its checkpoints: {have})")
    owners = sorted({r["execution_id"] for r in found})
    if owners != [execution_id]:
        raise UsageError(
            f"checkpoint {at!r} belongs to {', '.join(owners)}, not {execution_id}; "
            f"fork that execution instead (corral fork {owners[0]} --at ...)"
        )
    if len(found) > 1:
        raise UsageError(f"{at!r} matches {len(found)} checkpoints of {execution_id}; give its number")
    return found[0]


def _with_prompt(command: tuple[str, ...], task: str | None, prompt: str) -> tuple[str, ...]:
    """The original command with the argument that was its task replaced by the prompt."""
    if not task or task not in command[1:]:
        raise UsageError(
            "--prompt replaces the argument that was the original task, but "
            + ("it was run without --task" if not task else f"{task!r} is not one of its arguments")
            + "; give the whole command instead: corral fork ID --at N -- COMMAND..."
        )
    return tuple(prompt if part == task else part for part in command)


@dataclasses.dataclass
class ForkPlanned:
    """A fork's request, and what the CLI says and re-sends around it."""

    request: ExecutionRequested
    checkpoint: dict[str, Any]
    inputs: list[tuple[float, str]]  # the original's inputs before the checkpoint, at their offsets
    later: int  # how many it got after
    continues: str | None  # the agent session continued
    not_continued: str | None  # why the conversation is not continued


async def plan_fork(
    system: System,
    original: str,
    *,
    at: str,
    prompt: str | None = None,
    command: list[str] | None = None,
    new_session: bool = False,
    requested_by: str | None = None,
) -> ForkPlanned:
    """The request of a fork of `original` at checkpoint `at` (the same command, another command, or
    a new prompt for its agent, continuing its session unless `new_session`): checked, not sent."""
    from corral import followup  # (it imports this module)

    if command and prompt is not None:
        raise UsageError("give either --prompt or -- COMMAND, not both")
    if new_session and prompt is None:
        raise UsageError("--new-session goes with --prompt TEXT (the task of the new conversation)")
    recorded = await recorded_request(system, original)
    checkpoint = await find_checkpoint(system, original, at)
    inputs, later = await recorded_inputs(system, original, before_seq=int(checkpoint["seq"]))
    wanted = prompt is not None and recorded.agent != "command" and not new_session
    session = await followup.recorded_session(system, original) if wanted else None
    _require_commit(recorded.repo, checkpoint["commit"], f"checkpoint {checkpoint['n']} ({checkpoint['commit'][:12]})")
    update: dict[str, Any] = {
        "base": checkpoint["commit"],
        "env": without_secrets(dict(recorded.env))[0],
        "fork_of": original,
        "fork_checkpoint": int(checkpoint["n"]),
        "replay_of": None,
        "attempt": 1,
        "retry_of": None,
        "requested_by": requested_by or os.environ.get("USER"),
        "resume_of": None,  # a fork of a follow-up runs in its own new worktree, not the follow-up's
        "resume_session": None,
        "worktree": None,
    }
    not_continued = continues = None
    if command:
        update["command"] = tuple(check_command(command, Path(recorded.repo), checkpoint["commit"]))
    elif prompt is not None and recorded.agent == "command":
        update["command"] = _with_prompt(recorded.command, recorded.task, prompt)
        update["task"] = prompt
        not_continued = None if new_session else f"{original} ran a plain command, which has no agent session"
    elif prompt is not None:  # an agent CLI: its adapter builds the command, continuing the session if it can
        plan = followup.plan_fork(
            original, recorded, session, prompt, commit=checkpoint["commit"], new_session=new_session
        )
        update["command"] = tuple(check_command(list(plan.command), Path(recorded.repo), checkpoint["commit"]))
        update["task"] = prompt
        update["resume_session"] = plan.session
        not_continued, continues = plan.not_continued, plan.continues
    request = ExecutionRequested.model_validate({**recorded.model_dump(), **update})
    return ForkPlanned(request, checkpoint, inputs, later, continues, not_continued)


async def cmd_fork(home: Home, args: Any) -> int:
    args, command = fork_arguments(args)
    if command and args.prompt is not None:
        raise UsageError("give either --prompt or -- COMMAND, not both")
    if args.new_session and args.prompt is None:
        raise UsageError("--new-session goes with --prompt TEXT (the task of the new conversation)")
    async with open_system(home, actors=("projector",)) as system:
        original = await resolve_execution_id(system, args.execution_id)
        planned = await plan_fork(
            system, original, at=args.at, prompt=args.prompt, command=command, new_session=args.new_session
        )
    request, checkpoint, inputs, later = planned.request, planned.checkpoint, planned.inputs, planned.later
    continues, not_continued = planned.continues, planned.not_continued
    execution_id = new_execution_id()
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
    async with _system_for(home, args.detach) as system:
        if not args.quiet:
            continued = f", continuing {continues}" if continues else ""
            info(
                f"{execution_id}: fork of {original} at checkpoint {checkpoint['n']} "
                f"({checkpoint['commit'][:12]}){continued}"
            )
        if resend:  # at their offsets from the fork's start, as `corral replay` does
            return await _start_feeding(home, system, execution_id, request, args, resend, [], 1.0, by="fork")
        return await _start(home, system, execution_id, request, args)


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


def _collapse(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of the same type become one entry with a count (95 output chunks: one line)."""
    out: list[dict[str, Any]] = []
    for event in events:
        if out and out[-1]["type"] == event["type"]:
            out[-1]["count"] += 1
        else:
            out.append({"type": event["type"], "offset_s": event["offset_s"], "count": 1})
    return out


def align(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair the two collapsed timelines by event type (a diff of their type sequences)."""
    pairs: list[dict[str, Any]] = []
    matcher = difflib.SequenceMatcher(a=[e["type"] for e in a], b=[e["type"] for e in b], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs += [{"a": a[i], "b": b[j]} for i, j in zip(range(i1, i2), range(j1, j2), strict=True)]
        else:
            left, right = a[i1:i2], b[j1:j2]
            for k in range(max(len(left), len(right))):
                pairs.append({"a": left[k] if k < len(left) else None, "b": right[k] if k < len(right) else None})
    return pairs


async def _summary(system: System, execution_id: str) -> dict[str, Any]:
    row = await execution_row(system, execution_id)
    quoted = sql_text(execution_id)
    checkpoints = await rows(
        system,
        'SELECT n, "commit", tree, trigger, files, added, deleted FROM checkpoints '
        f"WHERE execution_id = {quoted} ORDER BY n",
    )
    files = await rows(
        system, f"SELECT path, change, added, deleted FROM files_changed WHERE execution_id = {quoted} ORDER BY path"
    )
    events = await rows(
        system,
        f"SELECT type, epoch(ts) - epoch(min(ts) OVER ()) AS offset_s FROM events WHERE execution_id = {quoted} "
        "ORDER BY seq",
    )
    sessions = await rows(
        system,
        "SELECT max_by(data->>'session_id', seq) FILTER (WHERE type = 'session.started') AS session_id, "
        "any_value(data->>'resume_session') FILTER (WHERE type = 'execution.requested') AS resume_session "
        f"FROM events WHERE execution_id = {quoted} AND type IN ('session.started', 'execution.requested')",
    )
    return {
        "execution_id": execution_id,
        "command": row["command"],
        "repo": row["repo"],
        "base": row["base"],
        "base_commit": row["base_commit"],
        "state": row["state"],
        "exit_code": row["exit_code"],
        "signal": row["signal"],
        "exit_reason": row["exit_reason"],
        "duration_s": row["duration_s"],
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "cost_usd": row["cost_usd"],
        "output_bytes": row["output_bytes"],
        "checkpoints": checkpoints,
        "final_commit": row["final_commit"],
        "final_tree": row["final_tree"],
        "files_changed": files,
        "replay_of": row["replay_of"],
        "fork_of": row["fork_of"],
        "session_id": sessions[0]["session_id"] if sessions else None,  # its own agent session
        "resume_session": sessions[0]["resume_session"] if sessions else None,  # the one it continued
        "timeline": _collapse(events),
    }


def tree_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`git diff --stat` between the two final checkpoints (in A's repository)."""
    if not a["final_commit"] or not b["final_commit"]:
        missing = a["execution_id"] if not a["final_commit"] else b["execution_id"]
        return {
            "same_tree": None,
            "stat": None,
            "error": f"{missing} has no checkpoint (`corral checkpoint {missing}`)",
        }
    if a["final_tree"] == b["final_tree"]:
        return {"same_tree": True, "stat": "", "error": None}
    repo = a["repo"]
    for candidate in (a["repo"], b["repo"]):
        if candidate and _commit_exists(candidate, a["final_commit"]) and _commit_exists(candidate, b["final_commit"]):
            repo = candidate
            break
    else:
        return {"same_tree": False, "stat": None, "error": "the two final checkpoints are not in one repository"}
    result = subprocess.run(
        ["git", "-C", repo, "diff", "--stat", "--no-color", a["final_commit"], b["final_commit"]],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return {"same_tree": False, "stat": None, "error": result.stderr.strip().splitlines()[-1:]}
    return {"same_tree": False, "stat": result.stdout.rstrip(), "error": None}


async def compare_executions(system: System, a_id: str, b_id: str) -> dict[str, Any]:
    """`corral compare --json` (and GET /api/compare): both summaries, their tree diff, the aligned timeline."""
    a, b = await _summary(system, a_id), await _summary(system, b_id)
    diff = tree_diff(a, b)
    timeline = align(a.pop("timeline"), b.pop("timeline"))
    return {"a": a, "b": b, "tree_diff": diff, "timeline": timeline}


async def cmd_compare(home: Home, args: Any) -> int:
    async with open_system(home, actors=("projector",)) as system:
        a_id = await resolve_execution_id(system, args.a)
        b_id = await resolve_execution_id(system, args.b)
        compared = await compare_executions(system, a_id, b_id)
    if args.json:
        render.print_json(compared)
        return 0
    a, b, diff, timeline = compared["a"], compared["b"], compared["tree_diff"], compared["timeline"]

    def outcome(s: dict[str, Any]) -> str:
        if s["signal"] is not None:
            return f"{s['state']} (signal {s['signal']})"
        return f"{s['state']} (exit {s['exit_code']}, {s['exit_reason'] or '-'})"

    def session(s: dict[str, Any]) -> str:
        continued = f" (continues {s['resume_session']})" if s["resume_session"] else ""
        return f"{s['session_id'] or '-'}{continued}"

    def files(s: dict[str, Any]) -> str:
        return f"{len(s['files_changed'])} " + render.cell(", ".join(f["path"] for f in s["files_changed"][:5]))

    lines = [
        ("execution", a["execution_id"], b["execution_id"]),
        ("command", render.cell(a["command"]), render.cell(b["command"])),
        ("base", f"{a['base']} {(a['base_commit'] or '')[:12]}", f"{b['base']} {(b['base_commit'] or '')[:12]}"),
        ("outcome", outcome(a), outcome(b)),
        ("duration", render.human_duration(a["duration_s"]), render.human_duration(b["duration_s"])),
        (
            "tokens in/out",
            f"{a['input_tokens'] or 0:,}/{a['output_tokens'] or 0:,}",
            f"{b['input_tokens'] or 0:,}/{b['output_tokens'] or 0:,}",
        ),
        ("cost", f"${a['cost_usd'] or 0:.4f}", f"${b['cost_usd'] or 0:.4f}"),
        ("checkpoints", str(len(a["checkpoints"])), str(len(b["checkpoints"]))),
        ("session", session(a), session(b)),
        ("final tree", (a["final_tree"] or "-")[:12], (b["final_tree"] or "-")[:12]),
        ("files changed", files(a), files(b)),
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

    def side(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return ""
        count = f" ×{entry['count']}" if entry["count"] > 1 else ""
        return f"+{entry['offset_s']:.1f}s {entry['type']}{count}"

    width = max([len(side(p["a"])) for p in timeline] + [1])
    for pair in timeline:
        mark = " " if pair["a"] and pair["b"] else "≠"
        print(f"  {side(pair['a']).ljust(width)}  {mark}  {side(pair['b'])}".rstrip())
    return 0
