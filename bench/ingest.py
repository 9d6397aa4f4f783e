"""Ingest benchmark: publish N events, then time until all are queryable in DuckDB.

Corral's projector (the real one: pull consumer, batch apply, position in the same
transaction) is measured beside a raw baseline written with plain nats-py, orjson and
pyarrow, no Corral code, reading the same stream into a DuckDB table in the same run.

The same projector also runs with its screening switched off (projections/verify.py: duplicate
event ids, authority, orphans, and the output stream's duplicate ids), alternately with the real
one, `--rounds` times each: the cost of verification and dedup, printed as a share (target:
<= 10 %). The switch exists for this bench only: its projector's DuckDB worker process starts
with a `sitecustomize` that replaces the screening functions with no-ops (no user-facing switch).
`--retention` routes output events to CORRAL_OUTPUT (as `[retention]` does), so the output
stream's applier and its dedup by event id are measured too.

    .venv/bin/python bench/ingest.py [--events 200000] [--rounds 2] [--retention]
"""

import argparse
import asyncio
import os
import statistics
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
from events.stream import OutputRetention, ensure_output_retention
from events.subjects import STREAM
from events.types import (
    ExecutionExited,
    ExecutionRequested,
    ExecutionStarted,
    Heartbeat,
    Output,
)
from projections.database import WRITE_ROW_GROUP_SIZE
from projections.derived import OUTPUT_SEQ_BASE
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


UNSCREENED = """\
import sys
import warnings
warnings.filterwarnings("ignore", message=".projections.worker. found in sys.modules")
sys.path.insert(0, {root!r})
import projections.appliers as p
p.screen_batch = lambda con, before, **kw: set()
p.screen_orphans = lambda con, before: set()
p.OutputApplier.screen = False
open({marker!r}, "w").close()
"""


def unscreened_site(tmp: Path) -> Path:
    """A folder whose sitecustomize switches the screening off in the projector's worker process."""
    folder = tmp / "unscreened-site"
    folder.mkdir(exist_ok=True)
    root, marker = str(Path(__file__).resolve().parents[1]), str(folder / "applied")
    (folder / "sitecustomize.py").write_text(UNSCREENED.format(root=root, marker=marker))
    return folder


async def corral_projector(
    url: str, db: Path, tmp: Path, n: int, last_seq: int, *, output_seq: int | None = None, site: Path | None = None
) -> float:
    bus = await connect_bus(url)
    saved = os.environ.get("PYTHONPATH")
    if site is not None:  # the worker process is started (and imports) in Projector.start()
        os.environ["PYTHONPATH"] = str(site)
    projector = Projector(bus, database=db, tmp_dir=tmp)
    setup = time.perf_counter()
    try:
        async with projector:
            # Timed from here, as the raw baseline is timed after its set-up: the projector's DuckDB
            # worker has started and its consumer exists; its loop has not read anything yet.
            start = time.perf_counter()
            print(f"  set-up (DuckDB worker process, consumer; not timed): {start - setup:.2f}s")
            if output_seq is not None:
                while projector.output_position is None:  # noqa: ASYNC110 (it finds CORRAL_OUTPUT at start)
                    await asyncio.sleep(0.01)
            ok = await projector.wait_for_position(last_seq, timeout_s=600, output_seq=output_seq)
            elapsed = time.perf_counter() - start
    finally:
        if site is not None:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
    await bus.close()
    assert ok, "projector did not catch up"
    if site is not None:
        assert (site / "applied").exists(), "the worker did not switch its screening off"
        (site / "applied").unlink()
    con = duckdb.connect(str(db), read_only=True)
    outside = f"(SELECT count(*) FROM output WHERE seq >= {OUTPUT_SEQ_BASE})"  # CORRAL_OUTPUT's rows
    count = con.execute(f"SELECT (SELECT count(*) FROM events) + {outside}").fetchone()[0]
    rejected = con.execute("SELECT count(*) FROM rejected_events").fetchone()[0]
    con.close()
    assert count == n, (count, n)
    assert rejected == 0, rejected
    print(f"  {n / elapsed:,.0f} events/s ({elapsed:.2f}s)")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2, help="projector runs with and without screening, each")
    parser.add_argument("--retention", action="store_true", help="output events in CORRAL_OUTPUT ([retention])")
    args = parser.parse_args()
    n = args.events
    times: dict[str, list[float]] = {"screened": [], "unscreened": []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmpdir:
        tmp = Path(tmpdir)
        server = EmbeddedServer(tmp / "nats", log_file=tmp / "nats.log").start()
        try:
            events = workload(n)
            outputs = sum(subject.endswith(".output") for subject, _, _ in events) if args.retention else 0
            if args.retention:
                bus = await connect_bus(server.url)
                await ensure_output_retention(bus.js, OutputRetention(max_msgs=2 * n))
                await bus.close()
            publish_s = await publish_all(server.url, events)
            print(f"publish (Corral pipelined publisher): {n / publish_s:,.0f} events/s")
            raw_s = await raw_baseline(server.url, tmp / "raw.duckdb", n - outputs)
            site = unscreened_site(tmp)
            for rnd in range(args.rounds):
                for name in times:
                    print(f"corral projector, {name}, round {rnd + 1}:")
                    times[name].append(
                        await corral_projector(
                            server.url,
                            tmp / f"corral-{name}-{rnd}.duckdb",
                            tmp / "t",
                            n,
                            n - outputs,
                            output_seq=outputs if args.retention else None,
                            site=site if name == "unscreened" else None,
                        )
                    )
        finally:
            server.stop()
    corral_s, unscreened_s = statistics.median(times["screened"]), statistics.median(times["unscreened"])
    raw_rate, corral_rate, unscreened_rate = (n - outputs) / raw_s, n / corral_s, n / unscreened_s
    cost = 1 - corral_rate / unscreened_rate
    where = f"CORRAL + CORRAL_OUTPUT ({outputs:,} output events)" if args.retention else "CORRAL"
    print(f"raw baseline (nats-py pull + pyarrow + DuckDB, CORRAL only): {raw_rate:,.0f} events/s ({raw_s:.2f}s)")
    print(f"corral projector, screening off (events + output + executions, {where}): {unscreened_rate:,.0f} events/s")
    print(f"corral projector (events + output + executions, {where}): {corral_rate:,.0f} events/s ({corral_s:.2f}s)")
    print(f"verification and dedup cost {cost:.1%} of ingest throughput (target <= 10%), medians of {args.rounds}")
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
        unscreened_per_s=unscreened_rate,
        screening_cost=round(cost, 4),
        retention=args.retention,
    )


if __name__ == "__main__":
    asyncio.run(main())
