"""The projector's DuckDB work, in a process of its own.

The projector reads the log on the event loop of `corral up` (Python, per message) while DuckDB
applies the previous batch. In one process those two share the GIL: every time the applying
thread comes back from DuckDB or folds execution states in Python it waits for the reader to let
go, and measured on two cores an apply took 1.5-2x its time alone (bench/ingest.py,
docs/performance.md). So the connection, the appliers and their state cache live here, in a
child process; the projector writes each batch's NDJSON file itself and sends only its bounds
and state-changing subset over a pipe (`ApplyWorker`, `RemoteApplier`). Queries (`corral sql`)
are answered here too, on the same connection.

Protocol: pickled frames with an 8-byte length, requests on the child's stdin, replies on its
stdout, one request at a time. The child ends when its stdin closes (the projector stopped), and
is killed with the projector's process (PR_SET_PDEATHSIG): a batch in DuckDB's hands is then
rolled back, never half-applied, exactly as when one process was killed.
"""

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from projections.batch import Gathered, Prepared
from projections.errors import DatabaseLocked, ProjectionError, QueryError

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
LIVE = "live"  # the name of the projector's own file in its worker


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

    def __init__(self, database: Path, *, tmp_dir: Path) -> None:
        """Start the process (fast); `open()` then opens the file in it (blocking).

        Create it on the thread that runs the event loop: the child is killed by the kernel when
        the thread that started it ends (PR_SET_PDEATHSIG), so a projector killed outright takes
        its DuckDB writer with it, as one process would (a batch in flight is rolled back)."""
        self.database = database
        self.tmp_dir = tmp_dir
        self.positions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "projections.worker", str(os.getpid()), str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def open(self, name: str = LIVE, database: Path | None = None) -> dict[str, int]:
        """Open a DuckDB file in the process as `name` and return its applied positions
        (blocking). "live" is the projector's file (`database`, given at start, by default)."""
        try:
            positions: dict[str, int] = self.call(("open", name, str(database or self.database), str(self.tmp_dir)))
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
                        _write(process.stdin, list(items()) if items is not None else [])
                        continue
                    break
            except (BrokenPipeError, OSError) as exc:
                raise WorkerFailed(f"the projector's DuckDB worker (pid {process.pid}) is gone: {exc}") from None
        kind, value = reply
        if kind == "ok":
            return value
        if kind == "locked":
            raise DatabaseLocked(*value)
        if kind == "query":
            raise QueryError(value)
        raise WorkerFailed(value)

    def query(self, sql: str, *, max_rows: int) -> dict[str, Any]:
        return self.call(("query", sql, max_rows))  # type: ignore[no-any-return]

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
        self.recount_output = False
        self._file = worker.tmp_dir / f"projector-{os.getpid()}-{id(self)}-{stream}.ndjson"

    def apply_gathered(self, gathered: Gathered, *, derive: bool = True) -> int:
        if not gathered.items or gathered.last_seq <= self.position:
            return 0
        batch = gathered.prepare(self._file)
        request = (
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
        applied, self.position = self.worker.call(request, items=batch.items)
        return applied  # type: ignore[no-any-return]

    def derive(self) -> None:
        self.worker.call(("derive", self.name, self.stream))

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file.unlink()


# --- the child's side ----------------------------------------------------------------------------


class _Database:
    """One open DuckDB file of the worker: its connection and one applier per stream."""

    def __init__(self, path: Path, tmp_dir: Path) -> None:
        from projections.database import open_database
        from projections.projector import BatchApplier, OutputApplier

        self.con = open_database(path)
        core = BatchApplier(self.con, tmp_dir=tmp_dir)
        output = OutputApplier(self.con, tmp_dir=tmp_dir)
        self.appliers: dict[str, Any] = {core.stream: core, output.stream: output}

    def close(self, *, checkpoint: bool) -> None:
        if checkpoint:
            self.con.execute("CHECKPOINT")
        for applier in self.appliers.values():
            applier.close()
        self.con.close()


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    from projections.query import run_query

    # "live" is the projector's file; "rebuild" a new one `corral projections rebuild` fills
    databases: dict[str, _Database] = {}
    while True:
        request = _read(inp)
        if request is None:
            break
        op = request[0]
        try:
            if op == "open":
                _, name, path, tmp_dir = request
                if name in databases:
                    raise RuntimeError(f"a DuckDB file is open already as {name!r}")
                database = databases[name] = _Database(Path(path), Path(tmp_dir))
                reply: tuple[str, Any] = ("ok", {stream: a.position for stream, a in database.appliers.items()})
            elif op == "apply":
                _, name, stream, file, first, last, count, lifecycle, derive, recount = request
                applier = databases[name].appliers[stream]
                if hasattr(applier, "recount_output"):
                    applier.recount_output = recount

                def items() -> Sequence[tuple[int, bytes, bytes]]:
                    _write(out, ("items", None))
                    return _read(inp) or []

                batch = Prepared(Path(file), first, last, count, lifecycle, items)
                applied = applier.apply_prepared(batch, derive=derive)
                reply = ("ok", (applied, applier.position))
            elif op == "derive":
                databases[request[1]].appliers[request[2]].derive()
                reply = ("ok", None)
            elif op == "query":
                reply = ("ok", run_query(databases[LIVE].con, request[1], max_rows=request[2]))
            elif op == "release":  # close one file (checkpointed, or dropped as it is)
                _, name, checkpoint = request
                released = databases.pop(name, None)
                if released is not None:
                    released.close(checkpoint=checkpoint)
                reply = ("ok", None)
            elif op == "close":
                for database in databases.values():
                    database.close(checkpoint=request[1])
                databases = {}
                _write(out, ("ok", None))
                break
            else:
                reply = ("error", f"unknown request {op!r}")
        except DatabaseLocked as exc:
            reply = ("locked", (exc.path, exc.detail))
        except QueryError as exc:
            reply = ("query", str(exc))
        except Exception as exc:
            log.exception("projector worker: %s failed", op)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _write(out, reply)
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
    # argv: the projector's pid, and the DuckDB file (shown by `ps`; opened when asked)
    _die_with_parent(int(sys.argv[1]))
    logging.basicConfig(level=logging.WARNING, format="corral projector worker: %(message)s", stream=sys.stderr)
    # Ctrl-C in a terminal reaches the whole process group: the projector decides when this ends
    # (it closes the pipe), so a batch in DuckDB's hands is not cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not break the protocol
    with contextlib.suppress(BrokenPipeError):  # the projector is gone: committed stays, the rest rolled back
        _serve(inp, out)


if __name__ == "__main__":
    main()
