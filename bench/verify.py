"""What the projector's screening (projections/verify.py: duplicate ids, authority, orphans) costs.

The same log (N events: executions, output chunks, heartbeats, a few approvals) is applied to a
fresh DuckDB file in 60,000-event batches by the real BatchApplier, alternately with the screening
on (Corral) and switched off (the baseline: the applier as it was before), `--rounds` times each.
Prints events/s for both, the ratio and the screening's share, then one JSON line.

`--output`: the output stream's applier instead (CORRAL_OUTPUT under [retention]: N output chunks
applied by the OutputApplier), with its dedup by event id (output_ids) on and off.

    .venv/bin/python bench/verify.py [--events 300000] [--rounds 3] [--output]
"""

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

import projections.projector as projector_module
from bench.common import print_result
from events.envelope import new_event
from events.ids import new_execution_id, new_ulid
from events.types import (
    ApprovalGranted,
    ApprovalRequested,
    ExecutionRequested,
    ExecutionStarted,
    Heartbeat,
    Output,
)
from projections.appliers import BatchApplier, OutputApplier
from projections.batch import Gathered
from projections.database import open_database

BATCH = 60000


def make_log(count: int) -> list[tuple[int, str, bytes]]:
    rng = random.Random(1)
    log: list[tuple[int, str, bytes]] = []

    def add(execution_id: str, data: object, actor: str = "spawner-bench-1") -> None:
        event = new_event(execution_id, data, actor=actor)  # type: ignore[arg-type]
        log.append((len(log) + 1, event.subject, event.to_bytes()))

    executions = [new_execution_id() for _ in range(500)]
    for eid in executions:
        add(eid, ExecutionRequested(command=("agent",), repo="/r"), "cli")
        add(eid, ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/w"))
    n = 0
    while len(log) < count:
        eid = rng.choice(executions)
        n += 1
        if n % 5000 == 0:
            add(eid, ApprovalRequested(approval_id=f"ap{n}", question="ok?"), "approver-bench-1")
            grant = ApprovalGranted(approval_id=f"ap{n}", choice=None, note=None, decided_by="ann")
            add(eid, grant, "approver-bench-1")
        elif n % 3:
            add(eid, Output(stream="stdout", n=n, text=f"step {n}: compiling module {n % 97}\n"))
        else:
            add(eid, Heartbeat())
    return log[:count]


def _fresh_id(payload: bytes) -> bytes:
    """The same envelope under a new event id (a repeated chunk of make_log's would be a duplicate)."""
    event = orjson.loads(payload)
    event["id"] = new_ulid()
    return orjson.dumps(event)


def apply_all(log: list[tuple[int, str, bytes]], *, screen: bool) -> float:
    originals = projector_module.screen_batch, projector_module.screen_orphans
    if not screen:
        projector_module.screen_batch = lambda con, before, underived=None: set()  # type: ignore[assignment]
        projector_module.screen_orphans = lambda con, before: set()  # type: ignore[assignment]
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-verify-"))
    try:
        con = open_database(folder / "bench.duckdb")
        applier = BatchApplier(con, tmp_dir=folder / "tmp")
        started = time.perf_counter()
        for i in range(0, len(log), BATCH):
            applier.apply(log[i : i + BATCH])
        elapsed = time.perf_counter() - started
        applier.close()
        con.close()
        return elapsed
    finally:
        projector_module.screen_batch, projector_module.screen_orphans = originals
        shutil.rmtree(folder, ignore_errors=True)


def apply_output(log: list[tuple[int, str, bytes]], *, screen: bool) -> float:
    """The output chunks of `log` applied as CORRAL_OUTPUT's, with the dedup by event id or without."""
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-verify-"))
    try:
        con = open_database(folder / "bench.duckdb")
        BatchApplier(con, tmp_dir=folder / "tmp").close()  # the tables
        applier = OutputApplier(con, tmp_dir=folder / "tmp")
        applier.screen = screen
        chunks = [(n + 1, subject, payload) for n, (_, subject, payload) in enumerate(log)]
        started = time.perf_counter()
        for i in range(0, len(chunks), BATCH):
            gathered = Gathered()
            for seq, subject, payload in chunks[i : i + BATCH]:
                gathered.add(seq, subject.encode(), payload)
            applier.apply_gathered(gathered)
        elapsed = time.perf_counter() - started
        applier.close()
        con.close()
        return elapsed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", action="store_true", help="the output stream's applier and its dedup")
    args = parser.parse_args()
    log = make_log(args.events)
    apply = apply_all
    if args.output:
        outputs = [item for item in log if item[1].endswith(".output")]
        log = (outputs * (args.events // max(len(outputs), 1) + 1))[: args.events]
        log = [(seq, subject, _fresh_id(payload)) for seq, subject, payload in log]  # each chunk its own id
        apply = apply_output
    times: dict[str, list[float]] = {"baseline": [], "corral": []}
    apply(log[:BATCH], screen=True)  # warm-up
    for _ in range(args.rounds):
        for name in times:
            times[name].append(apply(log, screen=name == "corral"))
    base = args.events / statistics.median(times["baseline"])
    corral = args.events / statistics.median(times["corral"])
    what = "output chunks (CORRAL_OUTPUT's applier)" if args.output else "events"
    print(f"apply of {args.events:,} {what} in {BATCH:,}-event batches, median of {args.rounds} alternating rounds")
    print(f"baseline (no screening) {base:>10,.0f} events/s")
    print(f"corral (screened)       {corral:>10,.0f} events/s   ratio {corral / base:.2f}x")
    cost = 1 - corral / base
    print(f"screening costs {cost:.1%} of apply throughput (target <= 10%: {'met' if cost <= 0.10 else 'NOT met'})")
    print_result(
        "verify-output" if args.output else "verify",
        "events_per_s",
        corral,
        "baseline_per_s",
        base,
        ratio=corral / base,
        target="the screening costs <= 10% of apply throughput",
        met=cost <= 0.10,
        events=args.events,
        rounds=args.rounds,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
