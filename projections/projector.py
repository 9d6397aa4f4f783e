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
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from actors.runtime import Actor
from events.consumers import legacy_projector_consumer_name, projector_consumer_name
from events.stream import when_ready
from events.subjects import ALL_EVENTS, OUTPUT_STREAM, STREAM
from projections.batch import OTHER_LANE, OUTPUT_LANE, Gathered, Prepared, lane_of
from projections.errors import DatabaseLocked, ProjectionError
from projections.intake import RawClient, status_of, subscribe_deliveries
from projections.spawn import take_early
from projections.wire import connect_reader
from projections.worker import LIVE, ApplyWorker, RemoteApplier, WorkerFailed

log = logging.getLogger(__name__)
Applier = RemoteApplier  # what a feed hands its batches to (in the DuckDB worker)

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
# The core log's output lane: while one of its batches is applied, the other lane's events (a
# flood's exit, what `corral ps` waits for) wait for it (one DuckDB writer). 2 MiB halved a flood's
# apply rate (bench/flood.py: 150 MB queryable after 48 s against 30 s at 8 MiB, load ~6).
OUTPUT_LANE_BATCH_BYTES = BATCH_BYTES
MAX_GATHER_BYTES = 48 * 1024 * 1024
PULL_EXPIRES_S = 5.0
LOCK_RETRY_S = 2.0
SILENCE_S = 3 * PULL_EXPIRES_S  # pulls outstanding and not a word back for this long: they were lost
OUTPUT_EVENTS_FILTER = "corral.evt.*.output"
OUTPUT_CHECK_S = 10.0  # how often a projector without the output stream looks for it
# A flood's backlog (issue 20): output batches cut while SPILL_AT_BYTES are held in memory are
# written to disk instead, so the reader goes on past them to the events that must not wait (a
# flood's exit, an approval: the other lane); reading stops at SPILL_MAX_BYTES on disk.
SPILL_AT_BYTES = 24 * 1024 * 1024
SPILL_MAX_BYTES = 1024 * 1024 * 1024
# A DuckDB worker that died or failed an apply (e.g. DuckDB invalidated its database after a failed
# checkpoint under memory pressure) is replaced: a new worker reopens the file (DuckDB replays its
# WAL) and the feeds start again from the positions saved with the rows. More failures than this
# within WORKER_FAILURE_WINDOW_S stop the projector (a failure that repeats is not transient).
WORKER_RESTARTS = 3
WORKER_FAILURE_WINDOW_S = 60.0


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


async def _delete_quietly(js: Any, stream: str, name: str) -> None:
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, name)


class _Lane:
    """What one applier is handed of a feed, in stream order: deliveries being gathered, and
    batches cut at BATCH_BYTES (in memory, or spilled to disk: a flood's backlog of output).

    The core log's feed has two lanes (projections.batch): output chunks, and every other event.
    Each is applied on its own, complete up to its own position (saved with its rows), so a
    lifecycle event or an approval is never queued behind a flood's output (issue 20); the
    projector's `position` is the lower of the two (everything up to it is applied)."""

    def __init__(self, feed: "_Feed", key: str | None) -> None:
        self.feed = feed
        self.key = key  # OTHER_LANE or OUTPUT_LANE of the core log; None: the feed's only lane
        self.gathering = Gathered()
        self.full: deque[Gathered | Prepared] = deque()
        self.full_count = 0  # messages of the full batches held in memory
        self.full_bytes = 0  # their payload bytes
        self.spilled_bytes = 0  # payload bytes of the full batches spilled to disk
        self.first_at = 0.0  # when the gathering's first message came
        self.last_delivery = 0.0
        self.in_flight = False

    @property
    def position(self) -> int:
        applier = self.feed.applier
        return applier.lane_position(self.key) if applier is not None else 0

    @property
    def ready(self) -> bool:
        return bool(self.full or self.gathering.items)

    @property
    def through(self) -> int:
        """Every message of this lane up to here is applied."""
        feed = self.feed
        if self.ready or self.in_flight or feed.lost:
            return self.position
        return max(self.position, feed.expected - 1)  # nothing of it gathered: all it had is applied

    def add(self, seq: int, subject: bytes, data: bytes, now: float) -> None:
        projector = self.feed.projector
        self.last_delivery = now
        gathering = self.gathering
        gathering.add(seq, subject, data)
        if len(gathering.items) == 1:
            self.feed.last_heard = self.first_at = now  # silent() looks only while nothing is gathered
            projector._arrived.set()
        elif gathering.size >= (OUTPUT_LANE_BATCH_BYTES if self.key == OUTPUT_LANE else BATCH_BYTES):
            gathering.through = seq
            self.gathering = Gathered()
            if self.key == OUTPUT_LANE and self.feed.held_bytes() >= SPILL_AT_BYTES:
                self.full.append(projector._spill(gathering))
                self.spilled_bytes += gathering.size
            else:
                self.full.append(gathering)
                self.full_count += len(gathering.items)
                self.full_bytes += gathering.size
            projector._arrived.set()
            projector._urgent.set()

    def take(self) -> Gathered | Prepared:
        """The next batch for the applier: the oldest cut at BATCH_BYTES, else what is gathered."""
        if self.full:
            batch = self.full.popleft()
            if isinstance(batch, Prepared):
                self.spilled_bytes -= batch.size
            else:
                self.full_count -= len(batch.items)
                self.full_bytes -= batch.size
            return batch
        batch, self.gathering = self.gathering, Gathered()
        batch.through = self.feed.expected - 1
        return batch

    def clear(self) -> None:
        for batch in self.full:
            if isinstance(batch, Prepared):
                _unlink_spilled(batch)
        self.gathering = Gathered()
        self.full.clear()
        self.full_count = self.full_bytes = self.spilled_bytes = 0


def _unlink_spilled(batch: Prepared) -> None:
    for path in batch.spilled or ():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _Feed:
    """One pull consumer of one stream, its deliveries gathered (and prepared) for one applier.

    The core log has no holes (no deletes, no purges) and a consumer delivers in order, so a
    missing sequence there is a delivery lost in flight (a server died, a connection broke):
    applying past it would skip it for good (the consumer takes no acks and never redelivers).
    Then nothing more is gathered
    and a new consumer resumes right after the applied position. Only a new consumer's first
    delivery may start past the expected sequence: nothing is stored in between. The output
    stream has holes by design (its limits remove old chunks), so there gaps are accepted.
    The core log's deliveries go to two lanes (_Lane), the output stream's to one.
    """

    def __init__(self, projector: "Projector", *, stream: str, durable: str, filter_subject: str, gaps: bool) -> None:
        self.projector = projector
        self.stream = stream
        self.durable = durable
        self.legacy = projector.legacy_durable  # deleted at the first reset (events/consumers.py)
        self.filter_subject = filter_subject
        self.gaps = gaps
        self.lanes = [_Lane(self, None)] if gaps else [_Lane(self, OTHER_LANE), _Lane(self, OUTPUT_LANE)]
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
        """Where a new consumer starts from (after): every lane is complete up to here."""
        applier = self.applier
        return applier.position if applier is not None else 0

    def lane(self, key: str | None) -> _Lane:
        return next(lane for lane in self.lanes if lane.key == key)

    def held_bytes(self) -> int:
        """Payload bytes gathered in memory (spilled batches not counted)."""
        return sum(lane.gathering.size + lane.full_bytes for lane in self.lanes)

    def on_status(self, headers: bytes) -> None:
        """A pull's status (on the event loop): what it asked for will not all come."""
        self.last_heard = time.monotonic()
        status = status_of(headers)
        if status in (404, 408, 409):
            pending = _pending_messages(headers)
            self.credit = max(self.credit - (pending if pending is not None else PULL_BATCH), 0)
            self.projector._arrived.set()

    def on_delivery(self, seq: int, subject: bytes, data: bytes) -> None:
        """A delivery (on the event loop): gathered and prepared at once, in its lane."""
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
        lane = self.lanes[0] if self.gaps else self.lanes[lane_of(subject) == OUTPUT_LANE]
        if seq <= lane.position:
            return  # its lane applied it already (a new consumer starts after the lower lane)
        lane.add(seq, subject, data, now)
        if self.credit < PULL_BATCH:
            self.projector._arrived.set()

    @property
    def ready(self) -> bool:
        return any(lane.ready for lane in self.lanes)

    async def pull(self, intake: RawClient) -> None:
        # as many messages as MAX_GATHER_BYTES hold at the running average size (MAX_CREDIT at most)
        limit = max(16, min(MAX_CREDIT, int(MAX_GATHER_BYTES / max(self.avg_size, 1.0))))
        step = min(PULL_BATCH, max(limit // 4, 1))
        held = sum(len(lane.gathering.items) + lane.full_count for lane in self.lanes)
        spilled = sum(lane.spilled_bytes for lane in self.lanes)
        while self.held_bytes() < MAX_GATHER_BYTES and spilled < SPILL_MAX_BYTES:
            room = limit - self.credit - held
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
        for lane in self.lanes:
            lane.clear()
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
        # set by a system's shutdown: stop() leaves the worker's checkpoint and close running (the
        # file is not read or written by anything else any more) while the bus and the NATS server
        # stop, instead of before (a `corral run` stops ~85 ms sooner); wait_closed() waits for it
        self.close_later = False
        self._closing: asyncio.Future[None] | None = None
        self.applier: RemoteApplier | None = None
        self.output_applier: RemoteApplier | None = None
        self.position_changed = asyncio.Condition()
        self.feeds = [_Feed(self, stream=STREAM, durable=self.durable, filter_subject=ALL_EVENTS, gaps=False)]
        self._intake: RawClient | None = None
        self._arrived = asyncio.Event()
        self._urgent = asyncio.Event()
        self._waiters = 0
        self._last_apply = 0.0
        self._spills = 0
        self._lock = asyncio.Lock()
        self._resync_all = False  # the intake connection was replaced: every consumer starts again
        self._output_checked = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.locked_out: str | None = None  # why the DuckDB file cannot be opened yet, if it cannot
        self.worker_restarts = 0  # DuckDB workers replaced after a failure (health, docs/runbook.md)
        self._worker_failures: deque[float] = deque()

    @property
    def position(self) -> int:
        """Every event of the core log up to this sequence is applied (both lanes)."""
        if self.applier is None:
            return 0
        return min(lane.through for lane in self.feeds[0].lanes)

    @property
    def others_position(self) -> int:
        """Every event of the core log but output chunks is applied up to this sequence."""
        if self.applier is None:
            return 0
        return self.feeds[0].lane(OTHER_LANE).through

    @property
    def applied_upto(self) -> int:
        """The highest sequence of the core log either lane applied (a rebuild catches up to it)."""
        if self.applier is None:
            return 0
        return max(self.applier.lanes.values())

    def _spill(self, batch: Gathered) -> Prepared:
        """Write a cut output batch to disk (a flood's backlog); the reader goes on."""
        assert self.worker is not None
        self._spills += 1
        return batch.spill(self.worker.tmp_dir / f"spill-{os.getpid()}-{id(self)}-{self._spills}.ndjson")

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
        if self.worker_restarts:
            record["worker_restarts"] = self.worker_restarts
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
            # the one `corral run` started first thing (projections/spawn.py), or a new one
            spawned = take_early(self.database)
            worker = ApplyWorker(self.database, tmp_dir=self.tmp_dir, settings=self.duckdb_settings, spawned=spawned)
            await asyncio.to_thread(worker.open)
            self.worker = worker
        else:
            await asyncio.to_thread(self.worker.open, LIVE, self.database)
            self._resync_all = True  # what was gathered for the old file's lanes is read again
            self._arrived.set()
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
                    failed, applying = applying, None
                    try:
                        failed.result()
                    except WorkerFailed as exc:
                        if not await self._replace_worker(exc):
                            raise  # it keeps failing: the projector stops (corral up says so)
                        continue
                worker = self.worker
                if applying is None and worker is not None and not worker.alive():
                    # it died between two applies (killed; a query's memory): replaced now, so that
                    # queries waiting for it are answered without a batch to apply first
                    gone = WorkerFailed(f"the projector's DuckDB worker (pid {worker.pid}) is gone")
                    if not await self._replace_worker(gone):
                        raise gone
                    continue
                broken = getattr(self._intake, "error", None) is not None or any(f.silent() for f in self.feeds)
                if broken or self._resync_all or any(f.lost for f in self.feeds):
                    if applying is not None:
                        await applying  # the position must be final before a consumer restarts at it
                        continue
                    if broken:
                        await self._reconnect()
                    resync_all, self._resync_all = self._resync_all, False
                    for feed in self.feeds:
                        if broken or feed.lost or resync_all:
                            await self._resync(feed)
                    continue
                if time.monotonic() - self._output_checked > OUTPUT_CHECK_S and len(self.feeds) < 2:
                    # in the background: an old nats.conf may make the question wait for a timeout
                    self._output_checked = time.monotonic()
                    self._background(self._check_output_stream())
                assert self._intake is not None
                for feed in self.feeds:
                    await feed.pull(self._intake)
                ready = [lane for f in self.feeds for lane in f.lanes if lane.ready]
                if applying is not None or not ready:
                    # Reading goes on while a batch is applied in the worker.
                    self._arrived.clear()
                    if self.stopping.is_set():
                        continue  # stop() set _arrived before this clear: the loop ends
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), 0.25)
                    continue
                # Adaptive batching: what came is applied once the stream is drained (no delivery
                # for QUIET_S); while messages keep coming they are gathered for up to LINGER_S
                # (or LINGER_EVENTS), and at high rates the apply in flight gathers the next batch.
                # A batch cut at BATCH_BYTES, or someone waiting, is served at once.
                if not self._waiters and not any(lane.full for lane in ready):
                    wait = self._linger(ready)
                    if wait > 0:
                        self._urgent.clear()
                        if self.stopping.is_set():
                            continue
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._urgent.wait(), wait)
                        continue
                # Every event but output first (the other lane: small, and what `corral ps` waits
                # for); the output lanes (the core log's, the output stream's) take turns.
                first = [lane for lane in ready if lane.key == OTHER_LANE]
                turn += 1
                lane = first[0] if first else ready[turn % len(ready)]
                taken = [(lane, lane.take())]
                if lane.key is not None:
                    others = [other for other in lane.feed.lanes if other is not lane]
                    # the other lane holds nothing: it is complete as far as this one was read
                    idle = all(not other.ready and not other.in_flight for other in others)
                    taken[0][1].idle_through = lane.feed.expected - 1 if idle else 0
                    # no backlog in the other one (nothing cut): both in one transaction
                    taken += [(other, other.take()) for other in others if other.ready and not other.full]
                for lane, _ in taken:
                    lane.in_flight = True
                applying = asyncio.create_task(self._apply(taken), name="corral-projector-apply")
                self._last_apply = time.monotonic()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if applying is not None:
                with contextlib.suppress(BaseException):
                    await applying  # a batch in DuckDB's hands finishes (its thread cannot be stopped)
            for feed in self.feeds:
                for lane in feed.lanes:
                    lane.clear()  # spilled batches' files
            if self._intake is not None:
                with contextlib.suppress(Exception):
                    await self._intake.close()

    @staticmethod
    def _linger(ready: list[_Lane]) -> float:
        """How long to gather more before applying what the feeds hold (0: apply now)."""
        if sum(len(f.gathering.items) for f in ready) >= LINGER_EVENTS:
            return 0.0
        now = time.monotonic()
        quiet = max(f.last_delivery for f in ready) + QUIET_S - now
        oldest = min(f.first_at for f in ready) + LINGER_S - now
        return min(quiet, oldest)

    async def _apply(self, taken: list[tuple[_Lane, Gathered | Prepared]]) -> None:
        """Apply one lane's batch, or the batches of both lanes of the core log in one transaction."""
        feed = taken[0][0].feed
        try:
            async with self._lock:
                applier = feed.applier
                assert applier is not None

                def apply() -> None:
                    assert applier is not None
                    batches = []
                    for index, (lane, batch) in enumerate(taken):
                        prepared = batch.prepare(applier.batch_file(index)) if isinstance(batch, Gathered) else batch
                        prepared.lane = lane.key
                        prepared.idle_through = batch.idle_through
                        batches.append(prepared)
                    if len(batches) == 1:
                        applier.apply_prepared(batches[0])
                    else:
                        applier.apply_batches(batches)

                await asyncio.to_thread(apply)
        except BaseException:
            feed.lost = True  # not applied: what the lanes hold is not to be counted as applied
            raise
        finally:
            for lane, batch in taken:
                lane.in_flight = False
                if isinstance(batch, Prepared):
                    _unlink_spilled(batch)
            self._arrived.set()
        async with self.position_changed:
            self.position_changed.notify_all()

    async def stop(self) -> None:
        # the loop's wait ends now, not after up to 0.25 s (every `corral run`'s stop; as Spawner.stop)
        self._arrived.set()
        self._urgent.set()
        await super().stop()

    async def _replace_worker(self, exc: WorkerFailed) -> bool:
        """The DuckDB worker died or failed an apply: end it, open the file in a new one, and read
        the log again from the positions saved with the rows (nothing applied twice, nothing lost).
        False when it failed too often lately, or the projector stops meanwhile."""
        now = time.monotonic()
        while self._worker_failures and now - self._worker_failures[0] > WORKER_FAILURE_WINDOW_S:
            self._worker_failures.popleft()
        self._worker_failures.append(now)
        if len(self._worker_failures) > WORKER_RESTARTS:
            log.error(
                "projector: the DuckDB worker failed %d times within %gs: %s",
                len(self._worker_failures),
                WORKER_FAILURE_WINDOW_S,
                exc,
            )
            return False
        log.error("projector: %s; starting a new DuckDB worker, reading again from the applied positions", exc)
        async with self._lock:
            worker, self.worker = self.worker, None
            self.applier = self.output_applier = None
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, 9)
                await asyncio.to_thread(worker.kill)
        self.worker_restarts += 1
        if not await self._try_open() and not await self._wait_for_database():
            return False
        self._resync_all = True  # every feed starts again right after what the new worker reports applied
        return True

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
        still to apply no longer holds the answer: it is given once every other event up to
        `seq` is applied (the other lane, which never waits behind a flood's output)."""
        started = time.monotonic()
        deadline = started + timeout_s
        self._waiters += 1
        self._urgent.set()

        def behind() -> bool:
            if output_grace_s is not None and time.monotonic() - started >= output_grace_s:
                return self.others_position < seq
            if self.position < seq:
                return True
            out = self.output_position
            return output_seq is not None and out is not None and out < output_seq

        try:
            async with self.position_changed:
                while behind():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    if output_grace_s is not None:  # looked at again after the grace
                        remaining = min(remaining, max(started + output_grace_s - time.monotonic(), 0.05))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.position_changed.wait(), remaining)
            return True
        finally:
            self._waiters -= 1

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
        if self.close_later:  # the system's shutdown stops the bus and the server meanwhile (wait_closed)
            self._closing = asyncio.ensure_future(asyncio.to_thread(self.close_database))
            return
        async with self._lock:
            await asyncio.to_thread(self.close_database)

    def worker_gone(self) -> None:
        """A query found the DuckDB worker gone: the loop looks at it now (and replaces it)."""
        self._arrived.set()
        self._urgent.set()

    async def wait_closed(self) -> None:
        """After stop() with close_later set: wait for the DuckDB worker's checkpoint and close."""
        if self._closing is not None:
            await asyncio.shield(self._closing)
