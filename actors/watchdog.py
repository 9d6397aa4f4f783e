"""The watchdog: notices stalled and slow-to-start executions, reacts, and retries failed ones.

It reads every event from one ordered consumer on `corral.evt.>` and writes events, nothing else.
At start the consumer delivers the newest event of each (execution, type) subject
(DeliverPolicy.LAST_PER_SUBJECT), in stream order, then every new event: that history is enough
to rebuild which executions are live, when each was last active, whether it is paused, and what
was already recorded about it. Timing for history uses the stream's timestamps; once caught up,
the monotonic arrival time of each event.

Activity (output, heartbeat, input.delivered) is handled from the subject alone; only lifecycle
events are decoded. Under log retention output is in CORRAL_OUTPUT (docs/retention.md): a second
ordered consumer reads it, its newest chunk per execution first, and counts it as activity too.
Everything the watchdog records that must exist once is an optimistic append
(Nats-Expected-Last-Subject-Sequence), so a restarted watchdog, or two of them, never record a
stall, a timeout, a retry or a retried request twice. See docs/watchdog.md.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from actors.runtime import Actor
from events.approvals import EXIT_CODE_APPROVAL
from events.envelope import decode_event
from events.errors import EventError, PublishError, WrongLastSequence
from events.ids import new_execution_id
from events.stream import output_stream_exists
from events.subjects import ALL_EVENTS, EVENT_PREFIX, OUTPUT_EVENTS, OUTPUT_STREAM, STREAM, ack_pending, event_subject
from events.types import (
    CancelRequested,
    EventData,
    ExecutionCrashLoop,
    ExecutionRequested,
    ExecutionRetryScheduled,
    ExecutionStalled,
    ExecutionTimedOut,
    PauseRequested,
)
from replay.history import last_sequence

log = logging.getLogger(__name__)

OnStall = Literal["notify", "pause", "cancel", "restart"]
ON_STALL: Final[tuple[str, ...]] = ("notify", "pause", "cancel", "restart")

ACTIVITY_TYPES: Final = frozenset({"output", "heartbeat", "input.delivered"})
REQUESTER: Final = "watchdog"
STALL_REASON: Final = "stalled"
IDLE_CANCEL_REASON: Final = "idle timeout"
SPAWN_CANCEL_REASON: Final = "spawn timeout"
RESTART_REASON: Final = "stalled: restarting"
# A failure older than this when a watchdog starts was another watchdog's to retry (or not): only
# the failures of a short outage (a restart, a crash) are still decided by the new one.
OLD_FAILURE_S: Final = 60.0

_PREFIX_LEN: Final = len(EVENT_PREFIX) + 1
_PRUNE_INTERVAL_S: Final = 10.0

# Phases of a live execution.
_REQUESTED: Final = 0
_CLAIMED: Final = 1
_RUNNING: Final = 2


@dataclass(frozen=True)
class WatchdogSettings:
    """How the watchdog judges executions; per-execution request fields take precedence.

    `default_idle_timeout_s` and `default_on_stall` apply to requests whose `timeouts.idle` /
    `on_stall` are unset. `crash_loop_failures` <= 0 disables crash-loop detection.
    """

    check_interval_s: float = 0.25
    default_idle_timeout_s: float | None = None
    default_on_stall: OnStall = "notify"
    cancel_grace_s: float = 10.0
    crash_loop_failures: int = 3
    crash_loop_window_s: float = 600.0
    retry_max_attempts: int = 0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    retry_on: tuple[str, ...] = ("lost", "spawn")

    def retry_delay(self, attempt: int) -> float:
        """Delay before requesting attempt `attempt + 1` after attempt `attempt` failed."""
        return float(min(self.retry_backoff_s * 2.0 ** max(attempt - 1, 0), self.retry_backoff_max_s))


@dataclass(slots=True)
class _Live:
    """What the watchdog holds for one execution between its request and its end."""

    execution_id: str
    request_id: str | None
    root: str
    attempt: int
    idle_s: float | None
    spawn_s: float | None
    on_stall: str
    phase: int = _REQUESTED
    spawn_clock: float | None = None  # monotonic time the spawn clock started (at the claim)
    last_activity: float = 0.0  # monotonic time of the last activity (or start, or resume)
    paused: bool = False
    awaiting: set[str] = field(default_factory=set)  # approvals it waits for: its idle clock is stopped
    stalled: bool = False  # a stall is recorded for the current episode
    reaction: str | None = None  # the reaction of that stall
    owner: bool = False  # this instance applies the pending reaction (it recorded it, or recovered it)
    stalled_seq: int = 0  # stream sequence of the newest execution.stalled of this execution
    timed_out_seq: int = 0  # same for execution.timed_out
    pause_sent: bool = False  # a pause was requested since the current stall
    cancel_sent: bool = False  # a cancel was requested (by anyone): the execution is ending
    idle_timed_out: bool = False
    spawn_timed_out: bool = False
    restart: bool = False  # the watchdog cancelled it to restart it
    busy: bool = False  # an action task for it is in flight


@dataclass(slots=True)
class _Ending:
    """A failed execution whose retry (or crash loop) is not decided yet."""

    execution_id: str
    event_id: str | None
    root: str
    attempt: int
    failure_class: str
    restart: bool
    at: float
    busy: bool = False


@dataclass(slots=True)
class _PendingRetry:
    """A recorded retry whose new execution is not requested yet."""

    failed_id: str
    retry_id: str
    attempt: int
    due: float
    cause_id: str | None
    busy: bool = False


@dataclass(slots=True)
class WatchdogStats:
    """What this instance has read and recorded since it started."""

    events: int = 0
    stalls: int = 0
    timeouts: int = 0
    retries: int = 0
    crash_loops: int = 0


def classify_exit(
    exit_code: int | None,
    signal: int | None,
    reason: str,
    *,
    restart: bool,
    spawn_timed_out: bool,
    idle_timed_out: bool,
) -> str | None:
    """Return the failure class of an `execution.exited`, or None when it is not a failure to retry.

    An execution the watchdog itself stopped is classed by why it stopped it: "stalled" (restart
    reaction), "spawn" (spawn timeout), "timeout" (idle timeout), unless the agent exited 0.
    """
    if reason == "exited" and exit_code == 0 and signal is None:
        return None
    if restart:
        return "stalled"
    if spawn_timed_out:
        return "spawn"
    if idle_timed_out:
        return "timeout"
    if reason in ("cancelled", "spawner_stopped"):
        return None
    if reason == "exited" and exit_code == EXIT_CODE_APPROVAL and signal is None:
        return None  # it asked for an approval: the approver restarts it after the decision
    if reason in ("timeout", "lost"):
        return reason
    if signal is not None:
        return "signal"
    if exit_code != 0:
        return "exit"
    return None


def will_retry(settings: WatchdogSettings, failure_class: str | None, attempt: int, *, restart: bool = False) -> bool:
    """Whether a failure of this class at this attempt is retried (a restart always is; docs/watchdog.md).
    The conductor asks it too: a pipeline stage follows its retries (actors/conductor.py)."""
    if restart:
        return True
    if failure_class is None or failure_class not in settings.retry_on:
        return False
    return attempt < 1 + settings.retry_max_attempts


def _reply_meta(reply: str) -> tuple[int, int]:
    """Return (stream sequence, stream timestamp in ns) from a JetStream delivery's reply subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7])
    return int(tokens[7]), int(tokens[9])


def _positive(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


class Watchdog(Actor):
    """Watches live executions for stalls and spawn timeouts; retries failures; stops crash loops."""

    name = "watchdog"

    def __init__(self, bus: Bus, settings: WatchdogSettings | None = None, *, instance: str | None = None) -> None:
        super().__init__(bus, instance=instance)
        self.settings = settings or WatchdogSettings()
        if self.settings.default_on_stall not in ON_STALL:
            raise ValueError(f"default_on_stall must be one of {', '.join(ON_STALL)}")
        self._started = time.monotonic()
        self.live: dict[str, _Live] = {}
        self.endings: dict[str, _Ending] = {}
        self.pending_retries: dict[str, _PendingRetry] = {}
        self.chain_failures: dict[str, deque[float]] = {}
        self.caught_up = asyncio.Event()
        self.stats = WatchdogStats()
        self._history_end = 0
        # Log retention (docs/retention.md): output read from CORRAL_OUTPUT, before the core history.
        self._output_history_end = 0
        self._output_read = asyncio.Event()
        self._output_seen: dict[str, float] = {}  # execution -> its newest output until caught up
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._last_prune = 0.0
        self._lifecycle = {
            "execution.requested": self._on_requested,
            "execution.claimed": self._on_claimed,
            "execution.started": self._on_started,
            "execution.paused": self._on_paused,
            "execution.resumed": self._on_resumed,
            "execution.stalled": self._on_stalled,
            "execution.timed_out": self._on_timed_out,
            "pause.requested": self._on_pause_requested,
            "cancel.requested": self._on_cancel_requested,
            "execution.exited": self._on_exited,
            "execution.failed": self._on_failed,
            "execution.retry_scheduled": self._on_retry_scheduled,
            "execution.crash_loop": self._on_crash_loop,
            "approval.requested": self._on_approval_requested,
            "approval.granted": self._on_approval_decided,
            "approval.denied": self._on_approval_decided,
            "approval.expired": self._on_approval_decided,
        }

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "tracked": len(self.live),
            "stalled": sum(1 for t in self.live.values() if t.stalled),
            "pending_retries": len(self.pending_retries),
            "caught_up": self.caught_up.is_set(),
        }

    # --- main loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        output_sub = await self._follow_output()
        self._history_end = await last_sequence(self.bus.js)
        if self._history_end == 0:
            self.caught_up.set()
        sub = await self.bus.js.subscribe(
            ALL_EVENTS,
            stream=STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            cb=self._on_msg,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        try:
            while not self.stopping.is_set():
                delay = self.settings.check_interval_s
                if self.caught_up.is_set():
                    delay = self._check(time.monotonic())
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            for subscription in (sub, output_sub):
                if subscription is not None:
                    with contextlib.suppress(Exception):
                        await subscription.unsubscribe()

    async def _follow_output(self) -> Any:
        """Read output activity from CORRAL_OUTPUT when log retention put it there; its history first."""
        js = self.bus.js
        if not await output_stream_exists(js):
            return None
        self._output_history_end = int((await js.stream_info(OUTPUT_STREAM)).state.last_seq)
        if self._output_history_end == 0:
            self._output_read.set()
        sub = await js.subscribe(
            OUTPUT_EVENTS,
            stream=OUTPUT_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            cb=self._on_output_msg,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        with contextlib.suppress(TimeoutError):  # what expired meanwhile is not delivered: do not wait for it
            await asyncio.wait_for(self._output_read.wait(), 10.0)
        return sub

    async def _on_output_msg(self, msg: Msg) -> None:
        """An output event from CORRAL_OUTPUT: activity, like output in the core log."""
        subject = msg.subject
        execution_id = subject[_PREFIX_LEN : subject.find(".", _PREFIX_LEN)]
        self.stats.events += 1
        seq, ts_ns = _reply_meta(msg.reply)
        now = time.monotonic()
        history = seq <= self._output_history_end
        at = now - max(0.0, time.time() - ts_ns / 1e9) if history else now
        if self.caught_up.is_set():
            t = self.live.get(execution_id)
            if t is not None:
                t.last_activity = max(t.last_activity, at)
                if not history:  # an old chunk read late must not end a stall recorded after it
                    t.stalled = False
        else:  # its request may not be read yet: applied once the core history is (_on_caught_up)
            self._output_seen[execution_id] = max(self._output_seen.get(execution_id, at), at)
        if history and (seq >= self._output_history_end or ack_pending(msg.reply) == 0):
            self._output_read.set()

    async def stop(self) -> None:
        self._wake.set()  # the loop's wait ends now, not at its next check: a quicker `corral run`
        await super().stop()

    async def on_stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)

    def _check(self, now: float) -> float:
        """Start the actions that are due; return how long to sleep before the next check."""
        s = self.settings
        next_due = now + s.check_interval_s
        for t in self.live.values():
            if t.busy:
                continue
            if t.owner and self._reaction_pending(t):
                self._spawn(t, self._react(t))
                continue
            if t.cancel_sent:
                continue
            if t.phase == _RUNNING:
                if t.paused or t.stalled or t.idle_s is None or t.awaiting:
                    continue
                due = t.last_activity + t.idle_s
                if now >= due:
                    self._spawn(t, self._stall(t, now - t.last_activity, t.stalled_seq))
                elif due < next_due:
                    next_due = due
            elif t.phase == _CLAIMED and t.spawn_s is not None and t.spawn_clock is not None and not t.spawn_timed_out:
                due = t.spawn_clock + t.spawn_s
                if now >= due:
                    self._spawn(t, self._spawn_timeout(t, t.timed_out_seq))
                elif due < next_due:
                    next_due = due
        for ending in list(self.endings.values()):
            if ending.busy:
                continue
            if self._retryable(ending):
                self._spawn(ending, self._decide(ending))
            else:
                self._chain_over(ending)
        for retry in list(self.pending_retries.values()):
            if retry.busy:
                continue
            if now >= retry.due:
                self._spawn(retry, self._request_retry(retry))
            elif retry.due < next_due:
                next_due = retry.due
        if now - self._last_prune >= _PRUNE_INTERVAL_S:
            self._last_prune = now
            for root in list(self.chain_failures):
                self._failures_in_window(root, now)
        return max(0.005, min(next_due, now + s.check_interval_s) - time.monotonic())

    def _spawn(self, owner: _Live | _Ending | _PendingRetry, coro: Coroutine[Any, Any, None]) -> None:
        owner.busy = True

        async def guarded() -> None:
            try:
                await coro
            except PublishError as exc:  # NATS unreachable or slow: the next check tries again
                log.warning("watchdog: %s", exc)
            except Exception:
                log.exception("watchdog: action failed")
            finally:
                owner.busy = False

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- reading events --------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        subject = msg.subject
        dot = subject.find(".", _PREFIX_LEN)
        execution_id = subject[_PREFIX_LEN:dot]
        kind = subject[dot + 1 :]
        self.stats.events += 1
        try:
            if not self.caught_up.is_set():
                self._on_history_msg(msg, execution_id, kind)
                return
            if kind in ACTIVITY_TYPES:
                t = self.live.get(execution_id)
                if t is not None:
                    t.last_activity = time.monotonic()
                    t.stalled = False
                return
            handler = self._lifecycle.get(kind)
            if handler is not None:
                seq, _ = _reply_meta(msg.reply)
                handler(execution_id, self._payload(msg), seq, time.monotonic())
        except Exception:
            log.exception("watchdog: cannot handle %s", subject)

    def _on_history_msg(self, msg: Msg, execution_id: str, kind: str) -> None:
        seq, ts_ns = _reply_meta(msg.reply)
        if seq <= self._history_end:
            now = time.monotonic()
            at = now - max(0.0, time.time() - ts_ns / 1e9)
        else:
            at = time.monotonic()
        try:
            if kind in ACTIVITY_TYPES:
                t = self.live.get(execution_id)
                if t is not None:
                    t.last_activity = max(t.last_activity, at)
                    t.stalled = False
            else:
                handler = self._lifecycle.get(kind)
                if handler is not None:
                    handler(execution_id, self._payload(msg), seq, at)
        finally:
            if seq >= self._history_end:
                self._on_caught_up(time.monotonic())

    def _on_caught_up(self, now: float) -> None:
        """History is read: forget failures too old to decide now; from here the checks run."""
        horizon = now - self.settings.crash_loop_window_s
        for execution_id, ending in list(self.endings.items()):
            if ending.at < horizon:
                del self.endings[execution_id]
        for execution_id, at in self._output_seen.items():
            t = self.live.get(execution_id)
            if t is not None:
                t.last_activity = max(t.last_activity, at)
        self._output_seen.clear()
        self.caught_up.set()
        self._wake.set()

    @staticmethod
    def _payload(msg: Msg) -> dict[str, Any]:
        raw = orjson.loads(msg.data)
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise EventError("not an event envelope")
        return raw

    def _on_requested(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        self.pending_retries.pop(execution_id, None)
        if execution_id in self.live:
            return
        data = raw["data"]
        timeouts = data.get("timeouts") or {}
        idle = _positive(timeouts.get("idle"))
        if idle is None:
            idle = _positive(self.settings.default_idle_timeout_s)
        on_stall = data.get("on_stall") or self.settings.default_on_stall
        attempt = data.get("attempt")
        self.live[execution_id] = _Live(
            execution_id=execution_id,
            request_id=raw.get("id"),
            root=data.get("retry_of") or execution_id,
            attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1,
            idle_s=idle,
            spawn_s=_positive(timeouts.get("spawn")),
            on_stall=on_stall if on_stall in ON_STALL else self.settings.default_on_stall,
            last_activity=at,
        )

    def _on_claimed(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is not None and t.phase == _REQUESTED:
            t.phase = _CLAIMED
            t.spawn_clock = at

    def _on_started(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is not None:
            t.phase = _RUNNING
            t.spawn_clock = None
            t.last_activity = max(t.last_activity, at)

    def _on_paused(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is not None:
            t.paused = True

    def _on_resumed(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is not None:
            t.paused = False
            t.stalled = False  # the idle clock restarts: a new episode
            t.last_activity = max(t.last_activity, at)

    def _on_approval_requested(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        # An agent waiting for a human decision is not stalled: its idle clock stops until then.
        t = self.live.get(execution_id)
        approval_id = raw.get("data", {}).get("approval_id")
        if t is not None and isinstance(approval_id, str):
            t.awaiting.add(approval_id)

    def _on_approval_decided(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        approval_id = raw.get("data", {}).get("approval_id")
        if t is not None and approval_id in t.awaiting:
            t.awaiting.discard(approval_id)
            if not t.awaiting:
                t.last_activity = max(t.last_activity, at)  # the idle clock starts again from the decision

    def _on_stalled(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is None:
            return
        t.stalled_seq = max(t.stalled_seq, seq)
        if t.stalled:
            return  # this episode's stall (ours, echoed back, or a rival's that won the append)
        t.stalled = True
        t.reaction = raw["data"].get("reaction")
        t.pause_sent = False
        # A stall read from history may lack its reaction (a watchdog stopped in between): apply it.
        t.owner = raw.get("actor") == self.instance or not self.caught_up.is_set()

    def _on_timed_out(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is None:
            return
        t.timed_out_seq = max(t.timed_out_seq, seq)
        kind = raw["data"].get("kind")
        if kind == "idle" and not t.idle_timed_out:
            t.idle_timed_out = True
            t.owner = raw.get("actor") == self.instance or not self.caught_up.is_set()
        elif kind == "spawn" and not t.spawn_timed_out:
            t.spawn_timed_out = True
            t.owner = raw.get("actor") == self.instance or not self.caught_up.is_set()

    def _on_pause_requested(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is not None and t.stalled:
            t.pause_sent = True

    def _on_cancel_requested(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.get(execution_id)
        if t is None:
            return
        t.cancel_sent = True
        data = raw["data"]
        if data.get("requested_by") == REQUESTER and data.get("reason") == RESTART_REASON:
            t.restart = True

    def _on_exited(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.pop(execution_id, None)
        if t is None:
            return
        data = raw["data"]
        failure_class = classify_exit(
            data.get("exit_code"),
            data.get("signal"),
            data.get("reason") or "exited",
            restart=t.restart,
            spawn_timed_out=t.spawn_timed_out,
            idle_timed_out=t.idle_timed_out,
        )
        self._ended(t, failure_class, raw.get("id"), at)

    def _on_failed(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        t = self.live.pop(execution_id, None)
        if t is None:
            return
        stage = raw["data"].get("stage") or "internal"
        self._ended(t, "stalled" if t.restart else str(stage), raw.get("id"), at)

    def _ended(self, t: _Live, failure_class: str | None, event_id: str | None, at: float) -> None:
        if failure_class is None:
            return
        self.chain_failures.setdefault(t.root, deque()).append(at)
        self.endings[t.execution_id] = _Ending(
            t.execution_id, event_id, t.root, t.attempt, failure_class, t.restart or failure_class == "stalled", at
        )
        self._wake.set()

    def _on_retry_scheduled(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        self.endings.pop(execution_id, None)
        data = raw["data"]
        retry_id = data.get("retry_execution_id")
        if not isinstance(retry_id, str) or retry_id in self.pending_retries or retry_id in self.live:
            return
        delay = _positive(data.get("delay_s")) or 0.0
        attempt = data.get("attempt")
        self.pending_retries[retry_id] = _PendingRetry(
            execution_id, retry_id, attempt if isinstance(attempt, int) else 2, at + delay, raw.get("id")
        )
        self._wake.set()

    def _on_crash_loop(self, execution_id: str, raw: dict[str, Any], seq: int, at: float) -> None:
        self.endings.pop(execution_id, None)

    # --- acting ----------------------------------------------------------------------------------

    async def _emit(
        self, execution_id: str, data: EventData, *, cause: str | None, expected: int | None = None
    ) -> tuple[str, int]:
        event = self.bus.event(execution_id, data, actor=self.instance, causation_id=cause)
        ack = await self.bus.publisher.publish(event, expected_last_subject_seq=expected)
        return event.id, ack.seq

    def _reaction_pending(self, t: _Live) -> bool:
        if t.cancel_sent:
            return False
        if t.spawn_timed_out or t.idle_timed_out:
            return True
        if not t.stalled:
            return False
        if t.reaction == "pause":
            return not t.pause_sent and not t.paused
        return t.reaction in ("cancel", "restart")

    async def _stall(self, t: _Live, idle_s: float, expected: int) -> None:
        """Record a stall decided by a check that saw the newest stall at `expected`.

        The task runs a moment after the check; a rival's stall read in between must make our
        append fail (WrongLastSequence), so `expected` is the value the check saw, not today's.
        """
        if t.stalled or t.cancel_sent or t.paused or t.idle_s is None or t.awaiting:
            return  # a stall (a rival's), a cancel or a pause was read since the check
        if time.monotonic() - t.last_activity < t.idle_s:
            return  # activity came back since the check
        reaction = t.on_stall
        t.stalled, t.reaction, t.owner, t.pause_sent = True, reaction, True, False
        try:
            _, seq = await self._emit(
                t.execution_id,
                ExecutionStalled(idle_s=round(idle_s, 3), reaction=reaction),  # type: ignore[arg-type]
                cause=t.request_id,
                expected=expected,
            )
        except WrongLastSequence:
            t.owner = False  # another watchdog recorded this episode and reacts to it
            return
        except BaseException:
            t.stalled = False
            raise
        t.stalled_seq = max(t.stalled_seq, seq)
        self.stats.stalls += 1
        if self._reaction_pending(t):
            await self._react(t)

    async def _spawn_timeout(self, t: _Live, expected: int) -> None:
        if t.spawn_s is None or t.spawn_timed_out or t.phase != _CLAIMED:
            return  # started, or a rival's timeout was read since the check
        if not await self._record_timed_out(t, "spawn", t.spawn_s, expected):
            t.spawn_timed_out = True  # another watchdog recorded it and cancels
            return
        t.spawn_timed_out, t.owner = True, True
        await self._react(t)

    async def _record_timed_out(self, t: _Live, kind: Literal["idle", "spawn"], limit_s: float, expected: int) -> bool:
        """Record `execution.timed_out` once; False when another watchdog recorded it first."""
        try:
            _, seq = await self._emit(
                t.execution_id,
                ExecutionTimedOut(kind=kind, limit_s=limit_s),
                cause=t.request_id,
                expected=expected,
            )
        except WrongLastSequence:
            return False
        t.timed_out_seq = max(t.timed_out_seq, seq)
        self.stats.timeouts += 1
        return True

    async def _react(self, t: _Live) -> None:
        """Apply what is still owed for a recorded stall or timeout; each step is recorded once."""
        if t.cancel_sent:
            return
        if t.spawn_timed_out:
            await self._cancel(t, SPAWN_CANCEL_REASON)
            return
        if t.idle_timed_out:
            await self._cancel(t, IDLE_CANCEL_REASON)
            return
        if not t.stalled:
            return  # activity came back before the reaction: nothing is owed
        if t.reaction == "pause":
            if not t.pause_sent and not t.paused:
                await self._emit(
                    t.execution_id,
                    PauseRequested(reason=STALL_REASON, requested_by=REQUESTER),
                    cause=t.request_id,
                )
                t.pause_sent = True
        elif t.reaction == "cancel":
            if t.idle_s is None:
                return
            if not await self._record_timed_out(t, "idle", t.idle_s, t.timed_out_seq):
                t.idle_timed_out, t.owner = True, False  # another watchdog recorded it and cancels
                return
            t.idle_timed_out = True
            await self._cancel(t, IDLE_CANCEL_REASON)
        elif t.reaction == "restart":
            t.restart = True  # before the cancel is stored: its exit may come back at once
            await self._cancel(t, RESTART_REASON)

    async def _cancel(self, t: _Live, reason: str) -> None:
        await self._emit(
            t.execution_id,
            CancelRequested(grace_s=self.settings.cancel_grace_s, reason=reason, requested_by=REQUESTER),
            cause=t.request_id,
        )
        t.cancel_sent = True

    def _failures_in_window(self, root: str, now: float) -> int:
        times = self.chain_failures.get(root)
        if times is None:
            return 0
        horizon = now - self.settings.crash_loop_window_s
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self.chain_failures[root]
        return len(times)

    def _retryable(self, ending: _Ending) -> bool:
        s = self.settings
        if ending.restart:
            return True
        if ending.at < self._started - OLD_FAILURE_S:
            # Decided (or not) before this watchdog started, under the settings then in force: a
            # watchdog restarted with another retry_on does not re-run old failures.
            return False
        return will_retry(s, ending.failure_class, ending.attempt)

    def _chain_over(self, ending: _Ending) -> None:
        """Nothing more follows this failure: forget it and its chain's failure times."""
        self.endings.pop(ending.execution_id, None)
        self.chain_failures.pop(ending.root, None)

    async def _decide(self, ending: _Ending) -> None:
        """Retry a retryable failure after its backoff, unless its chain is in a crash loop."""
        s = self.settings
        failures = self._failures_in_window(ending.root, time.monotonic())
        if s.crash_loop_failures > 0 and failures >= s.crash_loop_failures:
            with contextlib.suppress(WrongLastSequence):
                await self._emit(
                    ending.execution_id,
                    ExecutionCrashLoop(failures=failures, window_s=s.crash_loop_window_s),
                    cause=ending.event_id,
                    expected=0,
                )
                self.stats.crash_loops += 1
            self._chain_over(ending)
            return
        retry_id = new_execution_id()
        delay = s.retry_delay(ending.attempt)
        try:
            event_id, _ = await self._emit(
                ending.execution_id,
                ExecutionRetryScheduled(
                    attempt=ending.attempt + 1,
                    delay_s=delay,
                    failure_class=ending.failure_class,
                    retry_execution_id=retry_id,
                ),
                cause=ending.event_id,
                expected=0,
            )
        except WrongLastSequence:
            pass  # already scheduled (by a rival, or before a restart): its echo brings the pending retry
        else:
            self.stats.retries += 1
            self.pending_retries.setdefault(
                retry_id,
                _PendingRetry(ending.execution_id, retry_id, ending.attempt + 1, time.monotonic() + delay, event_id),
            )
            self._wake.set()
        self.endings.pop(ending.execution_id, None)

    async def _request_retry(self, retry: _PendingRetry) -> None:
        """Request the new execution of a due retry: the failed one's request, one attempt further."""
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(retry.failed_id, "execution.requested"))
        except NotFoundError:
            log.warning("watchdog: no request of %s to retry; dropping retry %s", retry.failed_id, retry.retry_id)
            self.pending_retries.pop(retry.retry_id, None)
            return
        try:
            original = decode_event(stored.data or b"")
        except EventError as exc:
            log.warning("watchdog: cannot read the request of %s (%s); dropping retry", retry.failed_id, exc)
            self.pending_retries.pop(retry.retry_id, None)
            return
        if not isinstance(original.data, ExecutionRequested):
            self.pending_retries.pop(retry.retry_id, None)
            return
        request = original.data.model_copy(
            update={"attempt": retry.attempt, "retry_of": original.data.retry_of or retry.failed_id}
        )
        with contextlib.suppress(WrongLastSequence):  # requested already (by a rival, or before a restart)
            await self._emit(retry.retry_id, request, cause=retry.cause_id, expected=0)
        self.pending_retries.pop(retry.retry_id, None)
