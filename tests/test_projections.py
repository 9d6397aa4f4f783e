"""Projection rebuild gives identical tables; the log refuses deletes and purges."""

import asyncio
import json
import sys
from pathlib import Path

import pytest
from nats.js.errors import APIError

from actors.bus import Bus
from events.subjects import STREAM
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
    """`corral ps` during a flood (wait_for_position with output_grace_s): after the grace, output
    and heartbeats not applied yet no longer hold the answer, every other event still does; the
    stream tells which are which beyond what the projector holds."""
    from events.envelope import new_event
    from events.ids import new_execution_id
    from events.types import ExecutionRequested, Heartbeat, Output
    from projections.projector import Projector

    eid = new_execution_id()
    seqs = []
    for data in (
        ExecutionRequested(command=("agent",), repo="/tmp/r"),
        Output(stream="stdout", n=0, text="a\n"),
        Heartbeat(),
        Output(stream="stdout", n=1, text="b\n"),
    ):
        ack = await bus.publisher.publish(new_event(eid, data, actor="test"))
        seqs.append(int(ack.seq))
    requested, *quiet = seqs
    projector = Projector(bus, database=tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t")  # not started
    assert await projector._others_between(quiet[0], quiet[-1]) == 0
    assert await projector._others_between(requested, quiet[-1]) >= 1
    # nothing applied: the request is among what is missing, so the listing waits (and times out)
    assert not await projector.wait_for_position(quiet[-1], timeout_s=0.5, output_grace_s=0.0)
    projector.feeds[0].expected = quiet[0]  # as if the request were applied and the rest gathered
    assert await projector._only_output_until(quiet[-1])
