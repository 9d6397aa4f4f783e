"""Live control and status of one execution: its row, requests confirmed by the actor that owns the
effect (input, pause, resume, cancel, extend, priority), queue place, activity and limits."""

import asyncio
import functools
import getpass
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.aio.msg import Msg

from actors import diskquota
from actors.shim import MAX_INPUT_BYTES, input_too_large
from actors.shim import request as shim_request
from corral import attention
from corral.config import ConfigError, load_config, resolve_run
from corral.errors import Conflict, CorralError, UsageError
from corral.home import Home
from corral.ops.base import query
from corral.rows import records
from corral.system import System
from events.envelope import new_event
from events.stream import MAX_EVENT_BYTES
from events.subjects import execution_events
from events.types import EventData
from replay.history import follow

CONFIRM_TIMEOUT_S = 15.0


RUNNING = ("running", "paused")


QUEUED = ("requested", "queued")


class NotConfirmed(CorralError):
    """No actor confirmed a request in time (the request is recorded)."""

    status = 504


def refusal_text(request: str, execution_id: str, reason: str) -> str:
    """The one line for a refused control request; an adapter's advice (`--resume EXEC_ID`) gets the id."""
    return f"{request.removesuffix('.requested')} of {execution_id} refused: {reason.replace('EXEC_ID', execution_id)}"


def _requester(system: System) -> str:
    """Who asks: the authenticated NATS user, else the OS user (shown as the reason of a stop)."""
    if system.bus.user:
        return str(system.bus.user)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


async def execution_row(system: System, execution_id: str) -> dict[str, Any]:
    result = await query(system, f"SELECT * FROM executions WHERE execution_id = '{execution_id}'")
    rows = records(result["columns"], result["rows"])
    if not rows:
        raise CorralError(f"{execution_id} is not projected yet; try again in a moment")
    return rows[0]


async def agent_activity(system: System, execution_id: str) -> dict[str, Any]:
    """What an agent adapter reported: session, tool calls, files, tokens and cost (actors/adapters)."""
    result = await query(
        system,
        f"""SELECT
            (SELECT agent FROM executions WHERE execution_id = '{execution_id}') AS agent,
            (SELECT last(data->>'session_id' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'session.started') AS session_id,
            (SELECT count(*) FROM events WHERE execution_id = '{execution_id}' AND type = 'tool.called') AS tool_calls,
            (SELECT count(DISTINCT data->>'path') FROM events
              WHERE execution_id = '{execution_id}' AND type = 'file.touched') AS files_touched,
            (SELECT sum(CAST(data->>'input_tokens' AS BIGINT)) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'usage') AS input_tokens,
            (SELECT sum(CAST(data->>'output_tokens' AS BIGINT)) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'usage') AS output_tokens,
            (SELECT CASE WHEN count(*) > 0 AND count(cost_usd) = 0 THEN NULL  -- every tick unpriced: unknown
                         ELSE coalesce(round(sum(cost_usd), 10), 0) END FROM usage
              WHERE execution_id = '{execution_id}') AS cost_usd,
            -- estimated: an estimate (or unknown cost) after the CLI last reported its total
            (SELECT coalesce(bool_or((estimated OR cost_usd IS NULL) AND seq > coalesce((
                SELECT max(seq) FROM events WHERE execution_id = '{execution_id}' AND type = 'usage'
                  AND CAST(data->>'settled' AS BOOLEAN)), 0)), false) FROM usage
              WHERE execution_id = '{execution_id}') AS cost_estimated,
            (SELECT list(DISTINCT coalesce(model, '?') ORDER BY coalesce(model, '?')) FROM usage
              WHERE execution_id = '{execution_id}' AND cost_usd IS NULL) AS cost_unknown_models,
            (SELECT last(data->>'failure' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'agent.result') AS failure,
            (SELECT CAST(any_value(data->>'max_cost_usd') AS DOUBLE) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'execution.requested') AS max_cost_usd,
            (SELECT any_value(data->>'resume_of') FROM events
              WHERE execution_id = '{execution_id}' AND type = 'execution.requested') AS resume_of,
            (SELECT last(data->>'version' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'agent.capabilities') AS agent_version,
            (SELECT last(data->'features' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'agent.capabilities') AS agent_features,
            -- the sandbox its shim started it in (actors/sandbox.py): mode bwrap and its network, or off
            (SELECT last(data->'sandbox' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'execution.started') AS sandbox,
            (SELECT last(CAST(data->>'progress' AS DOUBLE) ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'heartbeat' AND data->>'progress' IS NOT NULL)
              AS progress,
            (SELECT last(data->>'note' ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'heartbeat' AND data->>'progress' IS NOT NULL)
              AS progress_note,
            (SELECT last(epoch(ts) ORDER BY seq) FROM events
              WHERE execution_id = '{execution_id}' AND type = 'heartbeat' AND data->>'progress' IS NOT NULL)
              AS progress_at""",
    )
    row = records(result["columns"], result["rows"])[0]
    if isinstance(row.get("agent_features"), str):
        row["agent_features"] = orjson.loads(row["agent_features"])
    if isinstance(row.get("sandbox"), str):
        row["sandbox"] = orjson.loads(row["sandbox"])
    if row.get("agent") in (None, "command"):
        return {key: value for key, value in row.items() if value not in (None, 0) or key == "agent"}
    kept = ("agent", "cost_usd", "cost_estimated")  # an agent's cost: 0 when nothing was spent, null when unknown
    return {key: value for key, value in row.items() if value not in (None, 0, []) or key in kept}


def limit_eta(row: dict[str, Any], activity: dict[str, Any]) -> float | None:
    """Seconds until the measured limit (budget or turns) at the rate so far; None without a rate.

    An estimate of when the limit is reached, not of when the task is done: the CLIs say nothing of that.
    """
    progress, at, started = activity.get("progress"), activity.pop("progress_at", None), row.get("started_at")
    if not progress or not at or not started or progress >= 1 or row.get("state") != "running":
        return None
    elapsed = float(at) - datetime.fromisoformat(started).replace(tzinfo=UTC).timestamp()
    return round(elapsed * (1 - progress) / progress, 1) if elapsed > 0 else None


def _describe_end(row: dict[str, Any]) -> str:
    if row["state"] == "failed":
        return f"failed ({row['error']})"
    if row["signal"] is not None:
        return f"exited (signal {row['signal']}, {row['exit_reason']})"
    return f"exited ({row['exit_reason']}, exit code {row['exit_code']})"


def require_state(execution_id: str, row: dict[str, Any], allowed: tuple[str, ...], action: str) -> None:
    state = row["state"]
    if state in allowed:
        return
    if state in ("exited", "failed"):
        raise Conflict(f"{execution_id} has {_describe_end(row)}; there is nothing to {action}")
    raise Conflict(f"{execution_id} is {state}; {action} needs it {' or '.join(allowed)}")


async def request_and_wait(
    system: System,
    execution_id: str,
    data: EventData,
    confirm: tuple[str, ...],
    *,
    timeout_s: float = CONFIRM_TIMEOUT_S,
    any_cause: tuple[str, ...] = (),
    actor: str = "spawner",
    actor_name: str = "cli",
) -> dict[str, Any]:
    """Append a request; return the confirming event (as a dict), raise on rejection or silence.

    `confirm` types must carry the request as causation; `any_cause` types count whatever caused them.
    `actor_name` is who the request says it comes from (`cli`, or `api` for the HTTP gateway).
    """
    event = new_event(execution_id, data, actor=actor_name)
    answer: dict[str, Any] = {}
    done = asyncio.Event()

    async def on_event(seq: int, msg: Msg) -> bool:
        kind = msg.subject.split(".", 3)[3]
        if kind not in confirm and kind not in any_cause and kind != "control.rejected":
            return False
        raw = orjson.loads(msg.data)
        if kind in any_cause or raw.get("causation_id") == event.id:
            answer.update(raw, seq=seq)
            return True
        return False

    ack = await system.bus.publisher.publish(event)
    follower = asyncio.create_task(
        follow(system.bus.js, execution_events(execution_id), on_event, start_seq=ack.seq, done=done)
    )
    try:
        await asyncio.wait_for(asyncio.shield(follower), timeout_s)
    except TimeoutError:
        raise NotConfirmed(
            f"no {actor} confirmed {event.type.removesuffix('.requested')} of {execution_id} within "
            f"{timeout_s:.0f}s; the request is recorded. Is the `corral up` that runs it alive? (`corral health`)"
        ) from None
    finally:
        done.set()
        follower.cancel()
    if answer.get("type") == "control.rejected":
        raise Conflict(refusal_text(answer["data"]["request"], execution_id, str(answer["data"]["reason"])))
    return answer


def check_input_size(text: str) -> None:
    """Refuse an input over MAX_INPUT_BYTES (1 MiB), or one whose event would be over the stream's limit."""
    size = len(text.encode(errors="surrogatepass"))
    if size > MAX_INPUT_BYTES:
        raise UsageError(f"{input_too_large(size)}; nothing was sent")
    encoded = len(orjson.dumps(text))
    if encoded > MAX_EVENT_BYTES - 64 * 1024:
        raise UsageError(
            f"the input is {size} bytes but {encoded} once JSON-escaped (control characters), over the "
            f"{MAX_EVENT_BYTES}-byte event limit; nothing was sent"
        )


def cancel_grace(home: Home, template: str | None) -> float:
    """`cancel_grace` of corral.toml for an execution: its template's, else [defaults]' (10 s)."""
    try:
        config = load_config(home)
        if template is not None and template not in config.templates:
            template = None  # (the template is gone from corral.toml since): [defaults]
        return float(resolve_run(config, template, {}).settings.cancel_grace_s)
    except ConfigError:
        return 10.0


async def queue_position(system: System, execution_id: str) -> int | None:
    """1-based place among waiting executions: higher priority first, then older first."""
    result = await query(
        system,
        "SELECT pos FROM (SELECT execution_id, row_number() OVER (ORDER BY priority DESC, requested_at) AS pos "
        "FROM executions WHERE state IN ('requested', 'queued')) WHERE execution_id = "
        f"'{execution_id}'",
    )
    return int(result["rows"][0][0]) if result["rows"] else None


async def started_facts(system: System, execution_id: str) -> tuple[str | None, list[str]]:
    """What its shim said when it started the agent (one query of execution.started): what limited
    its processes, "cgroup v1 (memory, cpu, pids, freezer)", "cgroup v2", "per process
    (rlimit+affinity)" (actors/limits.py), and its warnings (no live file events, ...)."""
    result = await query(
        system,
        f"SELECT data->>'limits' AS limits, data->'warnings' AS warnings FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'execution.started' ORDER BY seq DESC LIMIT 1",
    )
    rows = records(result["columns"], result["rows"])
    if not rows:
        return None, []
    raw = rows[0]["warnings"]
    found = orjson.loads(raw) if isinstance(raw, str) else raw
    warnings = [str(w) for w in found] if isinstance(found, list) else []
    return (str(rows[0]["limits"]) if rows[0]["limits"] else None), warnings


async def disk_limit_in_force(system: System, execution_id: str, worktree: str | None) -> str | None:
    """How the execution's disk limit holds: "kernel quota (loop ext4)" when its worktree is its own
    file system here (actors/diskquota.py), else "polled every 2 s"; None without a disk limit."""
    result = await query(
        system,
        f"SELECT data->'limits'->>'disk_bytes' AS disk FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'execution.requested' LIMIT 1",
    )
    rows = records(result["columns"], result["rows"])
    if not rows or not rows[0]["disk"]:
        return None
    return diskquota.describe(worktree) if worktree else diskquota.describe()


def _age(ts: str | None, now: datetime) -> float | None:
    if not ts:
        return None
    return (now - datetime.fromisoformat(ts).replace(tzinfo=UTC)).total_seconds()


async def status_of(system: System, execution_id: str) -> dict[str, Any]:
    """Everything known about one execution: its row, queue place, activity, limits, what it needs."""
    home = system.home
    row = await execution_row(system, execution_id)
    position = await queue_position(system, execution_id) if row["state"] in QUEUED else None
    activity_row = await agent_activity(system, execution_id)
    limits, warnings = await started_facts(system, execution_id)
    ask = functools.partial(query, system)
    reason = (await attention.reasons(ask, [{"execution_id": execution_id, **row}])).get(execution_id)
    need = (await attention.needs(ask, [execution_id])).get(execution_id)
    disk = await disk_limit_in_force(system, execution_id, row["worktree"])
    live: dict[str, Any] | None = None
    run_dir = home.runs / execution_id
    if row["state"] in RUNNING and run_dir.is_dir():
        try:  # the shim on this host knows the exact timers
            live = await shim_request(run_dir, {"op": "status"}, timeout_s=2.0)
        except (OSError, TimeoutError):
            live = None
        if live is not None and live.get("ok") is False:
            live = None  # the agent ended a moment ago; the log is about to say so
    now = datetime.now(UTC)
    status: dict[str, Any] = {
        "execution_id": execution_id,
        "state": row["state"],
        "pid": row["pid"],
        "host": row["host"],
        "command": row["command"],
        "worktree": row["worktree"],
        "priority": row["priority"],
        "queue_position": position,
        "attempt": row["attempt"],
        "requested_at": row["requested_at"],
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "elapsed_s": _age(row["started_at"], now) if row["state"] in RUNNING else row["duration_s"],
        "timeout_s": row["timeout_s"],
        "hard_deadline": row["hard_deadline"],
        "hard_remaining_s": live["hard_remaining_s"] if live else None,
        "idle_timeout_s": row["idle_timeout_s"],
        "paused_at": row["paused_at"],
        "last_output_at": row["last_output_at"],
        "last_heartbeat_at": row["last_heartbeat_at"],
        "idle_s": None,
        "last_stalled_at": row["last_stalled_at"],
        "processes": live["processes"] if live else None,
        "limits": limits,
        "exit_code": row["exit_code"],
        "signal": row["signal"],
        "exit_reason": row["exit_reason"],
        "reason": reason,
        "validations_failed": (need or {}).get("validations_failed", 0),
        "validations_critical": (need or {}).get("critical", 0),
        "approvals_pending": (need or {}).get("approvals_pending", 0),
        "needs_you": attention.needs_text(need) or None,
        "error": row["error"],
        "output_bytes": row["output_bytes"],
        "limit_eta_s": limit_eta(row, activity_row),
        **activity_row,
    }
    status["disk"] = disk
    status["warning"] = "; ".join(warnings) or None
    if status["hard_remaining_s"] is None and row["hard_deadline"] and row["state"] == "running":
        status["hard_remaining_s"] = -(_age(row["hard_deadline"], now) or 0.0)
    activity = [t for t in (row["last_output_at"], row["last_heartbeat_at"], row["started_at"]) if t]
    if activity and row["state"] == "running":
        status["idle_s"] = _age(max(activity), now)
    return status
