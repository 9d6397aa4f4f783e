"""What each `corral` command does, on top of a System (running, or started for the command)."""

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import orjson
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from corral import attention, render
from corral.client import Client, RunSpec, StoredEvent, build_request
from corral.config import Config, load_config
from corral.errors import CorralError, NotFound, UsageError
from corral.home import Home, SystemLock
from corral.metrics import MetricsCollector, MetricsServer, parse_port
from corral.ops.base import (
    DURATION,
    NO_RESPONDER_WAIT_S,
    info,
    parse_env,
    parse_since,
    query,
    start_background_system,
    take_snapshot,
)
from corral.ops.base import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES  # re-exported (moved to corral/ops)
from corral.ops.base import _ask_projector as _ask_projector
from corral.ops.base import check_command as check_command
from corral.ops.base import check_request_size as check_request_size
from corral.ops.base import export_query as export_query
from corral.ops.base import known_execution_ids as known_execution_ids
from corral.ops.base import refuse_secret_env as refuse_secret_env
from corral.system import System, actors_for_run, open_system
from events.envelope import new_event
from events.schema import all_schemas, event_schema
from events.subjects import (
    ALL_EVENTS,
    API_REBUILD,
    OUTPUT_STREAM,
    event_subject,
    execution_events,
)
from events.types import EVENT_TYPES, ExecutionRequested
from projections.errors import ProjectionError
from replay.history import follow

if TYPE_CHECKING:
    from corral.http import HttpServer

CLAIM_TIMEOUT_S = 30.0
TERMINAL_TYPES = ("execution.exited", "execution.failed")


# --- ids ---------------------------------------------------------------------------------------


# --- run ---------------------------------------------------------------------------------------


def run_spec(args: Any) -> RunSpec:
    """`corral run`'s arguments as the client's RunSpec (the shape POST /api/executions takes)."""
    return RunSpec(
        repo=args.repo,
        base=args.base,
        command=list(args.command),
        agent=args.agent,
        task=args.task,
        env=parse_env(args.env or []),
        labels=parse_env(args.label or []),
        template=args.template,
        priority=args.priority,
        timeout=args.timeout,
        idle_timeout=args.idle_timeout,
        spawn_timeout=args.spawn_timeout,
        on_stall=args.on_stall,
        memory=args.memory,
        workspace=getattr(args, "workspace", None),
        cpus=args.cpus,
        disk=args.disk,
        pids=getattr(args, "pids", None),
        max_cost=getattr(args, "max_cost", None),
        sandbox=getattr(args, "sandbox", None),
        network=getattr(args, "network", None),
        allow=getattr(args, "allow", None),
        policy=_policy_file(getattr(args, "policy", None)),
        resume=getattr(args, "resume", None),
    )


def _policy_file(path: str | None) -> dict[str, Any] | None:
    """The policy keys of `corral run --policy FILE` (checked over [policy] by the client)."""
    if not path:
        return None
    from actors.policy import PolicyError, read_policy_file

    try:
        return read_policy_file(path)
    except PolicyError as exc:
        raise UsageError(f"{exc}; nothing was started") from None


async def cmd_run(home: Home, args: Any) -> int:
    if getattr(args, "fanout", None):
        return await _run_fanout(home, args)
    if getattr(args, "judge", None):
        raise UsageError("--judge goes with --fanout AGENT:N,... (it ranks the runs of a fan-out)")
    execution_id, request = await build_request(home, run_spec(args))  # checked before anything starts
    parent_id = request.resume_of
    if parent_id is not None and not args.quiet:
        info(f"{execution_id}: follow-up of {parent_id} in {request.worktree}")
    if args.detach:
        if not SystemLock(home).is_held_elsewhere():
            pid = start_background_system(home)
            info(f"started a background system (corral up, pid {pid}, log {home.up_log}); stop it with `corral down`")
        async with open_system(home) as system:
            await system.bus.publisher.publish(new_event(execution_id, request, actor="cli"))
        print(execution_id)
        return 0
    async with open_system(home, actors=actors_for_run(load_config(home), request)) as system:
        return await _run_and_follow(system, execution_id, request, quiet=args.quiet)


async def _run_fanout(home: Home, args: Any) -> int:
    """`corral run --fanout AGENT:N,... [--judge CMD]`: `corral fanout` (corral/fanout.py) with run's words."""
    from types import SimpleNamespace

    from corral import fanout

    words = list(args.command)
    head, tail = (words[: words.index("--")], words[words.index("--") + 1 :]) if "--" in words else (words, [])
    task = args.task or (" ".join(head) if head else None)
    spec = SimpleNamespace(
        agents=args.fanout,
        repo=args.repo,
        base=args.base,
        judge=args.judge,
        template=args.template,
        json=False,
        task=task,
        command=tail,
    )
    return await fanout.cmd_fanout(home, spec)


def _run_policy(config: Config, template: str | None, path: str | None) -> dict[str, Any] | None:
    """The policy keys of `corral run --policy FILE`, checked over [policy] and the template's."""
    if not path:
        return None
    from actors.policy import PolicyError, effective_policy, read_policy_file

    try:
        keys = read_policy_file(path)
    except PolicyError as exc:
        raise UsageError(f"{exc}; nothing was started") from None
    try:
        templates = {t.name: t.policy for t in config.templates.values()}
        effective_policy(config.policy, templates, template, keys)
    except PolicyError as exc:
        raise UsageError(f"{path}: {exc}; nothing was started") from None
    return keys


async def _run_and_follow(system: System, execution_id: str, request: ExecutionRequested, *, quiet: bool) -> int:
    outcome: dict[str, Any] = {}
    claimed = asyncio.Event()
    finished = asyncio.Event()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)

    async def on_event(seq: int, msg: Msg) -> bool:
        kind = msg.subject.split(".", 3)[3]
        if kind == "output":
            data = orjson.loads(msg.data)["data"]
            stream = sys.stdout if data["stream"] == "stdout" else sys.stderr
            stream.write(data["text"])
            stream.flush()
            outcome["chunks"] = outcome.get("chunks", 0) + 1
            return False
        data = orjson.loads(msg.data)["data"]
        if kind == "execution.claimed":
            claimed.set()
        elif kind == "execution.queued":
            claimed.set()  # waiting in the queue is not a missing spawner
            if not quiet:
                info(f"{execution_id}: queued at position {data['position']} (every slot is busy)")
        elif kind == "workspace.created" and not quiet:
            info(f"{execution_id}: worktree {data['path']} (branch {data['branch']})")
        elif kind == "execution.started" and not quiet:
            info(f"{execution_id}: started pid {data['pid']}: {' '.join(data['command'])}")
        elif kind == "protocol.error" and not quiet:
            info(f"{execution_id}: protocol error: {data['error']}")
        elif kind in TERMINAL_TYPES:
            outcome.update(kind=kind, **data)
            return True
        return False

    follower = asyncio.create_task(follow(system.bus.js, execution_events(execution_id), on_event, done=finished))
    if system.mode == "ephemeral" and load_config(system.home).retention.enabled:
        # Output expires from NATS under [retention]: the projector this command runs must be reading
        # before the agent writes, or what expires first never reaches DuckDB (docs/retention.md).
        await system.projector_started()
    await system.bus.publisher.publish(new_event(execution_id, request, actor="cli"))
    claim_deadline = time.monotonic() + CLAIM_TIMEOUT_S
    detached = False
    try:
        while not finished.is_set():
            waiter = asyncio.create_task(finished.wait())
            stopper = asyncio.create_task(interrupted.wait())
            await asyncio.wait({waiter, stopper}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if follower.done():
                follower.result()
                break
            if interrupted.is_set():
                if system.owned:
                    info(f"{execution_id}: interrupted; stopping the agent")
                    if "spawner" in system.actors:
                        await system.actors["spawner"].stop()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(finished.wait(), 15)
                else:
                    detached = True
                    info(f"detached from {execution_id}; it keeps running: corral logs -f {execution_id}")
                break
            if not claimed.is_set() and time.monotonic() > claim_deadline:
                info(
                    f"{execution_id}: no spawner claimed the request within {CLAIM_TIMEOUT_S:.0f}s; "
                    "it stays queued. Is a spawner running? (`corral up`)"
                )
                return 1
    finally:
        finished.set()
        with contextlib.suppress(Exception):
            await follower
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if detached:
        return 130
    if system.mode == "ephemeral" and outcome.get("kind") in TERMINAL_TYPES:
        # The agent ended: this command's own watchdog and spawner (and its conductor, for a run of no
        # template: no breaker to count) stop while the summary is gathered, not after it (issue 20 §6).
        system.stop_early(("watchdog", "spawner") if request.template else ("conductor", "watchdog", "spawner"))
    if outcome.get("kind") == "execution.exited":
        await _after_exit(system, execution_id, outcome)
    return _summarise(execution_id, outcome, quiet=quiet)


AFTER_EXIT_WAIT_S = 15.0


async def _after_exit(system: System, execution_id: str, outcome: dict[str, Any]) -> None:
    """What the run summary says besides the exit: why it stopped, and failed validations or pending
    approvals, which may come after the exit (the exit checkpoint is validated then). With a
    validator running, wait for the exit checkpoint's validation (at most AFTER_EXIT_WAIT_S)."""
    ask = functools.partial(query, system)
    runtime = system.home.read_runtime() if system.mode == "client" else None
    validating = "validator" in system.actors or bool(runtime and "validator" in (runtime.get("actors") or ()))
    deadline = time.monotonic() + AFTER_EXIT_WAIT_S
    from actors.checkpointer import Checkpointer

    checkpointer = system.actors.get("checkpointer")
    if validating and isinstance(checkpointer, Checkpointer):  # ours: it says whether an exit checkpoint comes
        validating = await checkpointer.exit_checkpoint(execution_id, AFTER_EXIT_WAIT_S) is not False
    with contextlib.suppress(CorralError, ProjectionError):
        while validating and time.monotonic() < deadline:
            done = await ask(
                f"SELECT (SELECT max(n) FROM checkpoints WHERE execution_id = '{execution_id}' "
                "AND trigger = 'exit') AS cp, "
                f"(SELECT max(checkpoint) FROM validations WHERE execution_id = '{execution_id}') AS checked"
            )
            cp, checked = done["rows"][0]
            if cp is not None and checked is not None and checked >= cp:
                break
            await asyncio.sleep(0.2)
        result = await ask(f"SELECT {PS_COLUMNS} FROM executions WHERE execution_id = '{execution_id}'")
        rows = render.records(result["columns"], result["rows"])
        outcome["reason"] = (await attention.reasons(ask, rows)).get(execution_id)
        outcome["attention"] = (await attention.needs(ask, [execution_id])).get(execution_id)


def _summarise(execution_id: str, outcome: dict[str, Any], *, quiet: bool) -> int:
    if outcome.get("kind") == "execution.failed":
        info(f"{execution_id} failed ({outcome['stage']}): {outcome['error']}")
        return 1
    if outcome.get("kind") != "execution.exited":
        info(f"{execution_id}: ended without a recorded exit")
        return 1
    code = outcome.get("exit_code")
    sig = outcome.get("signal")
    if sig is not None:
        status = f"killed by signal {sig}"
    elif code is None:  # stopped before its agent started: there is no exit code to tell
        status = "ended before its agent started"
    else:
        status = f"exit {code}"
    reason = outcome.get("reason")
    if not quiet:
        chunks = outcome.get("chunks", 0)
        info(
            f"{execution_id} {status}{f' ({reason})' if reason else ''} in "
            f"{render.human_duration(outcome['duration_s'])} · "
            f"{chunks} output chunk{'s' if chunks != 1 else ''} · `corral logs {execution_id}`"
        )
    needs_text = attention.needs_text(outcome.get("attention"))
    if needs_text:  # said even with -q: a human has something to look at
        info(f"{execution_id} needs you: {needs_text} (`corral approvals`, `corral status {execution_id}`)")
    if sig is not None:
        return 128 + int(sig)
    return int(code) if code is not None else 1


# --- up / down ---------------------------------------------------------------------------------


async def cmd_up(home: Home, args: Any) -> int:
    actors = tuple(a.strip() for a in args.actors.split(",") if a.strip()) if args.actors else None
    metrics_server = await _bind_metrics(home, args)
    try:
        return await _run_up(home, args, actors, metrics_server)
    finally:
        if metrics_server is not None:
            await metrics_server.stop()


async def _bind_metrics(home: Home, args: Any) -> MetricsServer | None:
    """Bind the metrics port first: a taken or bad port stops `corral up` before anything starts."""
    settings = load_config(home).metrics
    port = settings.port
    if getattr(args, "metrics_port", None) is not None:
        port = parse_port(args.metrics_port)
    address = getattr(args, "metrics_address", None) or settings.address
    if port is None:
        if getattr(args, "metrics_address", None):
            raise UsageError("--metrics-address needs --metrics-port (or [metrics] port in corral.toml)")
        return None
    server = MetricsServer(address, port)
    await server.start()
    return server


async def _run_up(home: Home, args: Any, actors: tuple[str, ...] | None, metrics_server: MetricsServer | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from corral.schedules import for_conductor

    kwargs: dict[str, Any] = {"mode": "up", "client_ok": False, "max_running": args.max_running}
    kwargs["schedules"] = for_conductor  # [schedules.NAME] fire from `corral up` only (corral/schedules.py)
    if args.nats:
        kwargs["nats_url"] = check_nats_urls(args.nats)
    if actors:
        kwargs["actors"] = actors
    async with open_system(home, **kwargs) as system:
        info(
            f"up: NATS {system.url}{' (embedded)' if system.server else ''} · "
            f"actors {', '.join(system.actors)} · home {home.root}"
        )
        collector: MetricsCollector | None = None
        if metrics_server is not None:
            collector = MetricsCollector(system)
            await collector.start()
            metrics_server.collector = collector
            home.write_runtime({**(home.read_runtime() or {}), "metrics_url": metrics_server.url})
            info(f"metrics: {metrics_server.url}")
        snapshots = _refresh_snapshots(home, system)
        http = await _serve_http(home, system, args)
        info("Ctrl-C or SIGTERM stops everything")
        waiters = [asyncio.create_task(stop.wait())] + [
            asyncio.create_task(actor.wait()) for actor in system.actors.values()
        ]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                info(f"an actor failed: {task.exception()!r}; stopping")
        info("stopping")
        if snapshots is not None:
            snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await snapshots
        if http is not None:
            await http.stop()
        if metrics_server is not None:
            metrics_server.collector = None
        if collector is not None:
            await collector.stop()
    info("stopped")
    return 0


async def _serve_http(home: Home, system: System, args: Any) -> "HttpServer | None":
    """The HTTP API of this `corral up` (docs/api.md): --http ADDR, else [http] address; --no-http or
    [http] enabled = false: none. An address given with --http that cannot be bound stops `corral up`;
    the configured one is said and skipped (another `corral up` on this host may hold it). runtime.json
    gets `http_url` (null when none is served)."""
    from corral.http import AddressInUse, HttpServer

    settings = load_config(home).http
    server: HttpServer | None = None
    if not getattr(args, "no_http", False) and (settings.enabled or getattr(args, "http", None)):
        server = HttpServer(
            system,
            getattr(args, "http", None) or settings.address,
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            max_failed_logins=settings.max_failed_logins,
        )
        try:
            await server.start()
        except AddressInUse as exc:
            if getattr(args, "http", None):
                raise
            info(f"HTTP API not served: {exc.message}")
            server = None
    home.write_runtime({**(home.read_runtime() or {}), "http_url": server.url if server else None})
    if server is not None:
        info(
            f"http: console {server.url}/ · API {server.url}/api (docs {server.url}/docs) · "
            "tokens: `corral token create NAME --role operator`"
        )
    return server


def check_nats_urls(value: str) -> str:
    """Return `--nats` as given if every comma-separated item is a NATS URL; a clear error otherwise."""
    urls = [u.strip() for u in value.split(",")]
    for url in urls:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        try:
            valid = bool(url) and parsed.scheme in ("nats", "tls", "ws", "wss") and bool(parsed.hostname)
            valid = valid and (parsed.port or 0) >= 0  # a port that is not a number raises ValueError
        except ValueError:
            valid = False
        if not valid:
            raise UsageError(
                f"--nats {value!r}: {url!r} is not a NATS URL; give nats://HOST:PORT, comma-separated for a cluster"
            )
    return ",".join(urls)


def cmd_down(home: Home, args: Any) -> int:
    runtime = home.read_runtime()
    if not SystemLock(home).is_held_elsewhere() or runtime is None:
        info(f"no Corral system is running on {home.root}")
        return 0
    if runtime.get("mode") != "up":
        raise CorralError(
            f"the running system belongs to a `corral {runtime.get('mode')}` command "
            f"(pid {runtime.get('pid')}); it stops when that command ends"
        )
    pid = int(runtime["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not SystemLock(home).is_held_elsewhere():
            info(f"stopped corral up (pid {pid})")
            return 0
        time.sleep(0.1)
    raise CorralError(f"corral up (pid {pid}) did not stop within {args.timeout}s; kill it with `kill {pid}`")


# --- queries -----------------------------------------------------------------------------------


SNAPSHOT_FILE = "snapshot.duckdb"


def _refresh_snapshots(home: Home, system: System) -> "asyncio.Task[None] | None":
    """[snapshot] every: this `corral up` refreshes the analysts' copy on that interval (its own
    projector writes it); a failed refresh is said once per failure and tried again next time."""
    settings = load_config(home).snapshot
    if settings.every_s <= 0 or system.projector is None:
        return None
    target = snapshot_target(home, settings.path)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(settings.every_s)
            try:
                await take_snapshot(system, target)
            except (CorralError, ProjectionError) as exc:
                info(f"snapshot to {target} failed: {exc}; trying again in {settings.every_s:g}s")

    info(f"snapshot: {target}, refreshed every {settings.every_s:g}s")
    return asyncio.create_task(refresh(), name="snapshots")


def snapshot_target(home: Home, path: str | None) -> Path:
    target = Path(os.path.abspath(os.path.expanduser(path))) if path else home.root / SNAPSHOT_FILE
    if target.is_dir() or not target.parent.is_dir():
        raise UsageError(f"{target}: give a file in an existing directory (it is replaced if it exists)")
    return target


async def cmd_snapshot(home: Home, args: Any) -> int:
    """`corral snapshot [PATH]`: a read-only copy for analysts (docs/tables.md, "Snapshots")."""
    target = snapshot_target(home, args.path)
    started = time.monotonic()
    async with open_system(home, actors=("projector",)) as system:
        result = await take_snapshot(system, target)
    size = target.stat().st_size if target.exists() else 0
    shown = {
        "path": str(target),
        "tables": int(result["rows"][0][0]) if result.get("rows") else 0,
        "position": result.get("position"),
        "bytes": size,
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 3),
    }
    if args.json:
        render.print_json(shown)
        return 0
    info(
        f"snapshot of {shown['tables']} tables at log position {shown['position']} written to {shown['path']} "
        f"({size / 1e6:.1f} MB); open it read-only: duckdb -readonly {shown['path']}"
    )
    return 0


async def cmd_sql(home: Home, args: Any) -> int:
    if args.max_rows < 1:  # (the client refuses it too; said before anything starts)
        raise UsageError("--max-rows must be 1 or more")
    async with Client.connect(home, actors=("projector",), role="tap") as client:  # reads only
        result = await client.sql(args.sql, max_rows=args.max_rows)
    if args.json:
        render.print_json(render.records(result["columns"], result["rows"]))
    elif result["columns"]:
        print(render.table(result["columns"], result["rows"]))
    if result["truncated"] and result.get("cut") == "bytes":
        info(
            f"showing the first {len(result['rows'])} rows: the answer reached its size limit; "
            "select fewer or narrower columns, or add LIMIT"
        )
    elif result["truncated"]:
        info(f"showing the first {args.max_rows} rows; raise --max-rows or add LIMIT")
    return 0


PS_COLUMNS = (
    "execution_id, state, requested_at, duration_s, exit_code, signal, command, repo, error, worktree, output_bytes, "
    "exit_reason"
)


async def cmd_ps(home: Home, args: Any) -> int:
    async with Client.connect(home, actors=("projector",)) as client:
        rows = await client.executions(all=args.all)
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        info("no executions" + ("" if args.all else " running; `corral ps --all` shows finished ones"))
        return 0
    now = datetime.now(UTC)
    table_rows = []
    for row in rows:
        exit_text = "-"
        if row["signal"] is not None:
            exit_text = f"sig {row['signal']}"
        elif row["exit_code"] is not None:
            exit_text = str(row["exit_code"])
        requested = row["requested_at"]
        age = (now - datetime.fromisoformat(requested).replace(tzinfo=UTC)).total_seconds() if requested else None
        table_rows.append(
            [
                row["execution_id"],
                row["state"],
                render.human_duration(age) + " ago",
                render.human_duration(row["duration_s"]),
                exit_text,
                row["reason"] or "-",
                attention.needs_text(row["attention"]) or "-",
                row["command"],
                row["error"] or row["repo"],
            ]
        )
    headers = ["id", "state", "age", "duration", "exit", "why", "needs you", "command", "repo / error"]
    print(render.table(headers, table_rows))
    return 0


# --- logs / tap --------------------------------------------------------------------------------


async def cmd_logs(home: Home, args: Any) -> int:
    """Print an execution's output (-f: until it ends; --tail N: the last N lines first).

    --since starts at output produced a duration ago; --timestamps puts the time each line's chunk
    was produced before the line; --json prints one JSON object per chunk ({ts, stream, n, text}).

    Output that log retention dropped is said on stderr before the rest (docs/retention.md): the
    chunks are numbered 1, 2, ... per execution and dropped oldest first, so the first chunk read
    says how many went before it.
    """
    from collections import deque  # (local: this command's own)

    if args.tail is not None and args.tail < 0:
        raise UsageError("--tail expects a number of lines (0 or more)")
    since_from: datetime | None = None
    if args.since is not None:
        match = DURATION.match(args.since)
        if not match:
            raise UsageError(f"--since expects a duration like 90s, 10m, 2h or 1d; got {args.since!r}")
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        since_from = datetime.now(UTC) - timedelta(seconds=float(match.group(1)) * unit)
    if args.json and args.timestamps:
        raise UsageError("--json already carries each chunk's time (ts); leave out --timestamps")
    async with Client.connect(home, actors=(), role="tap") as client:  # reads only
        execution_id = await client.resolve(args.execution_id)
        phase = [asyncio.Event()]
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            phase[0].set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        first_n: int | None = None  # the number of the first output chunk read
        last_n = skip_to = 0  # the highest chunk number read; the second pass (--tail -f) skips up to it
        live = False  # the second pass
        last_ns = 0  # when the newest event read was stored
        ended_ns: int | None = None  # when its terminal event was stored
        # --tail: [stream, line] of the last N lines (a line cut across chunks is joined)
        tail: deque[list[Any]] | None = deque(maxlen=args.tail) if args.tail is not None else None
        cut = False  # --tail left out earlier lines

        async def notice(n: int) -> None:
            expiry = await client.output_expiry() if n > 1 else None
            if expiry is not None:
                chunks = "output chunk" if n == 2 else f"{n - 1:,} output chunks"
                info(
                    f"the first {chunks} of {execution_id} expired under [retention] ({expiry.limits}); "
                    f"showing from chunk {n:,}"
                )

        line_start = {"stdout": True, "stderr": True}  # --timestamps: the stream's next text starts a line

        def write(stream: str, text: str, ts: str, n: int) -> None:
            if args.json:
                sys.stdout.buffer.write(orjson.dumps({"ts": ts, "stream": stream, "n": n, "text": text}) + b"\n")
                sys.stdout.flush()
                return
            out = sys.stdout if stream == "stdout" or args.stream else sys.stderr
            if args.timestamps and text:
                lines = text.splitlines(keepends=True)
                stamped = [f"{ts} {line}" if i or line_start[stream] else line for i, line in enumerate(lines)]
                line_start[stream] = text.endswith("\n")
                text = "".join(stamped)
            out.write(text)
            out.flush()

        def keep(stream: str, text: str, ts: str, n: int) -> None:
            nonlocal cut
            assert tail is not None
            for line in text.splitlines(keepends=True):
                if tail and tail[-1][0] == stream and not tail[-1][1].endswith("\n"):
                    tail[-1][1] += line
                    continue
                cut = cut or len(tail) == tail.maxlen
                tail.append([stream, line, ts, n])

        async def on_event(stored_event: StoredEvent) -> bool:
            nonlocal first_n, last_n, last_ns, ended_ns
            kind = stored_event.type
            stored = stored_event.stored_ns
            last_ns = max(last_ns, stored)
            if kind == "output":
                event = orjson.loads(stored_event.data)
                data, ts = event["data"], str(event.get("ts") or "")
                n = int(data.get("n") or 0)
                if live and n and n <= skip_to:
                    return False  # printed by the first pass
                last_n = max(last_n, n)
                if first_n is None:
                    first_n = n
                    if tail is None or live:
                        await notice(n)
                if args.stream in (None, data["stream"]):
                    if tail is not None and not live:
                        keep(data["stream"], data["text"], ts, n)
                    else:
                        write(data["stream"], data["text"], ts, n)
            elif kind in TERMINAL_TYPES:
                ended_ns = stored
            return args.follow and kind in TERMINAL_TYPES

        subject = execution_events(execution_id)
        await client.read_events(
            on_event,
            subject=subject,
            since_time=since_from,
            follow_live=args.follow and tail is None,
            done=phase[0],
        )
        if tail is not None:
            if first_n is not None and not cut:  # the lines shown start at the first chunk held
                await notice(first_n)
            for stream, line, ts, n in tail:
                write(stream, line, ts, n)
            if args.follow and ended_ns is None and not interrupted:  # then live, from where the first pass was
                live, skip_to = True, last_n
                phase[0] = asyncio.Event()
                since = datetime.fromtimestamp((last_ns - 1_000_000) / 1e9, UTC) if last_ns else None
                await client.read_events(on_event, subject=subject, since_time=since, done=phase[0])
        if first_n is None and ended_ns is not None:
            expiry = await client.output_expiry()
            if expiry is not None and (expiry.oldest is None or expiry.oldest.timestamp() * 1e9 > ended_ns):
                info(
                    f"no output of {execution_id} is held: it ended before the oldest output [retention] keeps "
                    f"({expiry.limits}); whatever it printed expired"
                )
    return 0


async def cmd_tap(home: Home, args: Any) -> int:
    position: dict[str, Any] = (
        parse_since(args.since) if args.since else ({"start_seq": 1} if args.no_follow else {"new_only": True})
    )
    async with Client.connect(home, actors=(), role="tap") as client:  # reads only
        pattern = args.pattern or ALL_EVENTS
        if "." not in pattern and pattern not in (">", "*"):
            pattern = execution_events(await client.resolve(pattern))
        elif not pattern.startswith("corral.evt."):
            raise UsageError(
                f"{pattern!r} is outside the event log; patterns look like corral.evt.<id>.> "
                "or corral.evt.*.execution.exited, or give an execution id"
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        out = sys.stdout.buffer
        count = 0

        async def on_event(event: StoredEvent) -> bool:  # written as stored, not parsed
            nonlocal count
            data, seq = event.data, event.seq
            if data[:1] != b"{" or data[-1:] != b"}" or len(data) < 3:  # not an envelope: still one JSON line
                out.write(orjson.dumps({"seq": seq, "malformed": data.decode(errors="replace")}) + b"\n")
            elif event.stream == OUTPUT_STREAM:  # log retention: a sequence of that stream
                out.write(b'{"seq":%d,"stream":"%s",%s\n' % (seq, OUTPUT_STREAM.encode(), data[1:]))
            else:
                out.write(b'{"seq":%d,%s\n' % (seq, data[1:]))
            out.flush()
            count += 1
            return bool(args.limit and count >= args.limit)

        await client.read_events(
            on_event,
            subject=pattern,
            start_seq=position.get("start_seq"),
            since_time=position.get("start_time"),
            new_only=bool(position.get("new_only")),
            follow_live=not args.no_follow,
            done=stop,
        )
    return 0


# --- projections, schema -----------------------------------------------------------------------


async def cmd_rebuild(home: Home, args: Any) -> int:
    started = time.monotonic()
    async with open_system(home, actors=("projector",)) as system:
        nc = system.bus.nc
        progress_inbox = nc.new_inbox()
        tty = sys.stderr.isatty()

        async def on_progress(msg: Msg) -> None:
            p = orjson.loads(msg.data)
            line = f"rebuilding: {p['done']:,}/{p['total']:,} events"
            sys.stderr.write(f"\r{line}" if tty else f"corral: {line}\n")
            sys.stderr.flush()

        sub = await nc.subscribe(progress_inbox, cb=on_progress)
        deadline = time.monotonic() + NO_RESPONDER_WAIT_S
        try:
            while True:
                try:
                    request = orjson.dumps({"progress": progress_inbox, "force": bool(args.force)})
                    reply = await nc.request(API_REBUILD, request, timeout=24 * 3600)
                    break
                except NoRespondersError:
                    if time.monotonic() < deadline:  # a projector (re)starting subscribes in a moment
                        await asyncio.sleep(0.2)
                        continue
                    raise CorralError("no projector answers on this system; start one with `corral up`") from None
        finally:
            await sub.unsubscribe()
    if tty:
        sys.stderr.write("\n")
    result = orjson.loads(reply.data)
    if result.get("refused"):
        raise CorralError(str(result.get("error")))
    if not result.get("ok"):
        raise CorralError(f"rebuild failed: {result.get('error')}; the previous tables are unchanged")
    info(
        f"rebuilt {result['events']:,} events into {home.database} "
        f"in {time.monotonic() - started:.1f}s (position {result['position']})"
    )
    return 0


def cmd_schema(home: Home, args: Any) -> int:
    if args.type:
        if args.type not in EVENT_TYPES:
            raise NotFound(f"unknown event type {args.type!r}; `corral schema --list` names them all")
        render.print_json(event_schema(args.type))
    elif args.list:
        for name in sorted(EVENT_TYPES):
            doc = (EVENT_TYPES[name].__doc__ or "").strip().splitlines()
            print(f"{name:32} {event_subject('<id>', name):48} {doc[0] if doc else ''}".rstrip())
    else:
        render.print_json(all_schemas())
    return 0


async def cmd_credentials(home: Home, args: Any) -> int:
    """`corral credentials`: this home's NATS users (generated once), and the servers' environment.

    With `--server-env FILE`, writes the `CORRAL_PASS_<USER>` variables a nats-server needs to
    resolve nats-auth.conf (a cluster node's environment file: systemd `EnvironmentFile=` or
    `set -a; . FILE`), mode 0600. Passwords are never printed.
    """
    from events.auth import ensure_credentials

    config = load_config(home)
    home.ensure()
    creds = ensure_credentials(home.root, config.security.operators)
    if args.server_env:
        _write_server_env(Path(args.server_env), creds.server_env())
        info(f"wrote the nats-server environment of {len(creds.users)} users to {args.server_env} (mode 0600)")
    users = [{"user": user, "role": "operator" if user in creds.operators else user} for user in sorted(creds.users)]
    path = home.root / "credentials.json"
    if args.json:
        print(orjson.dumps({"file": str(path), "users": users}).decode())
    else:
        print(f"credentials: {path} (other hosts: copy it and set CORRAL_NATS_CREDS)")
        for row in users:
            print(f"  {row['user']:<16} {row['role']}")
    return 0


def _write_server_env(target: Path, variables: dict[str, str]) -> None:
    if target.is_dir():
        raise UsageError(f"{target} is a directory; give a file name for the environment")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        # single quotes keep each value's own double quotes (nats-server must read a string)
        out.write("".join(f"{name}='{value}'\n" for name, value in sorted(variables.items())))
    target.chmod(0o600)
