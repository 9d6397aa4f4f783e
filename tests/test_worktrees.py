"""`corral worktrees` and `corral worktrees prune` end to end: real agents, real git, real event log."""

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from corral.config import ConfigError, parse_config
from tests.conftest import Cli, agent_command, commit_all, git


def run_agent(cli: Cli, repo: Path, *extra: str) -> tuple[str, Path]:
    """Run the example agent to its end; return its execution id and worktree."""
    result = cli("run", "--repo", str(repo), *agent_command("task", "--steps", "1", *extra), check=True)
    match = re.search(r"worktree (\S+) \(branch corral/(\w+)\)", result.stderr)
    assert match, result.stderr
    return match.group(2), Path(match.group(1))


def listing(cli: Cli, *args: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(cli("worktrees", *args, "--json", check=True).stdout)
    return {row["execution_id"]: row for row in rows}


def prune(cli: Cli, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    result = cli("worktrees", "prune", *args, "--json")
    outcomes = {o["execution_id"]: o for o in json.loads(result.stdout)} if result.stdout.strip() else {}
    return result.returncode, outcomes, result.stderr


def removed_events(cli: Cli) -> dict[str, dict[str, Any]]:
    rows = json.loads(
        cli(
            "sql", "SELECT execution_id, data FROM events WHERE type = 'workspace.removed'", "--json", check=True
        ).stdout
    )
    return {row["execution_id"]: json.loads(row["data"]) for row in rows}


def branches(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname)", "refs/heads").split())


def checkpoint_refs(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname)", "refs/corral").split())


def test_list_shows_state_disk_unmerged_and_uncommitted(cli: Cli, repo: Path) -> None:
    committed, committed_wt = run_agent(cli, repo)
    commit_all(committed_wt, "agent work")
    (committed_wt / "more.txt").write_text("not yet committed\n")
    clean, clean_wt = run_agent(cli, repo)
    commit_all(clean_wt, "clean work")
    git(repo, "merge", "-q", f"corral/{clean}")  # merged into main: nothing would be lost

    rows = listing(cli)
    assert set(rows) == {committed, clean}
    row = rows[committed]
    assert row["path"] == str(committed_wt)
    assert row["state"] == "exited"
    assert row["repo"] == str(repo)
    assert row["branch"] == f"corral/{committed}"
    assert row["exists"] is True
    assert row["disk_bytes"] > 0
    assert row["unmerged_commits"] == 1
    assert row["uncommitted_files"] == 1
    assert row["orphan"] == "execution exited"  # no live execution holds it
    assert rows[clean]["unmerged_commits"] == 0
    assert rows[clean]["uncommitted_files"] == 0

    table = cli("worktrees", check=True).stdout
    header, *lines = table.splitlines()
    assert header.split()[:6] == ["EXECUTION", "STATE", "AGE", "DISK", "UNMERGED", "UNCOMMITTED"]
    line = next(line for line in lines if line.startswith(committed))
    assert line.split()[1] == "exited" and line.split()[4:6] == ["1", "1"]


def test_orphans_unknown_dirs_and_registrations_whose_dir_is_gone(cli: Cli, repo: Path) -> None:
    finished, finished_wt = run_agent(cli, repo)
    git(finished_wt, "clean", "-fdq")  # the agent's untracked output would make prune refuse
    gone, gone_wt = run_agent(cli, repo)
    subprocess.run(["rm", "-rf", str(gone_wt)], check=True)  # deleted by hand: git still registers it
    stray = "zz9stray"
    stray_wt = cli.home / "worktrees" / stray
    git(repo, "worktree", "add", "-q", "-b", f"corral/{stray}", str(stray_wt))  # a worktree the log never saw
    (cli.home / "worktrees" / "NOT-AN-ID").mkdir()  # not Corral's: ignored
    plain = cli.home / "worktrees" / "zz9bare0"  # no longer a git worktree: what it holds is unknown
    plain.mkdir()
    (plain / "only-copy.txt").write_text("precious\n")

    rows = listing(cli, "--orphans")
    assert set(rows) == {finished, gone, stray, "zz9bare0"}
    assert rows["zz9bare0"]["problem"].startswith("not a working git worktree")
    assert rows[finished]["orphan"] == "execution exited"
    assert rows[stray]["orphan"] == "unknown to the event log"
    assert rows[stray]["state"] == "unknown"
    assert rows[stray]["repo"] == str(repo)
    assert rows[gone]["exists"] is False
    assert rows[gone]["orphan"].startswith("directory is gone")
    assert rows[gone]["branch"] == f"corral/{gone}"

    # Pruning removes all three: the stray worktree and its branch, the stale registration and its branch.
    code, outcomes, _ = prune(cli, "--older-than", "0")
    assert code == 1
    assert {k: o["action"] for k, o in outcomes.items()} == {
        finished: "removed",
        gone: "removed",
        stray: "removed",
        "zz9bare0": "refused",
    }
    assert "its files may be the only copy" in outcomes["zz9bare0"]["reason"]
    assert (plain / "only-copy.txt").is_file()
    assert not stray_wt.exists() and not finished_wt.exists()
    assert branches(repo) == {"refs/heads/main"}
    assert "worktrees" not in git(repo, "worktree", "list")
    assert set(listing(cli)) == {"zz9bare0"}
    code, outcomes, _ = prune(cli, "--older-than", "0", "--force")
    assert code == 0
    assert outcomes["zz9bare0"]["action"] == "removed"
    assert outcomes["zz9bare0"]["forced"] is True
    assert not plain.exists()
    assert listing(cli) == {}
    assert (cli.home / "worktrees" / "NOT-AN-ID").is_dir()


def test_prune_refuses_work_that_exists_nowhere_else_unless_forced(cli: Cli, repo: Path) -> None:
    unmerged, unmerged_wt = run_agent(cli, repo)
    commit = commit_all(unmerged_wt, "agent work")
    dirty, dirty_wt = run_agent(cli, repo)
    git(dirty_wt, "clean", "-fdq")
    (dirty_wt / "notes.txt").write_text("uncommitted\n")
    clean, clean_wt = run_agent(cli, repo)
    git(clean_wt, "clean", "-fdq")  # nothing left of the agent's untracked output
    checkpointed, checkpointed_wt = run_agent(cli, repo)
    git(checkpointed_wt, "clean", "-fdq")
    (checkpointed_wt / "cp.txt").write_text("checkpointed\n")
    kept = commit_all(checkpointed_wt, "on the branch and a checkpoint ref only")
    git(repo, "update-ref", f"refs/corral/{checkpointed}/99", kept)
    before = branches(repo)
    checkpoints_before = checkpoint_refs(repo)

    dry_code, dry, _ = prune(cli, "--older-than", "0", "--dry-run")
    assert dry_code == 1
    assert dry[clean]["action"] == "would-remove"
    assert branches(repo) == before and clean_wt.is_dir()
    assert removed_events(cli) == {}

    code, outcomes, _ = prune(cli, "--older-than", "0")
    assert code == 1  # something was refused
    assert outcomes[clean]["action"] == "removed"
    assert outcomes[clean]["forced"] is False
    assert outcomes[unmerged]["action"] == "refused"
    assert f"1 commit on corral/{unmerged} not merged into any branch, tag or remote" in outcomes[unmerged]["reason"]
    assert f"corral pr {unmerged}" in outcomes[unmerged]["reason"]
    assert "--force" in outcomes[unmerged]["reason"]
    assert outcomes[dirty]["action"] == "refused"
    assert "1 uncommitted file in" in outcomes[dirty]["reason"]
    assert f"corral commit {dirty} -m MSG" in outcomes[dirty]["reason"]
    # A checkpoint ref (refs/corral/<id>/N) reaching the commit does not make it merged.
    assert outcomes[checkpointed]["action"] == "refused"
    assert outcomes[checkpointed]["details"]["unmerged_commits"] == 1
    assert unmerged_wt.is_dir() and dirty_wt.is_dir() and checkpointed_wt.is_dir() and not clean_wt.exists()
    assert f"refs/heads/corral/{unmerged}" in branches(repo)
    assert f"refs/heads/corral/{clean}" not in branches(repo)
    assert removed_events(cli) == {clean: {"path": str(clean_wt), "forced": False}}

    # The human report names each refusal and what to do.
    text = cli("worktrees", "prune", "--older-than", "0")
    assert text.returncode == 1
    assert f"REFUSED  {unmerged}" in text.stdout and f"REFUSED  {dirty}" in text.stdout
    assert "refused 3 holding work" in text.stderr

    # Once merged, the commits exist elsewhere: the worktree goes without --force.
    git(repo, "merge", "-q", f"corral/{unmerged}")
    code, outcomes, _ = prune(cli, "--older-than", "0")
    assert outcomes[unmerged]["action"] == "removed"
    assert git(repo, "rev-parse", "HEAD") == commit

    code, outcomes, _ = prune(cli, "--older-than", "0", "--force")
    assert code == 0
    assert outcomes[dirty] | {"action": "removed", "forced": True} == outcomes[dirty]
    assert outcomes[checkpointed]["forced"] is True
    assert not dirty_wt.exists() and not checkpointed_wt.exists()
    # Branches are gone; checkpoint refs stay (forks remain possible).
    assert branches(repo) == {"refs/heads/main"}
    assert f"refs/corral/{checkpointed}/99" in checkpoint_refs(repo)
    assert checkpoint_refs(repo) >= checkpoints_before
    events = removed_events(cli)
    assert events[dirty] == {"path": str(dirty_wt), "forced": True}
    assert events[unmerged] == {"path": str(unmerged_wt), "forced": False}
    projected = json.loads(
        cli("sql", "SELECT execution_id, workspace_removed FROM executions", "--json", check=True).stdout
    )
    assert all(row["workspace_removed"] for row in projected)


def test_retention_from_config_and_older_than(cli: Cli, repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('[worktrees]\nretention = "1h"\n')
    cli.env["CORRAL_CONFIG"] = str(config)
    execution_id, worktree = run_agent(cli, repo)
    git(worktree, "clean", "-fdq")

    code, outcomes, _ = prune(cli)
    assert code == 0
    assert outcomes[execution_id]["action"] == "kept"
    assert "within the retention of 1h" in outcomes[execution_id]["reason"]
    assert worktree.is_dir()

    bad = cli("worktrees", "prune", "--older-than", "soon")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "corral: error: --older-than: expected a duration like 30s, 10m, 2h (got 'soon')"
    ]
    assert worktree.is_dir()

    config.write_text('[worktrees]\nretention = "0s"\n')
    code, outcomes, _ = prune(cli)
    assert outcomes[execution_id]["action"] == "removed"
    assert not worktree.exists()

    config.write_text('[worktrees]\nretention = "forever"\n')
    broken = cli("worktrees")
    assert broken.returncode == 2
    assert "worktrees.retention: expected a duration" in broken.stderr


def test_running_execution_is_never_touched(cli: Cli, repo: Path) -> None:
    up = cli.popen("up")
    try:
        deadline = time.monotonic() + 30
        runtime = cli.home / "runtime.json"
        while not (runtime.exists() and json.loads(runtime.read_text()).get("ready")):
            assert time.monotonic() < deadline, "corral up did not start"
            time.sleep(0.05)
        execution_id = cli(
            "run", "--repo", str(repo), "--detach", *agent_command("wait", "--steps", "1", "--read-input"), check=True
        ).stdout.strip()
        worktree = cli.home / "worktrees" / execution_id
        while True:
            status = json.loads(cli("status", execution_id, "--json", check=True).stdout)
            if status["state"] == "running":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        (worktree / "scratch.txt").write_text("agent at work\n")

        rows = listing(cli)
        assert rows[execution_id]["state"] == "running"
        assert rows[execution_id]["orphan"] is None
        assert listing(cli, "--orphans") == {}

        code, outcomes, _ = prune(cli, "--older-than", "0", "--force")
        assert code == 0
        assert outcomes[execution_id]["action"] == "skipped"
        assert outcomes[execution_id]["reason"] == "execution running"
        assert (worktree / "scratch.txt").is_file()
        cli("input", execution_id, "quit", check=True)
    finally:
        up.terminate()
        up.wait(timeout=60)


def test_worktrees_and_forge_config_sections() -> None:
    config = parse_config(
        '[worktrees]\nretention = "2d"\n'
        '[forge]\nbase_url = "http://127.0.0.1:9/api/"\nrepo = "acme/widgets"\ntoken_env = "ACME_TOKEN"\n'
    )
    assert config.worktrees.retention_s == 2 * 86400
    assert config.forge.base_url == "http://127.0.0.1:9/api"
    assert config.forge.repo == "acme/widgets"
    assert config.forge.token_env == "ACME_TOKEN"
    assert config.forge.remote == "origin"
    defaults = parse_config("")
    assert defaults.worktrees.retention_s == 7 * 86400
    assert defaults.forge.base_url == "https://api.github.com"
    assert defaults.forge.token_env == "GITHUB_TOKEN"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[worktrees]\nretention = "soon"\n', "corral.toml: worktrees.retention: expected a duration like 30s"),
        ("[worktrees]\nkeep = 1\n", "corral.toml: unknown key worktrees.keep (known: retention)"),
        ('[forge]\nrepo = "widgets"\n', "corral.toml: forge.repo: expected owner/name (got 'widgets')"),
        ('[forge]\nbase_url = "ftp://x"\n', "corral.toml: forge.base_url: expected an http:// or https:// URL"),
        ('[forge]\ntoken = "ghp_x"\n', "corral.toml: unknown key forge.token (did you mean token_env?)"),
        ('[forge]\ntoken_env = "MY TOKEN"\n', "corral.toml: forge.token_env: expected the name of an environment"),
    ],
)
def test_bad_worktrees_and_forge_config(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.message.startswith(message)
