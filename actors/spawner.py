"""The spawner: queues and claims execution requests, runs each agent under a shim, carries out control.

Work intake is a queue every spawner sees: all unclaimed `execution.requested` events, ordered by
priority then age. A pipeline stage's request is as old as its run (the first request of the run
this spawner saw): a running pipeline's next stage goes before requests made after its run began,
so stage transitions do not wait behind new runs' first stages. A spawner with a free slot claims
the best one with an optimistic append of `execution.claimed` (expected last subject sequence 0),
so a request runs once however many spawners compete. Requests it cannot start yet are recorded
once as `execution.queued`.

Each claimed execution gets a worktree and a shim (actors/shim.py) that owns the agent; the
spawner tails the shim's spool and publishes it. Control requests (input, pause, resume, cancel,
extend, priority) arrive as events; the spawner that owns the execution asks its shim, and the
shim's record of the result is the confirmation. A restarted spawner re-attaches to every shim
left in its run directory and publishes what they spooled meanwhile.
"""

import asyncio
import bisect
import contextlib
import heapq
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

import actors.sandbox as sandbox
from actors import diskquota, gitrun, shadow
from actors.breakers import RUN_LABEL, TemplateBreakers
from actors.bus import Bus
from actors.errors import WorkspaceError
from actors.filetakeover import FileTakeover, wants_takeover
from actors.redact import SECRET_PLACEHOLDER
from actors.runtime import Actor
from actors.sessions import carry_session
from actors.shim import PUBLISHED, SPEC, SPOOL, SpoolWatch, request, socket_address
from actors.shimfork import ForkedShim, ShimStarter
from actors.worktree import add_worktree, linked_gitdir, locate, remove_worktree, repo_root
from events.approvals import approval_line, derived_id
from events.auth import CREDENTIAL_ENV, SERVER_ENV_PREFIX
from events.envelope import Event, decode_event, envelope_bytes, trusted_payload
from events.errors import EventError, WrongLastSequence
from events.publisher import PubAck
from events.stream import MAX_EVENT_BYTES
from events.subjects import EVENT_PREFIX, STREAM, event_subject, events_of_type, split_subject
from events.types import (
    CancelRequested,
    ControlRejected,
    EventData,
    ExecutionClaimed,
    ExecutionExited,
    ExecutionFailed,
    ExecutionQueued,
    ExecutionRequested,
    FileTouched,
    InputRequested,
    PauseRequested,
    PriorityChanged,
    PriorityRequested,
    ProtocolError,
    ResumeRequested,
    TimeoutExtendRequested,
    WorkspaceCreated,
    model_for,
)
from replay.history import follow

TERMINAL = ("execution.exited", "execution.failed")
CONTROL_TYPES = (
    "input.requested",
    "pause.requested",
    "resume.requested",
    "cancel.requested",
    "timeout.extend.requested",
    "priority.requested",
)
APPROVAL_TYPES = ("approval.requested", "approval.granted", "approval.denied", "approval.expired")
POLL_S = 1.0
SAVE_OFFSET_EVERY_S = 5.0
PUMP_GATHER_S = 0.05
HEADER_ROOM = 1024  # of an event's bytes, left for its NATS headers (Nats-Msg-Id)
SHIM_CONNECT_S = 10.0
CLAIMS_AT_ONCE = 64  # claims in flight at once (each an append with an expected sequence)
QUEUED_AT_ONCE = 16  # execution.queued records in flight at once (a check and an append each)
SHIM_EXIT_WAIT_S = 5.0
WATCH_QUIET = b'{"op":"watch","quiet":true}\n'  # the spool is watched with inotify: no byte per append
WATCH_PLAIN = b'{"op":"watch"}\n'  # a byte per spool append
RUN_AGES_KEPT = 100_000  # pipeline runs whose age (first request's sequence) is remembered; the oldest go first


@dataclass
class Pending:
    """An unclaimed request in the queue."""

    execution_id: str
    seq: int
    request: Event
    priority: int
    priority_seq: int = 0
    age: int = 0  # the sequence it queues by: its own, or its pipeline run's first request's (0: its own)

    def order(self) -> tuple[int, int, int]:
        return (-self.priority, self.age or self.seq, self.seq)


@dataclass
class RunningExecution:
    """What the spawner holds for one execution it owns."""

    execution_id: str
    request_id: str
    run_dir: Path
    request: ExecutionRequested | None = None
    shim: subprocess.Popen[bytes] | ForkedShim | None = None
    started: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None
    stop_cause: str | None = None
    # a cancel's grace, when it came before the shim was there to be told (set with stop_reason)
    stop_grace_s: float = CancelRequested.model_fields["grace_s"].default
    shim_started: asyncio.Event = field(default_factory=asyncio.Event)
    pgid: int | None = None


class SpoolTail:
    """How far one shim's spool is published: an open spool, the watch socket, acknowledgements owed.

    The spool and the `published` offset file stay open while the execution runs: opening a file
    per wake-up was most of the spawner's cost with hundreds of agents.
    """

    READ_SIZE = 1 << 20

    def __init__(self, run: RunningExecution, done: "asyncio.Future[None]") -> None:
        self.run = run
        self.done = done  # resolved by the pump when nothing more will be published
        self.fd = -1
        self.published_fd = -1
        self.offset = 0
        self.saved = 0
        self.saved_at = time.monotonic()
        self.sock: socket.socket | None = None
        self.wd: int | None = None  # its inotify watch in the spawner's SpoolWatch (None: told by bytes)
        self.watch_bytes = 0  # bytes read from a quiet watch: its answer, then one at the agent's end
        self.acks: deque[tuple[int, asyncio.Future[PubAck]]] = deque()
        self.terminal: str | None = None

    def open(self) -> None:
        run_dir = self.run.run_dir
        with contextlib.suppress(FileNotFoundError):
            self.offset = int((run_dir / PUBLISHED).read_text().strip() or 0)
        self.saved = self.offset
        self.fd = os.open(run_dir / SPOOL, os.O_RDONLY | os.O_CREAT, 0o600)
        self.published_fd = os.open(run_dir / PUBLISHED, os.O_WRONLY | os.O_CREAT, 0o600)

    def read(self) -> bytes:
        """The spool's bytes from the offset (at most READ_SIZE)."""
        return os.pread(self.fd, self.READ_SIZE, self.offset)

    def read_line(self, first: bytes, limit: int) -> tuple[bytes | None, int]:
        """The whole line at the offset, which is longer than `first` (a read without a newline).

        Returns (the line with its newline, its length), or (None, its length) when it is longer
        than `limit` (only its end is looked for, nothing more is kept), or (None, 0) while its
        newline is not written yet.
        """
        parts = [first]
        size = len(first)
        while True:
            more = os.pread(self.fd, self.READ_SIZE, self.offset + size)
            if not more:
                return None, 0
            newline = more.find(b"\n")
            taken = more if newline < 0 else more[: newline + 1]
            size += len(taken)
            if size <= limit:
                parts.append(taken)
            else:
                parts.clear()
            if newline >= 0:
                return (b"".join(parts) if parts else None), size

    def save(self) -> None:
        """Remember the offset below which every line is stored (fixed width: one write, no truncation)."""
        os.pwrite(self.published_fd, b"%020d" % self.saved, 0)
        self.saved_at = time.monotonic()

    def settle(self) -> None:
        """Take the acknowledgements that came; save the offset now and then; raise a failed publish."""
        acks = self.acks
        while acks and acks[0][1].done():
            done_offset, future = acks.popleft()
            future.result()  # a publish that failed for good is raised, not skipped
            self.saved = done_offset
        if self.saved and time.monotonic() - self.saved_at > SAVE_OFFSET_EVERY_S:
            self.save()

    def close_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close_watch(loop)
        for fd in (self.fd, self.published_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.published_fd = -1


class Spawner(Actor):
    """Claims `execution.requested`, owns worktrees, shims and agent processes on its host."""

    name = "spawner"

    def __init__(
        self,
        bus: Bus,
        *,
        worktrees: Path,
        run_root: Path | None = None,
        max_running: int = 16,
        stop_grace_s: float = 5.0,
        cancel_grace_s: float = 10.0,
        template_cancel_grace_s: dict[str, float] | None = None,
        template_scripts: dict[str, dict[str, str]] | None = None,
        secret_env: tuple[str, ...] = (),
        instance: str | None = None,
        sandbox_program: str = sandbox.DEFAULT_BWRAP,
        sandbox_hide: tuple[Path, ...] | None = None,
        policy: dict[str, Any] | None = None,
        policy_templates: dict[str, dict[str, Any] | None] | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.worktrees = worktrees
        self.run_root = run_root or worktrees.parent / "run"
        self.max_running = max_running
        self.stop_grace_s = stop_grace_s
        self.cancel_grace_s = cancel_grace_s  # [defaults] cancel_grace: the hard timeout's grace
        self.template_cancel_grace_s = template_cancel_grace_s or {}  # a template's, over it
        self.template_scripts = template_scripts or {}  # a template's setup and teardown (actors/scripts.py)
        self.secret_env = secret_env
        # The sandbox (actors/sandbox.py): the bwrap binary ([sandbox] bwrap), what agents must not
        # see ($CORRAL_HOME; by default the worktrees and run directories), and the policy whose
        # shell deny list makes binaries unexecutable inside it.
        self.sandbox_program = sandbox_program
        self.sandbox_hide = sandbox_hide if sandbox_hide is not None else (worktrees, self.run_root)
        # [policy] and the templates' policies: each execution's effective policy (its shell lists
        # go into its agent CLI's pre-tool mechanism, actors/adapters)
        self.policy = policy or {}
        self.policy_templates = policy_templates or {}
        self.host = socket.gethostname()
        self.running: dict[str, RunningExecution] = {}
        # of those, the ones whose agent ended (terminal record stored) and whose task still cleans up
        # (the shim's exit, the run directory): their slots are free
        self.ended: set[str] = set()
        self.pending: dict[str, Pending] = {}
        self.claimed: set[str] = set()
        self.queued_recorded: set[str] = set()
        # The queue's order: (Pending.order(), execution id), pushed again when a priority changes;
        # an entry whose request is gone or whose order changed is skipped when it comes up.
        self._queue: list[tuple[tuple[int, int, int], str]] = []
        self.run_ages: dict[str, int] = {}  # pipeline run -> the sequence of its first request seen (oldest first)
        self.shim_starter = ShimStarter(self.run_root)  # shims forked from a warm process (actors/shimfork.py)
        self._roots: dict[str, Path] = {}  # a follow-up's repository -> its top level (repo_root)
        self.breakers = TemplateBreakers()  # open template breakers hold their plain runs (actors/breakers.py)
        self.handled_requests: deque[str] = deque(maxlen=10000)
        self._tasks: set[asyncio.Task[None]] = set()
        self._preparing = asyncio.Semaphore(gitrun.WORKERS["spawn"])  # executions making their workspace
        self._wake = asyncio.Event()
        self._recorder: asyncio.Task[None] | None = None  # records execution.queued beside the claims
        self._record_again = False
        self._subs: list[Any] = []
        self._tails: dict[str, SpoolTail] = {}  # the spools being published, by execution
        self._dirty: dict[str, SpoolTail] = {}  # those to read in the pump's next pass
        self._pump_wake = asyncio.Event()
        self._pump_urgent = asyncio.Event()  # an agent ended: its pass does not wait PUMP_GATHER_S
        self._pump_task: asyncio.Task[None] | None = None
        self._files: FileTakeover | None = None  # the trees of agents whose shim has no inotify
        self._spool_watch: SpoolWatch | None = None  # inotify on every spool (else a byte per append)
        self._watched: dict[int, SpoolTail] = {}  # inotify watch descriptor -> its spool
        self._spools_listened = False  # the loop wakes on the SpoolWatch's descriptor

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "running": len(self.running) - len(self.ended),
            "max_running": self.max_running,
            "queued": len(self.pending),
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        self.run_root.mkdir(parents=True, exist_ok=True)
        self.shim_starter.open()  # it imports while the rest is prepared
        await asyncio.to_thread(diskquota.remount_all, self.worktrees)  # disk-quota images a reboot unmounted
        # Before any shim is adopted or started: shims take inotify instances too (file watching).
        self._spool_watch = SpoolWatch.open()
        if self._spool_watch is not None:
            asyncio.get_running_loop().add_reader(self._spool_watch.fd, self._on_spools)
            self._spools_listened = True
        self._files = FileTakeover(self._publish_touched)  # for shims that get no inotify instance
        adopted = [self._adopt(d) for d in sorted(self.run_root.iterdir()) if (d / SPEC).is_file()]
        plain = [run for run, agent in adopted if agent == "command"]  # agent CLIs never ask through Corral
        if plain:
            retell = asyncio.create_task(self._retell_approvals(plain), name=f"{self.instance}-retell")
            self._tasks.add(retell)
            retell.add_done_callback(self._tasks.discard)
        # Everything already claimed, in one request, so old requests never look pending.
        info = await self.bus.js.stream_info(STREAM, subjects_filter=events_of_type("execution.claimed"))
        self.claimed.update(subject.split(".")[2] for subject in (info.state.subjects or {}))
        js = self.bus.js
        self._subs += await self.breakers.follow(js, self._wake.set)  # before any request is seen
        self._subs.append(
            await js.subscribe(events_of_type("execution.claimed"), cb=self._on_claimed, ordered_consumer=True)
        )
        self._subs.append(
            await js.subscribe(events_of_type("priority.changed"), cb=self._on_priority, ordered_consumer=True)
        )
        self._subs.append(
            await js.subscribe(events_of_type("execution.requested"), cb=self._on_requested, ordered_consumer=True)
        )
        for kind in CONTROL_TYPES:
            self._subs.append(
                await js.subscribe(
                    events_of_type(kind), cb=self._on_control, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
                )
            )
        for kind in APPROVAL_TYPES:
            self._subs.append(
                await js.subscribe(
                    events_of_type(kind), cb=self._on_approval, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
                )
            )

    async def run(self) -> None:
        while not self.stopping.is_set():
            self._wake.clear()
            await self._schedule()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def stop(self) -> None:
        self._wake.set()  # the loop's wait ends now, not at its next poll (POLL_S): a quicker `corral run`
        await super().stop()

    async def on_stop(self) -> None:
        """Stop every agent this spawner runs (SIGTERM, SIGKILL after the grace) and record their exits."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for run in list(self.running.values()):
            run.stop_reason = "spawner_stopped"
            if run.shim_started.is_set():
                with contextlib.suppress(Exception):
                    await request(
                        run.run_dir, {"op": "cancel", "reason": "spawner_stopped", "grace_s": self.stop_grace_s}
                    )
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.stop_grace_s + 10)
        if self._pump_task is not None:
            # Cancel until it ends: Python 3.11's wait_for swallows a cancellation that arrives as
            # the pump's wake-up does (the pump's loop has no other end; a `corral up` hung here).
            while not self._pump_task.done():
                self._pump_task.cancel()
                await asyncio.wait({self._pump_task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        if self._spool_watch is not None:
            asyncio.get_running_loop().remove_reader(self._spool_watch.fd)
            self._spool_watch.close()
            self._spool_watch = None
        if self._files is not None:
            self._files.close()
            self._files = None
        self.shim_starter.close()

    # --- the queue ---------------------------------------------------------------------------

    async def _on_claimed(self, msg: Msg) -> None:
        execution_id, _ = split_subject(msg.subject)
        self.claimed.add(execution_id)
        if self.pending.pop(execution_id, None) is not None:
            self._wake.set()

    async def _on_priority(self, msg: Msg) -> None:
        execution_id, _ = split_subject(msg.subject)
        pending = self.pending.get(execution_id)
        if pending is None:
            return
        with contextlib.suppress(EventError):
            event = decode_event(msg.data)
            if isinstance(event.data, PriorityChanged):
                pending.priority = event.data.priority
                pending.priority_seq = msg.metadata.sequence.stream
                self._enqueue(pending)

    async def _on_requested(self, msg: Msg) -> None:
        execution_id, _ = split_subject(msg.subject)
        seq = msg.metadata.sequence.stream
        if execution_id in self.claimed or execution_id in self.running:
            if RUN_LABEL.encode() in msg.data:  # a claimed stage's: its run's later stages queue by its age
                with contextlib.suppress(Exception):  # (its labels only: no model built per old request)
                    run_id = orjson.loads(msg.data)["data"]["labels"][RUN_LABEL]
                    if isinstance(run_id, str):
                        self._run_age(run_id, seq)
            return
        try:
            event = decode_event(msg.data)
        except EventError:
            return
        if not isinstance(event.data, ExecutionRequested):
            return
        age = self._run_age(event.data.labels.get(RUN_LABEL), seq)
        self._enqueue(Pending(execution_id, seq, event, event.data.priority, age=age))
        self._wake.set()

    def _enqueue(self, pending: Pending) -> None:
        self.pending[pending.execution_id] = pending
        heapq.heappush(self._queue, (pending.order(), pending.execution_id))

    def _best(self, count: int) -> list[Pending]:
        """Take the `count` first requests of the queue that no open circuit breaker holds, in order.

        A heap, not a scan: with thousands of tickets imported at once, looking at every queued
        request at each free slot was a good part of `corral up`'s loop (bench/pipeline.py)."""
        best: list[Pending] = []
        chosen: set[str] = set()
        held: list[tuple[tuple[int, int, int], str]] = []
        queue = self._queue
        while queue and len(best) < count:
            entry = heapq.heappop(queue)
            pending = self.pending.get(entry[1])
            if pending is None or pending.order() != entry[0] or entry[1] in chosen:
                continue  # claimed, or queued again under another order (or twice under this one)
            if self.breakers.holds(pending):
                held.append(entry)
                continue
            best.append(pending)
            chosen.add(entry[1])
        for entry in held:
            heapq.heappush(queue, entry)
        if len(queue) > 2 * len(self.pending) + 1024:  # mostly stale entries: rebuild
            self._queue = [(p.order(), p.execution_id) for p in self.pending.values()]
            heapq.heapify(self._queue)
        return best

    def _run_age(self, run_id: str | None, seq: int) -> int:
        """The sequence a request queues by: a pipeline stage's is its run's first request's (0 otherwise)."""
        if not run_id:
            return 0
        age = self.run_ages.get(run_id)
        if age is None:
            age = self.run_ages[run_id] = seq
            if len(self.run_ages) > RUN_AGES_KEPT:
                del self.run_ages[next(iter(self.run_ages))]
        return age

    async def _schedule(self) -> None:
        for queued, reason in await self.breakers.sift(self.bus, self.instance, self.pending.values()):
            if self.pending.pop(queued.execution_id, None) is not None:  # its breaker's escalation was rejected
                await self._claim(queued, cancel=CancelRequested(reason=reason, requested_by=self.instance))
        while self.pending and self._slots_taken() < self.max_running and not self.stopping.is_set():
            # The best requests for the free slots, claimed side by side (a claim is a round trip to
            # the server: one after the other, a burst of 500 waited on 500 of them in a row). A
            # claim lost to another spawner frees its slot for the next round.
            free = min(self.max_running - self._slots_taken(), CLAIMS_AT_ONCE)
            best = self._best(free)
            if not best:
                break  # every queued one is held by an open circuit breaker
            for pending in best:
                self.pending.pop(pending.execution_id, None)
            await asyncio.gather(*(self._claim(pending) for pending in best))
        if self.pending and not self.stopping.is_set():
            self._record_queued_beside()

    def _slots_taken(self) -> int:
        """Agents of this spawner not ended (an ended one's slot is free while its task cleans up)."""
        return len(self.running) - len(self.ended)

    def _record_queued_beside(self) -> None:
        """Record the queue in a task of its own: a slot that frees is claimed at once, not after the
        records (two round trips each: a burst of 1,000 requests made 2,000 in a row before the next claim)."""
        if self._recorder is not None and not self._recorder.done():
            self._record_again = True
            return
        self._recorder = asyncio.create_task(self._record_queued(), name=f"{self.instance}-queued")
        self._tasks.add(self._recorder)
        self._recorder.add_done_callback(self._tasks.discard)

    async def _claim(
        self, pending: Pending, *, cancel: CancelRequested | None = None, cause: str | None = None
    ) -> bool:
        request = pending.request
        try:
            await self.bus.emit(
                request.execution_id,
                ExecutionClaimed(spawner=self.instance, host=self.host),
                actor=self.instance,
                causation_id=request.id,
                expected_last_subject_seq=0,
            )
        except WrongLastSequence:
            self.claimed.add(request.execution_id)
            return False
        self.claimed.add(request.execution_id)
        assert isinstance(request.data, ExecutionRequested)
        if cancel is not None:
            await self.bus.emit(
                request.execution_id,
                ExecutionExited(exit_code=None, duration_s=0.0, reason="cancelled"),
                actor=self.instance,
                causation_id=cause,
            )
            return True
        run = RunningExecution(
            request.execution_id, request.id, self.run_root / request.execution_id, request=request.data
        )
        self.running[run.execution_id] = run
        self._spawn_task(self._execute(run, request.data), run)
        return True

    async def _record_queued(self) -> None:
        """`execution.queued` once for each request waiting (its position then), QUEUED_AT_ONCE at a time."""
        gate = asyncio.Semaphore(QUEUED_AT_ONCE)

        async def record(position: int, pending: Pending) -> None:
            execution_id = pending.execution_id
            async with gate:
                if execution_id not in self.pending or self.stopping.is_set():
                    return  # claimed meanwhile (by this spawner or, as it saw, another)
                with contextlib.suppress(Exception):
                    # Someone may have claimed it since; never mark a claimed execution queued.
                    await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, "execution.claimed"))
                    return
                with contextlib.suppress(WrongLastSequence):
                    await self.bus.emit(
                        execution_id,
                        ExecutionQueued(position=position),
                        actor=self.instance,
                        causation_id=pending.request.id,
                        expected_last_subject_seq=0,
                    )

        while True:
            self._record_again = False
            recorded = self.queued_recorded
            fresh = [p for p in self.pending.values() if p.execution_id not in recorded]
            todo: list[tuple[int, Pending]] = []
            if fresh:  # (the whole queue's order only when some request waits to be recorded)
                orders = sorted(p.order() for p in self.pending.values())
                todo = sorted(((bisect.bisect_left(orders, p.order()) + 1, p) for p in fresh), key=lambda t: t[0])
            recorded.update(p.execution_id for _, p in todo)
            await asyncio.gather(*(record(n, p) for n, p in todo))
            if not self._record_again or self.stopping.is_set():
                return

    # --- control -----------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            return
        if event.id in self.handled_requests:
            return
        self.handled_requests.append(event.id)
        task = asyncio.create_task(self._control(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_approval(self, msg: Msg) -> None:
        """Tell an agent this spawner runs about its approvals, on its stdin (docs/approvals.md)."""
        told = approval_line(msg.data)
        run = self.running.get(told[0]) if told else None
        if told is None or run is None or not run.shim_started.is_set():
            return
        if run.request is not None and run.request.agent != "command":
            return  # an agent CLI's stdin speaks its own protocol; it never asks through Corral's

        with contextlib.suppress(OSError, TimeoutError):
            await request(run.run_dir, {"op": "input", "text": told[1], "once": True})

    async def _retell_approvals(self, runs: list[RunningExecution]) -> None:
        """Tell adopted agents about their approvals again: what was decided while no spawner ran
        would otherwise never reach them. One read of the log's approval events serves them all;
        the shim delivers each line once, so what an agent already got is dropped."""
        wanted = {run.execution_id: run for run in runs}
        lines: dict[str, list[str]] = {}

        async def collect(seq: int, msg: Msg) -> bool:
            told = approval_line(msg.data)
            if told is not None and told[0] in wanted:
                lines.setdefault(told[0], []).append(told[1])
            return False

        await follow(self.bus.js, f"{EVENT_PREFIX}.*.approval.>", collect, stop_when_caught_up=True)

        async def tell(run: RunningExecution, texts: list[str]) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.shim_started.wait(), SHIM_CONNECT_S)
            if not run.shim_started.is_set():
                return  # the agent is gone: its end is recorded by _follow
            for text in texts:
                with contextlib.suppress(OSError, TimeoutError):
                    await request(run.run_dir, {"op": "input", "text": text, "once": True})

        await asyncio.gather(*(tell(wanted[eid], texts) for eid, texts in lines.items()))

    async def _reject(self, event: Event, reason: str) -> None:
        await self.bus.emit(
            event.execution_id,
            ControlRejected(request=event.type, reason=reason),
            actor=self.instance,
            causation_id=event.id,
        )

    async def _control(self, event: Event) -> None:
        data = event.data
        pending = self.pending.get(event.execution_id)
        if pending is not None:
            await self._control_queued(event, pending)
            return
        run = self.running.get(event.execution_id)
        if run is None:
            return  # another spawner's, or finished: the CLI checks state before asking
        if isinstance(data, PriorityRequested):
            await self._reject(event, "it is already running; priority only reorders queued executions")
            return
        if isinstance(data, CancelRequested) and not run.shim_started.is_set():
            run.stop_reason, run.stop_cause, run.stop_grace_s = "cancelled", event.id, data.grace_s
            return
        if not run.shim_started.is_set():
            await asyncio.wait_for(run.shim_started.wait(), SHIM_CONNECT_S)
        op: dict[str, Any]
        match data:
            case InputRequested(text=text):
                op = {"op": "input", "text": text}
            case PauseRequested():
                op = {"op": "pause"}
            case ResumeRequested(max_cost_usd=max_cost):
                op = {"op": "resume", "max_cost_usd": max_cost}
            case CancelRequested(grace_s=grace):
                op = {"op": "cancel", "grace_s": grace, "reason": "cancelled"}
            case TimeoutExtendRequested(seconds=seconds):
                op = {"op": "extend", "seconds": seconds}
            case _:
                return
        try:
            reply = await request(run.run_dir, {**op, "cause": event.id})
        except (OSError, TimeoutError) as exc:
            reply = {"ok": False, "error": f"the agent's shim did not answer ({exc or type(exc).__name__})"}
        if not reply.get("ok"):
            await self._reject(event, str(reply.get("error") or "refused"))

    async def _control_queued(self, event: Event, pending: Pending) -> None:
        data = event.data
        if isinstance(data, CancelRequested):
            self.pending.pop(pending.execution_id, None)
            await self._claim(pending, cancel=data, cause=event.id)
        elif isinstance(data, PriorityRequested):
            try:
                await self.bus.emit(
                    event.execution_id,
                    PriorityChanged(priority=data.priority),
                    actor=self.instance,
                    causation_id=event.id,
                    expected_last_subject_seq=pending.priority_seq,
                )
            except WrongLastSequence:
                return  # another spawner recorded it first
            pending.priority = data.priority
            if self.pending.get(pending.execution_id) is pending:
                self._enqueue(pending)
            self._wake.set()

    # --- one execution -----------------------------------------------------------------------

    def _spawn_task(self, coro: Any, run: RunningExecution) -> None:
        task = asyncio.create_task(self._guard(coro, run), name=f"exec-{run.execution_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Any, run: RunningExecution) -> None:
        try:
            await coro
        except Exception as exc:  # a bug here must still leave a record, not a silent hang
            with contextlib.suppress(Exception):
                await self._emit(run, ExecutionFailed(stage="internal", error=repr(exc)))
            raise
        finally:
            self.running.pop(run.execution_id, None)
            self.ended.discard(run.execution_id)
            self._wake.set()

    async def _emit(self, run: RunningExecution, data: EventData, cause: str | None = None) -> PubAck:
        return await self.bus.emit(run.execution_id, data, actor=self.instance, causation_id=cause or run.request_id)

    @staticmethod
    def _unstarted_exit(run: RunningExecution) -> ExecutionExited:
        return ExecutionExited(
            exit_code=None,
            duration_s=0.0,
            reason="cancelled" if run.stop_reason == "cancelled" else "spawner_stopped",
        )

    def _shell_guard(self, spec: dict[str, Any], request: ExecutionRequested, run_dir: Path) -> str | None:
        """Put the execution's shell allow/deny lists into its agent CLI's own pre-tool mechanism.

        The command and environment in `spec` get the CLI's hook or policy file (actors/adapters,
        docs/policy.md "Before a command runs"); `shell_policy` tells the shim's adapter what the
        CLI will refuse (recorded as `shell.blocked`); `readable` lists the files the CLI reads
        for it, which the sandbox shows it read-only. Returns why it cannot be done (one line).
        """
        from actors.adapters import shell_guard
        from actors.policy import PolicyError, effective_policy

        try:
            policy = effective_policy(self.policy, self.policy_templates, request.template, request.policy)
        except PolicyError:
            policy = effective_policy(self.policy, {}, None)  # as the validator falls back
        rules = policy.shell_rules
        try:
            spec["command"], spec["env"], readable = shell_guard(
                request.agent, spec["command"], spec["env"], rules, run_dir
            )
        except (ValueError, OSError) as exc:
            return f"cannot apply the shell policy: {exc}"
        spec["shell_policy"] = {"allow": list(rules.allow), "deny": list(rules.deny)}
        spec["readable"] = readable
        return None

    async def _execute(self, run: RunningExecution, request: ExecutionRequested) -> None:
        branch = f"corral/{run.execution_id}"
        path = self.worktrees / run.execution_id
        if run.stop_reason is not None:  # cancelled (a spawn timeout, a user) before anything was made
            await self._emit(run, self._unstarted_exit(run), run.stop_cause)
            return
        # The repository's top level and base commit: asked now (the requests of a burst waiting for
        # the same lookup share one git process, actors/gitrun.shared), taken below in turn.
        located = None
        if not request.worktree:
            located = asyncio.ensure_future(
                gitrun.shared(("locate", request.repo, request.base), locate, request.repo, request.base)
            )
            located.add_done_callback(_retrieved)
        # A few executions at a time make their workspace, each from start to end (the git steps of
        # 500 at once, interleaved, made the first agent wait for every worktree of the burst).
        async with self._preparing:
            found: tuple[Path, str, str] | WorkspaceError | None = None
            try:  # refused before anything is made when it asks for a sandbox this host cannot make
                if request.worktree:  # a follow-up: its parent's worktree looked at in the same thread hop
                    confinement, found = await gitrun.call(self._sandbox_and_worktree, request)
                else:
                    confinement = await gitrun.call(self._sandbox, request)
            except sandbox.SandboxUnavailable as exc:
                await self._emit(run, ExecutionFailed(stage="spawn", error=str(exc)))
                return
            if request.workspace == "shadow" and confinement["mode"] == "off":  # (the client refuses it first)
                await self._emit(run, ExecutionFailed(stage="spawn", error=shadow.NEEDS_SANDBOX))
                return
            try:  # (git runs in threads, actors/gitrun.py: the loop goes on claiming and publishing)
                if request.worktree:  # a follow-up continues in its parent's worktree and branch
                    if isinstance(found, WorkspaceError):
                        raise found
                    assert found is not None
                    path, branch, base_commit = found
                    repo = await self._repo_root(request.repo)  # (asked of git once per repository)
                else:
                    assert located is not None
                    repo, base_commit = await located
                    # Adds of one repository run side by side; one that raced another is tried again
                    # (actors/worktree.py).
                    await add_worktree(
                        repo, path, branch=branch, commit=base_commit, disk_bytes=request.limits.disk_bytes
                    )
            except WorkspaceError as exc:
                await self._emit(run, ExecutionFailed(stage="workspace", error=str(exc)))
                return
            if run.stop_reason is not None and not request.worktree:
                # Cancelled while its worktree was being made: nothing ran in it, so it goes again.
                with contextlib.suppress(WorkspaceError):
                    await remove_worktree(repo, path, branch=branch)
                await self._emit(run, self._unstarted_exit(run), run.stop_cause)
                return
            if confinement["mode"] != "off" and not request.worktree:  # (a follow-up's: in the hop above)
                # before the validator's baseline of git's files (workspace.created)
                await gitrun.call(sandbox.prepare_worktree, path)
            shadow_root = await gitrun.call(shadow.prepare, path) if request.workspace == "shadow" else None
        # workspace.created is stored while the spec is written and the shim starts (a pipeline's
        # next stage waited for its acknowledgement first); it is awaited before anything else of
        # this execution is recorded, the shim's spool included (_follow), so the log's order holds.
        created = await self.bus.send(
            run.execution_id,
            WorkspaceCreated(
                path=str(path),
                branch=branch,
                repo=str(repo),
                base_commit=base_commit,
                shadow=str(shadow_root) if shadow_root else None,
            ),
            actor=self.instance,
            causation_id=run.request_id,
        )
        created.add_done_callback(_retrieved)
        if run.stop_reason is not None:
            await created
            await self._emit(run, self._unstarted_exit(run), run.stop_cause)
            return
        env = {
            **agent_environment(request.env),
            "CORRAL_EXECUTION_ID": run.execution_id,
            "CORRAL_WORKTREE": str(path),
        }
        if request.resume_session and not request.worktree:  # a fork continuing a session: make it reachable here
            problem = await asyncio.to_thread(carry_session, request.agent, request.resume_session, path, env)
            if problem:
                await created
                await self._emit(run, ExecutionFailed(stage="workspace", error=problem))
                with contextlib.suppress(WorkspaceError):
                    await remove_worktree(repo, path, branch=branch)
                return
        spec = {
            "execution_id": run.execution_id,
            "request_id": run.request_id,
            "command": list(request.command),
            "agent": request.agent,
            "task": request.task,
            "cwd": str(path),
            "env": env,
            "repo": str(repo),
            "branch": branch,
            "hard_timeout_s": request.timeouts.hard,
            "cancel_grace_s": self.template_cancel_grace_s.get(request.template or "", self.cancel_grace_s),
            **self.template_scripts.get(request.template or "", {}),  # setup, teardown: run by the shim
            "memory_bytes": request.limits.memory_bytes,
            "cpus": request.limits.cpus,
            "disk_bytes": request.limits.disk_bytes,
            "pids_max": request.limits.pids_max,
            "max_cost_usd": request.max_cost_usd,
            "secret_env": list(self.secret_env),  # redacted from output by the shim, like *_KEY, *_TOKEN
            "prices": request.prices,
            # an agent CLI that cannot reach its model is ended after this long (actors/shim.py)
            "network_timeout_s": request.timeouts.idle if request.on_stall == "cancel" else None,
            "sandbox": sandbox.for_run(confinement, run.run_dir),  # the shim wraps the command in it
        }
        if shadow_root is not None:  # the overlay's layers (actors/shadow.py), hidden from every agent
            confined = sandbox.for_run(confinement, run.run_dir)
            spec["shadow"] = str(shadow_root)
            spec["sandbox"] = {**confined, "hide": [*confined.get("hide", ()), str(shadow_root.parent)]}
        if confinement["mode"] != "off":  # a CLI's own bubblewrap cannot nest in Corral's
            from actors.adapters import in_corral_sandbox

            spec["command"] = in_corral_sandbox(request.agent, request.command)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        refused = self._shell_guard(spec, request, run.run_dir)  # the shell policy, before a command runs
        if refused is not None:
            await created
            await self._emit(run, ExecutionFailed(stage="spawn", error=refused))
            shutil.rmtree(run.run_dir, ignore_errors=True)
            if not request.worktree:
                await remove_worktree(repo, path, branch=branch)
            return
        (run.run_dir / SPOOL).touch()
        tmp = run.run_dir / (SPEC + ".tmp")
        tmp.write_bytes(orjson.dumps(spec))
        tmp.rename(run.run_dir / SPEC)
        try:
            run.shim = await self.shim_starter.start(run.run_dir) or start_shim(run.run_dir)
        except OSError as exc:
            await created
            await self._emit(run, ExecutionFailed(stage="spawn", error=f"cannot start the shim: {exc}"))
            shutil.rmtree(run.run_dir, ignore_errors=True)
            if not request.worktree:
                await remove_worktree(repo, path, branch=branch)
            return
        try:
            await created
        except BaseException:
            # Its workspace is not on record: no agent runs unrecorded (its shim stops it, SIGTERM).
            with contextlib.suppress(OSError):
                os.kill(run.shim.pid, signal.SIGTERM)
            raise
        await self._follow(run)

    async def _repo_root(self, repo: str) -> Path:
        """A follow-up's repository's top level, asked of git once per repository (a pipeline's next
        stage waits for it; the stage before asked already): a top level that is gone is asked again."""
        root = self._roots.get(repo)
        if root is None or not root.is_dir():
            root = await gitrun.call(repo_root, repo)
            if len(self._roots) >= 1024:
                self._roots.clear()
            self._roots[repo] = root
        return root

    def _sandbox_and_worktree(
        self, request: ExecutionRequested
    ) -> tuple[dict[str, Any], tuple[Path, str, str] | WorkspaceError]:
        """A follow-up's sandbox (SandboxUnavailable: refused) and the worktree it continues in (made
        ready for the sandbox), or why that cannot be used: one thread hop where a pipeline's next
        stage waited for three."""
        confinement = self._sandbox(request)
        assert request.worktree
        try:
            found = existing_worktree(Path(request.worktree))
        except WorkspaceError as exc:
            return confinement, exc
        if confinement["mode"] != "off":  # (its files exist from the stage before: made sure of, no hop of its own)
            sandbox.prepare_worktree(found[0])
        return confinement, found

    def _sandbox(self, request: ExecutionRequested) -> dict[str, Any]:
        """The spec's sandbox for a request (SandboxUnavailable: refused, one line saying what to do)."""
        from actors.policy import SHELL_DENY, PolicyError, effective_policy

        wanted = request.sandbox
        try:
            deny: tuple[str, ...] = effective_policy(
                self.policy, self.policy_templates, request.template, request.policy
            ).shell_deny
        except PolicyError:
            deny = SHELL_DENY
        return sandbox.decide(
            wanted.mode if wanted else None,
            wanted.network if wanted else None,
            program=self.sandbox_program,
            hide=self.sandbox_hide,
            deny=deny,
            allow=wanted.allow if wanted else (),
            path_var=request.env.get("PATH"),  # the agent's, where its run sets one
        )

    def _adopt(self, run_dir: Path) -> tuple[RunningExecution, str]:
        """Take over a shim (alive or not) left by a spawner that is gone; return it and its agent."""
        spec = orjson.loads((run_dir / SPEC).read_bytes())
        run = RunningExecution(spec["execution_id"], spec["request_id"], run_dir)
        self.running[run.execution_id] = run
        self.claimed.add(run.execution_id)
        self._retake_files(run, spec)
        self._spawn_task(self._follow(run), run)
        return run, str(spec.get("agent", "command"))

    def _retake_files(self, run: RunningExecution, spec: dict[str, Any]) -> None:
        """An adopted agent whose tree the spawner before this one watched (its shim had no inotify)."""
        if self._files is None or not self._files.available:
            return
        started = None
        for line in read_from(run.run_dir / SPOOL, 0).splitlines():
            if b'"type":"execution.started"' in line:
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    started = orjson.loads(line)["data"]
            elif any(f'"type":"{kind}"'.encode() in line for kind in TERMINAL):
                return
        if isinstance(started, dict) and wants_takeover(started):
            self._files.take(run.execution_id, spec)

    async def _publish_touched(self, execution_id: str, changes: list[tuple[str, str]]) -> None:
        run = self.running.get(execution_id)
        if run is not None:
            for path, change in changes:
                await self._emit(run, FileTouched(path=path, change=change))  # type: ignore[arg-type]

    async def _follow(self, run: RunningExecution) -> None:
        """Publish the shim's spool until its terminal record is stored; record a lost agent.

        The reading and publishing is done by one pump for all executions (`_pump`); this task
        opens the spool, waits until the pump is done with it, then finishes the execution.
        """
        tail = SpoolTail(run, asyncio.get_running_loop().create_future())
        tail.open()
        if self._spool_watch is not None:  # before the first read, so no append goes unnoticed
            tail.wd = self._spool_watch.add(run.run_dir / SPOOL)
        try:
            await self._watch(tail)
            run.shim_started.set()
            if run.stop_reason == "spawner_stopped":  # the spawner was stopped while this shim started
                with contextlib.suppress(Exception):
                    await request(
                        run.run_dir, {"op": "cancel", "reason": "spawner_stopped", "grace_s": self.stop_grace_s}
                    )
            elif run.stop_reason == "cancelled":  # cancelled while its shim started (_control kept it)
                with contextlib.suppress(Exception):
                    await request(
                        run.run_dir,
                        {"op": "cancel", "reason": "cancelled", "grace_s": run.stop_grace_s, "cause": run.stop_cause},
                    )
            self._tails[run.execution_id] = tail
            if tail.wd is not None:
                self._watched[tail.wd] = tail
            if tail.sock is None:  # the shim is gone already (a short agent): its end is spooled
                self._pump_urgent.set()
            self._mark(tail)
            self._ensure_pump()
            await tail.done
            for done_offset, future in tail.acks:
                await future
                tail.saved = done_offset
            tail.save()
            if tail.terminal is not None:  # the agent's end is stored: its slot is free (the shim's exit
                self.ended.add(run.execution_id)  # and the run directory's removal are bookkeeping)
                self._wake.set()
        finally:
            self._tails.pop(run.execution_id, None)
            if tail.wd is not None:
                self._watched.pop(tail.wd, None)
                if self._spool_watch is not None:
                    self._spool_watch.remove(tail.wd)
            tail.close(asyncio.get_running_loop())
        terminal = tail.terminal
        if terminal is None:
            await self._lost(run)
        elif terminal == "execution.failed" and run.request is not None and not run.request.worktree:
            with contextlib.suppress(WorkspaceError):
                await remove_worktree(
                    repo_root(run.request.repo), self.worktrees / run.execution_id, branch=f"corral/{run.execution_id}"
                )
        if run.shim is not None:  # (polled: no thread held per ending shim)
            deadline = time.monotonic() + SHIM_EXIT_WAIT_S
            while run.shim.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (a pid, no event)
                await asyncio.sleep(0.02)
        await gitrun.call(shutil.rmtree, run.run_dir, True, pool="bookkeeping")

    # --- the spool pump ------------------------------------------------------------------------

    def _ensure_pump(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump(), name=f"{self.instance}-spool-pump")

    def _mark(self, tail: "SpoolTail") -> None:
        self._dirty[tail.run.execution_id] = tail
        self._pump_wake.set()

    async def _pump(self) -> None:
        """Publish what the shims spooled: one pass over every spool that changed, then wait.

        inotify reports every append to a spool (SpoolWatch; without it, a shim writes a byte on
        its watch socket per spool line and the socket's reader callback marks the spool). After a
        wake-up the pump waits PUMP_GATHER_S so that one pass serves the many agents that wrote
        meanwhile (hundreds of agents heartbeating cost tens of passes a second, not a wake-up per
        line), then reads what inotify gathered in one go. An agent's end cuts that wait short
        (its shim's byte on a quiet watch, or its watch stream ending): the end's acknowledgement
        frees a slot, and a pipeline's next stage or a queued request waits for it. Every POLL_S
        every spool is looked at anyway (acknowledgements, the saved offset).
        """
        settled_at = read_all_at = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pump_wake.wait(), POLL_S)
            self._pump_wake.clear()
            if not self._pump_urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pump_urgent.wait(), PUMP_GATHER_S)
            self._pump_urgent.clear()
            self._take_spool_changes()
            now = time.monotonic()
            if now - read_all_at >= SAVE_OFFSET_EVERY_S:
                read_all_at = now  # a safety net: no spool waits long for a wake-up that got lost
                self._dirty.update(self._tails)
            dirty, self._dirty = self._dirty, {}
            for tail in dirty.values():
                if not tail.done.done():
                    try:
                        await self._publish_spool(tail)
                    except Exception as exc:  # this execution's task raises it (and records the failure)
                        fail(tail, exc)
            if now - settled_at >= POLL_S:
                settled_at = now
                for tail in list(self._tails.values()):
                    if not tail.done.done():
                        try:
                            tail.settle()
                        except Exception as exc:
                            fail(tail, exc)

    async def _publish_spool(self, tail: "SpoolTail") -> None:
        """Publish the whole lines a spool gained; resolve `tail.done` once nothing more will come.

        A spool is read a window (READ_SIZE) at a time; a line longer than a window is read whole
        (up to what an event may hold; a longer one is recorded as a `protocol.error`, see
        `_oversized`), so no line, however long, stops the lines after it.
        """
        run = tail.run
        data = tail.read()
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        more = len(data) >= SpoolTail.READ_SIZE
        oversized = 0
        if end == 0 and more:  # one line longer than the window
            whole, length = tail.read_line(data, self.max_line_bytes)
            end = length
            more = length > 0
            if whole is not None:
                lines = [whole[:-1]]
            elif length:
                oversized = length
        send = self.bus.publisher.send
        for line in lines:
            tail.offset += len(line) + 1
            built = self._envelope(run, line)
            if built is None:
                continue
            subject, payload, event_id, kind = built
            if kind in TERMINAL:
                tail.terminal = kind
                if self._files is not None:  # what the spawner watched for it comes before its exit
                    await self._files.release(run.execution_id)
            tail.acks.append((tail.offset, await send(subject, payload, msg_id=event_id)))
        if oversized:
            tail.offset += oversized
            subject, payload, event_id, _ = self._oversized(run, data, oversized)
            tail.acks.append((tail.offset, await send(subject, payload, msg_id=event_id)))
        tail.settle()
        if tail.terminal is not None:
            tail.done.set_result(None)
        elif more:
            self._mark(tail)  # more than one read's worth: go on in the next pass
        elif tail.sock is None:
            if end == 0:
                tail.done.set_result(None)  # the shim is gone and every whole line it wrote is published
            else:
                self._mark(tail)

    @property
    def max_event_bytes(self) -> int:
        """The largest event this spawner publishes: the stream's limit, or the server's if lower,
        less room for the message's headers."""
        server = int(getattr(self.bus.nc, "max_payload", 0) or 0)
        return (min(MAX_EVENT_BYTES, server) if server > 0 else MAX_EVENT_BYTES) - HEADER_ROOM

    @property
    def max_line_bytes(self) -> int:
        """The longest spool line read whole: longer ones cannot become an event (the envelope adds)."""
        return self.max_event_bytes

    def _oversized(self, run: RunningExecution, head: bytes, length: int) -> tuple[str, bytes, str, str]:
        """A `protocol.error` for a spool line too long to publish (its start kept; derived id, so a
        republish after a restart is stored once)."""
        found = head[:40].split(b'"id":"', 1)
        line_id = found[1][:26].decode(errors="replace") if len(found) == 2 else ""
        event_id = derived_id(line_id or f"{run.execution_id}-{length}", "oversized")
        error = ProtocolError(
            line=head[:2000].decode(errors="replace"),
            error=f"a spool line of {length} bytes is longer than the largest event ({self.max_event_bytes} bytes)",
        )
        payload = envelope_bytes(
            event_id,
            error.TYPE,
            run.execution_id,
            datetime.now(UTC),
            self.instance,
            run.request_id,
            run.execution_id,
            error.model_dump(mode="json"),
        )
        return event_subject(run.execution_id, error.TYPE), payload, event_id, error.TYPE

    def _on_spools(self) -> None:
        """inotify has news: wake the pump, and stop listening until its pass has read it all (one
        loop wake-up per pass, however many shims append meanwhile)."""
        if self._spool_watch is not None:
            asyncio.get_running_loop().remove_reader(self._spool_watch.fd)
            self._spools_listened = False
        self._pump_wake.set()

    def _take_spool_changes(self) -> None:
        """Mark the spools inotify saw appended to (every spool if its queue overflowed); listen again."""
        watch = self._spool_watch
        if watch is None:
            return
        changed = watch.read()
        if changed is None:
            self._dirty.update(self._tails)
        else:
            watched = self._watched
            for wd in changed:
                tail = watched.get(wd)
                if tail is not None:
                    self._dirty[tail.run.execution_id] = tail
        if not self._spools_listened:
            asyncio.get_running_loop().add_reader(watch.fd, self._on_spools)
            self._spools_listened = True

    def _on_watch(self, tail: "SpoolTail") -> None:
        """A shim appended to its spool (a byte; an older shim, or no inotify), or exited (end of stream)."""
        sock = tail.sock
        if sock is None:
            return
        try:
            got = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            got = b""
        if not got:
            tail.close_watch(asyncio.get_running_loop())
            self._pump_urgent.set()  # the shim is gone: its last records are spooled
        elif tail.wd is not None:
            tail.watch_bytes += len(got)
            if tail.watch_bytes > 1:  # a quiet watch: the first byte answers the watch, the next
                self._pump_urgent.set()  # says the terminal record is spooled
        self._mark(tail)

    async def _watch(self, tail: "SpoolTail") -> None:
        """Connect to the shim's watch stream; leave `tail.sock` None once the shim is known to be gone."""
        run = tail.run
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + SHIM_CONNECT_S
        pause = 0.001  # a shim not listening yet is asked again soon, then less often
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, socket_address(run.run_dir))
                # quiet: no byte per append, the spool is watched with inotify; a shim of an older
                # version ignores it and sends the bytes anyway (they only mark the spool).
                await loop.sock_sendall(sock, WATCH_QUIET if tail.wd is not None else WATCH_PLAIN)
            except OSError:
                sock.close()
                if run.shim is None or run.shim.poll() is not None or time.monotonic() > deadline:
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.02)
                continue
            tail.sock = sock
            loop.add_reader(sock.fileno(), self._on_watch, tail)
            return

    def _envelope(self, run: RunningExecution, line: bytes) -> tuple[str, bytes, str, str] | None:
        """(subject, payload, event id, type) of one spool line, or None for a line that cannot be read.

        Output and heartbeats of the plain shape the shim writes are encoded directly; every other
        record goes through its model, and one the model refuses becomes a `protocol.error`.
        """
        try:
            record = orjson.loads(line)
            kind = record["type"]
            raw = record["data"]
            event_id = record["id"]
            if type(event_id) is not str:
                raise TypeError("the id is not a string")
            data = trusted_payload(kind, raw)
            if data is None:
                try:
                    data = model_for(kind).model_validate(raw).model_dump(mode="json")
                except ValidationError as exc:
                    error = ProtocolError(line=line.decode(errors="replace")[:2000], error=str(exc).splitlines()[0])
                    kind, data = error.TYPE, error.model_dump(mode="json")
            if kind == "execution.started":
                run.pgid = raw.get("pgid")
                if self._files is not None and wants_takeover(raw):  # no inotify for the shim: the spawner's
                    spec_path = run.run_dir / SPEC
                    spec = orjson.loads(spec_path.read_bytes())
                    if self._files.take(run.execution_id, spec, started_after_ns=spec_path.stat().st_ctime_ns):
                        warnings = [w for w in data.get("warnings") or () if "inotify" not in w]
                        data = {**data, "file_events": True, "warnings": warnings}
            payload = envelope_bytes(
                event_id,
                kind,
                run.execution_id,
                datetime.fromtimestamp(record["ts"], UTC),
                self.instance,
                record.get("cause") or run.request_id,
                run.execution_id,
                data,
            )
            if len(payload) > self.max_event_bytes:  # (its text escaped more in the envelope than in the spool)
                return self._oversized(run, line, len(line) + 1)
            return event_subject(run.execution_id, kind), payload, event_id, kind
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, OSError, EventError) as exc:
            sys.stderr.write(f"corral: spawner: {run.execution_id}: unreadable spool line skipped ({exc})\n")
            return None

    async def _lost(self, run: RunningExecution) -> None:
        """The shim died without recording an exit: kill what is left of the agent, record it lost."""
        await asyncio.to_thread(remove_cgroups, run.run_dir)
        kill_marked(f"CORRAL_EXECUTION_ID={run.execution_id}".encode())
        with contextlib.suppress(OSError, ValueError):  # what it committed in its sandbox, onto its branch
            await asyncio.to_thread(sandbox.sync_branch, orjson.loads((run.run_dir / SPEC).read_bytes()))
        started_at = None
        for line in read_from(run.run_dir / SPOOL, 0).splitlines():
            if b'"type":"execution.started"' in line:
                started_at = float(orjson.loads(line)["ts"])
        if started_at is None:
            await self._emit(run, ExecutionFailed(stage="spawn", error="the shim exited before starting the agent"))
            return
        duration = round(max(0.0, time.time() - started_at), 6)
        await self._emit(run, ExecutionExited(exit_code=None, duration_s=duration, reason="lost"))


def existing_worktree(path: Path) -> tuple[Path, str, str]:
    """(path, branch, HEAD commit) of a worktree a follow-up reuses; WorkspaceError if it is gone.

    The branch is read from the worktree's own HEAD file when it names one under refs/heads (one
    git process instead of two: a pipeline's next stage waits for this); else git is asked, and
    its refusal (a detached HEAD) is the error."""
    if not (path / ".git").exists():
        raise WorkspaceError(str(path), "the worktree to continue in is gone (corral worktrees lists them)")
    branch = _head_branch(path)
    if branch is not None:
        commit = _loose_ref(path, branch)  # no git process when the branch is a plain file (a pipeline's next stage)
        if commit is not None:
            return path, branch, commit
        done = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise WorkspaceError(str(path), f"not a usable worktree: {done.stderr.strip()}")
        return path, branch, done.stdout.strip()
    found = []
    for args in (["symbolic-ref", "--short", "HEAD"], ["rev-parse", "HEAD"]):
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise WorkspaceError(str(path), f"not a usable worktree: {done.stderr.strip()}")
        found.append(done.stdout.strip())
    return path, found[0], found[1]


def _loose_ref(worktree: Path, branch: str) -> str | None:
    """The commit a linked worktree's branch names, read from its loose ref file in the common
    directory (`commondir`) as git would read it first; None where it is not one (packed refs,
    reftable, a symbolic ref, a name that is no plain path): git is asked then."""
    gitdir = linked_gitdir(worktree)
    if gitdir is None or any(part in ("", ".", "..") for part in branch.split("/")):
        return None
    try:
        common = (gitdir / (gitdir / "commondir").read_text(errors="replace").strip()).resolve()
        text = (common / "refs" / "heads" / branch).read_text(errors="replace").strip()
    except (OSError, ValueError):
        return None
    return text if len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text) else None


def _head_branch(worktree: Path) -> str | None:
    """The branch a linked worktree's HEAD file names (`ref: refs/heads/NAME`), or None."""
    gitdir = linked_gitdir(worktree)
    try:
        head = (gitdir / "HEAD").read_text(errors="replace").strip() if gitdir is not None else ""
    except OSError:
        return None
    name = head.removeprefix("ref: refs/heads/")
    return name if head.startswith("ref: refs/heads/") and name and "\n" not in name else None


def agent_environment(requested: dict[str, str]) -> dict[str, str]:
    """The agent's environment: this spawner's without Corral's NATS credentials, the request's over it.

    A secret the request names with the value `***` (its value is never in an event:
    docs/security.md) keeps this spawner's own value.
    """
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV and not k.startswith(SERVER_ENV_PREFIX)}
    env.update({name: value for name, value in requested.items() if value != SECRET_PLACEHOLDER})
    return env


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """(a lookup whose execution stopped before taking it: its error is not reported as never retrieved)"""
    if not future.cancelled():
        future.exception()


def fail(tail: SpoolTail, exc: BaseException) -> None:
    if not tail.done.done():
        tail.done.set_exception(exc)


def start_shim(run_dir: Path) -> subprocess.Popen[bytes]:
    """Start the shim of one run directory in its own session, so it outlives this spawner."""
    with open(run_dir / "shim.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "actors.shim", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=str(run_dir),
        )


def read_from(path: Path, offset: int) -> bytes:
    """Bytes of a file from an offset (b"" if it is gone)."""
    try:
        with open(path, "rb") as reader:
            reader.seek(offset)
            return reader.read()
    except FileNotFoundError:
        return b""


def remove_cgroups(run_dir: Path) -> None:
    """Kill everything in the cgroups a dead shim made for its agent, and remove them: a daemon
    that dropped its environment (kill_marked cannot find it) still dies (actors/limits.py)."""
    from actors.limits import remove_groups
    from actors.shim import CGROUPS

    try:
        written = orjson.loads((run_dir / CGROUPS).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return  # no cgroup (or the shim died before making one)
    left = remove_groups([Path(p) for p in written.get("paths", [])])
    if left:
        sys.stderr.write(f"corral: spawner: cgroups left after killing their processes: {left}\n")


def kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose environment holds `marker` (NAME=VALUE)."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                os.kill(int(name), signal.SIGKILL)
