"""Projection rebuild gives identical tables; the log refuses deletes and purges."""

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
