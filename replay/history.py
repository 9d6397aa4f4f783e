"""Read past events from the log, in order, with ordered consumers (no state on the server).

The log is the stream CORRAL, plus CORRAL_OUTPUT when log retention keeps output events apart
(docs/retention.md). `follow` reads both when the subject can match output, merged by the time
each event was stored, and hands every event to one handler, one at a time.
"""

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from events.stream import output_stream_exists
from events.subjects import (
    OUTPUT_EVENTS,
    OUTPUT_STREAM,
    STREAM,
    ack_pending,
    ack_sequence,
    ack_time_ns,
    subjects_overlap,
)

MsgHandler = Callable[[int, Msg], Awaitable[bool | None]]

# How long the merge waits for a stream that said more is coming before it hands over a later
# event of the other stream (only when that message does not come: it expired, or the consumer
# is being recreated).
MERGE_WAIT_S = 0.5
# While draining output after a terminal event: how often to look whether what is missing still exists.
DRAIN_CHECK_S = 0.5
# Events read ahead per stream before its consumer waits (flow control then holds the server back).
MAX_BUFFERED = 10_000


async def last_sequence(js: JetStreamContext) -> int:
    """Return the sequence of the newest event in the core log CORRAL (0 when empty)."""
    info = await js.stream_info(STREAM)
    return int(info.state.last_seq)


@dataclass(frozen=True)
class OutputExpiry:
    """What log retention dropped from CORRAL_OUTPUT (docs/retention.md)."""

    limits: str  # the stream's limits as the corral.toml keys: `output_max_msgs 50, output_max_age 1h`
    oldest: datetime | None  # when the oldest output still held was stored (None: none is held)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _size(count: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return f"{count:,} bytes"


async def output_expiry(js: JetStreamContext) -> OutputExpiry | None:
    """What retention dropped from CORRAL_OUTPUT; None when there is no such stream or it dropped nothing.

    Output is dropped oldest first, so an execution's output still held is the newest part of it:
    the chunk number `n` of the first chunk read says how many went before.
    """
    try:
        info = await js.stream_info(OUTPUT_STREAM)
    except NotFoundError:
        return None
    if info.state.first_seq <= 1:
        return None
    config = info.config
    limits = []
    if config.max_age:
        limits.append(f"output_max_age {_duration(float(config.max_age))}")
    if config.max_bytes is not None and config.max_bytes > 0:
        limits.append(f"output_max_bytes {_size(int(config.max_bytes))}")
    if config.max_msgs is not None and config.max_msgs > 0:
        limits.append(f"output_max_msgs {int(config.max_msgs):,}")
    oldest = None
    if info.state.messages:
        with contextlib.suppress(NotFoundError):
            oldest = (await js.get_msg(OUTPUT_STREAM, seq=info.state.first_seq, next=True)).time
    return OutputExpiry(", ".join(limits) or "its limits", oldest)


async def follow(
    js: JetStreamContext,
    subject: str,
    handle: MsgHandler,
    *,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    new_only: bool = False,
    stop_when_caught_up: bool = False,
    done: asyncio.Event | None = None,
    output_start_seq: int | None = None,
) -> None:
    """Deliver matching events to `handle` in stored order until it returns True or `done` is set.

    `output_start_seq` (with `start_seq`): where output starts in CORRAL_OUTPUT, exactly (a client
    resuming after the last event of each stream it saw, e.g. SSE's Last-Event-ID).

    `seq` given to `handle` is the event's sequence in its own stream (`ack_stream(msg.reply)`
    names it): CORRAL, or CORRAL_OUTPUT for output events under log retention. `start_seq` is a
    sequence of CORRAL; output is then read from the time that event was stored.

    With `stop_when_caught_up`, return once the events present at the start are delivered.
    When `handle` returns True for an event of CORRAL (a terminal event, say) while output is
    read from CORRAL_OUTPUT, the output stored before that moment that was not delivered yet is
    still delivered (its return value ignored) before `follow` returns: nothing printed before
    an exit is lost because it sits in the other stream.
    """
    finished = done or asyncio.Event()
    output = subjects_overlap(subject, OUTPUT_EVENTS) and await output_stream_exists(js)
    if not output:
        await _follow_one(
            js,
            subject,
            handle,
            start_seq=start_seq,
            start_time=start_time,
            new_only=new_only,
            stop_when_caught_up=stop_when_caught_up,
            finished=finished,
        )
        return
    await _Merge(js, subject, handle, finished, stop_when_caught_up).run(
        start_seq=start_seq, start_time=start_time, new_only=new_only, output_start_seq=output_start_seq
    )


def _position(
    config: ConsumerConfig, *, start_seq: int | None, start_time: datetime | None, new_only: bool
) -> DeliverPolicy:
    if start_seq is not None:
        config.opt_start_seq = max(start_seq, 1)
        return DeliverPolicy.BY_START_SEQUENCE
    if start_time is not None:
        config.opt_start_time = start_time
        return DeliverPolicy.BY_START_TIME
    return DeliverPolicy.NEW if new_only else DeliverPolicy.ALL


async def _follow_one(
    js: JetStreamContext,
    subject: str,
    handle: MsgHandler,
    *,
    start_seq: int | None,
    start_time: datetime | None,
    new_only: bool,
    stop_when_caught_up: bool,
    finished: asyncio.Event,
) -> None:
    """The core log alone (no output stream, or a subject that cannot match output)."""
    config = ConsumerConfig()
    policy = _position(config, start_seq=start_seq, start_time=start_time, new_only=new_only)
    failure: list[BaseException] = []

    async def on_msg(msg: Msg) -> None:
        if finished.is_set():
            return
        try:
            seq = ack_sequence(msg.reply)
            if await handle(seq, msg) or (stop_when_caught_up and ack_pending(msg.reply) == 0):
                finished.set()
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)
            finished.set()

    if stop_when_caught_up:
        info = await js.stream_info(STREAM, subjects_filter=subject)
        if not info.state.subjects:
            return
    sub = await js.subscribe(
        subject,
        stream=STREAM,
        ordered_consumer=True,
        deliver_policy=policy,
        config=config,
        cb=on_msg,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    try:
        if stop_when_caught_up and await _nothing_to_deliver(js, sub, STREAM, subject):
            finished.set()  # a start past the newest match (--since 1s): no delivery will come to say so
        await finished.wait()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if failure:
        raise failure[0]


async def _nothing_to_deliver(js: JetStreamContext, sub: Any, stream: str, subject: str) -> bool:
    """Whether the consumer just created has nothing to deliver (and delivered nothing)."""
    try:
        info = await sub.consumer_info()
        return bool(info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq))
    except Exception:  # the stream's own view: no subject matches
        state = await js.stream_info(stream, subjects_filter=subject)
        return not state.state.subjects


@dataclass
class _Source:
    """One stream's ordered consumer: what arrived and was not handed over yet."""

    stream: str
    queue: deque[tuple[int, int, Msg]] = field(default_factory=deque)  # (stored ns, seq, msg)
    caught_up: bool = False  # the newest delivery said nothing more matched when it was sent
    delivered_seq: int = 0  # the newest sequence handed over (or skipped while draining)
    sub: Any = None
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set while the queue may grow


class _Merge:
    """Two ordered consumers, CORRAL and CORRAL_OUTPUT, merged by stored time into one handler."""

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        handle: MsgHandler,
        finished: asyncio.Event,
        stop_when_caught_up: bool,
    ) -> None:
        self.js = js
        self.subject = subject
        self.handle = handle
        self.finished = finished
        self.stop_when_caught_up = stop_when_caught_up
        self.core = _Source(STREAM)
        self.output = _Source(OUTPUT_STREAM)
        self.wake = asyncio.Event()
        self.drain_to: int | None = None  # set once a core event stopped the follow: output up to here

    async def run(
        self,
        *,
        start_seq: int | None,
        start_time: datetime | None,
        new_only: bool,
        output_start_seq: int | None = None,
    ) -> None:
        output_start: dict[str, Any] = {"start_seq": None, "start_time": start_time, "new_only": new_only}
        # A CORRAL sequence means nothing in CORRAL_OUTPUT: output starts where that event was stored.
        if output_start_seq is not None:
            output_start = {"start_seq": output_start_seq, "start_time": None, "new_only": False}
        elif start_seq is not None:
            where = await self._output_start(start_seq)
            output_start = {"start_seq": None, "start_time": None, "new_only": False, **where}
        try:
            await self._subscribe(self.core, start_seq=start_seq, start_time=start_time, new_only=new_only)
            await self._subscribe(self.output, **output_start)
            await self._dispatch()
        finally:
            for source in (self.core, self.output):
                source.room.set()
                if source.sub is not None:
                    with contextlib.suppress(Exception):
                        await source.sub.unsubscribe()
            self.finished.set()

    async def _output_start(self, start_seq: int) -> dict[str, Any]:
        """Where output starts for a CORRAL sequence: the time that event was stored, else from now on."""
        if start_seq <= 1:
            return {"start_seq": 1}
        try:
            stored = await self.js.get_msg(STREAM, seq=start_seq)
        except NotFoundError:
            stored = None
        if stored is not None and stored.time is not None:
            return {"start_time": stored.time}
        info = await self.js.stream_info(OUTPUT_STREAM)  # the event is still to come: output after now
        return {"start_seq": int(info.state.last_seq) + 1}

    async def _subscribe(
        self, source: _Source, *, start_seq: int | None, start_time: datetime | None, new_only: bool
    ) -> None:
        config = ConsumerConfig()
        policy = _position(config, start_seq=start_seq, start_time=start_time, new_only=new_only)

        async def on_msg(msg: Msg) -> None:
            reply = msg.reply
            source.queue.append((ack_time_ns(reply), ack_sequence(reply), msg))
            source.caught_up = ack_pending(reply) == 0
            self.wake.set()
            if len(source.queue) >= MAX_BUFFERED:
                source.room.clear()
                await source.room.wait()  # the handler is slower than the log: read on when it caught up

        source.room.set()
        source.caught_up = new_only  # nothing to replay; else known from the deliveries (or below)
        source.sub = await self.js.subscribe(
            self.subject,
            stream=source.stream,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
            cb=on_msg,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        if not new_only and await self._nothing_matches(source):
            source.caught_up = True  # no delivery will come to say so
            self.wake.set()

    async def _nothing_matches(self, source: _Source) -> bool:
        """Whether the consumer just created has nothing to deliver (and delivered nothing)."""
        return await _nothing_to_deliver(self.js, source.sub, source.stream, self.subject)

    def _take(self, now: float, waiting_since: float | None) -> tuple[_Source | None, float | None]:
        """The source whose head is handed over next, or None (and since when the merge waits)."""
        core, output = self.core, self.output
        if self.drain_to is not None:
            return (output if output.queue else None), None
        if core.queue and output.queue:
            return (core if core.queue[0][0] <= output.queue[0][0] else output), None
        full = core if core.queue else output if output.queue else None
        if full is None:
            return None, None
        empty = output if full is core else core
        if empty.caught_up:
            return full, None
        if waiting_since is None:
            return None, now  # the other stream may still deliver an earlier event: wait a little
        if now - waiting_since >= MERGE_WAIT_S:
            empty.caught_up = True  # what it announced did not come (expired, or a recreated consumer)
            return full, None
        return None, waiting_since

    def _all_caught_up(self) -> bool:
        return all(s.caught_up and not s.queue for s in (self.core, self.output))

    async def _dispatch(self) -> None:
        waiting_since: float | None = None
        while not self.finished.is_set():
            if self.drain_to is not None:
                if self.output.delivered_seq >= self.drain_to:
                    return
                self.core.queue.clear()  # past the stop: only the output before it is still wanted
                self.core.room.set()
            if self.stop_when_caught_up and self._all_caught_up():
                return
            source, waiting_since = self._take(time.monotonic(), waiting_since)
            if source is None:
                self.wake.clear()
                timeout = None
                if waiting_since is not None:
                    timeout = max(0.0, waiting_since + MERGE_WAIT_S - time.monotonic())
                elif self.drain_to is not None:
                    timeout = DRAIN_CHECK_S
                waiter = asyncio.create_task(self.wake.wait())
                stopper = asyncio.create_task(self.finished.wait())
                try:
                    woke, _ = await asyncio.wait(
                        {waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                    stopper.cancel()
                if not woke and self.drain_to is not None and not await self._output_missing():
                    return
                continue
            _, seq, msg = source.queue.popleft()
            if len(source.queue) <= MAX_BUFFERED // 2:
                source.room.set()
            if source is self.output and self.drain_to is not None and seq > self.drain_to:
                return  # stored after the stop: not part of what came before it
            source.delivered_seq = seq
            stop = await self.handle(seq, msg)
            if self.drain_to is not None or not stop:
                continue
            if source is self.output:
                return
            self.drain_to = await self._output_end()

    async def _output_end(self) -> int:
        """The sequence of the newest matching output stored now (0: none)."""
        try:
            last = await self.js.get_last_msg(OUTPUT_STREAM, self.subject)
        except NotFoundError:
            return 0
        return int(last.seq or 0)

    async def _output_missing(self) -> bool:
        """Whether matching output up to the drain point is stored but not delivered yet."""
        assert self.drain_to is not None
        start = self.output.delivered_seq + 1
        if start > self.drain_to:
            return False
        try:
            nxt = await self.js.get_msg(OUTPUT_STREAM, seq=start, next=True, subject=self.subject)
        except NotFoundError:
            return False
        return int(nxt.seq or 0) <= self.drain_to
