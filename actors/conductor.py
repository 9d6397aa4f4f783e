"""The conductor: runs pipelines, one stage after another, from the events of each run.

A run (`pipeline.requested`, published by `corral pipeline run`) carries its stages resolved: each
stage's execution request but for its task and command, which take `{{variables}}` from the run's
`--var`s and from earlier stages (branch, changed files, the previous stage's verdict and result).
Everything a conductor knows about a run it reads again from the run's own events
(`corral.evt.<run_id>.>`), so any conductor can take any step, and one restarted after a SIGKILL
carries on where the log says the run is: a finished stage is never started again.

Each step is claimed with an optimistic append, as the spawner claims an execution: `stage.started`
expects the run's last `stage.started` sequence (0 for the first), `stage.finished` the last
`stage.finished`'s, `pipeline.started` and `pipeline.finished` 0. Two conductors that decide the same
step at once: one append is stored, the other is refused (WrongLastSequence) and that conductor
reads the run again. The stage's execution is requested after its `stage.started`, with an expected
sequence of 0 on its own subject, so a conductor that died between the two requests it once.

What moves a run comes from one durable work consumer ("conductor") shared by every instance:
`pipeline.requested`, `pipeline.cancel.requested`, and the ends of executions (`execution.exited`,
`execution.failed`; an execution is a stage's when its request's labels name the run). A trigger is
acked once its run has moved; one whose conductor died comes again after ACK_WAIT_S. On start, every
run without `pipeline.finished` is moved once (what happened while no conductor ran).

A stage's outcome: `passed` (exit code 0), `failed` (another exit, or the execution failed), or
`changes_requested`: a reviewer's verdict, the last line of its final result (or of its stdout)
that is a JSON object with a `verdict` key (docs/orchestration.md).

Circuit breakers: each stage (and each template a stage uses) counts its failures in a row on a
breaker id of its own (`breaker.counted`, an optimistic append); at the run's `breaker_failures` it
opens (`breaker.opened`) and asks a human (`approval.needed`, category `escalation`). Runs that reach
a stage with an open breaker are held (`pipeline.held`) until the approval is decided: granted
releases them, denied stops them; both close the breaker. `execution.crash_loop` is escalated the
same way. See docs/orchestration.md.
"""

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import re
import shlex
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import FetchTimeoutError, NotFoundError, ServiceUnavailableError
from pydantic import ValidationError

from actors.adapters import build_command
from actors.breakers import BreakerWatch, breaker_id
from actors.bus import Bus, ensure_work_consumer
from actors.runtime import Actor
from actors.schedule import Cron, Every
from actors.watchdog import REQUESTER as WATCHDOG
from actors.watchdog import RESTART_REASON, WatchdogSettings, classify_exit, will_retry
from events.approvals import derived_id, encode
from events.envelope import Event, decode_event, new_event
from events.errors import EventError, WrongLastSequence
from events.ids import new_execution_id
from events.stream import output_stream_exists
from events.subjects import STREAM, event_subject, events_of_type, execution_events
from events.types import (
    AgentResult,
    ApprovalDenied,
    ApprovalGranted,
    ApprovalNeeded,
    BreakerClosed,
    BreakerCounted,
    BreakerOpened,
    CancelRequested,
    EventData,
    ExecutionCrashLoop,
    ExecutionExited,
    ExecutionFailed,
    ExecutionRequested,
    ExecutionRetryScheduled,
    ExecutionTimedOut,
    Output,
    PipelineCancelRequested,
    PipelineFinished,
    PipelineHeld,
    PipelineRequested,
    PipelineStarted,
    ScheduleFired,
    StageFinished,
    StageStarted,
    TicketClaimed,
    TicketCreated,
    TicketFinished,
    WorkspaceCreated,
)
from replay.history import follow

log = logging.getLogger(__name__)

CONSUMER: Final = "conductor"
ACK_WAIT_S: Final = 15.0
TRIGGERS: Final = (
    "pipeline.requested",
    "pipeline.cancel.requested",
    "execution.exited",
    "execution.failed",
    "execution.crash_loop",  # escalated to a human (an approval of category `escalation`)
    "execution.retry_scheduled",  # a stage's execution is retried: the stage follows the retry
    "approval.granted",  # a breaker's escalation decided: close it, release or stop its held runs
    "approval.denied",
    "ticket.created",  # claimed: its pipeline run is requested
)
ESCALATION: Final = "escalation"
_ID_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
RUN_LABEL: Final = "pipeline_run"  # on a stage's execution request: the run it belongs to
STAGE_LABEL: Final = "pipeline_stage"
RESULT_CHARS: Final = 4000  # of a stage's result (the agent's final answer, or its output's tail) recorded
END_DONE: Final = "done"
END_FAIL: Final = "fail"
VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
READ_TIMEOUT_S: Final = 30.0
MAX_IN_FLIGHT: Final = 32  # triggers one conductor handles at once
NEW_IN_FLIGHT: Final = 16  # of which new runs and tickets (the rest is kept for stage ends)
NEW_WORK: Final = frozenset({"ticket.created", "pipeline.requested"})  # handled after everything else
HELD_AT_MOST: Final = 960  # triggers fetched, not handled yet (with MAX_IN_FLIGHT under max_ack_pending: 1,000)
FETCH_AT_ONCE: Final = 128  # triggers asked for in one fetch (what is there: the fetch does not wait for more)
QUICK_CHUNKS: Final = 32  # a stage's result read with direct gets up to this many output chunks
# A failed stage the watchdog should retry waits this long for its decision (retry_scheduled or
# crash_loop; it decides within its check interval) before the stage is settled as failed.
WATCHDOG_DECISION_S: Final = 30.0
DEFAULT_BREAKER_FAILURES: Final = 3  # a template's breaker_failures when corral.toml names none
SCHEDULE_PREFIX: Final = "schedule:"  # a schedule's breaker: `schedule:<name>`
SCHEDULE_LABEL: Final = "schedule"  # on a schedule's template execution: the schedule's name
OUTPUT_STREAM_RECHECK_S: Final = 5.0  # how long "no output stream" is believed


# When the trigger being handled (a stage's end) was received and how long after it was recorded:
# the conductor's reaction (stage end received -> next stage requested) is measured from it.
_TRIGGER: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("trigger", default=None)
SAMPLES: Final = 1000  # reaction times kept for health()


def _pct(values: "deque[float]", q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None


def render(text: str, values: dict[str, str], *, shell: bool = False) -> str:
    """`{{name}}` replaced by its value ("" when unknown); in a hook's shell line each value is quoted:
    an agent's result is text from outside, never shell code."""

    def value(match: re.Match[str]) -> str:
        found = values.get(match.group(1), "")
        return shlex.quote(found) if shell else found

    return VARIABLE.sub(value, text)


def verdict_of(text: str) -> dict[str, Any] | None:
    """The last line of `text` that is a JSON object with a `verdict` key."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("verdict"), str):
            return parsed
    return None


def schedule_id(name: str) -> str:
    """The id a schedule's `schedule.fired` events are on (8 characters of its name's hash)."""
    return encode(hashlib.sha256(f"schedule|{name}".encode()).digest(), _ID_ALPHABET, 8)


@dataclass(frozen=True)
class ScheduledJob:
    """A `[schedules.NAME]`, resolved by corral/schedules.py: when, and the request each tick makes."""

    name: str
    when: Cron | Every
    target: Literal["pipeline", "template"]
    payload: dict[str, Any]  # a pipeline.requested (pipeline) or execution.requested (template) payload
    catch_up: Literal["none", "last"] = "none"
    breaker_failures: int = DEFAULT_BREAKER_FAILURES  # failed ticks in a row that open `schedule:<name>` (0: none)

    @property
    def breaker_key(self) -> str:
        return f"{SCHEDULE_PREFIX}{self.name}"


@dataclass
class Breaker:
    """A breaker as its last events tell it: open while its last `breaker.opened` is newer than its last close."""

    key: str
    failures: int = 0
    counted_seq: int = 0
    counted_run: str = ""  # the run (or plain execution) its last count was for
    opened_seq: int = 0
    closed_seq: int = 0
    closed: BreakerClosed | None = None

    @property
    def open(self) -> bool:
        return self.opened_seq > self.closed_seq


@dataclass
class Facts:
    """What a stage's end is judged from, read in one round of direct gets (`Conductor._facts`)."""

    requested: EventData | None
    retried: EventData | None
    failed: EventData | None
    exited: EventData | None
    result: EventData | None  # the last agent.result
    output_chunks: int  # output events on the execution's subject
    workspace: EventData | None


class Held:
    """Triggers fetched and not handled yet: stage ends and other moves first, new work (NEW_WORK) after,
    each kind oldest first. One held longer than half the durable's ack wait is marked in progress, so
    the server does not hand it out again meanwhile."""

    def __init__(self) -> None:
        self._moves: deque[tuple[Msg, float]] = deque()
        self._new: deque[tuple[Msg, float]] = deque()
        self._looked = 0.0  # when keep_alive last looked

    def __len__(self) -> int:
        return len(self._moves) + len(self._new)

    def put(self, msg: Msg) -> None:
        kind = msg.subject.split(".", 3)[-1]
        (self._new if kind in NEW_WORK else self._moves).append((msg, time.monotonic()))

    def take(self, *, new_allowed: bool) -> tuple[Msg | None, bool]:
        """The next trigger to handle, and whether it is new work; (None, False) when none may go now."""
        if self._moves:
            return self._moves.popleft()[0], False
        if self._new and new_allowed:
            return self._new.popleft()[0], True
        return None, False

    async def keep_alive(self) -> None:
        """Mark in progress each trigger held for half the ack wait (looked at once a second at most)."""
        now = time.monotonic()
        if now - self._looked < 1.0:
            return
        self._looked = now
        due = []
        for waiting in (self._moves, self._new):
            for index, (msg, since) in enumerate(waiting):
                if now - since >= ACK_WAIT_S / 2:
                    waiting[index] = (msg, now)
                    due.append(msg)
        for msg in due:  # (after the scan: a handler ending meanwhile takes from the deques)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def give_back(self) -> None:
        """Nak every trigger held (a stop): the server hands them out again at once, not after the ack wait."""
        while self._moves or self._new:
            msg = (self._moves or self._new).popleft()[0]
            with contextlib.suppress(Exception):
                await msg.nak()


@dataclass
class Step:
    started: StageStarted
    started_seq: int
    finished: StageFinished | None = None


@dataclass
class RunState:
    """A run as its events tell it."""

    run_id: str
    request: PipelineRequested | None = None
    request_id: str | None = None
    started: bool = False
    finished: PipelineFinished | None = None
    cancel: PipelineCancelRequested | None = None
    cancel_id: str | None = None
    steps: list[Step] = field(default_factory=list)
    held: PipelineHeld | None = None
    held_seq: int = 0
    last_started_seq: int = 0
    last_finished_seq: int = 0
    recheck_in: float | None = None  # waiting for the watchdog's decision on the running step's failure
    read_seq: int = 0  # the last stored sequence of the run's subjects read from the stream
    # a passed stage's stage.finished sent and folded, its acknowledgement not awaited yet (_sent, _acked)
    unacked: list["asyncio.Future[Any]"] = field(default_factory=list)
    prefetched: dict[str, "asyncio.Task[Facts]"] = field(default_factory=dict)  # execution id -> its facts
    own: set[int] = field(default_factory=set)  # sequences past read_seq this conductor appended (folded already)
    worktree: str | None = None  # the first stage's workspace.created, when read with its end

    def stage(self, name: str) -> dict[str, Any] | None:
        assert self.request is not None
        return next((s for s in self.request.stages if s.get("name") == name), None)

    def rounds(self, name: str) -> int:
        return sum(1 for s in self.steps if s.started.stage == name)


class Conductor(Actor):
    """Moves every pipeline run to its next stage, once across instances."""

    name = "conductor"

    def __init__(
        self,
        bus: Bus,
        *,
        instance: str | None = None,
        schedules: tuple[ScheduledJob, ...] = (),
        template_breakers: dict[str, int] | None = None,
        watchdog: WatchdogSettings | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.schedules = schedules
        self.watchdog = watchdog or WatchdogSettings()  # the cluster's retries, which a stage follows
        # failures in a row that open `template:<name>` for plain runs ([templates.NAME] breaker_failures)
        self.template_breakers = template_breakers or {}
        self.ticks_fired = 0
        self._requested_ticks: set[tuple[str, str]] = set()
        self.stages_started = 0
        self.stages_finished = 0
        self.runs_finished = 0
        self.lost_races = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._runs_of: dict[str, str] = {}  # execution id -> run id, for stages seen
        self._deferred: dict[str, list[tuple[RunState, str, int]]] = {}  # run -> passes to count (advance)
        # Runs being moved, as last read: a trigger reads only what was appended since (one direct get
        # when nothing was), and this conductor's own appends are folded in without reading them back.
        self._states: dict[str, RunState] = {}
        # ms: a stage's end recorded -> its trigger received here; received -> the next stage requested
        self.trigger_lag_ms: deque[float] = deque(maxlen=SAMPLES)
        self.reaction_ms: deque[float] = deque(maxlen=SAMPLES)
        self.breakers_seen = BreakerWatch(counts=True)  # every breaker's opening, closing and count, followed
        self._breaker_subs: list[Any] = []
        self._output_stream_at: float | None = None  # when the output stream was last looked for
        self._output_stream_found = False

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "stages_started": self.stages_started,
            "stages_finished": self.stages_finished,
            "runs_finished": self.runs_finished,
            "lost_races": self.lost_races,
            "schedules": len(self.schedules),
            "ticks_fired": self.ticks_fired,
            # a stage's end: recorded -> received (the durable's delivery), received -> next stage requested
            "trigger_lag_ms_p50": _pct(self.trigger_lag_ms, 0.5),
            "trigger_lag_ms_p99": _pct(self.trigger_lag_ms, 0.99),
            "reaction_ms_p50": _pct(self.reaction_ms, 0.5),
            "reaction_ms_p99": _pct(self.reaction_ms, 0.99),
        }

    async def prepare(self) -> None:
        # runs already in flight are moved by resume_all (the consumer delivers new events only)
        filters = [events_of_type(kind) for kind in TRIGGERS]
        await ensure_work_consumer(self.bus.js, STREAM, CONSUMER, filters, ACK_WAIT_S)
        self._breaker_subs = await self.breakers_seen.follow(self.bus.js)

    async def on_stop(self) -> None:
        for sub in self._breaker_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._breaker_subs = []
        await super().on_stop()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._triggers())
            if self.schedules:
                tg.create_task(self._tick())

    async def _triggers(self) -> None:
        """Claim triggers from the shared durable, what is waiting in one fetch (up to FETCH_AT_ONCE: a
        fetch of one message a time was a round trip of `corral up`'s busy loop per trigger, and the
        triggers queued behind it), and handle up to MAX_IN_FLIGHT at once (one run at a time: `advance`
        holds the run's lock), so a slow read of one run delays no other.

        Fetched triggers wait in `Held`: the ends of stages (and cancels, approvals, retries) are handled
        before new work (tickets, pipeline requests), which has at most NEW_IN_FLIGHT of the handlers: a
        burst of new tickets does not hold up the runs that are going."""
        sub = await self.bus.js.pull_subscribe_bind(CONSUMER, stream=STREAM)
        held = Held()
        tasks: set[asyncio.Task[None]] = set()
        room = asyncio.Event()  # set when a handler ends: a fetch may be due
        new_in_flight = 0

        async def handle(msg: Msg, new: bool) -> None:
            nonlocal new_in_flight
            try:
                await self._on_trigger(msg)
            finally:
                if new:
                    new_in_flight -= 1
                room.set()
                dispatch()

        def dispatch() -> None:
            nonlocal new_in_flight
            while len(tasks) < MAX_IN_FLIGHT and not self.stopping.is_set():
                msg, new = held.take(new_allowed=new_in_flight < NEW_IN_FLIGHT)
                if msg is None:
                    return
                if new:
                    new_in_flight += 1
                task = asyncio.create_task(handle(msg, new))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        try:
            await self.resume_all()
            while not self.stopping.is_set():
                await held.keep_alive()
                wanted = min(FETCH_AT_ONCE, HELD_AT_MOST - len(held))
                if wanted <= 0:  # enough fetched: wait for a handler to end (or a keep-alive to be due)
                    room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(room.wait(), 1.0)
                    continue
                try:
                    msgs = await self._fetch_unless_stopped(sub, batch=wanted)  # a stop waits for no fetch
                except (FetchTimeoutError, NatsTimeoutError, TimeoutError):
                    continue
                except ServiceUnavailableError:
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    held.put(msg)
                dispatch()
        finally:
            await held.give_back()
            if tasks:
                await asyncio.wait(set(tasks), timeout=5.0)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def resume_all(self) -> None:
        """Move every run that has no `pipeline.finished` (what happened while no conductor ran)."""
        created = await self._subjects("ticket.created")
        for ticket_id in sorted(created - await self._subjects("ticket.finished")):
            if self.stopping.is_set():
                return
            try:
                await self.ticket(ticket_id)
            except Exception:
                log.exception("conductor: cannot move ticket %s", ticket_id)
        requested = await self._subjects("pipeline.requested")
        finished = await self._subjects("pipeline.finished")
        for run_id in sorted(requested - finished):
            if self.stopping.is_set():
                return
            try:
                await self.advance(run_id)
            except Exception:
                log.exception("conductor: cannot resume pipeline run %s", run_id)

    async def _subjects(self, kind: str) -> set[str]:
        info = await self.bus.js.stream_info(STREAM, subjects_filter=events_of_type(kind))
        return {subject.split(".")[2] for subject in (info.state.subjects or {})}

    async def _on_trigger(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            await msg.ack()
            return
        if isinstance(event.data, ExecutionExited | ExecutionFailed):
            stored_at = msg.metadata.timestamp  # the server's time of storing: the producer's path is not ours
            stored_at = stored_at.astimezone(UTC) if stored_at.tzinfo else stored_at.replace(tzinfo=UTC)
            lag = (datetime.now(UTC) - stored_at).total_seconds() * 1000
            _TRIGGER.set((time.monotonic(), lag))
        try:
            if isinstance(event.data, ExecutionCrashLoop):
                await self._escalate_crash_loop(event)
                run_id = await self._run_of(event)
                if run_id is not None:  # a stage whose retries stopped: it failed
                    await self.advance(run_id)
            elif isinstance(event.data, TicketCreated):
                await self.ticket(event.execution_id)
            elif isinstance(event.data, ApprovalGranted | ApprovalDenied):
                if await self._decided(event.execution_id, event.data):
                    await self.resume_all()  # the runs it held go on, or stop
            else:
                run_id = await self._run_of(event)
                if run_id is not None:
                    hint = event.execution_id if isinstance(event.data, ExecutionExited) else None
                    recheck = await self.advance(run_id, ended=hint)
                    if recheck is not None:  # no decision of the watchdog on a failed stage yet
                        await msg.nak(delay=recheck)
                        return
                elif isinstance(event.data, ExecutionExited | ExecutionFailed):
                    await self._count_plain(event)
        except Exception:
            log.exception("conductor: cannot move the run of %s %s; trying again", event.type, event.id)
            await msg.nak(delay=2.0)
            return
        await msg.ack()

    async def _run_of(self, event: Event) -> str | None:
        if event.type.startswith("pipeline."):
            return event.execution_id
        known = self._runs_of.get(event.execution_id)
        if known is not None:
            return known
        request = await self._last(event.execution_id, "execution.requested")
        if isinstance(request, ExecutionRequested):
            return request.labels.get(RUN_LABEL)
        return None

    async def _last(self, execution_id: str, kind: str) -> EventData | None:
        event = await self._last_event(execution_id, kind)
        return event.data if event is not None else None

    async def _last_event(self, execution_id: str, kind: str) -> Event | None:
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, kind))
        except NotFoundError:
            return None
        try:
            return decode_event(stored.data or b"")
        except EventError:
            return None

    async def _stored(self, subject: str, seq: int, *, limit: int | None = None) -> AsyncIterator[tuple[int, Event]]:
        """The events stored on `subject` from sequence `seq` on (at most `limit` messages read), by
        direct gets: no consumer per read. Undecodable messages are skipped."""
        read = 0
        while limit is None or read < limit:
            try:
                stored = await self.bus.js.get_msg(STREAM, seq=seq, subject=subject, next=True, direct=True)
            except NotFoundError:
                return
            if stored.seq is None:
                return
            read += 1
            seq = stored.seq + 1
            try:
                event = decode_event(stored.data or b"")
            except EventError:
                continue
            yield stored.seq, event

    # --- one run ---------------------------------------------------------------------------------

    async def load(self, run_id: str) -> RunState:
        """The run's state from its events, in stored order (direct gets: no consumer per read). A run
        this conductor moved before is read from where it stopped reading: what was appended since."""
        state = self._states.get(run_id)
        if state is None:
            state = RunState(run_id)
            try:
                first = await self.bus.js.get_last_msg(STREAM, event_subject(run_id, "pipeline.requested"))
            except NotFoundError:
                return state
            start = first.seq or 1
        else:
            start = state.read_seq + 1
        async for seq, event in self._stored(execution_events(run_id), start):
            state.read_seq = seq
            if seq not in state.own:
                self._fold(state, seq, event)
        state.own = {seq for seq in state.own if seq > state.read_seq}
        state.recheck_in = None
        for step in state.steps:
            self._runs_of[step.started.execution_id] = run_id
        if state.request is not None:
            self._states[run_id] = state
        return state

    @staticmethod
    def _fold(state: RunState, seq: int, event: Event) -> None:
        data = event.data
        if isinstance(data, PipelineRequested) and state.request is None:
            state.request, state.request_id = data, event.id
        elif isinstance(data, PipelineStarted):
            state.started = True
        elif isinstance(data, StageStarted):
            state.steps.append(Step(data, seq))
            state.last_started_seq = seq
        elif isinstance(data, StageFinished):
            state.last_finished_seq = seq
            for step in state.steps:
                if step.started.step == data.step and step.finished is None:
                    step.finished = data
        elif isinstance(data, PipelineFinished):
            state.finished = data
        elif isinstance(data, PipelineCancelRequested) and state.cancel is None:
            state.cancel, state.cancel_id = data, event.id
        elif isinstance(data, PipelineHeld):
            state.held, state.held_seq = data, seq

    async def advance(self, run_id: str, *, ended: str | None = None) -> float | None:
        """Take every step the run's events allow now; each append lost to another conductor re-reads.
        Returns in how many seconds to look again when the run waits for something no event may bring
        (the watchdog's decision on a failed stage). `ended`: an execution whose end triggered this: its
        facts are read while the run is (the same round trip)."""
        facts = asyncio.create_task(self._facts(ended)) if ended is not None else None
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            try:
                state = await self.load(run_id)
            except BaseException:
                if facts is not None:
                    facts.cancel()
                raise
            if facts is not None:
                state.prefetched[ended or ""] = facts
            try:
                for _ in range(1000):  # each pass appends one event (folded in as it is stored), or returns
                    try:
                        if not await self._step(state):
                            break
                    except WrongLastSequence:
                        self.lost_races += 1  # another conductor took this step: read the run again
                        await self._acked(state)
                        self._states.pop(run_id, None)
                        state = await self.load(run_id)
                if await self._acked(state):
                    self._states.pop(run_id, None)  # another conductor's stage.finished stands: read it whole
            except BaseException:
                self._states.pop(run_id, None)  # read it whole next time
                await self._acked(state)
                raise
            finally:
                state.prefetched.clear()
                if facts is not None and not facts.done():
                    facts.cancel()
            for done, key, number in self._deferred.pop(run_id, ()):  # passes: their breakers back to 0
                if not self.breakers_seen.quiet(key):
                    await self._count(done, key, number, failed=False)
            if state.finished is not None:
                self._locks.pop(run_id, None)
                self._states.pop(run_id, None)
                for step in state.steps:
                    self._runs_of.pop(step.started.execution_id, None)
            return state.recheck_in

    async def _step(self, state: RunState) -> bool:
        """Append the run's next event, if one is due; False when the run waits (or is over)."""
        request = state.request
        if request is None or state.finished is not None:
            return False
        if not state.started:
            with contextlib.suppress(WrongLastSequence):
                await self._emit(state, PipelineStarted(conductor=self.instance), expected=0)
            return True
        current = state.steps[-1] if state.steps else None
        if state.cancel is not None:
            if current is not None and current.finished is None:
                await self._publish(
                    (await self._attempts(current.started.execution_id))[-1],
                    CancelRequested(reason=f"pipeline run {state.run_id} cancelled", requested_by=self.instance),
                    event_id=derived_id(state.cancel_id or state.run_id, "pipeline-cancel"),
                )
            reason = state.cancel.reason or "cancelled"
            await self._finish(state, "cancelled", reason)
            return False
        if current is not None and current.finished is None:
            return await self._settle(state, current)
        if current is None:
            first = str(request.stages[0]["name"])
            if await self._held(state, first):
                return False
            return await self._start(state, first)
        assert current.finished is not None
        target = current.finished.next
        if target == END_DONE:
            await self._finish(state, "passed", None)
            return False
        if target == END_FAIL:
            last = current.finished
            why = last.error or (f"exit code {last.exit_code}" if last.exit_code is not None else last.outcome)
            await self._finish(state, "failed", f"stage {last.stage} {last.outcome}: {why}"[:500])
            return False
        if await self._held(state, target):
            return False
        if state.rounds(target) >= request.max_rounds:
            await self._finish(
                state,
                "failed",
                f"stage {target} already ran {request.max_rounds} times (max_rounds): the loop ends here",
            )
            return False
        return await self._start(state, target)

    async def _finish(self, state: RunState, outcome: str, reason: str | None) -> None:
        finished = PipelineFinished(outcome=outcome, reason=reason, steps=len(state.steps))  # type: ignore[arg-type]
        with contextlib.suppress(WrongLastSequence):
            await self._emit(state, finished, expected=0)
            self.runs_finished += 1
        state.finished = finished
        await self._count_scheduled_run(state, outcome)
        if state.request is not None and state.request.ticket_id:
            await self.ticket(state.request.ticket_id)

    async def _start(self, state: RunState, name: str) -> bool:
        """Claim the next step (stage `name`), then request its execution."""
        assert state.request is not None
        spec = state.stage(name)
        if spec is None:
            await self._finish(state, "failed", f"no stage {name!r} in the run's pipeline")
            return False
        worktree = await self._worktree(state)
        round_ = state.rounds(name) + 1
        execution_id = new_execution_id()
        values = await self.variables(state, name, round_, worktree)
        started = StageStarted(
            stage=name,
            step=len(state.steps) + 1,
            round=round_,
            execution_id=execution_id,
            kind=spec.get("kind", "command"),
            worktree=worktree,
        )
        try:
            request = self.stage_request(state, spec, values, worktree)
        except (ValueError, ValidationError) as exc:  # an agent CLI missing on this host, a bad command
            await self._emit(state, started, expected=state.last_started_seq)
            self._runs_of[execution_id] = state.run_id
            await self._emit(
                state,
                StageFinished(
                    stage=name,
                    step=started.step,
                    execution_id=execution_id,
                    outcome="failed",
                    error=f"cannot start: {str(exc).splitlines()[0]}"[:500],
                    next=spec.get("on_failed") or END_FAIL,
                ),
                expected=state.last_finished_seq,
            )
            return True
        await self._emit(state, started, expected=state.last_started_seq)  # the claim: refused, nothing is requested
        self.stages_started += 1
        self._runs_of[execution_id] = state.run_id
        if await self._acked(state):  # the previous stage's end was recorded by another conductor: this
            self._states.pop(state.run_id, None)  # claim stands all the same; read the run whole next time
        await self._request(execution_id, request)
        trigger = _TRIGGER.get()
        if trigger is not None:  # a stage's end moved the run to this stage: how long that took here
            self.trigger_lag_ms.append(trigger[1])
            self.reaction_ms.append((time.monotonic() - trigger[0]) * 1000)
            _TRIGGER.set(None)
        return True

    async def _request(self, execution_id: str, request: ExecutionRequested) -> None:
        """The stage's execution, requested once (expected sequence 0 on its own subject)."""
        with contextlib.suppress(WrongLastSequence):
            await self.bus.emit(execution_id, request, actor=self.instance, expected_last_subject_seq=0)

    def stage_request(
        self, state: RunState, spec: dict[str, Any], values: dict[str, str], worktree: str | None
    ) -> ExecutionRequested:
        """The stage's execution request: its resolved request with the task and command rendered."""
        assert state.request is not None
        base = dict(spec["request"])
        task = render(str(spec["task"]), values) if spec.get("task") else None
        kind = spec.get("kind", "command")
        if kind == "agent":
            command = build_command(str(base["agent"]), task, list(base.get("agent_args") or ()))
        elif kind == "hook":
            command = ["sh", "-c", render(str(spec["run"]), values, shell=True)]
        else:
            command = [render(str(word), values) for word in spec["command"]]
        labels = {**(base.get("labels") or {}), RUN_LABEL: state.run_id, STAGE_LABEL: str(spec["name"])}
        if state.request.ticket_id:
            labels["ticket"] = state.request.ticket_id
        if state.request.priority is not None:
            base["priority"] = state.request.priority
        base.update(command=command, task=task, labels=labels, worktree=worktree)
        return ExecutionRequested.model_validate(base)

    async def _worktree(self, state: RunState) -> str | None:
        """The run's worktree: the one its first step's execution made (later stages work in it)."""
        if not state.steps:
            return None
        first = state.steps[0]
        if first.started.worktree:
            return first.started.worktree
        if state.worktree:
            return state.worktree
        # a first stage the watchdog retried made its worktree in the attempt that settled it
        made_by = first.finished.execution_id if first.finished is not None else first.started.execution_id
        made = await self._last(made_by, "workspace.created")
        return made.path if isinstance(made, WorkspaceCreated) else None

    async def variables(self, state: RunState, stage: str, round_: int, worktree: str | None) -> dict[str, str]:
        """What `{{...}}` may name: the run's vars, the run, the previous stage, each stage's latest end."""
        assert state.request is not None
        values = dict(state.request.vars)
        values.update(
            run_id=state.run_id,
            pipeline=state.request.pipeline,
            repo=state.request.repo,
            base=state.request.base,
            stage=stage,
            round=str(round_),
            worktree=worktree or "",
        )
        spec = state.stage(stage) or {}
        words = " ".join(str(w) for w in (spec.get("task"), spec.get("run"), *(spec.get("command") or ())) if w)
        if worktree and ("branch" in words or "changed_files" in words):  # two git commands: only when used
            branch, changed = await asyncio.to_thread(_git_facts, worktree)
            values.update(branch=branch, changed_files=changed)
        for step in state.steps:
            done = step.finished
            if done is None:
                continue
            facts = {
                "outcome": done.outcome,
                "verdict": done.verdict or "",
                "comments": done.comments or "",
                "result": done.result or "",
                "exit_code": "" if done.exit_code is None else str(done.exit_code),
                "execution_id": done.execution_id,
                "stage": done.stage,
            }
            for key, value in facts.items():
                values[f"{done.stage}.{key}"] = value
                values[f"previous.{key}"] = value
        return values

    async def _settle(self, state: RunState, step: Step) -> bool:
        """The step's execution ended: record how, and where the run goes. False while it runs."""
        execution_id = step.started.execution_id
        # One round of reads at once (each a direct get): was it requested, retried, how did it end, its
        # result; read beside the run's own events when its end is the trigger.
        prefetched = state.prefetched.pop(execution_id, None)
        facts = await prefetched if prefetched is not None else await self._facts(execution_id)
        if not (isinstance(facts.exited, ExecutionExited) and facts.exited.exit_code == 0) and prefetched is not None:
            facts = await self._facts(execution_id)  # (a failure: the watchdog's decision may have come since)
        requested, retried, failed, exited = facts.requested, facts.retried, facts.failed, facts.exited
        if requested is None:
            # The conductor that claimed the step died before requesting it: request it now.
            spec = state.stage(step.started.stage)
            if spec is None:
                return False
            values = await self.variables(state, step.started.stage, step.started.round, step.started.worktree)
            try:
                request = self.stage_request(state, spec, values, step.started.worktree)
            except (ValueError, ValidationError):
                return False
            await self._request(execution_id, request)
            return False
        chain = [execution_id]
        if isinstance(retried, ExecutionRetryScheduled):
            chain = await self._attempts(execution_id)
            execution_id = chain[-1]  # the watchdog's last retry of it: the stage's outcome is that one's
            if await self._last(execution_id, "execution.requested") is None:
                return False  # the retry is requested after its backoff (its end is a trigger)
            facts = await self._facts(execution_id)
            failed, exited = facts.failed, facts.exited
        if not isinstance(failed, ExecutionFailed) and not isinstance(exited, ExecutionExited):
            return False
        if isinstance(failed, ExecutionFailed) or (isinstance(exited, ExecutionExited) and exited.exit_code != 0):
            wait = await self._watchdog_deciding(execution_id)
            if wait is not None:
                state.recheck_in = wait
                return False
        spec = state.stage(step.started.stage) or {}
        if step.started.step == 1 and not step.started.worktree and isinstance(facts.workspace, WorkspaceCreated):
            state.worktree = facts.workspace.path  # the run's worktree, made by its first stage
        result, found = await self._result(execution_id, facts)
        verdict = verdict_of(found) if found else None
        exit_code = exited.exit_code if isinstance(exited, ExecutionExited) else None
        error = f"{failed.stage}: {failed.error}"[:500] if isinstance(failed, ExecutionFailed) else None
        outcome = "passed" if exit_code == 0 and error is None else "failed"
        said = str(verdict.get("verdict")) if verdict else None
        if outcome == "passed" and said == "changes_requested":
            outcome = "changes_requested"
        following = self._following(state, spec, outcome)
        comments = verdict.get("comments") if verdict else None
        # A pass is sent without waiting for its acknowledgement: the next stage's stage.started goes out
        # behind it (a claim of its own), and both are acknowledged before the next execution is requested.
        await (self._send if outcome == "passed" else self._emit)(
            state,
            StageFinished(
                stage=step.started.stage,
                step=step.started.step,
                execution_id=execution_id,
                outcome=outcome,  # type: ignore[arg-type]
                exit_code=exit_code,
                verdict=said[:100] if said else None,
                comments=str(comments)[:RESULT_CHARS] if comments is not None else None,
                result=result[-RESULT_CHARS:] if result else None,
                error=error,
                next=following,
                attempts=len(chain),
            ),
            expected=state.last_finished_seq,
        )
        self.stages_finished += 1
        if outcome == "passed":  # a pass opens no breaker: counted once the next stage is requested
            deferred = self._deferred.setdefault(state.run_id, [])
            deferred += [(state, key, step.started.step) for key in self.breaker_keys(state, spec)]
        elif outcome == "failed":  # (a reviewer asking for changes is no failure)
            for key in self.breaker_keys(state, spec):
                await self._count(state, key, step.started.step, failed=True)
        return True

    @staticmethod
    def _following(state: RunState, spec: dict[str, Any], outcome: str) -> str:
        if outcome == "failed":
            return str(spec.get("on_failed") or END_FAIL)
        if outcome == "changes_requested":
            return str(spec.get("on_changes_requested") or END_FAIL)
        if spec.get("on_passed"):
            return str(spec["on_passed"])
        assert state.request is not None
        names = [str(s["name"]) for s in state.request.stages]
        at = names.index(str(spec.get("name"))) if spec.get("name") in names else len(names) - 1
        return names[at + 1] if at + 1 < len(names) else END_DONE

    async def _result(self, execution_id: str, facts: Facts | None = None) -> tuple[str, str]:
        """(the stage's result, the text a verdict is looked for in): the agent's final result when it
        gave one, else its output (stdout for the verdict; both streams, in order, for the result).

        Direct gets when that is a few reads (a final result; a command's few output chunks): a
        consumer made and read for each stage's end was most of exit -> stage.finished."""
        quick = await self._quick_result(execution_id, facts)
        if quick is not None:
            return quick
        final: list[str] = []
        output: list[str] = []
        stdout: list[str] = []

        async def handle(_seq: int, msg: Msg) -> bool:
            kind = msg.subject.split(".", 3)[3]
            if kind not in ("output", "agent.result"):
                return False
            try:
                data = decode_event(msg.data).data
            except EventError:
                return False
            if isinstance(data, Output):
                output.append(data.text)
                if data.stream == "stdout":
                    stdout.append(data.text)
                    if sum(len(t) for t in stdout) > 1 << 20:
                        del stdout[: len(stdout) // 2]
                if sum(len(t) for t in output) > 1 << 20:
                    del output[: len(output) // 2]
            elif isinstance(data, AgentResult) and data.text:
                final.append(data.text)
            return False

        await asyncio.wait_for(
            follow(self.bus.js, execution_events(execution_id), handle, stop_when_caught_up=True), READ_TIMEOUT_S
        )
        if final:
            return final[-1], final[-1]
        return "".join(output), "".join(stdout)

    async def _quick_result(self, execution_id: str, facts: Facts | None = None) -> tuple[str, str] | None:
        """_result from direct gets: the last `agent.result` with text, else up to QUICK_CHUNKS output
        chunks read one by one; None when there are more (the caller reads them with a consumer)."""
        subject = event_subject(execution_id, "output")
        if facts is None:
            facts = await self._facts(execution_id)
        last, count = facts.result, facts.output_chunks
        if isinstance(last, AgentResult) and last.text:
            return last.text, last.text
        if isinstance(last, AgentResult) or await self._output_retained():
            return None  # (log retention: output is in CORRAL_OUTPUT, which `follow` reads)
        if count > QUICK_CHUNKS:
            return None
        output: list[str] = []
        stdout: list[str] = []
        async for _, event in self._stored(subject, 1, limit=count):
            data = event.data
            if isinstance(data, Output):
                output.append(data.text)
                if data.stream == "stdout":
                    stdout.append(data.text)
        return "".join(output), "".join(stdout)

    async def _facts(self, execution_id: str) -> Facts:
        """An execution's end, its result and its worktree: seven direct gets at once (one round trip)."""
        subject = event_subject(execution_id, "output")
        kinds = (
            "execution.requested",
            "execution.retry_scheduled",
            "execution.failed",
            "execution.exited",
            "agent.result",
            "workspace.created",
        )
        *found, info = await asyncio.gather(
            *(self._last(execution_id, kind) for kind in kinds),
            self.bus.js.stream_info(STREAM, subjects_filter=subject),
        )
        requested, retried, failed, exited, result, workspace = found
        chunks = (info.state.subjects or {}).get(subject, 0)  # type: ignore[union-attr]
        return Facts(requested, retried, failed, exited, result, chunks, workspace)  # type: ignore[arg-type]

    async def _send(self, state: RunState, data: EventData, *, expected: int) -> None:
        """As _emit, but its acknowledgement is awaited later (_acked): folded in now, with the sequence
        it is stored at filled in when acknowledged. For a pass's stage.finished only."""
        event = self.bus.event(state.run_id, data, actor=self.instance, causation_id=state.request_id)
        future = await self.bus.publisher.send(
            event.subject, event.to_bytes(), msg_id=event.id, expected_last_subject_seq=expected
        )
        self._fold(state, state.last_finished_seq, event)
        state.unacked.append(future)

    async def _acked(self, state: RunState) -> bool:
        """Wait for what _send sent; True when one was refused (another conductor recorded that end)."""
        lost = False
        while state.unacked:
            future = state.unacked.pop(0)
            try:
                ack = await future
            except WrongLastSequence:
                self.lost_races += 1
                lost = True
                continue
            except Exception:
                lost = True
                continue
            if ack.seq and ack.seq > state.read_seq:
                state.own.add(ack.seq)
                state.last_finished_seq = max(state.last_finished_seq, ack.seq)
        return lost

    async def _output_retained(self) -> bool:
        """Whether output goes to the output stream ([retention] on): once it exists it stays; a miss is
        asked again after OUTPUT_STREAM_RECHECK_S (not a round trip per stage's end)."""
        if self._output_stream_found:
            return True
        now = time.monotonic()
        if self._output_stream_at is not None and now - self._output_stream_at < OUTPUT_STREAM_RECHECK_S:
            return False
        self._output_stream_found = await output_stream_exists(self.bus.js)
        self._output_stream_at = now
        return self._output_stream_found

    # --- schedules ---------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while not self.stopping.is_set():
            now = datetime.now(UTC)
            for job in self.schedules:
                try:
                    await self.fire_due(job, now)
                except Exception:
                    log.exception("conductor: schedule %s could not fire", job.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.25)

    async def fire_due(self, job: ScheduledJob, now: datetime) -> bool:
        """Fire the job's latest tick at or before `now` unless it was fired (by any conductor); True if this one did.

        The claim is `schedule.fired` appended expecting the schedule's last one: one conductor per tick.
        With catch_up = "none" a tick that fell before this conductor started is not fired (missed
        while nothing ran); with "last" the latest missed one is, once."""
        due = job.when.previous(now)
        if due is None:
            return False
        sid = schedule_id(job.name)
        last_seq = 0
        last: ScheduleFired | None = None
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(sid, "schedule.fired"))
            data = decode_event(stored.data or b"").data
            if isinstance(data, ScheduleFired):
                last, last_seq = data, stored.seq or 0
        except NotFoundError:
            pass
        if last is not None:
            await self._request_tick(job, last)  # (a held tick: once a human released its breaker)
            if last.tick >= due:
                return False
        late = due.timestamp() < self.started_at - 0.5
        if late and job.catch_up == "none":
            return False
        held = False
        if job.breaker_failures > 0 and not self.breakers_seen.closed(job.breaker_key):
            current = await self.breaker(job.breaker_key, counts=False)
            if current.open:
                if last is not None and last.held and last_seq > current.opened_seq:
                    return False  # a tick waits already: the ticks due while the breaker is open are that one run
                held = True
        fired = ScheduleFired(
            schedule=job.name,
            tick=due,
            target=job.target,
            target_id=new_execution_id(),
            late=late,
            held=held,
            breaker_failures=job.breaker_failures,
        )
        try:
            await self.bus.emit(sid, fired, actor=self.instance, expected_last_subject_seq=last_seq)
        except WrongLastSequence:
            return False  # another conductor fired it
        self.ticks_fired += 1
        await self._request_tick(job, fired)
        return True

    async def _request_tick(self, job: ScheduledJob, fired: ScheduleFired) -> None:
        """The tick's run or execution, requested once (expected sequence 0 on its own subject)."""
        key = (job.name, fired.target_id)
        if key in self._requested_ticks:
            return
        if fired.held:  # its breaker was open: requested once a human approves, never if he rejects
            if not self.breakers_seen.closed(job.breaker_key):
                return  # open as followed (no reads while it stays open)
            current = await self.breaker(job.breaker_key, counts=False)
            if current.open:
                return
            if current.closed is None or not current.closed.release:
                self._requested_ticks.add(key)  # stopped at the breaker: `corral schedules` shows it
                return
        data: EventData
        if fired.target == "pipeline":
            data = PipelineRequested.model_validate(job.payload)
        else:
            data = ExecutionRequested.model_validate(
                {**job.payload, "labels": {**(job.payload.get("labels") or {}), SCHEDULE_LABEL: job.name}}
            )
        with contextlib.suppress(WrongLastSequence):
            await self.bus.emit(fired.target_id, data, actor=self.instance, expected_last_subject_seq=0)
        self._requested_ticks.add(key)
        if len(self._requested_ticks) > 10_000:
            self._requested_ticks.clear()

    # --- tickets -----------------------------------------------------------------------------------

    async def ticket(self, ticket_id: str) -> None:
        """Claim a ready ticket (expected sequence 0), request its run once, and finish it with the run."""
        created = await self._last(ticket_id, "ticket.created")
        if not isinstance(created, TicketCreated) or await self._last(ticket_id, "ticket.finished") is not None:
            return
        claimed = await self._last(ticket_id, "ticket.claimed")
        if not isinstance(claimed, TicketClaimed):
            with contextlib.suppress(WrongLastSequence):
                await self.bus.emit(
                    ticket_id,
                    TicketClaimed(run_id=new_execution_id(), conductor=self.instance),
                    actor=self.instance,
                    expected_last_subject_seq=0,
                )
            claimed = await self._last(ticket_id, "ticket.claimed")
            if not isinstance(claimed, TicketClaimed):
                return
        run_id = claimed.run_id
        if await self._last(run_id, "pipeline.requested") is None:
            try:
                request = PipelineRequested.model_validate({**created.run, "ticket_id": ticket_id})
            except ValidationError as exc:
                await self._ticket_finished(ticket_id, "failed", run_id, f"bad pipeline request: {exc}"[:500], None)
                return
            with contextlib.suppress(WrongLastSequence):
                await self.bus.emit(run_id, request, actor=self.instance, expected_last_subject_seq=0)
            return  # its pipeline.requested moves the run (a trigger)
        ended = await self._last(run_id, "pipeline.finished")
        if isinstance(ended, PipelineFinished):
            last = await self._last(run_id, "stage.finished")
            result = last.result if isinstance(last, StageFinished) else None
            hooks = await self._hook_results(run_id)
            await self._ticket_finished(ticket_id, ended.outcome, run_id, ended.reason, result, hooks)

    async def _hook_results(self, run_id: str) -> tuple[dict[str, Any], ...]:
        """What each hook stage (a `run` shell line: a verifier, a deploy) of the run ended with, in order."""
        requested = await self._last(run_id, "pipeline.requested")
        if not isinstance(requested, PipelineRequested):
            return ()
        hook_stages = {spec.get("name") for spec in requested.stages if spec.get("run")}
        if not hook_stages:
            return ()
        hooks = []
        async for _, event in self._stored(event_subject(run_id, "stage.finished"), 1):
            data = event.data
            if isinstance(data, StageFinished) and data.stage in hook_stages:
                hooks.append(
                    {
                        "stage": data.stage,
                        "step": data.step,
                        "outcome": data.outcome,
                        "exit_code": data.exit_code,
                        "result": data.result,
                    }
                )
        return tuple(hooks)

    async def _ticket_finished(
        self,
        ticket_id: str,
        outcome: str,
        run_id: str,
        reason: str | None,
        result: str | None,
        hooks: tuple[dict[str, Any], ...] = (),
    ) -> None:
        with contextlib.suppress(WrongLastSequence):
            await self.bus.emit(
                ticket_id,
                TicketFinished(outcome=outcome, run_id=run_id, reason=reason, result=result, hooks=hooks),  # type: ignore[arg-type]
                actor=self.instance,
                expected_last_subject_seq=0,
            )

    # --- circuit breakers ------------------------------------------------------------------------

    @staticmethod
    def breaker_keys(state: RunState, spec: dict[str, Any]) -> list[str]:
        """A stage's breakers: its own (`stage:<pipeline>/<stage>`) and its template's (`template:<name>`)."""
        assert state.request is not None
        if state.request.breaker_failures == 0:
            return []
        keys = [f"stage:{state.request.pipeline}/{spec.get('name')}"]
        template = (spec.get("request") or {}).get("template")
        if template:
            keys.append(f"template:{template}")
        return keys

    async def breaker(self, key: str, *, counts: bool = True) -> Breaker:
        """A breaker as its last events tell it (`counts=False`: open or closed only, one read less)."""
        bid = breaker_id(key)
        found = Breaker(key)
        kinds = (
            ("breaker.counted", "breaker.opened", "breaker.closed") if counts else ("breaker.opened", "breaker.closed")
        )
        for kind in kinds:
            try:
                stored = await self.bus.js.get_last_msg(STREAM, event_subject(bid, kind))
            except NotFoundError:
                continue
            try:
                data = decode_event(stored.data or b"").data
            except EventError:
                continue
            if isinstance(data, BreakerCounted):
                found.failures, found.counted_seq, found.counted_run = data.failures, stored.seq or 0, data.run_id
            elif isinstance(data, BreakerOpened):
                found.opened_seq = stored.seq or 0
            elif isinstance(data, BreakerClosed):
                found.closed, found.closed_seq = data, stored.seq or 0
        return found

    async def _count(self, state: RunState, key: str, step: int, *, failed: bool) -> None:
        """A stage's end on one of its breakers (see _count_key)."""
        assert state.request is not None
        await self._count_key(
            key,
            failed=failed,
            threshold=state.request.breaker_failures,
            run_id=state.run_id,
            step=step,
            cause=state.request_id,
        )

    async def _count_plain(self, event: Event) -> None:
        """A plain run of a template ended (`corral run -t`, a schedule's): counted on `template:<name>`.

        A cancel (by anyone, a stopping spawner, a rejected escalation) counts neither way; a failure
        the watchdog will retry counts when its last attempt ends."""
        request = await self._last(event.execution_id, "execution.requested")
        if not isinstance(request, ExecutionRequested) or RUN_LABEL in request.labels:
            return
        schedule = request.labels.get(SCHEDULE_LABEL)
        if schedule is not None:  # a schedule's tick: counted on the schedule's breaker, not its template's
            key = f"{SCHEDULE_PREFIX}{schedule}"
            threshold = await self._schedule_threshold(schedule)
        elif request.template:
            key = f"template:{request.template}"
            threshold = self.template_breakers.get(request.template, DEFAULT_BREAKER_FAILURES)
        else:
            return
        data = event.data
        if threshold <= 0 or (isinstance(data, ExecutionExited) and data.reason in ("cancelled", "spawner_stopped")):
            return
        failed = not (isinstance(data, ExecutionExited) and data.exit_code == 0 and data.reason == "exited")
        if failed and await self._retry_expected(event.execution_id, request):
            return
        if (await self.breaker(key)).counted_run == event.execution_id:
            return  # counted already (this trigger came again)
        await self._count_key(
            key, failed=failed, threshold=threshold, run_id=event.execution_id, step=0, cause=event.id
        )

    async def _schedule_threshold(self, name: str) -> int:
        """A schedule's breaker_failures: as its conductor's corral.toml says, else as its last tick recorded."""
        job = next((j for j in self.schedules if j.name == name), None)
        if job is not None:
            return job.breaker_failures
        fired = await self._last(schedule_id(name), "schedule.fired")
        return fired.breaker_failures if isinstance(fired, ScheduleFired) else DEFAULT_BREAKER_FAILURES

    async def _count_scheduled_run(self, state: RunState, outcome: str) -> None:
        """A schedule's pipeline run ended: counted on `schedule:<name>` (a cancel counts neither way)."""
        assert state.request is not None
        requested_by = state.request.requested_by or ""
        if not requested_by.startswith(SCHEDULE_PREFIX) or outcome not in ("passed", "failed"):
            return
        name = requested_by.removeprefix(SCHEDULE_PREFIX)
        key = f"{SCHEDULE_PREFIX}{name}"
        threshold = await self._schedule_threshold(name)
        if threshold <= 0 or (outcome == "passed" and self.breakers_seen.quiet(key)):
            return
        if (await self.breaker(key)).counted_run == state.run_id:
            return  # counted already
        await self._count_key(
            key, failed=outcome == "failed", threshold=threshold, run_id=state.run_id, step=0, cause=state.request_id
        )

    async def _count_key(
        self, key: str, *, failed: bool, threshold: int, run_id: str, step: int, cause: str | None
    ) -> None:
        """One more failure in a row (or none after a pass); at the threshold the breaker opens and a
        human is asked. Each append expects the breaker's last one: counted once across conductors."""
        bid = breaker_id(key)
        for _ in range(20):
            current = await self.breaker(key)
            failures = current.failures + 1 if failed else 0
            if failures == current.failures == 0:
                return
            try:
                await self.bus.emit(
                    bid,
                    BreakerCounted(key=key, failures=failures, run_id=run_id, step=step),
                    actor=self.instance,
                    causation_id=cause,
                    expected_last_subject_seq=current.counted_seq,
                )
            except WrongLastSequence:
                continue
            if failed and failures >= threshold and not current.open:
                await self._open(key, failures, threshold, current.opened_seq)
            return

    async def _open(self, key: str, failures: int, threshold: int, last_opened_seq: int) -> None:
        bid = breaker_id(key)
        try:
            ack = await self.bus.emit(
                bid,
                BreakerOpened(key=key, failures=failures, threshold=threshold),
                actor=self.instance,
                expected_last_subject_seq=last_opened_seq,
            )
        except WrongLastSequence:
            return  # another conductor opened it
        kind, _, name = key.partition(":")
        await self._publish(
            bid,
            ApprovalNeeded(
                question=(
                    f"Circuit breaker {key} is open: the {kind} {name} failed {failures} times in a row. "
                    f"New runs of it are held. Approve to close it and release them; reject to stop them."
                ),
                options=("approve", "reject"),
                category=ESCALATION,
            ),
            event_id=derived_id(f"{bid}-{ack.seq}", ESCALATION),
        )

    async def _held(self, state: RunState, stage: str) -> bool:
        """Whether the run must wait before `stage` (a breaker of it is open); a run whose breaker a
        human closed with `reject` since it was held is finished as failed here."""
        spec = state.stage(stage)
        if spec is None:
            return False
        for key in self.breaker_keys(state, spec):
            bid = breaker_id(key)
            if self.breakers_seen.closed(key) and (state.held is None or state.held.breaker_id != bid):
                continue  # closed as followed, and this run never waited on it: no reads
            current = await self.breaker(key, counts=False)
            if current.open:
                if state.held is None or state.held.breaker_id != bid or state.held_seq < current.opened_seq:
                    await self._publish(
                        state.run_id,
                        PipelineHeld(stage=stage, breaker=key, breaker_id=bid),
                        event_id=derived_id(f"{state.run_id}-{len(state.steps)}-{current.opened_seq}", "held"),
                    )
                return True
            closed = current.closed
            held_here = state.held is not None and state.held.breaker_id == bid and state.held.stage == stage
            if held_here and closed is not None and current.closed_seq > state.held_seq and not closed.release:
                who = f" by {closed.decided_by}" if closed.decided_by else ""
                await self._finish(state, "failed", f"stopped at circuit breaker {key} (rejected{who})")
                return True
        return False

    async def _decided(self, bid: str, decision: ApprovalGranted | ApprovalDenied) -> bool:
        """A decision on a breaker's escalation closes it; True when it did."""
        opened = await self._last(bid, "breaker.opened")
        if not isinstance(opened, BreakerOpened):
            return False
        current = await self.breaker(opened.key)
        if not current.open:
            return False
        with contextlib.suppress(WrongLastSequence):
            await self.bus.emit(
                bid,
                BreakerClosed(
                    key=opened.key,
                    release=isinstance(decision, ApprovalGranted),
                    approval_id=decision.approval_id,
                    decided_by=decision.decided_by,
                ),
                actor=self.instance,
                expected_last_subject_seq=current.closed_seq,
            )
        with contextlib.suppress(WrongLastSequence):  # the next failures count from 0
            await self.bus.emit(
                bid,
                BreakerCounted(key=opened.key, failures=0, run_id="", step=0),
                actor=self.instance,
                expected_last_subject_seq=current.counted_seq,
            )
        return True

    async def _escalate_crash_loop(self, event: Event) -> None:
        """A crash loop (the watchdog stopped retrying) asks a human, as an open breaker does."""
        assert isinstance(event.data, ExecutionCrashLoop)
        await self._publish(
            event.execution_id,
            ApprovalNeeded(
                question=(
                    f"{event.execution_id} is in a crash loop: {event.data.failures} failures within "
                    f"{event.data.window_s:.0f}s; retries stopped. Look at it (corral logs {event.execution_id}) "
                    "and approve to acknowledge."
                ),
                options=("approve", "reject"),
                category=ESCALATION,
            ),
            event_id=derived_id(event.id, ESCALATION),
        )

    # --- watchdog retries ------------------------------------------------------------------------

    async def _retry_expected(self, execution_id: str, request: ExecutionRequested) -> bool:
        """Whether the watchdog will retry this ended execution ([watchdog] retry_on, retry_max_attempts),
        judged from its events as the watchdog judges it (actors/watchdog.py classify_exit, will_retry)."""
        cancel = await self._last(execution_id, "cancel.requested")
        restart = (
            isinstance(cancel, CancelRequested) and cancel.requested_by == WATCHDOG and cancel.reason == RESTART_REASON
        )
        failed = await self._last(execution_id, "execution.failed")
        if isinstance(failed, ExecutionFailed):
            return will_retry(self.watchdog, "stalled" if restart else failed.stage, request.attempt, restart=restart)
        exited = await self._last(execution_id, "execution.exited")
        if not isinstance(exited, ExecutionExited):
            return False
        timed = await self._last(execution_id, "execution.timed_out")
        kind = timed.kind if isinstance(timed, ExecutionTimedOut) else None
        failure = classify_exit(
            exited.exit_code,
            exited.signal,
            exited.reason,
            restart=restart,
            spawn_timed_out=kind == "spawn",
            idle_timed_out=kind == "idle",
        )
        return failure is not None and will_retry(self.watchdog, failure, request.attempt, restart=restart)

    async def _attempts(self, first: str) -> list[str]:
        """A step's executions: its first, then each retry the watchdog scheduled after a failure."""
        chain = [first]
        while len(chain) < 100:
            scheduled = await self._last(chain[-1], "execution.retry_scheduled")
            if not isinstance(scheduled, ExecutionRetryScheduled):
                break
            chain.append(scheduled.retry_execution_id)
        return chain

    async def _watchdog_deciding(self, execution_id: str) -> float | None:
        """Seconds to wait for the watchdog's decision (a retry, or a crash loop) on this failed execution,
        or None when there is none to wait for: it will not retry it, it decided, or it took too long."""
        request = await self._last(execution_id, "execution.requested")
        if not isinstance(request, ExecutionRequested) or not await self._retry_expected(execution_id, request):
            return None
        if await self._last(execution_id, "execution.crash_loop") is not None:
            return None
        ended = await self._last_event(execution_id, "execution.exited") or await self._last_event(
            execution_id, "execution.failed"
        )
        waited = (datetime.now(UTC) - ended.ts).total_seconds() if ended is not None else WATCHDOG_DECISION_S
        if waited >= WATCHDOG_DECISION_S:
            log.warning("conductor: no retry decision of the watchdog on %s; the stage failed", execution_id)
            return None
        return WATCHDOG_DECISION_S - waited + 0.5

    # --- appending -------------------------------------------------------------------------------

    async def _emit(self, state: RunState, data: EventData, *, expected: int) -> None:
        """Append to the run with an expected last sequence on the event's subject (WrongLastSequence: lost),
        and fold it into `state` as stored: the run is not read back after each of its steps."""
        event = self.bus.event(state.run_id, data, actor=self.instance, causation_id=state.request_id)
        ack = await self.bus.publisher.publish(event, expected_last_subject_seq=expected)
        if ack.seq and ack.seq > state.read_seq and ack.seq not in state.own:
            state.own.add(ack.seq)
            self._fold(state, ack.seq, event)

    async def _publish(self, execution_id: str, data: EventData, *, event_id: str) -> None:
        event = new_event(execution_id, data, actor=self.instance, event_id=event_id)
        await self.bus.publisher.publish(event)


def _git_facts(worktree: str) -> tuple[str, str]:
    """(branch, changed files one per line: committed since the fork point, staged, unstaged, untracked)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", worktree, *args], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    branch = git("symbolic-ref", "--short", "HEAD").strip()
    changed: dict[str, None] = {}
    for line in git("status", "--porcelain", "--untracked-files=all").splitlines():
        if len(line) > 3:
            changed[line[3:].split(" -> ")[-1]] = None
    return branch, "\n".join(changed)
