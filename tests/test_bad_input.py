"""Bad input: one clear line on stderr, a non-zero exit, nothing half-made."""

import os
import sys
from pathlib import Path

from tests.conftest import Cli, agent_command, processes_mentioning


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("corral: error: ")
    return lines[0]


def test_non_git_repo(cli: Cli, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    result = cli("run", "--repo", str(plain), *agent_command())
    assert result.returncode == 2
    assert "not a git repository" in _one_error_line(result.stderr)
    assert not (cli.home / "worktrees").exists() or not any((cli.home / "worktrees").iterdir())


def test_missing_command(cli: Cli, repo: Path) -> None:
    result = cli("run", "--repo", str(repo), "--", "no-such-agent-xyz", "--go")
    assert result.returncode == 2
    assert "command not found: no-such-agent-xyz" in _one_error_line(result.stderr)
    result = cli("run", "--repo", str(repo))
    assert result.returncode == 2
    assert "no command to run" in _one_error_line(result.stderr)


def test_unknown_base(cli: Cli, repo: Path) -> None:
    result = cli("run", "--repo", str(repo), "--base", "nope", *agent_command())
    assert result.returncode == 2
    assert "no commit named 'nope'" in _one_error_line(result.stderr)


def test_unknown_execution_id(cli: Cli, repo: Path) -> None:
    for args in (("logs", "zzzzzz"), ("tap", "zzzzzz", "--since", "all"), ("logs", "not.an.id")):
        result = cli(*args)
        assert result.returncode == 2, args
        assert "corral ps --all" in _one_error_line(result.stderr)


def test_ambiguous_prefix(cli: Cli, repo: Path) -> None:
    for _ in range(2):
        cli("run", "--repo", str(repo), "-q", "--", sys.executable, "-c", "pass", check=True)
    result = cli("logs", "")
    assert result.returncode == 2


def test_invalid_sql_changes_nothing(cli: Cli, repo: Path) -> None:
    cli("run", "--repo", str(repo), "-q", "--", sys.executable, "-c", "print(1)", check=True)
    result = cli("sql", "SELEC * FROM events")
    assert result.returncode == 2
    assert "SQL error: Parser Error" in _one_error_line(result.stderr)
    # Writes are rolled back: `corral sql` is read-only.
    assert cli("sql", "DELETE FROM events").returncode == 0
    count = cli("sql", "SELECT count(*) AS n FROM events", "--json", check=True).stdout
    assert '"n": 0' not in count


def test_unreachable_nats(tmp_path: Path, repo: Path) -> None:
    env = {**os.environ, "CORRAL_HOME": str(tmp_path / "h"), "CORRAL_NATS_URL": "nats://127.0.0.1:1"}
    cli = Cli(tmp_path / "h", env)
    result = cli("run", "--repo", str(repo), *agent_command())
    assert result.returncode == 3
    assert "cannot reach NATS at nats://127.0.0.1:1" in _one_error_line(result.stderr)
    assert processes_mentioning(str(tmp_path / "h")) == []
    assert not any((tmp_path / "h" / "worktrees").iterdir())


def test_since_must_be_valid(cli: Cli) -> None:
    result = cli("tap", "--since", "yesterday")
    assert result.returncode == 2
    assert "--since expects" in _one_error_line(result.stderr)
