"""Projection rebuild gives identical tables; the log refuses deletes and purges."""

import json
import sys
from pathlib import Path

import pytest
from nats.js.errors import APIError

from actors.bus import Bus
from events.subjects import STREAM
from tests.conftest import Cli, agent_command


def _tables(cli: Cli) -> dict[str, list]:
    out = {}
    for table, order in (("events", "seq"), ("output", "seq"), ("executions", "execution_id")):
        out[table] = json.loads(cli("sql", f"SELECT * FROM {table} ORDER BY {order}", "--json", check=True).stdout)
    return out


def test_rebuild_gives_identical_tables(cli: Cli, repo: Path) -> None:
    cli("run", "--repo", str(repo), "-q", *agent_command("a", "--steps", "2", "--lines", "50"), check=True)
    cli("run", "--repo", str(repo), "-q", *agent_command("b", "--exit", "1"))
    cli("run", "--repo", str(repo), "-q", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    before = _tables(cli)
    assert len(before["executions"]) == 3
    assert sorted(e["exit_code"] for e in before["executions"] if e["exit_code"] is not None) == [0, 1]
    assert [e["signal"] for e in before["executions"] if e["signal"]] == [9]
    result = cli("projections", "rebuild", check=True)
    assert f"rebuilt {len(before['events'])} events" in result.stderr
    assert _tables(cli) == before


async def test_log_denies_delete_and_purge(bus: Bus) -> None:
    info = await bus.js.stream_info(STREAM)
    assert info.config.deny_delete and info.config.deny_purge
    with pytest.raises(APIError):
        await bus.js.purge_stream(STREAM)
