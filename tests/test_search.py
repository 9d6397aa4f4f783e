"""`corral search` through the CLI over real runs of the example agent."""

import json
from pathlib import Path

from tests.conftest import Cli, agent_command


def _hits(cli: Cli, *args: str) -> list[dict]:
    result = cli("search", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_search_output_and_payloads(cli: Cli, repo: Path) -> None:
    cli(
        "run",
        "--repo",
        str(repo),
        "-q",
        "--task",
        "Alpha Task",
        *agent_command("Alpha Task", "--steps", "2"),
        check=True,
    )
    cli("run", "--repo", str(repo), "-q", *agent_command("beta job", "--steps", "3", "--exit", "3"))
    executions = json.loads(
        cli("sql", "SELECT execution_id, task, command FROM executions ORDER BY requested_at", "--json").stdout
    )
    alpha, beta = executions[0]["execution_id"], executions[1]["execution_id"]

    # case-insensitive text over output and payloads, newest first, with a snippet around the match
    hits = _hits(cli, "alpha TASK")
    assert {h["execution_id"] for h in hits} == {alpha}
    assert {h["type"] for h in hits} >= {"output", "execution.requested"}
    assert [h["seq"] for h in hits] == sorted((h["seq"] for h in hits), reverse=True)
    output_hit = next(h for h in hits if h["type"] == "output")
    assert "Alpha Task" in output_hit["snippet"] and "\n" not in output_hit["snippet"]
    assert "Alpha Task" in output_hit["text"]

    # filters: execution, type, since, limit
    assert {h["execution_id"] for h in _hits(cli, "step 1/", "--type", "output")} == {alpha, beta}
    assert {h["execution_id"] for h in _hits(cli, "step 1/", "--exec", beta[:4])} == {beta}
    assert {h["type"] for h in _hits(cli, "exit_code", "--type", "execution.*")} == {"execution.exited"}
    assert len(_hits(cli, "step", "--limit", "2")) == 2
    assert _hits(cli, "step", "--since", "1ms") == []
    assert _hits(cli, "step", "--since", "1h")

    # regex on the original text (case-sensitive unless (?i))
    regex_hits = _hits(cli, r"step [23]/3", "--regex")
    assert regex_hits and {h["execution_id"] for h in regex_hits} == {beta}
    assert _hits(cli, "ALPHA", "--regex") == []
    assert _hits(cli, "(?i)ALPHA", "--regex", "--type", "output")

    # plain text output: execution, time, type, snippet; no match exits 1
    plain = cli("search", "beta job", "--type", "output", check=True).stdout.splitlines()
    assert plain and all(line.startswith(beta) and " output " in line for line in plain)
    missing = cli("search", "no such text anywhere")
    assert missing.returncode == 1 and "no match" in missing.stderr


def test_search_bad_input(cli: Cli, repo: Path) -> None:
    cli("run", "--repo", str(repo), "-q", *agent_command("x", "--steps", "1"), check=True)
    for args, message in (
        (("a(b", "--regex"), "invalid regular expression"),
        (("x", "--type", "no.such.type"), "unknown event type"),
        (("x", "--exec", "zzzzzzzz"), "no execution matches"),
        (("x", "--since", "yesterday"), "--since expects"),
        (("x", "--limit", "0"), "--limit"),
    ):
        result = cli("search", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
