"""The console's routes: pages (GET), form posts that act (POST, CSRF-checked) and cookie-authenticated SSE.

Every operation goes through the signed-in token's client (`who.client`); a refusal there (a tap
token: 403, a decided approval: 409, ...) reaches the browser as the API's JSON error, which the
script shows as a message.
"""

import functools
import json
import secrets
import shlex
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from corral import attention
from corral.client import Client, RunSpec
from corral.errors import Conflict, CorralError, UsageError
from corral.web import (
    LOGIN_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    STATIC,
    Console,
    EventStream,
    SignIn,
    done,
    html,
    message_of,
    pages,
    safe_next,
    sse,
    wants_json,
    with_message,
)

FLEET_LIMIT = 200
MAX_FLEET_LIMIT = 5000
MAX_COMMENTS = 200
FILTERS = ("state", "agent", "label", "repo", "q")


def _sql(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ids(ids: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in ids if i.isalnum()) or "''"


def _conditions(filters: dict[str, str], *, with_state: bool = True) -> list[str]:
    where = []
    if with_state and filters.get("state"):
        where.append(f"x.state = {_sql(filters['state'])}")
    if filters.get("agent"):
        where.append(f"x.agent = {_sql(filters['agent'])}")
    if filters.get("repo"):
        where.append(f"contains(lower(x.repo), {_sql(filters['repo'].lower())})")
    if filters.get("q"):
        q = _sql(filters["q"].lower())
        where.append(
            f"(contains(x.execution_id, {q}) OR contains(lower(coalesce(x.task, '')), {q}) "
            f"OR contains(lower(array_to_string(x.command, ' ')), {q}) OR contains(lower(x.repo), {q}))"
        )
    if filters.get("id"):
        where.append(f"x.execution_id = {_sql(filters['id'])}")
    if filters.get("label"):
        name, _, value = filters["label"].partition("=")
        where.append(
            "x.execution_id IN (SELECT execution_id FROM events WHERE type = 'execution.requested' "
            f"AND data->'labels'->>{_sql(name.strip())} = {_sql(value.strip())})"
        )
    return where


async def fleet_data(
    client: Client, filters: dict[str, str], limit: int
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, str]]:
    """The fleet's rows (every active run, then the newest `limit`), the counts per state and the state of
    every run not ended yet (so the page can move a count when one changes state)."""
    where = _conditions(filters)
    clause = " AND ".join(where) or "TRUE"
    columns = (
        "x.execution_id, x.state, x.agent, x.repo, x.task, x.command, x.requested_at, x.started_at, "
        "x.ended_at, x.duration_s, x.cost_usd, x.exit_code"
    )
    rows = await client.records(
        f"SELECT {columns} FROM executions x WHERE {clause} AND (x.state NOT IN ('exited', 'failed') "
        f"OR x.execution_id IN (SELECT x.execution_id FROM executions x WHERE {clause} "
        f"ORDER BY x.requested_at DESC LIMIT {int(limit)})) ORDER BY x.requested_at DESC LIMIT {MAX_FLEET_LIMIT}"
    )
    count_clause = " AND ".join(_conditions(filters, with_state=False)) or "TRUE"
    counted = await client.query(f"SELECT x.state, count(*) FROM executions x WHERE {count_clause} GROUP BY 1")
    counts = {str(state): int(n) for state, n in counted["rows"]}
    running = await client.query(
        f"SELECT x.execution_id, x.state FROM executions x WHERE {count_clause} AND x.state NOT IN ('exited', 'failed')"
    )
    active = {str(i): str(state) for i, state in running["rows"]}
    ids = [str(r["execution_id"]) for r in rows]
    if ids:
        quoted = _ids(ids)
        labels = await client.query(
            "SELECT execution_id, data->'labels' FROM events "
            f"WHERE type = 'execution.requested' AND execution_id IN ({quoted})"
        )
        last = await client.query(
            f"SELECT execution_id, arg_max(text, seq) FROM output WHERE execution_id IN ({quoted}) GROUP BY 1"
        )
        progress = await client.query(
            "SELECT execution_id, arg_max(data->>'progress', seq) FROM events "
            f"WHERE type = 'heartbeat' AND execution_id IN ({quoted}) GROUP BY 1"
        )
        label_of = {i: json.loads(v) if isinstance(v, str) else (v or {}) for i, v in labels["rows"]}
        last_of = dict(last["rows"])
        progress_of = dict(progress["rows"])
        need_of = await attention.needs(client.query, ids)
        for row in rows:
            xid = row["execution_id"]
            row["labels"] = label_of.get(xid) or {}
            text = str(last_of.get(xid) or "")
            lines = [line for line in text.splitlines() if line.strip()]
            row["last_line"] = lines[-1] if lines else ""
            row["progress"] = progress_of.get(xid)
            need = need_of.get(xid)
            row["needs"] = attention.needs_text(need) if need else ""
            row["approvals_pending"] = (need or {}).get("approvals_pending", 0)
        rows.sort(key=lambda r: not r["needs"])  # stable: newest first within each group
    return rows, counts, active


async def pending_count(client: Client) -> int:
    try:
        result = await client.query("SELECT count(*) FROM approvals WHERE status IS NULL OR status = 'pending'")
        return int(result["rows"][0][0])
    except CorralError:
        return 0


async def lineage(client: Client, execution_id: str) -> list[dict[str, Any]]:
    """Replays, forks, retries and follow-ups of this execution, and what it is one of."""
    q = _sql(execution_id)
    rows = await client.records(
        "SELECT x.execution_id, x.state, x.replay_of, x.fork_of, x.retry_of, r.data->>'resume_of' AS resume_of "
        "FROM executions x LEFT JOIN events r ON r.execution_id = x.execution_id AND r.type = 'execution.requested' "
        f"WHERE x.execution_id = {q} OR x.replay_of = {q} OR x.fork_of = {q} OR x.retry_of = {q} "
        f"OR r.data->>'resume_of' = {q} ORDER BY x.requested_at"
    )
    links: list[dict[str, Any]] = []
    own = next((r for r in rows if r["execution_id"] == execution_id), None)
    relations = (("replay_of", "replay"), ("fork_of", "fork"), ("retry_of", "retry"), ("resume_of", "follow-up"))
    if own:
        for key, name in relations:
            if own.get(key):
                links.append({"relation": f"{name} of", "execution_id": own[key], "state": None})
    for row in rows:
        if row["execution_id"] == execution_id:
            continue
        for key, name in relations:
            if row.get(key) == execution_id:
                links.append({"relation": name, "execution_id": row["execution_id"], "state": row["state"]})
    return links


async def approval_context(client: Client, approvals: list[dict[str, Any]]) -> None:
    """What led to each pending approval, as far as the tables tell: the run's last tool call (the
    command it wants to run), its last failed validation, its cost for a budget question."""
    ids = sorted({str(a["execution_id"]) for a in approvals if a.get("state") == "pending"})
    if not ids:
        return
    quoted = _ids(ids)
    tools = await client.query(
        "SELECT execution_id, arg_max(coalesce(shell_command, name || ' ' || coalesce(input_summary, '')), seq) "
        f"FROM tool_calls WHERE execution_id IN ({quoted}) GROUP BY 1"
    )
    failed = await client.query(
        "SELECT execution_id, arg_max(CAST(details AS VARCHAR), seq) FROM validations "
        f"WHERE NOT passed AND execution_id IN ({quoted}) GROUP BY 1"
    )
    costs = await client.query(f"SELECT execution_id, cost_usd FROM executions WHERE execution_id IN ({quoted})")
    tool_of, failed_of, cost_of = dict(tools["rows"]), dict(failed["rows"]), dict(costs["rows"])
    for a in approvals:
        if a.get("state") != "pending":
            continue
        xid = a["execution_id"]
        lines = []
        if tool_of.get(xid):
            lines.append(f"last tool call: {str(tool_of[xid])[:500]}")
        if failed_of.get(xid):
            lines.append(f"failed validation: {str(failed_of[xid])[:1500]}")
        if a.get("category") == "budget" or a.get("source") == "budget":
            lines.append(f"cost so far: ${float(cost_of.get(xid) or 0):.4f}")
        if lines:
            a["context"] = "\n".join(lines)


def review_message(comments: list[dict[str, Any]], summary: str) -> str:
    """The line comments as one message for the agent (the text recorded in its input or follow-up event)."""
    lines = ["Review comments on your changes (from the Corral console):"]
    for c in comments:
        lines.append(f"- {c['path']}:{c['line']}: {c['text']}")
    if summary.strip():
        lines.append(f"Overall: {summary.strip()}")
    return "\n".join(line.replace("\r", "") for line in lines) + "\n"


def parse_comments(raw: str) -> list[dict[str, Any]]:
    try:
        items = json.loads(raw or "[]")
    except json.JSONDecodeError:
        raise UsageError("comments: not a JSON list; reload the page") from None
    if not isinstance(items, list) or len(items) > MAX_COMMENTS:
        raise UsageError(f"comments: expected a list of at most {MAX_COMMENTS} comments")
    found = []
    for item in items:
        if not isinstance(item, dict) or not str(item.get("text", "")).strip() or not item.get("path"):
            raise UsageError("comments: each needs a path, a line and a text")
        found.append(
            {"path": str(item["path"]), "line": int(item.get("line") or 0), "text": " ".join(str(item["text"]).split())}
        )
    return found


Handler = Callable[..., Awaitable[Response]]


def form_errors(handler: Handler) -> Handler:
    """A refused form post: the API's JSON error for the script, a page saying it for a browser without it."""

    @functools.wraps(handler)
    async def wrapped(request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(request, *args, **kwargs)
        except CorralError as exc:
            if wants_json(request):
                raise
            return html(pages.problem_page(None, exc.message), exc.status)

    return wrapped


def add_routes(app: FastAPI, console: Console) -> None:
    # --- sign in and out ---------------------------------------------------------------------

    def login_response(request: Request, next_path: str, message: str | None, status: int = 200) -> Response:
        """The sign-in form with a fresh one-time value, set in its cookie too (double submit)."""
        nonce = secrets.token_urlsafe(24)
        response = html(pages.login_page(nonce, next_path, message, error=status != 200), status)
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    @app.get("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return login_response(request, safe_next(request.query_params.get("next")), message_of(request))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await console.form(request)
        address = request.client.host if request.client else "?"
        next_path = safe_next(form.get("next"))
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not secrets.compare_digest(form.get("csrf", "").encode(), nonce.encode()):
            return login_response(request, next_path, "the sign-in form expired; sign in again", 403)
        wait = console.gateway.limiter.blocked_for(address)
        if wait:
            return html(
                pages.login_page(
                    nonce, next_path, f"too many failed sign-ins from {address}; try again in {wait:.0f}s"
                ),
                429,
                {"Retry-After": str(int(wait) + 1)},
            )
        text = form.get("token", "").strip()
        token = console.gateway.tokens.find(text) if text else None
        if token is None:
            console.gateway.limiter.failed(address)
            return html(pages.login_page(nonce, next_path, "unknown or revoked token"), 401)
        sid = console.sessions.open(text, token)
        response = RedirectResponse(next_path, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(
            SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
        )
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout", include_in_schema=False)
    @form_errors
    async def logout(request: Request) -> Response:
        who, _ = await console.acting(request)
        console.sessions.close(who.sid)
        response = RedirectResponse(with_message("/login", "signed out"), status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- fleet ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def fleet(request: Request) -> Response:
        who = await console.who(request)
        filters = {k: request.query_params.get(k, "").strip() for k in FILTERS}
        try:
            limit = max(1, min(MAX_FLEET_LIMIT, int(request.query_params.get("limit") or FLEET_LIMIT)))
        except ValueError:
            limit = FLEET_LIMIT
        rows, counts, active = await fleet_data(who.client, filters, limit)
        total = sum(counts.values())
        approvals = await pending_count(who.client)
        body = pages.fleet_page(
            who,
            rows,
            counts,
            filters,
            active=active,
            limit=limit,
            total=total,
            approvals=approvals,
            message=message_of(request),
        )
        return html(body)

    @app.get("/ui/row/{execution_id}", include_in_schema=False)
    async def fleet_row(request: Request, execution_id: str) -> Response:
        """One fleet row, if it matches the page's filters: for a run that enters the filtered state live."""
        who = await console.who(request)
        filters = {k: request.query_params.get(k, "").strip() for k in FILTERS}
        rows, _, _ = await fleet_data(who.client, {**filters, "id": await who.client.resolve(execution_id)}, 1)
        return html(pages.fleet_row(rows[0])) if rows else Response(status_code=204)

    # --- one execution -------------------------------------------------------------------------

    @app.get("/x/{execution_id}", include_in_schema=False)
    async def execution(request: Request, execution_id: str) -> Response:
        who = await console.who(request)
        try:
            status = await who.client.status(execution_id)
        except CorralError as exc:  # no such execution: a page saying so, not the API's JSON
            return html(pages.problem_page(who, exc.message), exc.status)
        resolved = str(status["execution_id"])
        if resolved != execution_id:
            return RedirectResponse(f"/x/{resolved}", status_code=303)
        links = await lineage(who.client, resolved)
        status.setdefault("task", None)
        if not status.get("task") or not status.get("agent"):
            found = await who.client.records(
                f"SELECT task, agent FROM executions WHERE execution_id = {_sql(resolved)}"
            )
            if found:
                status["task"], status["agent"] = found[0]["task"], found[0]["agent"]
        body = pages.execution_page(
            who, status, links, approvals=await pending_count(who.client), message=message_of(request)
        )
        return html(body)

    @app.get("/ui/x/{execution_id}/events", include_in_schema=False)
    async def execution_events(request: Request, execution_id: str) -> StreamingResponse:
        who = await console.who(request)
        resolved = await who.client.resolve(execution_id)
        return await sse(who, console, request, execution_id=resolved, since="all")

    @app.get("/ui/events", include_in_schema=False)
    async def all_events(request: Request) -> StreamingResponse:
        who = await console.who(request)
        return await sse(who, console, request, subject="corral.evt.>", since=None)

    async def control(request: Request, execution_id: str, action: str) -> Response:
        who, form = await console.acting(request)
        client = who.client
        if action == "input":
            text = form.get("text", "")
            if not text.strip():
                raise UsageError("the input is empty; type a line for the agent")
            answer = await client.input(execution_id, text if text.endswith("\n") else text + "\n")
            message = f"sent {answer.get('data', {}).get('bytes', len(text))} bytes to the agent"
        elif action == "pause":
            await client.pause(execution_id, form.get("reason") or f"paused from the console by {who.token.name}")
            message = "paused"
        elif action == "resume":
            await client.resume(execution_id)
            message = "resumed"
        elif action == "cancel":
            answer = await client.cancel(execution_id, reason=form.get("reason") or "cancelled from the console")
            message = f"cancelled: {answer.get('type')}"
        elif action == "extend":
            try:
                seconds = float(form.get("seconds") or "0")
            except ValueError:
                raise UsageError("extend expects a number of seconds") from None
            await client.extend(execution_id, seconds)
            message = f"hard timeout extended by {seconds:g}s"
        else:
            raise UsageError(f"unknown action {action!r}")
        return done(request, message, back=f"/x/{execution_id}")

    for action in ("input", "pause", "resume", "cancel", "extend"):

        async def handler(request: Request, execution_id: str, action: str = action) -> Response:
            return await control(request, execution_id, action)

        app.add_api_route(
            f"/x/{{execution_id}}/{action}",
            form_errors(handler),
            methods=["POST"],
            include_in_schema=False,
            name=f"web-{action}",
        )

    # --- changes and review --------------------------------------------------------------------

    @app.get("/x/{execution_id}/changes", include_in_schema=False)
    async def changes(request: Request, execution_id: str) -> Response:
        who = await console.who(request)
        try:
            resolved = await who.client.resolve(execution_id)
        except CorralError as exc:
            return html(pages.problem_page(who, exc.message), exc.status)
        params = request.query_params
        from_cp = params.get("from") or None
        to_cp = params.get("to") or None
        view = "split" if params.get("view") == "split" else "unified"
        state_rows = await who.client.records(f"SELECT state FROM executions WHERE execution_id = {_sql(resolved)}")
        state = str(state_rows[0]["state"]) if state_rows else "?"
        checkpoints: list[dict[str, Any]] = []
        files: list[dict[str, Any]] = []
        diff_text = ""
        error = None
        try:
            checkpoints = await who.client.checkpoints(resolved)
            files = await who.client.changes(resolved, since=None if from_cp in (None, "0") else from_cp)
            diff = await who.client.diff(resolved, from_cp=None if from_cp in (None, "0") else from_cp, to_cp=to_cp)
            diff_text = str(diff.get("diff") or "")
        except CorralError as exc:
            error = exc.message
        body = pages.changes_page(
            who,
            resolved,
            state,
            checkpoints,
            files,
            diff_text,
            from_cp=from_cp,
            to_cp=to_cp,
            view=view,
            error=error,
            approvals=await pending_count(who.client),
            message=message_of(request),
        )
        return html(body)

    @app.post("/x/{execution_id}/rollback", include_in_schema=False)
    @form_errors
    async def rollback(request: Request, execution_id: str) -> Response:
        who, form = await console.acting(request)
        paths = [form["path"]] if form.get("path") else []
        to = form.get("to") or None
        await who.client.rollback(execution_id, to_cp=to, paths=paths)
        what = paths[0] if paths else "every file"
        return done(request, f"rolled back {what} to checkpoint {to or 'the last'}", back=f"/x/{execution_id}/changes")

    @app.post("/x/{execution_id}/commit", include_in_schema=False)
    @form_errors
    async def commit(request: Request, execution_id: str) -> Response:
        who, form = await console.acting(request)
        answer = await who.client.commit(execution_id, form.get("message", ""), [])
        commit_id = str((answer.get("data") or {}).get("commit") or "")[:12]
        return done(request, f"committed {commit_id}".strip(), back=f"/x/{execution_id}/changes")

    @app.post("/x/{execution_id}/pr", include_in_schema=False)
    @form_errors
    async def pull_request(request: Request, execution_id: str) -> Response:
        who, form = await console.acting(request)
        title = form.get("title", "").strip()
        if not title:
            raise UsageError("a pull request needs a title")
        answer = await who.client.pr(execution_id, title=title, body=form.get("body") or None)
        url = str(answer.get("url") or (answer.get("data") or {}).get("url") or "")
        return done(request, f"pull request opened {url}".strip(), back=f"/x/{execution_id}/changes")

    @app.post("/x/{execution_id}/review", include_in_schema=False)
    @form_errors
    async def review(request: Request, execution_id: str) -> Response:
        who, form = await console.acting(request)
        comments = parse_comments(form.get("comments", "[]"))
        summary = form.get("summary", "")
        if not comments and not summary.strip():
            raise UsageError("no comments to send: click a line of the diff to comment on it")
        text = review_message(comments, summary)
        status = await who.client.status(execution_id)
        resolved = str(status["execution_id"])
        if status["state"] in ("running", "paused"):
            await who.client.input(resolved, text)
            return done(request, f"{len(comments)} comments sent to the running agent", back=f"/x/{resolved}/changes")
        agent = await who.client.records(f"SELECT agent FROM executions WHERE execution_id = {_sql(resolved)}")
        if not agent or agent[0]["agent"] in (None, "command"):
            raise Conflict(
                f"{resolved} is {status['state']} and is no agent CLI that can be resumed; "
                "start a new run with the comments as its task"
            )
        follow_up = await who.client.submit(RunSpec.model_validate({"resume": resolved, "task": text}))
        return done(
            request,
            f"{len(comments)} comments sent as follow-up {follow_up}",
            back=f"/x/{follow_up}",
            extra={"execution_id": follow_up, "url": f"/x/{follow_up}"},
        )

    # --- approvals -----------------------------------------------------------------------------

    @app.get("/approvals", include_in_schema=False)
    async def approvals(request: Request) -> Response:
        who = await console.who(request)
        found = await who.client.approvals(all=True)
        await approval_context(who.client, found)
        return html(pages.approvals_page(who, found, message=message_of(request)))

    @app.get("/ui/approvals", include_in_schema=False)
    async def approvals_fragment(request: Request) -> Response:
        who = await console.who(request)
        found = await who.client.approvals(all=True)
        await approval_context(who.client, found)
        return html(pages.inbox(found, who.session.csrf))

    @app.post("/approvals/{approval_id}/decide", include_in_schema=False)
    @form_errors
    async def decide(request: Request, approval_id: str) -> Response:
        who, form = await console.acting(request)
        decision = form.get("decision")
        if decision not in ("approve", "reject"):
            raise UsageError("decision must be approve or reject")
        raise_budget = None
        if form.get("raise_budget"):
            try:
                raise_budget = float(form["raise_budget"])
            except ValueError:
                raise UsageError("raise budget expects an amount in USD, like 5 or 2.50") from None
        answer = await who.client.decide(
            approval_id,
            approve=decision == "approve",
            choice=form.get("choice") or None,
            note=form.get("note") or None,
            raise_budget=raise_budget,
        )
        verb = "approved" if answer.get("type") == "approval.granted" else "rejected"
        choice = (answer.get("data") or {}).get("choice")
        return done(request, f"{approval_id} {verb}" + (f" ({choice})" if choice else ""), back="/approvals")

    # --- history, health, start ----------------------------------------------------------------

    @app.get("/search", include_in_schema=False)
    async def search(request: Request) -> Response:
        who = await console.who(request)
        params = {k: request.query_params.get(k, "").strip() for k in ("q", "regex", "execution_id", "type", "since")}
        hits: list[dict[str, Any]] = []
        error = None
        if params["q"]:
            try:
                hits = await who.client.search(
                    params["q"],
                    regex=params["regex"] in ("true", "on", "1"),
                    execution_id=params["execution_id"] or None,
                    event_type=params["type"] or None,
                    since=params["since"] or None,
                    limit=200,
                )
            except CorralError as exc:
                error = exc.message
        return html(pages.search_page(who, params, hits, error, approvals=await pending_count(who.client)))

    @app.get("/compare", include_in_schema=False)
    async def compare(request: Request) -> Response:
        who = await console.who(request)
        a, b = request.query_params.get("a", "").strip(), request.query_params.get("b", "").strip()
        result, error = None, None
        if a and b:
            try:
                result = await who.client.compare(a, b)
            except CorralError as exc:
                error = exc.message
        return html(pages.compare_page(who, a, b, result, error, approvals=await pending_count(who.client)))

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        who = await console.who(request)
        return html(pages.health_page(who, await who.client.health(), approvals=await pending_count(who.client)))

    @app.get("/new", include_in_schema=False)
    async def new_form(request: Request) -> Response:
        who = await console.who(request)
        try:
            templates = who.client.templates()
        except CorralError:
            templates = []
        values = {k: v for k, v in request.query_params.items() if k in ("repo", "agent", "template")}
        return html(pages.new_page(who, templates, approvals=await pending_count(who.client), values=values))

    @app.post("/new", include_in_schema=False)
    @form_errors
    async def start(request: Request) -> Response:
        who, form = await console.acting(request)
        try:
            command = shlex.split(form.get("command", ""))
        except ValueError as exc:
            raise UsageError(f"command: {exc}") from None
        labels = {}
        for word in form.get("labels", "").split():
            name, sep, value = word.partition("=")
            if not sep or not name:
                raise UsageError(f"labels: expected NAME=VALUE words, got {word!r}")
            labels[name] = value
        spec: dict[str, Any] = {
            "repo": form.get("repo", "").strip() or ".",
            "base": form.get("base", "").strip() or "HEAD",
            "command": command,
            "labels": labels,
        }
        for key in ("agent", "task", "template", "timeout", "max_cost"):
            if form.get(key, "").strip():
                spec[key] = form[key].strip() if key != "task" else form[key]
        try:
            run = RunSpec.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise UsageError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        execution_id = await who.client.submit(run)
        return done(
            request,
            f"started {execution_id}",
            back=f"/x/{execution_id}",
            extra={"execution_id": execution_id, "url": f"/x/{execution_id}"},
        )


def mount(app: FastAPI, gateway: Any, events: EventStream) -> None:
    """Serve the console on `app` (corral/http.py's create_app calls this once, with its SSE stream)."""
    console = Console(gateway, events)
    app.mount("/static", StaticFiles(directory=STATIC), name="console-static")

    @app.exception_handler(SignIn)
    async def sign_in(request: Request, exc: SignIn) -> Response:
        if request.method != "GET" or wants_json(request) or request.url.path.startswith("/ui/"):
            return JSONResponse(
                {"error": "not signed in (or the session ended); sign in at /login", "code": 401},
                status_code=401,
                headers=SECURITY_HEADERS,
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    add_routes(app, console)
