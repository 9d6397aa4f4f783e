"""Apply batches of stream messages to DuckDB: the appliers the projector's worker process runs.

`BatchApplier` folds batches of the core log (CORRAL) into the tables and the state cache,
`OutputApplier` batches of the output stream (CORRAL_OUTPUT, with `[retention]` on). They run in
the projector's DuckDB worker (projections/worker.py) and in the rebuild; the projector
(projections/projector.py) reads the streams and hands them batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

from events.envelope import decode_event
from events.errors import EventError
from events.subjects import OUTPUT_STREAM, STREAM
from projections.batch import LANES, OTHER_LANE, OUTPUT_LANE, Gathered, Prepared, lane_row
from projections.derived import OUTPUT_SEQ_BASE, apply_derived
from projections.state import Execution, evolve
from projections.tables import (
    DDL,
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    STATE_COLUMNS,
    TABLES,
    json_columns_spec,
)
from projections.verify import LIFECYCLE_NEEDS_REQUEST, screen_batch, screen_orphans, screen_output

log = logging.getLogger(__name__)


_EVENTS_SPEC = json_columns_spec(EVENT_COLUMNS)
_REJECTED = "not a valid event envelope"
_OUTPUT_SPEC = (
    "{seq: 'UBIGINT', id: 'VARCHAR', execution_id: 'VARCHAR', ts: 'TIMESTAMPTZ', type: 'VARCHAR', "
    "data: 'STRUCT(stream VARCHAR, n UINTEGER, text VARCHAR)'}"
)
# The executions' output counters, moved by a batch of output rows (a table or subquery `source`).
_OUTPUT_COUNTERS = (
    "UPDATE executions SET output_chunks = executions.output_chunks + agg.chunks, "
    "output_bytes = executions.output_bytes + agg.bytes, "
    "last_output_at = greatest(executions.last_output_at, agg.last_ts) "
    "FROM (SELECT execution_id, count(*) AS chunks, sum(strlen(text)) AS bytes, "
    "max(ts) AS last_ts FROM {source} GROUP BY execution_id) AS agg "
    "WHERE executions.execution_id = agg.execution_id"
)
_OUTPUT_RECOUNT = (
    "UPDATE executions SET output_chunks = agg.chunks, output_bytes = agg.bytes, last_output_at = agg.last_ts "
    "FROM (SELECT execution_id, count(*) AS chunks, sum(strlen(text)) AS bytes, max(ts) AS last_ts FROM output "
    "WHERE execution_id IN (SELECT unnest(?)) GROUP BY execution_id) AS agg "
    "WHERE executions.execution_id = agg.execution_id"
)
_OUTPUT_ROW = "seq, execution_id, ts, stream, n, text"  # output_batch's columns that make an output row
# The rows of one lane's batch among the events above its position (the other lane's are there too).
_LANE_FILTER: dict[str | None, str] = {
    None: "",
    OUTPUT_LANE: " AND type = 'output'",
    OTHER_LANE: " AND type IS DISTINCT FROM 'output'",
}
_STATE_SPEC = json_columns_spec(STATE_COLUMNS)
_STATE_NAMES = list(STATE_COLUMNS)
_STATE_SELECT = [f"{name}::TIMESTAMP" if kind == "TIMESTAMPTZ" else name for name, kind in STATE_COLUMNS.items()]


def record_rejects(
    con: duckdb.DuckDBPyConnection,
    count: int,
    items: Callable[[], Sequence[tuple[int, bytes, bytes]]],
    stored: str,
    params: list[Any],
    loaded: int | None = None,
) -> None:
    """Messages of a batch of `count` that `read_json` did not load (the query `stored` lists the
    sequences it did): recorded in rejected_events, never lost silently. Counted first (`loaded`:
    the count the INSERT itself returned), and only on a gap are the messages (`items()`) looked at."""
    if loaded is None:
        found = con.execute(f"SELECT count(*) FROM ({stored})", params).fetchone()
        loaded = int(found[0]) if found else 0
    if loaded == count:
        return
    present = {row[0] for row in con.execute(stored, params).fetchall()}
    rejects = [
        (seq, subject.decode(errors="replace"), payload.decode(errors="replace")[:10000], _REJECTED)
        for seq, subject, payload in items()
        if seq not in present
    ]
    con.executemany("INSERT INTO rejected_events VALUES (?, ?, ?, ?)", rejects)


def save_positions(con: duckdb.DuckDBPyConnection, rows: list[tuple[str, int, int, datetime]]) -> None:
    """Write projector_position rows (stream, seq, schema version, time): one UPDATE of the rows
    that exist, which is what every apply but a file's first finds (an INSERT OR REPLACE takes
    DuckDB's conflict path, ~2.5 ms in a small apply against ~1.2; executemany one statement a
    row, ~8.5 ms for three); the rows it did not find are inserted."""
    cases = " ".join("WHEN ? THEN ?" for _ in rows)
    streams = [row[0] for row in rows]
    updated = con.execute(
        f"UPDATE projector_position SET seq = CASE stream {cases} END, schema_version = ?, updated_at = ? "
        f"WHERE stream IN ({', '.join('?' for _ in rows)})",
        [*(value for row in rows for value in row[:2]), rows[0][2], rows[0][3], *streams],
    ).fetchone()
    if updated is not None and updated[0] == len(rows):
        return
    values = ", ".join("(?, ?, ?, ?)" for _ in rows)
    con.execute(f"INSERT OR REPLACE INTO projector_position VALUES {values}", [v for row in rows for v in row])


class BatchApplier:
    """Apply batches of raw stream messages to DuckDB; owns the connection and the state cache."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, tmp_dir: Path, stream: str = STREAM) -> None:
        self.con = con
        self.stream = stream
        self.tmp_dir = tmp_dir
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self._batch_file = tmp_dir / f"projector-{os.getpid()}-{id(self)}.ndjson"
        self._state_file = tmp_dir / f"projector-{os.getpid()}-{id(self)}-state.ndjson"
        for statement in DDL:
            con.execute(statement)
        row = con.execute("SELECT seq, schema_version FROM projector_position WHERE stream = ?", [stream]).fetchone()
        if row is not None and row[1] != SCHEMA_VERSION:
            # Tables of another version: the log is the truth, so project it again from the start.
            log.warning(
                "%s has projection schema %s, this Corral writes %s: rebuilding from the log",
                stream,
                row[1],
                SCHEMA_VERSION,
            )
            con.execute("BEGIN")
            for table in (*TABLES, "output_ids", "projector_position"):
                con.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in DDL:
                con.execute(statement)
            con.execute("COMMIT")
            row = None
        self.position: int = int(row[0]) if row else 0
        # The core log is applied in two lanes (projections/projector.py): output chunks, and every
        # other event, each complete up to its own sequence (never below `position`, the lower).
        self.lanes: dict[str, int] = dict.fromkeys(LANES, self.position)
        for lane in LANES:
            found = con.execute(
                "SELECT seq FROM projector_position WHERE stream = ?", [lane_row(stream, lane)]
            ).fetchone()
            if found is not None and row is not None:
                self.lanes[lane] = max(int(found[0]), self.position)
        self.states: dict[str, Execution] = {}
        self.underived: int | None = None  # the position before the first batch not yet derived
        self.recount_output = False  # an output stream is projected too (Projector sets it)
        self.created: set[str] = set()  # executions the batch being applied created

    def close(self) -> None:
        for path in (self._batch_file, self._state_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def apply(self, batch: Sequence[tuple[int, str, bytes]], *, derive: bool = True) -> int:
        """Apply (seq, subject, payload) messages above the position, in any order and with
        repeats; return how many were new. See apply_gathered."""
        unique = {item[0]: item for item in batch if item[0] > self.position}
        gathered = Gathered()
        for seq in sorted(unique):
            gathered.add(seq, unique[seq][1].encode(), unique[seq][2])
        return self.apply_gathered(gathered, derive=derive)

    def apply_gathered(self, gathered: Gathered, *, derive: bool = True) -> int:
        """Apply a batch gathered in stream order above the position; return its size.

        With `derive=False` (a rebuild's bulk load) only `events` and the execution states are
        written; the output, history and search tables of every such batch are filled by one
        `derive()` afterwards: their statements are set-based and give the same rows however
        the log was cut into batches.
        """
        if not gathered.items or gathered.last_seq <= self.position:
            return 0
        return self.apply_prepared(gathered.prepare(self._batch_file), derive=derive)

    def apply_prepared(self, batch: Prepared, *, derive: bool = True) -> int:
        """Apply a batch whose NDJSON file is written (see apply_gathered); return its size.

        A batch of one lane (`batch.lane`, projections/projector.py) holds only that lane's
        messages: output chunks, or every other event. Its rows are told apart from the other
        lane's (applied ahead of it, or behind) by their type, and the lane's own position."""
        return self.apply_batches([batch], derive=derive)

    def apply_batches(self, batches: Sequence[Prepared], *, derive: bool = True) -> int:
        """Apply batches (each lane's, or one of both) in one transaction; return how many messages."""
        lanes, position = dict(self.lanes), self.position
        todo = []
        for batch in batches:
            if batch.lane is not None and not derive:
                raise ValueError("a lane's batch is derived as it is applied")
            start = position if batch.lane is None else lanes[batch.lane]
            if batch.last_seq <= start:
                continue
            if batch.first_seq <= start:
                raise ValueError(f"batch starts at {batch.first_seq}, at or below position {start}")
            todo.append(batch)
        if not todo:
            return 0
        con = self.con
        con.begin()
        try:
            for batch in todo:
                self._apply_rows(batch, position if batch.lane is None else lanes[batch.lane], derive)
                lanes = self._lanes_after(batch, lanes)
                position = min(lanes.values())
            self._save_position(position, lanes)
            con.commit()
        except BaseException:
            con.rollback()
            self.states.clear()  # the cache may hold states the rollback undid
            raise
        self.position = position
        self.lanes = lanes
        return sum(batch.count for batch in todo)

    def _apply_rows(self, batch: Prepared, before: int, derive: bool) -> None:
        """One batch's rows, inside the transaction (`before`: its lane's position)."""
        lane = batch.lane
        only = _LANE_FILTER[lane]
        con = self.con
        inserted = con.execute(
            f"INSERT INTO events SELECT {', '.join(EVENT_COLUMNS)} FROM read_json(?, "
            f"format='newline_delimited', ignore_errors=true, columns={_EVENTS_SPEC}) "
            f"WHERE seq IS NOT NULL{only}",  # a line read_json could not parse comes as NULLs: a reject
            [str(batch.file)],
        ).fetchone()
        stored = f"SELECT seq FROM events WHERE seq > ?{only}"  # (the rows above the lane's position: this batch's)
        record_rejects(con, batch.count, batch.items, stored, [before], int(inserted[0]) if inserted else None)
        self.created.clear()
        # repeats of an event id, forged authority: not facts (the derived approvals table lacks
        # the batches of a bulk load not derived yet: their rows are looked at instead)
        kinds: set[str] = set()  # the types of the batch's rows: statements for types it lacks are skipped
        claims = lane != OUTPUT_LANE
        dropped = screen_batch(con, before, underived=self.underived, only=only, claims=claims, kinds=kinds)
        if lane != OUTPUT_LANE:
            lifecycle = batch.lifecycle
            if dropped:
                lifecycle = [item for item in lifecycle if item[0] not in dropped]
            self._apply_state(lifecycle)
            if not kinds.isdisjoint(LIFECYCLE_NEEDS_REQUEST):
                screen_orphans(con, before)
        if derive:
            # (the batches of a bulk load not derived yet are derived with them: their types are looked up)
            types = frozenset(kinds) if self.underived is None else None
            self._derive(self.underived if self.underived is not None else before, lane, types)
            self.underived = None
        elif self.underived is None:
            self.underived = before

    def _lanes_after(self, batch: Prepared, lanes: dict[str, int]) -> dict[str, int]:
        """Each lane's position once `batch` is applied: a batch of both (a rebuild's, a test's)
        completes both up to its last message; a lane's batch its own lane up to `upto`, and the
        other lane up to `idle_through` (nothing of it was gathered, nor is being applied)."""
        if batch.lane is None:
            return {lane: max(seq, batch.last_seq) for lane, seq in lanes.items()}
        lanes = dict(lanes)
        lanes[batch.lane] = max(lanes[batch.lane], batch.upto)
        for lane in lanes:
            if lane != batch.lane:
                lanes[lane] = max(lanes[lane], batch.idle_through)
        return lanes

    def derive(self) -> None:
        """Fill the derived tables for every batch applied with `derive=False`."""
        if self.underived is None:
            return
        self.con.begin()
        try:
            self._derive(self.underived)
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise
        self.underived = None

    def _derive(self, before: int, lane: str | None = None, types: frozenset[str] | None = None) -> None:
        """The derived tables from the events above `before`; `types`: the event types among them
        (a superset), if known, else looked up."""
        con = self.con
        if lane != OTHER_LANE and (types is None or "output" in types):
            con.execute(
                "INSERT INTO output SELECT seq, execution_id, ts, data->>'stream', "
                "CAST(data->>'n' AS UINTEGER), data->>'text' FROM events "
                "WHERE seq > ? AND type = 'output'",
                [before],
            )
            # Rows below OUTPUT_SEQ_BASE are the core log's: the output stream's are counted by their applier.
            con.execute(_OUTPUT_COUNTERS.format(source=f"output WHERE seq > {int(before)} AND seq < {OUTPUT_SEQ_BASE}"))
        if (self.recount_output or lane is not None) and self.created:
            # With an output stream or lanes, an execution's chunks may be projected before its
            # request: a new execution's counters are taken from every output row it already has.
            con.execute(_OUTPUT_RECOUNT, [sorted(self.created)])
        apply_derived(con, before, only=_LANE_FILTER[lane], present=types)

    def _save_position(self, position: int, lanes: dict[str, int] | None = None) -> None:
        now = datetime.now(UTC)
        rows = [(self.stream, position, SCHEMA_VERSION, now)]
        rows += [(lane_row(self.stream, lane), seq, SCHEMA_VERSION, now) for lane, seq in (lanes or {}).items()]
        save_positions(self.con, rows)

    def _apply_state(self, lifecycle: Sequence[tuple[int, str, bytes]]) -> None:
        """Fold the state-changing events (Gathered.lifecycle) into the executions table."""
        if not lifecycle:
            return
        changed: dict[str, Execution] = {}
        wanted = {subject.split(".", 3)[2] for _, subject, _ in lifecycle}
        self._load_states(wanted - self.states.keys())
        original = {execution_id: self.states.get(execution_id) for execution_id in wanted}  # as the table has them
        # A heartbeat only moves last_heartbeat_at and updated_seq: the latest one per execution
        # is kept aside and folded in before that execution's next other event (or at the end),
        # instead of a full decode and state copy per heartbeat.
        beats: dict[str, tuple[int, bytes]] = {}
        evolved: set[str] = set()  # changed by an event other than a heartbeat
        for seq, subject, payload in lifecycle:
            execution_id = subject.split(".", 3)[2]
            if subject.endswith(".heartbeat") and execution_id in self.states:
                beats[execution_id] = (seq, payload)
                continue
            if execution_id in beats:
                self._beat(execution_id, *beats.pop(execution_id), changed)
            try:
                event = decode_event(payload, seq=seq)
            except EventError:
                continue
            state = self.states.get(event.execution_id)
            new = evolve(state, event)
            if new is not None and new is not state:
                if state is None:
                    self.created.add(event.execution_id)
                self.states[event.execution_id] = new
                changed[event.execution_id] = new
                evolved.add(event.execution_id)
        for execution_id, (seq, payload) in beats.items():
            self._beat(execution_id, seq, payload, changed)
        # An execution only heartbeats most of the time: its row (there since an earlier batch:
        # its state was cached or loaded) gets those two columns, not the upsert of every column
        # (DuckDB's conflict path: ~13 ms in a small apply against ~4).
        beaten = [(i, state.last_heartbeat_at, state.updated_seq) for i, state in changed.items() if i not in evolved]
        if beaten:
            values = ", ".join("(?, ?::TIMESTAMPTZ, ?::UBIGINT)" for _ in beaten)
            self.con.execute(
                "UPDATE executions SET last_heartbeat_at = v.ts, updated_seq = v.seq "
                f"FROM (VALUES {values}) AS v(execution_id, ts, seq) WHERE executions.execution_id = v.execution_id",
                [value for row in beaten for value in row],
            )
        if not evolved:
            return
        # New executions are inserted, known ones get the columns that changed: DuckDB's conflict
        # path (an upsert of every column) costs ~10 ms for a few rows. An execution the batch names
        # otherwise than by its subject (not in `original`) takes the upsert, as before.
        inserted = [i for i in evolved if i in original and original[i] is None]
        known = {i: state for i in evolved if (state := original.get(i)) is not None}
        other = [i for i in evolved if i not in original]
        if inserted:
            self._write_states(inserted, changed, "INSERT INTO executions ({names}) SELECT {names} FROM {source}")
        if known:
            self._update_states(known, changed)
        if other:
            assignments = ", ".join(f"{name} = excluded.{name}" for name in _STATE_NAMES[1:])
            self._write_states(
                other,
                changed,
                "INSERT INTO executions ({names}) SELECT {names} FROM {source} "
                f"ON CONFLICT (execution_id) DO UPDATE SET {assignments}",
            )
        if len(self.states) > 50000:
            self.states = {k: v for k, v in self.states.items() if v.state not in ("exited", "failed")}

    def _write_states(self, ids: list[str], changed: dict[str, Execution], statement: str) -> None:
        """Run `statement` over these executions' whole states (its `{source}`: their NDJSON)."""
        self._state_file.write_bytes(b"\n".join(orjson.dumps(changed[i].model_dump(mode="json")) for i in ids))
        source = f"read_json(?, format='newline_delimited', columns={_STATE_SPEC})"
        self.con.execute(statement.format(names=", ".join(_STATE_NAMES), source=source), [str(self._state_file)])

    def _update_states(self, known: dict[str, Execution], changed: dict[str, Execution]) -> None:
        """Set the columns that changed (in any of these executions) on their rows."""
        before = {i: state.model_dump(mode="json") for i, state in known.items()}
        after = {i: changed[i].model_dump(mode="json") for i in known}
        columns = [name for name in _STATE_NAMES[1:] if any(before[i][name] != after[i][name] for i in known)]
        if not columns:
            return
        self._state_file.write_bytes(
            b"\n".join(orjson.dumps({name: after[i][name] for name in ("execution_id", *columns)}) for i in known)
        )
        spec = json_columns_spec({name: STATE_COLUMNS[name] for name in ("execution_id", *columns)})
        self.con.execute(
            f"UPDATE executions SET {', '.join(f'{name} = v.{name}' for name in columns)} "
            f"FROM read_json(?, format='newline_delimited', columns={spec}) AS v "
            "WHERE executions.execution_id = v.execution_id",
            [str(self._state_file)],
        )

    def _beat(self, execution_id: str, seq: int, payload: bytes, changed: dict[str, Execution]) -> None:
        try:
            ts = datetime.fromisoformat(orjson.loads(payload)["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # not a valid envelope: evolve would not have applied it either
        new = self.states[execution_id].model_copy(update={"last_heartbeat_at": ts, "updated_seq": seq})
        self.states[execution_id] = changed[execution_id] = new

    def _load_states(self, ids: set[str]) -> None:
        if not ids:
            return
        rows = self.con.execute(
            f"SELECT {', '.join(_STATE_SELECT)} FROM executions WHERE execution_id IN (SELECT unnest(?))",
            [sorted(ids)],
        ).fetchall()
        for row in rows:
            record = dict(zip(_STATE_NAMES, row, strict=True))
            record["command"] = tuple(record["command"] or ())
            self.states[record["execution_id"]] = Execution.model_validate(record)


class OutputApplier:
    """Apply batches of the output stream (CORRAL_OUTPUT, with [retention] set; docs/retention.md).

    Output chunks kept in their own bounded stream go to the `output` and `search` tables and the
    executions' output counters, never to `events` (which mirrors the core log). Their `seq` is
    CORRAL_OUTPUT's sequence; the position is the stream's own row in projector_position, saved in
    the same transaction. Shares the connection (and the lock) of the core stream's BatchApplier.
    """

    screen = True  # repeated event ids are duplicates (off only in the baselines of bench/ingest.py, verify.py)

    def __init__(self, con: duckdb.DuckDBPyConnection, *, tmp_dir: Path) -> None:
        self.con = con
        self.stream = OUTPUT_STREAM
        self._batch_file = tmp_dir / f"projector-{os.getpid()}-{id(self)}-output.ndjson"
        row = con.execute("SELECT seq FROM projector_position WHERE stream = ?", [self.stream]).fetchone()
        self.position: int = int(row[0]) if row else 0

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._batch_file.unlink()

    def apply_gathered(self, gathered: Gathered, *, derive: bool = True) -> int:
        """Apply output chunks above the position, in stream order (gaps allowed: limits remove)."""
        if not gathered.items or gathered.last_seq <= self.position:
            return 0
        return self.apply_prepared(gathered.prepare(self._batch_file))

    def apply_prepared(self, batch: Prepared, *, derive: bool = True) -> int:
        """Apply a batch whose NDJSON file is written (see apply_gathered); return its size."""
        if batch.last_seq <= self.position:
            return 0
        con = self.con
        con.begin()
        try:
            con.execute(
                f"CREATE TEMP TABLE output_batch AS SELECT seq + {OUTPUT_SEQ_BASE} AS seq, execution_id, ts, "
                "data.stream AS stream, data.n AS n, data.text AS text, id FROM read_json(?, "
                f"format='newline_delimited', ignore_errors=true, columns={_OUTPUT_SPEC}) "
                "WHERE type = 'output' AND seq > ?",
                [str(batch.file), self.position],
            )
            record_rejects(con, batch.count, batch.items, f"SELECT seq - {OUTPUT_SEQ_BASE} FROM output_batch", [])
            if self.screen:
                screen_output(con)
                con.execute("INSERT INTO output_ids SELECT id, seq FROM output_batch WHERE id IS NOT NULL ORDER BY seq")
            con.execute(f"INSERT INTO output SELECT {_OUTPUT_ROW} FROM output_batch ORDER BY seq")
            con.execute(
                "INSERT INTO search SELECT seq, execution_id, ts, 'output', lower(text) FROM output_batch ORDER BY seq"
            )
            con.execute(_OUTPUT_COUNTERS.format(source="output_batch"))
            con.execute("DROP TABLE output_batch")
            save_positions(con, [(self.stream, batch.last_seq, SCHEMA_VERSION, datetime.now(UTC))])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.position = batch.last_seq
        return batch.count
