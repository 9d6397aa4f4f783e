"""The one client every face uses: the CLI, the HTTP API, the MCP server, tests and third-party scripts.

`Client` owns the operations on a Corral system over NATS (submit, list, status, events, live
control, changes, approvals, history, SQL, health, templates) and returns plain JSON-ready values
(the shapes the HTTP API serves). It raises `CorralError`s whose `message` is the one line the CLI
prints and whose `status` is the HTTP status the API answers with. Faces only parse and render.

    async with Client.connect(Home.from_env()) as client:
        execution_id = await client.submit(RunSpec(repo=".", command=["make", "test"]))
        async for event in client.events(execution_id=execution_id):
            ...

See docs/sdk.md.
"""

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from actors.bus import PermissionRefused
from actors.runtime import health_state, read_health
from corral import attention
from corral.config import load_config, template_rows
from corral.errors import CorralError, Forbidden, UsageError
from corral.home import Home
from corral.ops.approvals import decide, read_book
from corral.ops.base import (
    DURATION,
    _ask_projector,
    parse_since,
    resolve_execution_id,
)
from corral.ops.changes import (
    changed_files,
    commit_changes,
    diff_of,
    rollback_to,
    take_checkpoint,
    workspace,
)
from corral.ops.control import (
    _requester,
    cancel_grace,
    check_input_size,
    execution_row,
    queue_position,
    request_and_wait,
    require_state,
    status_of,
)
from corral.ops.history import (
    MAX_COMPARED,
    ForkPlanned,
    _replay_plan,
    compare_executions,
    compare_many,
    plan_fork,
    search_hits,
)
from corral.ops.history import check_search as check_search  # faces check a search before connecting
from corral.ops.submit import RunSpec as RunSpec  # (defined there; every face imports it from here)
from corral.ops.submit import build_request as build_request
from corral.ops.worktrees import Worktree, _prune_one, inventory, open_pr, prune_plan
from corral.rows import records as row_dicts
from corral.system import System, open_system
from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import (
    ALL_EVENTS,
    API_SQL,
    OUTPUT_STREAM,
    STREAM,
    ack_stream,
    ack_time_ns,
    execution_events,
)
from events.types import (
    CancelRequested,
    EventData,
    ExecutionRequested,
    InputRequested,
    PauseRequested,
    PriorityRequested,
    ResumeRequested,
    TimeoutExtendRequested,
)
from replay.history import OutputExpiry, follow, output_expiry

T = TypeVar("T")
TERMINAL = ("execution.exited", "execution.failed")
RUNNING = ("running", "paused")
QUEUED = ("requested", "queued")
CONFIRM_TIMEOUT_S = 15.0
# `corral ps` during an output flood (issue 20 §5): after this long it no longer waits for output
# chunks still being applied (their counters may lag), only for every other event logged before it.
PS_OUTPUT_GRACE_S = 0.25
PS_COLUMNS = (
    "execution_id, state, requested_at, duration_s, exit_code, signal, command, repo, error, worktree, output_bytes, "
    "exit_reason, agent, template, priority, started_at, ended_at"
)


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as the log stores it (`Client.read_events`): its JSON bytes, not parsed."""

    seq: int  # its sequence in its own stream (`stream`)
    subject: str
    data: bytes
    reply: str  # the delivery's ack subject: which stream, and when the server stored it

    @property
    def type(self) -> str:
        return self.subject.split(".", 3)[3]

    @property
    def stream(self) -> str:
        """CORRAL, or CORRAL_OUTPUT for output under log retention."""
        return OUTPUT_STREAM if ack_stream(self.reply) == OUTPUT_STREAM else STREAM

    @property
    def stored_ns(self) -> int:
        return ack_time_ns(self.reply)


@dataclass(frozen=True)
class ReplayPlan:
    """A replay's request (checked, not sent) and what the original got: its inputs at their offsets
    from its start, and one recorded decision per approval it asked (None: left to a human)."""

    execution_id: str  # the replay's new id
    replay_of: str
    request: ExecutionRequested
    inputs: list[tuple[float, str]]
    decisions: list[dict[str, Any] | None]


@dataclass(frozen=True)
class ForkPlan:
    """A fork's request (checked, not sent), its checkpoint, and the original's inputs before and after it."""

    execution_id: str  # the fork's new id
    fork_of: str
    request: ExecutionRequested
    checkpoint: dict[str, Any]
    inputs: list[tuple[float, str]]  # before the checkpoint, at their offsets
    later: int  # how many it got after
    continues: str | None  # the agent session continued
    not_continued: str | None  # why the conversation is not continued

    @classmethod
    def of(cls, execution_id: str, fork_of: str, planned: ForkPlanned) -> "ForkPlan":
        return cls(
            execution_id,
            fork_of,
            planned.request,
            planned.checkpoint,
            planned.inputs,
            planned.later,
            planned.continues,
            planned.not_continued,
        )


class Client:
    """Operations on one Corral system, as one NATS role (`operator`, `tap`, or the HTTP gateway's `api`).

    `decider`: the bearer token's name when the HTTP gateway acts for one (decisions are recorded
    as taken by it)."""

    def __init__(self, system: System, *, role: str = "operator", decider: str | None = None) -> None:
        self.system = system
        self.role = role
        self.decider = decider
        self._query_wait_s: float | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, home: Home, *, role: str = "operator", actors: tuple[str, ...] | None = None
    ) -> AsyncIterator["Client"]:
        """Join the `corral up` running on `home`, or start a system (every actor) for this context."""
        kwargs: dict[str, Any] = {"role": role}
        if actors is not None:
            kwargs["actors"] = actors
        async with open_system(home, **kwargs) as system:
            yield cls(system, role=role)

    @property
    def home(self) -> Home:
        return self.system.home

    @property
    def read_only(self) -> bool:
        return self.role == "tap"

    def _require_operator(self, action: str) -> None:
        if self.read_only:
            raise Forbidden(f"a read-only (tap) client may not {action}; use an operator token or user")

    # --- ids and queries -----------------------------------------------------------------------

    async def resolve(self, prefix: str) -> str:
        """The one execution id starting with `prefix`, or NotFound."""
        return await resolve_execution_id(self.system, prefix)

    async def query(self, sql: str, *, max_rows: int = 10000, output_grace_s: float | None = None) -> dict[str, Any]:
        """Run SQL (the projector's read-only sandbox) once it applied every event logged so far
        (with `output_grace_s`: after that long, every event but output chunks and heartbeats)."""
        if self._query_wait_s is None:  # the projector stops a query after [sql] timeout
            self._query_wait_s = max(60.0, load_config(self.home).sql.timeout_s + 20.0)
        request: dict[str, Any] = {"sql": sql, "max_rows": max_rows}
        if output_grace_s is not None:
            request["output_grace_s"] = output_grace_s
        try:
            return await _ask_projector(self.system, API_SQL, request, wait_s=self._query_wait_s)
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None

    async def sql(self, sql: str, *, max_rows: int = 10000) -> dict[str, Any]:
        """`corral sql`: {columns, rows, truncated, ...}. Refused statements raise UsageError."""
        if max_rows < 1:
            raise UsageError("max_rows must be 1 or more")
        return await self.query(sql, max_rows=max_rows)

    async def records(
        self, sql: str, *, max_rows: int = 10000, output_grace_s: float | None = None
    ) -> list[dict[str, Any]]:
        """`query`'s answer as one dict per row."""
        result = await self.query(sql, max_rows=max_rows, output_grace_s=output_grace_s)
        return row_dicts(result["columns"], result["rows"])

    # --- submit --------------------------------------------------------------------------------

    async def build_request(self, spec: RunSpec) -> tuple[str, ExecutionRequested]:
        """Check a RunSpec as `corral run` does; return (new execution id, its request): nothing is sent."""
        return await build_request(self.home, spec, system=self.system, requested_by=self.decider)

    async def publish_request(self, execution_id: str, request: ExecutionRequested) -> int:
        """Append the request to the log; return its sequence."""
        self._require_operator("start executions")
        try:
            ack = await self.system.bus.publisher.publish(new_event(execution_id, request, actor=self._actor))
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None
        return int(ack.seq)

    async def append(self, execution_id: str, data: EventData) -> int:
        """Append one event to an execution's log as this client, awaiting no answer (`corral replay`
        re-sends recorded inputs so, at their offsets); return its sequence."""
        self._require_operator(f"append {data.TYPE}")
        try:
            ack = await self.system.bus.publisher.publish(new_event(execution_id, data, actor=self._actor))
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None
        return int(ack.seq)

    async def submit(self, spec: RunSpec) -> str:
        """Check and submit a run; return its execution id (it is queued for a spawner)."""
        self._require_operator("start executions")
        execution_id, request = await self.build_request(spec)
        await self.publish_request(execution_id, request)
        return execution_id

    @property
    def _actor(self) -> str:
        return "api" if self.decider else "cli"

    # --- reading -------------------------------------------------------------------------------

    def _filter(self, *, all: bool, state: str | None, label: str | None) -> str:
        where = [] if all or state else ["state NOT IN ('exited', 'failed')"]
        if state:
            where.append(f"state = {_sql_text(state)}")
        if label:
            name, _, value = label.partition("=")
            where.append(
                f"execution_id IN (SELECT execution_id FROM events WHERE type = 'execution.requested' "
                f"AND data->'labels'->>{_sql_text(name)} = {_sql_text(value)})"
            )
        return f"WHERE {' AND '.join(where)}" if where else ""

    async def executions(
        self,
        *,
        all: bool = False,
        state: str | None = None,
        label: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """`corral ps`: executions, those needing a human first, then newest first; a page of `limit`
        rows from `offset` of that order (the order is SQL's: a page never misses one needing you)."""
        rows = await self.records(
            self._executions_sql(all=all, state=state, label=label, limit=limit, offset=offset),
            output_grace_s=PS_OUTPUT_GRACE_S,
        )
        attention.annotate(rows)
        return rows

    async def executions_page(
        self, *, all: bool = False, state: str | None = None, label: str | None = None, limit: int, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]:
        """`executions` and `count_executions` at once: (how many there are, the page). One query,
        so one round trip to the projector instead of two (GET /api/executions)."""
        sql = self._executions_sql(all=all, state=state, label=label, limit=limit, offset=offset, total=True)
        rows = await self.records(sql, output_grace_s=PS_OUTPUT_GRACE_S)
        total = int(rows[0].pop("_total")) if rows else None
        for row in rows[1:]:
            del row["_total"]
        attention.annotate(rows)
        if total is None:  # an empty page: past the end, or nothing to list
            total = await self.count_executions(all=all, state=state, label=label) if offset else 0
        return total, rows

    def _executions_sql(
        self,
        *,
        all: bool,
        state: str | None,
        label: str | None,
        limit: int | None,
        offset: int,
        total: bool = False,
    ) -> str:
        if (limit is not None and limit < 1) or offset < 0:
            raise UsageError("limit must be 1 or more and offset 0 or more")
        clause = self._filter(all=all, state=state, label=label)
        page = f"LIMIT {int(limit)} OFFSET {int(offset)}" if limit else (f"OFFSET {int(offset)}" if offset else "")
        needing = (
            "(execution_id IN (SELECT execution_id FROM approvals WHERE status IS NULL OR status = 'pending') "
            "OR execution_id IN (SELECT execution_id FROM validations WHERE NOT passed))"
        )
        order = f"{needing} DESC, requested_at DESC"
        columns = f"{PS_COLUMNS}, {attention.MARKS}"
        if total:
            columns += f", (SELECT count(*) FROM executions {clause}) AS _total"
        page_sql = f"SELECT {columns} FROM executions {clause} ORDER BY {order} {page}"
        return attention.annotated(page_sql, "coalesce(_pending, 0) + coalesce(_failed, 0) = 0, requested_at DESC")

    async def count_executions(self, *, all: bool = False, state: str | None = None, label: str | None = None) -> int:
        """How many executions `executions` would list without a limit."""
        result = await self.query(f"SELECT count(*) FROM executions {self._filter(all=all, state=state, label=label)}")
        return int(result["rows"][0][0])

    async def status(self, prefix: str) -> dict[str, Any]:
        """`corral status`: everything known about one execution, live timers from its shim when local."""
        return await status_of(self.system, await self.resolve(prefix))

    async def logs(self, prefix: str, *, tail: int | None = None, stream: str | None = None) -> list[dict[str, Any]]:
        """The output held for an execution: [{seq, ts, stream, n, text}] chunks (the last `tail` lines)."""
        if tail is not None and tail < 0:
            raise UsageError("tail expects a number of lines (0 or more)")
        execution_id = await self.resolve(prefix)
        chunks: list[dict[str, Any]] = []

        async def on_event(seq: int, msg: Msg) -> bool:
            if msg.subject.endswith(".output"):
                event = orjson.loads(msg.data)
                data = event["data"]
                if stream in (None, data["stream"]):
                    chunks.append(
                        {
                            "seq": seq,
                            "ts": event.get("ts"),
                            "stream": data["stream"],
                            "n": data.get("n"),
                            "text": data["text"],
                        }
                    )
            return False

        await follow(self.system.bus.js, execution_events(execution_id), on_event, stop_when_caught_up=True)
        if tail is None:
            return chunks
        lines: deque[dict[str, Any]] = deque(maxlen=tail) if tail else deque(maxlen=0)
        for chunk in chunks:
            for line in str(chunk["text"]).splitlines(keepends=True):
                last = lines[-1] if lines else None
                if last and last["stream"] == chunk["stream"] and not str(last["text"]).endswith("\n"):
                    last["text"] += line
                else:
                    lines.append({**chunk, "text": line})
        return list(lines)

    async def events(
        self,
        *,
        subject: str | None = None,
        execution_id: str | None = None,
        start_seq: int | None = None,
        output_start_seq: int | None = None,
        since: str | None = None,
        since_time: datetime | None = None,
        new_only: bool = False,
        follow_live: bool = True,
    ) -> AsyncIterator[dict[str, Any]]:
        """Events in stored order: each is the envelope plus `seq` and `stream` (CORRAL or CORRAL_OUTPUT).

        `start_seq` is a CORRAL sequence, `output_start_seq` a CORRAL_OUTPUT one (where output sits
        under log retention); `since` is a duration (10m) or a sequence; with `follow_live` the
        iteration goes on with new events until the caller stops it, else it ends once caught up.
        """
        pattern = await self._pattern(subject, execution_id)
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue(maxsize=1000)
        done = asyncio.Event()

        async def on_event(stored: StoredEvent) -> bool:
            data = stored.data
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                event = {"malformed": data.decode(errors="replace")}
            if not isinstance(event, dict):
                event = {"malformed": data.decode(errors="replace")}
            event["seq"] = stored.seq
            event["stream"] = stored.stream
            await queue.put(event)
            return False

        async def run() -> None:
            try:
                await self.read_events(
                    on_event,
                    subject=pattern,
                    start_seq=start_seq,
                    output_start_seq=output_start_seq,
                    since=since,
                    since_time=since_time,
                    new_only=new_only,
                    follow_live=follow_live,
                    done=done,
                )
                await queue.put(None)
            except BaseException as exc:  # handed to the reader
                await queue.put(exc)

        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            done.set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _pattern(self, subject: str | None, execution_id: str | None) -> str:
        pattern = subject or ALL_EVENTS
        if execution_id is not None:
            pattern = execution_events(await self.resolve(execution_id))
        check_subject(pattern)
        return pattern

    async def read_events(
        self,
        on_event: Callable[[StoredEvent], Awaitable[bool]],
        *,
        subject: str | None = None,
        execution_id: str | None = None,
        start_seq: int | None = None,
        output_start_seq: int | None = None,
        since: str | None = None,
        since_time: datetime | None = None,
        new_only: bool = False,
        follow_live: bool = True,
        done: asyncio.Event | None = None,
    ) -> None:
        """Hand each stored event to `on_event` as stored (`StoredEvent`: the bytes, unparsed) in stored
        order, until it returns True, `done` is set, or (without `follow_live`) every event present at
        the start was handed over. Positions as `events` takes them (`corral tap`, `corral logs`)."""
        pattern = await self._pattern(subject, execution_id)
        position: dict[str, Any] = {}
        if start_seq is not None:
            position["start_seq"] = start_seq
        elif since_time is not None:
            position["start_time"] = since_time
        elif since:
            position = parse_since(since)
        elif new_only:
            position["new_only"] = True
        if output_start_seq is not None:
            position["output_start_seq"] = output_start_seq

        async def on_msg(seq: int, msg: Msg) -> bool:
            return await on_event(StoredEvent(seq, msg.subject, msg.data, msg.reply))

        await follow(self.system.bus.js, pattern, on_msg, done=done, stop_when_caught_up=not follow_live, **position)

    async def output_expiry(self) -> OutputExpiry | None:
        """What log retention dropped from the output stream (None: nothing, or no such stream)."""
        return await output_expiry(self.system.bus.js)

    async def wait(self, prefix: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Until the execution has ended (exited or failed); return its status."""
        execution_id = await self.resolve(prefix)
        ended = asyncio.Event()

        async def on_event(seq: int, msg: Msg) -> bool:
            if msg.subject.split(".", 3)[3] in TERMINAL:
                ended.set()
                return True
            return False

        done = asyncio.Event()
        follower = asyncio.create_task(follow(self.system.bus.js, execution_events(execution_id), on_event, done=done))
        try:
            await asyncio.wait_for(ended.wait(), timeout_s)
        except TimeoutError:
            raise CorralError(f"{execution_id} did not end within {timeout_s:g}s") from None
        finally:
            done.set()
            follower.cancel()
            with contextlib.suppress(BaseException):
                await follower
        return await self.status(execution_id)

    # --- live control --------------------------------------------------------------------------

    async def _control(
        self,
        prefix: str,
        allowed: tuple[str, ...],
        action: str,
        data: EventData,
        confirm: tuple[str, ...],
        **kwargs: Any,
    ) -> dict[str, Any]:
        self._require_operator(action)
        execution_id = await self.resolve(prefix)
        row = await execution_row(self.system, execution_id)
        require_state(execution_id, row, allowed, action)
        try:
            return await request_and_wait(self.system, execution_id, data, confirm, actor_name=self._actor, **kwargs)
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None

    async def input(self, prefix: str, text: str) -> dict[str, Any]:
        """Deliver `text` to the agent's stdin as it is (add the newline yourself); the input.delivered event."""
        check_input_size(text)
        return await self._control(prefix, RUNNING, "send input to", InputRequested(text=text), ("input.delivered",))

    async def pause(self, prefix: str, reason: str | None = None) -> dict[str, Any]:
        return await self._control(
            prefix,
            ("running",),
            "pause",
            PauseRequested(reason=reason, requested_by=self.requester),
            ("execution.paused",),
        )

    async def resume(self, prefix: str, reason: str | None = None) -> dict[str, Any]:
        return await self._control(
            prefix, ("paused",), "resume", ResumeRequested(reason=reason), ("execution.resumed",)
        )

    async def cancel(self, prefix: str, *, grace_s: float | None = None, reason: str | None = None) -> dict[str, Any]:
        """Stop an execution (SIGTERM, SIGKILL after the grace); the execution.exited/failed event."""
        if grace_s is not None and grace_s < 0:
            raise UsageError("grace must be 0 or more seconds")
        self._require_operator("cancel")
        execution_id = await self.resolve(prefix)
        if grace_s is None:
            grace_s = cancel_grace(self.home, (await execution_row(self.system, execution_id)).get("template"))
        return await self._control(
            execution_id,
            (*QUEUED, "claimed", *RUNNING),
            "cancel",
            CancelRequested(grace_s=grace_s, reason=reason, requested_by=self.requester),
            (),
            any_cause=TERMINAL,
            timeout_s=grace_s + CONFIRM_TIMEOUT_S,
        )

    async def extend(self, prefix: str, seconds: float) -> dict[str, Any]:
        if seconds <= 0:
            raise UsageError("seconds must be more than 0")
        return await self._control(
            prefix, RUNNING, "extend", TimeoutExtendRequested(seconds=seconds), ("timeout.extended",)
        )

    async def priority(self, prefix: str, priority: int) -> dict[str, Any]:
        answer = await self._control(
            prefix, QUEUED, "reprioritise", PriorityRequested(priority=priority), ("priority.changed",)
        )
        answer["queue_position"] = await queue_position(self.system, str(answer["execution_id"]))
        return answer

    @property
    def requester(self) -> str:
        """Who asks, as recorded in pause/cancel requests: the token's name, else the NATS/OS user."""
        return self.decider or _requester(self.system)

    # --- changes -------------------------------------------------------------------------------

    async def workspace(self, prefix: str) -> dict[str, Any]:
        """An execution's worktree as the log records it: {execution_id, path, repo, branch, base_commit,
        shadow (its overlay, or None), present (the directory is there), checkpoints}."""
        ws = await workspace(self.system, await self.resolve(prefix))
        return {
            "execution_id": ws.execution_id,
            "path": str(ws.path),
            "repo": str(ws.repo),
            "branch": ws.branch,
            "base_commit": ws.base_commit,
            "shadow": str(ws.shadow) if ws.shadow is not None else None,
            "present": ws.present,
            "checkpoints": ws.checkpoints,
        }

    async def checkpoints(self, prefix: str) -> list[dict[str, Any]]:
        return (await workspace(self.system, await self.resolve(prefix))).checkpoints

    async def changes(self, prefix: str, *, since: str | None = None, pending: bool = False) -> list[dict[str, Any]]:
        """Files changed since the base commit (or checkpoint `since`): [{path, status, added, deleted}]
        (a shadow workspace: `state` promoted or pending; `pending`: only those, docs/shadow.md)."""
        ws = await workspace(self.system, await self.resolve(prefix))
        return await changed_files(self.home, ws, since, pending=pending)

    async def diff(
        self,
        prefix: str,
        *,
        paths: list[str] | None = None,
        from_cp: str | None = None,
        to_cp: str | None = None,
        pending: bool = False,
    ) -> dict[str, Any]:
        """{execution_id, from, to, diff}: the unified diff from a checkpoint (or the base) to another (or now)
        (a shadow workspace: `pending` too, the changes not promoted yet; `pending=True`: only those)."""
        ws = await workspace(self.system, await self.resolve(prefix))
        return await diff_of(self.home, ws, paths or [], from_cp, to_cp, pending=pending)

    async def checkpoint(self, prefix: str) -> dict[str, Any]:
        """Take a checkpoint now: the checkpoint.created event, or {checkpoint: None, reason} when
        nothing changed since the last one."""
        self._require_operator("take checkpoints")
        ws = await workspace(self.system, await self.resolve(prefix))
        answer, unchanged = await self._refusals(take_checkpoint(self.system, ws, actor_name=self._actor))
        return (
            answer if answer is not None else {"execution_id": ws.execution_id, "checkpoint": None, "reason": unchanged}
        )

    async def commit(self, prefix: str, message: str, paths: list[str] | None = None) -> dict[str, Any]:
        """Commit the worktree (or these paths, relative to it) on the execution's branch."""
        self._require_operator("commit")
        ws = await workspace(self.system, await self.resolve(prefix))
        return await self._refusals(commit_changes(self.system, ws, message, paths or [], actor_name=self._actor))

    async def rollback(
        self, prefix: str, *, to_cp: str | None = None, paths: list[str] | None = None
    ) -> dict[str, Any]:
        """Restore the worktree (or these paths) to checkpoint `to_cp` (default: the last; "0": the base)."""
        self._require_operator("roll back")
        ws = await workspace(self.system, await self.resolve(prefix))
        _, _, answer = await self._refusals(rollback_to(self.system, ws, to_cp, paths or [], actor_name=self._actor))
        return answer

    async def pr(
        self,
        prefix: str,
        *,
        title: str,
        body: str | None = None,
        base: str | None = None,
        remote: str | None = None,
    ) -> dict[str, Any]:
        """Push the execution's branch and open a pull request on the forge ([forge] in corral.toml)."""
        self._require_operator("open pull requests")
        execution_id = await self.resolve(prefix)
        return await self._refusals(
            open_pr(self.system, execution_id, title=title, body=body, base=base, remote=remote, actor_name=self._actor)
        )

    async def _refusals(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None

    # --- approvals -----------------------------------------------------------------------------

    async def approvals(self, *, all: bool = False, execution_id: str | None = None) -> list[dict[str, Any]]:
        """Pending approvals (oldest first), then with `all` the decided ones (newest first); of one
        execution (an id prefix) when given."""
        target = await self.resolve(execution_id) if execution_id else None
        book = await read_book(self.system)
        now = datetime.now(UTC)
        pending = sorted((a for a in book.approvals.values() if a.state == "pending"), key=lambda a: a.seq)
        decided = sorted((a for a in book.approvals.values() if a.state != "pending"), key=lambda a: -a.seq)
        return [
            {**a.as_dict(), "age_s": round(max(0.0, (now - a.requested_at).total_seconds()), 3)}
            for a in pending + (decided if all else [])
            if target is None or a.execution_id == target
        ]

    async def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        choice: str | None = None,
        note: str | None = None,
        raise_budget: float | None = None,
    ) -> dict[str, Any]:
        """Grant or deny a pending approval (the first decision wins); the approval.granted/denied event.

        Already decided or expired: Conflict, naming who decided when."""
        self._require_operator("decide approvals")
        try:
            return await decide(
                self.system,
                approval_id,
                approve=approve,
                choice=choice,
                note=note,
                raise_budget=raise_budget,
                token=self.decider,
            )
        except PermissionRefused as exc:
            raise Forbidden(_one_line(exc)) from None

    # --- history -------------------------------------------------------------------------------

    async def search(
        self,
        pattern: str,
        *,
        regex: bool = False,
        execution_id: str | None = None,
        event_type: str | None = None,
        since: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        target = await self.resolve(execution_id) if execution_id else None
        return await search_hits(
            self.system, pattern, regex=regex, execution_id=target, event_type=event_type, since=since, limit=limit
        )

    async def plan_replay(self, prefix: str, *, ask_approvals: bool = True) -> ReplayPlan:
        """A replay of an execution (checked, not sent): its recorded request from its base commit,
        secrets left out, and its inputs and approval decisions (None each with `ask_approvals`)."""
        original = await self.resolve(prefix)
        request, inputs, decisions = await _replay_plan(self.system, original, ask_approvals=ask_approvals)
        request = request.model_copy(update={"requested_by": self.decider or request.requested_by})
        return ReplayPlan(new_execution_id(), original, request, inputs, decisions)

    async def replay(self, prefix: str) -> dict[str, Any]:
        """Run an execution again from its base commit with its command and environment (secrets
        left out): {execution_id, replay_of, notes}. Its inputs and approvals are not fed to the
        replay (`corral replay` without --detach does that, following it)."""
        self._require_operator("replay executions")
        plan = await self.plan_replay(prefix)
        original, inputs, decisions, execution_id = plan.replay_of, plan.inputs, plan.decisions, plan.execution_id
        await self.publish_request(execution_id, plan.request)
        notes = []
        if inputs or decisions:
            notes.append(
                f"{original} had {len(inputs)} input(s) and {len(decisions)} approval(s); they are not re-sent "
                "(send input and decide approvals as the replay asks)"
            )
        return {"execution_id": execution_id, "replay_of": original, "notes": notes}

    async def fork(
        self,
        prefix: str,
        *,
        at: str,
        prompt: str | None = None,
        command: list[str] | None = None,
        new_session: bool = False,
    ) -> dict[str, Any]:
        """Start a new execution from checkpoint `at` of another: the same command, `command`, or a new
        `prompt` for its agent (continuing its session unless `new_session`): {execution_id, fork_of,
        checkpoint, continues, notes}. Inputs the original got are not re-sent."""
        self._require_operator("fork executions")
        planned = await self.plan_fork(prefix, at=at, prompt=prompt, command=command, new_session=new_session)
        original, execution_id = planned.fork_of, planned.execution_id
        await self.publish_request(execution_id, planned.request)
        notes = [f"the conversation of {original} is not continued: {planned.not_continued}"] * bool(
            planned.not_continued
        )
        if planned.inputs or planned.later:
            notes.append(f"the {len(planned.inputs) + planned.later} input(s) {original} got are not re-sent")
        return {
            "execution_id": execution_id,
            "fork_of": original,
            "checkpoint": int(planned.checkpoint["n"]),
            "continues": planned.continues,
            "notes": notes,
        }

    async def plan_fork(
        self,
        prefix: str,
        *,
        at: str,
        prompt: str | None = None,
        command: list[str] | None = None,
        new_session: bool = False,
    ) -> ForkPlan:
        """A fork of an execution at checkpoint `at` (checked, not sent); see `fork`."""
        original = await self.resolve(prefix)
        planned = await plan_fork(
            self.system,
            original,
            at=at,
            prompt=prompt,
            command=command,
            new_session=new_session,
            requested_by=self.decider,
        )
        return ForkPlan.of(new_execution_id(), original, planned)

    async def compare(self, first: str, second: str) -> dict[str, Any]:
        return await compare_executions(self.system, await self.resolve(first), await self.resolve(second))

    async def compare_many(self, prefixes: list[str]) -> dict[str, Any]:
        """2 to 10 executions side by side: {executions, tree_diffs (against the first), timeline
        (rows of N entries, None where one has no such event)}."""
        if len(prefixes) < 2 or len(prefixes) > MAX_COMPARED:
            raise UsageError(f"compare takes 2 to {MAX_COMPARED} executions; got {len(prefixes)}")
        return await compare_many(self.system, [await self.resolve(prefix) for prefix in prefixes])

    # --- worktrees -----------------------------------------------------------------------------

    async def worktrees(self, *, orphans: bool = False) -> list[dict[str, Any]]:
        """Every worktree Corral made (on disk and in git, joined with its execution's state); with
        `orphans`, only those with no live execution (docs/worktrees.md)."""
        items = await inventory(self.home, self.system)
        return [item.to_json() for item in items if item.orphan or not orphans]

    async def prune_plan(self, *, older_than: str | None = None) -> dict[str, Any]:
        """What `prune` would look at: {retention_s, retention (as said), outcomes (the worktrees kept
        or skipped, and why), candidates (worktrees past the retention, for `prune_worktree`)}."""
        return await prune_plan(self.home, self.system, older_than)

    async def prune_worktree(
        self, worktree: dict[str, Any], *, force: bool = False, dry_run: bool = False
    ) -> dict[str, Any]:
        """Remove one worktree of `prune_plan`'s candidates and its branch (looked at again first): the
        outcome (removed, would-remove, refused: it holds work and not `force`, failed)."""
        if not dry_run:
            self._require_operator("remove worktrees")
        outcome = await _prune_one(self.system, Worktree(**worktree), force=force, dry_run=dry_run)
        return asdict(outcome)

    # --- system --------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Every actor instance of the health retention: alive or gone; `down` names actors with none alive."""
        try:
            records = await read_health(self.system.bus.js)
            stream = await self.system.bus.js.stream_info(STREAM)
        except NatsError as exc:
            raise CorralError(f"cannot read health records: {_one_line(exc)}") from None
        last_seq = int(stream.state.last_seq)
        now = time.time()
        rows = []
        for record in sorted(records, key=lambda r: (str(r.get("actor", "")), str(r.get("instance", "")))):
            state = health_state(record, now)
            if state == "forgotten":
                continue
            lag = record.get("lag")
            if lag is None and record.get("position") is not None:
                lag = max(0, last_seq - int(record["position"]))
            rows.append(
                {
                    **record,
                    "state": state,
                    "alive": state == "alive",
                    "last_seen_s": round(max(0.0, now - float(record["written_at"])), 1),
                    "lag": lag,
                }
            )
        down = sorted({str(r.get("actor")) for r in rows} - {str(r.get("actor")) for r in rows if r["alive"]})
        return {"log_last_seq": last_seq, "actors": rows, "down": down}

    def templates(self) -> list[dict[str, Any]]:
        """corral.toml's templates, resolved ([defaults] under each)."""
        return template_rows(load_config(self.home))


SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_*>-]+$")


def check_subject(pattern: str) -> None:
    """A subject pattern of the event log (corral.evt.<id>.<type>, `*` and `>` wildcards), else UsageError."""
    tokens = pattern.split(".")
    if (
        not pattern.startswith("corral.evt.")
        or any(not SUBJECT_TOKEN.match(t) for t in tokens)
        or any(">" in t and t != ">" for t in tokens)
        or ">" in tokens[:-1]
        or any("*" in t and t != "*" for t in tokens)
    ):
        raise UsageError(
            f"{pattern!r} is not a subject of the event log; subjects look like corral.evt.<id>.> "
            "or corral.evt.*.execution.exited"
        )


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def since_time(text: str) -> datetime:
    """A duration (90s, 10m, 2h, 1d) before now."""
    match = DURATION.match(text)
    if not match:
        raise UsageError(f"expected a duration like 90s, 10m, 2h or 1d; got {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return datetime.now(UTC) - timedelta(seconds=float(match.group(1)) * unit)
