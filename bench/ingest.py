"""Ingest benchmark: publish N events, then time until all are queryable in DuckDB.

Corral's projector (the real one: pull consumer, batch apply, position in the same
transaction) is measured beside a raw baseline written with plain nats-py, orjson and
pyarrow, no Corral code, reading the same stream into a DuckDB table in the same run.

    .venv/bin/python bench/ingest.py [--events 200000]
"""

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig

from actors.bus import connect_bus
from bench.common import RAW_EVENTS_DDL, insert_raw_events, print_result, raw_events_table
from corral.server import EmbeddedServer
from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import STREAM
from events.types import (
    ExecutionExited,
    ExecutionRequested,
    ExecutionStarted,
    Heartbeat,
    Output,
)
from projections.database import WRITE_ROW_GROUP_SIZE
from projections.projector import Projector


def workload(n: int) -> list[tuple[str, bytes, str]]:
    """A realistic mix: per execution a request, a start, 95 output chunks, heartbeats, an exit."""
    events = []
    while len(events) < n:
        eid = new_execution_id()
        seq = [ExecutionRequested(command=("agent", "task"), repo="/tmp/r")]
        seq.append(ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/tmp"))
        for i in range(95):
            seq.append(Output(stream="stdout", n=i, text=f"step {i}: edited src/module_{i}.py (+3 -1)\n"))
            if i % 30 == 0:
                seq.append(Heartbeat())
        seq.append(ExecutionExited(exit_code=0, duration_s=1.5))
        for data in seq:
            ev = new_event(eid, data, actor="bench")
            events.append((ev.subject, ev.to_bytes(), ev.id))
    return events[:n]


async def publish_all(url: str, events: list[tuple[str, bytes, str]]) -> float:
    bus = await connect_bus(url)
    start = time.perf_counter()
    futures = [await bus.publisher.send(s, p, msg_id=i) for s, p, i in events]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    await bus.close()
    return elapsed


async def raw_baseline(url: str, db: Path, n: int) -> float:
    """Plain nats-py hand-rolled pull + orjson + pyarrow + DuckDB, committing every batch.

    Given what Corral's projector uses too (so the ratio compares the code, not the settings):
    a consumer without acks, and the DuckDB file attached with the projector's row group size."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.NONE))
    con = duckdb.connect()
    con.execute(f"ATTACH '{db}' AS raw (ROW_GROUP_SIZE {WRITE_ROW_GROUP_SIZE})")
    con.execute("USE raw")
    con.execute(RAW_EVENTS_DDL)
    buf: list = []
    arrived = asyncio.Event()

    async def cb(msg):
        if not msg.data:
            return
        buf.append(msg)
        arrived.set()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=cb, pending_msgs_limit=-1)
    start = time.perf_counter()
    done = 0
    requested = 0
    while done < n:
        while requested - done - len(buf) < 8000 and requested < n:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.raw",
                orjson.dumps({"batch": 2000, "expires": 5_000_000_000}),
                reply=inbox,
            )
            requested += 2000
        if not buf:
            arrived.clear()
            await arrived.wait()
            continue
        msgs, buf[:] = buf[:50000], buf[50000:]
        table = raw_events_table([int(m.reply.split(".")[5]) for m in msgs], [m.data for m in msgs])
        await asyncio.to_thread(insert_raw_events, con, table)
        done += len(msgs)
    elapsed = time.perf_counter() - start
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == n
    con.close()
    await nc.close()
    return elapsed


async def corral_projector(url: str, db: Path, tmp: Path, n: int, last_seq: int) -> float:
    bus = await connect_bus(url)
    projector = Projector(bus, database=db, tmp_dir=tmp)
    setup = time.perf_counter()
    async with projector:
        # Timed from here, as the raw baseline is timed after its set-up: the projector's DuckDB
        # worker has started and its consumer exists; its loop has not read anything yet.
        start = time.perf_counter()
        print(f"corral projector set-up (DuckDB worker process, consumer; not timed): {start - setup:.2f}s")
        ok = await projector.wait_for_position(last_seq, timeout_s=600)
        elapsed = time.perf_counter() - start
    await bus.close()
    assert ok, "projector did not catch up"
    con = duckdb.connect(str(db), read_only=True)
    count = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    assert count == n, (count, n)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmpdir:
        tmp = Path(tmpdir)
        server = EmbeddedServer(tmp / "nats", log_file=tmp / "nats.log").start()
        try:
            events = workload(n)
            publish_s = await publish_all(server.url, events)
            print(f"publish (Corral pipelined publisher): {n / publish_s:,.0f} events/s")
            raw_s = await raw_baseline(server.url, tmp / "raw.duckdb", n)
            corral_s = await corral_projector(server.url, tmp / "corral.duckdb", tmp / "t", n, n)
        finally:
            server.stop()
    raw_rate, corral_rate = n / raw_s, n / corral_s
    print(f"raw baseline (nats-py pull + pyarrow + DuckDB): {raw_rate:,.0f} events/s ({raw_s:.2f}s)")
    print(f"corral projector (events + output + executions): {corral_rate:,.0f} events/s ({corral_s:.2f}s)")
    print(f"ratio corral/raw: {corral_rate / raw_rate:.2f}x   [{datetime.now(UTC):%Y-%m-%d}, n={n:,}]")
    print_result(
        "ingest",
        "events_per_s",
        corral_rate,
        "baseline_per_s",
        raw_rate,
        ratio=corral_rate / raw_rate,
        target=">= 100000 events/s",
        met=corral_rate >= 100_000,
        events=n,
    )


if __name__ == "__main__":
    asyncio.run(main())
