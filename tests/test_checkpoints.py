"""Checkpoints, live file events, changes, diff, commit and rollback, through the CLI on real git."""

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, agent_command, git
from tests.test_control import start_up, stop_up, wait_until


def run_detached(cli: Cli, repo: Path, *agent_args: str) -> str:
    return cli("run", "--detach", "--repo", str(repo), *agent_command(*agent_args), check=True).stdout.strip()


def checkpoints(cli: Cli, execution_id: str) -> list[dict]:
    return json.loads(cli("checkpoints", execution_id, "--json", check=True).stdout)


def stored(cli: Cli, execution_id: str) -> list[dict]:
    """Every event of the execution, read from the log through `corral sql` once projected."""
    result = cli(
        "sql",
        f"SELECT type, actor, causation_id, data FROM events WHERE execution_id = '{execution_id}' ORDER BY seq",
        "--json",
        check=True,
    )
    rows = json.loads(result.stdout)
    for row in rows:
        row["data"] = json.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
    return rows


def worktree_of(cli: Cli, execution_id: str) -> Path:
    return cli.home / "worktrees" / execution_id


def test_exit_checkpoint_chain_changes_and_diff(cli: Cli, repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    run = cli("run", "--repo", str(repo), *agent_command("--steps", "3", "--sleep", "0"))
    assert run.returncode == 0, run.stderr
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
    chain = checkpoints(cli, execution_id)
    assert [cp["n"] for cp in chain] == [1]
    first = chain[0]
    assert first["trigger"] == "exit"
    assert first["parent"] == base
    assert first["ref"] == f"refs/corral/{execution_id}/1"
    assert git(repo, "rev-parse", first["ref"]) == first["commit"]
    assert git(repo, "rev-parse", f"{first['commit']}^{{tree}}") == first["tree"]
    assert sorted(f["path"] for f in first["files"]) == [
        "NOTES.md",
        "agent-output/step-1.txt",
        "agent-output/step-2.txt",
        "agent-output/step-3.txt",
    ]
    worktree = worktree_of(cli, execution_id)
    # The agent's own HEAD and index were not touched: its files are still untracked there.
    assert git(worktree, "rev-parse", "HEAD") == base
    assert git(worktree, "diff", "--cached", "--name-only") == ""
    assert "?? NOTES.md" in git(worktree, "status", "--porcelain")

    changes = json.loads(cli("changes", execution_id, "--json", check=True).stdout)
    assert {c["path"]: (c["status"], c["added"], c["deleted"]) for c in changes}["NOTES.md"] == ("A", 3, 0)
    diff = cli("diff", execution_id, "NOTES.md", check=True).stdout
    assert "+Done: say hello" in diff
    assert "step-1" not in diff

    # Nothing changed since: no empty checkpoint.
    again = cli("checkpoint", execution_id)
    assert again.returncode == 0, again.stderr
    assert "nothing changed since checkpoint 1" in again.stderr
    assert len(checkpoints(cli, execution_id)) == 1

    # The user edits the worktree; an on-demand checkpoint chains onto the first.
    (worktree / "NOTES.md").write_text("# Notes\n\nEdited by hand\n")
    taken = json.loads(cli("checkpoint", execution_id, "--json", check=True).stdout)["data"]
    assert (taken["n"], taken["trigger"], taken["parent"]) == (2, "demand", first["commit"])
    assert [(f["path"], f["added"], f["deleted"]) for f in taken["files"]] == [("NOTES.md", 1, 1)]
    since = json.loads(cli("changes", execution_id, "--since", "1", "--json", check=True).stdout)
    assert [c["path"] for c in since] == ["NOTES.md"]
    between = cli("diff", execution_id, "--from", "1", "--to", "2", check=True).stdout
    assert "-Done: say hello" in between
    assert "+Edited by hand" in between


def test_bad_input_is_one_clear_error_and_changes_nothing(cli: Cli, repo: Path) -> None:
    run = cli("run", "--repo", str(repo), *agent_command("--steps", "1", "--sleep", "0"))
    assert run.returncode == 0, run.stderr
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
    worktree = worktree_of(cli, execution_id)
    before = git(worktree, "status", "--porcelain")
    cases = [
        (("diff", execution_id, "--from", "7"), "has no checkpoint 7"),
        (("diff", execution_id, "--from", "x"), "not a checkpoint number"),
        (("rollback", execution_id, "--to", "9"), "has no checkpoint 9"),
        (("rollback", execution_id, "/etc/passwd"), "outside the worktree"),
        (("rollback", execution_id, ".git/config"), "inside .git"),
        (("diff", execution_id, "../../x"), "outside the worktree"),
        (("commit", execution_id, "-m", " "), "commit message is empty"),
        (("checkpoints", "zzzzzzzz"), "no execution matches"),
        (("changes", "not-an-id!"), "is not an execution id"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert message in lines[0], (args, lines[0])
    assert git(worktree, "status", "--porcelain") == before
    assert len(checkpoints(cli, execution_id)) == 1


def test_live_files_demand_pause_rollback_and_commit_of_a_running_agent(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        execution_id = run_detached(cli, repo, "--steps", "2", "--sleep", "0", "--read-input")
        worktree = worktree_of(cli, execution_id)
        # Live file stream: the agent's writes show up as file.touched while it runs.
        touched = cli("tap", f"corral.evt.{execution_id}.file.>", "--since", "all", "--limit", "2", timeout=60)
        paths = {json.loads(line)["data"]["path"] for line in touched.stdout.splitlines()}
        assert paths == {"agent-output/step-1.txt", "agent-output/step-2.txt"}

        first = json.loads(cli("checkpoint", execution_id, "--json", check=True).stdout)["data"]
        assert (first["n"], first["trigger"]) == (1, "demand")

        cli("input", execution_id, "first line", check=True)
        wait_until(lambda: (worktree / "inputs.txt").exists(), 30, "inputs.txt")
        (worktree / "agent-output" / "step-1.txt").write_text("changed after checkpoint 1\n")

        # Pausing checkpoints what changed since.
        cli("pause", execution_id, check=True)
        paused = wait_until(lambda: [c for c in checkpoints(cli, execution_id) if c["trigger"] == "pause"], 30)
        assert {f["path"] for f in paused[0]["files"]} == {"inputs.txt", "agent-output/step-1.txt"}  # type: ignore[index]
        cli("resume", execution_id, check=True)

        # Per-file rollback: only the named file goes back; the rest stays.
        one = json.loads(
            cli("rollback", execution_id, "--to", "1", "agent-output/step-1.txt", "--json", check=True).stdout
        )["data"]
        assert one["paths"] == ["agent-output/step-1.txt"]
        assert (worktree / "agent-output" / "step-1.txt").read_text().startswith("task: say hello")
        assert (worktree / "inputs.txt").exists()

        # Full rollback of the running agent: paused, restored (the file created after is removed),
        # checkpointed, resumed.
        full = json.loads(cli("rollback", execution_id, "--to", "1", "--json", check=True).stdout)["data"]
        assert not (worktree / "inputs.txt").exists()
        assert full["to_checkpoint"] == 1
        chain = checkpoints(cli, execution_id)
        assert full["checkpoint"] == chain[-1]["n"]
        assert chain[-1]["tree"] == first["tree"]
        status = json.loads(cli("status", execution_id, "--json", check=True).stdout)
        assert status["state"] == "running"
        events = stored(cli, execution_id)
        pauses = [e for e in events if e["type"] == "pause.requested" and e["actor"].startswith("checkpointer")]
        assert pauses, "the rollback paused the agent through the spawner"
        assert [e["type"] for e in events].count("change.rolled_back") == 2

        # The agent still works after the rollback, and a real commit lands on its branch.
        cli("input", execution_id, "after rollback", check=True)
        wait_until(lambda: (worktree / "inputs.txt").exists(), 30, "inputs.txt again")
        committed = json.loads(
            cli("commit", execution_id, "-m", "agent output", "agent-output", "--json", check=True).stdout
        )["data"]
        assert git(repo, "rev-parse", f"corral/{execution_id}") == committed["commit"]
        assert git(repo, "show", "--name-only", "--format=%s", committed["commit"]).splitlines() == [
            "agent output",
            "",
            "agent-output/step-1.txt",
            "agent-output/step-2.txt",
        ]
        nothing = cli("commit", execution_id, "-m", "again", "agent-output")
        assert nothing.returncode != 0
        assert "nothing to commit" in nothing.stderr

        cli("input", execution_id, "quit", check=True)
        wait_until(lambda: any(c["trigger"] == "exit" for c in checkpoints(cli, execution_id)), 30, "exit checkpoint")
        numbers = [c["n"] for c in checkpoints(cli, execution_id)]
        assert numbers == list(range(1, len(numbers) + 1))
    finally:
        stop_up(cli, up)


def test_files_and_interval_triggers(cli: Cli, repo: Path) -> None:
    (cli.home).mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text('[checkpoints]\nafter_files = 3\ninterval = "1s"\ndebounce = "0.2s"\n')
    up = start_up(cli)
    try:
        execution_id = run_detached(cli, repo, "--steps", "4", "--sleep", "0", "--read-input")
        wait_until(lambda: checkpoints(cli, execution_id), 30, "a checkpoint after 3 files")
        assert checkpoints(cli, execution_id)[0]["trigger"] in ("files", "interval")
        worktree = worktree_of(cli, execution_id)
        (worktree / "late.txt").write_text("one file, below after_files\n")
        late = wait_until(
            lambda: [c for c in checkpoints(cli, execution_id) if "late.txt" in {f["path"] for f in c["files"]}], 30
        )
        assert late[0]["trigger"] == "interval"  # type: ignore[index]
        cli("cancel", execution_id, "--grace", "1", check=True)
    finally:
        stop_up(cli, up)


def test_rollback_refused_when_the_agent_cannot_be_paused(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    execution_id = run_detached(cli, repo, "--steps", "1", "--sleep", "0", "--read-input")
    worktree = worktree_of(cli, execution_id)
    wait_until(lambda: (worktree / "agent-output" / "step-1.txt").exists(), 30, "step-1.txt")
    cli("checkpoint", execution_id, check=True)
    (worktree / "NOTES.md").write_text("work in progress\n")
    up.send_signal(signal.SIGKILL)  # the spawner is gone; the agent (under its shim) runs on
    up.wait()
    try:
        result = cli("rollback", execution_id, "--to", "0", timeout=90)
        assert result.returncode != 0
        assert "cannot pause the agent" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert (worktree / "NOTES.md").read_text() == "work in progress\n"
        assert (worktree / "agent-output").exists()
    finally:
        up = start_up(cli)  # adopts the agent again
        cli("cancel", execution_id, "--grace", "1")
        stop_up(cli, up)


@pytest.mark.parametrize("n", [0])
def test_rollback_to_base_of_a_finished_execution(cli: Cli, repo: Path, n: int) -> None:
    run = cli("run", "--repo", str(repo), *agent_command("--steps", "2", "--sleep", "0"))
    assert run.returncode == 0, run.stderr
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
    worktree = worktree_of(cli, execution_id)
    result = json.loads(cli("rollback", execution_id, "--to", str(n), "--json", check=True).stdout)["data"]
    assert not (worktree / "agent-output").exists()
    assert not (worktree / "NOTES.md").exists()
    assert git(worktree, "status", "--porcelain") == ""
    assert result["checkpoint"] == 2
    # The state before the rollback is checkpoint 1: nothing is lost.
    assert "agent-output/step-2.txt" in git(
        repo, "ls-tree", "-r", "--name-only", checkpoints(cli, execution_id)[0]["ref"]
    )


def test_a_finished_run_that_changed_nothing_is_not_checked_again_at_each_start(cli: Cli, repo: Path) -> None:
    """An exit checkpoint that found nothing changed leaves no checkpoint.created: the checkpointer
    marks it on this host, so a later start does not take that exit checkpoint again (every start
    of `corral run` and `corral up` did so for every finished worktree: ~0.2 s of a short run's stop)."""
    done = cli("run", "--repo", str(repo), "--", "sh", "-c", "echo nothing changed")
    assert done.returncode == 0, done.stderr
    up = start_up(cli)
    try:

        def checkpointer() -> dict | None:
            report = json.loads(cli("health", "--json", check=True).stdout)
            found = [a for a in report["actors"] if a["actor"] == "checkpointer" and a["alive"] and a.get("caught_up")]
            return found[0] if found else None

        record = wait_until(checkpointer, 30, "the checkpointer of corral up to have read the log")
        assert record["tracked"] >= 1  # type: ignore[index]
        assert record["exits_caught_up"] == 0  # type: ignore[index]
    finally:
        stop_up(cli, up)


@pytest.mark.parametrize("max_file_bytes", [0, 50 << 20])
def test_a_snapshot_stages_only_when_git_would_find_something(repo: Path, tmp_path: Path, max_file_bytes: int) -> None:
    """actors/checkpoints.snapshot_tree_skipping skips `git add -A` when `ls-files --others --modified`
    lists nothing: the tree is still exactly the worktree's, for a deletion, a new file, a mode
    change and a change staged by the agent itself (its own index, not the scratch one)."""
    from actors.checkpoints import snapshot_tree_skipping

    path = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "corral/snap", str(path))
    index = tmp_path / "scratch" / "index"

    def snapshot() -> str:
        tree, skipped = asyncio.run(snapshot_tree_skipping(path, index, max_file_bytes=max_file_bytes))
        assert skipped == []
        return tree

    def truth() -> str:  # the worktree as a fresh index of its own stages it
        env = {**os.environ, "GIT_INDEX_FILE": str(tmp_path / f"truth-{len(os.listdir(tmp_path))}")}
        subprocess.run(["git", "add", "-A"], cwd=path, env=env, check=True)
        return subprocess.run(
            ["git", "write-tree"], cwd=path, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    assert snapshot() == git(path, "rev-parse", "HEAD^{tree}")  # nothing changed
    tracked = [p for p in git(path, "ls-files").splitlines() if p]
    (path / tracked[0]).unlink()
    assert snapshot() == truth() != git(path, "rev-parse", "HEAD^{tree}")
    (path / "new.txt").write_text("new\n")
    assert snapshot() == truth()
    assert snapshot() == truth()  # again, nothing more changed: the same tree
    (path / "new.txt").chmod(0o755)
    assert snapshot() == truth()
    (path / "staged.txt").write_text("staged\n")
    git(path, "add", "staged.txt")  # the agent's own index
    assert snapshot() == truth()


def test_a_commits_tree_is_asked_of_git_once(repo: Path, tmp_path: Path) -> None:
    """tree_of remembers the tree of a commit named by its full id (a hash of it: the same forever),
    so a burst's first checkpoints from one base commit ask git once; a name (HEAD) is asked each time."""
    from actors.checkpoints import CheckpointError, tree_of

    commit = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    assert asyncio.run(tree_of(repo, commit)) == tree
    elsewhere = tmp_path / "not-a-repository"
    elsewhere.mkdir()
    assert asyncio.run(tree_of(elsewhere, commit)) == tree  # remembered: git (which would fail here) not asked
    with pytest.raises(CheckpointError):
        asyncio.run(tree_of(elsewhere, "HEAD"))
