"""Run an analyst's SQL against the projections without letting it change anything.

`corral sql` (and the NATS subject corral.api.sql, open to the read-only `tap` user) is a
sandbox (docs/security.md, "The query sandbox"):

- exactly one statement, and a query: DuckDB's own parser decides (`check_statement`); ATTACH,
  COPY, INSTALL, LOAD, SET, PRAGMA, CALL, EXPORT, DDL, DML and transaction statements are
  refused before anything runs (EXPLAIN of a query is allowed);
- it runs on a cursor of its own of the projector worker's DuckDB instance, which has external
  access off and its configuration locked (projections/worker.py): no file outside the worker's
  batch directory is read or written, no extension installed or loaded, no setting changed;
- in a transaction that is always rolled back;
- stopped with the cursor's `interrupt()` after `timeout_s`, and cut after `max_rows` rows or
  `max_bytes` bytes of answer;
- every value is turned into something JSON holds (`jsonable`): integers beyond 64 bits, decimals,
  intervals, blobs and map keys as text, nested lists, structs and maps as arrays and objects.
"""

import contextlib
import datetime
import decimal
import math
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson

from projections.database import CATALOG
from projections.errors import MAX_BYTES, QueryError, QueryRefused, QueryTimeout

MAX_ROWS = 10000
DEFAULT_TIMEOUT_S = 10.0
FETCH_ROWS = 1000
INTERRUPT_EVERY_S = 0.05

_QUERY_TYPES = {duckdb.StatementType.SELECT}
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1  # orjson writes integers of 64 bits (signed or unsigned)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _statements(sql: str) -> list[Any]:
    try:
        return list(duckdb.extract_statements(sql))
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None


def _kind(statement: Any) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


def _explained(sql: str) -> str:
    """The statement an EXPLAIN [ANALYZE] explains (its text), by DuckDB's tokenizer."""
    tokens = duckdb.tokenize(sql)
    starts = [position for position, _ in tokens] + [len(sql)]
    rest = 1  # the token after EXPLAIN
    if len(tokens) > 1 and sql[starts[1] : starts[2]].strip().upper() == "ANALYZE":
        rest = 2
    return sql[starts[rest] :] if rest < len(tokens) else ""


def check_statement(sql: str) -> None:
    """Refuse (QueryRefused) anything but exactly one query; a syntax error is a QueryError."""
    statements = _statements(sql)
    if len(statements) != 1:
        raise QueryRefused(
            f"corral sql runs exactly one statement, and this has {len(statements)}: "
            "send one query (SELECT, FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN of one)"
        )
    statement = statements[0]
    if statement.type == duckdb.StatementType.EXPLAIN:
        inner = _statements(_explained(statement.query))
        if len(inner) == 1 and inner[0].type in _QUERY_TYPES:
            return
        shown = _kind(inner[0]) if len(inner) == 1 else "no single statement"
        raise QueryRefused(f"corral sql is read-only: EXPLAIN of {shown} is refused; explain a query")
    if statement.type not in _QUERY_TYPES:
        raise QueryRefused(
            f"corral sql is read-only: a {_kind(statement)} statement is refused; "
            "only queries run (SELECT, FROM, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)"
        )


def timeout_message(timeout_s: float | None) -> str:
    return (
        f"the query was stopped after {timeout_s or 0:g} s ([sql] timeout in corral.toml); "
        "narrow it, add LIMIT, or raise the timeout"
    )


def _blob_text(value: bytes) -> str:
    # DuckDB's own text for a BLOB: printable ASCII as is, every other byte as \xHH
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in value)


def jsonable(value: Any) -> Any:
    """A value from DuckDB's Python conversion as orjson writes it (the NATS answer is JSON)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if _INT_MIN <= value <= _INT_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value
    if isinstance(value, datetime.time):
        return value if value.tzinfo is None else value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _blob_text(bytes(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return str(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else orjson.dumps(jsonable(k)).decode(): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def _column(column: str, kind: str) -> str:
    """The column as it is fetched: a few types as DuckDB's own text."""
    quoted = '"' + column.replace('"', '""') + '"'
    if kind == "TIMESTAMP WITH TIME ZONE":
        # UTC wall time carries the same instant, and reads as before
        return f"{quoted}::TIMESTAMP AS {quoted}"
    if kind in ("INTERVAL", "BLOB"):
        # Python's timedelta counts a month as 30 days; a BLOB reads as DuckDB prints it
        return f"{quoted}::VARCHAR AS {quoted}"
    return quoted


@contextlib.contextmanager
def _guarded(cursor: duckdb.DuckDBPyConnection, timeout_s: float | None) -> Iterator[None]:
    """A transaction on `cursor` that is always rolled back, interrupted after `timeout_s`;
    DuckDB's errors as QueryError (QueryTimeout when the time was up)."""
    finished = threading.Event()
    timed_out = threading.Event()

    def watch() -> None:
        if timeout_s is None or finished.wait(timeout_s):
            return
        timed_out.set()
        while True:  # DuckDB forgets an interrupt that comes between two statements: again until done
            cursor.interrupt()
            if finished.wait(INTERRUPT_EVERY_S):
                return

    watcher = threading.Thread(target=watch, name="query-timeout", daemon=True)
    try:
        watcher.start()
        cursor.begin()
        try:
            yield
        finally:
            finished.set()
            with contextlib.suppress(duckdb.Error):  # interrupted: the cursor's transaction goes with it
                cursor.rollback()
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise QueryTimeout(timeout_message(timeout_s)) from None
        raise QueryError(_first_line(exc)) from None
    finally:
        finished.set()


def run_query(
    cursor: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    max_rows: int = MAX_ROWS,
    max_bytes: int = MAX_BYTES,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    cut_in_query: bool = True,
) -> dict[str, Any]:
    """Run one query on `cursor` (one of its own, in the projections' catalog) in a transaction
    that is always rolled back; return columns, types, JSON-ready rows and whether and why the
    rows were cut ("rows" or "bytes"). The caller closes the cursor.

    The rows are cut at `max_rows` by a LIMIT added to the query, so DuckDB computes no more
    (a sort keeps only the first rows: its top-N). `cut_in_query=False` (a listing of a small
    table, `corral ps`): cut while they are read instead. DuckDB's plan for a LIMIT (top-N, late
    materialization) waits for a checkpoint that merges row groups to end (its vacuum moves row
    ids), and during output floods most applies checkpoint such merges of big output chunks:
    `corral ps` waited up to 1-3 s for them (issue 20 §5, docs/performance.md)."""
    check_statement(sql)
    rows: list[list[Any]] = []
    cut: str | None = None
    with _guarded(cursor, timeout_s):
        relation = cursor.sql(sql)
        if relation is None:
            return {"columns": [], "types": [], "rows": [], "truncated": False, "cut": None}
        columns = list(relation.columns)
        types = [str(t) for t in relation.types]
        size = len(orjson.dumps({"columns": columns, "types": types}))
        relation = relation.project(", ".join(_column(c, t) for c, t in zip(columns, types, strict=True)))
        if cut_in_query:
            relation = relation.limit(max_rows + 1)
        for raw in relation.iter_rows(FETCH_ROWS):
            if len(rows) >= max_rows:
                cut = "rows"
                break
            row = [jsonable(v) for v in raw]
            size += len(orjson.dumps(row)) + 1
            if size > max_bytes:
                cut = "bytes"
                break
            rows.append(row)
    return {"columns": columns, "types": types, "rows": rows, "truncated": cut is not None, "cut": cut}


def run_export(
    cursor: duckdb.DuckDBPyConnection, sql: str, file: Path, *, timeout_s: float | None = None
) -> dict[str, Any]:
    """Write the rows of one SELECT to a Parquet `file` (in the worker's batch directory, the only
    one its DuckDB may write; the projector moves it where `corral export` asked). Operators only:
    corral.api.projections.export, which `tap` may not send (events/auth.py)."""
    check_statement(sql)
    if _statements(sql)[0].type not in _QUERY_TYPES:
        raise QueryRefused("corral export writes the rows of a query (SELECT)")
    statement = f"COPY (\n{sql.strip().rstrip(';')}\n) TO {_literal(str(file))} (FORMAT parquet)"
    copies = _statements(statement)
    if len(copies) != 1 or copies[0].type != duckdb.StatementType.COPY:  # the query stayed inside
        raise QueryRefused("corral export writes the rows of exactly one query")
    with _guarded(cursor, timeout_s):
        written = cursor.execute(statement).fetchall()
    count = int(written[0][0]) if written else 0
    return {"columns": ["Count"], "types": ["BIGINT"], "rows": [[count]], "truncated": False, "cut": None}


def run_snapshot(cursor: duckdb.DuckDBPyConnection, file: Path) -> dict[str, Any]:
    """Copy every table of the live file into a new DuckDB `file` (in the worker's batch directory;
    the projector moves it where `corral snapshot` asked): one transaction's view, so the copy is
    consistent, and an analyst can open it with any DuckDB while the projector holds the live one.
    Operators only: corral.api.projections.snapshot, which `tap` may not send (events/auth.py)."""
    alias = f"snapshot_{uuid.uuid4().hex[:12]}"
    try:  # not in _guarded's rolled-back transaction: COPY FROM DATABASE is one committed statement
        cursor.execute(f"ATTACH {_literal(str(file))} AS {alias}")
        try:
            cursor.execute(f"COPY FROM DATABASE {CATALOG} TO {alias}")
            tables = cursor.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ?", [alias]).fetchone()
            cursor.execute(f"CHECKPOINT {alias}")  # everything in the file itself: no WAL beside it
        finally:
            cursor.execute(f"DETACH {alias}")
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None
    count = int(tables[0]) if tables else 0
    return {"columns": ["tables"], "types": ["BIGINT"], "rows": [[count]], "truncated": False, "cut": None}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
