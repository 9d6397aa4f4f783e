"""Attacks on the bus with the credentials Corral hands out (issue 14, items 2-4).

A real nats-server with Corral's users (tests/conftest.py). Every role tries to trim, seal,
delete or purge the log, to rewrite or take work from another role's durable consumer, and to
forge another role's health record; the server must refuse each (a permissions violation, or
JetStream's own error), and afterwards the log holds all its events, the durable its
configuration and the health record its content. Each role's own work still goes through.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from actors.bus import Bus, connect_bus
from actors.runtime import HEALTH_INTERVAL_S, health_key, health_state, read_health
from corral.janitor import janitor_for, sweep_once
from corral.server import EmbeddedServer
from events.auth import HEALTH_STREAM, OUTPUT_STREAM, PROVISIONER, CredentialSet, render_auth_conf
from events.consumers import sweep_id
from events.stream import OutputRetention, ensure_health_bucket, ensure_work_consumer, output_stream_config
from events.subjects import HEALTH_BUCKET, STREAM, events_of_type
from events.types import PauseRequested
from projections.projector import consumer_name
from replay.history import follow
from tests.conftest import Cli

ROLES = ("spawner", "watchdog", "checkpointer", "validator", "approver", "projector", "tap", "operator")
EVENTS = 40
VALIDATOR_FILTER = events_of_type("checkpoint.created")
WATCHDOG_KEY = health_key("watchdog", "watchdog-host-1")
FOREVER = "2999-01-01T00:00:00Z"


@dataclass
class Attacker:
    """A raw connection as one role, recording the server's permission violations."""

    role: str
    nc: NATS
    violations: list[str] = field(default_factory=list)

    async def attempt(self, subject: str, body: dict[str, Any] | bytes = b"") -> str:
        """Send a JetStream API request; 'refused' (permissions), 'error: …' (JetStream) or 'ok'."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        seen = len(self.violations)
        reply = asyncio.create_task(self.nc.request(subject, payload, timeout=30))
        while not reply.done():
            if any(subject.lower() in v.lower() for v in self.violations[seen:]):
                reply.cancel()
                return "refused"
            await asyncio.sleep(0.02)
        try:
            answer = orjson.loads(reply.result().data or b"{}")
        except NatsTimeoutError:
            return "no answer"
        if isinstance(answer, dict) and answer.get("error"):
            return f"error: {answer['error'].get('description')}"
        return "ok"

    async def publish(self, subject: str, payload: bytes) -> str:
        """A plain publish (a KV put is one): 'refused', or 'sent' when the server said nothing."""
        seen = len(self.violations)
        await self.nc.publish(subject, payload)
        await self.nc.flush()
        ping = await self.nc.request("$JS.API.INFO", b"", timeout=10)  # the server handled our publish first
        assert ping.data
        await self.nc.flush()
        return "refused" if any(subject.lower() in v.lower() for v in self.violations[seen:]) else "sent"


async def attacker(server: EmbeddedServer, credentials: CredentialSet, role: str) -> Attacker:
    own = credentials.get(role)
    assert own is not None
    found = Attacker(role, None)  # type: ignore[arg-type]

    async def on_error(exc: Exception) -> None:
        found.violations.append(str(exc))

    found.nc = await nats.connect(server.url, user=own.user, password=own.password, error_cb=on_error)
    return found


@dataclass
class World:
    server: EmbeddedServer
    credentials: CredentialSet
    admin: Bus
    health_record: bytes


@pytest.fixture
async def world(nats_server: EmbeddedServer, credentials: CredentialSet) -> AsyncIterator[World]:
    """The log with EVENTS events, the validator's durable, a watchdog health record; provisioned as Corral does."""
    provisioner = await connect_bus(nats_server.url, credentials=credentials.get(PROVISIONER))
    await ensure_health_bucket(provisioner.js)
    await provisioner.js.add_stream(output_stream_config(OutputRetention(max_msgs=1000), subjects=["corral.out.>"]))
    await provisioner.close()
    admin = await connect_bus(nats_server.url, credentials=credentials.get("admin"))
    for n in range(EVENTS):
        await admin.emit(f"atk{n % 4:05d}", PauseRequested(reason=f"event {n}", requested_by="t"), actor="test")
    validator = await connect_bus(nats_server.url, credentials=credentials.get("validator"))
    await ensure_work_consumer(validator.js, "validator", VALIDATOR_FILTER)  # the validator's own, as it does
    watchdog = await connect_bus(nats_server.url, credentials=credentials.get("watchdog"))
    record = orjson.dumps({"actor": "watchdog", "instance": "watchdog-host-1", "boot_id": "b0", "beat": 1})
    await (await watchdog.js.key_value(HEALTH_BUCKET)).put(WATCHDOG_KEY, record)
    await validator.close()
    await watchdog.close()
    yield World(nats_server, credentials, admin, record)
    await admin.close()


async def assert_untouched(world: World) -> None:
    js = world.admin.js
    info = await js.stream_info(STREAM)
    assert info.state.messages == EVENTS and info.state.first_seq == 1
    assert info.config.sealed is not True and (info.config.max_msgs or -1) == -1
    assert (info.config.max_age or 0) == 0 and (info.config.max_bytes or -1) == -1
    durable = (await js.consumer_info(STREAM, "validator")).config
    assert durable.filter_subject == VALIDATOR_FILTER and durable.durable_name == "validator"
    entry = await (await js.key_value(HEALTH_BUCKET)).get(WATCHDOG_KEY)
    assert entry.value == world.health_record
    assert (await js.stream_info(HEALTH_STREAM)).config.max_msgs_per_subject == 1


def stream_update(config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**config, **changes}


@pytest.mark.parametrize("role", ROLES)
async def test_no_role_can_change_the_streams(world: World, role: str) -> None:
    """STREAM.UPDATE (trim to 5, max_age, max_bytes, seal), DELETE, PURGE, CREATE: refused for every role."""
    raw = (await world.admin.nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=10)).data
    config = orjson.loads(raw)["config"]
    me = await attacker(world.server, world.credentials, role)
    try:
        tries: dict[str, tuple[str, dict[str, Any] | bytes]] = {
            "trim to 5": (f"$JS.API.STREAM.UPDATE.{STREAM}", stream_update(config, max_msgs=5)),
            "max_age": (f"$JS.API.STREAM.UPDATE.{STREAM}", stream_update(config, max_age=1_000_000)),
            "max_bytes": (f"$JS.API.STREAM.UPDATE.{STREAM}", stream_update(config, max_bytes=100)),
            "seal": (f"$JS.API.STREAM.UPDATE.{STREAM}", stream_update(config, sealed=True)),
            "delete": (f"$JS.API.STREAM.DELETE.{STREAM}", b""),
            "purge": (f"$JS.API.STREAM.PURGE.{STREAM}", {}),
            "delete a message": (f"$JS.API.STREAM.MSG.DELETE.{STREAM}", {"seq": 1}),
            "trim the output stream": (f"$JS.API.STREAM.UPDATE.{OUTPUT_STREAM}", {"name": OUTPUT_STREAM}),
            "shrink the health bucket": (f"$JS.API.STREAM.UPDATE.{HEALTH_STREAM}", {"name": HEALTH_STREAM}),
            "create a stream": ("$JS.API.STREAM.CREATE.EVIL", {"name": "EVIL", "subjects": ["corral.evt.x.>"]}),
            "snapshot": (f"$JS.API.STREAM.SNAPSHOT.{STREAM}", {}),
        }
        results = {name: await me.attempt(subject, body) for name, (subject, body) in tries.items()}
        assert results == dict.fromkeys(tries, "refused"), results
    finally:
        await me.nc.close()
    await assert_untouched(world)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "validator"])
async def test_no_role_can_touch_the_validators_durable(world: World, role: str) -> None:
    """Rewrite its filter (every create form), delete it, fetch or ack from it: refused."""
    config = {"name": "validator", "filter_subject": "corral.evt.*.nothing", "ack_policy": "explicit"}
    body: dict[str, Any] = {"stream_name": STREAM, "config": {**config, "durable_name": "validator"}}
    named: dict[str, Any] = {"stream_name": STREAM, "config": config}
    me = await attacker(world.server, world.credentials, role)
    try:
        results = {
            "named": await me.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.validator", body),
            "named+filter": await me.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.validator.corral.evt.*.nothing", body),
            "name in payload only": await me.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}", named),
            "legacy durable": await me.attempt(f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.validator", body),
            "delete": await me.attempt(f"$JS.API.CONSUMER.DELETE.{STREAM}.validator"),
            "fetch its work": await me.attempt(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.validator", {"batch": 1}),
            "pause": await me.attempt(f"$JS.API.CONSUMER.PAUSE.{STREAM}.validator", {"pause_until": FOREVER}),
        }
        assert results == dict.fromkeys(results, "refused"), results
        # A wildcard as the name token passes the subject check; JetStream refuses the mismatch.
        star = await me.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.*.corral.evt.*.nothing", named)
        assert star.startswith("error:") or star == "refused", star
    finally:
        await me.nc.close()
    await assert_untouched(world)


async def test_the_name_less_create_would_rewrite_a_durable(world: World) -> None:
    """Why nobody is granted `$JS.API.CONSUMER.CREATE.<stream>`: on nats-server 2.10+ it takes the name
    from the payload and updates an existing durable (admin shows it on a copy of the validator's)."""
    js = world.admin.js
    await ensure_work_consumer(js, "copy", VALIDATOR_FILTER)
    config = {"name": "copy", "filter_subject": "corral.evt.*.nothing", "ack_policy": "explicit"}
    reply = await world.admin.nc.request(
        f"$JS.API.CONSUMER.CREATE.{STREAM}", orjson.dumps({"stream_name": STREAM, "config": config}), timeout=10
    )
    assert "error" not in orjson.loads(reply.data)
    assert (await js.consumer_info(STREAM, "copy")).config.filter_subject == "corral.evt.*.nothing"
    assert '$JS.API.CONSUMER.CREATE.CORRAL"' not in render_auth_conf()


async def test_tap_creates_no_durable_of_an_actor(world: World) -> None:
    """tap (read-only): no actor's durable, no delete, no fetch; what it can create is only its own (docs)."""
    me = await attacker(world.server, world.credentials, "tap")
    try:
        body = {"stream_name": STREAM, "config": {"durable_name": "validator-tools", "name": "validator-tools"}}
        assert await me.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.validator-tools", body) == "refused"
        legacy = {"stream_name": STREAM, "config": {"durable_name": "tapdurable"}}
        assert await me.attempt(f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.tapdurable", legacy) == "refused"
        assert await me.attempt(f"$JS.API.CONSUMER.DELETE.{STREAM}.anything") == "refused"
    finally:
        await me.nc.close()
    await assert_untouched(world)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "watchdog"])
async def test_no_role_can_write_another_roles_health(world: World, role: str) -> None:
    forged = orjson.dumps({"actor": "watchdog", "instance": "watchdog-host-1", "boot_id": "b0", "beat": 99})
    me = await attacker(world.server, world.credentials, role)
    try:
        assert await me.publish(f"$KV.{HEALTH_BUCKET}.{WATCHDOG_KEY}", forged) == "refused"
        assert await me.publish(f"$KV.{HEALTH_BUCKET}.watchdog.invented-1", forged) == "refused"
        assert await me.publish(f"$KV.{HEALTH_BUCKET}.watchdog-host-2", forged) == "refused"  # the old layout
        if role in ("tap", "operator"):  # no health at all
            assert await me.publish(f"$KV.{HEALTH_BUCKET}.{role}.x", forged) == "refused"
    finally:
        await me.nc.close()
    await assert_untouched(world)


async def test_a_record_claiming_another_role_counts_for_its_writer(world: World) -> None:
    """A spawner may write `spawner.*` only; a record there claiming to be the watchdog is the spawner's."""
    spawner = await connect_bus(world.server.url, credentials=world.credentials.get("spawner"))
    try:
        kv = await spawner.js.key_value(HEALTH_BUCKET)
        claim = {"actor": "watchdog", "instance": "watchdog-host-9", "boot_id": "x", "beat": 1, "last_seen": 9e12}
        await kv.put(health_key("spawner", "spawner-host-9"), orjson.dumps(claim))
        records = {r["key"]: r for r in await read_health(spawner.js)}
    finally:
        await spawner.close()
    forged = records["spawner.spawner-host-9"]
    assert forged["actor"] == "spawner" and forged["instance"] == "spawner-host-9"
    # liveness is the server's time of the write, not the `last_seen` a record claims
    assert forged["written_at"] < 9e12
    stale = {**forged, "written_at": forged["written_at"] - 4 * HEALTH_INTERVAL_S}
    assert health_state(forged, forged["written_at"]) == "alive"
    assert health_state(stale, forged["written_at"]) == "gone"
    assert health_state(stale, forged["written_at"] + 3600) == "forgotten"


@pytest.mark.parametrize("role", ROLES)
async def test_each_roles_own_work_still_goes_through(world: World, role: str) -> None:
    """Reading the log with an ordered consumer and the health bucket; the actors' own writes."""
    bus = await connect_bus(world.server.url, credentials=world.credentials.get(role))
    try:
        assert bus.replicas == 1
        seen: list[int] = []

        async def on_msg(seq: int, msg: Msg) -> bool:
            seen.append(seq)
            return False

        await follow(bus.js, "corral.evt.>", on_msg, stop_when_caught_up=True)
        assert len(seen) == EVENTS
        kv = await bus.js.key_value(HEALTH_BUCKET)
        assert WATCHDOG_KEY in await kv.keys()  # a KV watcher: an ordered consumer on the bucket
        assert {r["key"] for r in await read_health(bus.js)} >= {WATCHDOG_KEY}
        if role not in ("tap", "operator"):
            await kv.put(health_key(role, f"{role}-host-1"), b'{"beat": 1}')
            await kv.delete(health_key(role, f"{role}-host-1"))
        if role == "validator":  # its own durable: updated when its filter changes, fetched from
            await ensure_work_consumer(bus.js, "validator-tools", events_of_type("tool.called"))
            await ensure_work_consumer(bus.js, "validator-tools", events_of_type("tool.result"))
            info = await bus.js.consumer_info(STREAM, "validator-tools")
            assert info.config.filter_subject == events_of_type("tool.result")
            sub = await bus.js.pull_subscribe_bind("validator", stream=STREAM)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=0.5)  # nothing to validate; the fetch itself is allowed
        if role == "projector":  # its durables: created, replaced, deleted; named with a key only it has
            projector_password = world.credentials.users["projector"]
            assert consumer_name(Path("x.duckdb"), projector_password) != consumer_name(Path("x.duckdb"), "other")
            from nats.js.api import AckPolicy, ConsumerConfig

            config = ConsumerConfig(durable_name="projector_0123abcd", ack_policy=AckPolicy.NONE)
            await bus.js.add_consumer(STREAM, config)
            assert await bus.js.delete_consumer(STREAM, "projector_0123abcd")
        if role == "operator":
            await bus.emit("atk00001", PauseRequested(reason="op", requested_by="operator"), actor="cli")
    finally:
        await bus.close()
    refused = [line for line in world.server.log_file.read_text().splitlines() if "Violation" in line]
    assert not refused, refused


async def test_only_the_provisioner_scales_and_updates(world: World) -> None:
    provisioner = await connect_bus(world.server.url, credentials=world.credentials.get(PROVISIONER))
    try:
        info = await provisioner.js.stream_info(STREAM)
        info.config.description = "updated by the provisioner"
        await provisioner.js.update_stream(info.config)
        assert (await provisioner.js.stream_info(STREAM)).config.description == "updated by the provisioner"
    finally:
        await provisioner.close()
    await assert_untouched(world)


def test_the_provisioner_is_a_user_of_every_server() -> None:
    """`corral credentials --server-env` writes every user's variable: the provisioner's too."""
    from events import auth

    assert (auth.HEALTH_BUCKET, auth.STREAM, auth.OUTPUT_STREAM) == (HEALTH_BUCKET, STREAM, "CORRAL_OUTPUT")
    creds = auth.generate()
    assert "CORRAL_PASS_PROVISIONER" in creds.server_env()
    assert "{user: provisioner, password: $CORRAL_PASS_PROVISIONER" in render_auth_conf()
    users = render_auth_conf().split("{user: ")[1:]
    writers = [u.split(",", 1)[0] for u in users if "$JS.API.STREAM.UPDATE" in u or "$JS.API.STREAM.CREATE" in u]
    assert writers == ["provisioner"], writers  # (and admin: ">")


async def test_a_host_without_the_provisioner_needs_the_streams_first(
    nats_server: EmbeddedServer, credentials: CredentialSet, tmp_path: Path
) -> None:
    """A credentials file without `provisioner` (a host that runs some actors of a cluster) never
    provisions: on an empty server it says what to do; once the streams exist it works."""
    import asyncio as aio
    import json

    from tests.conftest import Cli, cli_environment

    users = {user: password for user, password in credentials.users.items() if user != PROVISIONER}
    partial = tmp_path / "host2-credentials.json"
    partial.write_text(json.dumps({"version": 1, "operators": list(credentials.operators), "users": users}))
    env = cli_environment(CORRAL_HOME=str(tmp_path / "host2"), CORRAL_NATS_URL=nats_server.url)
    cli = Cli(tmp_path / "host2", {**env, "CORRAL_NATS_CREDS": str(partial)})

    refused = await aio.to_thread(cli, "ps")
    assert refused.returncode != 0 and "stream CORRAL does not exist" in refused.stderr, refused.stderr
    assert "no provisioner user" in refused.stderr and refused.stderr.count("\n") == 1

    provisioner = await connect_bus(nats_server.url, credentials=credentials.get(PROVISIONER))
    await ensure_health_bucket(provisioner.js)
    await provisioner.close()
    done = await aio.to_thread(cli, "ps", "--all")
    assert done.returncode == 0, done.stderr
    assert "Violation" not in nats_server.log_file.read_text()


# --- durables no role owns: the provisioner's sweep (events/consumers.py, corral/janitor.py) --------


async def _removals(admin: Bus) -> list[dict[str, Any]]:
    """The consumer.removed events recorded so far."""
    found: list[dict[str, Any]] = []

    async def on_msg(seq: int, msg: Msg) -> bool:
        found.append(orjson.loads(msg.data))
        return False

    await follow(admin.js, f"corral.evt.{sweep_id()}.consumer.removed", on_msg, stop_when_caught_up=True)
    return found


async def test_the_sweep_removes_durables_no_role_owns_and_keeps_every_roles_own(world: World) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    creds = world.credentials
    secret = creds.users["projector"]
    # the roles' own: the validator's (world), the notifier's and conductor's, two projectors' (two
    # `corral up` on one server: other DuckDB files, other hosts), each made by its own role
    for role in ("notifier", "conductor"):
        bus = await connect_bus(world.server.url, credentials=creds.get(role))
        await ensure_work_consumer(bus.js, role, events_of_type("pause.requested"))
        await bus.close()
    projector = await connect_bus(world.server.url, credentials=creds.get("projector"))
    mine = [consumer_name(Path(f"/host{n}/corral.duckdb"), secret) for n in (1, 2)]
    for name in mine:
        for stream in (STREAM, OUTPUT_STREAM):
            config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.NONE, inactive_threshold=7 * 24 * 3600.0)
            await projector.js.add_consumer(stream, config)
    await projector.close()
    # tap's: a durable under a fresh name, one under a forged projector name, a name-only consumer
    # kept for a year without a client; and an ephemeral one (reading), which stays
    tap = await attacker(world.server, creds, "tap")
    forged = "projector_0123456789ab_0123456789abcdef"
    made = {
        "tap-durable": {"durable_name": "tap-durable"},
        forged: {"durable_name": forged},
        "tap-year": {"name": "tap-year", "inactive_threshold": 365 * 24 * 3600 * 10**9},
        "tap-reader": {"name": "tap-reader", "inactive_threshold": 120 * 10**9},
    }
    for name, config in made.items():
        body = {"stream_name": STREAM, "config": {**config, "ack_policy": "none"}}
        assert await tap.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.{name}", body) == "ok", name
    assert await tap.attempt(f"$JS.API.CONSUMER.DELETE.{STREAM}.tap-durable") == "refused"  # tap cannot undo it
    await tap.nc.close()

    provisioner = await connect_bus(world.server.url, credentials=creds.get(PROVISIONER), provision=False)
    try:
        removed = await sweep_once(provisioner, janitor_for(secret), "provisioner-h-1")
        assert {(r.stream, r.name) for r in removed} == {
            (STREAM, "tap-durable"),
            (STREAM, forged),
            (STREAM, "tap-year"),
        }
        # a second `corral up` on the same server sweeps too: it keeps the other one's projector durables
        assert await sweep_once(provisioner, janitor_for(secret), "provisioner-h-2") == []
    finally:
        await provisioner.close()

    js = world.admin.js
    left = {(stream, c.name) for stream in (STREAM, OUTPUT_STREAM) for c in await js.consumers_info(stream)}
    for name in ("validator", "notifier", "conductor", "tap-reader"):
        assert (STREAM, name) in left
    for name in mine:
        assert {(STREAM, name), (OUTPUT_STREAM, name)} <= left
    assert not {name for _, name in left} & {"tap-durable", forged, "tap-year"}
    records = await _removals(world.admin)
    assert sorted(r["data"]["name"] for r in records) == sorted(["tap-durable", forged, "tap-year"])
    assert {r["actor"] for r in records} == {"provisioner-h-1"} and all(r["data"]["reason"] for r in records)
    durable = (await js.consumer_info(STREAM, "validator")).config
    assert durable.filter_subject == VALIDATOR_FILTER and durable.durable_name == "validator"


def test_a_durable_tap_creates_is_gone_within_a_sweep_of_corral_up(
    cli: Cli, credentials: CredentialSet, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Two `corral up` sharing one server (the second: another home, the same credentials, its own
    DuckDB file) each sweep every second; a durable tap makes goes, both projectors' durables stay."""
    import json
    import subprocess

    from tests.conftest import cli_environment
    from tests.test_control import start_up, stop_up

    sweep = '[security]\nconsumer_sweep = "1s"\n'
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text(sweep)
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home2"), CORRAL_NATS_URL=nats_server.url)
    second = Cli(tmp_path / "home2", {**env, "CORRAL_NATS_CREDS": str(cli.home / "credentials.json")})
    second.home.mkdir(parents=True, exist_ok=True)
    (second.home / "corral.toml").write_text(sweep)
    ups: list[tuple[Cli, subprocess.Popen[str]]] = []
    try:
        ups.append((cli, start_up(cli)))
        ups.append((second, start_up(second, "--actors", "projector", "--no-http")))
        secret = credentials.users["projector"]
        projectors = {consumer_name(home / "corral.duckdb", secret) for home in (cli.home, second.home)}

        async def attack_and_wait(name: str) -> dict[str, Any]:
            tap = await attacker(nats_server, credentials, "tap")
            body = {"stream_name": STREAM, "config": {"durable_name": name, "ack_policy": "none"}}
            assert await tap.attempt(f"$JS.API.CONSUMER.CREATE.{STREAM}.{name}", body) == "ok"
            await tap.nc.close()
            admin = await connect_bus(nats_server.url, credentials=credentials.get("admin"))
            try:
                for _ in range(300):
                    done = [r for r in await _removals(admin) if r["data"]["name"] == name]
                    if done:
                        names = {c.name for c in await admin.js.consumers_info(STREAM)}
                        assert name not in names and projectors <= names, names
                        return done[0]
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()
            raise AssertionError(f"{name} was not removed")

        sweepers = set()
        for n in range(20):  # until each `corral up` has removed one: each swept with both projectors there
            sweepers.add(asyncio.run(attack_and_wait(f"tap-durable-{n}"))["actor"])
            if len(sweepers) == 2:
                break
        assert len(sweepers) == 2, sweepers
        rows = json.loads(cli("sql", "SELECT data->>'name' AS name FROM events WHERE type = 'consumer.removed'",
                              "--json", check=True).stdout)  # fmt: skip
        assert {row["name"] for row in rows} >= {"tap-durable-0"}
        # nothing of Corral's own was swept: every reader's ephemeral consumer, KV watcher, durable
        assert all(row["name"].startswith("tap-durable-") for row in rows), rows
    finally:
        for who, process in reversed(ups):
            stop_up(who, process)


def test_corral_responders_answer_no_reply_subject_in_the_log(
    cli: Cli, credentials: CredentialSet, nats_server: EmbeddedServer
) -> None:
    """A request whose reply subject is an event subject (`corral.evt.<id>.cancel.requested`):
    the projector's query API and the approver's decision API answer nothing there, act on nothing,
    and nothing is stored; the same requests with an inbox are answered."""
    from tests.test_control import start_up, stop_up

    up = start_up(cli)
    target = "corral.evt.zzzz0001.cancel.requested"

    async def attack() -> None:
        tap = await attacker(nats_server, credentials, "tap")
        operator = await attacker(nats_server, credentials, "operator")
        try:
            sql = orjson.dumps({"sql": "SELECT 42 AS x"})
            await tap.nc.publish("corral.api.sql", sql, reply=target)
            await tap.nc.publish("corral.api.projections.position", b"", reply=f"$JS.API.STREAM.INFO.{STREAM}")
            decision = {"execution_id": "zzzz0002", "data": {"approval_id": "AP-X", "decision": "approve"}}
            await operator.nc.publish("corral.api.approval.decide.operator", orjson.dumps(decision), reply=target)
            await tap.nc.flush()
            await operator.nc.flush()
            # the same responders, asked properly afterwards: answered (so the requests above were handled)
            answer = orjson.loads((await tap.nc.request("corral.api.sql", sql, timeout=30)).data)
            assert answer["ok"] and "42" in str(answer["rows"]), answer
            bad = await operator.nc.request("corral.api.approval.decide.operator", b"{}", timeout=30)
            assert orjson.loads(bad.data)["ok"] is False
        finally:
            await tap.nc.close()
            await operator.nc.close()
        admin = await connect_bus(nats_server.url, credentials=credentials.get("admin"))
        try:
            for execution in ("zzzz0001", "zzzz0002"):  # no answer stored, no decision recorded
                info = await admin.js.stream_info(STREAM, subjects_filter=f"corral.evt.{execution}.>")
                assert not info.state.subjects, info.state.subjects
        finally:
            await admin.close()

    try:
        asyncio.run(attack())
    finally:
        stop_up(cli, up)
