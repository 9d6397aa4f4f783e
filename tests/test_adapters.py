"""Agent adapters: line mapping from recorded CLI output, and the contract suite that runs the real CLIs.

The contract suite drives Claude Code, Codex, Gemini CLI and aider, as installed by `.ci/run` (or
found on PATH), under `corral run --agent ...`, each pointed at the scripted model server of
tests/helpers/model_server.py on loopback, with its own HOME and config. A CLI that is not installed
skips its case with the reason; nothing passes without running the real program.
"""

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.adapters import (
    CAPABILITY_CACHE,
    Adapter,
    adapter_class,
    agent_command_line,
    build_command,
    find_program,
    load_adapter,
    missing_feature,
    price_of,
    probe,
)
from actors.adapters.aider import AiderAdapter
from actors.adapters.aider import command_line as aider_command
from actors.adapters.claude_code import ClaudeCodeAdapter, user_message
from actors.adapters.claude_code import command_line as claude_command
from actors.adapters.codex import CodexAdapter
from actors.adapters.codex import command_line as codex_command
from actors.adapters.gemini import GeminiAdapter
from actors.adapters.gemini import command_line as gemini_command
from events.types import model_for
from tests.conftest import Cli
from tests.helpers.model_server import FILE_NAME, FILE_TEXT, FINAL_TEXT, ModelServer


@pytest.fixture(autouse=True)
def _stop_what_a_failed_test_left(tmp_path: Path) -> Iterator[None]:
    """A test that gives up SIGKILLs its `corral run`; the shim (by design) and the agent outlive
    it. Stop every process of this test's directories afterwards, so nothing paused lingers."""
    yield
    marker = str(tmp_path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes() or marker in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


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
        "usage",  # estimated live, from the model call's input tokens
        "agent.message",
        "tool.called",
        "tool.result",
        "file.touched",
        "usage",
        "agent.message",
        "usage",  # the result: tokens, and the reported cost minus the estimates
        "agent.result",
    ]
    session = of_type(facts, "session.started")[0]
    assert session["session_id"] == "284ecf0e-40b2-45bd-ba5e-dcb56369748e"
    assert "Write" in session["tools"]
    call = of_type(facts, "tool.called")[0]
    assert (call["name"], call["call_id"], call["shell_command"]) == ("Write", "toolu_0001", None)
    assert of_type(facts, "tool.result")[0]["ok"] is True
    assert of_type(facts, "file.touched") == [{"path": "hello.txt", "change": "created"}]
    live, _, usage = of_type(facts, "usage")
    # claude-opus-4-8 at $5/$25 per million: 120 input tokens and 1 output token known at the call
    assert live == {"model": "claude-opus-4-8", "cost_usd": 0.000625, "estimated": True}
    assert (usage["input_tokens"], usage["output_tokens"], usage.get("estimated")) == (240, 60, None)
    assert round(sum(t["cost_usd"] for t in of_type(facts, "usage")), 10) == 0.0027  # the reported total
    assert sum(t.get("input_tokens", 0) for t in of_type(facts, "usage")) == 240  # tokens counted once
    assert adapter.turns == 2
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
    ticks = [t for t in of_type(facts, "usage") if not t.get("estimated")]
    # modelUsage is a running total (240/60 then 360/90): the second tick is the difference
    assert [(t["input_tokens"], t["output_tokens"]) for t in ticks] == [(240, 60), (120, 30)]
    assert round(sum(t["cost_usd"] for t in of_type(facts, "usage")), 6) == 0.00405
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
    # no "Cost:" part: estimated at test-model's price ($1 / $2 per million tokens)
    assert of_type(facts, "usage") == [
        {
            "model": "openai/test-model",
            "cost_usd": 0.000626,
            "input_tokens": 594,
            "output_tokens": 16,
            "estimated": True,
        }
    ]
    adapter = AiderAdapter(cwd="/w")
    facts = adapter.feed(
        "Creating empty file /w/new.py\nApplied edit to new.py\n"
        "Tokens: 2.3k sent, 1.1k cache write, 3.4k cache hit, 120 received. Cost: $0.01 message, $0.05 session.\n"
    )
    assert facts[0] == ("file.touched", {"path": "new.py", "change": "created"})
    tick = facts[1][1]
    assert (tick["input_tokens"], tick["cache_write_tokens"], tick["cache_read_tokens"]) == (2300, 1100, 3400)
    assert (tick["output_tokens"], tick["cost_usd"], tick.get("estimated")) == (120, 0.01, None)


def test_codex_and_gemini_cost_is_estimated_from_the_price_table() -> None:
    codex = facts_of(CodexAdapter(command=["codex", "exec", "--json", "-m", "gpt-5-codex", "t"]), "codex.jsonl")
    [tick] = of_type(codex, "usage")
    # gpt-5-codex at $1.25 / $10 per million: 240 in, 60 out
    assert (tick["cost_usd"], tick["estimated"]) == (0.0009, True)
    gemini = of_type(facts_of(GeminiAdapter(), "gemini.jsonl"), "usage")
    assert {t["model"]: (t["cost_usd"], t["estimated"]) for t in gemini} == {
        "gemini-3.5-flash-lite": (0.000024, True),  # $0.10 / $0.40: 120 in, 30 out
        "gemini-3.1-pro-preview": (0.00120, True),  # $2 / $12: 240 in, 60 out
    }
    # [prices] of corral.toml come with the spec and win over the defaults; an unknown model costs 0, not estimated
    priced = load_adapter(
        {"agent": "codex", "command": ["codex", "-m", "my-model"], "prices": {"my-model": {"input": 1e6}}}
    )
    assert priced is not None
    [mine] = of_type(priced.feed('{"type":"turn.completed","usage":{"input_tokens":3,"output_tokens":5}}\n'), "usage")
    assert (mine["cost_usd"], mine["estimated"]) == (3.0, True)
    unknown = CodexAdapter(command=["codex", "-m", "nobody-knows"])
    [none] = of_type(unknown.feed('{"type":"turn.completed","usage":{"input_tokens":3,"output_tokens":5}}\n'), "usage")
    assert (none["cost_usd"], none["estimated"]) == (None, True)  # unknown, not $0 (issue 19, item 12)


def test_price_lookup_takes_the_longest_prefix_without_provider_or_context_suffix() -> None:
    assert price_of("claude-opus-4-8[1m]") == price_of("claude-opus-4") == (5.0, 25.0, 0.5, 6.25)
    assert price_of("claude-opus-4-1-20250805") == (15.0, 75.0, 1.5, 18.75)
    assert price_of("openai/gpt-5-mini")[:2] == (0.25, 2.0)  # type: ignore[index]
    assert price_of("gpt-5.1-codex")[:2] == (1.25, 10.0)  # type: ignore[index]
    assert price_of("nobody-knows") is None
    assert price_of(None) is None
    assert price_of("gpt-5", {"GPT-5": {"input": 9, "output": 9}}) == (9.0, 9.0, 0.0, 0.0)


def test_resume_command_lines_use_each_clis_own_option() -> None:
    assert gemini_command("gemini", "t", [], resume="s-1")[-2:] == ["--resume", "s-1"]
    assert "--restore-chat-history" in aider_command("aider", "t", [], resume="")
    assert "--restore-chat-history" not in aider_command("aider", "t", [])
    resumed = codex_command("codex", "go on", ["--sandbox", "read-only", "-m", "o3"], resume="th-1")
    # `codex exec resume` has no --sandbox option: the same setting as -c
    assert resumed == [
        "codex",
        "exec",
        "resume",
        "--json",
        "--skip-git-repo-check",
        "-c",
        'sandbox_mode="read-only"',
        "-m",
        "o3",
        "th-1",
        "go on",
    ]
    assert codex_command("codex", "t", [], resume="th-1")[5:7] == ["-c", 'sandbox_mode="workspace-write"']
    if find_program("claude") is not None:
        built = claude_command(find_program("claude") or "claude", "t", ["--model", "m"], resume="abc")
        assert built[-2:] == ["--resume", "abc"]


def fake_cli(tmp: Path, name: str, version: str, help_text: str) -> Path:
    """A real executable that answers --version and --help like an old release of a CLI would."""
    script = tmp / name
    script.write_text(f"#!/bin/sh\ncase \"$1\" in --version) echo '{version}';; *) echo '{help_text}';; esac\n")
    script.chmod(0o755)
    return script


def test_capabilities_are_probed_once_per_binary_and_missing_ones_are_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    old = fake_cli(tmp_path, "gemini", "0.1.0", "Usage: gemini -p PROMPT -o FORMAT")
    first = probe("gemini", str(old))
    assert first == {
        "program": str(old),
        "version": "0.1.0",
        "features": {"stream_input": False, "resume": False, "fork": False, "live_usage": False},
        "cached": False,
    }
    assert probe("gemini", str(old))["cached"] is True
    assert (tmp_path / "home" / CAPABILITY_CACHE).is_file()
    message = missing_feature("gemini", first, "resume")
    assert message == "gemini 0.1.0 cannot resume a recorded session (start a new run with the whole task instead)"
    monkeypatch.setenv("CORRAL_GEMINI_BIN", str(old))
    with pytest.raises(ValueError, match=r"gemini 0\.1\.0 cannot resume"):
        build_command("gemini", "t", resume="s-1")
    assert build_command("gemini", "t")[:3] == [str(old), "-p", "t"]  # a new run needs no resume
    # an upgrade (the binary changes) is probed again
    newer = fake_cli(tmp_path, "gemini", "0.2.0", "  -r, --resume   Resume a previous session")
    os.utime(newer, ns=(1, 1))  # same path, another mtime and size: another binary
    again = probe("gemini", str(newer))
    assert (again["version"], again["features"]["resume"], again["cached"]) == ("0.2.0", True, False)
    assert build_command("gemini", "t", resume="s-1")[-2:] == ["--resume", "s-1"]


@pytest.mark.parametrize("agent", ["claude-code", "codex", "gemini", "aider"])
def test_the_installed_clis_support_what_corral_uses(
    agent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = find_program(PROGRAMS[agent])
    if program is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    found = probe(agent, program)
    assert found["version"], found
    features = found["features"]
    assert features["resume"] is True
    assert features["stream_input"] is (agent == "claude-code")
    assert features["live_usage"] is (agent in ("claude-code", "aider"))
    if agent in ("claude-code", "codex"):
        assert features["fork"] is True
    assert probe(agent, program)["cached"] is True


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
    # A git identity of its own: aider writes one into the repository's .git/config when it finds
    # none, and the sandbox keeps that file read-only (docs/sandbox.md).
    (home / ".gitconfig").write_text("[user]\n\tname = Agent\n\temail = agent@example.com\n")
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
    [caps] = sql(
        run,
        f"SELECT data->>'version' AS version, data->'features' AS features FROM events "
        f"WHERE execution_id = '{execution_id}' AND type = 'agent.capabilities'",
    )
    assert caps["version"]
    assert json.loads(caps["features"])["resume"] is True
    ticks = sql(
        run,
        f"SELECT CAST(data->>'cost_usd' AS DOUBLE) AS cost, coalesce(data->>'estimated', 'false') AS estimated "
        f"FROM events WHERE execution_id = '{execution_id}' AND type = 'usage' ORDER BY seq",
    )
    assert sum(t["cost"] for t in ticks) > 0  # reported (Claude Code, aider) or estimated from the price table
    if agent in ("codex", "gemini"):  # they report tokens only
        assert {t["estimated"] for t in ticks} == {"true"}
    if agent == "claude-code":  # live estimates, then the result's reported cost
        assert ticks[0]["estimated"] == "true"
        assert ticks[-1]["estimated"] == "false"
    status = run("status", execution_id, "--json", check=True)
    shown = json.loads(status.stdout)
    assert shown["agent"] == agent
    assert shown["input_tokens"] > 0
    assert shown["files_touched"] >= 1
    assert shown["cost_usd"] > 0
    assert shown["agent_version"] == caps["version"]
    assert shown["agent_features"]["resume"] is True
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


def wait_for(check: Any, what: str, timeout_s: float = 240.0) -> Any:
    """Poll `check()` until it returns something truthy (no timing assertion: the limit only ends a hang)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1.0)
    raise AssertionError(f"gave up waiting for {what}")


def pending_approvals(run: Cli) -> list[dict[str, Any]]:
    approvals: list[dict[str, Any]] = json.loads(run("approvals", "--json", check=True).stdout)
    return approvals


LIVE_USAGE = ("claude-code", "aider")  # usage after every model call; Codex and Gemini report it when done


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude-code", "codex", "gemini", "aider"])
def test_budget_pauses_the_agent_until_an_approval_raises_it(
    agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    budget = "0.0000001"  # reached by the first usage tick
    process = run.popen(
        "run", "--agent", agent, "--repo", str(repo), "--max-cost", budget, f"create {FILE_NAME}", "--", *extra
    )
    approval: dict[str, Any] | None = None
    try:
        if agent in LIVE_USAGE:
            approval = wait_for(lambda: process.poll() is not None or pending_approvals(run), "a budget approval")
            approval = approval[0] if isinstance(approval, list) else None
        if approval is not None:
            assert (approval["category"], approval["source"]) == ("budget", "budget")
            paused = "SELECT count(*) AS n FROM events WHERE type = 'execution.paused'"
            wait_for(lambda: sql(run, paused)[0]["n"] == 1, "the budget pause")
            assert json.loads(run("status", approval["execution_id"], "--json", check=True).stdout)["state"] == "paused"
            run("approve", approval["approval_id"], "--raise-budget", "100", check=True)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"{agent} failed ({process.returncode}):\n{err}\n{out[-3000:]}"
    [exceeded] = sql(
        run,
        "SELECT data->>'limit' AS lim, CAST(data->>'maximum' AS DOUBLE) AS maximum FROM events "
        "WHERE type = 'limit.exceeded'",
    )
    assert (exceeded["lim"], exceeded["maximum"]) == ("cost", float(budget))
    if agent == "claude-code":
        assert approval is not None, "Claude Code reports usage per model call: it must have been paused"
    if agent not in LIVE_USAGE:  # said once, and no approval for money already spent
        assert "cannot report usage while it runs" in err
        assert sql(run, "SELECT count(*) AS n FROM events WHERE type LIKE 'approval.%'") == [{"n": 0}]
    if approval is not None:  # (aider may end before the pause lands: then limit.exceeded is all)
        [resumed] = sql(run, "SELECT data->>'max_cost_usd' AS max_cost FROM events WHERE type = 'resume.requested'")
        assert float(resumed["max_cost"]) == 100.0
        assert sql(run, "SELECT count(*) AS n FROM events WHERE type = 'execution.resumed'") == [{"n": 1}]
        # (aider also gets a validator approval of its own: it edits .git/config)
        rows = sql(run, "SELECT status, category FROM approvals WHERE category = 'budget'")
        assert rows == [{"status": "granted", "category": "budget"}]
        progress = sql(run, "SELECT data->>'note' AS note FROM events WHERE type = 'heartbeat' ORDER BY seq")
        assert progress and "budget" in progress[-1]["note"]


@pytest.mark.slow
def test_rejecting_a_budget_approval_cancels_the_agent(
    cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program("claude") is None:
        pytest.skip("claude is not installed (bash .ci/run installs it under .agents/); not run")
    env, _ = isolated_env("claude-code", cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    process = run.popen("run", "--agent", "claude-code", "--repo", str(repo), "--max-cost", "0.0000001", "create it")
    try:
        [approval] = wait_for(lambda: pending_approvals(run), "a budget approval")
        run("reject", approval["approval_id"], check=True)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # (Claude Code may exit 0 on SIGTERM: the exit reason is what says it was cancelled)
    [row] = sql(run, "SELECT exit_reason FROM executions")
    assert row["exit_reason"] == "cancelled", err


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude-code", "codex", "gemini", "aider"])
def test_follow_up_continues_the_session_in_the_same_worktree(
    agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    first = run("run", "--agent", agent, "--repo", str(repo), f"create {FILE_NAME}", "--", *extra, timeout=300)
    assert first.returncode == 0, first.stderr
    [parent] = sql(run, "SELECT execution_id, worktree FROM executions")
    sessions = sql(run, "SELECT data->>'session_id' AS s FROM events WHERE type = 'session.started'")
    asked = len(model_server.requests)
    # the parent's CLI arguments (model, server) are passed again by themselves
    second = run("run", "--resume", parent["execution_id"][:6], "now say done", timeout=300)
    assert second.returncode == 0, f"{agent} follow-up failed:\n{second.stderr}\n{second.stdout[-3000:]}"
    [child] = sql(
        run,
        "SELECT e.execution_id, e.worktree, r.data->>'resume_of' AS resume_of, r.data->>'resume_session' AS session "
        "FROM executions e JOIN events r ON r.execution_id = e.execution_id AND r.type = 'execution.requested' "
        f"WHERE e.execution_id <> '{parent['execution_id']}'",
    )
    assert child["worktree"] == parent["worktree"]
    assert child["resume_of"] == parent["execution_id"]
    if agent != "aider":  # aider resumes from its chat history file in the worktree
        assert child["session"] == sessions[0]["s"]
    # the model saw the first conversation again with the new message: the session was continued
    later = [json.dumps(r.body) for r in model_server.requests[asked:] if r.method == "POST"]
    assert any("now say done" in body and f"create {FILE_NAME}" in body for body in later), later[-1:]
    assert model_server.leaks == []


def test_follow_up_of_a_plain_command_is_refused(cli: Cli, repo: Path) -> None:
    done = cli("run", "--repo", str(repo), "-q", "--", "true", check=True)
    assert done.returncode == 0
    [row] = sql(cli, "SELECT execution_id FROM executions")
    refused = cli("run", "--resume", row["execution_id"], "go on")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"corral: error: {row['execution_id']} ran a plain command: there is no agent session to continue"
    ]
    assert len(sql(cli, "SELECT execution_id FROM executions")) == 1  # nothing was started


def test_codex_hands_its_confinement_to_corrals_sandbox() -> None:
    """Codex's own sandbox is a bubblewrap that cannot nest in Corral's ("setting up uid map:
    Operation not permitted", every command failed): inside Corral's it runs with full access."""
    from actors.adapters import in_corral_sandbox

    plain = codex_command("codex", "do it", [])
    assert "workspace-write" in plain
    confined = in_corral_sandbox("codex", plain)
    assert "workspace-write" not in confined and confined[confined.index("--sandbox") + 1] == "danger-full-access"
    resumed = in_corral_sandbox("codex", codex_command("codex", "go on", ["-s", "read-only"], resume="th-1"))
    assert 'sandbox_mode="danger-full-access"' in resumed and "read-only" not in " ".join(resumed)
    assert in_corral_sandbox("claude-code", ["claude", "-p", "x"]) == ["claude", "-p", "x"]
    assert in_corral_sandbox(None, ["sh", "-c", "--sandbox x"]) == ["sh", "-c", "--sandbox x"]
