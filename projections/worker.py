"""The projector's DuckDB work, in a process of its own.

The projector reads the log on the event loop of `corral up` (Python, per message) while DuckDB
applies the previous batch. In one process those two share the GIL: every time the applying
thread comes back from DuckDB or folds execution states in Python it waits for the reader to let
go, and measured on two cores an apply took 1.5-2x its time alone (bench/ingest.py,
docs/performance.md). So the connection, the appliers and their state cache live here, in a
child process; the projector writes each batch's NDJSON file itself and sends only its bounds
and state-changing subset over a pipe (`ApplyWorker`, `RemoteApplier`). Queries (`corral sql`)
are answered here too, on cursors of their own (below).

Protocol: pickled frames with an 8-byte length, requests on the child's stdin, replies on its
stdout, one request at a time. The child ends when its stdin closes (the projector stopped), and
is killed with the projector's process (PR_SET_PDEATHSIG): a batch in DuckDB's hands is then
rolled back, never half-applied, exactly as when one process was killed.

Queries (`corral sql`, projections/query.py) have a pipe pair of their own: requests carry an id,
up to QUERY_THREADS run at once, each on a cursor of its own of the live file's DuckDB instance,
and their answers come back in the order they finish. A slow query holds neither the apply pipe
nor another query (DuckDB releases the GIL while it executes). The instance has external access
off (only the batch directory is readable) and its configuration locked, set once the file is
attached (`_sandbox`).
"""

import contextlib
import itertools
import logging
import os
import pickle
import struct
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

from projections.batch import LANES, Gathered, Prepared, lane_row
from projections.errors import MAX_BYTES, DatabaseLocked, ProjectionError, QueryError, QueryRefused, QueryTimeout
from projections.spawn import Spawned, end_process, spawn

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
LIVE = "live"  # the name of the projector's own file in its worker
QUERY_THREADS = 8  # queries running at once in a worker; more wait for one of them
DEFAULT_QUERY_TIMEOUT_S = 10.0  # [sql] timeout (corral/config.py)
# [projector] memory_limit and threads (docs/config.md): DuckDB's memory (its buffer pool and the
# operators' state) in each instance of the worker; batches are cut at projector.BATCH_BYTES so an
# apply fits (a 50 MB batch of big output chunks did not fit in 256 MB, an 8-16 MB one does).
DEFAULT_SETTINGS: dict[str, str | int] = {"memory_limit": "256MiB"}
LISTING = "listing"  # a query's mode: its rows cut while read, not by a LIMIT (projections.query.run_query)
QUERY_ERRORS: dict[str, type[QueryError]] = {"sql": QueryError, "refused": QueryRefused, "timeout": QueryTimeout}


class WorkerFailed(ProjectionError):
    """The DuckDB worker process died or answered with an error."""


def _write(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


# --- the parent's side ---------------------------------------------------------------------------


class ApplyWorker:
    """A child process that owns a DuckDB file's connection and applies batches to it."""

    def __init__(
        self,
        database: Path,
        *,
        tmp_dir: Path,
        settings: dict[str, str | int] | None = None,
        spawned: Spawned | None = None,
    ) -> None:
        """Start the process (fast); `open()` then opens the file in it (blocking).

        `settings`: DuckDB settings of each file's instance ([projector] memory_limit, threads;
        corral/config.py), given before its configuration is locked.

        Create it on the thread that runs the event loop: the child is killed by the kernel when
        the thread that started it ends (PR_SET_PDEATHSIG), so a projector killed outright takes
        its DuckDB writer with it, as one process would (a batch in flight is rolled back)."""
        self.database = database
        self.tmp_dir = tmp_dir
        self.settings = dict(settings or DEFAULT_SETTINGS)
        self.positions: dict[str, int] = {}
        self._lock = threading.Lock()
        # the process, with its queries' own pipes (requests in, answers by id out): started here,
        # or early (projections/spawn.py) and handed over
        spawned = spawned or spawn(database)
        self._process = spawned.process
        requests_w, answers_r = spawned.query_requests, spawned.answers
        self._query_requests = os.fdopen(requests_w, "wb")
        self._query_lock = threading.Lock()  # one writer at a time on the requests pipe
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._answers = threading.Thread(
            target=self._read_answers, args=(os.fdopen(answers_r, "rb"),), name="projector-worker-answers", daemon=True
        )
        self._answers.start()

    def open(self, name: str = LIVE, database: Path | None = None) -> dict[str, int]:
        """Open a DuckDB file in the process as `name` and return its applied positions
        (blocking). "live" is the projector's file (`database`, given at start, by default)."""
        try:
            positions: dict[str, int] = self.call(
                ("open", name, str(database or self.database), str(self.tmp_dir), self.settings)
            )
        except BaseException:
            if name == LIVE:
                self.kill()
            raise
        if name == LIVE:
            self.positions = positions
            if database is not None:
                self.database = database
        return positions

    def release(self, name: str = LIVE, *, checkpoint: bool = True) -> None:
        """Close one file (checkpointed first, unless dropped); the process stays."""
        self.call(("release", name, checkpoint))

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def call(self, request: tuple[Any, ...], items: Any = None) -> Any:
        """Send one request and return its answer (blocking: run it in a thread from async code)."""
        with self._lock:
            process = self._process
            if process.stdin is None or process.stdout is None or process.poll() is not None:
                raise WorkerFailed(f"the projector's DuckDB worker (pid {process.pid}) is gone")
            try:
                _write(process.stdin, request)
                while True:
                    reply = _read(process.stdout)
                    if reply is None:
                        code = process.wait()
                        raise WorkerFailed(f"the projector's DuckDB worker (pid {process.pid}) exited with {code}")
                    if reply[0] == "items":  # some lines were not loaded: it records them as rejected
                        source = items[reply[1]] if isinstance(items, list) and reply[1] is not None else items
                        _write(process.stdin, list(source()) if source is not None else [])
                        continue
                    break
            except (BrokenPipeError, OSError) as exc:
                raise WorkerFailed(f"the projector's DuckDB worker (pid {process.pid}) is gone: {exc}") from None
        kind, value = reply
        if kind == "ok":
            return value
        if kind == "locked":
            raise DatabaseLocked(*value)
        raise WorkerFailed(value)

    def submit_query(
        self,
        sql: str,
        *,
        max_rows: int,
        max_bytes: int | None = None,
        timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
        listing: bool = False,
    ) -> "Future[dict[str, Any]]":
        """Send a query to the worker; its answer (or QueryError) comes in the future, while
        applies and other queries go on. Await it with `asyncio.wrap_future`.

        `listing` (`corral ps`): its rows are cut at `max_rows` while read, not by a LIMIT, which
        would make it wait for a checkpoint's merge of row groups (projections.query.run_query)."""
        return self._submit(sql, max_rows, max_bytes or MAX_BYTES, timeout_s, LISTING if listing else False)

    def submit_export(self, sql: str, *, timeout_s: float | None = None) -> "Future[dict[str, Any]]":
        """Have the worker write the rows of one SELECT to a Parquet file in its batch directory
        (`corral export`, operators only); the answer's "file" names it, for the caller to move."""
        return self._submit(sql, 1, 0, timeout_s, True)

    def submit_check(self, sql: str) -> "Future[dict[str, Any]]":
        """Have the worker check that `sql` is one query `corral sql` runs (projections/query.py):
        the future raises QueryRefused if not. Nothing runs."""
        return self._submit(sql, 0, 0, None, "check")

    def submit_snapshot(self, *, timeout_s: float | None = None) -> "Future[dict[str, Any]]":
        """Have the worker copy every table into a new DuckDB file in its batch directory
        (`corral snapshot`, operators only); the answer's "file" names it, for the caller to move."""
        return self._submit("SELECT 1", 1, 0, timeout_s, "snapshot")

    def _submit(
        self, sql: str, max_rows: int, max_bytes: int, timeout_s: float | None, export: bool | str
    ) -> "Future[dict[str, Any]]":
        future: Future[dict[str, Any]] = Future()
        with self._query_lock:
            if self._process.poll() is not None or self._query_requests.closed:
                raise WorkerFailed(f"the projector's DuckDB worker (pid {self._process.pid}) is gone")
            query_id = next(self._ids)
            self._pending[query_id] = future
            try:
                _write(self._query_requests, ("query", query_id, sql, max_rows, max_bytes, timeout_s, export))
            except (BrokenPipeError, OSError, ValueError) as exc:
                self._pending.pop(query_id, None)
                raise WorkerFailed(f"the projector's DuckDB worker (pid {self._process.pid}) is gone: {exc}") from None
        return future

    def query(
        self,
        sql: str,
        *,
        max_rows: int,
        max_bytes: int | None = None,
        timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Run a query and wait for its answer (blocking)."""
        return self.submit_query(sql, max_rows=max_rows, max_bytes=max_bytes, timeout_s=timeout_s).result()

    def _read_answers(self, answers: IO[bytes]) -> None:
        """The queries' answers, as they come, to their futures; all fail once the worker is gone."""
        try:
            while True:
                try:
                    answer = _read(answers)
                except (OSError, ValueError, EOFError, pickle.UnpicklingError):
                    answer = None
                if answer is None:
                    break
                query_id, kind, value = answer
                with self._query_lock:
                    future = self._pending.pop(query_id, None)
                if future is None:
                    continue
                if kind == "ok":
                    future.set_result(value)
                elif kind == "query":
                    error_kind, message = value
                    future.set_exception(QUERY_ERRORS.get(error_kind, QueryError)(message))
                else:
                    future.set_exception(WorkerFailed(value))
        finally:
            with contextlib.suppress(OSError):
                answers.close()
            with self._query_lock:
                pending, self._pending = self._pending, {}
            for future in pending.values():
                future.set_exception(WorkerFailed(f"the projector's DuckDB worker (pid {self._process.pid}) is gone"))

    def close(self, *, checkpoint: bool = True) -> None:
        """Checkpoint and close the file, and let the process end."""
        try:
            if self._process.poll() is None:
                self.call(("close", checkpoint))
        except WorkerFailed:
            pass
        finally:
            self.kill()

    def kill(self) -> None:
        with self._query_lock, contextlib.suppress(OSError):
            self._query_requests.close()
        end_process(self._process, 30)


class RemoteApplier:
    """One stream's applier in an ApplyWorker, used as the projector uses BatchApplier and OutputApplier."""

    def __init__(self, worker: ApplyWorker, stream: str, *, name: str = LIVE, position: int | None = None) -> None:
        self.worker = worker
        self.stream = stream
        self.name = name  # which of the worker's files
        self.position = worker.positions[stream] if position is None else position
        # the core log's lanes (projections/projector.py), each complete up to its own sequence
        known = worker.positions if position is None else {}
        self.lanes = {lane: known.get(lane_row(stream, lane), self.position) for lane in LANES}
        self.recount_output = False
        self._file = worker.tmp_dir / f"projector-{os.getpid()}-{id(self)}-{stream}.ndjson"

    def batch_file(self, index: int = 0) -> Path:
        """Where a batch's NDJSON lines are written for the worker (one apply at a time; the
        second of two lanes applied together: index 1)."""
        return self._file if index == 0 else self._file.with_name(f"{self._file.stem}-{index}.ndjson")

    def apply_batches(self, batches: list[Prepared]) -> int:
        """Batches of the core log's lanes (each with its lane set), in one transaction."""
        specs = [
            (str(b.file), b.first_seq, b.last_seq, b.count, b.lifecycle, (b.lane, b.through, b.idle_through))
            for b in batches
        ]
        request = ("apply_many", self.name, self.stream, specs, self.recount_output)
        applied, self.position, self.lanes = self.worker.call(request, items=[b.items for b in batches])
        return applied  # type: ignore[no-any-return]

    def lane_position(self, lane: str | None) -> int:
        return self.position if lane is None else self.lanes[lane]

    def apply_gathered(self, gathered: Gathered, *, derive: bool = True) -> int:
        if not gathered.items or gathered.last_seq <= self.position:
            return 0
        return self.apply_prepared(gathered.prepare(self._file), derive=derive)

    def apply_prepared(self, batch: Prepared, *, derive: bool = True) -> int:
        """Apply a batch whose NDJSON file is written (in the worker's batch directory)."""
        if batch.last_seq <= self.lane_position(batch.lane):
            return 0
        request: tuple[Any, ...] = (
            "apply",
            self.name,
            self.stream,
            str(batch.file),
            batch.first_seq,
            batch.last_seq,
            batch.count,
            batch.lifecycle,
            derive,
            self.recount_output,
        )
        if batch.lane is not None:
            request += ((batch.lane, batch.through, batch.idle_through),)
        applied, self.position, lanes = self.worker.call(request, items=batch.items)
        if lanes:
            self.lanes = lanes
        return applied  # type: ignore[no-any-return]

    def derive(self) -> None:
        self.worker.call(("derive", self.name, self.stream))

    def close(self) -> None:
        for path in (self._file, self.batch_file(1)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
