"""Find the running Corral system, or start one for the duration of a command: one lifespan for all."""

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsError

from actors.approver import Approver
from actors.bus import Bus, answerable, connect_bus, refuse_reply
from actors.checkpointer import Checkpointer
from actors.policy import effective_policy
from actors.runtime import Actor
from actors.spawner import Spawner
from actors.validator import Validator
from actors.watchdog import Watchdog
from corral.config import Config, load_config
from corral.errors import BusUnavailable, CorralError
from corral.home import Home, SystemLock, process_alive
from corral.janitor import run_janitor
from corral.server import EmbeddedServer, replace_orphans
from events.auth import (
    CREDENTIALS_FILE,
    ENV_CREDS,
    ENV_PASSWORD,
    ENV_USER,
    PROVISIONER,
    AuthError,
    client_credentials,
    credential_set,
    ensure_credentials,
)
from events.stream import ensure_health_bucket, ensure_output_retention
from events.subjects import API_EXPORT, API_POSITION, API_REBUILD, API_SNAPSHOT, API_SQL, STREAM
from events.types import ExecutionRequested
from projections.errors import MAX_BYTES as MAX_ANSWER_BYTES
from projections.errors import ProjectionError, QueryError
from projections.projector import Projector
from projections.worker import DEFAULT_QUERY_TIMEOUT_S, ApplyWorker, WorkerFailed
from replay.history import last_sequence

log = logging.getLogger(__name__)

# The notifier runs on every host, idle without [[notify]] entries (no consumer: it claims nothing
# that a host with entries would send), so every host reports the same actors (`corral health`).
ALL_ACTORS = ("spawner", "watchdog", "checkpointer", "validator", "approver", "projector", "notifier", "conductor")
SERVER_CHECK_S = 0.5


def actors_for_run(config: Config, request: ExecutionRequested) -> tuple[str, ...]:
    """The actors a `corral run` starts when it runs the system itself (issue 20 §6): not the notifier
    without [[notify]] entries, not the conductor unless the run can feed it (a template's breaker,
    restarts and retries that may loop). What they would have read stays in the log for `corral up`."""
    skip = set() if config.notify else {"notifier"}
    if not (request.template or request.on_stall == "restart" or config.watchdog.retry_max_attempts > 0):
        skip.add("conductor")
    return tuple(name for name in ALL_ACTORS if name not in skip)


@dataclass
class System:
    """A connection to Corral's bus, and the parts of the system this process runs itself."""

    home: Home
    url: str
    bus: Bus
    mode: str  # "up", "ephemeral" (started for this command) or "client" (someone else runs it)
    server: EmbeddedServer | None = None
    actors: dict[str, Actor] = field(default_factory=dict)
    lock: SystemLock | None = None
    _subs: list[Any] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)  # the actors' own connections
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _supervisor: asyncio.Task[None] | None = None
    _projector_start: asyncio.Task[None] | None = None  # a command's projector starts beside it
    _janitor: asyncio.Task[None] | None = None  # `corral up`'s sweep of foreign durables (corral/janitor.py)
    _winding_down: asyncio.Task[None] | None = None  # actors a command stops before its end (stop_early)

    def stop_early(self, names: tuple[str, ...]) -> None:
        """Begin stopping these actors of this system now, in _shutdown's order, while the command goes on.

        `corral run` whose agent ended: the conductor, the watchdog and the spawner have nothing left to
        do for it, and their stop (the spawner's shim server, the conductor's fetch) need not be waited
        for after the summary's queries. _shutdown waits for it before stopping the rest."""
        if self._winding_down is None and self.owned:
            chosen = {name: actor for name, actor in self.actors.items() if name in names}
            self._winding_down = asyncio.create_task(_stop_in_order(chosen), name="corral stop early")

    async def projector_started(self) -> None:
        """Wait for this system's projector to have started (raise what stopped its start)."""
        if self._projector_start is not None:
            await asyncio.shield(self._projector_start)

    @property
    def owned(self) -> bool:
        return self.mode != "client"

    @property
    def projector(self) -> Projector | None:
        actor = self.actors.get("projector")
        return actor if isinstance(actor, Projector) else None


def nats_url_from_env() -> str | None:
    return os.environ.get("CORRAL_NATS_URL") or None


async def _connect(url: str, *, name: str, home: Home, role: str = "operator") -> Bus:
    """Connect as `role` with the credentials found for it (events/auth.py), or without any.

    Only the provisioner creates and updates the streams; every other role just reads them.
    """
    try:
        credentials = client_credentials(role, home.root)
    except AuthError as exc:
        raise BusUnavailable(str(exc)) from None
    try:
        return await connect_bus(url, name=name, credentials=credentials, provision=role == PROVISIONER)
    except NatsError as exc:
        if not isinstance(exc, AuthorizationError) and "authorization violation" not in str(exc).lower():
            raise
        who = f"user {credentials.user!r}" if credentials else "a connection without credentials"
        raise BusUnavailable(
            f"NATS at {url} refused {who}; check {ENV_USER}/{ENV_PASSWORD}, {ENV_CREDS} "
            f"or {home.root / CREDENTIALS_FILE} (docs/security.md)"
        ) from None
    except (NoServersError, OSError, TimeoutError) as exc:
        raise BusUnavailable(
            f"cannot reach NATS at {url} ({type(exc).__name__}); check that the server runs, "
            "or unset CORRAL_NATS_URL to let Corral start its own"
        ) from None


def _runtime_of_running_system(home: Home, lock: SystemLock, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The address of the system that holds `home`, or None once its lock is ours (it ended).

    Liveness is decided by the process, not by whether its NATS answers: an address whose pid is
    gone (a `corral up` killed with SIGKILL leaves its runtime.json, and its embedded server may
    outlive it for a moment) is never joined. The lock of a process that is dying, or of one that
    is starting and has not published its address yet, is waited for.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        runtime = home.read_runtime()
        if runtime and runtime.get("ready") and process_alive(runtime.get("pid")):
            return runtime
        if lock.try_acquire():
            return None  # it was stopping (it clears its address first), or it died: the home is ours
        if time.monotonic() > deadline:
            holders = [pid for pid in lock.holders() if pid != os.getpid()]
            who = ", ".join(f"pid {pid} ({_cmdline(pid)})" for pid in holders) or "a process this user cannot see"
            stale = f"; {home.runtime_file} names pid {runtime.get('pid')}, which is gone" if runtime else ""
            raise BusUnavailable(
                f"{home.root} is locked by {who}, which published no address in {timeout_s:.0f}s{stale}; "
                "wait for it to finish, or stop it (kill PID)"
            )
        time.sleep(0.05)


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")).strip()[:120]
    return "?"


@contextlib.asynccontextmanager
async def open_system(
    home: Home,
    *,
    mode: str = "ephemeral",
    actors: tuple[str, ...] = ALL_ACTORS,
    client_ok: bool = True,
    max_running: int | None = None,
    nats_url: str | None = None,
    role: str = "operator",
    schedules: Callable[[Home, Config], Awaitable[tuple[Any, ...]]] | None = None,
) -> AsyncIterator[System]:
    """Yield a System: a client of the running one, or one this process starts and stops.

    `nats_url` (comma-separated for a cluster) wins over CORRAL_NATS_URL; with neither, the
    embedded server is started, and restarted on its port and store if it dies meanwhile.
    `role` is the NATS user of a client's connection (`tap` for commands that only read); a
    system this process runs connects as `operator`, and each of its actors as its own role.
    `schedules` resolves the [schedules.NAME] its conductor fires (corral/schedules.py; `corral up` gives it).
    """
    home.ensure()
    config = load_config(home)  # a bad corral.toml stops here, before anything starts
    lock = SystemLock(home)
    runtime = None if lock.try_acquire() else _runtime_of_running_system(home, lock)
    if runtime is not None:
        if not client_ok:
            raise CorralError(
                f"a Corral system already runs on {home.root} (pid {runtime.get('pid')}, "
                f"{runtime.get('mode')}, NATS {runtime.get('url')}); stop it with `corral down`"
            )
        bus = await _connect(runtime["url"], name="corral-cli", home=home, role=role)
        try:
            yield System(home=home, url=runtime["url"], bus=bus, mode="client")
        finally:
            await bus.close()
        return

    system: System | None = None
    server: EmbeddedServer | None = None
    try:
        url = nats_url or nats_url_from_env()
        if url is None:
            replaced = await asyncio.to_thread(replace_orphans, home.nats_store)
            if replaced:
                log.warning("stopped a nats-server left by a crashed Corral (pid %s)", ", ".join(map(str, replaced)))
            monitor = config.metrics.nats_monitor_port if mode == "up" else None
            try:  # generated once per home; the server gets the passwords in its environment, never argv
                credentials = ensure_credentials(home.root, config.security.operators)
            except AuthError as exc:
                raise CorralError(str(exc)) from None
            server = EmbeddedServer(
                home.nats_store, log_file=home.server_log, monitor_port=monitor, credentials=credentials
            )
            await server.start_async()
            url = server.url
        await _provision(url, home, config)  # before any actor reads or writes the log
        bus = await _connect(url, name=f"corral-{mode}", home=home)
        system = System(home=home, url=url, bus=bus, mode=mode, server=server, lock=lock)
        await _start_actors(system, actors, config=config, max_running=max_running, schedules=schedules)
        await _serve_api(system, sql_timeout_s=config.sql.timeout_s)
        if server is not None:
            system._supervisor = asyncio.create_task(_supervise_server(system, server))
        if mode == "up":  # durables no role owns: removed at start and every [security] consumer_sweep
            sweep = run_janitor(url, home.root, config.security.consumer_sweep_s, system._closing)
            system._janitor = asyncio.create_task(sweep, name="corral-janitor")
        home.write_runtime(
            {
                "url": url,
                "pid": os.getpid(),
                "mode": mode,
                "actors": list(actors),
                "ready": True,
                "embedded_server": server is not None,
                "started_at": time.time(),
                "server_pid": server.process.pid if server and server.process else None,
            }
        )
        yield system
    finally:
        home.clear_runtime()  # first: no new command joins a system that is stopping
        if system is not None:
            await _shutdown(system)
        elif server is not None:
            server.stop()
        home.clear_runtime()
        lock.release()


async def _provision(url: str, home: Home, config: Config) -> None:
    """Create the streams and the health bucket, bring them to [retention] and to the cluster's size.

    On every start of a system, as the `provisioner` user: the only one that may create or update
    streams (events/auth.py). A host given a credentials file without it (one that runs only some
    actors of a cluster, docs/deployment.md) provisions nothing: the streams must exist already.
    """
    try:
        found = credential_set(home.root)
    except AuthError as exc:
        raise CorralError(str(exc)) from None
    if found is not None and found.get(PROVISIONER) is None:
        await _require_streams(url, home)
        return
    bus = await _connect(url, name="corral-provisioner", home=home, role=PROVISIONER)
    try:
        await ensure_output_retention(bus.js, config.retention.for_stream(), replicas=bus.replicas)
        await ensure_health_bucket(bus.js, replicas=bus.replicas)
    except NatsError as exc:
        raise CorralError(
            f"cannot apply [retention] of {config.label} to the streams on NATS ({exc}); "
            f"a server you run yourself needs the {PROVISIONER} user of nats-auth.conf (docs/security.md)"
        ) from None
    finally:
        await bus.close()


async def _require_streams(url: str, home: Home) -> None:
    """Without the provisioner's credentials, the log must have been provisioned by another host."""
    bus = await _connect(url, name="corral-check", home=home)
    try:
        await bus.js.stream_info(STREAM)
    except NatsError:
        raise CorralError(
            f"stream {STREAM} does not exist on NATS at {url}, and the credentials file has no "
            f"{PROVISIONER} user to create it: start `corral up` on the host that has it first (docs/security.md)"
        ) from None
    finally:
        await bus.close()


async def _start_actors(
    system: System,
    names: tuple[str, ...],
    *,
    config: Config,
    max_running: int | None,
    schedules: Callable[[Home, Config], Awaitable[tuple[Any, ...]]] | None = None,
) -> None:
    home = system.home
    for name in names:
        if name not in ALL_ACTORS:
            raise CorralError(f"unknown actor {name!r}; known: {', '.join(ALL_ACTORS)}")
    if system.mode == "ephemeral" and "projector" in names:
        # A command's projector starts first: its DuckDB worker (a process) has the longest way to go.
        names = ("projector", *(name for name in names if name != "projector"))
    # Each actor has its own connection as its own NATS user: permissions hold per actor. A command's
    # connect at once (each is a round trip or more); one that fails: the others are closed by _shutdown.
    if system.mode == "ephemeral" and names:
        connecting = [
            asyncio.ensure_future(_connect(system.url, name=f"corral-{name}", home=home, role=name)) for name in names
        ]
        await asyncio.wait(connecting)
        system.buses += [f.result() for f in connecting if not f.cancelled() and f.exception() is None]
        for future in connecting:
            future.result()  # the first failure, if any
    starting: dict[str, Actor] = {}
    for index, name in enumerate(names):
        if system.mode != "ephemeral":
            system.buses.append(await _connect(system.url, name=f"corral-{name}", home=home, role=name))
        bus = system.buses[index]
        actor: Actor
        if name == "spawner":
            actor = Spawner(
                bus,
                worktrees=home.worktrees,
                run_root=home.runs,
                max_running=max_running or config.spawner.max_running,
                stop_grace_s=config.spawner.stop_grace_s,
                cancel_grace_s=config.defaults.cancel_grace_s,
                template_cancel_grace_s={
                    t.name: t.cancel_grace_s for t in config.templates.values() if t.cancel_grace_s is not None
                },
                template_scripts={
                    t.name: {k: v for k, v in (("setup", t.setup), ("teardown", t.teardown)) if v}
                    for t in config.templates.values()
                    if t.setup or t.teardown
                },
                secret_env=config.security.secret_env,
                # the sandbox (docs/sandbox.md): its bwrap; agents never see $CORRAL_HOME
                sandbox_program=config.sandbox.bwrap,
                sandbox_hide=(home.root,),
                policy=config.policy,
                policy_templates={t.name: t.policy for t in config.templates.values()},
            )
        elif name == "watchdog":
            actor = Watchdog(bus, config.watchdog.for_actor(cancel_grace_s=config.defaults.cancel_grace_s))
        elif name == "checkpointer":
            actor = Checkpointer(bus, state_dir=home.checkpoints, settings=config.checkpoints.for_actor())
        elif name == "validator":
            templates = {t.name: t.policy for t in config.templates.values()}
            actor = Validator(bus, policy=config.policy, templates=templates)
        elif name == "approver":
            templates = {t.name: t.policy for t in config.templates.values()}
            actor = Approver(
                bus, effective_policy(config.policy, {}, None), policy_table=config.policy, templates=templates
            )
        elif name == "projector":
            actor = Projector(
                bus,
                database=home.database,
                tmp_dir=home.tmp,
                duckdb_settings=config.projector.duckdb_settings(),
            )
        elif name == "notifier":
            from actors.notifier import Notifier  # [[notify]] (docs/notifications.md)

            actor = Notifier(bus, [target.for_actor() for target in config.notify])
        elif name == "conductor":
            from actors.conductor import Conductor  # [pipelines.NAME] runs (docs/orchestration.md)

            # Schedules fire from `corral up` only: a command's own system would start ticks it cannot see through.
            actor = Conductor(
                bus,
                schedules=await schedules(home, config) if schedules is not None and system.mode == "up" else (),
                template_breakers={t.name: t.breaker_failures for t in config.templates.values()},
                watchdog=config.watchdog.for_actor(cancel_grace_s=config.defaults.cancel_grace_s),
            )
        else:
            raise CorralError(f"unknown actor {name!r}; known: {', '.join(ALL_ACTORS)}")
        if name == "projector" and system.mode == "ephemeral":
            # A command's projector opens its DuckDB worker (a process) while the command goes on:
            # `corral run` starts the agent meanwhile; the API's answers wait for it (issue 20 §6).
            system._projector_start = asyncio.create_task(actor.start(), name="projector start")
            system.actors[name] = actor
        elif system.mode == "ephemeral":
            starting[name] = actor
        else:
            await actor.start()
            system.actors[name] = actor
    # A command's other actors start at once (each creates its consumers: round trips to the server);
    # `corral run` publishes its request when they all run. One that fails: the others are stopped.
    results = await asyncio.gather(*(actor.start() for actor in starting.values()), return_exceptions=True)
    for (name, actor), result in zip(starting.items(), results, strict=True):
        if not isinstance(result, BaseException):
            system.actors[name] = actor
    for result in results:
        if isinstance(result, BaseException):
            raise result


# The order actors stop in: nothing reacts to the agents a stopping spawner ends (conductor, watchdog);
# then the spawner (agents end, exits recorded); then their exit checkpoints (checkpointer); then what
# judges them (validator, approver, notifier). The actors of one group stop at the same time.
STOP_ORDER: tuple[tuple[str, ...], ...] = (
    ("conductor", "watchdog"),
    ("spawner",),
    ("checkpointer",),
    ("validator", "approver", "notifier"),
)


async def _stop_in_order(actors: dict[str, Actor]) -> None:
    for group in STOP_ORDER:
        stopping = [actors[name].stop() for name in group if name in actors]
        if stopping:
            await asyncio.gather(*stopping)


async def _shutdown(system: System) -> None:
    """Stop in reverse order: spawner (agents end, exits recorded), projector catches up, bus, server."""
    for sub in system._subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if system._janitor is not None:
        system._janitor.cancel()
        with contextlib.suppress(BaseException):
            await system._janitor
    try:
        if system._winding_down is not None:
            await system._winding_down  # the actors a command stopped early (System.stop_early)
        await _stop_in_order({name: actor for name, actor in system.actors.items() if name != "projector"})
        projector = system.projector
        if projector is not None:
            try:
                with contextlib.suppress(Exception):
                    await system.projector_started()
                    # a locked-out projector has nothing to catch up now; with the server away, the log's
                    # end cannot be read (the rest is applied from the saved position at the next start)
                    if not projector.locked_out and system.bus.nc.is_connected:
                        await projector.wait_for_position(
                            await last_sequence(system.bus.js),
                            timeout_s=10.0,
                            output_seq=await projector.output_last_sequence(),
                        )
            finally:
                projector.close_later = True  # its DuckDB worker checkpoints while the server stops
                await projector.stop()
    finally:
        try:
            await asyncio.gather(*(bus.close() for bus in (*system.buses, system.bus)), return_exceptions=True)
            system._closing.set()
            if system._supervisor is not None:
                with contextlib.suppress(Exception):
                    await system._supervisor  # a restart in progress ends before the server is stopped
            if system.server is not None:
                await asyncio.to_thread(system.server.stop)
        finally:
            if system.projector is not None:
                await system.projector.wait_closed()


async def _supervise_server(system: System, server: EmbeddedServer) -> None:
    """Restart the embedded nats-server on its port and store whenever it dies before the system stops.

    The actors' connections reconnect by themselves (they retry forever), and what the agents
    produced meanwhile waits in their shims' spools, published once the server is back.
    """
    while not system._closing.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(system._closing.wait(), SERVER_CHECK_S)
        code = server.died()
        if code is None or system._closing.is_set():
            continue
        pid = server.process.pid if server.process else None
        sys.stderr.write(
            f"corral: the embedded nats-server (pid {pid}) exited with code {code}; restarting it on "
            f"{server.url} with the same store (restart {server.restarts + 1}; log {server.log_file})\n"
        )
        try:
            await server.start_async(restart=True)
        except BusUnavailable as exc:
            sys.stderr.write(f"corral: restarting nats-server failed ({exc}); trying again\n")
            continue
        runtime = system.home.read_runtime()
        if runtime is not None and server.process is not None:
            system.home.write_runtime({**runtime, "server_pid": server.process.pid, "server_restarts": server.restarts})


def _export_target(path: str) -> Path:
    target = Path(path)
    if not target.is_absolute() or target.exists() or not target.parent.is_dir():
        raise ProjectionError(f"cannot export to {target}: give a new file in an existing directory")
    return target


def _snapshot_target(path: str) -> Path:
    target = Path(path)
    if not target.is_absolute() or not target.parent.is_dir() or target.is_dir():
        raise ProjectionError(f"cannot write a snapshot to {target}: give a file in an existing directory")
    return target


def _replace_snapshot(written: Path, target: Path) -> None:
    """Put a snapshot in place atomically: a reader of the old one keeps it, a new open gets the new."""
    staged = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.move(written, staged)
        os.replace(staged, target)
    finally:
        written.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)


def _move_export(written: Path, target: Path) -> None:
    """The worker writes only in its batch directory (docs/security.md): the file goes where asked."""
    try:
        shutil.move(written, target)
    finally:
        written.unlink(missing_ok=True)


WORKER_WAIT_S = 30.0  # a query waits this long for a replaced DuckDB worker to open the file


async def _open_worker(projector: Projector, failed: ApplyWorker | None) -> ApplyWorker:
    """The projector's worker with its file open (not `failed`): waited for while it is replaced."""
    deadline = time.monotonic() + WORKER_WAIT_S
    if failed is not None:
        projector.worker_gone()
    while True:
        worker = projector.worker
        if worker is not None and worker is not failed and worker.alive():
            return worker
        if projector.stopping.is_set() or projector.locked_out or time.monotonic() > deadline:
            why = f": {projector.locked_out}" if projector.locked_out else " (its worker is being replaced; try again)"
            raise ProjectionError("the projector has no DuckDB file open" + why)
        await asyncio.sleep(0.05)


async def _check_statement(projector: Projector, sql: str) -> None:
    """Refuse what is not one query (projections/query.py) before waiting for the projector's
    position: in its DuckDB worker (this process does not import DuckDB), or here when none is open."""
    worker = projector.worker
    if worker is None:
        from projections.query import check_statement

        check_statement(sql)
        return
    await asyncio.wrap_future(worker.submit_check(sql))


async def _serve_api(system: System, *, sql_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> None:
    projector = system.projector
    if projector is None:
        return
    nc = projector.bus.nc  # the projector's user answers queries (events/auth.py)
    answering: set[asyncio.Task[None]] = set()

    async def answer(msg: Msg, export: bool | str) -> None:
        # A sandboxed query in the projector's DuckDB worker (projections/query.py): one of its
        # query threads, off the apply path; a refusal or a timeout has a `kind` the CLI maps.
        # An export (operators only) writes a Parquet file there and moves it where asked.
        reply: dict[str, Any]
        try:
            request = orjson.loads(msg.data)
            await system.projector_started()
            if projector.locked_out:
                raise ProjectionError(f"the projector cannot answer yet: {projector.locked_out}")
            snapshot = export == "snapshot"
            if not snapshot and int(request.get("min_seq", 0)) > projector.position:
                # refused at once, before waiting for the position (not behind: the worker refuses it at once)
                await _check_statement(projector, request["sql"])
            target = (_snapshot_target if snapshot else _export_target)(request["path"]) if export else None
            grace = request.get("output_grace_s")  # a listing (corral ps): output still applied may wait
            await projector.wait_for_position(
                int(request.get("min_seq", 0)),
                timeout_s=10.0,
                output_seq=await projector.output_last_sequence(),
                output_grace_s=min(float(grace), 10.0) if isinstance(grace, int | float) and grace >= 0 else None,
            )
            worker = await _open_worker(projector, None)
            for attempt in range(2):
                if snapshot:
                    answer = worker.submit_snapshot()
                elif target is not None:
                    answer = worker.submit_export(request["sql"])
                else:
                    answer = worker.submit_query(
                        request["sql"],
                        max_rows=int(request.get("max_rows", 10000)),
                        max_bytes=min(MAX_ANSWER_BYTES, nc.max_payload - 65536),  # the reply must fit in one message
                        timeout_s=sql_timeout_s,
                        listing=grace is not None,  # read beside a checkpoint (run_query's cut_in_query)
                    )
                try:
                    result: dict[str, Any] = await asyncio.wrap_future(answer)
                    break
                except WorkerFailed:
                    # the worker died under it (DuckDB invalidated its file under memory pressure):
                    # the projector starts another, which reads the log again from the applied
                    # positions; the query is asked again there instead of failing
                    if attempt:
                        raise
                    worker = await _open_worker(projector, worker)
            if target is not None:
                place = _replace_snapshot if snapshot else _move_export
                await asyncio.to_thread(place, Path(result.pop("file")), target)
                result["position"] = projector.position
            reply = {"ok": True, **result}
        except QueryError as exc:
            reply = {"ok": False, "error": str(exc), "kind": exc.kind}
        except ProjectionError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            data = orjson.dumps(reply, default=str)
        except (TypeError, orjson.JSONEncodeError) as exc:  # never leave the asker waiting
            data = orjson.dumps({"ok": False, "error": f"the answer could not be sent as JSON: {exc}"})
        await msg.respond(data)

    def answering_task(export: bool | str) -> Callable[[Msg], Awaitable[None]]:
        async def on_request(msg: Msg) -> None:
            if refuse_reply(msg, "projector"):  # an answer only ever goes to an inbox, never into the log
                return
            # nats-py runs one callback at a time per subscription: each answers on its own task
            task = asyncio.create_task(answer(msg, export))
            answering.add(task)
            task.add_done_callback(answering.discard)

        return on_request

    async def on_rebuild(msg: Msg) -> None:
        if refuse_reply(msg, "projector"):
            return
        request = orjson.loads(msg.data) if msg.data else {}
        progress = request.get("progress") if answerable(request.get("progress")) else None

        async def report(done: int, total: int) -> None:
            if progress:
                await nc.publish(progress, orjson.dumps({"done": done, "total": total}))

        from projections.rebuild import RebuildRefused, rebuild_database  # (rarely asked: not loaded at start)

        try:
            await system.projector_started()
            applied = await rebuild_database(
                projector.bus, projector, report=report, force=bool(request.get("force"))
            )  # as the projector role
            reply: dict[str, Any] = {"ok": True, "events": applied, "position": projector.position}
        except RebuildRefused as exc:
            reply = {"ok": False, "refused": True, "error": str(exc)}
        except Exception as exc:
            reply = {"ok": False, "error": str(exc)}
        await msg.respond(orjson.dumps(reply))

    async def on_position(msg: Msg) -> None:
        # Where this projector stands (the metrics of a `corral up` without a projector ask this).
        if refuse_reply(msg, "projector"):
            return
        await msg.respond(orjson.dumps({"position": projector.position, "instance": projector.instance}))

    system._subs.append(await nc.subscribe(API_SQL, cb=answering_task(export=False)))
    system._subs.append(await nc.subscribe(API_EXPORT, cb=answering_task(export=True)))  # operators only
    system._subs.append(await nc.subscribe(API_SNAPSHOT, cb=answering_task(export="snapshot")))  # operators only
    system._subs.append(await nc.subscribe(API_REBUILD, cb=on_rebuild))
    system._subs.append(await nc.subscribe(API_POSITION, cb=on_position))
    # The subscriptions are on the projector's connection and the CLI asks on another: the server
    # must have them before this system says it is ready, or the first question finds no responder.
    await nc.flush()
