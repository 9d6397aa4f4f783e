"""The HTTP API: REST resources and Server-Sent Events over the client (corral/client.py).

`corral up` serves it (127.0.0.1:8765 by default; docs/api.md). Every route but /healthz and
/readyz needs `Authorization: Bearer <token>` (corral/tokens.py); an operator token acts through
the NATS user `api`, a tap token through `tap`, so NATS refuses what the role may not do even if a
check here were missed. State lives on the bus and in DuckDB: any number of `corral up` hosts
may serve the same system and answer alike.

Errors are JSON, `{"error": "<one line>", "code": <status>}`: 400 bad input, 401 no or unknown
token, 403 the role may not, 404 no such thing, 409 already decided / not running, 422 a body that
does not parse, 429 too many failed logins, 503 the bus is down, 504 no actor confirmed in time.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.bus import Bus
from corral import __version__, sse
from corral.client import Client, RunSpec, check_subject
from corral.errors import CorralError, Forbidden, UsageError
from corral.ops.base import parse_since
from corral.system import System, _connect
from corral.tokens import FailureLimiter, Token, TokenBook, tokens_path
from events.errors import EventError
from events.subjects import ALL_EVENTS, OUTPUT_STREAM, execution_events
from projections.errors import ProjectionError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8765"
HEARTBEAT_S = 15.0
NATS_ROLE = {"operator": "api", "tap": "tap"}


class ApiError(CorralError):
    """An HTTP-only error (401, 429) with its status."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# --- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputBody(_Body):
    text: str = Field(description="sent to the agent's stdin as it is (a newline is added unless it ends with one)")


class ReasonBody(_Body):
    reason: str | None = None


class CancelBody(_Body):
    reason: str | None = None
    grace_s: float | None = Field(None, ge=0, description="seconds between SIGTERM and SIGKILL")


class ExtendBody(_Body):
    seconds: float = Field(gt=0)


class PriorityBody(_Body):
    priority: int


class DecisionBody(_Body):
    decision: Literal["approve", "reject"]
    choice: str | None = None
    note: str | None = None
    raise_budget: float | None = Field(None, gt=0, description="a budget approval: continue until this cost (USD)")


class CommitBody(_Body):
    message: str = Field(min_length=1)
    paths: list[str] = Field(default_factory=list, description="relative to the worktree; none: everything")


class RollbackBody(_Body):
    to: int | str | None = Field(None, description="a checkpoint number; 0 is the base commit; none: the last")
    paths: list[str] = Field(default_factory=list, description="relative to the worktree; none: everything")


class PullRequestBody(_Body):
    title: str = Field(min_length=1)
    body: str | None = None
    base: str | None = Field(None, description="branch to merge into (default: the forge's default branch)")
    remote: str | None = Field(None, description="git remote to push to (default: [forge] remote)")


class ForkBody(_Body):
    at: int | str = Field(description="the checkpoint to start from")
    prompt: str | None = Field(None, description="a new task for its agent")
    command: list[str] | None = Field(None, description="another command to run instead")
    new_session: bool = Field(False, description="with prompt: a new conversation instead of continuing it")


class PruneBody(_Body):
    older_than: str | None = Field(None, description="retention, e.g. 7d (default: [worktrees] retention)")
    force: bool = Field(False, description="also remove worktrees holding unmerged or uncommitted work")
    dry_run: bool = Field(False, description="say what would be removed; change nothing")


class SqlBody(_Body):
    sql: str
    max_rows: int = Field(10000, ge=1, le=100000)


class CreatedExecution(BaseModel):
    execution_id: str
    url: str


def _json(data: Any, *, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    """A JSON answer encoded by orjson as it is (FastAPI's own encoder walks every value in Python:
    for a page of executions, most of the time the request took)."""
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, media_type="application/json", headers=headers, status_code=status)


# --- the gateway -------------------------------------------------------------------------------


@dataclass
class Caller:
    token: Token
    client: Client


class Gateway:
    """What the routes share: the system, one NATS connection per role, the tokens, the login limiter."""

    def __init__(self, system: System, *, max_failed_logins: int = 10) -> None:
        self.system = system
        self.tokens = TokenBook(tokens_path(system.home))
        self.limiter = FailureLimiter(limit=max_failed_logins)
        self._buses: dict[str, Bus] = {}
        self._clients: dict[tuple[str, str], Client] = {}
        self._lock = asyncio.Lock()

    async def bus(self, role: str) -> Bus:
        user = NATS_ROLE[role]
        async with self._lock:
            bus = self._buses.get(user)
            if bus is None or bus.nc.is_closed:
                bus = await _connect(self.system.url, name=f"corral-http-{user}", home=self.system.home, role=user)
                self._buses[user] = bus
            return bus

    async def client(self, token: Token) -> Client:
        """The client acting for this token (kept while its connection lives: it caches settings)."""
        bus = await self.bus(token.role)
        key = (token.name, token.role)
        client = self._clients.get(key)
        if client is None or client.system.bus is not bus:
            system = System(home=self.system.home, url=self.system.url, bus=bus, mode="client")
            client = self._clients[key] = Client(system, role=token.role, decider=token.name)
        return client

    async def close(self) -> None:
        for bus in self._buses.values():
            with contextlib.suppress(Exception):
                await bus.close()
        self._buses.clear()


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(
        title="Corral",
        version=__version__,
        description="Supervise headless coding agents: executions, live control, changes, approvals, history. "
        "Authenticate with `Authorization: Bearer <token>` (`corral token create NAME --role operator|tap`).",
    )

    async def caller(request: Request) -> Caller:
        address = _client_address(request)
        wait = gateway.limiter.blocked_for(address)
        if wait:
            raise ApiError(
                f"too many failed logins from {address}; try again in {wait:.0f}s",
                429,
                {"Retry-After": str(int(wait) + 1)},
            )
        header = request.headers.get("authorization", "")
        scheme, _, text = header.partition(" ")
        if scheme.lower() != "bearer" or not text.strip():
            raise ApiError(
                "no bearer token: send `Authorization: Bearer <token>` "
                "(`corral token create NAME --role operator|tap` makes one)",
                401,
                {"WWW-Authenticate": "Bearer"},
            )
        token = gateway.tokens.find(text.strip())
        if token is None:
            gateway.limiter.failed(address)
            raise ApiError("unknown or revoked token", 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return Caller(token, await gateway.client(token))

    Auth = Annotated[Caller, Depends(caller)]

    async def operator(who: Auth) -> Caller:
        if who.token.role != "operator":
            raise Forbidden(f"token {who.token.name!r} is read-only (tap); this needs an operator token")
        return who

    Operator = Annotated[Caller, Depends(operator)]

    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        headers = exc.headers if isinstance(exc, ApiError) else None
        return JSONResponse({"error": exc.message, "code": exc.status}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return JSONResponse({"error": message, "code": 422}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "code": exc.status_code}, status_code=exc.status_code)

    @app.exception_handler(ProjectionError)
    @app.exception_handler(EventError)
    async def bad_data(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc).splitlines()[0], "code": 400}, status_code=400)

    @app.exception_handler(ConnectionClosedError)
    @app.exception_handler(NoServersError)
    async def bus_down(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "the NATS bus is unreachable; retry shortly", "code": 503}, status_code=503)

    @app.exception_handler(NatsTimeoutError)
    async def bus_slow(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "the bus did not answer in time; retry", "code": 504}, status_code=504)

    # --- probes (no token) ---------------------------------------------------------------------

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, Any]:
        """The process answers (liveness)."""
        return {"ok": True}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """The bus is connected (readiness): 503 while it is not."""
        ready = gateway.system.bus.nc.is_connected
        body = {"ok": ready, "nats": gateway.system.url if ready else None}
        return JSONResponse(body, status_code=200 if ready else 503)

    # --- executions ----------------------------------------------------------------------------

    @app.get("/api/executions", tags=["executions"], response_model=list[dict[str, Any]])
    async def list_executions(
        who: Auth,
        all: bool = True,
        state: str | None = None,
        label: Annotated[str | None, Query(description="NAME=VALUE")] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        """Executions, those needing a human first, then newest first (`corral ps --all --json`): a page of
        `limit` from `offset`; the header `X-Total-Count` says how many there are."""
        total, rows = await who.client.executions_page(all=all, state=state, label=label, limit=limit, offset=offset)
        return _json(rows, headers={"X-Total-Count": str(total)})

    @app.post("/api/executions", status_code=201, tags=["executions"])
    async def submit(who: Operator, spec: RunSpec, request: Request) -> CreatedExecution:
        """Start an execution: what `corral run` takes. 201 with its id; it is queued for a spawner."""
        execution_id = await who.client.submit(spec)
        return CreatedExecution(
            execution_id=execution_id, url=str(request.url_for("status", execution_id=execution_id))
        )

    @app.get("/api/executions/{execution_id}", tags=["executions"])
    async def status(who: Auth, execution_id: str) -> dict[str, Any]:
        """Everything known about one execution (`corral status --json`); an id prefix is enough."""
        return await who.client.status(execution_id)

    @app.post("/api/executions/{execution_id}/input", tags=["control"])
    async def send_input(who: Operator, execution_id: str, body: InputBody) -> dict[str, Any]:
        text = body.text if body.text.endswith("\n") else body.text + "\n"
        return await who.client.input(execution_id, text)

    @app.post("/api/executions/{execution_id}/pause", tags=["control"])
    async def pause(who: Operator, execution_id: str, body: ReasonBody | None = None) -> dict[str, Any]:
        return await who.client.pause(execution_id, body.reason if body else None)

    @app.post("/api/executions/{execution_id}/resume", tags=["control"])
    async def resume(who: Operator, execution_id: str, body: ReasonBody | None = None) -> dict[str, Any]:
        return await who.client.resume(execution_id, body.reason if body else None)

    @app.post("/api/executions/{execution_id}/cancel", tags=["control"])
    async def cancel(who: Operator, execution_id: str, body: CancelBody | None = None) -> dict[str, Any]:
        body = body or CancelBody(grace_s=None)
        return await who.client.cancel(execution_id, grace_s=body.grace_s, reason=body.reason)

    @app.post("/api/executions/{execution_id}/extend", tags=["control"])
    async def extend(who: Operator, execution_id: str, body: ExtendBody) -> dict[str, Any]:
        return await who.client.extend(execution_id, body.seconds)

    @app.post("/api/executions/{execution_id}/priority", tags=["control"])
    async def priority(who: Operator, execution_id: str, body: PriorityBody) -> dict[str, Any]:
        return await who.client.priority(execution_id, body.priority)

    @app.get("/api/executions/{execution_id}/logs", tags=["executions"], response_model=list[dict[str, Any]])
    async def logs(
        who: Auth,
        execution_id: str,
        tail: Annotated[int | None, Query(ge=0)] = None,
        stream: Literal["stdout", "stderr"] | None = None,
    ) -> Response:
        """Output held for the execution: chunks {seq, ts, stream, n, text}; with `tail`, the last lines."""
        return _json(await who.client.logs(execution_id, tail=tail, stream=stream))

    @app.get("/api/executions/{execution_id}/workspace", tags=["changes"])
    async def workspace(who: Auth, execution_id: str) -> dict[str, Any]:
        """Its worktree as the log records it: path, repo, branch, base commit, shadow overlay, checkpoints."""
        return await who.client.workspace(execution_id)

    @app.get("/api/executions/{execution_id}/checkpoints", tags=["changes"])
    async def checkpoints(who: Auth, execution_id: str) -> list[dict[str, Any]]:
        return await who.client.checkpoints(execution_id)

    @app.get("/api/executions/{execution_id}/changes", tags=["changes"])
    async def changes(
        who: Auth, execution_id: str, since: str | None = None, pending: bool = False
    ) -> list[dict[str, Any]]:
        """Files changed since the base commit (or checkpoint `since`) to the worktree as it is now
        (a shadow workspace: each with `state` promoted or pending; `pending=true`: only those)."""
        return await who.client.changes(execution_id, since=since, pending=pending)

    @app.get("/api/executions/{execution_id}/diff", tags=["changes"])
    async def diff(
        who: Auth,
        execution_id: str,
        path: Annotated[list[str] | None, Query()] = None,
        from_: Annotated[str | None, Query(alias="from")] = None,
        to: str | None = None,
        pending: bool = False,
    ) -> dict[str, Any]:
        """The unified diff from checkpoint `from` (or the base) to `to` (or now), optionally for some paths
        (a shadow workspace: `pending` too; `pending=true`: only the changes not promoted yet)."""
        return await who.client.diff(execution_id, paths=path, from_cp=from_, to_cp=to, pending=pending)

    @app.post("/api/executions/{execution_id}/checkpoint", tags=["changes"])
    async def checkpoint(who: Operator, execution_id: str) -> dict[str, Any]:
        """Take a checkpoint now (`checkpoint: null` with the reason when nothing changed)."""
        return await who.client.checkpoint(execution_id)

    @app.post("/api/executions/{execution_id}/commit", tags=["changes"])
    async def commit(who: Operator, execution_id: str, body: CommitBody) -> dict[str, Any]:
        """Commit the worktree (or `paths`) on the execution's branch."""
        return await who.client.commit(execution_id, body.message, body.paths)

    @app.post("/api/executions/{execution_id}/rollback", tags=["changes"])
    async def rollback(who: Operator, execution_id: str, body: RollbackBody | None = None) -> dict[str, Any]:
        """Restore the worktree (or `paths`) to checkpoint `to` (default: the last; "0": the base commit)."""
        body = body or RollbackBody(to=None)
        return await who.client.rollback(
            execution_id, to_cp=None if body.to is None else str(body.to), paths=body.paths
        )

    @app.post("/api/executions/{execution_id}/pr", tags=["changes"])
    async def pull_request(who: Operator, execution_id: str, body: PullRequestBody) -> dict[str, Any]:
        """Push the branch and open a pull request ([forge] in corral.toml); 502 when the forge fails."""
        return await who.client.pr(execution_id, title=body.title, body=body.body, base=body.base, remote=body.remote)

    @app.post("/api/executions/{execution_id}/replay", status_code=201, tags=["history"])
    async def replay(who: Operator, execution_id: str) -> dict[str, Any]:
        """Run it again from its base commit (its inputs and approvals are not re-sent): 201 with the new id."""
        return await who.client.replay(execution_id)

    @app.post("/api/executions/{execution_id}/fork", status_code=201, tags=["history"])
    async def fork(who: Operator, execution_id: str, body: ForkBody) -> dict[str, Any]:
        """A new execution from checkpoint `at`: the same command, `command`, or a new `prompt`."""
        return await who.client.fork(
            execution_id, at=str(body.at), prompt=body.prompt, command=body.command, new_session=body.new_session
        )

    @app.get("/api/worktrees", tags=["changes"])
    async def worktrees(who: Auth, orphans: bool = False) -> list[dict[str, Any]]:
        """Every worktree Corral made on this host: state, age, disk, unmerged commits, uncommitted files."""
        return await who.client.worktrees(orphans=orphans)

    @app.post("/api/worktrees/prune", tags=["changes"])
    async def prune(who: Operator, body: PruneBody | None = None) -> list[dict[str, Any]]:
        """Remove finished worktrees past the retention (never ones holding work unless `force`): one
        outcome per worktree looked at (removed, would-remove, refused, kept, skipped, failed)."""
        body = body or PruneBody(older_than=None, force=False, dry_run=False)
        plan = await who.client.prune_plan(older_than=body.older_than)
        outcomes: list[dict[str, Any]] = plan["outcomes"]
        for item in plan["candidates"]:
            outcomes.append(await who.client.prune_worktree(item, force=body.force, dry_run=body.dry_run))
        return outcomes

    @app.get("/api/executions/{execution_id}/events", tags=["events"])
    async def execution_events(
        who: Auth,
        request: Request,
        execution_id: str,
        since: str | None = None,
        follow: bool = True,
    ) -> StreamingResponse:
        """The execution's events from its first (or `since`) as Server-Sent Events; see /api/events."""
        resolved = await who.client.resolve(execution_id)
        return await _sse(who.client, request, execution_id=resolved, since=since or "all", follow=follow)

    # --- approvals -----------------------------------------------------------------------------

    @app.get("/api/approvals", tags=["approvals"])
    async def approvals(who: Auth, all: bool = False, execution_id: str | None = None) -> list[dict[str, Any]]:
        """Pending approvals, oldest first; with `all`, the decided and expired ones after them; of one
        execution with `execution_id`."""
        return await who.client.approvals(all=all, execution_id=execution_id)

    @app.post("/api/approvals/{approval_id}/decision", tags=["approvals"])
    async def decide(who: Operator, approval_id: str, body: DecisionBody) -> dict[str, Any]:
        """Approve or reject (the first decision wins: 409 when already decided); recorded as the token's name."""
        return await who.client.decide(
            approval_id,
            approve=body.decision == "approve",
            choice=body.choice,
            note=body.note,
            raise_budget=body.raise_budget,
        )

    # --- history -------------------------------------------------------------------------------

    @app.get("/api/search", tags=["history"])
    async def search(
        who: Auth,
        q: Annotated[str, Query(min_length=1, description="text (or a regular expression with regex=true)")],
        regex: bool = False,
        execution_id: str | None = None,
        type: str | None = None,
        since: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    ) -> list[dict[str, Any]]:
        return await who.client.search(
            q, regex=regex, execution_id=execution_id, event_type=type, since=since, limit=limit
        )

    @app.get("/api/compare", tags=["history"])
    async def compare(who: Auth, a: str | None = None, b: str | None = None, ids: str | None = None) -> dict[str, Any]:
        """Two executions (`a`, `b`: {a, b, tree_diff, timeline}), or 2 to 10 (`ids=A,B,C`: {executions,
        tree_diffs, timeline}) side by side (`corral compare --json`)."""
        if ids is not None:
            if a is not None or b is not None:
                raise UsageError("give ids=A,B,C or a= and b=, not both")
            return await who.client.compare_many([i.strip() for i in ids.split(",") if i.strip()])
        if a is None or b is None:
            raise UsageError("give a= and b= (two executions) or ids=A,B,C (2 to 10)")
        return await who.client.compare(a, b)

    @app.post("/api/sql", tags=["history"], response_model=dict[str, Any])
    async def sql(who: Auth, body: SqlBody) -> Response:
        """One read-only query in the projections' sandbox (docs/security.md): {columns, rows, truncated}."""
        return _json(await who.client.sql(body.sql, max_rows=body.max_rows))

    @app.get("/api/events", tags=["events"])
    async def events(
        who: Auth,
        request: Request,
        subject: str = "corral.evt.>",
        since: str | None = None,
        follow: bool = True,
    ) -> StreamingResponse:
        """Events as Server-Sent Events. `since`: a sequence, a duration (10m) or `all` (default: new ones).

        Each event's SSE `id` is its stream sequence (with log retention on, `CORE:OUTPUT`, the last
        sequence seen of each stream); reconnect with `Last-Event-ID` to miss nothing and see nothing
        twice. A comment line is sent every 15 s to keep proxies open."""
        return await _sse(who.client, request, subject=subject, since=since, follow=follow)

    # --- system --------------------------------------------------------------------------------

    @app.get("/api/health", tags=["system"])
    async def health(who: Auth) -> dict[str, Any]:
        return await who.client.health()

    @app.get("/api/templates", tags=["system"])
    async def templates(who: Auth) -> list[dict[str, Any]]:
        return who.client.templates()

    # Tickets (issue 18; corral/tickets.py, docs/orchestration.md#tickets): what `corral tickets` does.
    from corral.tickets import TicketSpec, add_tickets, list_tickets

    @app.post("/api/tickets", status_code=201, tags=["orchestration"])
    async def add_ticket(who: Operator, spec: TicketSpec) -> dict[str, Any]:
        """Add a ready ticket; its pipeline runs it. `repo`: a path on the host that runs Corral."""
        return (await add_tickets(who.client, [spec]))[0]

    @app.get("/api/tickets", tags=["orchestration"])
    async def tickets(who: Auth) -> list[dict[str, Any]]:
        """Every ticket, newest first: state, run, reason, the last stage's result (`corral tickets --json`)."""
        return await list_tickets(who.client)

    from corral.pipelines import RunRequest, cancel_run, request_run, run_status

    @app.post("/api/pipelines/{name}/runs", status_code=201, tags=["orchestration"])
    async def run_pipeline(who: Operator, name: str, spec: RunRequest) -> dict[str, Any]:
        """Run a pipeline of corral.toml (`corral pipeline run NAME --detach`); 201 with the run id."""
        return await request_run(who.client, name, spec)

    @app.get("/api/pipelines/runs/{run_id}", tags=["orchestration"])
    async def pipeline_run(who: Auth, run_id: str) -> dict[str, Any]:
        """A run's stages, executions, outcomes and verdicts (`corral pipeline status --json`)."""
        return await run_status(who.client.system, run_id)

    @app.post("/api/pipelines/runs/{run_id}/cancel", tags=["orchestration"])
    async def cancel_pipeline_run(who: Operator, run_id: str) -> dict[str, Any]:
        return await cancel_run(who.client, run_id, f"cancelled over HTTP by {who.token.name}")

    # Webhook triggers (corral/hooks.py, docs/orchestration.md#webhook-triggers): signed, or an operator token.
    from corral.hooks import fire_hook

    @app.post("/api/hooks/{name}", status_code=201, tags=["orchestration"])
    async def hook(name: str, request: Request) -> Response:
        """Fire `[hooks.NAME]`: its pipeline runs with the JSON body's values as variables. Authenticated by
        `X-Corral-Timestamp` + `X-Corral-Signature` (HMAC-SHA256 of `<timestamp>.<body>`) or an operator token."""
        address = _client_address(request)
        token: Token | None = None
        if request.headers.get("authorization"):
            token = (await operator(await caller(request))).token
        elif wait := gateway.limiter.blocked_for(address):
            raise ApiError(f"too many failed logins from {address}; try again in {wait:.0f}s", 429)
        answer = await fire_hook(
            gateway.system.home,
            name,
            dict(request.headers),
            await request.body(),
            token,
            client_for=gateway.client,
            failed=lambda: gateway.limiter.failed(address),
        )
        return _json(answer, status=200 if answer.get("duplicate") else 201)

    from corral.web.routes import mount  # the web console (issue 17): its pages, on this app and gateway

    mount(app, gateway, _sse)
    return app


# --- Server-Sent Events --------------------------------------------------------------------------


def _position(last_event_id: str) -> dict[str, Any]:
    """Where a reconnecting client resumes: after the last sequence it saw of each stream."""
    core, _, output = last_event_id.strip().partition(":")
    try:
        position: dict[str, Any] = {}
        if core not in ("", "-"):
            position["start_seq"] = int(core) + 1
        if output not in ("", "-"):
            position["output_start_seq"] = int(output) + 1
    except ValueError:
        raise UsageError(f"Last-Event-ID {last_event_id!r} is not a position this server gave") from None
    return position


_HUBS = sse.Hubs()  # live consumers shared by the SSE clients of this process, by subject


async def _sse(
    client: Client,
    request: Request,
    *,
    subject: str | None = None,
    execution_id: str | None = None,
    since: str | None = None,
    follow: bool = True,
    hubs: sse.Hubs = _HUBS,
) -> StreamingResponse:
    if subject is not None:
        check_subject(subject)  # bad input answers as JSON, before the stream starts
    if since and since != "all":
        parse_since(since)
    js = client.system.bus.js
    two_streams = False
    with contextlib.suppress(Exception):
        await js.stream_info(OUTPUT_STREAM)
        two_streams = True
    last_event_id = request.headers.get("last-event-id")
    position: dict[str, Any] = {}
    if last_event_id:
        position = _position(last_event_id)
        if "start_seq" not in position and "output_start_seq" in position:  # only output seen so far
            stored = await js.get_msg(OUTPUT_STREAM, seq=position["output_start_seq"] - 1)
            position["since_time"] = stored.time
        elif two_streams and position.get("start_seq", 0) > 1 and "output_start_seq" not in position:
            # No output seen yet: output starts where the last event seen was stored, not where the
            # next one was (output stored between the two would be lost). Read from the last one
            # seen, then skip it.
            position["start_seq"] -= 1
            position["skip_core_through"] = position["start_seq"]
    elif since == "all":
        position = {"start_seq": 1, "output_start_seq": 1 if two_streams else None}
    elif since:
        position = {"since": since}
    else:
        position = {"new_only": True}
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if not two_streams:  # one stream: shared live consumers (corral/sse.py)
        pattern = execution_events(execution_id) if execution_id else (subject or ALL_EVENTS)
        start_time = None
        if "since" in position:
            found = parse_since(position["since"])
            position.update(found)
        hub = hubs.get(js, pattern) if follow else None
        body = sse.stream(
            js,
            hub,
            pattern,
            start_seq=position.get("start_seq"),
            start_time=position.get("start_time", start_time),
            heartbeat_s=HEARTBEAT_S,
        )
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    # Log retention on: both streams, shared live consumers of each, positions CORE:OUTPUT (corral/sse.py).
    pattern = execution_events(execution_id) if execution_id else (subject or ALL_EVENTS)
    if "since" in position:
        position.update(parse_since(position.pop("since")))
    seen = (0, 0)
    if last_event_id:
        core, _, output = last_event_id.strip().partition(":")
        seen = (0 if core in ("", "-") else int(core), 0 if output in ("", "-") else int(output))
    body = sse.merged_stream(
        js,
        hubs.merged(js, pattern) if follow else None,
        pattern,
        catch_up=not position.get("new_only"),
        start_seq=position.get("start_seq"),
        start_time=position.get("start_time", position.get("since_time")),
        output_start_seq=position.get("output_start_seq"),
        seen=seen,
        skip_core_through=int(position.get("skip_core_through", 0)),
        heartbeat_s=HEARTBEAT_S,
    )
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


# --- serving -----------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, or PORT) to bind; a clear error otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--http expects HOST:PORT, e.g. 127.0.0.1:8765; got {text!r}")
    return host, int(port)


class HttpServer:
    """uvicorn in this process's event loop, for as long as `corral up` runs."""

    def __init__(
        self,
        system: System,
        address: str,
        *,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        max_failed_logins: int = 10,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.gateway = Gateway(system, max_failed_logins=max_failed_logins)
        self.app = create_app(self.gateway)
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            timeout_graceful_shutdown=2,
        )
        self.server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.scheme = "https" if ssl_certfile else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raise CorralError when the address cannot be bound (nothing is left behind)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit it: without, a keep-alive response written in two parts
            # (head, body) waits for the client's delayed ACK, 40 ms per request (measured).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise AddressInUse(
                f"cannot serve HTTP on {self.host}:{self.port} ({exc.strerror}); "
                "pick another address with --http HOST:PORT, or --no-http"
            ) from None
        self.port = int(sock.getsockname()[1])
        self._socket = sock
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http")
        while not self.server.started and not self._task.done():  # noqa: ASYNC110 (uvicorn has no event for it)
            await asyncio.sleep(0.02)
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 5)
        await self.gateway.close()
        await _HUBS.close()
        if self._socket is not None:
            self._socket.close()


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: `corral up` owns SIGINT/SIGTERM and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AddressInUse(CorralError):
    """The HTTP address cannot be bound."""
