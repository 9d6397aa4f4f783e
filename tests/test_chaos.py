"""Chaos: real nats-server processes and `corral up` processes killed mid-run; nothing lost, nothing twice.

Each test runs real agents (examples/agent.py, whose stdout is known in advance), breaks
something while they run, and then counts, for the whole run:

- published: the stdout lines the agents printed (known from their arguments);
- stored: what the stream holds: events (all ids unique) and the stdout lines they carry;
- projected: what DuckDB holds (`corral sql`): the same event ids and the same stdout lines.

All three must be equal, every execution's stdout must be exactly the agent's (no line lost or
repeated), and each lifecycle event (claimed, started, exited) must be there once.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest

from corral.server import EmbeddedServer, find_nats_server
from events.auth import CREDENTIALS_FILE, ENV_CREDS, ENV_PASSWORD, ENV_USER, CredentialSet, credential_set
from events.subjects import HEALTH_BUCKET, STREAM
from tests.conftest import AGENT, CLIENT_CREDENTIAL_ENV, ROOT
from tests.helpers.cluster import (
    DEPLOY,
    LocalCluster,
    Up,
    admin_options,
    read_log,
    wait_for_exits,
    wait_for_output,
    wait_until,
)

pytestmark = pytest.mark.slow

STEPS, SLEEP_S, LINES = 50, 0.2, 2  # about 10 s per agent, a line every 0.1 s: long enough to break things under it
FROZEN_S = 2.0  # (b): how long the embedded server is frozen before it is killed
LIFECYCLE = ("execution.claimed", "execution.started", "execution.exited")


def expected_stdout(task: str, steps: int = STEPS, lines: int = LINES) -> str:
    """What examples/agent.py prints on stdout for these arguments."""
    out = [f"agent: task {task!r} ({steps} steps)"]
    for step in range(1, steps + 1):
        out += [f"step {step}/{steps}: wrote agent-output/step-{step}.txt [{line}]" for line in range(lines)]
    out.append(f"agent: done, {steps} files written")
    return "".join(line + "\n" for line in out)


def base_env(root: Path) -> dict[str, str]:
    """The environment of the Corral processes of a test under `root`.

    Against the `nats_server` fixture (which has Corral's users), every process takes its own
    role's password from the fixture's credentials file (`root/home`), as several hosts sharing
    one server would; the test process's own admin identity is not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_NATS_URL", "CORRAL_HOME", *CLIENT_CREDENTIAL_ENV)}
    shared = root / "home" / CREDENTIALS_FILE
    if shared.is_file():
        env[ENV_CREDS] = str(shared)
    return env


def corral(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a `corral` command with CORRAL_HOME=home (homes of a test are siblings under its root)."""
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env={**base_env(home.parent), "CORRAL_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def submit(home: Path, repo: Path, tasks: list[str]) -> dict[str, str]:
    """`corral run --detach` one agent per task (all at once) through the system of `home`; {id: task}."""

    def one(task: str) -> tuple[str, str]:
        agent = [sys.executable, str(AGENT), task, "--steps", str(STEPS), "--sleep", str(SLEEP_S)]
        done = corral(home, "run", "--detach", "--repo", str(repo), "--", *agent, "--lines", str(LINES))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip(), task

    with ThreadPoolExecutor(len(tasks)) as pool:
        return dict(pool.map(one, tasks))


def sql(home: Path, query: str) -> list[dict[str, Any]]:
    done = corral(home, "sql", query, "--json", "--max-rows", "1000000")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def stdout_by_execution(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Concatenate stdout chunks per execution in the order the shim numbered them (`n`).

    Stream order may differ from `n` order after a failover: a publish retried after its
    acknowledgement was lost is stored after the ones sent behind it (see `reordered`).
    """
    chunks: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        chunks.setdefault(row["execution_id"], []).append((row["n"], row["text"]))
    return {eid: "".join(text for _, text in sorted(parts)) for eid, parts in chunks.items()}


def reordered(events: list[dict[str, Any]]) -> int:
    """Output chunks stored after a chunk of the same stream that the agent printed later."""
    highest: dict[tuple[str, str], int] = {}
    count = 0
    for event in events:
        if event["type"] == "output":
            key = (event["execution_id"], event["data"]["stream"])
            count += event["data"]["n"] < highest.get(key, -1)
            highest[key] = max(highest.get(key, -1), event["data"]["n"])
    return count


@dataclass
class Tally:
    published_lines: int
    stored_lines: int
    projected_lines: int
    stored_events: int
    stored_ids: int
    projected_events: int
    projected_ids: int

    def line(self, name: str) -> str:
        return (
            f"chaos {name}: stdout lines published {self.published_lines} / stored {self.stored_lines} / "
            f"projected {self.projected_lines}; events stored {self.stored_events} ({self.stored_ids} ids) / "
            f"projected {self.projected_events} ({self.projected_ids} ids)"
        )


async def tally(url: str, query_home: Path, runs: dict[str, str], *, name: str, timeout_s: float = 60.0) -> Tally:
    """Count published vs stored vs projected, assert they are equal and that nothing is repeated.

    `query_home` runs a projector (`corral sql` goes through it); its credentials open the server."""
    stored = await read_log(url, home=query_home)
    ids = [event["id"] for event in stored]
    assert len(ids) == len(set(ids)), f"an event stored twice: {[i for i, n in Counter(ids).items() if n > 1]}"
    published = {eid: expected_stdout(task) for eid, task in runs.items()}
    stored_text = stdout_by_execution(
        [
            {"execution_id": e["execution_id"], "n": e["data"]["n"], "text": e["data"]["text"]}
            for e in stored
            if e["type"] == "output" and e["data"]["stream"] == "stdout"
        ]
    )
    kinds = Counter((e["execution_id"], e["type"]) for e in stored)
    for eid in runs:
        assert stored_text.get(eid) == published[eid], f"{eid}: stored stdout differs from what the agent printed"
        for kind in LIFECYCLE:
            assert kinds[(eid, kind)] == 1, f"{eid}: {kinds[(eid, kind)]} × {kind}"
    exits = [e for e in stored if e["type"] == "execution.exited" and e["execution_id"] in runs]
    assert [(e["data"]["exit_code"], e["data"]["reason"]) for e in exits] == [(0, "exited")] * len(runs)

    # The projector catches up on its own; `corral sql` answers from what it has applied.
    def caught_up() -> bool:
        done = corral(query_home, "sql", "SELECT count(*) AS n FROM events", "--json")
        if done.returncode != 0:
            assert LOCKED in done.stderr, done.stderr  # (d): not reopened yet
            return False
        return bool(json.loads(done.stdout)[0]["n"] >= len(stored))

    await asyncio.to_thread(wait_until, caught_up, timeout_s=timeout_s, what="the projector to catch up", every_s=1.0)
    # Actors may append more (a late checkpoint, a validation): compare up to what was read.
    last = stored[-1]["seq"]
    projected_ids = [row["id"] for row in sql(query_home, f"SELECT id FROM events WHERE seq <= {last} ORDER BY seq")]
    projected_text = stdout_by_execution(
        sql(query_home, f"SELECT execution_id, n, text FROM output WHERE stream = 'stdout' AND seq <= {last}")
    )
    assert len(projected_ids) == len(set(projected_ids)), "an event projected twice"
    assert set(projected_ids) == set(ids)
    for eid in runs:
        assert projected_text.get(eid) == published[eid], f"{eid}: projected stdout differs from the agent's"
    result = Tally(
        published_lines=sum(text.count("\n") for text in published.values()),
        stored_lines=sum(stored_text[eid].count("\n") for eid in runs),
        projected_lines=sum(projected_text[eid].count("\n") for eid in runs),
        stored_events=len(ids),
        stored_ids=len(set(ids)),
        projected_events=len(projected_ids),
        projected_ids=len(set(projected_ids)),
    )
    print(result.line(name) + f"; {reordered(stored)} output chunks stored out of order")
    assert result.published_lines == result.stored_lines == result.projected_lines
    assert result.stored_events == result.stored_ids == result.projected_events == result.projected_ids
    return result


async def ended(url: str, home: Path | None = None) -> dict[str, Any]:
    """{execution id: data of its terminal event} for the executions that ended."""
    terminal = ("execution.exited", "execution.failed")
    return {e["execution_id"]: e["data"] for e in await read_log(url, home=home) if e["type"] in terminal}


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    """Every `corral up` a test starts; all stopped at the end, whatever happened."""
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


@pytest.fixture
def cluster(tmp_path: Path, credentials: CredentialSet, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """deploy/'s three nodes with Corral's users; this test process connects as `admin`, every
    `corral up` with the credentials file (base_env: CORRAL_NATS_CREDS)."""
    admin = credentials.get("admin")
    assert admin is not None
    monkeypatch.setenv(ENV_USER, admin.user)
    monkeypatch.setenv(ENV_PASSWORD, admin.password)
    local = LocalCluster(tmp_path, credentials)
    yield local
    local.stop()


# --- (a) a 3-node cluster loses a node -----------------------------------------------------------


async def test_cluster_node_killed_mid_run(cluster: LocalCluster, ups: list[Up], repo: Path, tmp_path: Path) -> None:
    await cluster.start()
    # docs/deployment.md: two spawner hosts (spawner + checkpointer each), one host for the rest.
    env = base_env(tmp_path)
    for name in ("spawner-1", "spawner-2"):
        args = ["--nats", cluster.urls, "--actors", "spawner,checkpointer", "--max-running", "3"]
        ups.append(Up(tmp_path / name, args, env))
    main = Up(tmp_path / "main", ["--nats", cluster.urls, "--actors", "projector,watchdog,validator,approver"], env)
    ups.append(main)
    for up in ups:
        await asyncio.to_thread(up.start)

    nc = await nats.connect(cluster.urls.split(","), **admin_options(None))
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        assert info.config.num_replicas == 3
        health = await js.stream_info(f"KV_{HEALTH_BUCKET}")
        assert health.config.num_replicas == 3
        runs = await asyncio.to_thread(submit, main.home, repo, [f"cluster task {i}" for i in range(6)])
        await wait_for_output(cluster.urls, list(runs), chunks=2)
        leader = (await js.stream_info(STREAM)).cluster
        assert leader is not None and leader.leader
    finally:
        await nc.close()
    assert not await ended(cluster.urls), "an agent ended before the node was killed"
    victim = cluster.node(leader.leader)
    victim.kill()  # the stream's leader: a new one is elected among the two left

    survivors = ",".join(node.url for node in cluster.nodes if node is not victim)
    await wait_for_exits(survivors, list(runs), timeout_s=120)
    result = await tally(survivors, main.home, runs, name="(a) cluster node killed")
    assert result.published_lines == 6 * (STEPS * LINES + 2)
    claimed_by = {e["data"]["spawner"] for e in await read_log(survivors) if e["type"] == "execution.claimed"}
    assert len(claimed_by) == 2, f"both spawners should have taken work: {claimed_by}"


# --- (b) the embedded server dies and `corral up` restarts it -------------------------------------


async def test_embedded_server_killed_and_restarted(ups: list[Up], repo: Path, tmp_path: Path) -> None:
    up = Up(tmp_path / "home", [], base_env(tmp_path))
    ups.append(up)
    await asyncio.to_thread(up.start)
    runtime = up.runtime()
    assert runtime is not None and runtime["embedded_server"]
    url, server_pid = runtime["url"], runtime["server_pid"]

    runs = await asyncio.to_thread(submit, up.home, repo, [f"embedded task {i}" for i in range(4)])
    await wait_for_output(url, list(runs), chunks=2, home=up.home)
    assert not await ended(url, up.home), "an agent ended before the server was killed"
    # Frozen first, then killed: what the spawners sent to the frozen server is lost with it and
    # must be sent again, and the agents' output meanwhile waits in their spools. (A bare kill is
    # restarted within a fraction of a second, too short a window to prove anything.)
    frozen_at = time.time()
    os.kill(server_pid, signal.SIGSTOP)
    await asyncio.sleep(FROZEN_S)
    os.kill(server_pid, signal.SIGKILL)

    def restarted() -> float | None:
        current = up.runtime() or {}
        return time.time() if current.get("server_pid") not in (None, server_pid) else None

    back_at = await asyncio.to_thread(wait_until, restarted, timeout_s=60, what="corral up to restart nats-server")
    await wait_for_exits(url, list(runs), timeout_s=120, home=up.home)
    result = await tally(url, up.home, runs, name="(b) embedded server killed")
    assert result.published_lines == 4 * (STEPS * LINES + 2)
    assert up.stderr.count("restarting it on") == 1, up.stderr
    assert (up.runtime() or {}).get("server_restarts") == 1
    # What the agents printed while no server ran was spooled by their shims and published after.
    stored = await read_log(url, home=up.home)
    meanwhile = [e for e in stored if e["type"] == "output" and frozen_at < _epoch(e["ts"]) < back_at]
    print(f"chaos (b): server down {back_at - frozen_at:.1f}s; {len(meanwhile)} output events produced meanwhile")
    assert meanwhile, "no output was produced while the server was down: the test proved nothing"


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


# --- (c) every actor SIGKILLed mid-run and restarted ----------------------------------------------


async def test_each_actor_killed_and_restarted(
    nats_server: EmbeddedServer, ups: list[Up], repo: Path, tmp_path: Path
) -> None:
    env = base_env(tmp_path)
    url = nats_server.url
    spawner = Up(tmp_path / "spawner", ["--nats", url, "--actors", "spawner"], env)
    others = Up(tmp_path / "others", ["--nats", url, "--actors", "watchdog,checkpointer,validator,approver"], env)
    projector = Up(tmp_path / "projector", ["--nats", url, "--actors", "projector"], env)
    ups.extend([spawner, others, projector])
    for up in ups:
        await asyncio.to_thread(up.start)

    nc = await nats.connect(url, **admin_options(None))
    try:  # a single server: one replica
        assert (await nc.jetstream().stream_info(STREAM)).config.num_replicas == 1
    finally:
        await nc.close()
    runs = await asyncio.to_thread(submit, projector.home, repo, [f"actor task {i}" for i in range(4)])
    chunks = 2
    for up in (spawner, others, projector):
        await wait_for_output(url, list(runs), chunks=chunks)
        assert not await ended(url), f"an agent ended before {up.args[-1]} was killed"
        up.kill()
        await asyncio.to_thread(up.start)
        chunks += 2
    await wait_for_exits(url, list(runs), timeout_s=120)
    result = await tally(url, projector.home, runs, name="(c) actors killed")
    assert result.published_lines == 4 * (STEPS * LINES + 2)
    assert [up.starts for up in (spawner, others, projector)] == [2, 2, 2]


# --- (d) an analyst holds the DuckDB file ----------------------------------------------------------


HOLD = "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(600)"
LOCKED = "is locked by another process"


def hold(database: Path) -> subprocess.Popen[str]:
    """An analyst's session: a process with the DuckDB file open for writing, until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(database)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()


async def test_projector_waits_for_a_locked_database(
    nats_server: EmbeddedServer, ups: list[Up], repo: Path, tmp_path: Path
) -> None:
    env = base_env(tmp_path)
    url = nats_server.url
    spawner = Up(tmp_path / "spawner", ["--nats", url, "--actors", "spawner,watchdog"], env)
    projector = Up(tmp_path / "projector", ["--nats", url, "--actors", "projector"], env)
    ups.extend([spawner, projector])
    database = projector.home / "corral.duckdb"
    projector.home.mkdir(parents=True)
    await asyncio.to_thread(spawner.start)

    holders = [hold(database)]  # the projector starts while the file is held
    try:
        await asyncio.to_thread(projector.start)
        wait_until(lambda: LOCKED in projector.stderr, timeout_s=30, what="the projector to report the lock")
        runs = await asyncio.to_thread(submit, spawner.home, repo, ["locked at start 0", "locked at start 1"])
        refused = corral(projector.home, "sql", "SELECT count(*) FROM events")
        assert refused.returncode != 0 and LOCKED in refused.stderr, refused.stderr
        await wait_for_exits(url, list(runs), timeout_s=120)
        release(holders.pop())
        await tally(url, projector.home, runs, name="(d) locked at start")

        # The projector is killed and restarts while an analyst holds the file again.
        projector.kill()
        holders.append(hold(database))
        await asyncio.to_thread(projector.start)
        wait_until(lambda: projector.stderr.count(LOCKED) == 2, timeout_s=30, what="the lock reported again")
        more = await asyncio.to_thread(submit, spawner.home, repo, ["locked at restart 0", "locked at restart 1"])
        await wait_for_output(url, list(more), chunks=2)
        release(holders.pop())  # released mid-run: the projector catches up and follows live
        await wait_for_exits(url, list(more), timeout_s=120)
        result = await tally(url, projector.home, {**runs, **more}, name="(d) locked at restart")
        assert result.published_lines == 4 * (STEPS * LINES + 2)
    finally:
        for holder in holders:
            release(holder)
    assert "free again" in projector.stderr


def test_up_refuses_a_bad_nats_url(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = corral(home, "up", "--nats", "nats://127.0.0.1:4222,http://example.com")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "'http://example.com' is not a NATS URL" in done.stderr
    assert not (home / "runtime.json").exists()


def test_credentials_write_a_cluster_nodes_environment(tmp_path: Path) -> None:
    """`corral credentials --server-env FILE`: what a node of deploy/ needs to load nats-auth.conf."""
    home = tmp_path / "home"
    env = {**base_env(tmp_path), "CORRAL_HOME": str(home)}
    out = tmp_path / "node.env"
    shown = subprocess.run(
        [sys.executable, "-m", "corral", "credentials", "--server-env", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    listing = json.loads(shown.stdout)
    assert {"spawner", "projector", "tap", "operator"} <= {u["user"] for u in listing["users"]}
    creds = credential_set(home, {})
    assert creds is not None
    assert all(password not in shown.stdout + shown.stderr for password in creds.users.values())
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    # Sourced by a shell, the file lets a node of the recipe load its configuration with Corral's
    # users (`-t`: check the configuration and exit); without it, the node refuses to start.
    node_conf = DEPLOY / "node-a.conf"
    script = f"set -a; . {out}; exec {find_nats_server()} -c {node_conf} -sd {tmp_path / 'nats-a'} -t"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_PASS_")}
    loaded = subprocess.run(["sh", "-c", script], env=clean, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    bare = subprocess.run(
        [find_nats_server(), "-c", str(node_conf), "-sd", str(tmp_path / "nats-a"), "-t"],
        env=clean,
        capture_output=True,
        text=True,
    )
    assert bare.returncode != 0 and "CORRAL_PASS_" in bare.stdout + bare.stderr
