"""Find the running Corral system, or start one for the duration of a command: one lifespan for all."""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import NoServersError

from actors.approver import Approver
from actors.bus import Bus, connect_bus
from actors.checkpointer import Checkpointer
from actors.policy import effective_policy
from actors.runtime import Actor
from actors.spawner import Spawner
from actors.validator import Validator
from actors.watchdog import Watchdog
from corral.config import Config, load_config
from corral.errors import BusUnavailable, CorralError
from corral.home import Home, SystemLock
from corral.server import EmbeddedServer, replace_orphans
from events.subjects import API_REBUILD, API_SQL
from projections.errors import ProjectionError
from projections.projector import Projector
from projections.query import run_query
from projections.rebuild import rebuild_database
from replay.history import last_sequence

log = logging.getLogger(__name__)

ALL_ACTORS = ("spawner", "watchdog", "checkpointer", "validator", "approver", "projector")


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

    @property
    def owned(self) -> bool:
        return self.mode != "client"

    @property
    def projector(self) -> Projector | None:
        actor = self.actors.get("projector")
        return actor if isinstance(actor, Projector) else None


def nats_url_from_env() -> str | None:
    return os.environ.get("CORRAL_NATS_URL") or None


async def _connect(url: str, *, name: str) -> Bus:
    try:
        return await connect_bus(url, name=name)
    except (NoServersError, OSError, TimeoutError) as exc:
        raise BusUnavailable(
            f"cannot reach NATS at {url} ({type(exc).__name__}); check that the server runs, "
            "or unset CORRAL_NATS_URL to let Corral start its own"
        ) from None


def _runtime_of_running_system(home: Home, timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        runtime = home.read_runtime()
        if runtime and runtime.get("ready"):
            return runtime
        if time.monotonic() > deadline:
            raise BusUnavailable(
                f"another Corral process holds {home.root} but did not publish its address "
                f"in {home.runtime_file}; wait for it to finish, or stop it"
            )
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def open_system(
    home: Home,
    *,
    mode: str = "ephemeral",
    actors: tuple[str, ...] = ALL_ACTORS,
    client_ok: bool = True,
    max_running: int | None = None,
) -> AsyncIterator[System]:
    """Yield a System: a client of the running one, or one this process starts and stops."""
    home.ensure()
    config = load_config(home)  # a bad corral.toml stops here, before anything starts
    lock = SystemLock(home)
    if not lock.try_acquire():
        runtime = _runtime_of_running_system(home)
        if not client_ok:
            raise CorralError(
                f"a Corral system already runs on {home.root} (pid {runtime.get('pid')}, "
                f"{runtime.get('mode')}, NATS {runtime.get('url')}); stop it with `corral down`"
            )
        bus = await _connect(runtime["url"], name="corral-cli")
        try:
            yield System(home=home, url=runtime["url"], bus=bus, mode="client")
        finally:
            await bus.close()
        return

    system: System | None = None
    server: EmbeddedServer | None = None
    try:
        url = nats_url_from_env()
        if url is None:
            replaced = await asyncio.to_thread(replace_orphans, home.nats_store)
            if replaced:
                log.warning("stopped a nats-server left by a crashed Corral (pid %s)", ", ".join(map(str, replaced)))
            server = EmbeddedServer(home.nats_store, log_file=home.server_log)
            await asyncio.to_thread(server.start)
            url = server.url
        bus = await _connect(url, name=f"corral-{mode}")
        system = System(home=home, url=url, bus=bus, mode=mode, server=server, lock=lock)
        await _start_actors(system, actors, config=config, max_running=max_running)
        await _serve_api(system)
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
        if system is not None:
            await _shutdown(system)
        elif server is not None:
            server.stop()
        home.clear_runtime()
        lock.release()


async def _start_actors(system: System, names: tuple[str, ...], *, config: Config, max_running: int | None) -> None:
    home = system.home
    for name in names:
        actor: Actor
        if name == "spawner":
            actor = Spawner(
                system.bus,
                worktrees=home.worktrees,
                run_root=home.runs,
                max_running=max_running or config.spawner.max_running,
                stop_grace_s=config.spawner.stop_grace_s,
                cancel_grace_s=config.defaults.cancel_grace_s,
            )
        elif name == "watchdog":
            actor = Watchdog(system.bus, config.watchdog.for_actor(cancel_grace_s=config.defaults.cancel_grace_s))
        elif name == "checkpointer":
            actor = Checkpointer(system.bus, state_dir=home.checkpoints, settings=config.checkpoints.for_actor())
        elif name == "validator":
            templates = {t.name: t.policy for t in config.templates.values()}
            actor = Validator(system.bus, policy=config.policy, templates=templates)
        elif name == "approver":
            actor = Approver(system.bus, effective_policy(config.policy, {}, None))
        elif name == "projector":
            actor = Projector(system.bus, database=home.database, tmp_dir=home.tmp)
        else:
            raise CorralError(f"unknown actor {name!r}; known: {', '.join(ALL_ACTORS)}")
        await actor.start()
        system.actors[name] = actor


async def _shutdown(system: System) -> None:
    """Stop in reverse order: spawner (agents end, exits recorded), projector catches up, bus, server."""
    for sub in system._subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    try:
        # No reaction to the agents a stopping spawner ends; then their exit checkpoints.
        for name in ("watchdog", "spawner", "checkpointer", "validator", "approver"):
            actor = system.actors.get(name)
            if actor is not None:
                await actor.stop()
        projector = system.projector
        if projector is not None:
            try:
                with contextlib.suppress(Exception):
                    await projector.wait_for_position(await last_sequence(system.bus.js), timeout_s=10.0)
            finally:
                await projector.stop()
    finally:
        with contextlib.suppress(Exception):
            await system.bus.close()
        if system.server is not None:
            await asyncio.to_thread(system.server.stop)


async def _serve_api(system: System) -> None:
    projector = system.projector
    if projector is None:
        return
    nc = system.bus.nc

    async def on_sql(msg: Msg) -> None:
        try:
            request = orjson.loads(msg.data)
            await projector.wait_for_position(int(request.get("min_seq", 0)), timeout_s=10.0)
            assert projector.con is not None
            result = await asyncio.to_thread(
                run_query, projector.con, request["sql"], max_rows=int(request.get("max_rows", 10000))
            )
            reply = {"ok": True, **result}
        except ProjectionError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await msg.respond(orjson.dumps(reply, default=str))

    async def on_rebuild(msg: Msg) -> None:
        request = orjson.loads(msg.data) if msg.data else {}
        progress = request.get("progress")

        async def report(done: int, total: int) -> None:
            if progress:
                await nc.publish(progress, orjson.dumps({"done": done, "total": total}))

        try:
            applied = await rebuild_database(system.bus, projector, report=report)
            reply: dict[str, Any] = {"ok": True, "events": applied, "position": projector.position}
        except Exception as exc:
            reply = {"ok": False, "error": str(exc)}
        await msg.respond(orjson.dumps(reply))

    system._subs.append(await nc.subscribe(API_SQL, cb=on_sql))
    system._subs.append(await nc.subscribe(API_REBUILD, cb=on_rebuild))
