"""Search benchmark: `corral search` over 1M output rows, beside plain ILIKE on the same file.

A DuckDB file is projected by Corral's real BatchApplier (the projector's code, without NATS)
from a synthetic log: N output chunks of realistic agent output (~180 bytes, several lines)
across executions, with their lifecycle events. Then each query runs the SQL `corral search`
sends to the projector (projections.query.run_query on the same connection), and the baseline
runs, in the same process on the same file, what an analyst would type without Corral's
search table: `text ILIKE '%needle%'` (or `regexp_matches(text, ...)` for a regex) over the raw
output table, newest first, same LIMIT. `corral search --regex` also searches the payloads of
the other events, which the baseline does not. Figures are the median of R runs, warm; the
ratio is baseline / Corral (above 1: Corral is faster). Ends with one JSON line (headline: the
rare regex; target: >= 1.0x the baseline and every query <= 150 ms).

    .venv/bin/python bench/search.py [--rows 1000000] [--repeat 7] [--keep FILE | --db FILE]

--db reuses a file written by --keep (copied, then searched) instead of projecting again.
"""

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from bench.common import print_result
from corral.history import search
from events.envelope import new_event
from events.ids import new_execution_id, new_ulid
from events.subjects import event_subject
from events.types import ExecutionExited, ExecutionRequested, ExecutionStarted
from projections.appliers import BatchApplier
from projections.database import open_database
from projections.query import run_query

WORDS = [
    "edited",
    "src/module",
    "tests",
    "passed",
    "failed",
    "running",
    "pytest",
    "import",
    "error",
    "warning",
    "refactor",
    "function",
    "class",
    "parser",
    "config",
    "handler",
    "request",
    "response",
    "cache",
    "index",
    "build",
    "compile",
    "lint",
    "format",
    "deploy",
    "retry",
    "timeout",
]
CHUNKS_PER_EXECUTION = 200
BATCH = 50000


def synthetic_log(rows: int, rng: random.Random) -> list[tuple[int, str, bytes]]:
    """(seq, subject, payload) like the stream delivers them: per execution a request, a start,
    output chunks and an exit; a rare marker (`Traceback ... ZeroDivisionError`) in ~0.1% of chunks."""
    log: list[tuple[int, str, bytes]] = []
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    seq = 0
    done = 0
    while done < rows:
        eid = new_execution_id()
        base = t0 + timedelta(seconds=seq)
        head = [
            ExecutionRequested(command=("agent", f"task {eid}"), repo="/srv/repo", task=f"task {eid}"),
            ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/w"),
        ]
        for data in head:
            seq += 1
            event = new_event(eid, data, actor="bench", ts=base)
            log.append((seq, event.subject, event.to_bytes()))
        subject = event_subject(eid, "output")
        count = min(CHUNKS_PER_EXECUTION, rows - done)
        for n in range(1, count + 1):
            lines = [
                f"step {n}: {' '.join(rng.choices(WORDS, k=6))} src/module_{rng.randrange(1000)}.py (+{n % 7} -1)",
                f"  {rng.randrange(400)} tests passed, {rng.randrange(3)} failed in {rng.random():.2f}s",
            ]
            if rng.random() < 0.001:
                lines.append("Traceback (most recent call last): ZeroDivisionError: division by zero")
            text = "\n".join(lines) + "\n"
            seq += 1
            payload = {
                "id": new_ulid(),
                "type": "output",
                "execution_id": eid,
                "ts": (base + timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z"),
                "actor": "bench",
                "causation_id": None,
                "correlation_id": eid,
                "v": 1,
                "data": {"stream": "stdout", "n": n, "text": text},
            }
            log.append((seq, subject, orjson.dumps(payload)))
        done += count
        seq += 1
        event = new_event(eid, ExecutionExited(exit_code=0, duration_s=1.0), actor="bench", ts=base)
        log.append((seq, event.subject, event.to_bytes()))
    return log


def timed(con, run, repeat: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    async def fetch(sql: str) -> list[dict]:
        result = run_query(con, sql)
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    times = []
    hits = 0
    for _ in range(repeat):
        start = time.perf_counter()
        hits = len(asyncio.run(run(fetch)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, hits


def baseline_sql(needle: str, limit: int, *, regex: bool = False) -> str:
    quoted = "'" + needle.replace("'", "''") + "'"
    match = f"regexp_matches(text, {quoted})" if regex else f"text ILIKE '%' || {quoted} || '%'"
    return (
        f"SELECT seq, execution_id, ts, 'output' AS type, text FROM output WHERE {match} "
        f"ORDER BY seq DESC LIMIT {limit}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--keep", type=Path, help="also copy the projected DuckDB file here")
    parser.add_argument("--db", type=Path, help="search a copy of this projected file (from --keep) instead")
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="corral-bench-search-") as tmpdir:
        tmp = Path(tmpdir)
        start = time.perf_counter()
        if args.db:
            shutil.copyfile(args.db, tmp / "corral.duckdb")
            con = open_database(tmp / "corral.duckdb")
        else:
            log = synthetic_log(args.rows, rng)
            con = open_database(tmp / "corral.duckdb")
            applier = BatchApplier(con, tmp_dir=tmp / "t")
            for i in range(0, len(log), BATCH):
                applier.apply(log[i : i + BATCH])
            applier.close()
            del log
            con.execute("CHECKPOINT")
        if args.keep:
            shutil.copyfile(tmp / "corral.duckdb", args.keep)
        output_rows = con.execute("SELECT count(*) FROM output").fetchone()[0]  # type: ignore[index]
        avg = con.execute("SELECT avg(strlen(text)) FROM output").fetchone()[0]  # type: ignore[index]
        print(f"projected {output_rows:,} output rows (avg {avg:.0f} bytes) in {time.perf_counter() - start:.1f}s")
        cases = [
            ("rare text (no hit: full scan)", "NoSuchNeedle42", False, None),
            ("rare text (~0.1% of rows)", "zerodivisionerror", False, None),
            ("common text", "Tests Passed", False, None),
            ("rare text, --type output", "zerodivisionerror", False, "output"),
            ("regex (rare)", r"Zero\w+Error", True, None),
            ("regex (no hit: full scan)", r"NoSuch\w+Needle", True, None),
        ]
        print(f"{'query':34} {'corral':>10} {'baseline':>10} {'ratio':>7}  hits")
        corral_total = baseline_total = 0.0
        figures: dict[str, dict[str, float]] = {}
        for label, needle, regex, event_type in cases:

            def corral(fetch, needle=needle, regex=regex, event_type=event_type):  # type: ignore[no-untyped-def]
                return search(
                    fetch, needle, regex=regex, execution_id=None, event_type=event_type, since=None, limit=args.limit
                )

            def baseline(fetch, needle=needle, regex=regex):  # type: ignore[no-untyped-def]
                return fetch(baseline_sql(needle, args.limit, regex=regex))

            corral_ms, hits = timed(con, corral, args.repeat)
            base_ms, base_hits = timed(con, baseline, args.repeat)
            corral_total += corral_ms
            baseline_total += base_ms
            figures[label] = {"corral_ms": corral_ms, "baseline_ms": base_ms}
            print(f"{label:34} {corral_ms:8.1f}ms {base_ms:8.1f}ms {base_ms / corral_ms:6.2f}x  {hits}/{base_hits}")
        con.close()
    print(
        f"total: corral {corral_total:.1f} ms, baseline (ILIKE / regexp_matches on output) {baseline_total:.1f} ms, "
        f"speed-up {baseline_total / corral_total:.2f}x   [{datetime.now(UTC):%Y-%m-%d}, rows={output_rows:,}, "
        f"target <= 150 ms per query]"
    )
    regex_ms, regex_base = figures["regex (rare)"]["corral_ms"], figures["regex (rare)"]["baseline_ms"]
    slowest = max(f["corral_ms"] for f in figures.values())
    print_result(
        "search",
        "regex_ms",
        regex_ms,
        "baseline_regex_ms",
        regex_base,
        ratio=regex_base / regex_ms,
        target="regex (rare) >= 1.0x regexp_matches on output; every query <= 150 ms",
        met=regex_base / regex_ms >= 1.0 and slowest <= 150,
        max_ms=slowest,
        total_ms=corral_total,
        baseline_total_ms=baseline_total,
        rows=output_rows,
        queries=figures,
    )


if __name__ == "__main__":
    main()
