"""Rebuild benchmark: `corral projections rebuild` from the log, beside a raw ordered-consumer read.

Publishes N events (per execution: request, start, output chunks, heartbeats, file touches,
usage ticks, a checkpoint, an exit) to an embedded nats-server, then measures in the same run:

- raw baseline: a plain nats-py ordered push consumer reading the same stream to the end and
  decoding each payload with orjson (no DuckDB at all): the floor any rebuild pays to read the log;
- Corral: `projections.rebuild.rebuild_database`, the code `corral projections rebuild` runs
  (an ephemeral pull consumer read raw with pipelined `MSG.NEXT` requests, batches of 50,000
  bulk-loaded into `events` and the execution states while the next is read, every derived
  table filled once at the end, the new file swapped in).

    .venv/bin/python bench/rebuild.py [--events 300000]
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
from nats.js.api import DeliverPolicy

from actors.bus import connect_bus
from bench.common import print_result
from bench.ingest import publish_all
from corral.server import EmbeddedServer
from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import ALL_EVENTS
from events.types import (
    CheckpointCreated,
    EventData,
    ExecutionExited,
    ExecutionRequested,
    ExecutionStarted,
    FileStat,
    FileTouched,
    Heartbeat,
    Output,
    Usage,
)
from projections.projector import Projector
from projections.rebuild import rebuild_database


def workload(n: int) -> list[tuple[str, bytes, str]]:
    events: list[tuple[str, bytes, str]] = []
    while len(events) < n:
        eid = new_execution_id()
        seq: list[EventData] = [
            ExecutionRequested(command=("agent", "task"), repo="/tmp/r"),
            ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/tmp"),
        ]
        for i in range(90):
            seq.append(Output(stream="stdout", n=i + 1, text=f"step {i}: edited src/module_{i}.py (+3 -1)\n"))
            if i % 30 == 0:
                seq.append(Heartbeat())
                seq.append(FileTouched(path=f"src/module_{i}.py", change="modified"))
                seq.append(Usage(input_tokens=1000, output_tokens=100, cost_usd=0.01, model="m"))
        files = tuple(FileStat(path=f"src/module_{i}.py", added=3, deleted=1) for i in (0, 30, 60))
        seq.append(
            CheckpointCreated(
                n=1,
                ref=f"refs/corral/{eid}/1",
                commit="c" * 40,
                tree="t" * 40,
                parent="p" * 40,
                trigger="exit",
                files=files,
                duration_ms=3.0,
            )
        )
        seq.append(ExecutionExited(exit_code=0, duration_s=1.5))
        for data in seq:  # a checkpoint is the checkpointer's to record (projections/verify.py)
            event = new_event(eid, data, actor="checkpointer-bench-1" if data.TYPE == "checkpoint.created" else "bench")
            events.append((event.subject, event.to_bytes(), event.id))
    return events[:n]


async def raw_read(url: str, n: int) -> float:
    """Plain nats-py ordered consumer over the whole stream, orjson-decoding each event."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        nonlocal count
        orjson.loads(msg.data)
        count += 1
        if count >= n:
            done.set()

    start = time.perf_counter()
    sub = await js.subscribe(
        ALL_EVENTS,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=on_msg,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await done.wait()
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    await nc.close()
    return elapsed


async def corral_rebuild(url: str, tmp: Path, n: int) -> float:
    bus = await connect_bus(url)
    projector = Projector(bus, database=tmp / "corral.duckdb", tmp_dir=tmp / "t")
    await projector.open_database()  # an empty live file: the rebuild fills a new one and swaps it in

    async def report(done: int, total: int) -> None:
        return None

    start = time.perf_counter()
    applied = await rebuild_database(bus, projector, report=report)
    elapsed = time.perf_counter() - start
    projector.close_database()
    await bus.close()
    assert applied == n, (applied, n)
    con = duckdb.connect(str(tmp / "corral.duckdb"), read_only=True)
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "search", "usage")}  # type: ignore[index]
    con.close()
    assert counts["events"] == counts["search"] == n, counts
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory(prefix="corral-bench-rebuild-") as tmpdir:
        tmp = Path(tmpdir)
        server = EmbeddedServer(tmp / "nats", log_file=tmp / "nats.log").start()
        try:
            await publish_all(server.url, workload(n))
            raw_s = await raw_read(server.url, n)
            corral_s = await corral_rebuild(server.url, tmp, n)
        finally:
            server.stop()
    raw_rate, corral_rate = n / raw_s, n / corral_s
    print(f"raw ordered-consumer read (nats-py + orjson): {raw_rate:,.0f} events/s ({raw_s:.2f}s)")
    print(f"corral projections rebuild (every table):     {corral_rate:,.0f} events/s ({corral_s:.2f}s)")
    print(
        f"ratio corral/raw: {corral_rate / raw_rate:.2f}x   target >= 100,000 events/s   "
        f"[{datetime.now(UTC):%Y-%m-%d}, n={n:,}]"
    )
    print_result(
        "rebuild",
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
