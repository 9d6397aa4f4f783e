"""Costs as the CLIs report them, and agents that cannot reach their model (issue 19, items 8 and 12).

Costs: one model name per model (no `[1m]` context suffix), a total Claude Code reported is not an
estimate, an unknown price is unknown (not $0), nothing spent is 0, `corral sql` shows small
amounts. These run `corral run --agent ...` end to end (real NATS, spawner, shim, projector,
DuckDB) with stand-in CLI executables that print what the real CLIs print.

Network: the real Claude Code, Codex and Gemini CLI (installed under .agents/) pointed at a closed
port (127.0.0.1:1) retry for minutes; with `[defaults] agent_idle_timeout` short (12 s), the execution
ends by that timeout and records `agent.result {failure: "network"}`; `status` and `ps` say
"network unreachable".
"""

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from actors.adapters import find_program
from actors.adapters.aider import AiderAdapter
from actors.adapters.claude_code import ClaudeCodeAdapter
from actors.adapters.codex import CodexAdapter
from actors.adapters.gemini import GeminiAdapter
from corral.config import DEFAULT_AGENT_IDLE_TIMEOUT_S, parse_config, resolve_run
from corral.render import cell
from events.types import model_for
from tests.conftest import Cli
from tests.test_adapters import PROGRAMS, isolated_env, of_type, sql

# --- stand-in CLIs: real executables printing the real CLIs' lines ---------------------------------

CLAUDE_LINES = [
    {"type": "system", "subtype": "init", "session_id": "s-1", "model": "claude-opus-4-8[1m]", "tools": []},
    {
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "model": "claude-opus-4-8",
            "content": [{"type": "text", "text": "done"}],
            "usage": {"input_tokens": 39000, "output_tokens": 0},
        },
    },
    {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "result": "done",
        "num_turns": 1,
        "total_cost_usd": 0.1979,
        "usage": {"input_tokens": 39000, "output_tokens": 206},
        "modelUsage": {"claude-opus-4-8[1m]": {"inputTokens": 39000, "outputTokens": 206, "costUSD": 0.1979}},
    },
]


def stand_in(tmp: Path, name: str, version: str, help_text: str, lines: list[dict[str, Any]]) -> Path:
    """An executable answering --version / --help, and otherwise printing `lines` as JSON lines."""
    script = tmp / name
    body = "\n".join(json.dumps(line) for line in lines)
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"if sys.argv[1:2] == ['--version']:\n    print({version!r})\n"
        f"elif '--help' in sys.argv:\n    print({help_text!r})\n"
        f"else:\n    print({body!r}, flush=True)\n"
    )
    script.chmod(0o755)
    return script


def run_agent(cli: Cli, repo: Path, agent: str, binary: Path) -> str:
    """`corral run --agent AGENT` with `binary` as the CLI, to its end; the execution id."""
    run = Cli(cli.home, {**cli.env, f"CORRAL_{PROGRAMS[agent].upper()}_BIN": str(binary)})
    done = run("run", "--agent", agent, "--repo", str(repo), "say done", timeout=120)
    assert done.returncode == 0, done.stderr
    [row] = sql(cli, "SELECT execution_id, state FROM executions ORDER BY requested_at DESC LIMIT 1")
    assert row["state"] == "exited"
    return str(row["execution_id"])


def status(cli: Cli, execution_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(cli("status", execution_id, "--json", check=True).stdout)
    return shown


def test_claude_code_cost_is_one_model_and_not_an_estimate_once_reported(cli: Cli, repo: Path, tmp_path: Path) -> None:
    claude = stand_in(tmp_path, "claude", "2.1.0 (Claude Code)", "--resume", CLAUDE_LINES)
    execution_id = run_agent(cli, repo, "claude-code", claude)
    rows = sql(
        cli,
        f"SELECT model, sum(input_tokens + output_tokens) AS tokens, round(sum(cost_usd), 6) AS cost, "
        f"bool_and(estimated) AS all_estimated, count(*) AS ticks FROM usage "
        f"WHERE execution_id = '{execution_id}' GROUP BY model",
    )
    # before: claude-opus-4-8 (0 tokens, $0.195 estimated) and claude-opus-4-8[1m] (39,206 tokens, $0.0029)
    assert [(r["model"], r["tokens"], r["cost"]) for r in rows] == [("claude-opus-4-8", 39206, 0.1979)]
    assert rows[0]["ticks"] == 2 and rows[0]["all_estimated"] is False  # the live estimate, then the result
    shown = status(cli, execution_id)
    assert shown["cost_usd"] == pytest.approx(0.1979)
    assert shown["cost_estimated"] is False  # the total is what Claude Code reported
    assert "cost_unknown_models" not in shown


def test_an_unknown_price_is_unknown_and_nothing_spent_is_zero(cli: Cli, repo: Path, tmp_path: Path) -> None:
    unpriced = [
        {"type": "init", "session_id": "g-1", "model": "auto"},
        {"type": "message", "role": "assistant", "content": "done"},
        {
            "type": "result",
            "status": "success",
            "stats": {"models": {"gemini-9-unpriced": {"input_tokens": 1200, "output_tokens": 30, "cached": 0}}},
        },
    ]
    gemini = stand_in(tmp_path, "gemini", "0.61.0", "--resume", unpriced)
    unknown = run_agent(cli, repo, "gemini", gemini)
    [row] = sql(cli, f"SELECT model, cost_usd, estimated FROM usage WHERE execution_id = '{unknown}'")
    assert row == {"model": "gemini-9-unpriced", "cost_usd": None, "estimated": True}  # not $0, not "reported"
    shown = status(cli, unknown)
    assert shown["cost_usd"] is None
    assert shown["cost_estimated"] is True
    assert shown["cost_unknown_models"] == ["gemini-9-unpriced"]
    text = cli("status", unknown, check=True).stdout
    assert "unknown" in next(line for line in text.splitlines() if line.startswith("cost_usd"))

    (tmp_path / "idle").mkdir()
    silent = stand_in(tmp_path / "idle", "gemini", "0.61.0", "--resume", [{"type": "init", "session_id": "g-2"}])
    nothing = run_agent(cli, repo, "gemini", silent)
    shown = status(cli, nothing)
    assert shown["cost_usd"] == 0  # nothing spent: 0, not null
    assert shown["cost_estimated"] is False


def test_corral_sql_shows_small_costs_with_significant_digits(cli: Cli, repo: Path, tmp_path: Path) -> None:
    assert cell(0.0019) == "0.0019"
    assert cell(0.196) == "0.196"
    assert cell(1.23456) == "1.235"
    assert cell(0.0) == "0"
    claude = stand_in(tmp_path, "claude", "2.1.0 (Claude Code)", "--resume", CLAUDE_LINES)
    execution_id = run_agent(cli, repo, "claude-code", claude)
    table = cli("sql", f"SELECT cost_usd FROM usage WHERE execution_id = '{execution_id}' ORDER BY seq", check=True)
    # the result's tick: $0.1979 reported minus the live estimate of $0.195
    assert table.stdout.split()[1:] == ["0.195", "0.0029"]


# --- the idle timeout of agent runs -------------------------------------------------------------


def test_agent_runs_get_an_idle_timeout_that_cancels_and_explicit_settings_win() -> None:
    config = parse_config("")
    agent = resolve_run(config, None, {"agent": "codex"}).settings
    assert (agent.idle_timeout_s, agent.on_stall) == (DEFAULT_AGENT_IDLE_TIMEOUT_S, "cancel")
    plain = resolve_run(config, None, {}).settings
    assert (plain.idle_timeout_s, plain.on_stall) == (None, "notify")  # plain commands as before

    config = parse_config(
        '[defaults]\nagent_idle_timeout = "3s"\n\n'
        '[templates.slow]\nagent = "claude-code"\nidle_timeout = "1h"\non_stall = "pause"\n'
    )
    assert resolve_run(config, None, {"agent": "aider"}).settings.idle_timeout_s == 3.0
    assert resolve_run(config, None, {"agent": "aider", "idle_timeout_s": "2m"}).settings.idle_timeout_s == 120.0
    templated = resolve_run(config, "slow", {}).settings
    assert (templated.idle_timeout_s, templated.on_stall) == (3600.0, "pause")
    assert resolve_run(config, None, {}).settings.idle_timeout_s is None

    written = parse_config('[defaults]\nidle_timeout = "20m"\non_stall = "notify"\n')
    assert resolve_run(written, None, {"agent": "codex"}).settings.model_dump(
        include={"idle_timeout_s", "on_stall"}
    ) == {
        "idle_timeout_s": 1200.0,
        "on_stall": "notify",
    }
    off = parse_config('[defaults]\nagent_idle_timeout = "none"\n')
    assert resolve_run(off, None, {"agent": "codex"}).settings.idle_timeout_s is None


# --- network unreachable: what each CLI prints, classified -----------------------------------------


def test_each_adapter_classifies_what_its_cli_prints_when_the_model_is_unreachable() -> None:
    codex = CodexAdapter(command=["codex", "-m", "gpt-5-codex"])
    codex.feed('{"type":"turn.started"}\n')
    codex.feed(
        '{"type":"error","message":"Reconnecting... waiting for network (Connection failed: error sending request)"}\n'
    )
    assert codex.unreachable_since is not None
    [failed] = of_type(codex.feed('{"type":"turn.failed","error":{"message":"stream disconnected"}}\n'), "agent.result")
    assert failed["failure"] == "network"

    claude = ClaudeCodeAdapter(command=["claude", "-p", "t"])
    retry = {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10, "error_status": None}
    claude.feed(json.dumps(retry) + "\n")
    assert claude.unreachable is not None
    overloaded = ClaudeCodeAdapter(command=["claude", "-p", "t"])
    overloaded.feed(json.dumps({**retry, "error_status": 529, "error": "overloaded"}) + "\n")
    assert overloaded.unreachable is None  # the server answered: not a network failure

    gemini = GeminiAdapter(command=["gemini"])
    gemini.feed_stderr(
        "Attempt 1 failed. Retrying with backoff... Error: exception TypeError: fetch failed sending request\n"
    )
    [result] = of_type(gemini.finish(), "agent.result")
    assert (result["ok"], result["failure"]) == (False, "network")

    aider = AiderAdapter(command=["aider", "--model", "openai/test-model"])
    aider.feed("litellm.InternalServerError: InternalServerError: OpenAIException - Connection \nerror.\n")
    aider.feed("Retrying in 0.2 seconds...\n")
    [result] = of_type(aider.finish(), "agent.result")  # aider gives up and exits 0 without a result line
    assert result["failure"] == "network"
    model_for("agent.result").model_validate(result)

    progress = CodexAdapter(command=["codex"])
    progress.feed('{"type":"error","message":"Reconnecting... waiting for network"}\n')
    progress.feed('{"type":"item.completed","item":{"id":"i","type":"agent_message","text":"hi"}}\n')
    assert progress.unreachable_since is None  # it got through
    assert of_type(progress.finish(), "agent.result") == []


class ClosedPort:
    url = "http://127.0.0.1:1"  # nothing listens there: connection refused


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["codex", "claude-code", "gemini"])
def test_a_cli_that_cannot_reach_its_model_ends_by_the_idle_timeout(
    agent: str, cli: Cli, repo: Path, tmp_path: Path
) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    env, extra = isolated_env(agent, cli.env, tmp_path, ClosedPort())  # type: ignore[arg-type]
    config = tmp_path / "corral.toml"
    # Longer than the CLIs' start (Gemini CLI prints nothing for ~7 s) and than their first retry.
    config.write_text('[defaults]\nagent_idle_timeout = "12s"\n')
    run = Cli(cli.home, {**env, "CORRAL_CONFIG": str(config)})
    # The CLIs retry for minutes (Claude Code 10 times, up to ~40 s apart; Codex and Gemini with
    # growing delays): only the idle timeout ends it within this test's limit.
    run("run", "--agent", agent, "--repo", str(repo), "create hello.txt", "--", *extra, timeout=150)
    [row] = sql(run, "SELECT execution_id, state, exit_reason, idle_timeout_s FROM executions")
    assert (row["state"], row["idle_timeout_s"]) == ("exited", 12.0)
    execution_id = row["execution_id"]
    results = sql(
        run,
        f"SELECT data->>'ok' AS ok, data->>'failure' AS failure FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'agent.result'",
    )
    assert {"ok": "false", "failure": "network"} in results, results
    [timed_out] = sql(
        run,
        f"SELECT data->>'kind' AS kind FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'execution.timed_out'",
    )
    assert timed_out["kind"] == "idle"
    shown = status(run, execution_id)
    assert shown["reason"] == "network unreachable"
    assert shown["failure"] == "network"
    listed = json.loads(run("ps", "--all", "--json", check=True).stdout)
    assert [r.get("reason") for r in listed if r["execution_id"] == execution_id] == ["network unreachable"]
