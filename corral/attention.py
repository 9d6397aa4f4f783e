"""Why an execution stopped or paused, and what about it needs a human (issue 19, items 3 and 4).

`ps`, `status` and the summary of `corral run` show the same two things, computed here from the
projections with one query each:

- **reason**: why it ended or is paused, in words: `cancelled by alice`, `idle timeout`,
  `network unreachable` (an agent CLI that never reached its model),
  `hard timeout`, `disk limit (120 MB > 100 MB)`, `approval ap-… denied`, `stalled`,
  `policy: secrets: …`. It is read from the request that stopped it (`cancel.requested`,
  `pause.requested`, their reason and who asked) and from `limit.exceeded`, since the exit itself
  only says `cancelled` or `timeout` and a signal number.
- **attention**: failed validations (the critical ones counted apart) and pending approvals, which
  can arrive after the agent has exited (the exit checkpoint is validated then).
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from events.types import STOP_TYPES

Query = Callable[[str], Awaitable[dict[str, Any]]]


def _ids(execution_ids: Sequence[str]) -> str:
    # execution ids are 8 lowercase Crockford characters (validated before they get here)
    return ", ".join(f"'{e}'" for e in execution_ids if e.isalnum())


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _limit_text(data: dict[str, Any]) -> str:
    limit, value, maximum = data.get("limit"), data.get("value"), data.get("maximum")
    if limit in ("memory", "disk") and isinstance(value, int | float) and isinstance(maximum, int | float):
        return f"{limit} limit ({_size(value)} > {_size(maximum)})"
    if limit == "cost" and isinstance(value, int | float) and isinstance(maximum, int | float):
        return f"cost budget (${value:.4f} > ${maximum:.2f})"
    return f"{limit} limit"


def _request_text(kind: str, data: dict[str, Any], actor: str | None) -> str:
    reason = data.get("reason")
    who = data.get("requested_by") or ("" if actor in (None, "cli") else actor)
    verb = "cancelled" if kind == "cancel.requested" else "paused"
    if reason and who in ("watchdog", "validator", "approver", "checkpointer"):
        return str(reason)  # the actor's reason says it all: "idle timeout", "policy: ...", "approval ... denied"
    if reason:
        return f"{verb}: {reason}" + (f" (by {who})" if who else "")
    return f"{verb} by {who}" if who else f"{verb} by an operator"


def describe(row: dict[str, Any], last: dict[str, Any] | None) -> str | None:
    """The reason for one executions row, given its last stopping event (type, data, actor)."""
    state = row.get("state")
    kind = last["type"] if last else None
    data = last["data"] if last else {}
    if state == "paused":
        if kind == "limit.exceeded":
            return _limit_text(data)
        if kind == "pause.requested":
            return _request_text(kind, data, last.get("actor") if last else None)
        return "paused"
    if state not in ("exited", "failed"):
        return None
    if state == "failed":
        return str(row.get("error") or "failed")
    reason = row.get("exit_reason")
    if reason == "timeout":
        return "hard timeout"
    if reason == "cancelled":
        if kind == "cancel.requested":
            return _request_text(kind, data, last.get("actor") if last else None)
        if kind == "limit.exceeded":
            return _limit_text(data)
        return "cancelled"
    if reason in ("lost", "spawner_stopped"):
        return {"lost": "lost (its shim died)", "spawner_stopped": "stopped with its spawner"}[str(reason)]
    if kind == "limit.exceeded":  # it ended on its own after hitting a limit (e.g. out of memory)
        return f"exited after {_limit_text(data)}"
    return None


async def reasons(query: Query, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """execution id -> reason, for the rows (from `executions`) that stopped or paused."""
    wanted = [r["execution_id"] for r in rows if r.get("state") in ("paused", "exited", "failed")]
    if not wanted:
        return {}
    kinds = ", ".join(f"'{k}'" for k in STOP_TYPES)
    result, unreachable = await asyncio.gather(
        query(
            f"SELECT execution_id, arg_max(type, seq) AS type, arg_max(data, seq) AS data, "
            f"arg_max(actor, seq) AS actor FROM events WHERE execution_id IN ({_ids(wanted)}) "
            f"AND type IN ({kinds}) GROUP BY execution_id"
        ),
        # an agent CLI that could not reach its model (actors/adapters: agent.result failure "network")
        query(
            f"SELECT DISTINCT execution_id FROM events WHERE execution_id IN ({_ids(wanted)}) "
            "AND type = 'agent.result' AND data->>'failure' = 'network'"
        ),
    )
    network = {row[0] for row in unreachable["rows"]}
    last: dict[str, dict[str, Any]] = {}
    for execution_id, kind, data, actor in result["rows"]:
        parsed = orjson.loads(data) if isinstance(data, str | bytes) else (data or {})
        if kind in ("execution.resumed", "execution.timed_out"):
            continue  # a resume ends the pause it followed; a timeout is said by exit_reason
        last[execution_id] = {"type": kind, "data": parsed if isinstance(parsed, dict) else {}, "actor": actor}
    out = {}
    for row in rows:
        if row["execution_id"] in network and row.get("state") in ("exited", "failed"):
            out[row["execution_id"]] = "network unreachable"
            continue
        text = describe(row, last.get(row["execution_id"]))
        if text:
            out[row["execution_id"]] = text
    return out


async def needs(query: Query, execution_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """execution id -> {validations_failed, critical, approvals_pending}, only for those with any."""
    if not execution_ids:
        return {}
    ids = _ids(execution_ids)
    result = await query(
        "SELECT execution_id, sum(failed) AS failed, sum(critical) AS critical, sum(pending) AS pending FROM ("
        f" SELECT execution_id, count(*) FILTER (WHERE NOT passed) AS failed,"
        f"  count(*) FILTER (WHERE critical > 0) AS critical, 0 AS pending"
        f" FROM validations WHERE execution_id IN ({ids}) GROUP BY execution_id"
        " UNION ALL"
        f" SELECT execution_id, 0, 0, count(*) FROM approvals"
        f" WHERE execution_id IN ({ids}) AND (status IS NULL OR status = 'pending') GROUP BY execution_id"
        ") GROUP BY execution_id"
    )
    out = {}
    for execution_id, failed, critical, pending in result["rows"]:
        if failed or pending:
            out[execution_id] = {
                "validations_failed": int(failed or 0),
                "critical": int(critical or 0),
                "approvals_pending": int(pending or 0),
            }
    return out


def needs_text(need: dict[str, int] | None) -> str:
    if not need:
        return ""
    parts = []
    if need["validations_failed"]:
        failed = need["validations_failed"]
        critical = f" ({need['critical']} critical)" if need["critical"] else ""
        parts.append(f"{failed} validation{'s' if failed != 1 else ''} failed{critical}")
    if need["approvals_pending"]:
        n = need["approvals_pending"]
        parts.append(f"{n} approval{'s' if n != 1 else ''} pending")
    return ", ".join(parts)


# --- one query for a page of executions -----------------------------------------------------------

ANNOTATIONS = ("_stop_type", "_stop_data", "_stop_actor", "_unreachable", "_failed", "_critical", "_pending")


# What a listing's page selects besides its own columns, for `annotate`: the last stop and whether
# the agent could not reach its model, kept on each execution's row by the projector
# (events/types.py STOP_TYPES; taken only for a stopped execution, as `describe` reads them).
MARKS = (
    "CASE WHEN state IN ('paused', 'exited', 'failed') THEN last_stop_type END AS _stop_type, "
    "CASE WHEN state IN ('paused', 'exited', 'failed') THEN last_stop_data END AS _stop_data, "
    "CASE WHEN state IN ('paused', 'exited', 'failed') THEN last_stop_actor END AS _stop_actor, "
    "network_unreachable AS _unreachable"
)


def annotated(page_sql: str, order: str) -> str:
    """`page_sql` (a SELECT of `executions` rows, with execution_id, state and `MARKS`) with the
    columns `annotate` turns into each row's reason and attention: one query instead of three (a
    listing pays one round trip to the projector, not four). The last stop and a network failure
    are columns of `executions` (no scan of the events per listing: GET /api/executions, issue 16)."""
    return (
        f"WITH page AS ({page_sql}), "
        "checks AS (SELECT execution_id, count(*) FILTER (WHERE NOT passed) AS _failed, "
        "count(*) FILTER (WHERE critical > 0) AS _critical FROM validations "
        "WHERE execution_id IN (SELECT execution_id FROM page) GROUP BY execution_id), "
        "asks AS (SELECT execution_id, count(*) AS _pending FROM approvals "
        "WHERE (status IS NULL OR status = 'pending') AND execution_id IN (SELECT execution_id FROM page) "
        "GROUP BY execution_id) "
        "SELECT page.*, _failed, _critical, _pending "
        "FROM page LEFT JOIN checks USING (execution_id) LEFT JOIN asks USING (execution_id) "
        f"ORDER BY {order}"
    )


def annotate(rows: list[dict[str, Any]]) -> None:
    """Turn the columns `annotated` added into `reason` and `attention` (as `reasons` and `needs` say)."""
    for row in rows:
        extra = {name: row.pop(name, None) for name in ANNOTATIONS}
        last = None
        kind = extra["_stop_type"]
        if kind and kind not in ("execution.resumed", "execution.timed_out"):
            raw = extra["_stop_data"]
            parsed = orjson.loads(raw) if isinstance(raw, str | bytes) else (raw or {})
            last = {"type": kind, "data": parsed if isinstance(parsed, dict) else {}, "actor": extra["_stop_actor"]}
        if extra["_unreachable"] and row.get("state") in ("exited", "failed"):
            row["reason"] = "network unreachable"
        else:
            row["reason"] = describe(row, last)
        failed, pending = int(extra["_failed"] or 0), int(extra["_pending"] or 0)
        row["attention"] = (
            {"validations_failed": failed, "critical": int(extra["_critical"] or 0), "approvals_pending": pending}
            if failed or pending
            else None
        )
