"""`corral mcp`: the Corral client as MCP tools over stdio, so an agent can start and watch executions.

A coordinator agent (Claude Code with `--mcp-config`, Codex, Gemini CLI) starts `corral mcp` as a
child and calls its tools: run, list, status, logs, events, wait, input, cancel, changes, diff,
approvals, decide, search. Every tool is one call of `corral.client.Client` (the same client the
CLI and the HTTP API use), its result is JSON text, and a refusal or bad input is an MCP tool
error carrying the client's one-line message, so the model reads what to do next instead of a
traceback.

Roles (`--role`), because the agent on the other end is not the operator:

- `tap` (the default): read only (list, status, logs, events, wait, changes, diff, approvals,
  search). A server someone adds to an agent's global settings then cannot start or stop anything.
- `coordinator`: also run, input and cancel; the agent drives other executions. It still cannot
  decide approvals: an approval is the human's gate, and an agent that could approve would approve
  its own requests (or its workers').
- `operator`: everything, decide included (the NATS user that records the decision is `operator`).

The server refuses a tool its role does not allow before anything reaches the bus; the NATS role
behind it refuses again (`tap` connects as the NATS `tap` user, which may not publish control
subjects). The guard is on the tool surface: a process of the same user that can read
CORRAL_HOME's credentials is not confined by it (docs/mcp.md, docs/security.md).

stdout carries only the protocol: the SDK's stdio transport points fd 1 at stderr while it serves
(so a `corral up` the client starts, or any stray print, cannot corrupt the stream) and logs go to
stderr. The client is connected once for the server's lifetime, in the background, so `initialize`
is answered at once; a tool call waits for it, and a failed connection is that call's error (the
next call tries again).
"""

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, cast

import anyio
import orjson
from pydantic import BaseModel, Field

from corral.errors import CorralError
from corral.home import Home
from events.errors import EventError
from events.subjects import STREAM
from projections.errors import ProjectionError

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from corral.client import Client

log = logging.getLogger("corral.mcp")

ROLES: Final = ("tap", "coordinator", "operator")
DEFAULT_ROLE: Final = "tap"
READ_TOOLS: Final = ("list", "status", "logs", "events", "wait", "changes", "diff", "approvals", "search")
CONTROL_TOOLS: Final = ("run", "input", "cancel")
DECIDE_TOOLS: Final = ("decide",)
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "tap": frozenset(READ_TOOLS),
    "coordinator": frozenset(READ_TOOLS + CONTROL_TOOLS),
    "operator": frozenset(READ_TOOLS + CONTROL_TOOLS + DECIDE_TOOLS),
}
# The NATS user each role's client connects as (events/auth.py): a coordinator's decide is refused here.
CLIENT_ROLE: Final = {"tap": "tap", "coordinator": "operator", "operator": "operator"}

MAX_TAIL: Final = 2000
MAX_LIST: Final = 1000
MAX_SEARCH: Final = 500
MAX_EVENTS: Final = 1000
MAX_WAIT_S: Final = 600.0
DIFF_LIMIT: Final = 200_000  # characters of a diff in one result (agents' tool results are bounded)


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    mcp = sub.add_parser(
        "mcp",
        help="serve Corral to agents as MCP tools over stdio (docs/mcp.md)",
        description="An MCP server on stdin/stdout for a coordinator agent (Claude Code --mcp-config, Codex, "
        "Gemini CLI): run, list, status, logs, events, wait, input, cancel, changes, diff, approvals, decide, "
        "search. "
        "See docs/mcp.md for each agent's configuration.",
    )
    mcp.add_argument(
        "--role",
        choices=ROLES,
        default=DEFAULT_ROLE,
        help="tap (default): read only; coordinator: also run, input, cancel; operator: also decide approvals",
    )
    return {"mcp": cmd_mcp}


async def cmd_mcp(home: Home, args: Any) -> int:
    if os.isatty(0):  # someone typed it: say what it waits for (on stderr; stdout is the protocol's)
        sys.stderr.write(
            f"corral mcp: serving MCP (role {args.role}) on stdin/stdout; an agent starts this command itself, "
            "see docs/mcp.md (Ctrl-C ends it)\n"
        )
    await serve(home, args.role)
    return 0


# --- the one connection -------------------------------------------------------------------------


class Connection:
    """The server's one client, held open by a task of its own (a context is left where it was entered).

    `get()` waits for it; when connecting failed, that call raises the client's error and the next
    call starts a new attempt (say, once `corral up` runs).
    """

    def __init__(self, home: Home, role: str) -> None:
        self.home = home
        self.role = role
        self._client: Client | None = None
        self._error: CorralError | None = None
        self._ready = anyio.Event()
        self._stop = anyio.Event()
        self._attempting = False
        self._tasks: anyio.abc.TaskGroup | None = None

    def start(self, tasks: anyio.abc.TaskGroup) -> None:
        self._tasks = tasks
        self._attempt()

    def _attempt(self) -> None:
        assert self._tasks is not None
        self._ready = anyio.Event()
        self._error = None
        self._attempting = True
        self._tasks.start_soon(self._hold)

    async def _hold(self) -> None:
        from corral.client import Client

        try:
            async with Client.connect(self.home, role=CLIENT_ROLE[self.role]) as client:
                self._client = client
                self._ready.set()
                log.info("connected to corral (%s) as %s", self.home.root, CLIENT_ROLE[self.role])
                await self._stop.wait()
        except CorralError as exc:
            self._error = exc
            log.warning("cannot connect: %s", exc.message)
        except Exception as exc:
            self._error = CorralError(f"cannot connect to corral: {exc}")
            log.exception("cannot connect")
        finally:
            self._client = None
            self._attempting = False
            self._ready.set()

    async def get(self) -> "Client":
        if not self._attempting and self._client is None:
            self._attempt()
        await self._ready.wait()
        if self._client is None:
            error = self._error or CorralError("the connection to corral closed; restart `corral mcp`")
            raise error
        return self._client

    def close(self) -> None:
        self._stop.set()


# --- results -------------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def to_json(value: Any) -> str:
    """A tool result as JSON text (pydantic models, datetimes and paths as the HTTP API serves them)."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()


def absolute(repo: str) -> str:
    """A repository path as this server's caller meant it: relative to the directory it started us in."""
    return os.path.abspath(os.path.expanduser(repo))


def refusal(tool: str, role: str) -> str:
    needed = "operator" if tool in DECIDE_TOOLS else "coordinator"
    what = "deciding approvals is the operator's" if tool in DECIDE_TOOLS else "it changes executions"
    return (
        f"{tool} is refused: this corral mcp server runs with role {role} and {what}; "
        f"the user can restart it with `corral mcp --role {needed}` (docs/mcp.md)"
    )


# --- the server ----------------------------------------------------------------------------------

RepoArg = Annotated[
    str, Field(description="path of the git repository to branch from; relative to this server's directory")
]
ExecArg = Annotated[str, Field(description="execution id (a unique prefix is enough), as `list` or `run` returns")]


def build_server(connection: Connection, role: str) -> "MCPServer[Any]":
    """The MCP server: one tool per client operation, each checked against `role` before anything else."""
    from mcp.server.mcpserver import MCPServer
    from mcp_types import CallToolResult, TextContent, ToolAnnotations

    from corral import __version__

    allowed = ALLOWED[role]
    app: MCPServer[Any] = MCPServer("corral", version=__version__, instructions=instructions(role))

    def result(text: str, *, error: bool = False) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=text)], is_error=error)

    async def call(name: str, operation: Callable[["Client"], Awaitable[Any]]) -> CallToolResult:
        """One tool call: refused by role, or the client's answer as JSON, or its one-line error as a tool error
        (returned, not raised: the SDK would put "Error executing tool NAME:" before the message)."""
        if name not in allowed:
            return result(refusal(name, role), error=True)
        try:
            client = await connection.get()
            return result(to_json(await operation(client)))
        except CorralError as exc:
            log.info("%s: %s", name, exc.message)
            return result(exc.message, error=True)
        except (ProjectionError, EventError) as exc:  # one line too, as the CLI prints them
            log.info("%s: %s", name, exc)
            return result(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, error=True)

    def tool(name: str, description: str, *, read_only: bool, destructive: bool = False) -> Callable[[Any], Any]:
        if name not in allowed:  # the model sees up front what this server refuses
            description += f" Refused by this server: {refusal(name, role)}."
        hints = ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive, open_world_hint=False)
        return app.tool(name=name, description=description, annotations=hints, structured_output=False)

    @tool(
        "run",
        "Start an execution in a new git worktree (branch corral/<id>) of `repo`: a command, or an agent CLI "
        "(claude-code, codex, gemini, aider) on a task. Returns its execution_id at once; it runs in the "
        "background (follow it with status, logs or wait).",
        read_only=False,
    )
    async def run(
        repo: RepoArg,
        command: Annotated[
            list[str] | None, Field(description='program and arguments, e.g. ["pytest", "-q"]; or agent and task')
        ] = None,
        agent: Annotated[
            Literal["claude-code", "codex", "gemini", "aider"] | None,
            Field(description="an agent CLI to run on `task` instead of a command"),
        ] = None,
        task: Annotated[str | None, Field(description="the task text for the agent")] = None,
        labels: Annotated[dict[str, str] | None, Field(description='labels to record, e.g. {"team": "web"}')] = None,
        base: Annotated[str | None, Field(description="commit or ref to start from (default HEAD)")] = None,
        template: Annotated[str | None, Field(description="a template of corral.toml to start from")] = None,
    ) -> CallToolResult:
        async def submit(client: "Client") -> Any:
            from corral.client import RunSpec

            fields: dict[str, Any] = {"repo": absolute(repo)}
            given = {"command": command, "agent": agent, "task": task, "labels": labels, "base": base}
            fields.update({key: value for key, value in given.items() if value is not None})
            if template is not None:
                fields["template"] = template
            return {"execution_id": await client.submit(RunSpec(**fields))}

        return await call("run", submit)

    @tool(
        "list",
        "List executions, those needing a human first, then newest first (running and queued; all=true adds "
        "finished ones): execution_id, state, command, agent, repo, exit_code, attention.",
        read_only=True,
    )
    async def list_executions(
        all: Annotated[bool, Field(description="include finished executions")] = False,
        label: Annotated[str | None, Field(description="only executions with this label, NAME=VALUE")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST, description="at most this many rows")] = 100,
    ) -> CallToolResult:
        return await call("list", lambda client: client.executions(all=all, label=label, limit=limit))

    @tool(
        "status",
        "One execution's state (queued, running, paused, exited, failed...), exit_code, worktree, timers and cost.",
        read_only=True,
    )
    async def status(execution_id: ExecArg) -> CallToolResult:
        return await call("status", lambda client: client.status(execution_id))

    @tool("logs", "The last lines an execution printed: seq, ts, stream (stdout/stderr), text.", read_only=True)
    async def logs(
        execution_id: ExecArg,
        tail: Annotated[int, Field(ge=1, le=MAX_TAIL, description="how many of the last lines")] = 100,
    ) -> CallToolResult:
        return await call("logs", lambda client: client.logs(execution_id, tail=tail))

    @tool(
        "events",
        "An execution's recorded events in order (execution.started, tool.called, file.touched, approval.requested, "
        "agent.result, execution.exited...; output is what `logs` returns): the first `limit` after `after_seq`, "
        "and last_seq to pass as after_seq next time.",
        read_only=True,
    )
    async def events(
        execution_id: ExecArg,
        after_seq: Annotated[int | None, Field(ge=0, description="only events after this seq (a last_seq)")] = None,
        types: Annotated[list[str] | None, Field(description='only these types, e.g. ["tool.called"]')] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_EVENTS, description="at most this many events")] = 100,
    ) -> CallToolResult:
        async def collect(client: "Client") -> Any:
            found: list[dict[str, Any]] = []
            more = False
            start = None if after_seq is None else after_seq + 1
            stored = cast(  # an async generator, typed as the iterator it is used as
                "AsyncGenerator[dict[str, Any], None]",
                client.events(execution_id=execution_id, start_seq=start, follow_live=False),
            )
            async with contextlib.aclosing(stored):  # stops its reader at once when `limit` is reached
                async for event in stored:
                    if event.get("stream") != STREAM or event.get("type") == "output":
                        continue
                    if types and event.get("type") not in types:
                        continue
                    if len(found) == limit:
                        more = True
                        break
                    found.append(event)
            last_seq = found[-1]["seq"] if found else after_seq
            return {"events": found, "last_seq": last_seq, "more": more}

        return await call("events", collect)

    @tool(
        "wait",
        "Wait until an execution exits or fails, at most timeout_s seconds; returns its status.",
        read_only=True,
    )
    async def wait(
        execution_id: ExecArg,
        timeout_s: Annotated[float, Field(gt=0, le=MAX_WAIT_S, description="give up after this many seconds")] = 60,
    ) -> CallToolResult:
        return await call("wait", lambda client: client.wait(execution_id, timeout_s=timeout_s))

    @tool(
        "input", "Send text to a running execution's stdin (a newline is added unless newline=false).", read_only=False
    )
    async def send_input(
        execution_id: ExecArg,
        text: Annotated[str, Field(description="the text to send")],
        newline: Annotated[bool, Field(description="end it with a newline")] = True,
    ) -> CallToolResult:
        data = text + "\n" if newline and not text.endswith("\n") else text

        async def sent(client: "Client") -> Any:
            return {"execution_id": execution_id, "sent": len(data), "event": await client.input(execution_id, data)}

        return await call("input", sent)

    @tool(
        "cancel",
        "Stop an execution: SIGTERM to its process tree, SIGKILL after the grace period.",
        read_only=False,
        destructive=True,
    )
    async def cancel(
        execution_id: ExecArg,
        reason: Annotated[str | None, Field(description="why, for the record")] = None,
        grace_s: Annotated[
            float | None, Field(ge=0, le=3600, description="seconds between SIGTERM and SIGKILL (default 10)")
        ] = None,
    ) -> CallToolResult:
        async def cancelled(client: "Client") -> Any:
            event = await client.cancel(execution_id, grace_s=grace_s, reason=reason)
            return {"execution_id": execution_id, "cancelled": True, "event": event}

        return await call("cancel", cancelled)

    @tool(
        "changes",
        "The files an execution changed in its worktree (path, added, removed, status) and the totals.",
        read_only=True,
    )
    async def changes(execution_id: ExecArg) -> CallToolResult:
        return await call("changes", lambda client: client.changes(execution_id))

    @tool(
        "diff",
        "The unified diff of an execution's changes (every file, or one path), cut after max_chars.",
        read_only=True,
    )
    async def diff(
        execution_id: ExecArg,
        path: Annotated[str | None, Field(description="only this file")] = None,
        max_chars: Annotated[int, Field(ge=1000, le=DIFF_LIMIT, description="cut the diff after this")] = 50_000,
    ) -> CallToolResult:
        async def text(client: "Client") -> Any:
            answer = await client.diff(execution_id, paths=[path] if path else None)
            whole = str(answer.get("diff") or "")
            return {**answer, "diff": whole[:max_chars], "truncated": len(whole) > max_chars, "chars": len(whole)}

        return await call("diff", text)

    @tool(
        "approvals",
        "Approvals agents asked for (pending; all=true adds decided ones): approval_id, execution_id, state, "
        "category, question, options.",
        read_only=True,
    )
    async def approvals(
        all: Annotated[bool, Field(description="include decided and expired ones")] = False,
    ) -> CallToolResult:
        return await call("approvals", lambda client: client.approvals(all=all))

    @tool(
        "decide",
        "Grant (approve=true) or deny (approve=false) a pending approval; the first decision wins.",
        read_only=False,
        destructive=True,
    )
    async def decide(
        approval_id: Annotated[str, Field(description="the approval's id (AP-...) as `approvals` lists it")],
        approve: Annotated[bool, Field(description="true grants, false denies")],
        choice: Annotated[str | None, Field(description="one of the approval's options")] = None,
        note: Annotated[str | None, Field(description="a note for the agent and the record")] = None,
    ) -> CallToolResult:
        return await call(
            "decide", lambda client: client.decide(approval_id, approve=approve, choice=choice, note=note)
        )

    @tool(
        "search",
        "Search every execution's recorded events and output: execution_id, seq, ts, type, snippet per hit.",
        read_only=True,
    )
    async def search(
        query: Annotated[str, Field(min_length=1, description="the text to find")],
        execution_id: Annotated[str | None, Field(description="only in this execution")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_SEARCH, description="at most this many hits")] = 50,
    ) -> CallToolResult:
        return await call("search", lambda client: client.search(query, execution_id=execution_id, limit=limit))

    return app


def instructions(role: str) -> str:
    """What the server tells the agent at `initialize`: what Corral is and what this role may do."""
    may = {
        "tap": "read only: run, input, cancel and decide are refused",
        "coordinator": "you may run, send input and cancel; approvals are decided by a human (decide is refused)",
        "operator": "every tool, deciding approvals included",
    }[role]
    return (
        "Corral supervises coding agents: each run is an execution in its own git worktree and branch "
        "(corral/<id>), everything it does recorded as events. Start one with run, watch it with status, logs "
        f"and wait, read what it changed with changes and diff. This server's role is {role}: {may}."
    )


MAX_MESSAGE: Final = 64 << 20  # bytes of one JSON-RPC line on stdin


@contextlib.contextmanager
def claimed_stdin() -> Iterator[int]:
    """fd 0 for this server alone: yield a private duplicate, and point fd 0 at /dev/null meanwhile
    (what the SDK's transport does, so a system started in this process cannot read the wire)."""
    private = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        yield private
    finally:
        os.dup2(private, 0)
        os.close(private)


async def stdin_lines(fd: int) -> AsyncIterator[str]:
    """The protocol's lines from `fd`, read by the event loop, so a SIGTERM can stop the server at once.

    The SDK reads stdin in a worker thread that nothing interrupts: a signal would wait for the
    client's next line. A regular file (`corral mcp < requests.jsonl`) cannot be watched by the
    loop, so it is read in a thread like the SDK does."""
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    reader = asyncio.StreamReader(limit=MAX_MESSAGE, loop=loop)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    except ValueError:  # not a pipe, socket or character device
        with pipe:
            while line := await anyio.to_thread.run_sync(pipe.readline):
                yield line.decode("utf-8", errors="replace")
        return
    while line := await reader.readline():
        yield line.decode("utf-8", errors="replace")


async def serve(home: Home, role: str) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin or a SIGTERM/SIGINT, then disconnect.

    The connection starts only once the transport holds fd 0 and fd 1 (a system the client starts
    in this process then writes to stderr, never to the wire), and is closed after serving ends,
    in its own task, so the system it joined or started is left as it expects.
    """
    from mcp.server.stdio import stdio_server

    connection = Connection(home, role)
    app = build_server(connection, role)
    lowlevel = app._lowlevel_server  # what run_stdio_async runs, with our stdin, connection and signals
    with claimed_stdin() as stdin_fd:
        async with anyio.create_task_group() as holder:
            async with anyio.create_task_group() as serving:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

                    async def stop_on_signal() -> None:
                        async for signum in signals:
                            log.info("%s: stopping", signal.Signals(signum).name)
                            serving.cancel_scope.cancel()
                            return

                    serving.start_soon(stop_on_signal)
                    lines = cast("anyio.AsyncFile[str]", stdin_lines(stdin_fd))
                    async with stdio_server(stdin=lines) as (read_stream, write_stream):
                        connection.start(holder)
                        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
                    serving.cancel_scope.cancel()
            connection.close()
