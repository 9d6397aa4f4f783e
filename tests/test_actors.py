"""Actors against a real nats-server: spawners racing for work, a projector killed mid-stream."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from actors.bus import Bus, connect_bus
from actors.spawner import Spawner
from events.envelope import decode_event, new_event
from events.ids import new_execution_id
from events.subjects import ALL_EVENTS
from events.types import CancelRequested, ExecutionExited, ExecutionRequested, Heartbeat, Output
from projections.projector import Projector
from replay.history import follow, last_sequence
from tests.conftest import ROOT, processes_mentioning

TABLE_ORDER = {"events": "seq", "output": "seq", "executions": "execution_id", "rejected_events": "seq"}


async def test_two_spawners_run_each_request_exactly_once(bus: Bus, nats_server, repo: Path, tmp_path: Path) -> None:
    second_bus = await connect_bus(nats_server.url)
    spawners = [
        Spawner(bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run-a", instance="spawner-a"),
        Spawner(second_bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run-b", instance="spawner-b"),
    ]
    ids = [new_execution_id() for _ in range(10)]
    try:
        for spawner in spawners:
            await spawner.start()
        for execution_id in ids:
            request = ExecutionRequested(
                command=(sys.executable, "-c", "import time; time.sleep(0.2); print('ran')"), repo=str(repo)
            )
            await bus.publisher.publish(new_event(execution_id, request, actor="test"))
        exited: set[str] = set()
        counts: dict[tuple[str, str], int] = {}
        claimers: dict[str, str] = {}
        done = asyncio.Event()

        async def on_event(seq: int, msg) -> bool:
            event = decode_event(msg.data, seq=seq)
            key = (event.execution_id, event.type)
            counts[key] = counts.get(key, 0) + 1
            if event.type == "execution.claimed":
                claimers[event.execution_id] = event.data.spawner  # type: ignore[attr-defined]
            if event.type == "execution.exited":
                exited.add(event.execution_id)
            return exited >= set(ids)

        await asyncio.wait_for(follow(bus.js, ALL_EVENTS, on_event, done=done), 60)
    finally:
        for spawner in spawners:
            await spawner.stop()
        await second_bus.close()
    for execution_id in ids:
        for kind in ("execution.claimed", "workspace.created", "execution.started", "execution.exited"):
            assert counts[(execution_id, kind)] == 1, (execution_id, kind)
        assert (tmp_path / "wt" / execution_id).is_dir()
    assert set(claimers.values()) <= {"spawner-a", "spawner-b"}


async def test_a_follow_up_continues_in_its_worktree_and_one_whose_worktree_is_gone_fails(
    bus: Bus, repo: Path, tmp_path: Path
) -> None:
    """A request naming a worktree (a pipeline's next stage, `corral run --resume`) runs in it, on
    its branch; one whose worktree is gone fails at the workspace stage with one line, and runs nothing."""
    spawner = Spawner(bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run", instance="spawner-f")
    first, follow_up, orphan = new_execution_id(), new_execution_id(), new_execution_id()
    seen: dict[tuple[str, str], dict] = {}

    async def wait_for(execution_id: str, *kinds: str) -> dict:
        async def on_event(seq: int, msg) -> bool:
            event = decode_event(msg.data, seq=seq)
            seen[(event.execution_id, event.type)] = event.data.model_dump()
            return any((execution_id, kind) in seen for kind in kinds)

        await asyncio.wait_for(follow(bus.js, ALL_EVENTS, on_event, done=asyncio.Event()), 60)
        return next(seen[(execution_id, kind)] for kind in kinds if (execution_id, kind) in seen)

    try:
        await spawner.start()
        write = ExecutionRequested(command=("sh", "-c", "echo one > made.txt"), repo=str(repo))
        await bus.publisher.publish(new_event(first, write, actor="test"))
        await wait_for(first, "execution.exited")
        worktree = tmp_path / "wt" / first
        read = ExecutionRequested(command=("sh", "-c", "cat made.txt"), repo=str(repo), worktree=str(worktree))
        await bus.publisher.publish(new_event(follow_up, read, actor="test"))
        await wait_for(follow_up, "execution.exited")
        gone = ExecutionRequested(command=("touch", "ran"), repo=str(repo), worktree=str(tmp_path / "wt" / "nothing"))
        await bus.publisher.publish(new_event(orphan, gone, actor="test"))
        failed = await wait_for(orphan, "execution.failed", "execution.started")
    finally:
        await spawner.stop()
    created = seen[(follow_up, "workspace.created")]
    assert (created["path"], created["branch"]) == (str(worktree), f"corral/{first}")
    assert seen[(follow_up, "execution.exited")]["exit_code"] == 0
    assert (orphan, "execution.started") not in seen and (orphan, "workspace.created") not in seen
    assert failed["stage"] == "workspace" and "the worktree to continue in is gone" in failed["error"]
    assert "\n" not in failed["error"]
    assert not (tmp_path / "wt" / "nothing").exists()


async def test_a_cancel_while_the_shim_starts_ends_the_agent(bus: Bus, repo: Path, tmp_path: Path, monkeypatch) -> None:
    """A cancel that comes after the worktree is made but before the shim can be told (here: a shim
    started as a fresh interpreter, CORRAL_SHIM_FORK=0, so that moment lasts) is kept and handed to the
    shim once it is there: the agent is stopped, not left running for its whole 30 s."""
    monkeypatch.setenv("CORRAL_SHIM_FORK", "0")
    spawner = Spawner(bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run", instance="spawner-c")
    execution_id = new_execution_id()
    seen: dict[str, dict] = {}
    cancelled = False

    async def on_event(seq: int, msg) -> bool:
        nonlocal cancelled
        event = decode_event(msg.data, seq=seq)
        if event.execution_id != execution_id:
            return False
        seen[event.type] = event.data.model_dump()
        if event.type == "workspace.created" and not cancelled:
            cancelled = True
            await bus.publisher.publish(new_event(execution_id, CancelRequested(grace_s=1.0), actor="test"))
        return "execution.exited" in seen or "execution.failed" in seen

    try:
        await spawner.start()
        sleeper = ExecutionRequested(command=("sleep", "30"), repo=str(repo))
        await bus.publisher.publish(new_event(execution_id, sleeper, actor="test"))
        await asyncio.wait_for(follow(bus.js, ALL_EVENTS, on_event, done=asyncio.Event()), 20)
    finally:
        await spawner.stop()
    assert "execution.failed" not in seen
    assert seen["execution.exited"]["reason"] == "cancelled"
    assert seen["execution.exited"]["duration_s"] < 15


async def _publish_history(bus: Bus, executions: int, chunks: int) -> int:
    futures = []
    for _ in range(executions):
        eid = new_execution_id()
        datas = [ExecutionRequested(command=("agent",), repo="/r")]
        datas += [Output(stream="stdout", n=i, text=f"line {i} of {eid}\n") for i in range(chunks)]
        datas += [Heartbeat(), ExecutionExited(exit_code=0, duration_s=1.0)]
        for data in datas:
            event = new_event(eid, data, actor="test")
            futures.append(await bus.publisher.send(event.subject, event.to_bytes(), msg_id=event.id))
    await asyncio.gather(*futures)
    return await last_sequence(bus.js)


def _dump(path: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {
            table: con.execute(f"SELECT CAST(COLUMNS(*) AS VARCHAR) FROM {table} ORDER BY {order}").fetchall()
            for table, order in TABLE_ORDER.items()
        }
    finally:
        con.close()


def _alive(pid: int) -> bool:
    """The process exists and has not finished exiting (a zombie holds no file lock)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False
    # A killed process's leader turns zombie before its other threads (DuckDB's) have exited and
    # let go of its files: it has exited only when the zombie leader is its last thread.
    return stat[stat.rfind(")") + 2] not in "ZX" or threads > 1


def _position(path: Path) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT seq FROM projector_position WHERE stream = 'CORRAL'").fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


async def test_projector_killed_mid_stream_gives_the_rows_of_a_clean_run(bus: Bus, nats_server, tmp_path: Path) -> None:
    last = await _publish_history(bus, executions=300, chunks=200)  # ~61k events
    # A clean run, in process.
    clean_db = tmp_path / "clean.duckdb"
    async with Projector(bus, database=clean_db, tmp_dir=tmp_path / "t1") as projector:
        assert await projector.wait_for_position(last, timeout_s=120)

    crashed_db = tmp_path / "crashed.duckdb"
    helper = [
        sys.executable,
        str(ROOT / "tests" / "helpers" / "project.py"),
        nats_server.url,
        str(crashed_db),
        str(tmp_path / "t2"),
    ]

    def run_until(target: int) -> None:
        """Start a projector, SIGKILL it as soon as it reports having applied `target`."""
        process = subprocess.Popen([*helper, str(target)], stdout=subprocess.PIPE, text=True)
        workers: list[int] = []
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "caught-up"
            workers = processes_mentioning(str(crashed_db))  # its DuckDB worker (projections/worker.py)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        # The worker dies with it (until it has fully exited, its lock on the file may remain).
        assert workers, "no DuckDB worker process found"
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(pid) for pid in workers), "the projector's worker outlived it"

    kills_mid_stream = 0
    for fraction in (0.15, 0.35, 0.55, 0.75):
        await asyncio.to_thread(run_until, int(last * fraction))
        if 0 < _position(crashed_db) < last:
            kills_mid_stream += 1
    # A last projector catches up and is stopped the hard way too; then every table is compared.
    await asyncio.to_thread(run_until, last)
    assert _position(crashed_db) == last
    assert kills_mid_stream >= 1, "no SIGKILL landed mid-stream; the test proved nothing"
    clean, crashed = _dump(clean_db), _dump(crashed_db)
    assert len(clean["events"]) == last
    assert len(clean["output"]) == 300 * 200
    assert crashed == clean


async def test_projector_replaces_a_failed_duckdb_worker(bus: Bus, tmp_path: Path) -> None:
    """The DuckDB worker killed mid-stream (as when DuckDB invalidates its database after a failed
    checkpoint): the projector starts a new one, reads on from the saved positions, and every
    event is applied exactly once; corral up does not stop."""
    first = await _publish_history(bus, executions=100, chunks=100)  # ~10k events
    database = tmp_path / "healed.duckdb"
    async with Projector(bus, database=database, tmp_dir=tmp_path / "t") as projector:
        assert await projector.wait_for_position(1, timeout_s=60)
        assert projector.worker is not None
        killed = projector.worker.pid
        os.kill(killed, signal.SIGKILL)
        last = await _publish_history(bus, executions=50, chunks=100)
        assert last > first
        assert await projector.wait_for_position(last, timeout_s=120), "the projector did not catch up"
        assert projector.worker_restarts == 1
        assert projector.worker is not None and projector.worker.pid != killed
        assert projector.health()["worker_restarts"] == 1
        assert projector._main is not None and not projector._main.done()
        counts = projector.query("SELECT count(*), count(DISTINCT seq), max(seq) FROM events", max_rows=1)["rows"][0]
        assert counts == [last, last, last]
        outputs = projector.query("SELECT count(*) FROM output", max_rows=1)["rows"][0]
        assert outputs == [150 * 100]
