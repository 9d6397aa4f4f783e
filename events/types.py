"""The closed set of event types: one frozen pydantic model per type, keyed by its `type` name.

Requests are events too (`*.requested`, `approval.decision.submitted`); the actor that owns the
effect reacts and records the outcome. The set covers the whole design; docs/events.md lists
which actor records each type and which are not emitted yet.
"""

from datetime import datetime
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.errors import UnknownEventType


class EventData(BaseModel):
    """Base of every event payload; `TYPE` is the event's type name."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = ""


EVENT_TYPES: dict[str, type[EventData]] = {}


def event_type(name: str) -> Any:
    """Register a payload model under its type name."""

    def register(cls: type[EventData]) -> type[EventData]:
        if name in EVENT_TYPES:
            raise ValueError(f"event type {name} registered twice")
        cls.TYPE = name
        EVENT_TYPES[name] = cls
        return cls

    return register


def model_for(name: str) -> type[EventData]:
    """Return the payload model of a type name, or raise UnknownEventType."""
    try:
        return EVENT_TYPES[name]
    except KeyError:
        raise UnknownEventType(name) from None


Stream = Literal["stdout", "stderr"]


class Timeouts(BaseModel):
    """Time limits of an execution, in seconds; None means no limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    hard: float | None = None
    idle: float | None = None
    spawn: float | None = None


class SandboxRequest(BaseModel):
    """The sandbox an execution asks for (actors/sandbox.py; [sandbox] of corral.toml, --sandbox, --network)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["auto", "on", "off"] = "auto"
    network: Literal["open", "none", "allow"] = "open"
    allow: tuple[str, ...] = ()  # network = "allow": the host:port pairs the agent may reach (actors/netallow.py)


class Limits(BaseModel):
    """Resource limits of an execution's process group."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    memory_bytes: int | None = None
    cpus: float | None = None
    disk_bytes: int | None = None
    pids_max: int | None = None  # processes and threads of the whole tree (cgroup pids.max)


# --- execution lifecycle (spawner) -------------------------------------------------------------


@event_type("execution.requested")
class ExecutionRequested(EventData):
    """Someone asks for an execution; one spawner claims and runs it."""

    command: tuple[str, ...] = Field(min_length=1)
    repo: str
    base: str = "HEAD"
    task: str | None = None
    agent: str = "command"
    template: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    priority: int = 0
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    labels: dict[str, str] = Field(default_factory=dict)
    requested_by: str | None = None
    replay_of: str | None = None
    fork_of: str | None = None
    fork_checkpoint: int | None = None
    on_stall: Literal["notify", "pause", "cancel", "restart"] | None = None
    attempt: int = 1
    retry_of: str | None = None
    max_cost_usd: float | None = Field(default=None, gt=0)  # budget: paused for an approval when reached
    prices: dict[str, dict[str, float]] = Field(default_factory=dict)  # [prices] of corral.toml, USD per 1M tokens
    agent_args: tuple[str, ...] = ()  # the words passed to the agent CLI after `--` (a follow-up reuses them)
    resume_of: str | None = None  # a follow-up: continues this execution's agent session, in its worktree
    resume_session: str | None = None  # the session id continued (the CLI's own)
    worktree: str | None = None  # run in this existing worktree (a follow-up's parent's) instead of a new one
    policy: dict[str, Any] | None = None  # the run's own policy keys (`--policy FILE`), over its template's
    # "shadow": the agent writes into an overlay over its worktree; validated changes are promoted (docs/shadow.md)
    workspace: Literal["direct", "shadow"] = "direct"
    sandbox: SandboxRequest | None = None  # None (an older client): the spawner's default, auto with open network


@event_type("execution.claimed")
class ExecutionClaimed(EventData):
    """A spawner won the request (an optimistic append: only the first claim is stored)."""

    spawner: str
    host: str


@event_type("execution.queued")
class ExecutionQueued(EventData):
    """The claiming spawner is at its concurrency limit; the execution waits."""

    position: int


@event_type("workspace.created")
class WorkspaceCreated(EventData):
    """The execution's git worktree exists."""

    path: str
    branch: str
    repo: str
    base_commit: str
    shadow: str | None = None  # workspace = "shadow": the directory of its overlay's layers (docs/shadow.md)


@event_type("execution.started")
class ExecutionStarted(EventData):
    """The agent process runs, leader of its own process group."""

    pid: int
    pgid: int
    host: str
    command: tuple[str, ...]
    cwd: str
    # the sandbox in force: {"mode": "bwrap", "network": "open"|"none"} or {"mode": "off"}; None from an older shim;
    # under network "allow" also "allow": the host:port pairs (actors/netallow.py)
    sandbox: dict[str, str | list[str]] | None = None
    # what limits the agent's processes: "cgroup v1 (memory, cpu, pids, freezer)", "cgroup v2",
    # "per process (rlimit+affinity)" or "none" (actors/limits.py); None from an older shim
    limits: str | None = None
    # live file events (file.touched) for this execution: False when none could be watched (no
    # inotify instance left: fs.inotify.max_user_instances), with the reason in `warnings`
    file_events: bool | None = None
    warnings: tuple[str, ...] = ()


@event_type("output")
class Output(EventData):
    """A coalesced chunk of the agent's stdout or stderr (control lines removed)."""

    stream: Stream
    n: int
    text: str


@event_type("heartbeat")
class Heartbeat(EventData):
    """The agent (or `corral wrap`) says it is alive; resets the idle timer."""

    source: Literal["agent", "wrapper", "adapter"] = "agent"
    note: str | None = None
    progress: float | None = None


@event_type("protocol.error")
class ProtocolError(EventData):
    """An agent control line could not be understood; the agent keeps running."""

    line: str
    error: str


@event_type("execution.exited")
class ExecutionExited(EventData):
    """The agent process ended."""

    exit_code: int | None
    signal: int | None = None
    duration_s: float
    # memory_limit: the OOM killer struck in the execution's cgroup and the agent did not exit 0
    reason: Literal["exited", "cancelled", "timeout", "spawner_stopped", "lost", "memory_limit"] = "exited"


@event_type("execution.failed")
class ExecutionFailed(EventData):
    """The execution could not start or was abandoned; nothing of it is left running."""

    stage: Literal["workspace", "spawn", "claim", "internal", "setup"]  # setup: its template's setup script failed
    error: str


@event_type("workspace.removed")
class WorkspaceRemoved(EventData):
    """The execution's worktree was deleted."""

    path: str
    forced: bool = False


# --- live control (spawner, watchdog) ----------------------------------------------------------


@event_type("input.requested")
class InputRequested(EventData):
    text: str
    requested_by: str | None = None


@event_type("input.delivered")
class InputDelivered(EventData):
    text: str
    bytes: int


@event_type("pause.requested")
class PauseRequested(EventData):
    reason: str | None = None
    requested_by: str | None = None


@event_type("execution.paused")
class ExecutionPaused(EventData):
    pids: tuple[int, ...]


@event_type("resume.requested")
class ResumeRequested(EventData):
    reason: str | None = None
    requested_by: str | None = None
    max_cost_usd: float | None = None  # a budget pause: the new budget (None: no limit from now on)


@event_type("execution.resumed")
class ExecutionResumed(EventData):
    pids: tuple[int, ...]


@event_type("cancel.requested")
class CancelRequested(EventData):
    grace_s: float = 10.0
    reason: str | None = None
    requested_by: str | None = None


@event_type("timeout.extend.requested")
class TimeoutExtendRequested(EventData):
    seconds: float


@event_type("timeout.extended")
class TimeoutExtended(EventData):
    hard_deadline: datetime


@event_type("priority.requested")
class PriorityRequested(EventData):
    priority: int


@event_type("priority.changed")
class PriorityChanged(EventData):
    priority: int


@event_type("execution.stalled")
class ExecutionStalled(EventData):
    idle_s: float
    reaction: Literal["notify", "pause", "cancel", "restart"]


@event_type("execution.timed_out")
class ExecutionTimedOut(EventData):
    kind: Literal["hard", "idle", "spawn"]
    limit_s: float


@event_type("execution.retry_scheduled")
class ExecutionRetryScheduled(EventData):
    attempt: int
    delay_s: float
    failure_class: str
    retry_execution_id: str


@event_type("execution.crash_loop")
class ExecutionCrashLoop(EventData):
    failures: int
    window_s: float


@event_type("limit.exceeded")
class LimitExceeded(EventData):
    limit: Literal["memory", "cpu", "disk", "cost", "pids"]
    value: float
    maximum: float


@event_type("control.rejected")
class ControlRejected(EventData):
    """A control request (input, pause, resume, cancel, extend, priority) that could not be carried out."""

    request: str
    reason: str


# --- changes (checkpointer) --------------------------------------------------------------------


class FileStat(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    added: int | None
    deleted: int | None


class SkippedFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    size: int


@event_type("file.touched")
class FileTouched(EventData):
    path: str
    change: Literal["created", "modified", "deleted"]


@event_type("checkpoint.requested")
class CheckpointRequested(EventData):
    trigger: Literal["interval", "files", "pause", "approval", "exit", "demand", "rollback"]


@event_type("checkpoint.created")
class CheckpointCreated(EventData):
    n: int
    ref: str
    commit: str
    tree: str
    parent: str | None
    trigger: str
    files: tuple[FileStat, ...]
    duration_ms: float
    # files larger than [checkpoints] max_file_size, left out of the checkpoint (never copied into .git)
    skipped: tuple[SkippedFile, ...] = ()


@event_type("commit.requested")
class CommitRequested(EventData):
    message: str
    paths: tuple[str, ...] = ()


@event_type("change.committed")
class ChangeCommitted(EventData):
    commit: str
    message: str
    paths: tuple[str, ...]


@event_type("rollback.requested")
class RollbackRequested(EventData):
    to_checkpoint: int | None = None
    paths: tuple[str, ...] = ()


@event_type("change.rolled_back")
class ChangeRolledBack(EventData):
    to_checkpoint: int
    paths: tuple[str, ...]
    checkpoint: int | None


@event_type("workspace.promoted")
class WorkspacePromoted(EventData):
    """Shadow workspace: checkpoint n's validated files written into the real worktree (docs/shadow.md).

    `files`: promoted now; `held`: changed in the checkpoint but held back (critical violations
    awaiting a decision). `approval_id`: set when an approval's grant promoted the held files."""

    checkpoint: int
    files: tuple[str, ...]
    held: tuple[str, ...] = ()
    approval_id: str | None = None


@event_type("workspace.discarded")
class WorkspaceDiscarded(EventData):
    """Shadow workspace: a rejection dropped these held files; the agent sees the worktree's version
    again (or no file where the worktree has none)."""

    approval_id: str
    files: tuple[str, ...]
    through: Literal["namespace", "upper"]  # the agent's merged view, or the upper layer (no agent left)


@event_type("pr.requested")
class PullRequestRequested(EventData):
    title: str
    body: str | None = None
    base: str | None = None


@event_type("pr.opened")
class PullRequestOpened(EventData):
    url: str
    number: int
    branch: str


@event_type("pr.failed")
class PullRequestFailed(EventData):
    error: str


# --- agent activity (adapters) -----------------------------------------------------------------


@event_type("session.started")
class SessionStarted(EventData):
    session_id: str
    model: str | None = None
    tools: tuple[str, ...] = ()


@event_type("agent.message")
class AgentMessage(EventData):
    text: str


@event_type("tool.called")
class ToolCalled(EventData):
    call_id: str | None = None
    name: str
    input_summary: str
    shell_command: str | None = None


@event_type("tool.result")
class ToolResult(EventData):
    call_id: str | None = None
    name: str | None = None
    ok: bool
    summary: str


@event_type("shell.blocked")
class ShellBlocked(EventData):
    """The agent CLI's pre-tool mechanism refused a shell command under the policy: it did not run."""

    agent: str
    command: str
    rule: str  # shell_deny, shell_not_allowed
    message: str = ""
    call_id: str | None = None
    mechanism: str = "hook"  # hook (Claude Code, Codex), policy_engine (Gemini CLI)


@event_type("network.blocked")
class NetworkBlocked(EventData):
    """Under network = "allow", the agent asked for a host:port not on its allow list and was refused."""

    host: str
    port: int
    how: Literal["connect", "proxy", "direct"]  # the proxy's CONNECT, its absolute-URI forwarding, a direct connect


@event_type("usage")
class Usage(EventData):
    """Tokens and cost since the previous usage event (a tick, not a total)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float | None = 0.0  # None: unknown (the CLI reported none and the model has no price)
    model: str | None = None
    estimated: bool = False  # cost computed from tokens with the price table (or unknown), not reported by the CLI
    settled: bool = False  # the CLI reported its total cost: with this tick the sum so far is that total


@event_type("agent.capabilities")
class AgentCapabilities(EventData):
    """What the agent CLI installed where it runs supports, probed once per binary (docs/adapters.md)."""

    agent: str
    program: str
    version: str | None = None
    features: dict[str, bool] = Field(default_factory=dict)
    cached: bool = False


@event_type("agent.result")
class AgentResult(EventData):
    ok: bool
    text: str | None = None
    turns: int | None = None
    failure: Literal["network"] | None = None  # why it failed, when a class is known: "network" (model unreachable)


# --- policy and approvals (validator, approver) ------------------------------------------------


class Violation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None
    rule: str
    severity: Literal["info", "warning", "critical"]
    message: str
    category: str | None = None


@event_type("validation.passed")
class ValidationPassed(EventData):
    checkpoint: int | None
    policy_version: str
    duration_ms: float


@event_type("validation.failed")
class ValidationFailed(EventData):
    checkpoint: int | None
    policy_version: str
    violations: tuple[Violation, ...]
    duration_ms: float


@event_type("approval.needed")
class ApprovalNeeded(EventData):
    """An agent (or the validator) asks for a human decision; the approver assigns the id."""

    question: str
    options: tuple[str, ...] = ()
    category: str | None = None
    source: Literal["agent", "validator", "budget", "exit_code"] = "agent"


@event_type("approval.requested")
class ApprovalRequested(EventData):
    approval_id: str
    question: str
    options: tuple[str, ...] = ()
    category: str | None = None
    expires_at: datetime | None = None
    source: Literal["agent", "validator", "budget", "exit_code"] = "agent"


@event_type("approval.decision.submitted")
class ApprovalDecisionSubmitted(EventData):
    approval_id: str
    approve: bool
    choice: str | None = None
    note: str | None = None
    decided_by: str | None = None
    raise_budget_usd: float | None = Field(default=None, gt=0)  # a budget approval: continue up to this cost


@event_type("approval.granted")
class ApprovalGranted(EventData):
    approval_id: str
    choice: str | None
    note: str | None
    decided_by: str | None
    raise_budget_usd: float | None = None


@event_type("approval.denied")
class ApprovalDenied(EventData):
    approval_id: str
    note: str | None
    decided_by: str | None


@event_type("approval.expired")
class ApprovalExpired(EventData):
    approval_id: str


# --- replay and forking ------------------------------------------------------------------------


@event_type("replay.diverged")
class ReplayDiverged(EventData):
    original_execution_id: str
    at_event: str
    expected: str
    actual: str


# --- notifications (notifier) ------------------------------------------------------------------


@event_type("notification.sent")
class NotificationSent(EventData):
    """A [[notify]] target accepted a notification about event `event_id` (a 2xx answer).

    `target` is the entry's name (default `kind:host`): never its URL, which may be a secret.
    """

    target: str
    kind: Literal["webhook", "slack", "ntfy"]
    event_id: str
    event_type: str
    attempt: int
    status_code: int
    duration_ms: float


@event_type("notification.failed")
class NotificationFailed(EventData):
    """One attempt to notify a target failed; `final` when no attempt follows (docs/notifications.md)."""

    target: str
    kind: Literal["webhook", "slack", "ntfy"]
    event_id: str
    event_type: str
    attempt: int
    status_code: int | None = None  # None: no answer (connection refused, timeout, no secret)
    error: str
    final: bool = False
    retry_in_s: float | None = None


# --- pipelines (conductor; docs/orchestration.md) --------------------------------------------------

# A pipeline run's events are on its own id (8 characters, like an execution's): corral.evt.<run_id>.<type>.
StageOutcome = Literal["passed", "failed", "changes_requested"]


@event_type("pipeline.requested")
class PipelineRequested(EventData):
    """Someone asks for a run of a `[pipelines.NAME]`; its stages are resolved here, so the conductor
    needs no corral.toml and a run means what it meant when it was asked for."""

    pipeline: str
    repo: str
    base: str = "HEAD"
    vars: dict[str, str] = Field(default_factory=dict)
    stages: tuple[dict[str, Any], ...] = Field(min_length=1)  # corral/pipelines.py resolve_stages
    max_rounds: int = Field(default=3, ge=1)  # a stage starts at most this many times in one run
    requested_by: str | None = None
    breaker_failures: int = Field(default=3, ge=0)  # failures in a row that open a stage's breaker (0: none)
    ticket_id: str | None = None  # the ticket this run works on (it finishes with the run)
    priority: int | None = None  # the stages' executions' queue priority (a ticket's), over their templates'


@event_type("pipeline.started")
class PipelineStarted(EventData):
    """A conductor took the run (the first to append it; the others follow its stages)."""

    conductor: str


@event_type("stage.started")
class StageStarted(EventData):
    """A conductor started step `step` (1, 2, ...) of the run: stage `stage`, its `round`-th start,
    as execution `execution_id`. Appended with the run's last stage.started sequence expected:
    two conductors never start one step twice."""

    stage: str
    step: int = Field(ge=1)
    round: int = Field(ge=1)
    execution_id: str
    kind: Literal["agent", "command", "hook"]
    worktree: str | None = None  # the run's worktree it runs in (None: the first stage makes it)


@event_type("stage.finished")
class StageFinished(EventData):
    """How step `step` ended, and where the run goes next (`next`: a stage, `done` or `fail`)."""

    stage: str
    step: int = Field(ge=1)
    execution_id: str
    outcome: StageOutcome
    exit_code: int | None = None
    verdict: str | None = None  # a reviewer's `approved` / `changes_requested` (docs/orchestration.md)
    comments: str | None = None
    result: str | None = None  # the agent's final result, or the tail of a command's output
    error: str | None = None  # why it failed to run (execution.failed), when it did
    next: str
    attempts: int = 1  # the watchdog retried it: execution_id is the last attempt's (its outcome the stage's)


@event_type("pipeline.finished")
class PipelineFinished(EventData):
    outcome: Literal["passed", "failed", "cancelled"]
    reason: str | None = None
    steps: int = 0


@event_type("pipeline.cancel.requested")
class PipelineCancelRequested(EventData):
    reason: str | None = None
    requested_by: str | None = None


@event_type("pipeline.held")
class PipelineHeld(EventData):
    """The run's next stage waits: its circuit breaker is open (docs/orchestration.md#circuit-breakers)."""

    stage: str
    breaker: str  # the breaker's key: `stage:<pipeline>/<stage>` or `template:<name>`
    breaker_id: str


class ScriptFinished(EventData):
    """A template's setup or teardown script ended (actors/scripts.py): `sh -c command` in the worktree."""

    command: str
    exit_code: int  # -N: killed by signal N; 127: could not start
    duration_s: float
    output: str = ""  # the tail of both streams, secrets redacted


@event_type("setup.finished")
class SetupFinished(ScriptFinished):
    """Before the agent: a non-zero exit fails the execution (execution.failed, stage `setup`)."""


@event_type("teardown.finished")
class TeardownFinished(ScriptFinished):
    """After the agent, before execution.exited: recorded, changes nothing else."""


@event_type("execution.held")
class ExecutionHeld(EventData):
    """A plain run of a template waits in the spawners' queue: the template's circuit breaker is open
    (actors/breakers.py); approving the escalation releases it, rejecting it stops it."""

    breaker: str  # `template:<name>`
    breaker_id: str


# --- circuit breakers (conductor) ------------------------------------------------------------------

# A breaker's events are on its own id: 8 characters derived from its key (actors/conductor.py breaker_id).


@event_type("breaker.counted")
class BreakerCounted(EventData):
    """The breaker's consecutive failures after a stage ended (0: it passed)."""

    key: str
    failures: int = Field(ge=0)
    run_id: str
    step: int


@event_type("breaker.opened")
class BreakerOpened(EventData):
    """`failures` in a row reached `threshold`: stages of the key are held, a human is asked (escalation)."""

    key: str
    failures: int
    threshold: int


@event_type("breaker.closed")
class BreakerClosed(EventData):
    """A human decided: `release` (approved) lets the held runs go on, otherwise they stop."""

    key: str
    release: bool
    approval_id: str | None = None
    decided_by: str | None = None


# --- tickets (seed 002; conductor) -----------------------------------------------------------------

# A ticket's events are on its own id (8 characters): corral.evt.<ticket_id>.<type>.


@event_type("ticket.created")
class TicketCreated(EventData):
    """A unit of work, ready: the conductor claims it and runs `run` (a pipeline request) for it."""

    title: str = Field(min_length=1, max_length=500)
    goal: str = Field(min_length=1)
    repo: str
    pipeline: str
    priority: int = 0
    run: dict[str, Any]  # the pipeline.requested payload, resolved when the ticket was added
    requested_by: str | None = None


@event_type("ticket.claimed")
class TicketClaimed(EventData):
    """A conductor took the ticket (expected last subject sequence 0) and names the run it requests."""

    run_id: str
    conductor: str


@event_type("ticket.finished")
class TicketFinished(EventData):
    """The ticket's run ended: the ticket is done (`passed`) or not, with the last stage's result and
    the result of each hook stage it ran (verifier, deploy: docs/orchestration.md#tickets)."""

    outcome: Literal["passed", "failed", "cancelled"]
    run_id: str
    reason: str | None = None
    result: str | None = None
    # each hook stage the run ran (a verifier, a deploy), in order: stage, step, outcome, exit_code, result
    hooks: tuple[dict[str, Any], ...] = ()


# --- schedules (conductor) -------------------------------------------------------------------------


@event_type("schedule.fired")
class ScheduleFired(EventData):
    """A `[schedules.NAME]` tick, claimed by one conductor (expecting the schedule's last fired sequence),
    and the run (`pipeline`) or execution (`template`) it requests as `target_id`."""

    schedule: str
    tick: datetime
    target: Literal["pipeline", "template"]
    target_id: str
    late: bool = False  # a missed tick fired after the fact (catch_up = "last")
    # The schedule's circuit breaker was open: the tick's run waits (requested once a human approves the
    # escalation, never when he rejects it); the ticks due while it waits are this one run.
    held: bool = False
    breaker_failures: int = 3  # the schedule's failures in a row that open `schedule:<name>` (0: none)


# --- the bus's housekeeping (the provisioner, events/consumers.py) ----------------------------------


@event_type("consumer.removed")
class ConsumerRemoved(EventData):
    """A durable consumer no role owns was deleted by the sweep of the process that provisions
    (docs/security.md, "The bus"). On a fixed id derived from "consumers"."""

    stream: str
    name: str
    reason: str


# The requests and findings that stop (or resume) an execution: what a listing's reason names
# (corral/attention.py); the projector keeps each execution's last (executions.last_stop_*).
STOP_TYPES: Final = (
    "pause.requested",
    "cancel.requested",
    "limit.exceeded",
    "execution.resumed",
    "execution.timed_out",
)
