"""A fork re-sends the inputs its original got before the checkpoint (docs/history.md, fork);
`corral logs` says how much output log retention dropped (docs/retention.md). Real `corral up`,
real NATS, real agents."""

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import AGENT, Cli
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until


def sql(cli: Cli, text: str) -> list[dict]:
    return json.loads(cli("sql", text, "--json", check=True).stdout)


def checkpoint_now(cli: Cli, execution_id: str) -> int:
    """Take a checkpoint (or, when nothing changed since the last one, name that one); its number."""
    answer = json.loads(cli("checkpoint", execution_id, "--json", check=True).stdout)
    if answer.get("checkpoint", True) is not None and "data" in answer:
        return int(answer["data"]["n"])
    (row,) = sql(cli, f"SELECT max(n) AS n FROM checkpoints WHERE execution_id = '{execution_id}'")
    return int(row["n"])


def test_fork_resends_the_inputs_its_original_got_before_the_checkpoint(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    fork: subprocess.Popen[str] | None = None
    try:
        original = detach(cli, repo, "--", sys.executable, str(AGENT), "--read-input")
        wait_state(cli, original, "running")
        for text in ("alpha", "beta"):
            cli("input", original, text, check=True)
        wait_until(lambda: "input: beta" in cli("logs", original).stdout, what="the original to echo beta")
        n = checkpoint_now(cli, original)
        for text in ("gamma", "quit"):
            cli("input", original, text, check=True)
        wait_state(cli, original, "exited")

        fork = cli.popen("fork", original, "--at", str(n))
        assert fork.stderr is not None
        first = fork.stderr.readline()
        match = re.match(r"corral: ([a-z0-9]{8}): ", first)
        assert match, first
        fork_id = match.group(1)
        assert f"re-sending the 2 inputs {original} got before checkpoint {n}" in first
        assert f"the 2 inputs it got after checkpoint {n} are not" in first
        assert f"corral input {fork_id} TEXT" in first
        # the two inputs before the checkpoint arrive by themselves; `quit` came after it: sent by hand
        wait_until(lambda: "input: beta" in cli("logs", fork_id).stdout, what="the fork to echo beta")
        cli("input", fork_id, "quit", check=True)
        out, err = fork.communicate(timeout=120)
        assert fork.returncode == 0, err
        assert "input: alpha\ninput: beta\n" in out
        assert "gamma" not in out
        delivered = sql(cli, f"SELECT text FROM inputs WHERE execution_id = '{fork_id}' ORDER BY seq")
        assert [r["text"] for r in delivered] == ["alpha\n", "beta\n", "quit\n"]
        requested = sql(
            cli,
            f"SELECT data->>'requested_by' AS by FROM events WHERE execution_id = '{fork_id}' "
            "AND type = 'input.requested' ORDER BY seq",
        )
        assert [r["by"] for r in requested][:2] == ["fork", "fork"]

        # a fork with another command gets none, and says how to send them
        other = cli(
            "fork", original, "--at", str(n), "--detach", "--", sys.executable, str(AGENT), "--steps", "1", check=True
        )
        assert f"the 2 inputs {original} got before checkpoint {n} are not re-sent: the fork runs another command" in (
            other.stderr
        )
        assert "corral input" in other.stderr
    finally:
        if fork is not None and fork.poll() is None:
            fork.kill()
            fork.wait()
        stop_up(cli, up)


def _held_chunks(cli: Cli, execution_id: str) -> list[int]:
    """The numbers of the output chunks the log still holds for it (read with `corral tap`)."""
    lines = cli("tap", execution_id, "--since", "all", "--no-follow", check=True).stdout.splitlines()
    return sorted(e["data"]["n"] for e in map(json.loads, lines) if e.get("type") == "output")


def test_logs_say_how_much_output_expired(cli: Cli, repo: Path) -> None:
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text("[retention]\noutput_max_msgs = 5\n")
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, "--", sys.executable, str(AGENT), "--steps", "20", "--sleep", "0.03")
        wait_state(cli, execution_id, "exited")
        held = _held_chunks(cli, execution_id)
        assert len(held) == 5, held  # the newest 5; the last is the execution's last chunk: its total
        total = held[-1]
        expired = total - len(held)
        assert expired > 1
        notice = (
            f"corral: the first {expired:,} output chunks of {execution_id} expired under [retention] "
            f"(output_max_msgs 5); showing from chunk {expired + 1:,}"
        )
        logs = cli("logs", execution_id, check=True)
        assert logs.stderr.splitlines()[0] == notice, logs.stderr
        assert logs.stdout.endswith("agent: done, 20 files written\n")
        follow = cli("logs", "-f", execution_id, check=True)
        assert follow.stderr.splitlines()[0] == notice, follow.stderr
        assert follow.stdout == logs.stdout

        # --tail: the last lines; the notice only when they reach back to the first chunk held
        last = cli("logs", "--tail", "2", execution_id, check=True)
        assert last.stdout.splitlines() == logs.stdout.splitlines()[-2:]
        assert "expired" not in last.stderr
        assert cli("logs", "-f", "--tail", "2", execution_id, check=True).stdout == last.stdout
        whole = cli("logs", "--tail", "1000", execution_id, check=True)
        assert whole.stdout == logs.stdout
        assert whole.stderr.splitlines()[0] == notice
    finally:
        stop_up(cli, up)


def test_logs_follow_with_tail_prints_the_last_lines_then_the_rest_once(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    follower: subprocess.Popen[str] | None = None
    try:
        execution_id = detach(cli, repo, "--", sys.executable, str(AGENT), "--steps", "3", "--read-input")
        wait_state(cli, execution_id, "running")
        for text in ("one", "two", "three"):
            cli("input", execution_id, text, check=True)
        wait_until(lambda: "input: three" in cli("logs", execution_id).stdout, what="the agent to echo three")
        follower = cli.popen("logs", "-f", "--tail", "2", execution_id)
        assert follower.stdout is not None
        shown = [follower.stdout.readline(), follower.stdout.readline()]
        assert shown == ["input: two\n", "input: three\n"]  # the last two lines, then live:
        for text in ("four", "five", "quit"):
            cli("input", execution_id, text, check=True)
        rest, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert (
            "".join(shown) + rest
            == "input: two\ninput: three\ninput: four\ninput: five\nagent: done, 3 files written\n"
        )
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        stop_up(cli, up)
