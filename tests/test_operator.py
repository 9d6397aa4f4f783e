"""What a new operator hits (issue 19): each test fails without its fix.

Real `corral up` against a real nats-server, real agents, the installed CLI.
"""

import asyncio
import json
import subprocess
from pathlib import Path

from actors.bus import connect_bus
from tests.conftest import Cli, agent_command
from tests.test_control import detach, wait_state
from tests.test_control import up as up  # the fixture


def test_run_takes_priority_and_cpus_from_the_command_line(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, "--priority", "5", "--cpus", "1", *agent_command("--steps", "1", "--sleep", "0"))
    final = wait_state(cli, execution_id, "exited")
    assert final["exit_code"] == 0
    requested = json.loads(
        cli(
            "sql",
            f"SELECT data->>'priority' AS priority, data->'limits'->>'cpus' AS cpus FROM events "
            f"WHERE execution_id = '{execution_id}' AND type = 'execution.requested'",
            "--json",
            check=True,
        ).stdout
    )
    assert requested == [{"priority": "5", "cpus": "1.0"}]
    bad = cli("run", "--repo", str(repo), "--priority", "high", *agent_command())
    assert bad.returncode == 2 and "--priority: invalid int value: 'high'" in bad.stderr
    bad_cpus = cli("run", "--repo", str(repo), "--cpus", "lots", *agent_command())
    assert bad_cpus.returncode == 2
    assert len(bad_cpus.stderr.strip().splitlines()) == 1 and "CPUs" in bad_cpus.stderr


def test_tap_no_follow_prints_what_is_stored_and_ends(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, *agent_command("--steps", "2", "--sleep", "0"))
    wait_state(cli, execution_id, "exited")
    stored = json.loads(
        cli(
            "sql", f"SELECT count(*) AS n FROM events WHERE execution_id = '{execution_id}'", "--json", check=True
        ).stdout
    )[0]["n"]
    # a finished execution, --since all: ends by itself (it used to follow forever)
    tapped = cli("tap", execution_id, "--since", "all", "--no-follow", timeout=60)
    assert tapped.returncode == 0, tapped.stderr
    lines = [json.loads(line) for line in tapped.stdout.splitlines()]
    assert len(lines) >= stored and lines[0]["type"] == "execution.requested"
    assert {line["execution_id"] for line in lines} == {execution_id}
    # --no-follow alone means "everything so far"; --limit above what is stored ends too
    assert cli("tap", execution_id, "--no-follow", timeout=60).stdout == tapped.stdout
    assert cli("tap", execution_id, "--no-follow", "--limit", "100000", timeout=60).stdout == tapped.stdout
    assert "--no-follow" in cli("tap", "--help").stdout


def test_tap_prints_a_malformed_message_as_one_json_line(cli: Cli, up: subprocess.Popen[str]) -> None:
    async def publish() -> None:
        bus = await connect_bus(cli.env["CORRAL_NATS_URL"])
        try:
            await bus.js.publish("corral.evt.badmsg01.output", b"{}")
            await bus.js.publish("corral.evt.badmsg01.output", b"not json at all")
        finally:
            await bus.close()

    asyncio.run(publish())
    tapped = cli("tap", "corral.evt.badmsg01.>", "--no-follow", timeout=60)
    assert tapped.returncode == 0, tapped.stderr
    lines = [json.loads(line) for line in tapped.stdout.splitlines()]  # every line is JSON
    assert [line["malformed"] for line in lines] == ["{}", "not json at all"]
    assert all(isinstance(line["seq"], int) for line in lines)
