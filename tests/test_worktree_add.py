"""actors/worktree.py on a real repository: worktrees of one repository added side by side (git races
on concurrent adds: the spawner's burst of spawns runs them so), and `locate`'s one-process lookup."""

import asyncio
import subprocess
from pathlib import Path

import pytest

from actors.errors import WorkspaceError
from actors.worktree import add_worktree, locate, remove_worktree, repo_root, resolve_commit
from tests.conftest import git


def test_many_worktrees_added_at_once_all_made(repo: Path, tmp_path: Path) -> None:
    commit = git(repo, "rev-parse", "HEAD")
    paths = [tmp_path / "worktrees" / f"w{i}" for i in range(40)]

    async def add_all() -> list[BaseException | None]:
        return await asyncio.gather(
            *(add_worktree(repo, path, branch=f"corral/w{i}", commit=commit) for i, path in enumerate(paths)),
            return_exceptions=True,
        )

    results = asyncio.run(add_all())
    assert [r for r in results if r is not None] == []
    listed = git(repo, "worktree", "list", "--porcelain")
    for i, path in enumerate(paths):
        assert (path / ".git").is_file()
        assert git(path, "rev-parse", "--abbrev-ref", "HEAD") == f"corral/w{i}"
        assert git(path, "rev-parse", "HEAD") == commit
        assert f"worktree {path}\n" in listed
    assert git(repo, "status", "--porcelain") == ""

    async def remove_all() -> None:
        await asyncio.gather(*(remove_worktree(repo, path, branch=f"corral/w{i}") for i, path in enumerate(paths)))

    asyncio.run(remove_all())
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert git(repo, "branch", "--list", "corral/*") == ""


def test_an_add_that_fails_for_another_reason_is_not_retried_and_says_why(repo: Path, tmp_path: Path) -> None:
    commit = git(repo, "rev-parse", "HEAD")
    taken = tmp_path / "worktrees" / "taken"  # (a path naming "worktrees", as the spawner's do)
    taken.mkdir(parents=True)
    (taken / "file").write_text("x")
    with pytest.raises(WorkspaceError, match="already exists"):
        asyncio.run(add_worktree(repo, taken, branch="corral/taken", commit=commit))


def test_locate_is_repo_root_and_resolve_commit_in_one(repo: Path, tmp_path: Path) -> None:
    sub = repo / "sub"
    sub.mkdir()
    assert locate(sub, "HEAD") == (repo_root(sub), resolve_commit(repo, "HEAD"))
    for path, ref in ((tmp_path / "nowhere", "HEAD"), (tmp_path, "HEAD"), (repo, "no-such-ref")):
        with pytest.raises(WorkspaceError) as found:
            locate(path, ref)
        with pytest.raises(WorkspaceError) as expected:
            resolve_commit(repo_root(path), ref)
        assert str(found.value) == str(expected.value)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    with pytest.raises(WorkspaceError, match="bare repository"):
        locate(bare, "HEAD")


def test_a_follow_ups_worktree_is_read_as_git_would(repo: Path, tmp_path: Path) -> None:
    """actors/spawner.existing_worktree reads the branch from the worktree's HEAD file (one git process,
    not two): the same branch and commit git names, and the same refusals (gone, detached)."""
    from actors.spawner import existing_worktree

    path = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "corral/abc", str(path))
    (path / "x.txt").write_text("x\n")
    git(path, "add", "x.txt")
    git(path, "commit", "-qm", "x")
    assert existing_worktree(path) == (path, "corral/abc", git(path, "rev-parse", "HEAD"))
    assert existing_worktree(path)[1] == git(path, "symbolic-ref", "--short", "HEAD")

    git(path, "checkout", "-q", "--detach")
    with pytest.raises(WorkspaceError, match="not a usable worktree"):
        existing_worktree(path)
    with pytest.raises(WorkspaceError, match="is gone"):
        existing_worktree(tmp_path / "no-such-worktree")
