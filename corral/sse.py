"""Server-Sent Events for many clients: one live consumer per subject, shared; exact resumption.

Each SSE client used to have its own ordered consumer on the log, so a hundred browsers following
every event made the server read, parse and encode every event a hundred times. Here one `Hub`
per subject pattern reads the live log once and encodes each event's SSE frame once; every
client following that pattern gets the same bytes.

A client that starts in the past (`since`, `Last-Event-ID`) first catches up with its own
consumer, then joins the hub: it registers with the hub *before* catching up, so every event
stored after that moment is in its queue, and skips what the catch-up already sent (by sequence:
one stream, one order). A client too slow for the live rate (its queue full) is ended; its
browser reconnects with `Last-Event-ID` and catches up, so nothing is lost and the others never
wait for it.

With log retention on (output in its own stream) a `MergedHub` does the same over both streams:
one live consumer per stream and subject pattern, their events merged by the time each was stored
(as replay/history.py's `follow` merges them for one reader) and each frame encoded once. Its SSE
`id` is a position `CORE:OUTPUT`: the last sequence of each stream handed out so far for that
pattern (`-`: none yet). A client that caught up on its own first has its ids made from its own
position until the hub's has passed it (the larger of the two per stream), so a client resuming
with `Last-Event-ID` misses nothing and sees nothing twice.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sized
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from events.subjects import (
    OUTPUT_EVENTS,
    OUTPUT_STREAM,
    STREAM,
    ack_pending,
    ack_sequence,
    ack_stream,
    ack_time_ns,
    subjects_overlap,
)
from replay.history import MERGE_WAIT_S, follow

log = logging.getLogger(__name__)

QUEUE_FRAMES = 20000  # a client further behind than this is ended (it resumes with Last-Event-ID)
BATCH_FRAMES = 512  # catch-up frames written at once when a client has a backlog: one write, not 512
FLUSH_S = 0.005  # live frames arriving within this long reach each client as one batch (one write)


def frame(seq: int, data: bytes) -> bytes:
    """The SSE frame of one stored event: its envelope plus `seq` and `stream`, id = the sequence."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = {"malformed": data.decode(errors="replace")}
    event["seq"] = seq
    event["stream"] = STREAM
    kind = str(event.get("type") or "message").encode()
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind, orjson.dumps(event))


class Batch:
    """Consecutive live frames handed to every client at once: their bytes joined once."""

    __slots__ = ("data", "first", "frames", "last")

    def __init__(self, frames: list[tuple[int, bytes]]) -> None:
        self.frames = frames
        self.first = frames[0][0]
        self.last = frames[-1][0]
        self.data = b"".join(data for _, data in frames)


class _Frames(Protocol):
    @property
    def frames(self) -> Sized: ...


B = TypeVar("B", bound=_Frames)


class Subscriber(Generic[B]):
    """One client's place in a hub: the batches not yet written to it, in order."""

    def __init__(self) -> None:
        self.batches: deque[B] = deque()
        self.pending = 0  # frames in `batches`
        self.overflowed = False
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._written = self._loop.time()  # when it was last given something to write
        self._timer: asyncio.TimerHandle | None = None  # its heartbeat: one timer, not one per wait
        self._beat_due = False

    def offer(self, batch: B) -> None:
        if self.overflowed:
            return
        if self.pending + len(batch.frames) > QUEUE_FRAMES:
            self.overflowed = True  # ended at its next read; it resumes from the last id it got
            self.batches.clear()
            self.pending = 0
        else:
            self.batches.append(batch)
            self.pending += len(batch.frames)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _beat(self, quiet_s: float) -> None:
        due = self._written + quiet_s
        if self._loop.time() < due:  # it wrote since the timer was set: wait for the rest
            self._timer = self._loop.call_at(due, self._beat, quiet_s)
            return
        self._timer = None
        self._beat_due = True
        self._wake()

    async def wait(self, quiet_s: float) -> bool:
        """Until a batch is queued (True) or nothing was written for `quiet_s` (False: a heartbeat)."""
        if not (self.batches or self.overflowed or self._beat_due):
            waiter = self._waiter = self._loop.create_future()
            if self._timer is None:
                self._timer = self._loop.call_at(self._written + quiet_s, self._beat, quiet_s)
            try:
                await waiter
            finally:
                self._waiter = None
        if self.batches or self.overflowed:
            return True
        self._beat_due = False
        self._written = self._loop.time()
        return False

    def take(self) -> list[B]:
        batches = list(self.batches)
        self.batches.clear()
        self.pending = 0
        self._written = self._loop.time()
        self._beat_due = False  # (what it writes now keeps the stream alive as well)
        return batches

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Fanout(Generic[B]):
    """What both hubs share: their subscribers, the hand-out timer (FLUSH_S after the last hand-out)
    and join/leave/close around a hub's own `_start` (its consumers) and `_stop`."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        self.js = js
        self.subject = subject
        self.subscribers: set[Subscriber[B]] = set()
        self._lock = asyncio.Lock()
        self._timer: asyncio.Handle | None = None
        self._flushed = 0.0  # loop time of the last hand-out

    def _running(self) -> bool:
        raise NotImplementedError

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        """Unsubscribe, drop what waits for a hand-out; the next join starts afresh."""
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _schedule(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            delay = self._flushed + FLUSH_S - loop.time()
            self._timer = loop.call_soon(self._flush) if delay <= 0 else loop.call_later(delay, self._flush)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_out(self, batch: B) -> None:
        for subscriber in list(self.subscribers):
            subscriber.offer(batch)

    async def join(self) -> Subscriber[B]:
        """A new subscriber: every event the hub hands out from now on reaches it."""
        async with self._lock:
            if not self._running():
                try:
                    await self._start()
                except BaseException:
                    await self._stop()
                    raise
            elif self._timer is not None:  # what was stored before it joined goes to the others only
                self._timer.cancel()
                self._flush()
            subscriber: Subscriber[B] = Subscriber()
            self.subscribers.add(subscriber)
            return subscriber

    async def leave(self, subscriber: Subscriber[B]) -> None:
        subscriber.close()
        async with self._lock:
            self.subscribers.discard(subscriber)
            if not self.subscribers:
                await self._stop()

    async def close(self) -> None:
        async with self._lock:
            for subscriber in self.subscribers:
                subscriber.close()
            self.subscribers.clear()
            await self._stop()


async def _live(js: JetStreamContext, subject: str, stream: str, cb: Callable[[Msg], Awaitable[None]]) -> Any:
    """An ordered consumer of `stream` delivering what is stored from now on (no client-side limits:
    a hub's callback only queues)."""
    return await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        config=ConsumerConfig(),
        cb=cb,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )


class Hub(_Fanout[Batch]):
    """The live events of one subject pattern, read once (an ordered consumer from now on).

    Frames are handed out in batches: the first event after a quiet spell goes out at once (in the
    same pass of the loop), later ones wait until FLUSH_S after the last hand-out. At 1,000 events/s
    and 100 clients that is ~200 writes/s per client at most instead of 1,000 (each write is a
    wake-up of the client's task, a pass through Starlette and uvicorn, and a system call)."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        super().__init__(js, subject)
        self._sub: Any = None
        self._frames: list[tuple[int, bytes]] = []

    def _add(self, seq: int, data: bytes) -> None:
        self._frames.append((seq, data))
        self._schedule()

    def _flush(self) -> None:
        self._timer = None
        self._flushed = asyncio.get_running_loop().time()
        frames, self._frames = self._frames, []
        if frames:
            self._hand_out(Batch(frames))

    def _running(self) -> bool:
        return self._sub is not None

    async def _start(self) -> None:
        async def on_msg(msg: Msg) -> None:
            seq = int(msg.metadata.sequence.stream)
            self._add(seq, frame(seq, msg.data))

        self._sub = await _live(self.js, self.subject, STREAM, on_msg)

    async def _stop(self) -> None:
        sub, self._sub = self._sub, None
        self._cancel_timer()
        self._frames = []
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


CORE, OUTPUT = 0, 1  # a frame's stream in a MergedHub
_NAMES = (STREAM, OUTPUT_STREAM)
Position = tuple[int, int]  # (CORE, OUTPUT) sequences; 0: none yet


def _body(seq: int, stream: str, data: bytes) -> bytes:
    """An SSE frame without its `id:` line: the envelope plus `seq` and `stream`."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = {"malformed": data.decode(errors="replace")}
    event["seq"] = seq
    event["stream"] = stream
    kind = str(event.get("type") or "message").encode()
    return b"event: %s\ndata: %s\n\n" % (kind, orjson.dumps(event))


def position_id(core: int, output: int) -> bytes:
    """The SSE `id:` line of a position: `CORE:OUTPUT`, `-` for a stream with nothing seen yet."""
    return b"id: %s:%s\n" % (b"%d" % core if core else b"-", b"%d" % output if output else b"-")


class MergedBatch:
    """Consecutive live frames of both streams, in stored order, handed to every client at once.

    `frames`: (stream, seq, position after it, frame without its id line); `before`/`after`: the
    hub's position before the first frame and after the last; `data`: the frames with the hub's
    ids, joined once (what a client whose own position is not past `before` writes as it is)."""

    __slots__ = ("after", "before", "data", "frames")

    def __init__(self, frames: list[tuple[int, int, Position, bytes]], before: Position) -> None:
        self.frames = frames
        self.before = before
        self.after = frames[-1][2]
        self.data = b"".join(position_id(*position) + body for _, _, position, body in frames)


class MergedHub(_Fanout[MergedBatch]):
    """The live events of one subject pattern with log retention on: CORRAL and CORRAL_OUTPUT read
    once each (ordered consumers from now on), merged by stored time, batched as `Hub` does.

    A stream whose newest delivery said more was on its way holds the other stream's later events
    back until those arrive (at most MERGE_WAIT_S, as replay/history.py's merge waits), so frames
    go out in stored order across both streams."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        super().__init__(js, subject)
        self._subs: list[Any] = []
        self._queues: tuple[deque[tuple[int, int, bytes]], ...] = (deque(), deque())  # (stored ns, seq, body)
        self._more = [False, False]  # the stream's newest delivery said more matching events followed
        self._newest_ns = [0, 0]  # when the stream's newest delivery was stored
        self._position = [0, 0]  # the last sequence of each stream handed out (0: none yet)
        self._held_since: float | None = None  # since when a stream's events wait for the other's

    def _add(self, which: int, msg: Msg) -> None:
        reply = msg.reply
        seq = ack_sequence(reply)
        stored_ns = ack_time_ns(reply)
        self._queues[which].append((stored_ns, seq, _body(seq, _NAMES[which], msg.data)))
        self._newest_ns[which] = stored_ns
        self._more[which] = ack_pending(reply) > 0
        self._schedule()

    def _flush(self) -> None:
        self._timer = None
        now = self._flushed = asyncio.get_running_loop().time()
        core, output = self._queues
        bound: int | None = None  # events stored after this wait for a stream still delivering
        if self._held_since is not None and now - self._held_since >= MERGE_WAIT_S:
            self._more = [False, False]  # what was announced did not come (expired, a recreated consumer)
        for which in (CORE, OUTPUT):
            if self._more[which]:
                newest = self._newest_ns[which]
                bound = newest if bound is None else min(bound, newest)
        position = self._position
        before = (position[CORE], position[OUTPUT])
        frames: list[tuple[int, int, Position, bytes]] = []
        while core or output:
            which = CORE if core and (not output or core[0][0] <= output[0][0]) else OUTPUT
            queue = self._queues[which]
            if bound is not None and queue[0][0] > bound:
                break
            _, seq, body = queue.popleft()
            position[which] = seq
            frames.append((which, seq, (position[CORE], position[OUTPUT]), body))
        if core or output:  # held back: looked at again shortly (all released after MERGE_WAIT_S without progress)
            if self._held_since is None or frames:
                self._held_since = now
            self._schedule()
        else:
            self._held_since = None
        if frames:
            self._hand_out(MergedBatch(frames, before))

    def _running(self) -> bool:
        return bool(self._subs)

    async def _start(self) -> None:
        streams = [CORE, OUTPUT] if subjects_overlap(self.subject, OUTPUT_EVENTS) else [CORE]
        for which in streams:

            async def on_msg(msg: Msg, which: int = which) -> None:
                self._add(which, msg)

            self._subs.append(await _live(self.js, self.subject, _NAMES[which], on_msg))

    async def _stop(self) -> None:
        subs, self._subs = self._subs, []
        self._cancel_timer()
        for queue in self._queues:
            queue.clear()
        self._more = [False, False]
        self._position = [0, 0]  # a new start is a new position: nothing handed out yet
        self._held_since = None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Hubs:
    """The hubs of one server, by subject pattern (one stream, or both with log retention on)."""

    def __init__(self) -> None:
        self._hubs: dict[str, Hub] = {}
        self._merged: dict[str, MergedHub] = {}

    def get(self, js: JetStreamContext, subject: str) -> Hub:
        hub = self._hubs.get(subject)
        if hub is None or hub.js is not js:
            hub = self._hubs[subject] = Hub(js, subject)
        return hub

    def merged(self, js: JetStreamContext, subject: str) -> MergedHub:
        hub = self._merged.get(subject)
        if hub is None or hub.js is not js:
            hub = self._merged[subject] = MergedHub(js, subject)
        return hub

    async def close(self) -> None:
        for hub in self._hubs.values():
            await hub.close()
        for merged in self._merged.values():
            await merged.close()
        self._hubs.clear()
        self._merged.clear()


Put = Callable[[bytes], Awaitable[None]]


async def _batched(read: Callable[[Put], Awaitable[None]]) -> AsyncGenerator[bytes, None]:
    """Run `read` (a catch-up that puts each frame it reads) beside the response, and yield its
    frames joined, up to BATCH_FRAMES at a time (a bounded queue: the reader waits for a slow client)."""
    backlog: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=BATCH_FRAMES * 4)

    async def run() -> None:
        try:
            await read(backlog.put)
        finally:
            await backlog.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            item = await backlog.get()
            if item is None:
                break
            chunk = [item]
            while len(chunk) < BATCH_FRAMES and not backlog.empty():
                more = backlog.get_nowait()
                if more is None:
                    backlog.put_nowait(None)
                    break
                chunk.append(more)
            yield b"".join(chunk)
        task.result()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def stream(
    js: JetStreamContext,
    hub: Hub | None,
    subject: str,
    *,
    start_seq: int | None,
    start_time: Any = None,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """The SSE body: catch up from `start_seq` (or `start_time`; both None: from now on), then live
    through `hub` (None: catch up only, then end)."""
    yield b"retry: 1000\n\n"
    subscriber = await hub.join() if hub is not None else None
    try:
        last = 0
        if start_seq is not None or start_time is not None:

            async def catch_up(put: Put) -> None:
                async def on_event(seq: int, msg: Msg) -> bool:
                    await put(frame(seq, msg.data))
                    nonlocal last
                    last = seq
                    return False

                await follow(
                    js, subject, on_event, start_seq=start_seq, start_time=start_time, stop_when_caught_up=True
                )

            async with contextlib.aclosing(_batched(catch_up)) as chunks:  # (a client gone: its reader ends now)
                async for chunk in chunks:
                    yield chunk
        if subscriber is None:
            return
        while True:
            if not await subscriber.wait(heartbeat_s):
                yield b": heartbeat\n\n"
                continue
            shown: list[bytes] = []
            for batch in subscriber.take():
                if batch.first > last:
                    shown.append(batch.data)
                elif batch.last > last:  # what the catch-up already sent is skipped
                    shown.extend(data for seq, data in batch.frames if seq > last)
                last = max(last, batch.last)
            if shown:
                yield b"".join(shown)
            if subscriber.overflowed:
                return  # too slow for the live rate: the client reconnects with Last-Event-ID
    finally:
        if hub is not None and subscriber is not None:
            await hub.leave(subscriber)


async def merged_stream(
    js: JetStreamContext,
    hub: MergedHub | None,
    subject: str,
    *,
    catch_up: bool,
    start_seq: int | None = None,
    start_time: datetime | None = None,
    output_start_seq: int | None = None,
    seen: Position = (0, 0),
    skip_core_through: int = 0,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """The SSE body with log retention on: with `catch_up`, the stored events from `start_seq`
    (a CORRAL sequence; output from where that event was stored, or exactly from
    `output_start_seq`) or `start_time` (all None: from the first) through a merge of both streams
    of its own; then live through `hub` (None: catch up only, then end).

    `seen`: the position the client resumes from (Last-Event-ID; 0: none), the start of its ids;
    core events up to `skip_core_through` are not sent again (the client has them)."""
    yield b"retry: 1000\n\n"
    subscriber = await hub.join() if hub is not None else None
    have = list(seen)  # the client has every wanted event up to these sequences
    try:
        if catch_up:

            async def read(put: Put) -> None:
                async def on_event(seq: int, msg: Msg) -> bool:
                    which = OUTPUT if ack_stream(msg.reply) == OUTPUT_STREAM else CORE
                    if which == CORE and seq <= skip_core_through:
                        return False
                    have[which] = seq
                    await put(position_id(have[CORE], have[OUTPUT]) + _body(seq, _NAMES[which], msg.data))
                    return False

                await follow(
                    js,
                    subject,
                    on_event,
                    start_seq=start_seq,
                    start_time=start_time,
                    output_start_seq=output_start_seq,
                    stop_when_caught_up=True,
                )

            async with contextlib.aclosing(_batched(read)) as chunks:  # (a client gone: its reader ends now)
                async for chunk in chunks:
                    yield chunk
        if subscriber is None:
            return
        while True:
            if not await subscriber.wait(heartbeat_s):
                yield b": heartbeat\n\n"
                continue
            shown: list[bytes] = []
            for batch in subscriber.take():
                core, output = batch.before
                if have[CORE] <= core and have[OUTPUT] <= output:  # the hub's ids are the client's
                    shown.append(batch.data)
                    have[CORE], have[OUTPUT] = batch.after
                    continue
                for which, seq, (hub_core, hub_output), body in batch.frames:
                    if seq <= have[which]:
                        continue  # the catch-up sent it
                    have[which] = seq
                    shown.append(position_id(max(have[CORE], hub_core), max(have[OUTPUT], hub_output)) + body)
            if shown:
                yield b"".join(shown)
            if subscriber.overflowed:
                return  # too slow for the live rate: the client reconnects with Last-Event-ID
    finally:
        if hub is not None and subscriber is not None:
            await hub.leave(subscriber)
