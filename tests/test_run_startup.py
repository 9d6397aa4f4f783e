"""`corral run` with no system running (issue 20 §6): it starts and stops an embedded one.

What a faster start must not lose: the summary still waits for the exit checkpoint's validation
when there is a checkpoint (the in-process checkpointer says so), and plain commands do not
import the HTTP stack.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cli, agent_command, processes_mentioning


def test_an_embedded_run_still_shows_a_failed_validation_after_the_exit(
    embedded_cli: Cli, repo: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text('forbidden_paths = ["NOTES.md"]\n')
    run = embedded_cli(
        "run", "--repo", str(repo), "--policy", str(policy), *agent_command("--steps", "1", "--sleep", "0")
    )
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if "needs you" in line]
    assert said and "validation" in said[0] and "critical" in said[0], run.stderr
    assert processes_mentioning(str(embedded_cli.home)) == []


def test_an_embedded_run_that_changes_nothing_has_no_checkpoint_to_wait_for(embedded_cli: Cli, repo: Path) -> None:
    run = embedded_cli("run", "--repo", str(repo), "--", "sh", "-c", "echo quiet")
    assert run.returncode == 0, run.stderr
    assert "quiet" in run.stdout and "needs you" not in run.stderr
    found = json.loads(embedded_cli("sql", "SELECT count(*) AS n FROM checkpoints", "--json", check=True).stdout)
    assert found == [{"n": 0}]


def test_plain_commands_do_not_import_the_http_stack() -> None:
    probe = (
        "import sys; from corral import cli, commands, history, system; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'corral.http') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
