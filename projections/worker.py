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
import ctypes
import itertools
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import duckdb

from projections.batch import LANES, Gathered, Prepared, lane_row
from projections.errors import DatabaseLocked, ProjectionError, QueryError, QueryRefused, QueryTimeout
from projections.query import (
    INTERRUPT_EVERY_S,
    MAX_BYTES,
    check_statement,
    run_export,
    run_query,
    run_snapshot,
    timeout_message,
)

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
LIVE = "live"  # the name of the projector's own file in its worker
QUERY_THREADS = 8  # queries running at once in a worker; more wait for one of them
DEFAULT_QUERY_TIMEOUT_S = 10.0  # [sql] timeout (corral/config.py)
# [projector] memory_limit and threads (docs/config.md): DuckDB's memory (its buffer pool and the
# operators' state) in each instance of the worker; batches are cut at projector.BATCH_BYTES so an
# apply fits (a 50 MB batch of big output chunks did not fit in 256 MB, an 8-16 MB one does).
DEFAULT_SETTINGS: dict[str, str | int] = {"memory_limit": "256MiB"}
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

    def __init__(self, database: Path, *, tmp_dir: Path, settings: dict[str, str | int] | None = None) -> None:
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
        # the queries' own pipes: requests in, answers (by id) out
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "projections.worker",
                    str(os.getpid()),
                    str(database),
                    str(requests_r),
                    str(answers_w),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(requests_r, answers_w),
                process_group=0,  # a Ctrl-C at the terminal is the Corral process's to handle, not the worker's
            )
        except BaseException:
            os.close(requests_w)
            os.close(answers_r)
            raise
        finally:
            os.close(requests_r)
            os.close(answers_w)
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
    ) -> "Future[dict[str, Any]]":
        """Send a query to the worker; its answer (or QueryError) comes in the future, while
        applies and other queries go on. Await it with `asyncio.wrap_future`."""
        return self._submit(sql, max_rows, max_bytes or MAX_BYTES, timeout_s, False)

    def submit_export(self, sql: str, *, timeout_s: float | None = None) -> "Future[dict[str, Any]]":
        """Have the worker write the rows of one SELECT to a Parquet file in its batch directory
        (`corral export`, operators only); the answer's "file" names it, for the caller to move."""
        return self._submit(sql, 1, 0, timeout_s, True)

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
        process = self._process
        with self._query_lock, contextlib.suppress(OSError):
            self._query_requests.close()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


# --- the child's side ----------------------------------------------------------------------------


def _sandbox(
    con: duckdb.DuckDBPyConnection, path: Path, tmp_dir: Path, settings: dict[str, str | int] | None = None
) -> None:
    """Close the DuckDB instance to the outside, for the queries on its cursors (`corral sql`):
    no file read or written but the batch files in `tmp_dir` (read_json of the apply path) and
    what DuckDB keeps open to itself (the attached file, its WAL, its spill directory, here in
    `tmp_dir` instead of `.tmp` in the current directory); no ATTACH, COPY, extension installed or
    loaded, and no setting changed any more. The file itself is attached already."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    allowed = {str(tmp_dir.absolute()) + os.sep, str(tmp_dir.resolve()) + os.sep}
    listed = ", ".join(_literal(d) for d in sorted(allowed))
    con.execute("SET GLOBAL TimeZone = 'UTC'")  # every cursor's, as the connection's own
    con.execute(f"SET temp_directory = {_literal(str(tmp_dir.absolute() / ('duckdb-' + path.name)))}")
    for name, value in (settings or DEFAULT_SETTINGS).items():  # memory_limit, threads ([projector])
        if name not in ("memory_limit", "threads"):
            raise ValueError(f"not a projector setting: {name!r}")
        shown = str(int(value)) if name == "threads" else _literal(str(value))
        con.execute(f"SET GLOBAL {name} = {shown}")
    con.execute(f"SET allowed_directories = [{listed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _Database:
    """One open DuckDB file of the worker: its connection and one applier per stream."""

    def __init__(self, path: Path, tmp_dir: Path, settings: dict[str, str | int] | None = None) -> None:
        from projections.appliers import BatchApplier, OutputApplier
        from projections.database import open_database

        self.con = open_database(path)
        try:
            _sandbox(self.con, path, tmp_dir, settings)
        except BaseException:
            self.con.close()
            raise
        self.query_root = self.con.cursor()  # queries' cursors are made from this one, not the apply connection
        self.tmp_dir = tmp_dir
        core = BatchApplier(self.con, tmp_dir=tmp_dir)
        output = OutputApplier(self.con, tmp_dir=tmp_dir)
        self.appliers: dict[str, Any] = {core.stream: core, output.stream: output}

    def close(self, *, checkpoint: bool) -> None:
        if checkpoint:
            self.con.execute("CHECKPOINT")
        for applier in self.appliers.values():
            applier.close()
        self.con.close()


class _Live:
    """The live file as the query threads see it: taken away (its queries interrupted and
    waited for) before it is closed, and given back when it opens again (a rebuild's swap); a
    query meanwhile waits for it, and an interrupted one runs again on the new file."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._database: _Database | None = None
        self._tmp_dir = Path()
        self._running: set[duckdb.DuckDBPyConnection] = set()
        self._dropped: set[duckdb.DuckDBPyConnection] = set()

    def give(self, database: _Database) -> None:
        with self._changed:
            self._database = database
            self._tmp_dir = database.tmp_dir
            self._changed.notify_all()

    def take_away(self) -> None:
        with self._changed:
            self._database = None
            while self._running:  # DuckDB forgets an interrupt between two statements: again until done
                for cursor in self._running:
                    self._dropped.add(cursor)
                    cursor.interrupt()
                self._changed.wait(INTERRUPT_EVERY_S)

    def _cursor(self, deadline: float) -> duckdb.DuckDBPyConnection:
        from projections.database import cursor

        with self._changed:
            while self._database is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueryTimeout("the projections were not open within the query's time; try again")
                self._changed.wait(remaining)
            query_cursor = cursor(self._database.query_root)
            self._running.add(query_cursor)
            return query_cursor

    def _done(self, query_cursor: duckdb.DuckDBPyConnection) -> bool:
        """Close a query's cursor; True if the file was taken away under it."""
        with self._changed:
            self._running.discard(query_cursor)
            dropped = query_cursor in self._dropped
            self._dropped.discard(query_cursor)
            with contextlib.suppress(duckdb.Error):
                query_cursor.close()
            self._changed.notify_all()
            return dropped

    def query(
        self, sql: str, max_rows: int, max_bytes: int, timeout_s: float | None, export: bool | str = False
    ) -> dict[str, Any]:
        for attempt in range(QUERY_OOM_RETRIES + 1):
            try:
                return self._query(sql, max_rows, max_bytes, timeout_s, export)
            except QueryTimeout:
                raise QueryTimeout(timeout_message(timeout_s)) from None
            except QueryError as exc:
                # out of [projector] memory_limit while an apply (a flood's output) held most of it:
                # a moment later it has let go (`corral ps` during floods, issue 20)
                if (
                    type(exc) is not QueryError
                    or not str(exc).startswith("Out of Memory")
                    or attempt == QUERY_OOM_RETRIES
                ):
                    raise
                time.sleep(QUERY_OOM_PAUSE_S * (attempt + 1))
        raise AssertionError("unreachable")

    def _query(
        self, sql: str, max_rows: int, max_bytes: int, timeout_s: float | None, export: bool | str
    ) -> dict[str, Any]:
        check_statement(sql)  # refused at once, whether the file is open or not
        started = time.monotonic()
        deadline = started + (timeout_s or 3600.0)
        while True:
            query_cursor = self._cursor(deadline)
            try:
                left = None if timeout_s is None else max(0.001, deadline - time.monotonic())
                if export == "snapshot":
                    file = self._tmp_dir / f"snapshot-{os.getpid()}-{uuid.uuid4().hex}.duckdb"
                    result = {**run_snapshot(query_cursor, file), "file": str(file)}
                elif export:
                    file = self._tmp_dir / f"export-{os.getpid()}-{uuid.uuid4().hex}.parquet"
                    result = {**run_export(query_cursor, sql, file, timeout_s=left), "file": str(file)}
                else:
                    result = run_query(query_cursor, sql, max_rows=max_rows, max_bytes=max_bytes, timeout_s=left)
            except BaseException as exc:
                if self._done(query_cursor) and isinstance(exc, QueryError):
                    continue  # the file was swapped under it (a rebuild): again, on the new one
                raise
            self._done(query_cursor)
            return result


def _serve_queries(inp: IO[bytes], out: IO[bytes], live: _Live) -> None:
    """Read query requests and answer each from one of QUERY_THREADS threads, as it finishes."""
    jobs: queue.Queue[tuple[Any, ...]] = queue.Queue()
    writing = threading.Lock()
    counting = threading.Lock()
    threads = {"started": 0, "idle": 0}  # started as queries come, up to QUERY_THREADS

    def work() -> None:
        while True:
            with counting:
                threads["idle"] += 1
            request = jobs.get()
            with counting:
                threads["idle"] -= 1
            try:
                _, sql, max_rows, max_bytes, timeout_s, export = request  # export: a Parquet file
                reply: tuple[str, Any] = ("ok", live.query(sql, max_rows, max_bytes, timeout_s, export))
            except QueryError as exc:
                reply = ("query", (exc.kind, str(exc)))
            except Exception as exc:
                log.exception("projector worker: a query failed")
                reply = ("error", f"{type(exc).__name__}: {exc}")
            try:
                with writing:
                    try:
                        _write(out, (request[0], *reply))
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # before a byte was written
                        _write(out, (request[0], "error", f"the answer could not be sent: {exc}"))
            except (OSError, ValueError):
                return  # the projector is gone

    while True:
        try:
            request = _read(inp)
        except (OSError, ValueError):
            request = None
        if request is None:
            return
        with counting:
            if threads["idle"] == 0 and threads["started"] < QUERY_THREADS:
                threading.Thread(target=work, name=f"query-{threads['started']}", daemon=True).start()
                threads["started"] += 1
        jobs.put(tuple(request[1:]))  # (id, sql, max_rows, max_bytes, timeout_s, export)


QUERY_OOM_RETRIES = 5  # a query that ran out of memory_limit beside an apply is run again
QUERY_OOM_PAUSE_S = 0.05
OOM_RETRIES = 3  # an apply that ran out of [projector] memory_limit (queries beside it) is tried again
OOM_PAUSE_S = 0.5


def _apply_retrying(applier: Any, batch: Prepared | list[Prepared], derive: bool) -> int:
    """Apply a batch (or a list, in one transaction); if DuckDB ran out of its memory_limit (queries
    running beside the apply share it), the transaction was rolled back: wait a moment and apply it
    again, a few times."""
    for attempt in range(OOM_RETRIES + 1):
        try:
            if isinstance(batch, list):
                return int(applier.apply_batches(batch, derive=derive))
            return int(applier.apply_prepared(batch, derive=derive))
        except duckdb.OutOfMemoryException as exc:
            if attempt == OOM_RETRIES:
                raise
            log.warning("an apply ran out of memory ([projector] memory_limit); again in %gs: %s", OOM_PAUSE_S, exc)
            time.sleep(OOM_PAUSE_S * (attempt + 1))
    raise AssertionError("unreachable")


def _positions(database: _Database) -> dict[str, int]:
    """Each stream's applied position, and each lane's of the core log (`CORRAL/other`, ...)."""
    positions = {stream: a.position for stream, a in database.appliers.items()}
    for stream, applier in database.appliers.items():
        for lane, seq in getattr(applier, "lanes", {}).items():
            positions[lane_row(stream, lane)] = seq
    return positions


def _serve(inp: IO[bytes], out: IO[bytes], live: _Live | None = None) -> None:
    live = live or _Live()
    # "live" is the projector's file; "rebuild" a new one `corral projections rebuild` fills
    databases: dict[str, _Database] = {}
    while True:
        request = _read(inp)
        if request is None:
            break
        op = request[0]
        try:
            if op == "open":
                _, name, path, tmp_dir, *rest = request  # rest: the DuckDB settings, if given
                if name in databases:
                    raise RuntimeError(f"a DuckDB file is open already as {name!r}")
                database = databases[name] = _Database(Path(path), Path(tmp_dir), rest[0] if rest else None)
                if name == LIVE:
                    live.give(database)
                reply: tuple[str, Any] = ("ok", _positions(database))
            elif op == "apply":
                _, name, stream, file, first, last, count, lifecycle, derive, recount, *lanes = request
                applier = databases[name].appliers[stream]
                if hasattr(applier, "recount_output"):
                    applier.recount_output = recount

                def items() -> Sequence[tuple[int, bytes, bytes]]:
                    _write(out, ("items", None))
                    return _read(inp) or []

                batch = Prepared(Path(file), first, last, count, lifecycle, items)
                if lanes:  # a lane of the core log (projections/projector.py): which, and how far
                    batch.lane, batch.through, batch.idle_through = lanes[0]
                applied = _apply_retrying(applier, batch, derive)
                reply = ("ok", (applied, applier.position, dict(getattr(applier, "lanes", {}))))
            elif op == "apply_many":  # batches of the core log's lanes, in one transaction
                _, name, stream, specs, recount = request
                applier = databases[name].appliers[stream]
                applier.recount_output = recount
                batches = []
                for index, (file, first, last, count, lifecycle, lane_spec) in enumerate(specs):

                    def indexed(index: int = index) -> Sequence[tuple[int, bytes, bytes]]:
                        _write(out, ("items", index))
                        return _read(inp) or []

                    batch = Prepared(Path(file), first, last, count, lifecycle, indexed)
                    batch.lane, batch.through, batch.idle_through = lane_spec
                    batches.append(batch)
                applied = _apply_retrying(applier, batches, True)
                reply = ("ok", (applied, applier.position, dict(applier.lanes)))
            elif op == "derive":
                databases[request[1]].appliers[request[2]].derive()
                reply = ("ok", None)
            elif op == "release":  # close one file (checkpointed, or dropped as it is)
                _, name, checkpoint = request
                if name == LIVE:
                    live.take_away()
                released = databases.pop(name, None)
                if released is not None:
                    released.close(checkpoint=checkpoint)
                reply = ("ok", None)
            elif op == "close":
                live.take_away()
                for database in databases.values():
                    database.close(checkpoint=request[1])
                databases = {}
                _write(out, ("ok", None))
                break
            else:
                reply = ("error", f"unknown request {op!r}")
        except DatabaseLocked as exc:
            reply = ("locked", (exc.path, exc.detail))
        except Exception as exc:
            log.exception("projector worker: %s failed", op)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _write(out, reply)
    live.take_away()
    for database in databases.values():
        database.close(checkpoint=False)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the projector's process (its starting thread) ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends this process once its batch is done
    if os.getppid() != parent:
        os._exit(1)  # the projector died before the line above


def main() -> None:
    # argv: the projector's pid, the DuckDB file (shown by `ps`; opened when asked), and the
    # queries' pipes (requests in, answers out)
    _die_with_parent(int(sys.argv[1]))
    logging.basicConfig(level=logging.WARNING, format="corral projector worker: %(message)s", stream=sys.stderr)
    # Ctrl-C in a terminal reaches the whole process group: the projector decides when this ends
    # (it closes the pipe), so a batch in DuckDB's hands is not cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not break the protocol
    live = _Live()
    if len(sys.argv) > 4:
        queries = threading.Thread(
            target=_serve_queries,
            args=(os.fdopen(int(sys.argv[3]), "rb"), os.fdopen(int(sys.argv[4]), "wb"), live),
            name="queries",
            daemon=True,
        )
        queries.start()
    with contextlib.suppress(BrokenPipeError):  # the projector is gone: committed stays, the rest rolled back
        _serve(inp, out, live)


if __name__ == "__main__":
    main()
