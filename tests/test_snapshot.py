"""`corral snapshot`: a consistent DuckDB copy analysts open with any tool while Corral runs (issue 19)."""

import json
import subprocess
import sys
from pathlib import Path

import duckdb

from events.auth import read_credentials
from tests.conftest import Cli, agent_command
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until
from tests.test_control import up as up  # the fixture

COUNT = (
    "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
    "print(con.execute('SELECT count(*) FROM executions').fetchone()[0])"
)


def _count(cli: Cli) -> int:
    return int(json.loads(cli("sql", "SELECT count(*) AS n FROM executions", "--json", check=True).stdout)[0]["n"])


def test_snapshot_opens_while_the_system_runs_and_is_replaced_atomically(
    cli: Cli, repo: Path, up: subprocess.Popen[str], tmp_path: Path
) -> None:
    first = detach(cli, repo, *agent_command("one", "--steps", "1", "--sleep", "0"))
    wait_state(cli, first, "exited")
    shown = json.loads(cli("snapshot", "--json", check=True).stdout)
    path = Path(shown["path"])
    assert path == cli.home / "snapshot.duckdb" and shown["tables"] >= 5
    # the live file is held by the projector's writer; the snapshot opens beside it
    held = duckdb.connect(str(path), read_only=True)
    try:
        assert held.execute("SELECT count(*) FROM executions").fetchone() == (_count(cli),)
        assert held.execute("SELECT state FROM executions WHERE execution_id = ?", [first]).fetchone() == ("exited",)

        second = detach(cli, repo, *agent_command("two", "--steps", "1", "--sleep", "0"))
        wait_state(cli, second, "exited")
        again = cli("snapshot", str(path), check=True)
        assert "open it read-only: duckdb -readonly" in again.stderr
        # another process, as an analyst's tool would be (this one caches the open file by its path)
        fresh = subprocess.run(
            [sys.executable, "-c", COUNT, str(path)], capture_output=True, text=True, check=True
        ).stdout
        assert fresh.strip() == "2"
        # a reader of the previous snapshot keeps a consistent file (replaced, not rewritten in place)
        assert held.execute("SELECT count(*) FROM executions").fetchone() == (1,)
    finally:
        held.close()
    assert not list(path.parent.glob(".snapshot.duckdb.*.partial"))

    elsewhere = tmp_path / "mine.duckdb"
    assert cli("snapshot", str(elsewhere), check=True).returncode == 0
    with duckdb.connect(str(elsewhere), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] > 0  # type: ignore[index]

    bad = cli("snapshot", str(tmp_path / "no" / "such" / "dir" / "x.duckdb"))
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "existing directory" in bad.stderr


def test_tap_may_not_take_a_snapshot(embedded_cli: Cli, tmp_path: Path) -> None:
    cli, home, env = embedded_cli, embedded_cli.home, embedded_cli.env
    up_process = start_up(cli)
    try:
        tap = read_credentials(home / "credentials.json").users["tap"]
        as_tap = Cli(home, {**env, "CORRAL_NATS_USER": "tap", "CORRAL_NATS_PASSWORD": tap})
        target = tmp_path / "stolen.duckdb"
        refused = as_tap("snapshot", str(target), timeout=120)
        assert refused.returncode != 0
        assert not target.exists()
        assert "corral.api.projections.snapshot" in refused.stderr
    finally:
        stop_up(cli, up_process)


def test_corral_up_refreshes_the_snapshot_on_its_interval(cli: Cli, repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "analysts.duckdb"
    (tmp_path / "corral.toml").write_text(f'[snapshot]\nevery = "1s"\npath = "{target}"\n')
    cli.env["CORRAL_CONFIG"] = str(tmp_path / "corral.toml")
    up_process = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("one", "--steps", "1", "--sleep", "0"))
        wait_state(cli, execution_id, "exited")

        def refreshed() -> bool:
            if not target.exists():
                return False
            counted = subprocess.run([sys.executable, "-c", COUNT, str(target)], capture_output=True, text=True)
            return counted.returncode == 0 and counted.stdout.strip() == "1"

        wait_until(refreshed, 60, "a refreshed snapshot holding the execution")
    finally:
        stop_up(cli, up_process)
    assert "snapshot: " in (up_process.stderr.read() if up_process.stderr else "")
