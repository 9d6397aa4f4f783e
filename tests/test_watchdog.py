"""The watchdog against a real nats-server: the test plays the spawner by publishing lifecycle events.

No assertion is on a duration. Where a test asserts that something did NOT happen, it first waits
for a control execution, started later with the same timeout, to be handled, so the watchdog
provably had the time (and the scans) to do the wrong thing.
"""

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from actors.bus import Bus, connect_bus
from actors.watchdog import RESTART_REASON, Watchdog, WatchdogSettings, classify_exit
from events.envelope import Event, decode_event
from events.ids import new_execution_id
from events.subjects import event_subject, events_of_type
from events.types import (
    EventData,
    ExecutionClaimed,
    ExecutionExited,
    ExecutionFailed,
    ExecutionPaused,
    ExecutionRequested,
    ExecutionResumed,
    ExecutionRetryScheduled,
    ExecutionStarted,
    Heartbeat,
    InputDelivered,
    Output,
    Timeouts,
)
from replay.history import follow

IDLE = 0.5
WAIT = 20.0  # generous: only a deadline for a failing test, never a measured duration


# --- helpers ---------------------------------------------------------------------------------------


async def emit(bus: Bus, execution_id: str, data: EventData, actor: str = "test") -> None:
    await bus.emit(execution_id, data, actor=actor)


def request(**fields: Any) -> ExecutionRequested:
    fields.setdefault("command", ("agent", "--task", "x"))
    fields.setdefault("repo", "/srv/repo")
    return ExecutionRequested(**fields)


async def requested(bus: Bus, **fields: Any) -> str:
    execution_id = new_execution_id()
    await emit(bus, execution_id, request(**fields))
    return execution_id


async def claim(bus: Bus, execution_id: str) -> None:
    await emit(bus, execution_id, ExecutionClaimed(spawner="spawner-test", host="h"))


async def start(bus: Bus, execution_id: str) -> None:
    await emit(bus, execution_id, ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/tmp"))


async def running(bus: Bus, **fields: Any) -> str:
    """A new execution, requested, claimed and started."""
    execution_id = await requested(bus, **fields)
    await claim(bus, execution_id)
    await start(bus, execution_id)
    return execution_id


async def exited(bus: Bus, execution_id: str, exit_code: int | None, **fields: Any) -> None:
    await emit(bus, execution_id, ExecutionExited(exit_code=exit_code, duration_s=1.0, **fields))


async def stored(bus: Bus, subject: str) -> list[Event]:
    """Every event stored on a subject (or filter) now."""
    events: list[Event] = []

    async def on(seq: int, msg: Any) -> None:
        events.append(decode_event(msg.data, seq=seq))

    await follow(bus.js, subject, on, stop_when_caught_up=True)
    return events


async def count(bus: Bus, execution_id: str, kind: str) -> int:
    return len(await stored(bus, event_subject(execution_id, kind)))


async def wait_for(
    bus: Bus, subject: str, predicate: Callable[[Event], bool] = lambda _: True, *, nth: int = 1
) -> Event:
    """Wait for the nth stored event on subject matching predicate."""
    found: list[Event] = []

    async def on(seq: int, msg: Any) -> bool:
        event = decode_event(msg.data, seq=seq)
        if predicate(event):
            found.append(event)
        return len(found) >= nth

    await asyncio.wait_for(follow(bus.js, subject, on), WAIT)
    return found[-1]


async def wait_event(bus: Bus, execution_id: str, kind: str, *, nth: int = 1) -> Event:
    return await wait_for(bus, event_subject(execution_id, kind), nth=nth)


async def retries_of(bus: Bus, root: str) -> list[Event]:
    return [e for e in await stored(bus, events_of_type("execution.requested")) if e.data.retry_of == root]  # type: ignore[attr-defined]


async def control_stall(bus: Bus) -> None:
    """Start an execution with the same idle timeout now and wait until the watchdog reports its stall."""
    control = await running(bus, timeouts=Timeouts(idle=IDLE))
    await wait_event(bus, control, "execution.stalled")


# --- classification --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "signal", "reason", "flags", "expected"),
    [
        (0, None, "exited", {}, None),
        (1, None, "exited", {}, "exit"),
        (None, 9, "exited", {}, "signal"),
        (None, None, "lost", {}, "lost"),
        (None, None, "timeout", {}, "timeout"),
        (None, 15, "cancelled", {}, None),
        (None, 15, "spawner_stopped", {}, None),
        (None, 15, "cancelled", {"restart": True}, "stalled"),
        (None, 15, "cancelled", {"spawn_timed_out": True}, "spawn"),
        (None, 15, "cancelled", {"idle_timed_out": True}, "timeout"),
        (0, None, "exited", {"restart": True}, None),
    ],
)
def test_classify_exit(
    exit_code: int | None, signal: int | None, reason: str, flags: dict[str, bool], expected: str | None
) -> None:
    options = {"restart": False, "spawn_timed_out": False, "idle_timed_out": False, **flags}
    assert classify_exit(exit_code, signal, reason, **options) == expected


def test_retry_delay_doubles_and_is_capped() -> None:
    settings = WatchdogSettings(retry_backoff_s=5.0, retry_backoff_max_s=300.0)
    assert [settings.retry_delay(n) for n in (1, 2, 3, 7, 8)] == [5.0, 10.0, 20.0, 300.0, 300.0]


# --- stalls ----------------------------------------------------------------------------------------


async def test_stall_is_recorded_once_per_episode(bus: Bus) -> None:
    async with Watchdog(bus, WatchdogSettings(default_idle_timeout_s=IDLE), instance="wd") as watchdog:
        x = await running(bus)  # no timeouts.idle in the request: the settings' default applies
        stall = await wait_event(bus, x, "execution.stalled")
        assert stall.data.reaction == "notify"  # type: ignore[attr-defined]
        assert stall.data.idle_s >= IDLE  # type: ignore[attr-defined]
        assert stall.actor == "wd"
        assert watchdog.health()["stalled"] == 1
        await control_stall(bus)  # x stayed idle for another full timeout meanwhile
        assert await count(bus, x, "execution.stalled") == 1
        assert await count(bus, x, "pause.requested") == 0
        assert await count(bus, x, "cancel.requested") == 0
        # New activity ends the episode; the next silence is a new stall.
        await emit(bus, x, Output(stream="stdout", n=1, text="back\n"))
        await wait_event(bus, x, "execution.stalled", nth=2)
        assert watchdog.health()["tracked"] >= 2


async def test_activity_prevents_a_stall(bus: Bus) -> None:
    async with Watchdog(bus):
        x = await running(bus, timeouts=Timeouts(idle=IDLE))
        stop = asyncio.Event()

        async def keep_active() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                kinds: list[EventData] = [
                    Heartbeat(note="working"),
                    Output(stream="stderr", n=n, text="..."),
                    InputDelivered(text="y\n", bytes=2),
                ]
                await emit(bus, x, kinds[n % 3])
                await asyncio.sleep(0.1)

        activity = asyncio.create_task(keep_active())
        try:
            await control_stall(bus)
            await control_stall(bus)
            assert await count(bus, x, "execution.stalled") == 0
        finally:
            stop.set()
            await activity
        await wait_event(bus, x, "execution.stalled")  # silence now: it stalls


async def test_paused_execution_never_stalls_and_resume_restarts_the_clock(bus: Bus) -> None:
    async with Watchdog(bus):
        x = await running(bus, timeouts=Timeouts(idle=IDLE))
        await emit(bus, x, ExecutionPaused(pids=(1,)))
        await control_stall(bus)
        await control_stall(bus)
        assert await count(bus, x, "execution.stalled") == 0
        await emit(bus, x, ExecutionResumed(pids=(1,)))
        await wait_event(bus, x, "execution.stalled")


async def test_stall_with_pause_reaction(bus: Bus) -> None:
    async with Watchdog(bus):
        x = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="pause")
        stall = await wait_event(bus, x, "execution.stalled")
        assert stall.data.reaction == "pause"  # type: ignore[attr-defined]
        pause = await wait_event(bus, x, "pause.requested")
        assert (pause.data.reason, pause.data.requested_by) == ("stalled", "watchdog")  # type: ignore[attr-defined]
        await emit(bus, x, ExecutionPaused(pids=(1,)))  # the spawner's part
        await control_stall(bus)
        assert await count(bus, x, "execution.stalled") == 1
        assert await count(bus, x, "pause.requested") == 1
        # A human resumes it; it is still silent, so it stalls (and is paused) again.
        await emit(bus, x, ExecutionResumed(pids=(1,)))
        await wait_event(bus, x, "execution.stalled", nth=2)
        await wait_event(bus, x, "pause.requested", nth=2)


async def test_stall_with_cancel_reaction_times_out(bus: Bus) -> None:
    settings = WatchdogSettings(cancel_grace_s=3.0, retry_max_attempts=3)
    async with Watchdog(bus, settings):
        x = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="cancel")
        stall = await wait_event(bus, x, "execution.stalled")
        assert stall.data.reaction == "cancel"  # type: ignore[attr-defined]
        timed_out = await wait_event(bus, x, "execution.timed_out")
        assert (timed_out.data.kind, timed_out.data.limit_s) == ("idle", IDLE)  # type: ignore[attr-defined]
        cancel = await wait_event(bus, x, "cancel.requested")
        assert cancel.data.grace_s == 3.0  # type: ignore[attr-defined]
        assert (cancel.data.reason, cancel.data.requested_by) == ("idle timeout", "watchdog")  # type: ignore[attr-defined]
        assert cancel.seq > timed_out.seq > stall.seq  # type: ignore[operator]
        # Cancelled for an idle timeout: class "timeout", not in retry_on, so no retry.
        await exited(bus, x, None, signal=15, reason="cancelled")
        await control_stall(bus)
        assert await count(bus, x, "execution.retry_scheduled") == 0
        assert await count(bus, x, "execution.timed_out") == 1
        assert await count(bus, x, "cancel.requested") == 1


async def test_stall_with_restart_reaction_requests_a_new_execution(bus: Bus) -> None:
    # retry_max_attempts stays 0: a restart is allowed anyway.
    async with Watchdog(bus, WatchdogSettings(retry_backoff_s=0.1)):
        x = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="restart", labels={"team": "a"})
        await wait_event(bus, x, "execution.stalled")
        cancel = await wait_event(bus, x, "cancel.requested")
        assert cancel.data.reason == RESTART_REASON  # type: ignore[attr-defined]
        await exited(bus, x, None, signal=15, reason="cancelled")
        scheduled = await wait_event(bus, x, "execution.retry_scheduled")
        assert scheduled.data.failure_class == "stalled"  # type: ignore[attr-defined]
        assert scheduled.data.attempt == 2  # type: ignore[attr-defined]
        new = scheduled.data.retry_execution_id  # type: ignore[attr-defined]
        restarted = await wait_event(bus, new, "execution.requested")
        assert restarted.data.attempt == 2  # type: ignore[attr-defined]
        assert restarted.data.retry_of == x  # type: ignore[attr-defined]
        assert restarted.data.on_stall == "restart"  # type: ignore[attr-defined]
        assert restarted.data.labels == {"team": "a"}  # type: ignore[attr-defined]


# --- spawn timeout ---------------------------------------------------------------------------------


async def test_spawn_timeout_cancels_and_is_retried_as_spawn_failure(bus: Bus) -> None:
    async with Watchdog(bus, WatchdogSettings(retry_max_attempts=1, retry_backoff_s=0.1)):
        ok = await requested(bus, timeouts=Timeouts(spawn=IDLE))
        slow = await requested(bus, timeouts=Timeouts(spawn=IDLE))
        await claim(bus, ok)
        await start(bus, ok)
        await claim(bus, slow)
        timed_out = await wait_event(bus, slow, "execution.timed_out")
        assert (timed_out.data.kind, timed_out.data.limit_s) == ("spawn", IDLE)  # type: ignore[attr-defined]
        cancel = await wait_event(bus, slow, "cancel.requested")
        assert (cancel.data.reason, cancel.data.requested_by) == ("spawn timeout", "watchdog")  # type: ignore[attr-defined]
        assert await count(bus, ok, "execution.timed_out") == 0  # started in time
        await exited(bus, slow, None, reason="cancelled")  # the spawner's part
        scheduled = await wait_event(bus, slow, "execution.retry_scheduled")
        assert scheduled.data.failure_class == "spawn"  # type: ignore[attr-defined]
        await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
        assert await count(bus, ok, "execution.timed_out") == 0


# --- retries and crash loops -------------------------------------------------------------------------


async def test_failed_execution_is_retried_with_backoff_and_root(bus: Bus) -> None:
    settings = WatchdogSettings(
        retry_on=("exit", "signal"), retry_max_attempts=2, retry_backoff_s=0.1, retry_backoff_max_s=1.0
    )
    async with Watchdog(bus, settings):
        x = await running(bus, labels={"k": "v"}, task="fix it")
        await exited(bus, x, 1)
        scheduled = await wait_event(bus, x, "execution.retry_scheduled")
        assert scheduled.data.attempt == 2  # type: ignore[attr-defined]
        assert scheduled.data.delay_s == 0.1  # type: ignore[attr-defined]
        assert scheduled.data.failure_class == "exit"  # type: ignore[attr-defined]
        y = scheduled.data.retry_execution_id  # type: ignore[attr-defined]
        second = await wait_event(bus, y, "execution.requested")
        assert (second.data.attempt, second.data.retry_of) == (2, x)  # type: ignore[attr-defined]
        original = (await stored(bus, event_subject(x, "execution.requested")))[0].data
        assert second.data.model_copy(update={"attempt": 1, "retry_of": None}) == original

        # The retry fails too: attempt 3, still rooted at x, backoff doubled.
        await claim(bus, y)
        await start(bus, y)
        await exited(bus, y, None, signal=9)
        scheduled = await wait_event(bus, y, "execution.retry_scheduled")
        assert scheduled.data.failure_class == "signal"  # type: ignore[attr-defined]
        assert (scheduled.data.attempt, scheduled.data.delay_s) == (3, 0.2)  # type: ignore[attr-defined]
        third = await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
        assert (third.data.attempt, third.data.retry_of) == (3, x)  # type: ignore[attr-defined]

        # Attempt 3 of 1 + retry_max_attempts is the last one.
        z = third.execution_id
        await claim(bus, z)
        await start(bus, z)
        await exited(bus, z, 1)
        await control_stall(bus)
        assert await count(bus, z, "execution.retry_scheduled") == 0
        assert await count(bus, z, "execution.crash_loop") == 0
        assert len(await retries_of(bus, x)) == 2


async def test_no_retry_for_success_cancel_or_stopped_spawner(bus: Bus) -> None:
    settings = WatchdogSettings(
        retry_on=("exit", "signal", "timeout", "lost", "spawn", "workspace"), retry_max_attempts=3, retry_backoff_s=0.1
    )
    async with Watchdog(bus, settings):
        ok = await running(bus)
        cancelled = await running(bus)
        stopped = await running(bus)
        failed = await running(bus)
        await exited(bus, ok, 0)
        await exited(bus, cancelled, None, signal=15, reason="cancelled")
        await exited(bus, stopped, None, signal=15, reason="spawner_stopped")
        await exited(bus, failed, 2)
        scheduled = await wait_event(bus, failed, "execution.retry_scheduled")
        await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
        for execution_id in (ok, cancelled, stopped):
            assert await count(bus, execution_id, "execution.retry_scheduled") == 0
        # execution.failed at the workspace stage is a failure of class "workspace".
        broken = await requested(bus)
        await claim(bus, broken)
        await emit(bus, broken, ExecutionFailed(stage="workspace", error="not a git repository"))
        scheduled = await wait_event(bus, broken, "execution.retry_scheduled")
        assert scheduled.data.failure_class == "workspace"  # type: ignore[attr-defined]


async def test_crash_loop_stops_retries(bus: Bus) -> None:
    settings = WatchdogSettings(
        retry_on=("exit",), retry_max_attempts=10, retry_backoff_s=0.05, crash_loop_failures=3, crash_loop_window_s=600
    )
    root = new_execution_id()
    done = asyncio.Event()

    async def fail_every_attempt(seq: int, msg: Any) -> None:
        """The spawner's part: every execution of the chain starts and exits 1."""
        event = decode_event(msg.data, seq=seq)
        if event.execution_id == root or event.data.retry_of == root:  # type: ignore[attr-defined]
            await claim(bus, event.execution_id)
            await start(bus, event.execution_id)
            await exited(bus, event.execution_id, 1)

    spawner = asyncio.create_task(follow(bus.js, events_of_type("execution.requested"), fail_every_attempt, done=done))
    try:
        async with Watchdog(bus, settings):
            await emit(bus, root, request())
            loop = await wait_for(bus, events_of_type("execution.crash_loop"))
            assert (loop.data.failures, loop.data.window_s) == (3, 600)  # type: ignore[attr-defined]
            chain = await retries_of(bus, root)
            assert [e.data.attempt for e in chain] == [2, 3]  # type: ignore[attr-defined]
            assert loop.execution_id == chain[-1].execution_id
            await control_stall(bus)
            assert await count(bus, loop.execution_id, "execution.retry_scheduled") == 0
            assert len(await retries_of(bus, root)) == 2
    finally:
        done.set()
        await spawner


# --- restarts and rivals -----------------------------------------------------------------------------


async def test_restarted_watchdog_does_not_repeat_itself(bus: Bus) -> None:
    settings = WatchdogSettings(retry_on=("exit",), retry_max_attempts=1, retry_backoff_s=0.1)
    async with Watchdog(bus, settings, instance="wd-1"):
        idle = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="pause")
        await wait_event(bus, idle, "pause.requested")
        failed = await running(bus)
        await exited(bus, failed, 1)
        scheduled = await wait_event(bus, failed, "execution.retry_scheduled")
        await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
    # `idle` is still silent and unpaused (no spawner paused it); `failed` is decided.
    async with Watchdog(bus, settings, instance="wd-2") as second:
        await control_stall(bus)
        await control_stall(bus)
        assert second.caught_up.is_set()
        assert second.health()["tracked"] >= 3
        assert await count(bus, idle, "execution.stalled") == 1
        assert await count(bus, idle, "pause.requested") == 1
        assert await count(bus, failed, "execution.retry_scheduled") == 1
        assert len(await retries_of(bus, failed)) == 1
        # Activity after the restart still starts a new episode, judged by the new instance.
        await emit(bus, idle, Heartbeat())
        stall = await wait_event(bus, idle, "execution.stalled", nth=2)
        assert stall.actor == "wd-2"


async def test_restart_issues_a_due_retry_and_decides_missed_failures(bus: Bus) -> None:
    settings = WatchdogSettings(retry_on=("exit",), retry_max_attempts=1, retry_backoff_s=0.1)
    # A watchdog recorded a retry, then died before requesting it.
    scheduled_before = await running(bus, task="retry me")
    await exited(bus, scheduled_before, 3)
    retry_id = new_execution_id()
    await emit(
        bus,
        scheduled_before,
        ExecutionRetryScheduled(attempt=2, delay_s=0.3, failure_class="exit", retry_execution_id=retry_id),
        actor="watchdog-gone",
    )
    # And this one failed while no watchdog ran at all.
    unseen = await running(bus)
    await exited(bus, unseen, 1)
    async with Watchdog(bus, settings):
        retried = await wait_event(bus, retry_id, "execution.requested")
        assert (retried.data.attempt, retried.data.retry_of) == (2, scheduled_before)  # type: ignore[attr-defined]
        assert retried.data.task == "retry me"  # type: ignore[attr-defined]
        scheduled = await wait_event(bus, unseen, "execution.retry_scheduled")
        await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
        await control_stall(bus)
        assert await count(bus, scheduled_before, "execution.retry_scheduled") == 1
        assert len(await retries_of(bus, scheduled_before)) == 1


async def test_two_watchdogs_record_each_fact_once(bus: Bus, nats_server: Any) -> None:
    other_bus = await connect_bus(nats_server.url)
    settings = WatchdogSettings(retry_on=("exit",), retry_max_attempts=1, retry_backoff_s=0.1)
    try:
        async with Watchdog(bus, settings, instance="wd-a"), Watchdog(other_bus, settings, instance="wd-b"):
            idle = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="cancel")
            failed = await running(bus)
            await exited(bus, failed, 1)
            await wait_event(bus, idle, "cancel.requested")
            scheduled = await wait_event(bus, failed, "execution.retry_scheduled")
            await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
            await control_stall(bus)
            await control_stall(bus)
            assert await count(bus, idle, "execution.stalled") == 1
            assert await count(bus, idle, "execution.timed_out") == 1
            assert await count(bus, idle, "cancel.requested") == 1
            assert await count(bus, failed, "execution.retry_scheduled") == 1
            assert len(await retries_of(bus, failed)) == 1
    finally:
        await other_bus.close()


async def test_restart_in_progress_and_overdue_spawn_survive_a_watchdog_restart(bus: Bus) -> None:
    settings = WatchdogSettings(retry_backoff_s=0.1)
    async with Watchdog(bus, settings, instance="wd-1"):
        restarting = await running(bus, timeouts=Timeouts(idle=IDLE), on_stall="restart")
        await wait_event(bus, restarting, "cancel.requested")
    # While no watchdog runs, the cancelled execution exits and another one is claimed but never starts.
    await exited(bus, restarting, None, signal=15, reason="cancelled")
    stuck = await requested(bus, timeouts=Timeouts(spawn=IDLE))
    await claim(bus, stuck)
    async with Watchdog(bus, settings, instance="wd-2"):
        scheduled = await wait_event(bus, restarting, "execution.retry_scheduled")
        assert scheduled.data.failure_class == "stalled"  # type: ignore[attr-defined]
        assert scheduled.actor == "wd-2"
        await wait_event(bus, scheduled.data.retry_execution_id, "execution.requested")  # type: ignore[attr-defined]
        timed_out = await wait_event(bus, stuck, "execution.timed_out")
        assert timed_out.data.kind == "spawn"  # type: ignore[attr-defined]
        await wait_event(bus, stuck, "cancel.requested")
