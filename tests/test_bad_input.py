"""Bad input: one clear line on stderr, a non-zero exit, nothing half-made."""

import os
import subprocess
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


def test_repo_that_is_a_file_or_bare(cli: Cli, tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    result = cli("run", "--repo", str(afile), *agent_command())
    assert result.returncode == 2
    assert "is a file, not a directory" in _one_error_line(result.stderr)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    result = cli("run", "--repo", str(bare), *agent_command())
    assert result.returncode == 2
    assert "is a bare repository" in _one_error_line(result.stderr) and "git clone" in result.stderr


def test_no_command_is_said_first_even_outside_a_repo(cli: Cli, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for args in (["--repo", str(plain)], ["--repo", str(plain), "--"]):
        result = cli("run", *args)
        assert result.returncode == 2
        assert "no command to run" in _one_error_line(result.stderr)


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
    # `corral sql` runs queries only: a write is refused before it runs (docs/security.md, the query sandbox).
    refused = cli("sql", "DELETE FROM events")
    assert refused.returncode == 2
    assert "a DELETE statement is refused" in _one_error_line(refused.stderr)
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
