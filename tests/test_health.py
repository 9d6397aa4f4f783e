"""`corral health` after a crashed `corral up` (issue 19, item 5; issue 14, item 4).

The instances of a `corral up` killed with SIGKILL stop beating: after HEALTH_MISSED_BEATS beats
they show as gone and `corral health` exits 1 (no actor has an alive instance); once a new
`corral up` runs, its instances are alive beside the gone ones and the exit code is 0 again.
Liveness is the server's time of each record's last write, not what the record says.
"""

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from nats.js.errors import KeyNotFoundError

from actors.bus import connect_bus
from actors.runtime import HEALTH_RETENTION_S, Actor, health_state
from corral.server import EmbeddedServer
from corral.system import ALL_ACTORS
from events.auth import PROVISIONER, CredentialSet
from events.stream import ensure_health_bucket
from events.subjects import HEALTH_BUCKET
from tests.conftest import Cli
from tests.test_control import start_up, stop_up, wait_until


def health(cli: Cli) -> tuple[int, dict[str, Any]]:
    done = cli("health", "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_a_crashed_up_shows_as_gone_then_its_successor_alive(cli: Cli) -> None:
    first = start_up(cli)
    try:
        wait_until(
            lambda: {a["actor"] for a in health(cli)[1]["actors"] if a["alive"]} == set(ALL_ACTORS),
            30,
            "every actor of the first corral up to report",
        )
    finally:
        first.kill()  # SIGKILL: no actor deletes its record
        first.wait()

    def all_gone() -> tuple[int, dict[str, Any]] | None:
        code, report = health(cli)
        return (code, report) if report["actors"] and not any(a["alive"] for a in report["actors"]) else None

    code, report = cast(tuple[int, dict[str, Any]], wait_until(all_gone, 60, "the killed instances to be gone"))
    assert code == 1 and sorted(report["down"]) == sorted(ALL_ACTORS)
    assert {a["state"] for a in report["actors"]} == {"gone"}
    assert all(a["pid"] == first.pid for a in report["actors"])
    assert "gone" in cli("health").stdout

    second: subprocess.Popen[str] = start_up(cli)
    try:

        def successors() -> tuple[int, dict[str, Any]] | None:
            code, report = health(cli)
            alive = {a["actor"] for a in report["actors"] if a["alive"]}
            return (code, report) if alive == set(ALL_ACTORS) else None

        code, report = cast(tuple[int, dict[str, Any]], wait_until(successors, 30, "the second corral up to report"))
        assert code == 0 and report["down"] == []
        alive = [a for a in report["actors"] if a["alive"]]
        gone = [a for a in report["actors"] if not a["alive"]]
        assert {a["pid"] for a in alive} == {second.pid} and {a["pid"] for a in gone} == {first.pid}
        assert all(a["key"] == f"{a['actor']}.{a['instance']}" and a["beat"] >= 1 for a in report["actors"])
        # past the retention, the dead instances are forgotten (not listed, not counted)
        later = max(a["written_at"] for a in gone) + HEALTH_RETENTION_S + 1
        assert all(health_state(a, later) == "forgotten" for a in gone)
    finally:
        stop_up(cli, second)


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(100000):
        if await check():
            return
        await asyncio.sleep(0.1)


async def test_an_instance_replaces_a_record_forged_on_its_key(
    nats_server: EmbeddedServer, credentials: CredentialSet
) -> None:
    """Another client with the same role's credentials writes this instance's key: the instance's
    next beat notices (its write expects its own last revision) and writes its own record back."""

    class Idle(Actor):
        name = "spawner"

        async def run(self) -> None:
            await self.stopping.wait()

    provisioner = await connect_bus(nats_server.url, credentials=credentials.get(PROVISIONER))
    await ensure_health_bucket(provisioner.js)
    await provisioner.close()
    own = await connect_bus(nats_server.url, credentials=credentials.get("spawner"))
    forger = await connect_bus(nats_server.url, credentials=credentials.get("spawner"))
    actor = Idle(own, instance="spawner-host-7")
    await actor.start()
    try:
        kv = await forger.js.key_value(HEALTH_BUCKET)

        async def record() -> dict[str, Any]:
            try:
                value = (await kv.get(actor.health_key)).value
            except KeyNotFoundError:
                return {}
            return dict(orjson.loads(value or b"{}"))

        async def own_record() -> bool:
            return (await record()).get("boot_id") == actor.boot_id

        await until(own_record)
        await kv.put(actor.health_key, orjson.dumps({"boot_id": "forged", "beat": 10**9}))

        async def replaced() -> bool:
            return actor.health_overwritten == 1 and await own_record()

        await until(replaced)
        assert (await record())["beat"] == actor.beat
    finally:
        await actor.stop()
        await own.close()
        await forger.close()
