"""Forks that continue the agent's conversation: `corral fork ID --at N --prompt TEXT`.

The real Claude Code and Codex CLIs (installed under .agents/ by scripts/install-agents.sh, else
skipped with the reason) run against the scripted model server of tests/helpers/model_server.py,
each with its own HOME, under a real `corral up`. What the model server receives shows whether the
fork's conversation carried the original's messages.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from actors.adapters import build_command, find_program, probe
from actors.adapters.claude_code import command_line as claude_command
from actors.adapters.codex import command_line as codex_command
from actors.sessions import carry_session, claude_project_name
from tests.conftest import Cli, agent_command
from tests.helpers.model_server import FILE_NAME, ModelServer
from tests.test_adapters import _stop_what_a_failed_test_left, isolated_env, sql  # noqa: F401
from tests.test_adapters import model_server as model_server  # the fixture
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until

PROGRAMS = {"claude-code": "claude", "codex": "codex"}
MODEL_PATHS = {"claude-code": "/v1/messages", "codex": "/v1/responses"}
TASK = f"create {FILE_NAME}"
PROMPT = "now say done"


def skip_unless_installed(agent: str) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (sh scripts/install-agents.sh installs it under .agents/)")


def session_files(agent: str, env: dict[str, str], session: str) -> list[Path]:
    """Where the CLI stored a session (Claude Code: per project directory; Codex: by date, by id)."""
    if agent == "claude-code":
        return sorted(Path(env["HOME"], ".claude", "projects").glob(f"*/{session}.jsonl"))
    return sorted(Path(env["CODEX_HOME"], "sessions").glob(f"*/*/*/rollout-*-{session}.jsonl"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conversation_requests(server: ModelServer, agent: str, since: int) -> list[str]:
    """The bodies of the main model requests (the ones offering tools) after the first `since`."""
    found = []
    for recorded in server.requests[since:]:
        body = recorded.body
        main = recorded.method == "POST" and recorded.path.startswith(MODEL_PATHS[agent])
        if main and isinstance(body, dict) and body.get("tools"):
            found.append(json.dumps(body))
    return found


def last_checkpoint(run: Cli, execution_id: str) -> int:
    def found() -> int | None:
        rows = sql(run, f"SELECT max(n) AS n FROM checkpoints WHERE execution_id = '{execution_id}'")
        return int(rows[0]["n"]) if rows and rows[0]["n"] else None

    return int(str(wait_until(found, 60, f"a checkpoint of {execution_id}")))


def fork_row(run: Cli, original: str, prompt: str) -> dict[str, Any]:
    [row] = sql(
        run,
        "SELECT e.execution_id, e.worktree, e.fork_checkpoint, r.data->>'resume_session' AS resume_session, "
        "r.data->>'task' AS task, r.data->'command' AS command FROM executions e JOIN events r "
        "ON r.execution_id = e.execution_id AND r.type = 'execution.requested' "
        f"WHERE e.fork_of = '{original}' AND r.data->>'task' = '{prompt}'",
    )
    return row


def sessions_of(run: Cli, execution_id: str) -> list[str]:
    rows = sql(
        run,
        f"SELECT data->>'session_id' AS s FROM events WHERE execution_id = '{execution_id}' "
        "AND type = 'session.started' ORDER BY seq",
    )
    return [r["s"] for r in rows]


# --- command lines and the session copy, without a model -------------------------------------------


def test_fork_command_lines_continue_as_a_new_session() -> None:
    forked = codex_command("codex", PROMPT, ["--sandbox", "read-only", "-m", "o3"], resume="th-1", fork=True)
    assert forked[:3] == ["codex", "exec", "fork"]
    assert forked[-2:] == ["th-1", PROMPT]
    assert "--sandbox" not in forked and 'sandbox_mode="read-only"' in forked
    assert codex_command("codex", PROMPT, [], resume="th-1")[2] == "resume"  # a follow-up appends to it
    program = find_program("claude")
    if program is not None:
        built = claude_command(program, PROMPT, ["--model", "m"], resume="abc", fork=True)
        assert built[-3:] == ["--resume", "abc", "--fork-session"]
        assert "--fork-session" not in claude_command(program, PROMPT, [], resume="abc")
        if probe("claude-code", program)["features"]["fork"]:
            assert build_command("claude-code", PROMPT, [], resume="abc", fork=True)[-1] == "--fork-session"


def test_claude_session_is_copied_to_the_new_worktrees_project_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    session = "0a1b2c3d-0000-4000-8000-000000000001"
    original = home / ".claude" / "projects" / claude_project_name("/w/orig") / f"{session}.jsonl"
    original.parent.mkdir(parents=True)
    original.write_bytes(b'{"type":"user"}\n')
    worktree = tmp_path / "wt.fork" / "x_y"
    worktree.mkdir(parents=True)
    assert claude_project_name(str(worktree)) == str(worktree).replace("/", "-").replace(".", "-").replace("_", "-")
    env = {"HOME": str(home)}
    assert carry_session("claude-code", session, worktree, env) is None
    copied = home / ".claude" / "projects" / claude_project_name(str(worktree)) / f"{session}.jsonl"
    assert copied.read_bytes() == original.read_bytes()
    assert original.exists()  # copied, not moved
    assert carry_session("claude-code", session, worktree, env) is None  # already there: left as it is
    # as the CLI's own function names them (values computed with it): UTF-16 units; long names cut and hashed
    assert claude_project_name("/tmp/w\u00e9_\U0001f600.x") == "-tmp-w-----x"
    assert claude_project_name("/" + "b" * 250 + "\U0001f600") == "-" + "b" * 199 + "-fj1ga6"
    # unknown sessions and ids that are no ids say why, and nothing is created
    missing = carry_session("claude-code", "0a1b2c3d-0000-4000-8000-00000000dead", tmp_path / "other", env)
    assert missing and "not on this host" in missing
    assert carry_session("claude-code", "../../etc/passwd", worktree, env) == "'../../etc/passwd' is not a session id"
    assert "not on this host" in str(carry_session("codex", session, worktree, {"CODEX_HOME": str(tmp_path / "cx")}))


# --- the real CLIs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude-code", "codex"])
def test_fork_continues_the_conversation_as_a_new_session(
    agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    skip_unless_installed(agent)
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    up = start_up(run)  # its spawner runs the agents with this HOME (their session files are under it)
    try:
        first = run("run", "--agent", agent, "--repo", str(repo), "-q", TASK, "--", *extra, timeout=300)
        assert first.returncode == 0, f"{agent} failed:\n{first.stderr}\n{first.stdout[-3000:]}"
        [original_row] = sql(run, "SELECT execution_id, worktree FROM executions")
        original = original_row["execution_id"]
        # Say what went wrong rather than time out waiting for a checkpoint of nothing.
        assert not model_server.unserved, f"{agent} was not served as scripted: {model_server.explain()}"
        assert (Path(original_row["worktree"]) / FILE_NAME).is_file(), (
            f"{agent} wrote no {FILE_NAME}; {model_server.explain()}; its output:\n{first.stdout[-2000:]}"
        )
        checkpoint = last_checkpoint(run, original)
        [session] = sessions_of(run, original)
        [session_file] = session_files(agent, env, session)
        before = digest(session_file)
        # Claude Code also finds sessions of the repository's other live worktrees; once the original's
        # worktree is removed (pruned, or the fork runs elsewhere) only the copied session file remains.
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", original_row["worktree"]], check=True)

        # the fork continues the conversation: the model sees the original's messages, then the prompt
        asked = len(model_server.requests)
        forked = run("fork", original[:6], "--at", str(checkpoint), "--prompt", PROMPT, timeout=300)
        assert forked.returncode == 0, f"{agent} fork failed:\n{forked.stderr}\n{forked.stdout[-3000:]}"
        assert f"continuing {agent} session {session} as a new session" in forked.stderr
        assert "not continued" not in forked.stderr
        fork = fork_row(run, original, PROMPT)
        assert fork["fork_checkpoint"] == checkpoint
        assert fork["resume_session"] == session
        assert fork["worktree"] != original_row["worktree"]
        assert (Path(fork["worktree"]) / FILE_NAME).is_file()  # the checkpoint's tree
        first_request = conversation_requests(model_server, agent, asked)[0]
        assert TASK in first_request and PROMPT in first_request, first_request[:2000]
        # a new session of its own; the original's session file is byte for byte what it was
        fork_sessions = sessions_of(run, fork["execution_id"])
        assert fork_sessions and session not in fork_sessions
        assert digest(session_file) == before
        if agent == "claude-code":  # the copy in the fork's project directory is what Claude Code read
            copied = session_files(agent, env, session)
            assert len(copied) == 2 and session_file in copied
            assert {digest(p) for p in copied} == {before}

        # ps --tree and compare show the continued session
        tree = json.loads(run("ps", "--tree", "--json", check=True).stdout)
        [root] = [r for r in tree if r["execution_id"] == original]
        [child] = root["children"]
        assert (child["relation"], child["resume_session"]) == (f"fork@{checkpoint}", session)
        assert f"(session {session})" in run("ps", "--tree", check=True).stdout
        compared = json.loads(run("compare", original, fork["execution_id"], "--json", check=True).stdout)
        assert (compared["a"]["session_id"], compared["b"]["resume_session"]) == (session, session)
        assert compared["b"]["session_id"] == fork_sessions[-1]

        # --new-session: a fresh conversation with only the prompt
        asked = len(model_server.requests)
        fresh = run(
            "fork", original, "--at", str(checkpoint), "--prompt", "say hello", "--new-session", "-q", timeout=300
        )
        assert fresh.returncode == 0, f"{agent} fork failed:\n{fresh.stderr}\n{fresh.stdout[-3000:]}"
        assert "corral:" not in fresh.stderr  # (asked for: nothing to say; -q: no start line)
        assert fork_row(run, original, "say hello")["resume_session"] is None
        fresh_request = conversation_requests(model_server, agent, asked)[0]
        assert "say hello" in fresh_request and TASK not in fresh_request
        assert digest(session_file) == before
    finally:
        stop_up(run, up)
    assert model_server.leaks == []


def test_prompt_fork_of_a_plain_command_says_the_conversation_is_not_continued(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        original = detach(cli, repo, "--task", "notes", *agent_command("notes", "--steps", "1"))
        wait_state(cli, original, "exited")
        wait_until(lambda: sql(cli, f"SELECT n FROM checkpoints WHERE execution_id = '{original}'"), 60, "a checkpoint")
        forked = cli("fork", original, "--at", "1", "--prompt", "other notes", "-q")
        assert forked.returncode == 0, forked.stderr
        lines = forked.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].endswith(
            f": the conversation of {original} is not continued: {original} ran a plain command, "
            "which has no agent session"
        )
        row = fork_row(cli, original, "other notes")
        assert json.loads(row["command"])[-3:] == ["other notes", "--steps", "1"]
        assert row["resume_session"] is None
        # `-- COMMAND` forks are as before: nothing to say about conversations
        other = cli("fork", original, "--at", "1", "-q", "--", sys.executable, "-c", "print('hi')")
        assert other.returncode == 0 and other.stdout.strip() == "hi"
        assert "corral:" not in other.stderr
        refused = cli("fork", original, "--at", "1", "--new-session")
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            "corral: error: --new-session goes with --prompt TEXT (the task of the new conversation)"
        ]
    finally:
        stop_up(cli, up)


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["gemini", "aider"])
def test_fork_of_a_cli_that_cannot_fork_its_session_says_so(
    agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    program = {"gemini": "gemini", "aider": "aider"}[agent]
    if find_program(program) is None:
        pytest.skip(f"{program} is not installed (sh scripts/install-agents.sh installs it under .agents/)")
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    up = start_up(run)
    try:
        first = run("run", "--agent", agent, "--repo", str(repo), "-q", TASK, "--", *extra, timeout=300)
        assert first.returncode == 0, f"{agent} failed:\n{first.stderr}\n{first.stdout[-3000:]}"
        [row] = sql(run, "SELECT execution_id FROM executions")
        original = row["execution_id"]
        checkpoint = last_checkpoint(run, original)
        forked = run("fork", original, "--at", str(checkpoint), "--prompt", PROMPT, timeout=300)
        assert forked.returncode == 0, f"{agent} fork failed:\n{forked.stderr}\n{forked.stdout[-3000:]}"
        said = [line for line in forked.stderr.splitlines() if "is not continued" in line]
        assert len(said) == 1, forked.stderr
        if agent == "gemini":
            assert "cannot fork a session (its --resume continues the original's own session file)" in said[0]
        else:  # its chat history is .gitignored (aider adds .aider*), so checkpoints do not hold it
            assert "aider keeps its conversation in .aider.chat.history.md, which the checkpoint does not" in said[0]
        fork = fork_row(run, original, PROMPT)
        assert fork["resume_session"] is None
        command = json.loads(fork["command"])
        assert "--resume" not in command and "--restore-chat-history" not in command
    finally:
        stop_up(run, up)
    assert model_server.leaks == []


@pytest.mark.slow
def test_aider_fork_restores_the_chat_history_its_checkpoint_holds(
    cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program("aider") is None:
        pytest.skip("aider is not installed (sh scripts/install-agents.sh installs it under .agents/)")
    env, extra = isolated_env("aider", cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    up = start_up(run)
    try:
        # --no-gitignore: aider leaves .gitignore alone, so the checkpoint holds .aider.chat.history.md
        first = run("run", "--agent", "aider", "--repo", str(repo), "-q", TASK, "--", *extra, "--no-gitignore")
        assert first.returncode == 0, f"aider failed:\n{first.stderr}\n{first.stdout[-3000:]}"
        [row] = sql(run, "SELECT execution_id FROM executions")
        original = row["execution_id"]
        checkpoint = last_checkpoint(run, original)
        asked = len(model_server.requests)
        forked = run("fork", original, "--at", str(checkpoint), "--prompt", PROMPT, timeout=300)
        assert forked.returncode == 0, f"aider fork failed:\n{forked.stderr}\n{forked.stdout[-3000:]}"
        assert "continuing aider's chat history (.aider.chat.history.md at the checkpoint)" in forked.stderr
        assert "not continued" not in forked.stderr
        fork = fork_row(run, original, PROMPT)
        assert "--restore-chat-history" in json.loads(fork["command"])
        chats = [
            json.dumps(r.body)
            for r in model_server.requests[asked:]
            if r.method == "POST" and r.path.startswith("/v1/chat/completions") and PROMPT in json.dumps(r.body)
        ]
        assert chats and TASK in chats[0], chats[:1]
    finally:
        stop_up(run, up)
