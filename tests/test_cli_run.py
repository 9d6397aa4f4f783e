"""`corral run`, `ps`, `logs`, `sql`, `tap` end to end through the CLI, against a real nats-server."""

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

from tests.conftest import Cli, agent_command, processes_mentioning


def test_run_streams_output_and_returns_exit_code(cli: Cli, repo: Path) -> None:
    result = cli("run", "--repo", str(repo), *agent_command("fix the bug", "--steps", "2", "--exit", "3"))
    assert result.returncode == 3, result.stderr
    assert "step 1/2: wrote agent-output/step-1.txt" in result.stdout
    assert "step 2/2" in result.stdout
    assert "exit 3" in result.stderr

    executions = json.loads(cli("ps", "--all", "--json", check=True).stdout)
    assert len(executions) == 1
    execution = executions[0]
    assert execution["state"] == "exited"
    assert execution["exit_code"] == 3
    worktree = Path(execution["worktree"])
    # The agent's edits are in its own worktree on its own branch; the repo itself is untouched.
    assert (worktree / "agent-output" / "step-2.txt").read_text().startswith("task: fix the bug")
    assert not (repo / "agent-output").exists()
    branch = subprocess.run(
        ["git", "-C", str(worktree), "rev-parse", "--abbrev-ref", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert branch == f"corral/{execution['execution_id']}"


def test_ps_logs_sql_and_prefix_ids(cli: Cli, repo: Path) -> None:
    cli("run", "--repo", str(repo), "-q", *agent_command("one", "--steps", "1"), check=True)
    run = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]
    execution_id = run["execution_id"]

    logs = cli("logs", execution_id[:4], check=True)
    assert "agent: task 'one' (1 steps)" in logs.stdout
    assert "agent: done, 1 files written" in logs.stdout

    assert cli("ps", "--json", check=True).stdout.strip() == "[]"  # nothing running

    rows = json.loads(
        cli(
            "sql",
            f"SELECT type FROM events WHERE execution_id = '{execution_id}' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )
    types = [row["type"] for row in rows]
    assert types[:4] == ["execution.requested", "execution.claimed", "workspace.created", "execution.started"]
    # After the exit only its exit checkpoint and (if the validator got to it before the
    # embedded system stopped; else at the next start) that checkpoint's validation follow.
    after_exit = types[types.index("execution.exited") + 1 :]
    assert after_exit in (["checkpoint.created"], ["checkpoint.created", "validation.passed"])
    assert "output" in types

    table = cli("sql", "SELECT state, exit_code FROM executions", check=True).stdout
    assert "exited" in table

    tap = cli("tap", execution_id, "--since", "all", "--limit", "3", check=True)
    lines = [json.loads(line) for line in tap.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["execution.requested", "execution.claimed", "workspace.created"]
    assert lines[0]["seq"] < lines[1]["seq"] < lines[2]["seq"]


def test_detached_run_and_follow(cli: Cli, repo: Path) -> None:
    up = cli.popen("up")
    try:
        for _ in range(200):  # wait until `corral up` has published its address
            runtime = cli.home / "runtime.json"
            if runtime.exists() and json.loads(runtime.read_text()).get("ready"):
                break
            time.sleep(0.05)
        detached = cli("run", "--repo", str(repo), "--detach", *agent_command("bg", "--steps", "2"), check=True)
        execution_id = detached.stdout.strip()
        assert len(execution_id) == 8 and "." not in execution_id
        followed = cli("logs", "-f", execution_id, check=True)
        assert "agent: done, 2 files written" in followed.stdout
        status = json.loads(
            cli(
                "sql", f"SELECT state FROM executions WHERE execution_id = '{execution_id}'", "--json", check=True
            ).stdout
        )
        assert status == [{"state": "exited"}]
        assert cli("down", check=True).returncode == 0
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_control_lines_become_events(cli: Cli, repo: Path) -> None:
    script = (
        "import sys\n"
        'sys.stderr.write(\'{"corral": "heartbeat", "note": "thinking"}\\n\')\n'
        'sys.stderr.write(\'{"corral": "nonsense"}\\n\')\n'
        "sys.stderr.write('{\"corral\": broken\\n')\n"
        "print('still running')\n"
    )
    import sys

    result = cli("run", "--repo", str(repo), "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    assert "still running" in result.stdout
    assert "corral" not in result.stdout
    rows = json.loads(
        cli(
            "sql",
            "SELECT type, data->>'note' AS note FROM events WHERE type IN ('heartbeat', 'protocol.error') ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )
    assert rows == [
        {"type": "heartbeat", "note": "thinking"},
        {"type": "protocol.error", "note": None},
        {"type": "protocol.error", "note": None},
    ]


def test_embedded_server_leaves_no_process(embedded_cli: Cli, repo: Path) -> None:
    store = str(embedded_cli.home / "nats")
    result = embedded_cli("run", "--repo", str(repo), *agent_command("embedded", "--steps", "1"))
    assert result.returncode == 0, result.stderr
    assert "agent: done" in result.stdout
    assert processes_mentioning(store) == []
    assert not (embedded_cli.home / "runtime.json").exists()
    # The log outlives the server: a second command starts it again and finds the execution.
    rows = json.loads(embedded_cli("ps", "--all", "--json", check=True).stdout)
    assert [row["state"] for row in rows] == ["exited"]
    assert processes_mentioning(store) == []


def test_untracked_relative_program_runs_from_where_it_was_typed(cli: Cli, repo: Path, tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "hello.sh"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho hello from $(basename $(pwd))\n")
    tool.chmod(0o755)
    env_cwd = tmp_path
    result = subprocess.run(
        [*_corral(), "run", "--repo", str(repo), "-q", "--", "bin/hello.sh"],
        env=cli.env,
        cwd=env_cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from ")  # ran inside the execution's worktree


def _corral() -> list[str]:
    import sys

    return [sys.executable, "-m", "corral"]


def test_logs_json_timestamps_and_since(cli: Cli, repo: Path) -> None:
    cli("run", "--repo", str(repo), "-q", *agent_command("stamped", "--steps", "2"), check=True)
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]

    chunks = [json.loads(line) for line in cli("logs", execution_id, "--json", check=True).stdout.splitlines()]
    assert chunks, "no output chunk printed"
    assert {"ts", "stream", "n", "text"} <= set(chunks[0])
    assert [c["n"] for c in chunks] == sorted(c["n"] for c in chunks)
    plain = cli("logs", execution_id, "--stream", "stdout", check=True).stdout
    assert "".join(c["text"] for c in chunks if c["stream"] == "stdout") == plain

    stamped = cli("logs", execution_id, "--stream", "stdout", "--timestamps", check=True).stdout.splitlines()
    assert len(stamped) == len(plain.splitlines())
    for line, original in zip(stamped, plain.splitlines(), strict=True):
        ts, _, rest = line.partition(" ")
        assert rest == original
        datetime.fromisoformat(ts)  # an ISO time before each line

    assert cli("logs", execution_id, "--since", "1h", check=True).stdout == cli("logs", execution_id, check=True).stdout
    time.sleep(1.5)
    assert cli("logs", execution_id, "--since", "1s", check=True).stdout == ""  # all of it is older

    bad = cli("logs", execution_id, "--since", "yesterday")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr
