"""actors/worktree.py on a real repository: worktrees of one repository added side by side (git races
on concurrent adds: the spawner's burst of spawns runs them so), and `locate`'s one-process lookup."""

import asyncio
import subprocess
import threading
from pathlib import Path

import pytest

from actors import gitrun
from actors.errors import WorkspaceError
from actors.worktree import add_directly, add_worktree, locate, remove_worktree, repo_root, resolve_commit
from tests.conftest import git

HOOK = '#!/bin/sh\necho "$@" >> "$(git rev-parse --git-common-dir)/post-checkout-ran"\n'


def with_hook(repo: Path) -> None:
    """A post-checkout hook: `git worktree add` runs it, so the worktrees are added by git itself."""
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(HOOK)
    hook.chmod(0o755)


@pytest.mark.parametrize("by_git", [False, True], ids=["direct", "git-worktree-add"])
def test_many_worktrees_added_at_once_all_made(repo: Path, tmp_path: Path, by_git: bool) -> None:
    """Side by side, made directly, or by `git worktree add` (its races with other adds are tried again)."""
    if by_git:
        with_hook(repo)
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
    ran = (repo / ".git" / "post-checkout-ran").read_text().splitlines() if by_git else []
    assert len(ran) == (len(paths) if by_git else 0)

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
    # its commit comes from the loose ref file (no git process); packed, git is asked: the same answer
    from actors.spawner import _loose_ref

    assert _loose_ref(path, "corral/abc") == git(path, "rev-parse", "HEAD")
    git(repo, "pack-refs", "--all")
    assert _loose_ref(path, "corral/abc") is None
    assert existing_worktree(path) == (path, "corral/abc", git(path, "rev-parse", "HEAD"))
    (path / "y.txt").write_text("y\n")
    git(path, "add", "y.txt")
    git(path, "commit", "-qm", "y")  # a loose ref again, ahead of the packed one
    assert existing_worktree(path) == (path, "corral/abc", git(path, "rev-parse", "HEAD"))
    assert _loose_ref(path, "../../HEAD") is None  # a name that is no plain path under refs/heads

    git(path, "checkout", "-q", "--detach")
    with pytest.raises(WorkspaceError, match="not a usable worktree"):
        existing_worktree(path)
    with pytest.raises(WorkspaceError, match="is gone"):
        existing_worktree(tmp_path / "no-such-worktree")


def test_a_worktree_made_directly_is_the_one_git_makes(repo: Path, tmp_path: Path) -> None:
    """add_directly (one git process) leaves what `git worktree add -b` leaves: the registration's
    files, the worktree's `.git`, its branch at the commit with a reflog, its files, a clean status;
    git lists, removes and prunes it. Where git would do more (a post-checkout hook) it declines."""

    commit = git(repo, "rev-parse", "HEAD")
    (repo / "sub").mkdir()
    (repo / "sub" / "tool.sh").write_text("#!/bin/sh\n")
    (repo / "sub" / "tool.sh").chmod(0o755)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "more")
    commit = git(repo, "rev-parse", "HEAD")
    made, by_git = tmp_path / "worktrees" / "direct1", tmp_path / "worktrees" / "bygit1"
    made.parent.mkdir()
    assert add_directly(repo, made, "corral/direct1", commit)
    git(repo, "worktree", "add", "--quiet", "-b", "corral/bygit1", str(by_git), commit)
    meta = repo / ".git" / "worktrees"
    for name in ("gitdir", "commondir", "HEAD"):
        ours = (meta / "direct1" / name).read_text()
        assert ours == (meta / "bygit1" / name).read_text().replace("bygit1", "direct1")
    assert not (meta / "direct1" / "locked").exists()
    assert (made / ".git").read_text() == (by_git / ".git").read_text().replace("bygit1", "direct1")
    assert git(made, "rev-parse", "--abbrev-ref", "HEAD") == "corral/direct1"
    assert git(made, "rev-parse", "HEAD") == git(repo, "rev-parse", "corral/direct1") == commit
    assert git(made, "reflog", "show", "--format=%H", "corral/direct1") == commit
    assert git(made, "status", "--porcelain") == ""
    assert (made / "sub" / "tool.sh").stat().st_mode & 0o111
    assert git(made, "ls-files", "-s") == git(by_git, "ls-files", "-s")
    listed = git(repo, "worktree", "list", "--porcelain")
    assert f"worktree {made}\nHEAD {commit}\nbranch refs/heads/corral/direct1\n" in listed + "\n"
    # refused, nothing left: an existing path, an existing branch, a post-checkout hook
    assert not add_directly(repo, made, "corral/direct2", commit)
    assert not add_directly(repo, tmp_path / "worktrees" / "direct3", "corral/direct1", commit)
    with_hook(repo)
    assert not add_directly(repo, tmp_path / "worktrees" / "direct4", "corral/direct4", commit)
    assert sorted(p.name for p in meta.iterdir()) == ["bygit1", "direct1"]
    assert sorted(p.name for p in made.parent.iterdir()) == ["bygit1", "direct1"]
    assert git(repo, "branch", "--list", "corral/*").split() == ["+", "corral/bygit1", "+", "corral/direct1"]
    asyncio.run(remove_worktree(repo, made, branch="corral/direct1"))
    assert not made.exists() and not (meta / "direct1").exists()
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 2


def test_a_direct_add_that_fails_leaves_nothing(repo: Path, tmp_path: Path) -> None:
    """A commit git cannot check out: nothing is left (registration, directory, branch), and the
    add through git says why."""

    path = tmp_path / "worktrees" / "broken"
    path.parent.mkdir()
    missing = "0" * 39 + "1"
    assert not add_directly(repo, path, "corral/broken", missing)
    assert not path.exists() and not (repo / ".git" / "worktrees" / "broken").exists()
    assert git(repo, "branch", "--list", "corral/*") == ""
    with pytest.raises(WorkspaceError):
        asyncio.run(add_worktree(repo, path, branch="corral/broken", commit=missing))


def test_lookups_waiting_together_share_one_call_and_a_started_one_is_not_joined(repo: Path) -> None:
    """gitrun.shared: lookups of one key waiting in the spawn pool make one call (a burst's requests
    of one repository: one `git rev-parse`); a caller that comes once the call has started (it may
    have read the ref already) makes its own."""
    calls: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def counted(path: Path, ref: str) -> tuple[Path, str]:
        calls.append(ref)
        return locate(path, ref)

    def held(path: Path, ref: str) -> tuple[Path, str]:
        calls.append(ref)
        inside.set()
        release.wait(10)
        return locate(path, ref)

    async def scenario() -> None:
        gate = threading.Event()
        blockers = [gitrun.call(gate.wait, 10) for _ in range(gitrun.WORKERS["spawn"])]  # the pool is busy
        waiting = [asyncio.ensure_future(gitrun.shared(("locate", 1), counted, repo, "HEAD")) for _ in range(5)]
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(*blockers)
        found = await asyncio.gather(*waiting)
        assert found == [locate(repo, "HEAD")] * 5
        assert calls == ["HEAD"]
        first = asyncio.ensure_future(gitrun.shared(("locate", 2), held, repo, "HEAD"))
        await asyncio.to_thread(inside.wait, 10)  # started: a later caller is not joined to it
        second = asyncio.ensure_future(gitrun.shared(("locate", 2), counted, repo, "HEAD"))
        await asyncio.sleep(0.1)
        release.set()
        assert await first == await second == locate(repo, "HEAD")
        assert calls == ["HEAD"] * 3

    asyncio.run(scenario())
