"""A NATS connection for bulk intake: delivered messages go straight to a sink, undecoded.

nats-py builds a Msg and parses the header block of every delivered message; for the
projector, which only needs the reply subject (stream sequence), the subject and the payload,
that is most of the cost per event (every event carries a Nats-Msg-Id header). This client
hands those three raw values to a sink for the subscriptions registered with it, and leaves
every other subscription to nats-py as usual.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events.subjects import ALL_EVENTS, STREAM, ack_sequence
from projections.batch import Gathered

RawSink = Callable[[bytes, bytes, bytes, bytes], None]
DeliverySink = Callable[[int, bytes, bytes], None]  # (stream sequence, subject, payload)
StatusSink = Callable[[bytes], None]  # the header block of a pull's status (404, 408, 409)
_STATUS_PREFIX = b"NATS/1.0 "
_ACK_PREFIX = b"$JS.ACK."


def status_of(headers: bytes) -> int | None:
    """Return the status code of a status message's header block (408, 404, 409, 100)."""
    if headers and headers.startswith(_STATUS_PREFIX):
        code = headers[len(_STATUS_PREFIX) : len(_STATUS_PREFIX) + 3]
        if code.isdigit():
            return int(code)
    return None


class IntakeClient(Client):
    """nats-py Client whose registered subscriptions deliver (subject, reply, data, headers) raw."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_sinks: dict[int, RawSink] = {}
        self.raw_subs: dict[int, Any] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        sink = self.raw_sinks.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        sink(subject, reply, data, headers)

    async def subscribe_raw(self, subject: str, sink: RawSink) -> int:
        """Subscribe and route every message of the subscription to sink; return its sid."""

        async def unused(_msg: object) -> None:  # nats-py wants a callback; the sink takes all
            return None

        sub = await self.subscribe(subject, cb=unused)
        self.raw_sinks[sub._id] = sink
        self.raw_subs[sub._id] = sub
        return sub._id

    async def unsubscribe_raw(self, sid: int) -> None:
        self.raw_sinks.pop(sid, None)
        sub = self.raw_subs.pop(sid, None)
        if sub is not None:
            await sub.unsubscribe()


def delivery_sink(on_delivery: DeliverySink, on_status: StatusSink) -> RawSink:
    """A RawSink that hands JetStream deliveries (their stream sequence parsed from the reply
    subject, events/subjects.py) to on_delivery and everything else with headers to on_status."""

    def sink(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if reply.startswith(_ACK_PREFIX):
            on_delivery(ack_sequence(reply), subject, data)
        elif headers:
            on_status(headers)

    return sink


async def subscribe_deliveries(
    client: "RawClient", subject: str, on_delivery: DeliverySink, on_status: StatusSink
) -> int:
    """Subscribe to a pull consumer's deliveries: projections.wire.WireClient parses them on its
    fast path; any other client through delivery_sink. Returns the subscription id."""
    fast = getattr(client, "subscribe_deliveries", None)
    if fast is not None:
        return await fast(subject, on_delivery, on_status)  # type: ignore[no-any-return]
    return await client.subscribe_raw(subject, delivery_sink(on_delivery, on_status))


class RawClient(Protocol):
    """What read_log needs of a connection: IntakeClient (nats-py) or projections.wire.WireClient."""

    def new_inbox(self) -> str: ...

    async def subscribe_raw(self, subject: str, sink: RawSink) -> int: ...

    async def unsubscribe_raw(self, sid: int) -> None: ...

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "") -> None: ...

    async def close(self) -> None: ...


Batch = list[tuple[int, str, bytes]]
READ_PULL = 2000
READ_CREDIT = 40000
READ_BATCH_BYTES = 32 * 1024 * 1024  # a batch is handed over at this many bytes of payload, whatever its count


async def read_log(
    client: RawClient,
    js: JetStreamContext,
    *,
    start_seq: int,
    until: int,
    on_batch: Callable[[Any], Coroutine[Any, Any, None]],
    stall_s: float = 15.0,
    batch_size: int = 50000,
    batch_bytes: int = READ_BATCH_BYTES,
    stream: str = STREAM,
    filter_subject: str = ALL_EVENTS,
    gather: bool = False,
) -> int:
    """Hand (seq, subject, payload) batches of the event log from start_seq through until to on_batch
    (with `gather`, each batch as a projections.batch.Gathered, prepared for an applier as read).

    An ephemeral pull consumer without acks, fed by pipelined `MSG.NEXT` requests on a raw
    client (nats-py's IntakeClient, or the leaner projections.wire.WireClient), against 40k
    events/s for `fetch()` and 60-75k for an ordered push consumer with Msg objects here.
    `on_batch` is awaited for one batch while the next is read; a batch ends at `batch_size`
    events or `batch_bytes` bytes of payload (big output chunks: the DuckDB worker's memory is
    bounded, docs/config.md `[projector] memory_limit`). Returns how many events were read.
    """
    if start_seq > until:
        return 0
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    consumer = info.name
    inbox = client.new_inbox()
    arrived = asyncio.Event()
    buffer: list[tuple[int, bytes, bytes]] = []
    credit = 0
    last_seq = start_seq - 1

    def on_status(headers: bytes) -> None:
        nonlocal credit
        if status_of(headers) is not None:
            credit = 0  # 404/408/409: what was asked for will not come; ask again
            arrived.set()

    def on_delivery(seq: int, subject: bytes, data: bytes) -> None:
        nonlocal credit
        credit -= 1
        buffer.append((seq, subject, data))
        if len(buffer) >= READ_PULL:
            arrived.set()

    sid = await subscribe_deliveries(client, inbox, on_delivery, on_status)
    read = 0
    handing: asyncio.Task[None] | None = None
    pending: Batch = []
    gathering = Gathered() if gather else None
    pending_bytes = 0
    heard = time.monotonic()
    try:
        while last_seq < until:
            while credit < READ_CREDIT:
                credit += READ_PULL
                await client.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                    orjson.dumps({"batch": READ_PULL, "expires": 2_000_000_000}),
                    reply=inbox,
                )
            if not buffer:
                failure = getattr(client, "error", None)
                if failure is not None:
                    raise RuntimeError(f"reading the event log failed at sequence {last_seq}: {failure}")
                if time.monotonic() - heard > stall_s:
                    raise RuntimeError(f"the event log stopped at sequence {last_seq}, before {until}")
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 0.25)
                continue
            heard = time.monotonic()
            raw, buffer[:] = buffer[:], []
            for seq, subject, data in raw:
                if seq > until:
                    break
                if gathering is not None:
                    gathering.add(seq, subject, data)
                else:
                    pending.append((seq, subject.decode(), data))
                    pending_bytes += len(data)
                last_seq = seq
            size = len(gathering.items) if gathering is not None else len(pending)
            gathered_bytes = gathering.size if gathering is not None else pending_bytes
            if size >= batch_size or gathered_bytes >= batch_bytes or last_seq >= until:
                if handing is not None:
                    await handing
                todo: Any = pending
                if gathering is not None:
                    todo, gathering = gathering, Gathered()
                else:
                    pending = []
                    pending_bytes = 0
                read += size
                handing = asyncio.create_task(on_batch(todo))
        if handing is not None:
            await handing
            handing = None
    finally:
        if handing is not None:
            handing.cancel()
            with contextlib.suppress(BaseException):
                await handing
        with contextlib.suppress(Exception):
            await client.unsubscribe_raw(sid)
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer)
    return read
