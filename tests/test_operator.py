"""What a new operator hits (issue 19): each test fails without its fix.

Real `corral up` against a real nats-server, real agents, the installed CLI.
"""

import asyncio
import json
import subprocess
import time
from pathlib import Path

from actors.bus import connect_bus
from tests.conftest import Cli, agent_command
from tests.test_control import detach, start_up, status, stop_up, wait_state
from tests.test_control import up as up  # the fixture


def test_run_takes_priority_and_cpus_from_the_command_line(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, "--priority", "5", "--cpus", "1", *agent_command("--steps", "1", "--sleep", "0"))
    final = wait_state(cli, execution_id, "exited")
    assert final["exit_code"] == 0
    requested = json.loads(
        cli(
            "sql",
            f"SELECT data->>'priority' AS priority, data->'limits'->>'cpus' AS cpus FROM events "
            f"WHERE execution_id = '{execution_id}' AND type = 'execution.requested'",
            "--json",
            check=True,
        ).stdout
    )
    assert requested == [{"priority": "5", "cpus": "1.0"}]
    bad = cli("run", "--repo", str(repo), "--priority", "high", *agent_command())
    assert bad.returncode == 2 and "--priority: invalid int value: 'high'" in bad.stderr
    bad_cpus = cli("run", "--repo", str(repo), "--cpus", "lots", *agent_command())
    assert bad_cpus.returncode == 2
    assert len(bad_cpus.stderr.strip().splitlines()) == 1 and "CPUs" in bad_cpus.stderr


def test_tap_no_follow_prints_what_is_stored_and_ends(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, *agent_command("--steps", "2", "--sleep", "0"))
    wait_state(cli, execution_id, "exited")
    stored = json.loads(
        cli(
            "sql", f"SELECT count(*) AS n FROM events WHERE execution_id = '{execution_id}'", "--json", check=True
        ).stdout
    )[0]["n"]
    # a finished execution, --since all: ends by itself (it used to follow forever)
    tapped = cli("tap", execution_id, "--since", "all", "--no-follow", timeout=60)
    assert tapped.returncode == 0, tapped.stderr
    lines = [json.loads(line) for line in tapped.stdout.splitlines()]
    assert len(lines) >= stored and lines[0]["type"] == "execution.requested"
    assert {line["execution_id"] for line in lines} == {execution_id}
    # --no-follow alone means "everything so far"; --limit above what is stored ends too
    assert cli("tap", execution_id, "--no-follow", timeout=60).stdout == tapped.stdout
    assert cli("tap", execution_id, "--no-follow", "--limit", "100000", timeout=60).stdout == tapped.stdout
    assert "--no-follow" in cli("tap", "--help").stdout


def test_tap_prints_a_malformed_message_as_one_json_line(cli: Cli, up: subprocess.Popen[str]) -> None:
    async def publish() -> None:
        bus = await connect_bus(cli.env["CORRAL_NATS_URL"])
        try:
            await bus.js.publish("corral.evt.badmsg01.output", b"{}")
            await bus.js.publish("corral.evt.badmsg01.output", b"not json at all")
        finally:
            await bus.close()

    asyncio.run(publish())
    tapped = cli("tap", "corral.evt.badmsg01.>", "--no-follow", timeout=60)
    assert tapped.returncode == 0, tapped.stderr
    lines = [json.loads(line) for line in tapped.stdout.splitlines()]  # every line is JSON
    assert [line["malformed"] for line in lines] == ["{}", "not json at all"]
    assert all(isinstance(line["seq"], int) for line in lines)


def _ps(cli: Cli) -> dict[str, dict]:
    return {row["execution_id"]: row for row in json.loads(cli("ps", "--all", "--json", check=True).stdout)}


def test_why_an_execution_stopped_is_said_everywhere(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    hard = detach(cli, repo, "--timeout", "2s", *agent_command("--steps", "1", "--sleep", "600"))
    idle = detach(
        cli, repo, "--idle-timeout", "2s", "--on-stall", "cancel", *agent_command("--steps", "1", "--sleep", "600")
    )
    user = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "600"))
    wait_state(cli, user, "running")
    cli("cancel", user, "--grace", "0", check=True)
    for execution_id in (hard, idle, user):
        wait_state(cli, execution_id, "exited")
    rows = _ps(cli)
    assert rows[hard]["reason"] == "hard timeout"
    assert rows[idle]["reason"] == "idle timeout"
    assert rows[user]["reason"].startswith("cancelled by ")
    # the three used to look alike: `sig 15`
    table = cli("ps", "--all", check=True).stdout
    assert "hard timeout" in table and "idle timeout" in table and "cancelled by" in table
    assert status(cli, hard)["reason"] == "hard timeout"


def test_paused_at_its_disk_quota_says_so(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    command = ["--", "sh", "-c", "head -c 30000000 /dev/zero > big.bin; sleep 600"]
    execution_id = detach(cli, repo, "--disk", "10M", *command)
    shown = wait_state(cli, execution_id, "paused")
    assert shown["reason"].startswith("disk limit ("), shown["reason"]
    assert _ps(cli)[execution_id]["reason"] == shown["reason"]
    cli("cancel", execution_id, "--grace", "0", check=True)


def test_a_failed_validation_after_the_exit_is_shown(
    cli: Cli, repo: Path, up: subprocess.Popen[str], tmp_path: Path
) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text('forbidden_paths = ["NOTES.md"]\n')
    run = cli("run", "--repo", str(repo), "--policy", str(policy), *agent_command("--steps", "1", "--sleep", "0"))
    assert run.returncode == 0, run.stderr  # the agent's own exit code
    [execution_id] = list(_ps(cli))
    said = [line for line in run.stderr.splitlines() if "needs you" in line]
    assert said and "validation" in said[0] and "critical" in said[0], run.stderr
    shown = status(cli, execution_id)
    assert shown["validations_failed"] >= 1 and shown["validations_critical"] >= 1
    assert _ps(cli)[execution_id]["attention"]["validations_failed"] >= 1


def test_up_help_names_every_actor(cli: Cli) -> None:
    shown = " ".join(cli("up", "--help", check=True).stdout.split())
    for actor in ("spawner", "watchdog", "checkpointer", "validator", "approver", "projector"):
        assert actor in shown


def test_status_shows_nested_values_as_json() -> None:
    from corral.control import status_lines

    lines = status_lines({"state": "running", "agent_features": {"resume": True}, "idle_s": 3.0, "pid": None})
    assert 'agent_features  {"resume":true}' in lines  # not Python's repr ("{'resume': True}")
    assert not [line for line in lines if line.startswith("pid")]


def test_an_adapters_advice_names_the_execution() -> None:
    """A refusal that tells what to run says it with the real id, not a placeholder."""
    from corral.control import refusal_text

    assert refusal_text("input.requested", "abc12345", "continue: corral run --resume EXEC_ID 'TEXT'") == (
        "input of abc12345 refused: continue: corral run --resume abc12345 'TEXT'"
    )


def test_approve_without_permission_fails_with_the_permission_error(embedded_cli: Cli, repo: Path) -> None:
    from events.auth import read_credentials
    from tests.test_control import start_up, stop_up, wait_until

    cli, home, env = embedded_cli, embedded_cli.home, embedded_cli.env
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("ship", "--ask-approval", "deploy", "--steps", "1"))

        def pending() -> str | None:
            rows = json.loads(cli("approvals", "--json", check=True).stdout)
            return next((r["approval_id"] for r in rows if r["execution_id"] == execution_id), None)

        approval_id = str(wait_until(pending, 60, "the approval"))
        tap_password = read_credentials(home / "credentials.json").users["tap"]
        as_tap = Cli(home, {**env, "CORRAL_NATS_USER": "tap", "CORRAL_NATS_PASSWORD": tap_password})
        refused = as_tap("approve", approval_id, timeout=60)
        assert refused.returncode != 0
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, refused.stderr
        assert "may not decide approvals" in lines[0] and "no approver answered" not in lines[0]
        assert pending() == approval_id  # nothing decided
    finally:
        stop_up(cli, up)


def test_an_exit_90_tool_is_restarted_once_not_also_retried(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """Issue 19 item 7: with retry_on = ["exit"], an exit 90 (asks for an approval) is the approver's
    to restart after the decision; the watchdog does not retry it too (3 approvals for one question)."""
    from tests.test_approvals import wait_pending
    from tests.test_control import start_up, stop_up, wait_until

    (tmp_path / "corral.toml").write_text(
        '[watchdog]\nretry_on = ["exit"]\nretry_max_attempts = 2\nretry_backoff = "1s"\n'
    )
    cli.env["CORRAL_CONFIG"] = str(tmp_path / "corral.toml")
    up_process = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("tool", "--exit-for-approval", "--steps", "1"))
        assert wait_state(cli, execution_id, "exited")["exit_code"] == 90
        approval = wait_pending(cli, execution_id)
        cli("approve", approval["approval_id"], check=True)

        def children() -> list[dict]:
            return json.loads(
                cli(
                    "sql",
                    f"SELECT execution_id FROM executions WHERE retry_of = '{execution_id}'",
                    "--json",
                    check=True,
                ).stdout
            )

        [restart] = wait_until(children, 60, "the restart")  # type: ignore[misc]
        assert wait_state(cli, restart["execution_id"], "exited")["exit_code"] == 0
        scheduled = json.loads(
            cli(
                "sql",
                f"SELECT count(*) AS n FROM events WHERE execution_id = '{execution_id}' "
                "AND type = 'execution.retry_scheduled'",
                "--json",
                check=True,
            ).stdout
        )
        assert scheduled == [{"n": 0}]
        approvals = json.loads(cli("approvals", "--all", "--json", check=True).stdout)
        assert len([a for a in approvals if a["execution_id"] == execution_id]) == 1
        assert children() == [restart]
    finally:
        stop_up(cli, up_process)


def test_a_restarted_watchdog_does_not_retry_old_failures() -> None:
    """A failure recorded long before this watchdog started was decided under the settings then;
    one of a short outage (a restart) is still decided."""
    import time as _time

    from actors.watchdog import OLD_FAILURE_S, Watchdog, WatchdogSettings, _Ending

    watchdog = Watchdog(None, WatchdogSettings(retry_on=("exit",), retry_max_attempts=3))  # type: ignore[arg-type]
    now = _time.monotonic()
    old = _Ending("old00001", None, "old00001", 1, "exit", False, now - OLD_FAILURE_S - 3600)
    recent = _Ending("new00001", None, "new00001", 1, "exit", False, now - 5)
    assert not watchdog._retryable(old)
    assert watchdog._retryable(recent)


def test_help_lists_every_command_once_by_topic() -> None:
    import argparse

    from corral.cli import TOPICS, build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = [name for _, names in TOPICS for name in names]
    assert sorted(listed) == sorted(sub.choices), set(listed) ^ set(sub.choices)
    shown = parser.format_help()
    for topic, names in TOPICS:
        assert f"\n{topic}:\n" in shown
        assert all(f"\n  {name} " in shown for name in names)


def test_a_spawn_timed_out_execution_leaves_no_worktree(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    """Issue 19 item 14: cancelled (here by its spawn timeout) while its worktree is being made, an
    execution that never started gets no worktree and no branch."""
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\nsleep 4\n")  # `git worktree add` runs it: the add takes 4 s
    hook.chmod(0o755)
    execution_id = detach(cli, repo, "--spawn-timeout", "1s", *agent_command("--steps", "1", "--sleep", "0"))
    final = wait_state(cli, execution_id, "exited")
    assert final["exit_reason"] == "cancelled"
    kinds = [
        row["type"]
        for row in json.loads(
            cli(
                "sql", f"SELECT type FROM events WHERE execution_id = '{execution_id}' ORDER BY seq", "--json",
                check=True,
            ).stdout
        )
    ]  # fmt: skip
    assert "execution.started" not in kinds and "workspace.created" not in kinds, kinds
    assert not (cli.home / "worktrees" / execution_id).exists()
    branches = subprocess.run(
        ["git", "-C", str(repo), "branch", "--list", f"corral/{execution_id}"], capture_output=True, text=True
    ).stdout
    assert branches.strip() == ""


class _InotifyStarver:
    """Holds every inotify instance this user may open (EMFILE: the per-user limit), and takes any
    that another process frees meanwhile, until closed."""

    def __init__(self) -> None:
        import ctypes
        import threading

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.held: list[int] = []
        self._stop = threading.Event()
        self._grab()
        assert self.held, "no inotify instance could be taken at all"
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        import ctypes
        import os

        while len(self.held) < 100_000:
            fd = self._libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                assert ctypes.get_errno() in (24, 23), os.strerror(ctypes.get_errno())  # EMFILE / ENFILE
                return
            self.held.append(fd)
        raise AssertionError("inotify instances never ran out")

    def _keep(self) -> None:
        while not self._stop.wait(0.005):
            self._grab()

    def close(self) -> None:
        import os

        self._stop.set()
        self._thread.join()
        for fd in self.held:
            os.close(fd)


def _started_note(cli: Cli, execution_id: str) -> dict[str, object]:
    rows = json.loads(
        cli(
            "sql",
            f"SELECT data->'file_events' AS file_events, data->'warnings' AS warnings FROM events "
            f"WHERE execution_id = '{execution_id}' AND type = 'execution.started'",
            "--json",
            check=True,
        ).stdout
    )
    assert len(rows) == 1
    return {k: json.loads(v) if isinstance(v, str) else v for k, v in rows[0].items()}


def _touched(cli: Cli, execution_id: str) -> list[dict[str, str]]:
    return json.loads(
        cli(
            "sql",
            f"SELECT data->>'path' AS path, data->>'change' AS change, actor FROM events "
            f"WHERE execution_id = '{execution_id}' AND type = 'file.touched' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )


def test_the_spawner_watches_for_a_shim_without_inotify(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    """Issue 19, item 11: with every inotify instance of the user in use, a new agent's shim gets none;
    the spawner (which took one at its start) watches that agent's tree, so live file events still come."""
    starver = _InotifyStarver()
    try:
        starved = detach(cli, repo, *agent_command("--steps", "2", "--sleep", "1"))
        wait_state(cli, starved, "exited")
    finally:
        starver.close()
    assert _started_note(cli, starved) == {"file_events": True, "warnings": []}
    touched = _touched(cli, starved)
    paths = {row["path"] for row in touched}
    assert {"agent-output/step-1.txt", "agent-output/step-2.txt"} <= paths, touched
    assert all(row["actor"].startswith("spawner") for row in touched), touched
    shown = cli("status", starved, check=True).stdout
    assert "no live file events" not in shown, shown


def _agent_wrote_before_the_watch(repo: Path) -> int:
    """A tree where an agent created a file and changed a tracked one after its launch; the launch's time."""
    (repo / "tracked.txt").write_text("before\n")
    subprocess.run(["git", "add", "tracked.txt"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "tracked"], cwd=repo, check=True)
    (repo / "untouched.txt").write_text("checked out before the launch\n")
    spec_file = repo.parent / "spec.json"
    spec_file.write_text("{}")  # the launch: what changes after it is the agent's
    launched = spec_file.stat().st_ctime_ns
    while time.time_ns() <= launched + 20_000_000:  # past the file system clock's granularity
        time.sleep(0.005)
    (repo / "early").mkdir()
    (repo / "early" / "new.txt").write_text("written before the watch\n")
    (repo / "tracked.txt").write_text("changed before the watch\n")
    return launched


async def test_the_spawner_reports_what_an_agent_wrote_before_its_tree_was_taken(repo: Path) -> None:
    """The agent runs before its shim says it has no inotify: a file it wrote (or changed) before the
    spawner's watch was added is found by its change time and reported with the first batch."""
    from actors.filetakeover import FileTakeover

    launched = _agent_wrote_before_the_watch(repo)
    reported: list[tuple[str, str]] = []
    got = asyncio.Event()

    async def publish(execution_id: str, changes: list[tuple[str, str]]) -> None:
        assert execution_id == "e1"
        reported.extend(changes)
        got.set()

    takeover = FileTakeover(publish)
    try:
        assert takeover.take("e1", {"cwd": str(repo)}, started_after_ns=launched)
        await asyncio.wait_for(got.wait(), 10)
        await takeover.release("e1")
    finally:
        takeover.close()
    assert sorted(reported) == [("early/new.txt", "created"), ("tracked.txt", "modified")], reported


def test_no_live_file_events_is_said_on_the_execution(cli: Cli, repo: Path) -> None:
    """Issue 19, item 11: when neither the shim nor the spawner could get an inotify instance (the
    user's were all taken before `corral up` started), the execution says it has no live file events."""
    starver = _InotifyStarver()
    try:
        process = start_up(cli)
        try:
            starved = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "0"))
            wait_state(cli, starved, "exited")
        finally:
            stop_up(cli, process)
    finally:
        starver.close()
    note = _started_note(cli, starved)
    assert note["file_events"] is False
    assert any("inotify" in w and "max_user_instances" in w for w in note["warnings"]), note  # type: ignore[union-attr]
    shown = cli("status", starved, check=True).stdout
    assert "no live file events" in shown, shown

    process = start_up(cli)
    try:
        normal = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "0"))
        wait_state(cli, normal, "exited")
    finally:
        stop_up(cli, process)
    assert _started_note(cli, normal) == {"file_events": True, "warnings": []}
