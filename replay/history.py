"""Read past events from the stream, in order, with an ordered consumer (no state on the server)."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from events.subjects import STREAM, ack_pending, ack_sequence

MsgHandler = Callable[[int, Msg], Awaitable[bool | None]]


async def last_sequence(js: JetStreamContext) -> int:
    """Return the sequence of the newest event in the log (0 when empty)."""
    info = await js.stream_info(STREAM)
    return int(info.state.last_seq)


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
) -> None:
    """Deliver matching events to `handle` in stream order until it returns True or `done` is set.

    With `stop_when_caught_up`, return once the events present at the start are delivered.
    """
    finished = done or asyncio.Event()
    config = ConsumerConfig()
    if start_seq is not None:
        policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(start_seq, 1)
    elif start_time is not None:
        policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = start_time
    else:
        policy = DeliverPolicy.NEW if new_only else DeliverPolicy.ALL
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
        ordered_consumer=True,
        deliver_policy=policy,
        config=config,
        cb=on_msg,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    try:
        await finished.wait()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if failure:
        raise failure[0]
