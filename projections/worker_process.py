"""The projector's DuckDB worker process: its side of projections/worker.py's protocol.

`python -m projections.worker_process PARENT_PID DATABASE QUERY_REQUESTS_FD QUERY_ANSWERS_FD`, started
by `ApplyWorker` (projections/worker.py, which says what the process is for and how the two talk).
This module is the one that imports DuckDB: the projector's own process (`corral up`, `corral
run`) does not, so its start is not held up by it.
"""

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import duckdb

from projections.batch import Prepared, lane_row
from projections.errors import DatabaseLocked, QueryError, QueryTimeout
from projections.query import (
    INTERRUPT_EVERY_S,
    check_statement,
    run_export,
    run_query,
    run_snapshot,
    timeout_message,
)
from projections.worker import DEFAULT_SETTINGS, LISTING, LIVE, QUERY_THREADS, _read, _write

log = logging.getLogger(__name__)


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
        if name not in ("memory_limit", "threads", CHECKPOINT_PAUSE):
            raise ValueError(f"not a projector setting: {name!r}")
        shown = str(int(value)) if name in ("threads", CHECKPOINT_PAUSE) else _literal(str(value))
        con.execute(f"SET GLOBAL {name} = {shown}")
    con.execute(f"SET allowed_directories = [{listed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


# DuckDB's pause inside each checkpoint, after it wrote a table's row groups and before it installs
# them: a setting for tests only (tests/test_worker.py: a query during a checkpoint), not [projector]'s
CHECKPOINT_PAUSE = "debug_checkpoint_scan_sleep_ms"


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
        if export == "check":  # only whether it is one query (ApplyWorker.submit_check)
            check_statement(sql)
            return {}
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
                elif export and export != LISTING:
                    file = self._tmp_dir / f"export-{os.getpid()}-{uuid.uuid4().hex}.parquet"
                    result = {**run_export(query_cursor, sql, file, timeout_s=left), "file": str(file)}
                else:
                    result = run_query(
                        query_cursor,
                        sql,
                        max_rows=max_rows,
                        max_bytes=max_bytes,
                        timeout_s=left,
                        cut_in_query=export != LISTING,
                    )
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
                _end_if_invalidated(exc)
                reply = ("query", (exc.kind, str(exc)))
            except Exception as exc:
                _end_if_invalidated(exc)
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
            _end_if_invalidated(exc)
            log.exception("projector worker: %s failed", op)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _write(out, reply)
    live.take_away()
    for database in databases.values():
        database.close(checkpoint=False)


INVALIDATED = "has been invalidated"  # DuckDB's words once a checkpoint failed (out of memory_limit)
INVALIDATED_EXIT = 70


def _end_if_invalidated(exc: BaseException) -> None:
    """DuckDB invalidates its database when a checkpoint fails (seen under [projector] memory_limit
    during output floods: "failed to pin block"); every later statement fails until the file is
    opened again. This process ends instead of answering errors: the projector starts another,
    which opens the file again and reads the log on from the applied positions, and a query in
    flight is asked again there (corral/system.py)."""
    seen: BaseException | None = exc
    while seen is not None:
        if INVALIDATED in str(seen):
            log.error("projector worker: DuckDB invalidated the database; ending so a new worker opens it: %s", exc)
            logging.shutdown()
            os._exit(INVALIDATED_EXIT)
        seen = seen.__cause__ or seen.__context__


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
