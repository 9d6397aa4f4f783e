"""Projection rebuild gives identical tables; the log refuses deletes and purges."""

import asyncio
import json
import sys
from pathlib import Path

import duckdb
import pytest
from nats.js.errors import APIError

from actors.bus import Bus
from events.subjects import STREAM
from projections.batch import Gathered
from projections.tables import TABLES
from tests.conftest import Cli, agent_command


def _tables(cli: Cli) -> dict[str, list]:
    return {
        table: json.loads(cli("sql", f"SELECT * FROM {table} ORDER BY ALL", "--json", check=True).stdout)
        for table in TABLES
    }


def test_rebuild_gives_identical_tables(cli: Cli, repo: Path) -> None:
    """Every table, live vs rebuilt from the log (bulk-loaded, derived once): the same rows."""
    cli("run", "--repo", str(repo), "-q", *agent_command("a", "--steps", "2", "--lines", "50"), check=True)
    cli("run", "--repo", str(repo), "-q", *agent_command("h", "--steps", "6", "--heartbeat"), check=True)
    cli("run", "--repo", str(repo), "-q", *agent_command("b", "--exit", "1"))
    cli("run", "--repo", str(repo), "-q", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    before = _tables(cli)
    assert len(before["executions"]) == 4
    assert sum(1 for e in before["events"] if e["type"] == "heartbeat") >= 6
    assert all(e["last_heartbeat_at"] for e in before["executions"] if e["task"] == "h")
    assert before["checkpoints"] and before["search"] and before["files_changed"]
    assert sorted(e["exit_code"] for e in before["executions"] if e["exit_code"] is not None) == [0, 0, 1]
    assert [e["signal"] for e in before["executions"] if e["signal"]] == [9]
    result = cli("projections", "rebuild", check=True)
    assert f"rebuilt {len(before['events'])} events" in result.stderr
    assert _tables(cli) == before


async def test_log_denies_delete_and_purge(bus: Bus) -> None:
    info = await bus.js.stream_info(STREAM)
    assert info.config.deny_delete and info.config.deny_purge
    with pytest.raises(APIError):
        await bus.js.purge_stream(STREAM)


async def test_bulk_reader_reads_every_event_once_in_order(bus: Bus) -> None:
    """The rebuild's lean wire client and nats-py's raw client read the same range identically."""
    from events.envelope import new_event
    from events.types import Output
    from projections.intake import IntakeClient, read_log
    from projections.wire import WireClient, connect_reader, connect_wire
    from replay.history import last_sequence

    big = "x" * 300_000  # frames larger than one socket read
    acks = []
    for i in range(3000):
        text = big if i % 500 == 7 else f"line {i}\n"
        event = new_event("rdr00001", Output(stream="stdout", n=i + 1, text=text), actor="t")
        acks.append(await bus.publisher.send(event.subject, event.to_bytes(), msg_id=event.id))
    await asyncio.gather(*acks)
    until = await last_sequence(bus.js)

    async def read(client: object, start: int) -> list[tuple[int, str, bytes]]:
        got: list[tuple[int, str, bytes]] = []

        async def on_batch(batch: list[tuple[int, str, bytes]]) -> None:
            got.extend(batch)

        await read_log(client, bus.js, start_seq=start, until=until, on_batch=on_batch, batch_size=700)  # type: ignore[arg-type]
        return got

    wire = await connect_reader(bus, name="test-reader")
    assert isinstance(wire, WireClient)  # a plain nats:// server: the lean client, with the bus's credentials
    intake = IntakeClient()
    await intake.connect(servers=bus.servers, **bus.connect_options())
    try:
        lean = await read(wire, 1)
        plain = await read(intake, 1)
        assert [s for s, _, _ in lean] == list(range(1, until + 1))
        assert lean == plain
        assert await read(wire, until - 9) == plain[-10:]
    finally:
        await wire.close()
        await intake.close()
    # Wrong credentials: one clear error, not a hang.
    host = bus.nc.connected_url
    assert host is not None
    with pytest.raises(RuntimeError, match="refused"):
        await connect_wire(f"nats://{host.hostname}:{host.port}", user="nobody", password="wrong")


async def test_a_listing_waits_for_every_event_but_output(bus: Bus, tmp_path: Path) -> None:
    """`corral ps` during a flood (wait_for_position with output_grace_s): the core log is applied
    in two lanes, output and every other event; a listing waits for the other lane only, which
    never queues behind output. Each lane restarts from its own position (none applied twice),
    and the tables end as a single-lane projection's (issue 20)."""
    from events.envelope import new_event
    from events.ids import new_execution_id
    from events.subjects import ack_sequence
    from events.types import ExecutionExited, ExecutionRequested, ExecutionStarted, Heartbeat, Output
    from projections.batch import OTHER_LANE, OUTPUT_LANE
    from projections.projector import Projector

    eid = new_execution_id()
    last = 0
    for data in (
        ExecutionRequested(command=("agent",), repo="/tmp/r"),
        ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/tmp"),
        Output(stream="stdout", n=0, text="a\n"),
        Heartbeat(),
        Output(stream="stdout", n=1, text="b\n"),
        ExecutionExited(exit_code=0, duration_s=1.0),
        Output(stream="stderr", n=2, text="c\n"),
    ):
        actor = "test" if data.TYPE == "execution.requested" else "spawner-test"
        ack = await bus.publisher.publish(new_event(eid, data, actor=actor))
        last = int(ack.seq)
    sub = await bus.js.pull_subscribe("corral.evt.>", durable=None)
    messages = await sub.fetch(last, timeout=10)

    async def feed_all(projector: Projector) -> None:
        """Hand the log to the projector's core feed as its consumer would (not started)."""
        feed = projector.feeds[0]
        feed.expected = projector.position + 1
        for msg in messages:
            feed.on_delivery(ack_sequence(msg.reply), msg.subject.encode(), msg.data)

    lanes = tmp_path / "lanes.duckdb"
    projector = Projector(bus, database=lanes, tmp_dir=tmp_path / "t")
    await projector.open_database()
    try:
        await feed_all(projector)
        other, output = projector.feeds[0].lane(OTHER_LANE), projector.feeds[0].lane(OUTPUT_LANE)
        await projector._apply([(other, other.take())])  # the other lane first: output waits
        assert projector.others_position == last and projector.position < last
        assert not await projector.wait_for_position(last, timeout_s=0.2)
        assert await projector.wait_for_position(last, timeout_s=5, output_grace_s=0.0)
        rows = projector.query("SELECT state, exit_code FROM executions", max_rows=10)["rows"]
        assert rows == [["exited", 0]]
    finally:
        await asyncio.to_thread(projector.close_database)
    # restarted: the other lane's events are not applied again, the output lane's are applied once
    projector = Projector(bus, database=lanes, tmp_dir=tmp_path / "t")
    await projector.open_database()
    try:
        assert projector.others_position == last and projector.position < last
        await feed_all(projector)
        assert not projector.feeds[0].lane(OTHER_LANE).ready
        output = projector.feeds[0].lane(OUTPUT_LANE)
        await projector._apply([(output, output.take())])
        assert projector.position == last
    finally:
        await asyncio.to_thread(projector.close_database)
    # a single-lane projection of the same log (as a rebuild applies it)
    single = tmp_path / "single.duckdb"
    projector = Projector(bus, database=single, tmp_dir=tmp_path / "t2")
    await projector.open_database()
    try:
        assert projector.applier is not None
        batch = Gathered()
        for msg in messages:
            batch.add(ack_sequence(msg.reply), msg.subject.encode(), msg.data)
        await asyncio.to_thread(projector.applier.apply_gathered, batch)
    finally:
        await asyncio.to_thread(projector.close_database)
    volatile = {"updated_at"}
    for table in TABLES:
        found = []
        for path in (lanes, single):
            con = duckdb.connect(str(path), read_only=True)
            try:
                cursor = con.execute(f"SELECT * FROM {table} ORDER BY ALL")
                names = [d[0] for d in cursor.description]
                found.append(
                    [{k: v for k, v in zip(names, row, strict=True) if k not in volatile} for row in cursor.fetchall()]
                )
            finally:
                con.close()
        assert found[0] == found[1], table
    con = duckdb.connect(str(single), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(*) FILTER (WHERE type = 'output') FROM events").fetchone() == (7, 3)
        assert con.execute("SELECT output_chunks FROM executions").fetchone() == (3,)
    finally:
        con.close()


async def test_the_reader_connects_again_when_the_server_timed_out_its_connect(bus: Bus) -> None:
    """A loaded machine may not send CONNECT within the server's authorization timeout: the server
    answers -ERR 'Authentication Timeout' and closes. That is no refusal of the credentials: the
    projector's reader connects again (it stopped `corral up` before). A TCP proxy in front of the
    real server answers the first connection the way the server does then."""
    from projections.wire import _connect_retrying

    host = bus.nc.connected_url
    assert host is not None
    timed_out = 0

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal timed_out
        upstream_r, upstream_w = await asyncio.open_connection(host.hostname, host.port)
        if timed_out == 0:
            timed_out += 1
            writer.write(await upstream_r.readline())  # the server's INFO, then its verdict
            writer.write(b"-ERR 'Authentication Timeout'\r\n")
            await writer.drain()
            writer.close()
            upstream_w.close()
            return
        await asyncio.gather(relay(reader, upstream_w), relay(upstream_r, writer), return_exceptions=True)

    proxy = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    options = bus.connect_options()
    try:
        wire = await _connect_retrying(
            f"nats://127.0.0.1:{port}", user=options.get("user"), password=options.get("password"), name="t"
        )
        assert wire is not None and timed_out == 1
        await wire.close()
        with pytest.raises(RuntimeError, match="refused"):  # wrong credentials still fail at once
            await _connect_retrying(f"nats://127.0.0.1:{port}", user="nobody", password="wrong")
    finally:
        proxy.close()


def _synthetic_log() -> list[tuple[int, str, bytes]]:
    """Two executions' lives as the projector receives them: lifecycle events, output, heartbeats
    (some batches hold only heartbeats or only output), a forged approval, an exit."""
    from events.envelope import new_event
    from events.types import (
        AgentResult,
        ApprovalGranted,
        CancelRequested,
        ExecutionClaimed,
        ExecutionExited,
        ExecutionRequested,
        ExecutionStarted,
        Heartbeat,
        Output,
        WorkspaceCreated,
    )
    from tests.conftest import recording_actor

    log: list[tuple[int, str, bytes]] = []

    def add(execution_id: str, data: object, actor: str | None = None) -> None:
        event = new_event(execution_id, data, actor=actor or recording_actor(data.TYPE, "spawner-test-1"))  # type: ignore[arg-type, attr-defined]
        log.append((len(log) + 1, event.subject, event.to_bytes()))

    for execution_id in ("appl0001", "appl0002"):
        add(execution_id, ExecutionRequested(command=("sh", "-c", "true"), repo="/tmp/r"), "cli-test")
        add(execution_id, ExecutionClaimed(spawner="spawner-test-1", host="h"))
        add(execution_id, WorkspaceCreated(path="/tmp/w", branch="b", repo="/tmp/r", base_commit="a" * 40))
        add(execution_id, ExecutionStarted(pid=1, pgid=1, host="h", command=("sh",), cwd="/tmp/w"))
    for n in range(6):
        for execution_id in ("appl0001", "appl0002"):
            add(execution_id, Heartbeat(progress=n / 6))
        add("appl0001", Output(stream="stdout", n=n, text=f"line {n}\n"))
    forged = ApprovalGranted(approval_id="forged", choice=None, note=None, decided_by="x")
    add("appl0002", forged, "someone")  # not the approver: screened out
    add("appl0001", AgentResult(ok=False, failure="network"))
    add("appl0001", ExecutionExited(exit_code=0, duration_s=1.0))
    add("appl0002", CancelRequested(reason="first"), "cli-test")
    add("appl0002", Heartbeat())
    add("appl0002", CancelRequested(reason="second"), "cli-test")
    return log


def _applied(
    tmp_path: Path, name: str, log: list[tuple[int, str, bytes]], cuts: list[int]
) -> dict[str, list[tuple[object, ...]]]:
    """Every table after applying `log` in batches cut at `cuts` (live, derived per batch)."""
    from projections.appliers import BatchApplier
    from projections.database import open_database

    con = open_database(tmp_path / f"{name}.duckdb")
    applier = BatchApplier(con, tmp_dir=tmp_path / f"{name}-tmp")
    for start, end in zip([0, *cuts], [*cuts, len(log)], strict=True):
        applier.apply(log[start:end])
    tables = {
        table: con.execute(f"SELECT * EXCLUDE (updated_at) FROM {table} ORDER BY ALL").fetchall()
        if table == "projector_position"
        else con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        for table in (*TABLES, "projector_position")
    }
    applier.close()
    con.close()
    return tables


def test_small_batches_give_the_tables_of_one_batch(tmp_path: Path) -> None:
    """The applier skips the statements of types a batch lacks and writes a heartbeat-only change as
    two columns: batches of one event each, of heartbeats or output only, give every table the
    same rows as the whole log applied at once."""
    log = _synthetic_log()
    whole = _applied(tmp_path, "whole", log, [])
    single = _applied(tmp_path, "single", log, list(range(1, len(log))))
    assert single == whole
    executions = {row[0]: row for row in whole["executions"]}
    assert set(executions) == {"appl0001", "appl0002"}
    assert executions["appl0002"][1] == "running" and executions["appl0001"][1] == "exited"
    marks = dict(
        duckdb_rows(
            tmp_path,
            "whole",
            "SELECT execution_id, [last_stop_type, last_stop_data->>'reason', network_unreachable::VARCHAR] "
            "FROM executions",
        )
    )
    assert marks == {"appl0001": [None, None, "true"], "appl0002": ["cancel.requested", "second", "false"]}
    assert whole["rejected_events"] and "approver" in str(whole["rejected_events"])  # the forged approval
    assert len(whole["output"]) == 6


def duckdb_rows(tmp_path: Path, name: str, sql: str) -> list[tuple[object, ...]]:
    con = duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()
