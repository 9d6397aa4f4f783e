"""The shared live consumer behind the SSE routes (corral/sse.py) against a real nats-server.

The hub hands each client its frames in batches (one write for everything that arrived within a
few milliseconds); these tests check what that must never change: every event once, in order,
with its sequence as the SSE id; a client that joins with a catch-up sees nothing twice; a client
too slow for the live rate is ended and, resuming with its last id, loses nothing.
"""

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors.bus import Bus
from corral import sse
from events.envelope import new_event
from events.ids import new_execution_id
from events.stream import OutputRetention, ensure_output_retention
from events.subjects import OUTPUT_STREAM, STREAM, execution_events
from events.types import Heartbeat, Output

FRAME = re.compile(rb"id: (\d+)\nevent: ([^\n]*)\ndata: ([^\n]*)\n\n")


async def publish(bus: Bus, execution_id: str, count: int, *, start: int = 0, pause_every: int = 0) -> list[int]:
    """`count` output events; their sequences."""
    seqs = []
    for n in range(start, start + count):
        ack = await bus.publisher.publish(
            new_event(execution_id, Output(stream="stdout", text=f"line {n}\n", n=n), actor="spawner-test-1")
        )
        seqs.append(int(ack.seq))
        if pause_every and n % pause_every == 0:
            await asyncio.sleep(0.003)  # spread over several of the hub's batches
    return seqs


async def close(
    bodies: list[AsyncIterator[bytes]], tasks: list[asyncio.Task[Any]], hub: sse.Hub | sse.MergedHub
) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    for body in bodies:
        await body.aclose()  # type: ignore[attr-defined]
    await hub.close()


async def read_ids(body: AsyncIterator[bytes], want: int, *, timeout_s: float = 30) -> list[int]:
    """The SSE ids of the frames `body` yields until `want` were seen (or it ended)."""
    ids: list[int] = []
    buffer = b""

    async def read() -> None:
        nonlocal buffer
        async for chunk in body:
            buffer += chunk
            for match in FRAME.finditer(buffer):
                ids.append(int(match[1]))
            buffer = buffer[buffer.rfind(b"\n\n") + 2 :] if b"\n\n" in buffer else buffer
            if len(ids) >= want:
                return

    await asyncio.wait_for(read(), timeout_s)
    return ids


async def test_live_frames_reach_every_client_once_in_order(bus: Bus) -> None:
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.Hub(bus.js, subject)
    bodies = [sse.stream(bus.js, hub, subject, start_seq=None, heartbeat_s=30) for _ in range(3)]
    readers: list[asyncio.Task[list[int]]] = []
    try:
        for body in bodies:
            assert await anext(body) == b"retry: 1000\n\n"
        readers = [asyncio.create_task(read_ids(body, 300)) for body in bodies]
        while len(hub.subscribers) < 3:  # noqa: ASYNC110 (joining is a NATS round trip)
            await asyncio.sleep(0.01)
        seqs = await publish(bus, execution_id, 300, pause_every=7)
        for reader in readers:
            assert await reader == seqs
    finally:
        await close(bodies, readers, hub)  # type: ignore[arg-type]


async def test_a_client_catching_up_while_events_pour_in_sees_each_once(bus: Bus) -> None:
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.Hub(bus.js, subject)
    first = await publish(bus, execution_id, 200)
    body = sse.stream(bus.js, hub, subject, start_seq=first[0], heartbeat_s=30)
    readers: list[asyncio.Task[list[int]]] = []
    try:
        assert await anext(body) == b"retry: 1000\n\n"
        readers.append(asyncio.create_task(read_ids(body, 600)))
        more = await publish(bus, execution_id, 400, start=200, pause_every=5)  # during the catch-up
        assert await readers[0] == first + more
    finally:
        await close([body], readers, hub)  # type: ignore[arg-type]


async def test_a_client_too_slow_is_ended_and_resumes_without_loss(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "QUEUE_FRAMES", 50)
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.Hub(bus.js, subject)
    slow = sse.stream(bus.js, hub, subject, start_seq=None, heartbeat_s=30)
    fast = sse.stream(bus.js, hub, subject, start_seq=None, heartbeat_s=30)
    tasks: list[asyncio.Task[object]] = []
    try:
        for body in (slow, fast):
            assert await anext(body) == b"retry: 1000\n\n"
        fast_reader = asyncio.create_task(read_ids(fast, 200))
        slow_first = asyncio.create_task(anext(slow))  # it joins, then reads nothing more for a while
        tasks += [fast_reader, slow_first]  # type: ignore[list-item]
        while len(hub.subscribers) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        first = await publish(bus, execution_id, 10)
        got = FRAME.findall(await slow_first)
        seen = [int(m[0]) for m in got]
        assert seen and seen == first[: len(seen)]
        seqs = first + await publish(bus, execution_id, 190, start=10)  # past its queue: it is ended
        assert await fast_reader == seqs, "the others never wait for the slow one"
        rest: list[int] = []

        async def drain() -> None:  # what was queued before it fell behind (if anything), then the end
            async for chunk in slow:
                rest.extend(int(m[0]) for m in FRAME.findall(chunk))

        await asyncio.wait_for(drain(), 30)
        assert len(seen) + len(rest) < len(seqs), "a client that fell behind is ended"
        resumed = sse.stream(bus.js, hub, subject, start_seq=(seen + rest)[-1] + 1, heartbeat_s=30)
        try:
            assert await anext(resumed) == b"retry: 1000\n\n"
            after = await read_ids(resumed, len(seqs) - len(seen) - len(rest))
        finally:
            await resumed.aclose()  # type: ignore[attr-defined]
        assert seen + rest + after == seqs, "resumed after its last id: nothing lost, nothing twice"
    finally:
        await close([slow, fast], tasks, hub)


async def test_a_quiet_stream_gets_heartbeats_between_events(bus: Bus) -> None:
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.Hub(bus.js, subject)
    body = sse.stream(bus.js, hub, subject, start_seq=None, heartbeat_s=0.2)
    try:
        assert await anext(body) == b"retry: 1000\n\n"
        assert await asyncio.wait_for(anext(body), 30) == b": heartbeat\n\n"  # (it joined the hub meanwhile)
        [seq] = await publish(bus, execution_id, 1)
        chunk = await asyncio.wait_for(anext(body), 30)
        while chunk == b": heartbeat\n\n":  # one may have been due before the event came
            chunk = await asyncio.wait_for(anext(body), 30)
        assert [int(m[0]) for m in FRAME.findall(chunk)] == [seq]
        assert await asyncio.wait_for(anext(body), 30) == b": heartbeat\n\n"
    finally:
        await close([body], [], hub)


# --- log retention on: both streams, one MergedHub ------------------------------------------------

MERGED_FRAME = re.compile(rb"id: ([0-9-]+):([0-9-]+)\nevent: ([^\n]*)\ndata: ([^\n]*)\n\n")


Stored = tuple[str, int]


async def publish_mixed(
    bus: Bus, execution_id: str, count: int, *, start: int = 0, pause_s: float = 0.0
) -> list[Stored]:
    """`count` events alternating output (CORRAL_OUTPUT) and a heartbeat (CORRAL); (stream, seq) each."""
    stored: list[Stored] = []
    for n in range(start, start + count):
        data = Output(stream="stdout", text=f"line {n}\n", n=n) if n % 2 == 0 else Heartbeat(note=str(n))
        ack = await bus.emit(execution_id, data, actor="spawner-test-1")
        stored.append((str(ack.stream), int(ack.seq)))
        if pause_s:
            await asyncio.sleep(pause_s)
    return stored


async def read_merged(body: AsyncIterator[bytes], want: int, *, timeout_s: float = 30) -> list[tuple[Stored, str]]:
    """(stream, seq) and the SSE id of each frame `body` yields until `want` were seen (or it ended)."""
    frames: list[tuple[Stored, str]] = []
    buffer = b""

    async def read() -> None:
        nonlocal buffer
        async for chunk in body:
            buffer += chunk
            end = buffer.rfind(b"\n\n") + 2
            for match in MERGED_FRAME.finditer(buffer[:end]):
                event = json.loads(match[4])
                frames.append(((event["stream"], event["seq"]), f"{match[1].decode()}:{match[2].decode()}"))
            buffer = buffer[end:]
            if len(frames) >= want:
                return

    await asyncio.wait_for(read(), timeout_s)
    return frames


def positions_are_exact(frames: list[tuple[Stored, str]], start: tuple[int, int] = (0, 0)) -> None:
    """Each id is CORE:OUTPUT, the last sequence of each stream the client got so far (`-`: none)."""
    last = {STREAM: start[0], OUTPUT_STREAM: start[1]}
    for (stream, seq), sse_id in frames:
        last[stream] = seq
        core, output = (last[STREAM] or "-"), (last[OUTPUT_STREAM] or "-")
        assert sse_id == f"{core}:{output}", (stream, seq, sse_id)


async def test_with_log_retention_live_frames_of_both_streams_reach_every_client_once_in_stored_order(
    bus: Bus,
) -> None:
    await ensure_output_retention(bus.js, OutputRetention(max_msgs=100_000))
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.MergedHub(bus.js, subject)
    bodies = [sse.merged_stream(bus.js, hub, subject, catch_up=False, heartbeat_s=30) for _ in range(3)]
    readers: list[asyncio.Task[list[tuple[Stored, str]]]] = []
    try:
        for body in bodies:
            assert await anext(body) == b"retry: 1000\n\n"
        readers = [asyncio.create_task(read_merged(body, 120)) for body in bodies]
        while len(hub.subscribers) < 3:  # noqa: ASYNC110 (joining is a NATS round trip)
            await asyncio.sleep(0.01)
        stored = await publish_mixed(bus, execution_id, 120, pause_s=0.005)  # one after the other
        assert {stream for stream, _ in stored} == {STREAM, OUTPUT_STREAM}
        for reader in readers:
            frames = await reader
            assert [where for where, _ in frames] == stored, "every event once, in the order stored"
            positions_are_exact(frames)
    finally:
        await close(bodies, readers, hub)


async def test_with_log_retention_a_client_catching_up_while_events_pour_in_sees_each_once_and_resumes_exactly(
    bus: Bus,
) -> None:
    await ensure_output_retention(bus.js, OutputRetention(max_msgs=100_000))
    execution_id = new_execution_id()
    subject = execution_events(execution_id)
    hub = sse.MergedHub(bus.js, subject)
    live = sse.merged_stream(bus.js, hub, subject, catch_up=False, heartbeat_s=30)  # keeps the hub busy
    first = await publish_mixed(bus, execution_id, 200)
    body = sse.merged_stream(bus.js, hub, subject, catch_up=True, start_seq=1, output_start_seq=1, heartbeat_s=30)
    readers: list[asyncio.Task[list[tuple[Stored, str]]]] = []
    try:
        assert await anext(live) == b"retry: 1000\n\n"
        readers.append(asyncio.create_task(read_merged(live, 600)))
        while not hub.subscribers:  # noqa: ASYNC110 (joining is a NATS round trip)
            await asyncio.sleep(0.01)
        assert await anext(body) == b"retry: 1000\n\n"
        readers.append(asyncio.create_task(read_merged(body, 800)))
        more = await publish_mixed(bus, execution_id, 600, start=200, pause_s=0.001)  # during the catch-up
        everything = first + more
        frames = await readers[1]
        got = [where for where, _ in frames]
        for stream in (STREAM, OUTPUT_STREAM):
            assert [s for s in got if s[0] == stream] == [s for s in everything if s[0] == stream]
        assert len(got) == len(everything), "each once"
        positions_are_exact(frames)
        assert [where for where, _ in await readers[0]] == more
        # cut anywhere: resuming right after an id (as Last-Event-ID) gives the rest, none twice
        for cut in (1, 137, 401, 799):
            core, _, output = frames[cut - 1][1].partition(":")
            position = (int(core) if core != "-" else 0, int(output) if output != "-" else 0)
            resumed = sse.merged_stream(
                bus.js,
                None,
                subject,
                catch_up=True,
                start_seq=position[0] + 1,
                output_start_seq=position[1] + 1,
                seen=position,
                heartbeat_s=30,
            )
            rest = await read_merged(resumed, 10_000)
            await resumed.aclose()  # type: ignore[attr-defined]
            assert sorted(got[:cut] + [where for where, _ in rest]) == sorted(everything), f"cut after {cut}"
            for stream in (STREAM, OUTPUT_STREAM):  # (each stream in its order; across both, by stored time)
                assert [s for s, _ in rest if s[0] == stream] == [s for s in got[cut:] if s[0] == stream]
            positions_are_exact(rest, position)
    finally:
        await close([live, body], readers, hub)
