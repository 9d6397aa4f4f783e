"""The projector's DuckDB worker process (projections/worker.py), against real DuckDB files."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import OUTPUT_STREAM, STREAM
from events.types import ExecutionRequested, ExecutionStarted, Output
from projections.batch import Gathered
from projections.errors import DatabaseLocked, QueryError, QueryRefused
from projections.worker import ApplyWorker, RemoteApplier
from tests.conftest import ROOT


def _batch(first_seq: int) -> tuple[Gathered, str]:
    eid = new_execution_id()
    gathered = Gathered()
    seq = first_seq
    for data in (
        ExecutionRequested(command=("agent",), repo="/tmp/r"),
        ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/tmp"),
        Output(stream="stdout", n=0, text="hello\n"),
    ):
        event = new_event(eid, data, actor="test")
        gathered.add(seq, event.subject.encode(), event.to_bytes())
        seq += 1
    gathered.add(seq, f"corral.evt.{eid}.output".encode(), b"not json at all")
    gathered.add(seq + 1, f"corral.evt.{eid}.output".encode(), b'{"id": broken')
    return gathered, eid


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    """The process has ended: every thread of it (a zombie leader alone may still have threads
    closing its files, the DuckDB lock among them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return True
        states = []
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    states.append(stat.read().rsplit(") ", 1)[1][:1])
            except (FileNotFoundError, ProcessLookupError):
                continue
        if all(state in "ZX" for state in states):
            return True
        time.sleep(0.05)
    return False


def test_worker_applies_records_rejects_and_answers_queries(tmp_path: Path) -> None:
    worker = ApplyWorker(tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t")
    worker.open()
    try:
        core = RemoteApplier(worker, STREAM)
        assert core.position == 0 and RemoteApplier(worker, OUTPUT_STREAM).position == 0
        gathered, eid = _batch(1)
        assert core.apply_gathered(gathered) == 5
        assert core.position == 5
        again, _ = _batch(1)
        assert core.apply_gathered(again) == 0  # at or below the position: skipped, not applied twice
        rows = worker.query("SELECT seq, subject FROM rejected_events ORDER BY seq", max_rows=10)["rows"]
        assert rows == [[4, f"corral.evt.{eid}.output"], [5, f"corral.evt.{eid}.output"]]
        state = worker.query("SELECT state, output_chunks FROM executions", max_rows=10)["rows"]
        assert state == [["running", 1]]
        with pytest.raises(QueryError, match="does_not_exist"):
            worker.query("SELECT * FROM does_not_exist", max_rows=10)
        with pytest.raises(QueryRefused, match="DELETE statement is refused"):
            worker.query("DELETE FROM events", max_rows=10)  # refused before anything runs
        assert worker.query("SELECT count(*) FROM events", max_rows=10)["rows"] == [[3]]
    finally:
        worker.close()
    assert _gone(worker.pid)
    con = duckdb.connect(str(tmp_path / "corral.duckdb"), read_only=True)  # closed and checkpointed
    assert con.execute("SELECT max(seq) FROM events").fetchone() == (3,)
    con.close()


def test_second_worker_on_the_same_file_is_refused_and_leaves_no_process(tmp_path: Path) -> None:
    worker = ApplyWorker(tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t")
    worker.open()
    try:
        second = ApplyWorker(tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t")
        with pytest.raises(DatabaseLocked, match="held by another process"):
            second.open()
        assert _gone(second.pid)
    finally:
        worker.close()


PARENT = """
import sys, time
from pathlib import Path
from projections.worker import ApplyWorker
worker = ApplyWorker(Path(sys.argv[1]), tmp_dir=Path(sys.argv[2]))
worker.open()
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_worker_ends_when_its_projector_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "corral.duckdb"), str(tmp_path / "t")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not _gone(pid, timeout_s=0.2)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _gone(pid), "the worker outlived its projector"
    finally:
        if parent.poll() is None:
            parent.kill()
    con = duckdb.connect(str(tmp_path / "corral.duckdb"))  # the lock went with it
    assert con.execute("SELECT count(*) FROM events").fetchone() == (0,)
    con.close()


def test_worker_takes_the_projector_settings_and_applies_big_batches_within_them(tmp_path: Path) -> None:
    """[projector] memory_limit / threads are set in the worker's DuckDB instance (and cannot be
    changed by a query); output chunks of 50 KB, cut at BATCH_BYTES as the projector cuts them,
    apply under a 128 MB limit."""
    from projections.projector import BATCH_BYTES

    worker = ApplyWorker(
        tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t", settings={"memory_limit": "128MiB", "threads": 1}
    )
    worker.open()
    try:
        shown = worker.query("SELECT current_setting('memory_limit'), current_setting('threads')", max_rows=1)
        assert shown["rows"] == [["128.0 MiB", 1]]
        with pytest.raises(QueryError):
            worker.query("SET memory_limit = '8GB'", max_rows=1)
        core = RemoteApplier(worker, STREAM)
        eid = new_execution_id()
        text = "x" * 50_000 + "\n"
        batches, gathered = [], Gathered()
        for n in range(600):  # 30 MB of output, stream sequences 1..600
            event = new_event(eid, Output(stream="stdout", n=n, text=text), actor="test")
            gathered.add(n + 1, event.subject.encode(), event.to_bytes())
            if gathered.size >= BATCH_BYTES:
                batches.append(gathered)
                gathered = Gathered()
        batches.append(gathered)
        assert len(batches) > 3 and all(b.size < BATCH_BYTES + 60_000 for b in batches)
        for batch in batches:
            core.apply_gathered(batch)
        assert core.position == 600
        rows = worker.query("SELECT count(*), sum(strlen(text)) FROM output", max_rows=1)["rows"]
        assert rows == [[600, 600 * len(text)]]
    finally:
        worker.close()


def test_the_worker_ends_itself_once_duckdb_invalidated_its_database() -> None:
    """After a failed checkpoint DuckDB fails every statement on the file ("has been invalidated"):
    the worker process ends on the first such error (the projector replaces it), and on no other."""
    script = (
        "import duckdb\n"
        "from projections.worker_process import _end_if_invalidated\n"
        "_end_if_invalidated(duckdb.IOException('Catalog Error: no such table'))\n"
        "print('still here', flush=True)\n"
        "try:\n"
        "    raise duckdb.IOException('IO Error: Database corral has been invalidated: checkpointing failed')\n"
        "except duckdb.IOException as cause:\n"
        "    try:\n"
        "        raise RuntimeError('the apply failed') from cause\n"
        "    except RuntimeError as exc:\n"
        "        _end_if_invalidated(exc)\n"
        "print('not reached', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout == "still here\n", done.stderr
    assert done.returncode == 70, done.stderr
    assert "DuckDB invalidated the database" in done.stderr


def test_a_listing_is_answered_while_a_checkpoint_merges_row_groups(tmp_path: Path) -> None:
    """`corral ps` during output floods (issue 20 §5): most applies end in a checkpoint that merges
    the output table's row groups, and a query with a LIMIT (DuckDB's top-N) on a table the applies
    changed waits for such a checkpoint to end. A listing (`submit_query(listing=True)`, its rows
    cut while read) is answered beside it. Each checkpoint pauses here (DuckDB's debug setting)
    so it lasts: a query with a LIMIT asked meanwhile is still waiting while listings asked after
    it are answered, one after another."""
    from projections.projector import BATCH_BYTES

    worker = ApplyWorker(
        tmp_path / "corral.duckdb",
        tmp_dir=tmp_path / "t",
        settings={"memory_limit": "256MiB", "debug_checkpoint_scan_sleep_ms": 300},
    )
    worker.open()
    try:
        core = RemoteApplier(worker, STREAM)
        gathered, eid = _batch(1)  # an execution, running: its output counters move with each apply
        core.apply_gathered(gathered)
        text = "y" * 60_000 + "\n"
        seq = core.position
        listing = "SELECT execution_id, state, output_bytes FROM executions ORDER BY requested_at DESC"
        applying: list[object] = []
        enough = threading.Event()  # seen: no more batches needed (a loaded machine may need more than 6)

        def apply_output() -> None:  # batches as the projector cuts them: a checkpoint every ~2 (WAL)
            nonlocal seq
            for _ in range(30):
                if enough.is_set():
                    break
                batch = Gathered()
                while batch.size < BATCH_BYTES:
                    seq += 1
                    event = new_event(eid, Output(stream="stdout", n=seq, text=text), actor="test")
                    batch.add(seq, event.subject.encode(), event.to_bytes())
                core.apply_gathered(batch)
            applying.append("done")

        thread = threading.Thread(target=apply_output)
        thread.start()
        answered_beside = 0
        try:
            while not applying and answered_beside < 5:
                held = worker.submit_query(f"{listing} LIMIT 5", max_rows=10)  # a LIMIT: waits for a merge
                in_a_row = 0
                while not held.done() and not applying:
                    rows = worker.submit_query(listing, max_rows=10, listing=True).result(timeout=60)["rows"]
                    assert rows and rows[0][0] == eid
                    if not held.done():
                        in_a_row += 1
                answered_beside = max(answered_beside, in_a_row)
                held.result(timeout=60)
        finally:
            enough.set()
            thread.join()
        # listings kept being answered, one after another, while a query asked before them waited
        assert answered_beside >= 5, answered_beside
        assert worker.query("SELECT count(*) FROM output", max_rows=1)["rows"][0][0] == seq - 4  # 1 + the flood
    finally:
        worker.close()
