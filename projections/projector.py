"""The projector: applies the event log to DuckDB in batches, exactly once.

Each batch is applied in one DuckDB transaction that also records the last stream sequence
applied, so a projector killed at any moment restarts from exactly where its rows end: a
redelivered event at or below that position is skipped, never applied twice.
"""

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from actors.runtime import Actor
from events.consumers import legacy_projector_consumer_name, projector_consumer_name
from events.envelope import decode_event
from events.errors import EventError
from events.stream import when_ready
from events.subjects import ALL_EVENTS, OUTPUT_STREAM, STREAM
from events.types import EVENT_TYPES
from projections.batch import Gathered, Prepared
from projections.derived import OUTPUT_SEQ_BASE, apply_derived
from projections.errors import DatabaseLocked, ProjectionError
from projections.intake import RawClient, status_of, subscribe_deliveries
from projections.state import Execution, evolve
from projections.tables import (
    DDL,
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    STATE_COLUMNS,
    TABLES,
    json_columns_spec,
)
from projections.verify import screen_batch, screen_orphans, screen_output
from projections.wire import connect_reader
from projections.worker import LIVE, ApplyWorker, RemoteApplier

log = logging.getLogger(__name__)

PULL_BATCH = 2000
MAX_CREDIT = 60000  # deliveries asked for and gathered, not yet handed to the applier
# Adaptive batching (issue 20 §1): a batch goes to the applier as soon as the stream is drained
# (no delivery for QUIET_S), or LINGER_S after its first message while messages keep coming, or
# at LINGER_EVENTS; at high rates the apply in flight is what gathers the next batch.
QUIET_S = 0.01
LINGER_S = 0.1
LINGER_EVENTS = 2000
# Big output chunks (issue 20 §5): a batch is cut at BATCH_BYTES of payload, so that an apply fits
# in the DuckDB worker's memory_limit, and no more is asked for while MAX_GATHER_BYTES are gathered
# (the credit is also scaled down by the messages' running average size).
BATCH_BYTES = 8 * 1024 * 1024
MAX_GATHER_BYTES = 48 * 1024 * 1024
PULL_EXPIRES_S = 5.0
LOCK_RETRY_S = 2.0
SILENCE_S = 3 * PULL_EXPIRES_S  # pulls outstanding and not a word back for this long: they were lost
_EVENTS_SPEC = json_columns_spec(EVENT_COLUMNS)
_REJECTED = "not a valid event envelope"
OUTPUT_EVENTS_FILTER = "corral.evt.*.output"
OUTPUT_CHECK_S = 10.0  # how often a projector without the output stream looks for it
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
# What a listing's output_grace_s lets wait (Projector.wait_for_position), and every other subject.
_QUIET_KINDS = (b".output", b".heartbeat")
_OTHER_SUBJECTS = [f"corral.evt.*.{kind}" for kind in sorted(EVENT_TYPES) if kind not in ("output", "heartbeat")]
_STATE_SPEC = json_columns_spec(STATE_COLUMNS)
_STATE_NAMES = list(STATE_COLUMNS)
_STATE_SELECT = [f"{name}::TIMESTAMP" if kind == "TIMESTAMPTZ" else name for name, kind in STATE_COLUMNS.items()]


def lock_holder(detail: str) -> str:
    """`pid N, PROGRAM` from DuckDB's lock error ("Conflicting lock is held in PROGRAM (PID N)")."""
    found = re.search(r"held in (.+?) \(PID (\d+)\)", detail)
    return f"pid {found.group(2)}, {found.group(1)}" if found else detail


def consumer_name(database: Path, secret: str = "") -> str:
    """Return the durable consumer name of the projector writing this DuckDB file.

    `secret` (the projector's NATS password): `projector_<id>_<mac>`, the mac keyed with it, so
    no other role can make a name the sweep keeps, and whoever holds it can verify one without
    knowing the host or the path (events/consumers.py, docs/security.md "The bus")."""
    return projector_consumer_name(database, secret)


def _pending_messages(headers: bytes) -> int | None:
    for line in headers.split(b"\r\n"):
        if line.lower().startswith(b"nats-pending-messages:"):
            return int(line.split(b":", 1)[1])
    return None


def record_rejects(
    con: duckdb.DuckDBPyConnection,
    count: int,
    items: Callable[[], Sequence[tuple[int, bytes, bytes]]],
    stored: str,
    params: list[Any],
) -> None:
    """Messages of a batch of `count` that `read_json` did not load (the query `stored` lists the
    sequences it did): recorded in rejected_events, never lost silently. Counted first, and only
    on a gap are the messages (`items()`) looked at."""
    loaded = con.execute(f"SELECT count(*) FROM ({stored})", params).fetchone()
    if loaded and loaded[0] == count:
        return
    present = {row[0] for row in con.execute(stored, params).fetchall()}
    rejects = [
        (seq, subject.decode(errors="replace"), payload.decode(errors="replace")[:10000], _REJECTED)
        for seq, subject, payload in items()
        if seq not in present
    ]
    con.executemany("INSERT INTO rejected_events VALUES (?, ?, ?, ?)", rejects)


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
        """Apply a batch whose NDJSON file is written (see apply_gathered); return its size."""
        if batch.last_seq <= self.position:
            return 0
        if batch.first_seq <= self.position:
            raise ValueError(f"batch starts at {batch.first_seq}, at or below position {self.position}")
        last = batch.last_seq
        con = self.con
        con.begin()
        try:
            before = self.position
            con.execute(
                f"INSERT INTO events SELECT {', '.join(EVENT_COLUMNS)} FROM read_json(?, "
                f"format='newline_delimited', ignore_errors=true, columns={_EVENTS_SPEC}) "
                "WHERE seq IS NOT NULL",  # a line read_json could not parse comes as NULLs: a reject
                [str(batch.file)],
            )
            record_rejects(con, batch.count, batch.items, "SELECT seq FROM events WHERE seq > ?", [before])
            self.created.clear()
            # repeats of an event id, forged authority: not facts (the derived approvals table lacks
            # the batches of a bulk load not derived yet: their rows are looked at instead)
            dropped = screen_batch(con, before, underived=self.underived)
            lifecycle = batch.lifecycle
            if dropped:
                lifecycle = [item for item in lifecycle if item[0] not in dropped]
            self._apply_state(lifecycle)
            screen_orphans(con, before)
            if derive:
                self._derive(self.underived if self.underived is not None else before)
                self.underived = None
            elif self.underived is None:
                self.underived = before
            self._save_position(last)
            con.commit()
        except BaseException:
            con.rollback()
            self.states.clear()  # the cache may hold states the rollback undid
            raise
        self.position = last
        return batch.count

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

    def _derive(self, before: int) -> None:
        con = self.con
        con.execute(
            "INSERT INTO output SELECT seq, execution_id, ts, data->>'stream', "
            "CAST(data->>'n' AS UINTEGER), data->>'text' FROM events "
            "WHERE seq > ? AND type = 'output'",
            [before],
        )
        # Rows below OUTPUT_SEQ_BASE are the core log's: the output stream's are counted by their applier.
        con.execute(_OUTPUT_COUNTERS.format(source=f"output WHERE seq > {int(before)} AND seq < {OUTPUT_SEQ_BASE}"))
        if self.recount_output and self.created:
            # With an output stream, an execution's chunks may be projected before its request:
            # a new execution's counters are taken from every output row it already has.
            con.execute(_OUTPUT_RECOUNT, [sorted(self.created)])
        apply_derived(con, before)

    def _save_position(self, last: int) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO projector_position VALUES (?, ?, ?, ?)",
            [self.stream, last, SCHEMA_VERSION, datetime.now(UTC)],
        )

    def _apply_state(self, lifecycle: Sequence[tuple[int, str, bytes]]) -> None:
        """Fold the state-changing events (Gathered.lifecycle) into the executions table."""
        if not lifecycle:
            return
        changed: dict[str, Execution] = {}
        wanted = {subject.split(".", 3)[2] for _, subject, _ in lifecycle}
        self._load_states(wanted - self.states.keys())
        # A heartbeat only moves last_heartbeat_at and updated_seq: the latest one per execution
        # is kept aside and folded in before that execution's next other event (or at the end),
        # instead of a full decode and state copy per heartbeat.
        beats: dict[str, tuple[int, bytes]] = {}
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
        for execution_id, (seq, payload) in beats.items():
            self._beat(execution_id, seq, payload, changed)
        if not changed:
            return
        self._state_file.write_bytes(
            b"\n".join(orjson.dumps(state.model_dump(mode="json")) for state in changed.values())
        )
        assignments = ", ".join(f"{name} = excluded.{name}" for name in _STATE_NAMES[1:])
        self.con.execute(
            f"INSERT INTO executions ({', '.join(_STATE_NAMES)}) SELECT {', '.join(_STATE_NAMES)} "
            f"FROM read_json(?, format='newline_delimited', columns={_STATE_SPEC}) "
            f"ON CONFLICT (execution_id) DO UPDATE SET {assignments}",
            [str(self._state_file)],
        )
        if len(self.states) > 50000:
            self.states = {k: v for k, v in self.states.items() if v.state not in ("exited", "failed")}

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
            con.execute(
                "INSERT OR REPLACE INTO projector_position VALUES (?, ?, ?, ?)",
                [self.stream, batch.last_seq, SCHEMA_VERSION, datetime.now(UTC)],
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.position = batch.last_seq
        return batch.count


Applier = BatchApplier | OutputApplier | RemoteApplier


async def _delete_quietly(js: Any, stream: str, name: str) -> None:
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, name)


class _Feed:
    """One pull consumer of one stream, its deliveries gathered (and prepared) for one applier.

    The core log has no holes (no deletes, no purges) and a consumer delivers in order, so a
    missing sequence there is a delivery lost in flight (a server died, a connection broke):
    applying past it would skip it for good (the consumer takes no acks and never redelivers).
    Then nothing more is gathered
    and a new consumer resumes right after the applied position. Only a new consumer's first
    delivery may start past the expected sequence: nothing is stored in between. The output
    stream has holes by design (its limits remove old chunks), so there gaps are accepted.
    """

    def __init__(self, projector: "Projector", *, stream: str, durable: str, filter_subject: str, gaps: bool) -> None:
        self.projector = projector
        self.stream = stream
        self.durable = durable
        self.legacy = projector.legacy_durable  # deleted at the first reset (events/consumers.py)
        self.filter_subject = filter_subject
        self.gaps = gaps
        self.gathering = Gathered()  # deliveries since the last batch was handed to the applier
        self.full: deque[Gathered] = deque()  # batches cut at BATCH_BYTES, waiting for the applier
        self.full_count = 0
        self.full_bytes = 0
        self.first_at = 0.0  # when the gathering's first message came
        self.last_delivery = 0.0
        self.avg_size = 1024.0  # running average payload size (up fast, down slowly): scales the credit
        self.expected = 1  # the next stream sequence the current consumer should deliver
        self.credit = 0
        self.inbox = ""
        self.sid: int | None = None
        self.fresh = True  # nothing delivered yet by the current consumer
        self.lost = False  # deliveries may have been lost: start a new consumer
        self.last_heard = 0.0

    @property
    def applier(self) -> Applier | None:
        p = self.projector
        return p.output_applier if self.gaps else p.applier

    @property
    def position(self) -> int:
        applier = self.applier
        return applier.position if applier is not None else 0

    def on_status(self, headers: bytes) -> None:
        """A pull's status (on the event loop): what it asked for will not all come."""
        self.last_heard = time.monotonic()
        status = status_of(headers)
        if status in (404, 408, 409):
            pending = _pending_messages(headers)
            self.credit = max(self.credit - (pending if pending is not None else PULL_BATCH), 0)
            self.projector._arrived.set()

    def on_delivery(self, seq: int, subject: bytes, data: bytes) -> None:
        """A delivery (on the event loop): gathered and prepared at once."""
        self.credit -= 1
        if self.lost or seq < self.expected:
            return  # a redelivery of something gathered or applied
        if seq > self.expected and not self.fresh and not self.gaps:
            self.lost = True
            self.projector._arrived.set()
            return
        self.fresh = False
        self.expected = seq + 1
        size = len(data)
        self.avg_size += (size - self.avg_size) * (0.25 if size > self.avg_size else 0.002)
        self.last_delivery = now = time.monotonic()
        gathering = self.gathering
        gathering.add(seq, subject, data)
        if len(gathering.items) == 1:
            self.last_heard = self.first_at = now  # silent() looks only while nothing is gathered
            self.projector._arrived.set()
        elif gathering.size >= BATCH_BYTES:
            self.full.append(gathering)
            self.full_count += len(gathering.items)
            self.full_bytes += gathering.size
            self.gathering = Gathered()
            self.projector._arrived.set()
            self.projector._urgent.set()
        elif self.credit < PULL_BATCH:
            self.projector._arrived.set()

    @property
    def ready(self) -> bool:
        return bool(self.full or self.gathering.items)

    def take(self) -> Gathered:
        """The next batch for the applier: the oldest cut at BATCH_BYTES, else what is gathered."""
        if self.full:
            batch = self.full.popleft()
            self.full_count -= len(batch.items)
            self.full_bytes -= batch.size
            return batch
        batch, self.gathering = self.gathering, Gathered()
        return batch

    async def pull(self, intake: RawClient) -> None:
        # as many messages as MAX_GATHER_BYTES hold at the running average size (MAX_CREDIT at most)
        limit = max(16, min(MAX_CREDIT, int(MAX_GATHER_BYTES / max(self.avg_size, 1.0))))
        step = min(PULL_BATCH, max(limit // 4, 1))
        while self.gathering.size + self.full_bytes < MAX_GATHER_BYTES:
            room = limit - self.credit - len(self.gathering.items) - self.full_count
            if room < step and (room <= 0 or self.credit > 0):
                break  # no pull of a few messages each time one is delivered
            batch = min(step, room)
            self.credit += batch
            await intake.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                orjson.dumps({"batch": batch, "expires": int(PULL_EXPIRES_S * 1e9)}),
                reply=self.inbox,
            )

    def silent(self) -> bool:
        """Pulls are outstanding but nothing came back, not even their expiry: they were lost
        (the consumer's leader moved to another server of the cluster, or the connection hangs)."""
        return self.credit > 0 and not self.ready and time.monotonic() - self.last_heard > SILENCE_S

    async def listen(self, intake: RawClient) -> None:
        """Deliveries go to a new inbox, so stragglers of a replaced consumer are not mixed in."""
        if self.sid is not None:
            with contextlib.suppress(Exception):
                await intake.unsubscribe_raw(self.sid)
        self.inbox = intake.new_inbox()
        self.sid = await subscribe_deliveries(intake, self.inbox, self.on_delivery, self.on_status)
        self.last_heard = time.monotonic()

    async def reset_consumer(self) -> None:
        """A consumer that starts right after the applied position (DuckDB's position is the truth).

        It takes no acks: what is applied is DuckDB's position, saved in each batch's transaction,
        and a consumer is only ever started from it (here), so the server's ack bookkeeping would
        track nothing this projector reads back. Without it the server spends ~40 % less CPU per
        delivered event (bench/ingest.py). Flow control is the pull credit (MAX_CREDIT)."""
        js = self.projector.bus.js
        if self.legacy:  # the durable of an older Corral: nothing in it is needed (the position is DuckDB's)
            legacy, self.legacy = self.legacy, ""
            self.projector._background(_delete_quietly(js, self.stream, legacy))  # beside the start, not before
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.stream, self.durable)
        await js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable,
                filter_subject=self.filter_subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.position + 1,
                ack_policy=AckPolicy.NONE,
                max_waiting=512,
                inactive_threshold=7 * 24 * 3600.0,
            ),
        )
        self.gathering = Gathered()
        self.full.clear()
        self.full_count = self.full_bytes = 0
        self.credit = 0
        self.fresh = True
        self.lost = False
        self.expected = self.position + 1


class Projector(Actor):
    """Keeps a DuckDB file in step with the event log (and the output stream, when there is one)."""

    name = "projector"

    def __init__(
        self,
        bus: Bus,
        *,
        database: Path,
        tmp_dir: Path,
        instance: str | None = None,
        duckdb_settings: dict[str, str | int] | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.database = database
        self.tmp_dir = tmp_dir
        self.duckdb_settings = duckdb_settings  # [projector] memory_limit, threads (None: the worker's defaults)
        secret = bus.credentials.password if bus.credentials else ""
        self.durable = consumer_name(database, secret)
        self.legacy_durable = legacy_projector_consumer_name(database, secret)
        self.worker: ApplyWorker | None = None  # the process that owns the DuckDB connection
        self.applier: RemoteApplier | None = None
        self.output_applier: RemoteApplier | None = None
        self.position_changed = asyncio.Condition()
        self.feeds = [_Feed(self, stream=STREAM, durable=self.durable, filter_subject=ALL_EVENTS, gaps=False)]
        self._intake: RawClient | None = None
        self._arrived = asyncio.Event()
        self._urgent = asyncio.Event()
        self._waiters = 0
        self._last_apply = 0.0
        self._in_flight: Gathered | None = None  # the core log's batch being applied
        self._lock = asyncio.Lock()
        self._resync_all = False  # the intake connection was replaced: every consumer starts again
        self._output_checked = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.locked_out: str | None = None  # why the DuckDB file cannot be opened yet, if it cannot

    @property
    def position(self) -> int:
        """The core log's sequence applied last."""
        return self.applier.position if self.applier else 0

    @property
    def output_position(self) -> int | None:
        """CORRAL_OUTPUT's sequence applied last, when the projector reads that stream."""
        if len(self.feeds) < 2 or self.output_applier is None:
            return None
        return self.output_applier.position

    def health(self) -> dict[str, Any]:
        record = {**super().health(), "position": self.position, "database": str(self.database)}
        if self.output_position is not None:
            record["output_position"] = self.output_position
        if self.locked_out:
            record["locked_out"] = self.locked_out
        return record

    async def prepare(self) -> None:
        if await self._try_open():
            await when_ready(self.feeds[0].reset_consumer)

    async def _try_open(self) -> bool:
        """Open the DuckDB file; if another process holds it (an analyst's session), say so once and wait."""
        try:
            await self.open_database()
        except DatabaseLocked as exc:
            if self.locked_out is None:
                self.locked_out = (
                    f"DuckDB file {self.database} is locked by another process ({lock_holder(exc.detail)}); "
                    f"retrying every {LOCK_RETRY_S:g}s, nothing is lost meanwhile: close that session "
                    "(read with `corral sql` instead)"
                )
                log.warning("%s", self.locked_out)
            return False
        if self.locked_out is not None:
            self.locked_out = None
            log.warning("DuckDB file %s is free again; catching up from event %s", self.database, self.position + 1)
        return True

    async def _wait_for_database(self) -> bool:
        """Retry opening a locked DuckDB file until it opens (True) or the projector stops (False)."""
        while self.worker is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), LOCK_RETRY_S)
            if self.stopping.is_set():
                return False
            if await self._try_open():
                await when_ready(self.feeds[0].reset_consumer)
        return True

    async def open_database(self) -> None:
        """Open the DuckDB file in a worker process (projections.worker) and read the applied
        positions; after a rebuild's swap, in the worker it already has."""
        if self.worker is None:
            # started on the loop's thread
            worker = ApplyWorker(self.database, tmp_dir=self.tmp_dir, settings=self.duckdb_settings)
            await asyncio.to_thread(worker.open)
            self.worker = worker
        else:
            await asyncio.to_thread(self.worker.open, LIVE, self.database)
        self.applier = RemoteApplier(self.worker, STREAM)
        self.output_applier = RemoteApplier(self.worker, OUTPUT_STREAM)
        self.applier.recount_output = len(self.feeds) > 1

    def release_database(self) -> None:
        """Close the DuckDB file (checkpointed) but keep the worker, for open_database (a rebuild's swap)."""
        for applier in (self.applier, self.output_applier):
            if applier is not None:
                applier.close()
        self.applier = self.output_applier = None
        if self.worker is not None:
            self.worker.release(LIVE)

    def close_database(self) -> None:
        for applier in (self.applier, self.output_applier):
            if applier is not None:
                applier.close()
        if self.worker is not None:
            self.worker.close()  # checkpoints, closes the file, ends the process
            self.worker = None

    def query(self, sql: str, *, max_rows: int) -> dict[str, Any]:
        """Run an analyst's query on the projections (read-only, see projections.query); blocks."""
        if self.worker is None:
            raise ProjectionError("the projector has no DuckDB file open")
        return self.worker.query(sql, max_rows=max_rows)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold the projector between batches (for a rebuild's swap)."""
        async with self._lock:
            yield

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_output_stream(self) -> None:
        """Start reading CORRAL_OUTPUT once it exists ([retention] set; provisioned by `corral up`)."""
        self._output_checked = time.monotonic()
        if len(self.feeds) > 1:
            return
        try:
            await asyncio.wait_for(self.bus.js.stream_info(OUTPUT_STREAM), 2.0)
        except NotFoundError:
            return
        except Exception as exc:  # the server is away, or its nats.conf predates the output stream
            log.debug("output stream not checked: %r", exc)
            return
        if len(self.feeds) > 1 or self.stopping.is_set():
            return
        feed = _Feed(self, stream=OUTPUT_STREAM, durable=self.durable, filter_subject=OUTPUT_EVENTS_FILTER, gaps=True)
        self.feeds.append(feed)
        if self.applier is not None:
            self.applier.recount_output = True
        if self._intake is not None:
            await feed.listen(self._intake)
        await self._reset(feed)
        log.info("projector reads the output stream %s too, from sequence %s", OUTPUT_STREAM, feed.position + 1)

    async def run(self) -> None:
        if not await self._wait_for_database():
            return
        assert self.applier is not None
        await self._connect()
        await self._check_output_stream()
        applying: asyncio.Task[None] | None = None
        turn = 0
        try:
            while not self.stopping.is_set():
                if applying is not None and applying.done():
                    applying.result()  # a failed apply stops the projector, as it did inline
                    applying = None
                broken = getattr(self._intake, "error", None) is not None or any(f.silent() for f in self.feeds)
                if broken or self._resync_all or any(f.lost for f in self.feeds):
                    if applying is not None:
                        await applying  # the position must be final before a consumer restarts at it
                        continue
                    if broken:
                        await self._reconnect()
                    self._resync_all = False
                    for feed in self.feeds:
                        if broken or feed.lost or self._resync_all:
                            await self._resync(feed)
                    continue
                if time.monotonic() - self._output_checked > OUTPUT_CHECK_S and len(self.feeds) < 2:
                    # in the background: an old nats.conf may make the question wait for a timeout
                    self._output_checked = time.monotonic()
                    self._background(self._check_output_stream())
                assert self._intake is not None
                for feed in self.feeds:
                    await feed.pull(self._intake)
                ready = [f for f in self.feeds if f.ready]
                if applying is not None or not ready:
                    # Reading goes on while a batch is applied in the worker.
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), 0.25)
                    continue
                # Adaptive batching: what came is applied once the stream is drained (no delivery
                # for QUIET_S); while messages keep coming they are gathered for up to LINGER_S
                # (or LINGER_EVENTS), and at high rates the apply in flight gathers the next batch.
                # A batch cut at BATCH_BYTES, or someone waiting, is served at once.
                if not self._waiters and not any(f.full for f in ready):
                    wait = self._linger(ready)
                    if wait > 0:
                        self._urgent.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._urgent.wait(), wait)
                        continue
                turn += 1
                feed = ready[turn % len(ready)]  # the streams take turns
                batch = feed.take()
                if feed is self.feeds[0]:
                    self._in_flight = batch
                applying = asyncio.create_task(self._apply(feed, batch), name="corral-projector-apply")
                self._last_apply = time.monotonic()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if applying is not None:
                with contextlib.suppress(BaseException):
                    await applying  # a batch in DuckDB's hands finishes (its thread cannot be stopped)
            if self._intake is not None:
                with contextlib.suppress(Exception):
                    await self._intake.close()

    @staticmethod
    def _linger(ready: list[_Feed]) -> float:
        """How long to gather more before applying what the feeds hold (0: apply now)."""
        if sum(len(f.gathering.items) for f in ready) >= LINGER_EVENTS:
            return 0.0
        now = time.monotonic()
        quiet = max(f.last_delivery for f in ready) + QUIET_S - now
        oldest = min(f.first_at for f in ready) + LINGER_S - now
        return min(quiet, oldest)

    async def _apply(self, feed: _Feed, batch: Gathered) -> None:
        try:
            async with self._lock:
                applier = feed.applier
                assert applier is not None
                await asyncio.to_thread(applier.apply_gathered, batch)
        finally:
            if self._in_flight is batch:
                self._in_flight = None
            self._arrived.set()
        async with self.position_changed:
            self.position_changed.notify_all()

    async def _connect(self) -> None:
        self._intake = await connect_reader(
            self.bus, name=f"{self.instance}-intake", reconnected_cb=self._on_reconnected
        )
        for feed in self.feeds:
            feed.sid = None
            await feed.listen(self._intake)

    async def _reconnect(self) -> None:
        """The intake connection broke (or went silent): connect again, to whichever server answers."""
        if self._intake is not None:
            with contextlib.suppress(Exception):
                await self._intake.close()
            self._intake = None
        while not self.stopping.is_set():
            try:
                await self._connect()
                return
            except Exception as exc:  # the server is still away
                log.debug("projector intake not connected yet: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def _on_reconnected(self) -> None:
        self._resync_all = True  # pulls waiting on the old connection, and deliveries in flight, are gone
        self._arrived.set()

    async def _resync(self, feed: _Feed) -> None:
        """Replace a feed's consumer with one that starts right after its applied position."""
        if self._intake is not None and getattr(self._intake, "error", None) is None:
            await feed.listen(self._intake)
        await self._reset(feed)

    async def _reset(self, feed: _Feed) -> None:
        while not self.stopping.is_set():
            try:
                await feed.reset_consumer()
                return
            except Exception as exc:  # the server is still away, or the cluster electing a leader
                log.debug("projector consumer of %s not reset yet: %r", feed.stream, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def wait_for_position(
        self,
        seq: int,
        *,
        timeout_s: float = 10.0,
        output_seq: int | None = None,
        output_grace_s: float | None = None,
    ) -> bool:
        """Wait until core events up to `seq` (and output chunks up to `output_seq`) are applied.

        `output_grace_s` (a listing such as `corral ps`, issue 20 §5): after that long, output
        and heartbeats still to apply no longer hold the answer: it is given once every other
        event up to `seq` is applied (the rest has reached this projector and is only output)."""
        started = time.monotonic()
        deadline = started + timeout_s
        self._waiters += 1
        self._urgent.set()

        async def behind() -> bool:
            if output_grace_s is not None and time.monotonic() - started >= output_grace_s:
                return self.position < seq and not await self._only_output_until(seq)
            if self.position < seq:
                return True
            out = self.output_position
            return output_seq is not None and out is not None and out < output_seq

        try:
            async with self.position_changed:
                while await behind():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    if output_grace_s is not None:  # looked at again after the grace, and then now and then
                        remaining = min(remaining, max(started + output_grace_s - time.monotonic(), 0.2))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.position_changed.wait(), remaining)
            return True
        finally:
            self._waiters -= 1

    async def _only_output_until(self, seq: int) -> bool:
        """Whether every core event above the applied position up to `seq` is output or a
        heartbeat: those this projector holds (being applied, or gathered) are looked at, and the
        stream is asked about the rest (a flood gathers at most MAX_GATHER_BYTES)."""
        feed = self.feeds[0]
        if feed.lost:
            return False
        batches = [*([self._in_flight] if self._in_flight is not None else []), *feed.full, feed.gathering]
        for batch in batches:
            for item_seq, subject, _ in batch.items:
                if item_seq > seq:
                    return True
                if not subject.endswith(_QUIET_KINDS):
                    return False
        start = feed.expected
        if start > seq:
            return True
        return await self._others_between(start, seq) == 0

    async def _others_between(self, start: int, end: int) -> int | None:
        """How many events from `start` through `end` are neither output nor heartbeats (an upper
        bound; None if the stream could not tell): the pending counts of two ephemeral consumers
        filtered on every other event type, the one after `end` asked first (so that events
        stored meanwhile count only for the other)."""
        pending = []
        for first in (end + 1, start):
            info = None
            try:
                info = await self.bus.js.add_consumer(
                    STREAM,
                    ConsumerConfig(
                        filter_subjects=_OTHER_SUBJECTS,
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=first,
                        ack_policy=AckPolicy.NONE,
                        inactive_threshold=5.0,
                        mem_storage=True,
                        num_replicas=1,
                    ),
                )
                pending.append(int(info.num_pending or 0))
            except Exception as exc:
                log.debug("projector: the stream was not asked about events after %s: %r", first, exc)
                return None
            finally:
                if info is not None:
                    with contextlib.suppress(Exception):
                        await self.bus.js.delete_consumer(STREAM, info.name)
        return max(pending[1] - pending[0], 0)

    async def output_last_sequence(self) -> int | None:
        """The output stream's last sequence, when this projector reads it (for `corral sql`)."""
        if len(self.feeds) < 2:
            return None
        try:
            info = await self.bus.js.stream_info(OUTPUT_STREAM)
        except Exception:
            return None
        return int(info.state.last_seq)

    async def on_stop(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self.close_database)
