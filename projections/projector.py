"""The projector: applies the event log to DuckDB in batches, exactly once.

Each batch is applied in one DuckDB transaction that also records the last stream sequence
applied, so a projector killed at any moment restarts from exactly where its rows end: a
redelivered event at or below that position is skipped, never applied twice.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from actors.runtime import Actor
from events.envelope import decode_event
from events.errors import EventError
from events.stream import when_ready
from events.subjects import ALL_EVENTS, STREAM, ack_sequence
from projections.derived import apply_derived
from projections.errors import DatabaseLocked
from projections.intake import IntakeClient, status_of
from projections.state import STATE_EVENT_TYPES, Execution, evolve
from projections.tables import (
    DDL,
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    STATE_COLUMNS,
    TABLES,
    json_columns_spec,
)

log = logging.getLogger(__name__)

PULL_BATCH = 2000
MAX_CREDIT = 40000
MAX_APPLY = 50000
LINGER_S = 1.0
LINGER_EVENTS = 2000
PULL_EXPIRES_S = 5.0
LOCK_RETRY_S = 2.0
SILENCE_S = 3 * PULL_EXPIRES_S  # pulls outstanding and not a word back for this long: they were lost
_EVENTS_SPEC = json_columns_spec(EVENT_COLUMNS)
_STATE_SPEC = json_columns_spec(STATE_COLUMNS)
_STATE_NAMES = list(STATE_COLUMNS)
_STATE_SELECT = [f"{name}::TIMESTAMP" if kind == "TIMESTAMPTZ" else name for name, kind in STATE_COLUMNS.items()]


def open_database(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, translating the lock error into one a user can act on."""
    try:
        con = duckdb.connect(str(path), read_only=read_only)
        con.execute("SET TimeZone = 'UTC'")
        return con
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DatabaseLocked(str(path), str(exc).splitlines()[0]) from None
        raise


def lock_holder(detail: str) -> str:
    """`pid N, PROGRAM` from DuckDB's lock error ("Conflicting lock is held in PROGRAM (PID N)")."""
    found = re.search(r"held in (.+?) \(PID (\d+)\)", detail)
    return f"pid {found.group(2)}, {found.group(1)}" if found else detail


def consumer_name(database: Path) -> str:
    """Return the durable consumer name of the projector writing this DuckDB file."""
    digest = hashlib.sha1(f"{socket.gethostname()}:{database.resolve()}".encode()).hexdigest()
    return f"projector_{digest[:12]}"


def _pending_messages(headers: bytes) -> int | None:
    for line in headers.split(b"\r\n"):
        if line.lower().startswith(b"nats-pending-messages:"):
            return int(line.split(b":", 1)[1])
    return None


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
            for table in (*TABLES, "projector_position"):
                con.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in DDL:
                con.execute(statement)
            con.execute("COMMIT")
            row = None
        self.position: int = int(row[0]) if row else 0
        self.states: dict[str, Execution] = {}
        self.underived: int | None = None  # the position before the first batch not yet derived

    def close(self) -> None:
        for path in (self._batch_file, self._state_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def apply_raw(self, raw: Sequence[tuple[bytes, bytes, bytes]]) -> int:
        """Apply (reply, subject, payload) as delivered by a JetStream consumer."""
        return self.apply([(ack_sequence(r), s.decode(), d) for r, s, d in raw])

    def apply(self, batch: Sequence[tuple[int, str, bytes]], *, derive: bool = True) -> int:
        """Apply (seq, subject, payload) messages above the position; return how many were new.

        With `derive=False` (a rebuild's bulk load) only `events` and the execution states are
        written; the output, history and search tables of every such batch are filled by one
        `derive()` afterwards: their statements are set-based and give the same rows however
        the log was cut into batches.
        """
        unique = {item[0]: item for item in batch if item[0] > self.position}
        if not unique:
            return 0
        fresh = [unique[seq] for seq in sorted(unique)]
        last = fresh[-1][0]
        lines = []
        for seq, _subject, payload in fresh:
            if payload[:1] == b"{" and len(payload) > 2:
                lines.append(b'{"seq":%d,%s' % (seq, payload[1:]))
        self._batch_file.write_bytes(b"\n".join(lines))
        con = self.con
        con.begin()
        try:
            before = self.position
            if lines:
                con.execute(
                    f"INSERT INTO events SELECT {', '.join(EVENT_COLUMNS)} FROM read_json(?, "
                    f"format='newline_delimited', ignore_errors=true, columns={_EVENTS_SPEC})",
                    [str(self._batch_file)],
                )
            self._record_rejects(fresh, before)
            self._apply_state(fresh)
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
        return len(fresh)

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
        con.execute(
            "UPDATE executions SET output_chunks = executions.output_chunks + agg.chunks, "
            "output_bytes = executions.output_bytes + agg.bytes, "
            "last_output_at = greatest(executions.last_output_at, agg.last_ts) "
            "FROM (SELECT execution_id, count(*) AS chunks, sum(strlen(text)) AS bytes, "
            "max(ts) AS last_ts FROM output WHERE seq > ? GROUP BY execution_id) AS agg "
            "WHERE executions.execution_id = agg.execution_id",
            [before],
        )
        apply_derived(con, before)

    def _save_position(self, last: int) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO projector_position VALUES (?, ?, ?, ?)",
            [self.stream, last, SCHEMA_VERSION, datetime.now(UTC)],
        )

    def _record_rejects(self, fresh: Sequence[tuple[int, str, bytes]], before: int) -> None:
        stored = self.con.execute("SELECT count(*) FROM events WHERE seq > ?", [before]).fetchone()
        if stored and stored[0] == len(fresh):
            return
        present = {row[0] for row in self.con.execute("SELECT seq FROM events WHERE seq > ?", [before]).fetchall()}
        rejects = [
            (seq, subject, payload.decode(errors="replace")[:10000], "not a valid event envelope")
            for seq, subject, payload in fresh
            if seq not in present
        ]
        self.con.executemany("INSERT INTO rejected_events VALUES (?, ?, ?, ?)", rejects)

    def _apply_state(self, fresh: Sequence[tuple[int, str, bytes]]) -> None:
        lifecycle = [item for item in fresh if item[1].split(".", 3)[-1] in STATE_EVENT_TYPES]
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


class Projector(Actor):
    """Keeps a DuckDB file in step with the event log."""

    name = "projector"

    def __init__(
        self,
        bus: Bus,
        *,
        database: Path,
        tmp_dir: Path,
        instance: str | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.database = database
        self.tmp_dir = tmp_dir
        self.durable = consumer_name(database)
        self.con: duckdb.DuckDBPyConnection | None = None
        self.applier: BatchApplier | None = None
        self.position_changed = asyncio.Condition()
        self._buffer: list[tuple[bytes, bytes, bytes]] = []
        self._intake: IntakeClient | None = None
        self._arrived = asyncio.Event()
        self._urgent = asyncio.Event()
        self._waiters = 0
        self._last_apply = 0.0
        self._credit = 0
        self._inbox = ""
        self._sid: int | None = None
        self._lock = asyncio.Lock()
        self._lost = asyncio.Event()  # deliveries may have been lost: start a new consumer
        self._fresh = True  # nothing delivered yet by the current consumer
        self._last_heard = 0.0
        self.locked_out: str | None = None  # why the DuckDB file cannot be opened yet, if it cannot

    @property
    def position(self) -> int:
        return self.applier.position if self.applier else 0

    def health(self) -> dict[str, Any]:
        record = {**super().health(), "position": self.position, "database": str(self.database)}
        if self.locked_out:
            record["locked_out"] = self.locked_out
        return record

    async def prepare(self) -> None:
        if self._try_open():
            await when_ready(lambda: self._reset_consumer(self.position))

    def _try_open(self) -> bool:
        """Open the DuckDB file; if another process holds it (an analyst's session), say so once and wait."""
        try:
            self.open_database()
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
        while self.con is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), LOCK_RETRY_S)
            if self.stopping.is_set():
                return False
            if await asyncio.to_thread(self._try_open):
                await when_ready(lambda: self._reset_consumer(self.position))
        return True

    def open_database(self) -> None:
        """Open (or reopen after a rebuild) the DuckDB file and read the applied position."""
        self.con = open_database(self.database)
        self.applier = BatchApplier(self.con, tmp_dir=self.tmp_dir)

    def close_database(self) -> None:
        if self.applier is not None:
            self.applier.close()
        if self.con is not None:
            with contextlib.suppress(Exception):
                self.con.execute("CHECKPOINT")
            self.con.close()
            self.con = None

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold the projector between batches (for a rebuild's swap)."""
        async with self._lock:
            yield

    async def _reset_consumer(self, position: int) -> None:
        # DuckDB's position is the truth: the consumer always restarts right after it.
        js = self.bus.js
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(STREAM, self.durable)
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=self.durable,
                filter_subject=ALL_EVENTS,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=position + 1,
                ack_policy=AckPolicy.ALL,
                ack_wait=120.0,
                max_ack_pending=MAX_CREDIT * 8,
                max_waiting=512,
                inactive_threshold=7 * 24 * 3600.0,
            ),
        )

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        self._last_heard = time.monotonic()
        if not data and headers:
            status = status_of(headers)
            if status in (404, 408, 409):
                pending = _pending_messages(headers)
                self._credit = max(self._credit - (pending if pending is not None else PULL_BATCH), 0)
                self._arrived.set()
            return
        self._credit -= 1
        self._buffer.append((reply, subject, data))
        if len(self._buffer) == 1 or self._credit < PULL_BATCH:
            self._arrived.set()

    async def _pull(self) -> None:
        assert self._intake is not None
        while self._credit + len(self._buffer) < MAX_CREDIT:
            self._credit += PULL_BATCH
            await self._intake.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{self.durable}",
                orjson.dumps({"batch": PULL_BATCH, "expires": int(PULL_EXPIRES_S * 1e9)}),
                reply=self._inbox,
            )

    async def run(self) -> None:
        if not await self._wait_for_database():
            return
        assert self.applier is not None
        self._intake = IntakeClient()
        await self._intake.connect(
            servers=self.bus.servers,
            name=f"{self.instance}-intake",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            **self.bus.connect_options(),  # the projector's NATS user (corral/auth.py)
            reconnected_cb=self._on_reconnected,
        )
        await self._listen()
        try:
            while not self.stopping.is_set():
                if self._lost.is_set() or self._silent():
                    await self._resync()
                    continue
                await self._pull()
                if not self._buffer:
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), 0.25)
                    continue
                # A trickle (hundreds of agents heartbeating) is gathered for a moment: one DuckDB
                # transaction per second instead of one per event. Someone waiting is served at once.
                since = time.monotonic() - self._last_apply
                if len(self._buffer) < LINGER_EVENTS and since < LINGER_S and not self._waiters:
                    self._urgent.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), LINGER_S - since)
                    continue
                await self._apply_buffered()
                self._last_apply = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await self._intake.close()

    async def _apply_buffered(self) -> None:
        assert self._intake is not None
        raw, self._buffer = self._buffer[:MAX_APPLY], self._buffer[MAX_APPLY:]
        batch, last_reply = self._contiguous(raw)
        if batch:
            async with self._lock:
                assert self.applier is not None
                await asyncio.to_thread(self.applier.apply, batch)
            await self._intake.publish(last_reply.decode(), b"+ACK")
            async with self.position_changed:
                self.position_changed.notify_all()

    def _contiguous(self, raw: Sequence[tuple[bytes, bytes, bytes]]) -> tuple[list[tuple[int, str, bytes]], bytes]:
        """The deliveries that follow the applied position without a hole, and the reply to ack the last.

        The log has no holes (no deletes, no purges) and a consumer delivers in order, so a missing
        sequence is a delivery lost in flight (a server died, a connection broke): acking past it
        would skip it for good (acks are cumulative). The rest is dropped and a new consumer
        resumes right after the position. Only a new consumer's first delivery may start past
        position + 1: nothing is stored in between.
        """
        expected = self.position + 1
        batch: list[tuple[int, str, bytes]] = []
        last_reply = b""
        for reply, subject, data in raw:
            seq = ack_sequence(reply)
            if seq < expected:
                continue  # a redelivery of something applied
            if seq > expected and not self._fresh:
                self._lost.set()
                break
            self._fresh = False
            batch.append((seq, subject.decode(), data))
            last_reply = reply
            expected = seq + 1
        return batch, last_reply

    async def _on_reconnected(self) -> None:
        self._lost.set()  # pulls waiting on the old connection, and deliveries in flight, are gone

    def _silent(self) -> bool:
        """Pulls are outstanding but nothing came back, not even their expiry: they were lost
        (the consumer's leader moved to another server of the cluster)."""
        return self._credit > 0 and not self._buffer and time.monotonic() - self._last_heard > SILENCE_S

    async def _listen(self) -> None:
        """Deliveries go to a new inbox, so stragglers of a replaced consumer are not mixed in."""
        assert self._intake is not None
        if self._sid is not None:
            self._intake.raw_sinks.pop(self._sid, None)
        self._inbox = self._intake.new_inbox()
        self._sid = await self._intake.subscribe_raw(self._inbox, self._on_raw)
        self._last_heard = time.monotonic()

    async def _resync(self) -> None:
        """Replace the consumer with one that starts right after the applied position."""
        self._lost.clear()
        self._buffer.clear()
        self._credit = 0
        self._fresh = True
        await self._listen()
        while not self.stopping.is_set():
            try:
                await self._reset_consumer(self.position)
                return
            except Exception as exc:  # the server is still away, or the cluster electing a leader
                log.debug("projector consumer not reset yet: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def wait_for_position(self, seq: int, *, timeout_s: float = 10.0) -> bool:
        """Wait until events up to `seq` are applied; return False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._waiters += 1
        self._urgent.set()
        try:
            async with self.position_changed:
                while self.position < seq:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.position_changed.wait(), remaining)
            return True
        finally:
            self._waiters -= 1

    async def on_stop(self) -> None:
        async with self._lock:
            self.close_database()
