"""History: search, a run's recorded request and inputs, replay and fork plans, comparison."""

import dataclasses
import difflib
import os
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import orjson

from corral.errors import NotFound, UsageError
from corral.ops import followup
from corral.ops.base import check_command, info, parse_since, recorded_request, rows, sql_text
from corral.system import System
from events.types import EVENT_TYPES, ExecutionRequested

Fetch = Callable[[str], Awaitable[list[dict[str, Any]]]]


SNIPPET_BEFORE: Final = 40


SNIPPET_AFTER: Final = 80


SECRET_NAME: Final = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


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
    import duckdb  # here: a `corral run` does not load DuckDB (its projector's worker process does)

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


def check_search(
    text: str, *, regex: bool = False, event_type: str | None = None, since: str | None = None, limit: int = 100
) -> None:
    """A search's input, checked before anything is read: UsageError with the one line to print."""
    if not text:
        raise UsageError("nothing to search for; give TEXT")
    if limit < 1:
        raise UsageError("--limit must be 1 or more")
    if regex:
        check_regex(text)
    sql_text(text)
    _type_filter(event_type)
    _since_filter(since)


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
    check_search(text, regex=regex, event_type=event_type, since=since, limit=limit)

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


MAX_COMPARED: Final = 10


def align_many(timelines: list[list[dict[str, Any]]]) -> list[list[dict[str, Any] | None]]:
    """Rows of N collapsed timelines paired by event type: each timeline in turn is aligned (as
    `align` does two) against the rows so far, keyed by the type of each row's first entry."""
    rows: list[list[dict[str, Any] | None]] = [[entry] for entry in timelines[0]]
    for k, timeline in enumerate(timelines[1:], 1):
        keys = [next(e for e in row if e is not None)["type"] for row in rows]
        matcher = difflib.SequenceMatcher(a=keys, b=[e["type"] for e in timeline], autojunk=False)
        merged: list[list[dict[str, Any] | None]] = []
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                merged += [[*rows[i], timeline[j]] for i, j in zip(range(i1, i2), range(j1, j2), strict=True)]
            else:
                left, right = rows[i1:i2], timeline[j1:j2]
                for m in range(max(len(left), len(right))):
                    before = left[m] if m < len(left) else [None] * k
                    merged.append([*before, right[m] if m < len(right) else None])
        rows = merged
    return rows


async def compare_many(system: System, execution_ids: list[str]) -> dict[str, Any]:
    """`corral compare A B C ...` (GET /api/compare?ids=A,B,C): every summary, each final tree against
    the first's, the N timelines aligned by event type: {executions, tree_diffs, timeline}."""
    if len(execution_ids) < 2 or len(execution_ids) > MAX_COMPARED:
        raise UsageError(f"compare takes 2 to {MAX_COMPARED} executions; got {len(execution_ids)}")
    if len(set(execution_ids)) < len(execution_ids):
        raise UsageError("an execution is named twice; compare different executions")
    summaries = [await _summary(system, execution_id) for execution_id in execution_ids]
    first = summaries[0]
    diffs = [{"execution_id": s["execution_id"], **tree_diff(first, s)} for s in summaries[1:]]
    timeline = align_many([s.pop("timeline") for s in summaries])
    return {"executions": summaries, "tree_diffs": diffs, "timeline": timeline}
