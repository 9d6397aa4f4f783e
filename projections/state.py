"""Execution state derived from events by one pure function, used by the projector and replay."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from events.envelope import Event
from events.types import (
    ExecutionClaimed,
    ExecutionExited,
    ExecutionFailed,
    ExecutionPaused,
    ExecutionQueued,
    ExecutionRequested,
    ExecutionResumed,
    ExecutionStalled,
    ExecutionStarted,
    Heartbeat,
    PriorityChanged,
    TimeoutExtended,
    WorkspaceCreated,
    WorkspaceRemoved,
)

State = Literal["requested", "queued", "claimed", "running", "paused", "exited", "failed"]
ACTIVE_STATES: tuple[State, ...] = ("requested", "queued", "claimed", "running", "paused")


class Execution(BaseModel):
    """The current state of one execution, as `corral ps` and the executions table show it."""

    model_config = ConfigDict(frozen=True)

    execution_id: str
    state: State = "requested"
    command: tuple[str, ...] = ()
    repo: str | None = None
    base: str | None = None
    task: str | None = None
    agent: str | None = None
    template: str | None = None
    priority: int = 0
    requested_by: str | None = None
    replay_of: str | None = None
    fork_of: str | None = None
    requested_at: datetime | None = None
    spawner: str | None = None
    host: str | None = None
    worktree: str | None = None
    branch: str | None = None
    base_commit: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float | None = None
    exit_reason: str | None = None
    error: str | None = None
    last_heartbeat_at: datetime | None = None
    timeout_s: float | None = None
    idle_timeout_s: float | None = None
    hard_deadline: datetime | None = None
    paused_at: datetime | None = None
    last_stalled_at: datetime | None = None
    attempt: int = 1
    retry_of: str | None = None
    workspace_removed: bool = False
    updated_seq: int = 0


# The event types evolve() looks at; any other type leaves an execution's state as it is, so a
# projector need not decode it.
STATE_EVENT_TYPES: frozenset[str] = frozenset(
    cls.TYPE
    for cls in (
        ExecutionRequested,
        ExecutionQueued,
        ExecutionClaimed,
        WorkspaceCreated,
        ExecutionStarted,
        ExecutionPaused,
        ExecutionResumed,
        TimeoutExtended,
        ExecutionStalled,
        Heartbeat,
        PriorityChanged,
        ExecutionExited,
        ExecutionFailed,
        WorkspaceRemoved,
    )
)


def evolve(state: Execution | None, event: Event) -> Execution | None:
    """Return the state after one event; events that do not change an execution return it as is."""
    data = event.data
    if state is None:
        if not isinstance(data, ExecutionRequested):
            return None
        return Execution(
            execution_id=event.execution_id,
            command=data.command,
            repo=data.repo,
            base=data.base,
            task=data.task,
            agent=data.agent,
            template=data.template,
            priority=data.priority,
            requested_by=data.requested_by,
            replay_of=data.replay_of,
            fork_of=data.fork_of,
            timeout_s=data.timeouts.hard,
            idle_timeout_s=data.timeouts.idle,
            attempt=data.attempt,
            retry_of=data.retry_of,
            requested_at=event.ts,
            updated_seq=event.seq or 0,
        )
    update: dict[str, object]
    match data:
        case ExecutionQueued():
            update = {"state": "queued"}
        case ExecutionClaimed(spawner=spawner, host=host):
            update = {"state": "claimed", "spawner": spawner, "host": host}
        case WorkspaceCreated(path=path, branch=branch, base_commit=base_commit):
            update = {"worktree": path, "branch": branch, "base_commit": base_commit}
        case ExecutionStarted(pid=pid, host=host):
            update = {"state": "running", "pid": pid, "host": host, "started_at": event.ts}
            if state.timeout_s is not None:
                update["hard_deadline"] = event.ts + timedelta(seconds=state.timeout_s)
        case ExecutionPaused():
            update = {"state": "paused", "paused_at": event.ts}
        case ExecutionResumed():
            update = {"state": "running", "paused_at": None}
            if state.hard_deadline is not None and state.paused_at is not None:
                update["hard_deadline"] = state.hard_deadline + (event.ts - state.paused_at)
        case TimeoutExtended(hard_deadline=deadline):
            update = {"hard_deadline": deadline}
        case ExecutionStalled():
            update = {"last_stalled_at": event.ts}
        case Heartbeat():
            update = {"last_heartbeat_at": event.ts}
        case PriorityChanged(priority=priority):
            update = {"priority": priority}
        case ExecutionExited(exit_code=code, signal=sig, duration_s=duration, reason=reason):
            update = {
                "state": "exited",
                "exit_code": code,
                "signal": sig,
                "duration_s": duration,
                "exit_reason": reason,
                "ended_at": event.ts,
                "paused_at": None,
            }
        case ExecutionFailed(stage=stage, error=error):
            update = {"state": "failed", "error": f"{stage}: {error}", "ended_at": event.ts}
        case WorkspaceRemoved():
            update = {"workspace_removed": True}
        case _:
            return state
    return state.model_copy(update={**update, "updated_seq": event.seq or state.updated_seq})


def is_active(state: Execution) -> bool:
    return state.state in ACTIVE_STATES
