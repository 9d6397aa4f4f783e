"""Agent adapters: line mapping from recorded CLI output, and the contract suite that runs the real CLIs.

The contract suite drives Claude Code, Codex, Gemini CLI and aider, as installed by `.ci/run` (or
found on PATH), under `corral run --agent ...`, each pointed at the scripted model server of
tests/helpers/model_server.py on loopback, with its own HOME and config. A CLI that is not installed
skips its case with the reason; nothing passes without running the real program.
"""

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.adapters import Adapter, adapter_class, agent_command_line, find_program, load_adapter
from actors.adapters.aider import AiderAdapter
from actors.adapters.aider import command_line as aider_command
from actors.adapters.claude_code import ClaudeCodeAdapter, user_message
from actors.adapters.codex import CodexAdapter
from actors.adapters.codex import command_line as codex_command
from actors.adapters.gemini import GeminiAdapter
from actors.adapters.gemini import command_line as gemini_command
from events.types import model_for
from tests.conftest import Cli
from tests.helpers.model_server import FILE_NAME, FILE_TEXT, FINAL_TEXT, ModelServer

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
PROGRAMS = {"claude-code": "claude", "codex": "codex", "gemini": "gemini", "aider": "aider"}


def facts_of(adapter: Adapter, fixture: str) -> list[tuple[str, dict[str, Any]]]:
    """Feed a recorded output in uneven chunks (as the shim does), then finish; validate every fact."""
    text = (FIXTURES / fixture).read_text()
    facts = []
    for start in range(0, len(text), 97):
        facts.extend(adapter.feed(text[start : start + 97]))
    facts.extend(adapter.finish())
    for kind, data in facts:
        model_for(kind).model_validate(data)  # what the spawner does with every spool line
    return facts


def of_type(facts: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [data for fact_kind, data in facts if fact_kind == kind]


# --- line mapping from recorded samples --------------------------------------------------------


def test_claude_code_maps_session_tools_files_usage_and_result() -> None:
    adapter = ClaudeCodeAdapter(task="create hello.txt", command=["claude", "--input-format", "stream-json"])
    facts = facts_of(adapter, "claude_code.jsonl")
    assert [kind for kind, _ in facts] == [
        "session.started",
        "agent.message",
        "tool.called",
        "tool.result",
        "file.touched",
        "agent.message",
        "usage",
        "agent.result",
    ]
    session = of_type(facts, "session.started")[0]
    assert session["session_id"] == "284ecf0e-40b2-45bd-ba5e-dcb56369748e"
    assert "Write" in session["tools"]
    call = of_type(facts, "tool.called")[0]
    assert (call["name"], call["call_id"], call["shell_command"]) == ("Write", "toolu_0001", None)
    assert of_type(facts, "tool.result")[0]["ok"] is True
    assert of_type(facts, "file.touched") == [{"path": "hello.txt", "change": "created"}]
    usage = of_type(facts, "usage")[0]
    assert (usage["input_tokens"], usage["output_tokens"], usage["cost_usd"]) == (240, 60, 0.0027)
    assert of_type(facts, "agent.result") == [{"ok": True, "text": "Created hello.txt.", "turns": 2}]
    assert adapter.stdin_done  # the one message sent has its result: the shim closes stdin


def test_claude_code_two_turns_tick_usage_by_difference_and_wait_for_every_answer() -> None:
    adapter = ClaudeCodeAdapter(task="create hello.txt", command=["claude", "--input-format", "stream-json"])
    assert adapter.keeps_stdin
    assert json.loads(adapter.initial_input())["message"]["content"][0]["text"] == "create hello.txt"
    assert adapter.encode_input("and again") == user_message("and again")
    adapter.input_delivered()  # a second message before the first answer: stdin stays open after it
    text = (FIXTURES / "claude_code_two_turns.jsonl").read_text().splitlines(keepends=True)
    first_result = next(i for i, line in enumerate(text) if '"type":"result"' in line)
    facts = adapter.feed("".join(text[: first_result + 1]))
    assert not adapter.stdin_done
    facts += adapter.feed("".join(text[first_result + 1 :]))
    assert adapter.stdin_done
    ticks = of_type(facts, "usage")
    # modelUsage is a running total (240/60 then 360/90): the second tick is the difference
    assert [(t["input_tokens"], t["output_tokens"]) for t in ticks] == [(240, 60), (120, 30)]
    assert round(sum(t["cost_usd"] for t in ticks), 6) == 0.00405
    assert len(of_type(facts, "session.started")) == 1  # init is repeated per turn, one session
    assert len(of_type(facts, "agent.result")) == 2


def test_claude_code_closes_stdin_once_every_replayed_message_is_answered() -> None:
    command = ["claude", "--input-format", "stream-json", "--replay-user-messages"]
    lines = (FIXTURES / "claude_code_replayed_input.jsonl").read_text().splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if "and again" in line)
    late = ClaudeCodeAdapter(task="create hello.txt", command=command)
    late.input_delivered()
    late.feed("".join(lines[:second] + lines[second + 1 :]))  # the input not taken before the result
    assert not late.stdin_done
    merged = ClaudeCodeAdapter(task="create hello.txt", command=command)
    merged.input_delivered()
    facts = merged.feed("".join(lines))  # taken into the same turn: one result answers both
    assert merged.stdin_done
    assert len(of_type(facts, "agent.result")) == 1


def test_claude_code_without_stream_input_keeps_plain_stdin() -> None:
    adapter = ClaudeCodeAdapter(task="t", command=["claude", "-p", "t", "--output-format", "stream-json"])
    assert not adapter.keeps_stdin
    assert adapter.initial_input() == b""
    assert adapter.encode_input("x") == b"x"


def test_codex_maps_thread_command_message_and_turn_usage() -> None:
    adapter = CodexAdapter(task="create hello.txt", command=["codex", "exec", "--json", "-m", "gpt-5-codex", "t"])
    facts = facts_of(adapter, "codex.jsonl")
    assert [kind for kind, _ in facts] == [
        "session.started",
        "tool.called",
        "tool.result",
        "agent.message",
        "usage",
        "agent.result",
    ]
    assert of_type(facts, "session.started")[0] == {
        "session_id": "01a20059-9d80-72c1-9817-56c264cfd4c8",
        "model": "gpt-5-codex",
    }
    call = of_type(facts, "tool.called")[0]
    assert call["name"] == "shell"
    assert "hello.txt" in call["shell_command"]
    assert of_type(facts, "tool.result")[0]["ok"] is True
    usage = of_type(facts, "usage")[0]
    assert (usage["input_tokens"], usage["output_tokens"], usage["cache_read_tokens"]) == (240, 60, 0)
    assert of_type(facts, "agent.result") == [{"ok": True, "text": "Created hello.txt.", "turns": 1}]
    assert not adapter.keeps_stdin


def test_codex_file_change_items_become_file_touched() -> None:
    adapter = CodexAdapter(cwd="/w")
    line = {
        "type": "item.completed",
        "item": {
            "id": "item_3",
            "type": "file_change",
            "status": "completed",
            "changes": [{"path": "/w/a.py", "kind": "add"}, {"path": "/w/b.py", "kind": "update"}],
        },
    }
    facts = adapter.feed(json.dumps(line) + "\n")
    assert [kind for kind, _ in facts] == ["tool.called", "tool.result", "file.touched", "file.touched"]
    assert of_type(facts, "file.touched") == [
        {"path": "a.py", "change": "created"},
        {"path": "b.py", "change": "modified"},
    ]
    failed = {"type": "turn.failed", "error": {"message": "stream disconnected"}}
    assert adapter.feed(json.dumps(failed) + "\n")[0] == (
        "agent.result",
        {"ok": False, "text": "stream disconnected", "turns": 0},
    )


def test_gemini_joins_message_deltas_and_ticks_usage_per_model() -> None:
    facts = facts_of(GeminiAdapter(task="create hello.txt"), "gemini.jsonl")
    assert [kind for kind, _ in facts] == [
        "session.started",
        "tool.called",
        "tool.result",
        "file.touched",
        "agent.message",
        "usage",
        "usage",
        "agent.result",
    ]
    assert of_type(facts, "session.started")[0]["session_id"] == "15cf7ebb-9db6-44ba-8229-6920840ac7bc"
    assert of_type(facts, "tool.called")[0]["name"] == "write_file"
    assert of_type(facts, "file.touched") == [{"path": "hello.txt", "change": "created"}]
    assert of_type(facts, "agent.message") == [{"text": "Created hello.txt."}]
    assert sum(t["input_tokens"] for t in of_type(facts, "usage")) == 360
    assert of_type(facts, "agent.result") == [{"ok": True, "text": "Created hello.txt."}]


def test_gemini_shell_tool_records_its_command_and_errors() -> None:
    adapter = GeminiAdapter()
    lines = [
        {"type": "tool_use", "tool_name": "run_shell_command", "tool_id": "t1", "parameters": {"command": "ls -la"}},
        {"type": "tool_result", "tool_id": "t1", "status": "error", "error": {"message": "denied"}},
    ]
    facts = adapter.feed("".join(json.dumps(line) + "\n" for line in lines))
    assert facts[0][1]["shell_command"] == "ls -la"
    assert facts[1] == ("tool.result", {"call_id": "t1", "name": "run_shell_command", "ok": False, "summary": "denied"})


def test_aider_maps_edits_and_token_lines() -> None:
    facts = facts_of(AiderAdapter(command=["aider", "--model", "openai/test-model"]), "aider.txt")
    assert of_type(facts, "file.touched") == [{"path": "hello.txt", "change": "modified"}]
    assert of_type(facts, "usage") == [
        {"model": "openai/test-model", "cost_usd": 0.0, "input_tokens": 594, "output_tokens": 16}
    ]
    adapter = AiderAdapter(cwd="/w")
    facts = adapter.feed(
        "Creating empty file /w/new.py\nApplied edit to new.py\n"
        "Tokens: 2.3k sent, 1.1k cache write, 3.4k cache hit, 120 received. Cost: $0.01 message, $0.05 session.\n"
    )
    assert facts[0] == ("file.touched", {"path": "new.py", "change": "created"})
    tick = facts[1][1]
    assert (tick["input_tokens"], tick["cache_write_tokens"], tick["cache_read_tokens"]) == (2300, 1100, 3400)
    assert (tick["output_tokens"], tick["cost_usd"]) == (120, 0.01)


def test_a_malformed_or_foreign_line_is_only_output() -> None:
    for cls in (ClaudeCodeAdapter, CodexAdapter, GeminiAdapter, AiderAdapter, Adapter):
        adapter = cls()
        assert adapter.feed('not json\n{"type": "assistant", "message": {"content": [7]}}\n[1, 2]\n{"type":') == []
        assert adapter.finish() == []


def test_adapter_lookup_and_command_lines() -> None:
    assert adapter_class("command") is Adapter
    assert adapter_class("codex") is CodexAdapter
    with pytest.raises(ValueError, match="unknown agent 'nope'"):
        adapter_class("nope")
    assert load_adapter({"agent": "command", "command": ["x"]}) is None
    assert isinstance(load_adapter({"agent": "gemini", "command": ["gemini"], "task": "t"}), GeminiAdapter)
    assert codex_command("codex", "do it", []) == [
        "codex",
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--sandbox",
        "workspace-write",
        "do it",
    ]
    assert "workspace-write" not in codex_command("codex", "-x", ["--sandbox", "read-only"])
    assert codex_command("codex", "-x", [])[-2:] == ["--", "-x"]
    assert gemini_command("gemini", "t", ["--approval-mode", "auto_edit"]).count("--yolo") == 0
    built = aider_command("aider", "t", ["--auto-commits", "--model", "m"])
    assert "--no-auto-commits" not in built
    assert built[:3] == ["aider", "--message", "t"]


def test_agent_command_line_splits_task_and_extra_args() -> None:
    if find_program("codex") is None:
        pytest.skip("codex is not installed (bash .ci/run installs it under .agents/)")
    task, command = agent_command_line("codex", None, ["create", "hello.txt", "--", "-m", "o3"])
    assert task == "create hello.txt"
    assert command[-3:] == ["-m", "o3", "create hello.txt"]
    with pytest.raises(ValueError, match="give the task once"):
        agent_command_line("codex", "a", ["b"])
    with pytest.raises(ValueError, match="needs a task"):
        agent_command_line("codex", None, ["--", "-m", "o3"])


def test_corral_run_refuses_a_missing_cli_or_task(cli: Cli, repo: Path) -> None:
    env = {**cli.env, "CORRAL_GEMINI_BIN": "/nonexistent/gemini"}
    missing = Cli(cli.home, env)("run", "--agent", "gemini", "--repo", str(repo), "hi")
    assert missing.returncode == 2
    assert "/nonexistent/gemini" in missing.stderr
    if find_program("gemini"):
        no_task = cli("run", "--agent", "gemini", "--repo", str(repo))
        assert no_task.returncode == 2
        assert "needs a task" in no_task.stderr


# --- the contract suite: the real CLIs under Corral, against the scripted model server ----------


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def isolated_env(agent: str, base: dict[str, str], tmp: Path, server: ModelServer) -> tuple[dict[str, str], list[str]]:
    """HOME, config and credentials for one CLI, all pointing at the model server; and extra CLI args."""
    home = tmp / "agent-home"
    home.mkdir()
    env = {
        key: value
        for key, value in base.items()
        if not key.startswith(("ANTHROPIC_", "OPENAI_", "GEMINI_", "GOOGLE_", "CLAUDE", "CODEX_", "AIDER_"))
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        # Anything that tries to leave the machine goes to the model server, which refuses and records it.
        HTTPS_PROXY=server.url,
        HTTP_PROXY=server.url,
        https_proxy=server.url,
        http_proxy=server.url,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    extra: list[str] = []
    if agent == "claude-code":
        env.update(
            ANTHROPIC_BASE_URL=server.url,
            ANTHROPIC_API_KEY="sk-ant-test",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
            DISABLE_TELEMETRY="1",
        )
    elif agent == "codex":
        codex_home = tmp / "codex-home"
        codex_home.mkdir()
        (codex_home / "config.toml").write_text(
            'model_provider = "scripted"\ncheck_for_update_on_startup = false\n\n'
            "[analytics]\nenabled = false\n\n[features]\nplugins = false\n\n"
            '[model_providers.scripted]\nname = "scripted"\n'
            f'base_url = "{server.url}/v1"\nwire_api = "responses"\nenv_key = "SCRIPTED_API_KEY"\n'
        )
        env.update(CODEX_HOME=str(codex_home), SCRIPTED_API_KEY="test")
        extra = ["-m", "gpt-5-codex"]
    elif agent == "gemini":
        (home / ".gemini").mkdir()
        settings = {
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
        }
        (home / ".gemini" / "settings.json").write_text(json.dumps(settings))
        env.update(GEMINI_API_KEY="test", GOOGLE_GEMINI_BASE_URL=server.url)
    elif agent == "aider":
        metadata = tmp / "model-metadata.json"
        prices = {
            "max_input_tokens": 100000,
            "max_output_tokens": 4096,
            "input_cost_per_token": 1e-6,
            "output_cost_per_token": 2e-6,
            "litellm_provider": "openai",
            "mode": "chat",
        }
        metadata.write_text(json.dumps({"openai/test-model": prices}))
        env.update(OPENAI_API_KEY="test", LITELLM_LOCAL_MODEL_COST_MAP="True")
        extra = [
            "--model",
            "openai/test-model",
            "--edit-format",
            "whole",
            "--openai-api-base",
            f"{server.url}/v1",
            "--model-metadata-file",
            str(metadata),
        ]
    return env, extra


def sql(cli: Cli, query: str) -> list[dict[str, Any]]:
    done = cli("sql", query, "--json", check=True)
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude-code", "codex", "gemini", "aider"])
def test_real_cli_under_corral(agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    done = run("run", "--agent", agent, "--repo", str(repo), f"create {FILE_NAME}", "--", *extra, timeout=300)
    assert done.returncode == 0, f"{agent} failed ({done.returncode}):\n{done.stderr}\n{done.stdout[-3000:]}"
    [row] = sql(run, "SELECT execution_id, agent, worktree, command FROM executions")
    assert row["agent"] == agent
    assert (Path(row["worktree"]) / FILE_NAME).read_text() == FILE_TEXT
    execution_id = row["execution_id"]
    kinds = {r["type"] for r in sql(run, f"SELECT DISTINCT type FROM events WHERE execution_id = '{execution_id}'")}
    expected = {"usage", "file.touched", "output"}
    if agent != "aider":  # aider prints text only: no session id, tool calls or final result to read
        expected |= {"session.started", "tool.called", "tool.result", "agent.result"}
    assert expected <= kinds, f"missing {expected - kinds}; got {sorted(kinds)}"
    touched = sql(
        run,
        f"SELECT DISTINCT data->>'path' AS path FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'file.touched'",
    )
    assert FILE_NAME in {r["path"] for r in touched}
    [usage] = sql(
        run,
        f"SELECT sum(CAST(data->>'input_tokens' AS BIGINT)) AS input, "
        f"sum(CAST(data->>'output_tokens' AS BIGINT)) AS output FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'usage'",
    )
    assert usage["input"] > 0
    assert usage["output"] > 0
    if agent != "aider":
        [result] = sql(
            run,
            f"SELECT data->>'ok' AS ok, data->>'text' AS text FROM events "
            f"WHERE execution_id = '{execution_id}' AND type = 'agent.result'",
        )
        assert result["ok"] == "true"
        assert FINAL_TEXT in result["text"]
    status = run("status", execution_id, "--json", check=True)
    shown = json.loads(status.stdout)
    assert shown["agent"] == agent
    assert shown["input_tokens"] > 0
    assert shown["files_touched"] >= 1
    assert model_server.requests, "the CLI never reached the model server"
    assert model_server.leaks == [], f"{agent} tried to leave the machine: {model_server.leaks}"


@pytest.mark.slow
def test_claude_code_takes_input_mid_run_as_a_stream_json_message(
    cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program("claude") is None:
        pytest.skip("claude is not installed (bash .ci/run installs it under .agents/); not run")
    env, _ = isolated_env("claude-code", cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    gate = threading.Event()
    model_server.http.state.hold_until = gate  # the first model answer waits until the input is delivered
    process = run.popen("run", "--agent", "claude-code", "--repo", str(repo), f"create {FILE_NAME}")
    try:
        assert model_server.http.state.held.wait(120), "claude never asked the model server"
        [row] = sql(run, "SELECT execution_id FROM executions")
        sent = run("input", row["execution_id"], "now say done", check=True)
        assert "delivered" in sent.stdout + sent.stderr
        gate.set()
        _, err = process.communicate(timeout=300)
    finally:
        gate.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    results = sql(run, "SELECT data->>'ok' AS ok FROM events WHERE type = 'agent.result' ORDER BY seq")
    assert results
    assert {r["ok"] for r in results} == {"true"}  # Claude may answer both messages in one turn or in two
    assert sql(run, "SELECT count(*) AS n FROM events WHERE type = 'input.delivered'") == [{"n": 1}]
    prompts = [
        json.dumps(r.body)
        for r in model_server.requests
        if r.path.startswith("/v1/messages") and isinstance(r.body, dict) and r.body.get("tools")
    ]
    assert any("now say done" in p for p in prompts)


def test_model_server_refuses_to_proxy(model_server: ModelServer) -> None:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", model_server.url, "http://example.invalid/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "NO_PROXY": ""},
    )
    if done.returncode == 127:
        pytest.skip("curl is not installed")
    assert done.stdout == "403"
    assert model_server.leaks == ["http://example.invalid/"]
