"""The actors' shared runtime (actors/runtime.py) against a real nats-server: fetching from a work durable."""

import asyncio

from actors.bus import Bus
from actors.runtime import Actor
from events.envelope import decode_event, new_event
from events.ids import new_execution_id
from events.stream import ensure_work_consumer
from events.subjects import STREAM, events_of_type
from events.types import Heartbeat


async def test_a_batch_fetch_takes_what_waits_and_a_stop_gives_up_the_fetch(bus: Bus) -> None:
    """`_fetch_unless_stopped(sub, batch=N)` hands over what the durable has waiting (up to N) in one
    fetch, the next message when none waits, and nothing once the actor stops."""
    actor = Actor(bus, instance="runtime-test")
    await ensure_work_consumer(bus.js, "runtime_test", events_of_type("heartbeat"), ack_wait_s=30.0)
    sub = await bus.js.pull_subscribe_bind("runtime_test", stream=STREAM)
    execution_id = new_execution_id()
    sent = []
    for _ in range(5):
        event = new_event(execution_id, Heartbeat(), actor="test")
        sent.append(event.id)
        await bus.publisher.publish(event)

    first = await actor._fetch_unless_stopped(sub, batch=3)
    rest = await actor._fetch_unless_stopped(sub, batch=10)
    assert [len(first), len(rest)] == [3, 2]
    assert [decode_event(m.data).id for m in first + rest] == sent  # each once, in stored order
    for msg in first + rest:
        await msg.ack()

    # none waiting: the fetch hands over the next one published
    fetching = asyncio.ensure_future(actor._fetch_unless_stopped(sub, batch=10))
    await asyncio.sleep(0.1)
    late = new_event(execution_id, Heartbeat(), actor="test")
    await bus.publisher.publish(late)
    got: list = []
    while not got:  # (a fetch that ended empty before the publish: fetch again)
        got = await fetching
        if not got:
            fetching = asyncio.ensure_future(actor._fetch_unless_stopped(sub, batch=10))
    assert [decode_event(m.data).id for m in got] == [late.id]
    await got[0].ack()

    # a stop ends the fetch it is in, with nothing
    fetching = asyncio.ensure_future(actor._fetch_unless_stopped(sub, batch=10))
    await asyncio.sleep(0.05)
    actor.stopping.set()
    assert await asyncio.wait_for(fetching, 5.0) == []
    await sub.unsubscribe()
