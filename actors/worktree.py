"""Git worktrees: one per execution, on branch corral/<id>, created and removed with plain git.

A worktree with a disk limit is first made the mount point of its own file system of that size
(actors/diskquota.py), then checked out into; removing the worktree removes that file system.
"""

import asyncio
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Final

from actors import diskquota, gitrun
from actors.errors import WorkspaceError
from actors.gitdir import linked_gitdir as linked_gitdir  # (its home was here: imported from here too)

# A `git worktree add` reads every other worktree's metadata; one being added at the same moment may
# be half-written, and git then stops with "failed to read .git/worktrees/NAME/commondir" before it
# made anything of its own. Adds of one repository run side by side (a burst of spawns would wait
# ~15-50 ms per add in a queue otherwise), and one that lost this race is tried again.
RACE_MARK: Final = "fatal: failed to read "  # ... .git/worktrees/NAME/commondir (or gitdir)
ADD_ATTEMPTS: Final = 8


async def git(*args: str, cwd: str | Path, pool: gitrun.Pool = "bookkeeping") -> str:
    """Run git (in a thread: actors/gitrun.py) and return its stdout; raise WorkspaceError with git's
    own message on failure."""
    code, out, err = await gitrun.run(["git", *args], cwd=cwd, pool=pool)
    if code != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise WorkspaceError(str(cwd), message[-1] if message else f"git {args[0]} failed")
    return out.decode().strip()


def _raise_if_interrupted(returncode: int) -> None:
    """git killed by the Ctrl-C that reached its whole process group is the user's interrupt, not a
    verdict on the repository."""
    if returncode == -signal.SIGINT:
        raise KeyboardInterrupt


def repo_root(path: str | Path) -> Path:
    """Return the top level of the git repository at path, or raise WorkspaceError."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise WorkspaceError(str(path), "is a file, not a directory: pass the repository's directory")
    if not target.is_dir():
        raise WorkspaceError(str(path), "no such directory")
    result = subprocess.run(
        ["git", "-C", str(target), "rev-parse", "--is-bare-repository", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=False,
    )
    _raise_if_interrupted(result.returncode)
    if result.stdout.startswith("true"):
        raise WorkspaceError(
            str(path), "is a bare repository; agents need a working tree: clone it (git clone PATH DIR) and pass DIR"
        )
    if result.returncode != 0:
        raise WorkspaceError(str(path), "not a git repository (git init it, or pass --repo)")
    return Path(result.stdout.splitlines()[-1].strip()).resolve()


def resolve_commit(repo: str | Path, ref: str) -> str:
    """Return the commit a ref names in repo, or raise WorkspaceError."""
    result = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    _raise_if_interrupted(result.returncode)
    if result.returncode != 0:
        hint = " (the repository has no commits yet)" if ref == "HEAD" else ""
        raise WorkspaceError(str(repo), f"no commit named {ref!r}{hint}")
    return result.stdout.strip()


def locate(path: str | Path, ref: str) -> tuple[Path, str]:
    """(the top level of the repository at path, the commit `ref` names there): `repo_root` and
    `resolve_commit` in one git process (a spawn's first step); on any failure those two are asked
    in turn, so the error is theirs, word for word."""
    asked = ["rev-parse", "--is-bare-repository", "--show-toplevel", "--verify", "--quiet", f"{ref}^{{commit}}"]
    result = subprocess.run(
        ["git", "-C", str(Path(path).expanduser()), *asked],
        capture_output=True,
        text=True,
        check=False,
    )
    _raise_if_interrupted(result.returncode)
    lines = result.stdout.splitlines()
    if result.returncode == 0 and len(lines) == 3 and lines[0] == "false":
        return Path(lines[1].strip()).resolve(), lines[2].strip()
    root = repo_root(path)
    return root, resolve_commit(root, ref)


async def add_worktree(repo: Path, path: Path, *, branch: str, commit: str, disk_bytes: int | None = None) -> None:
    """Create a worktree at path on a new branch starting at commit.

    With `disk_bytes`, on a machine that allows loop mounts, path is first the mount of an ext4
    image of that size, so the kernel refuses writes past it (elsewhere the shim polls).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    quota = bool(disk_bytes) and diskquota.unavailable() is None
    if quota:
        assert disk_bytes is not None
        await asyncio.to_thread(diskquota.create, path, disk_bytes)
    try:
        await _add(repo, path, branch, commit)
    except WorkspaceError as exc:
        if quota:
            await asyncio.to_thread(diskquota.release, path)
            if "No space left" in exc.reason:
                raise WorkspaceError(
                    exc.repo, f"the checkout does not fit in the disk limit ({disk_bytes} bytes): raise --disk"
                ) from None
        raise


async def _add(repo: Path, path: Path, branch: str, commit: str) -> None:
    """`git worktree add -b BRANCH PATH COMMIT`, tried again when it lost the race with another add
    (see RACE_MARK). The branch is this execution's own (its name holds the execution id, claimed
    once): when the lost attempt had made it already, the next one checks it out as it is.

    In a plain repository the worktree is made directly instead (`add_directly`: one git process,
    not four, and none that reads every other worktree's metadata)."""
    if await gitrun.call(add_directly, repo, path, branch, commit, pool="spawn"):
        return
    args = ["worktree", "add", "--quiet", "-b", branch, str(path), commit]
    for attempt in range(ADD_ATTEMPTS):
        try:
            await git(*args, cwd=repo, pool="spawn")
            return
        except WorkspaceError as exc:
            lost = exc.reason.startswith(RACE_MARK) and "worktrees/" in exc.reason
            if not lost or attempt == ADD_ATTEMPTS - 1:
                raise
        await asyncio.sleep(random.uniform(0.005, 0.03) * (attempt + 1))
        made = await gitrun.run(
            ["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"], cwd=repo, pool="spawn"
        )
        if made[0] == 0 and made[1].decode().strip() == commit:
            args = ["worktree", "add", "--quiet", str(path), branch]
        elif made[0] == 0:  # (never expected: the branch is this execution's alone)
            raise WorkspaceError(str(repo), f"branch {branch} exists and is not at {commit}")


# `git worktree add` reads every registered worktree's metadata (its gitdir, commondir, HEAD, and
# the path's realpath): with hundreds of worktrees in a repository it cost 10-30 ms of CPU per add
# (28.8 ms at 460 worktrees against 2.7 ms made directly: bench/spawn.py --burst, docs/performance.md).
# What it does, done directly where nothing it would do differently is configured:
#   .git/worktrees/NAME/{locked ("initializing": no prune meanwhile), gitdir, commondir, HEAD}
#   PATH/.git ("gitdir: .git/worktrees/NAME"), then `git reset --hard COMMIT` in PATH: the branch
#   (unborn in HEAD) is created at COMMIT and checked out by the one git process.
# Anything that makes `git worktree add` do more goes through it as before: a post-checkout hook (it
# runs it), hooksPath, sparse checkout, worktreeConfig (it copies their settings), config includes
# (they could set any of these), GIT_* variables that point git elsewhere, a repository that is not
# a directory with its own `.git`, an existing path or worktree name, an existing branch.
_DIRECT_UNLESS_CONFIG: Final = ("hookspath", "sparse", "worktreeconfig", "include")
_DIRECT_UNLESS_ENV: Final = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_CONFIG",
    "GIT_CONFIG_GLOBAL",
    "GIT_CONFIG_SYSTEM",
    "GIT_CONFIG_COUNT",
    "GIT_CONFIG_PARAMETERS",
)


def _direct_possible(common: Path, path: Path, branch: str) -> bool:
    """Nothing here makes `git worktree add` do more than add_directly does (see above)."""
    if any(name in os.environ for name in _DIRECT_UNLESS_ENV) or not path.name.isalnum():
        return False
    if not common.is_dir() or os.path.lexists(path) or os.path.lexists(common / "worktrees" / path.name):
        return False
    if os.path.lexists(common / "hooks" / "post-checkout") or os.path.lexists(common / "refs" / "heads" / branch):
        return False
    home = Path(os.environ.get("HOME") or "~").expanduser()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    for config in (common / "config", home / ".gitconfig", xdg / "git" / "config", Path("/etc/gitconfig")):
        try:
            text = config.read_text(errors="replace").lower()
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if any(word in text for word in _DIRECT_UNLESS_CONFIG):
            return False
    try:
        packed = (common / "packed-refs").read_text(errors="replace")
    except FileNotFoundError:
        packed = ""
    except OSError:
        return False
    return f" refs/heads/{branch}\n" not in packed


def add_directly(repo: Path, path: Path, branch: str, commit: str) -> bool:
    """Make the worktree as `git worktree add -b BRANCH PATH COMMIT` would, with one git process
    (see above); False, with nothing left behind, when it cannot be done so (git is asked then)."""
    common = repo / ".git"
    if not _direct_possible(common, path, branch):
        return False
    meta = common / "worktrees" / path.name
    try:
        meta.parent.mkdir(exist_ok=True)
        meta.mkdir()
    except OSError:
        return False
    made = False
    try:
        (meta / "locked").write_text("initializing\n")
        path.mkdir()
        made = True
        (meta / "gitdir").write_text(os.path.realpath(path / ".git") + "\n")
        (meta / "commondir").write_text("../..\n")
        (meta / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
        (path / ".git").write_text(f"gitdir: {os.path.realpath(meta)}\n")
        code, _, _ = gitrun.run_sync(
            ["git", "reset", "--hard", "--quiet", "--no-recurse-submodules", commit], cwd=path, env=None
        )
        _raise_if_interrupted(code)
        if code != 0:
            raise OSError(f"git reset --hard exited {code}")
        (meta / "locked").unlink()
        return True
    except OSError:
        shutil.rmtree(meta, ignore_errors=True)
        if made:
            shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(common / "refs" / "heads" / branch):  # made before the checkout failed
            gitrun.run_sync(["git", "update-ref", "-d", f"refs/heads/{branch}", commit], cwd=repo, env=None)
        return False


async def remove_worktree(repo: Path, path: Path, *, branch: str | None = None) -> None:
    """Remove a worktree and (optionally) its branch, leaving nothing behind (its disk image, its
    shadow workspace's layers too)."""
    from actors import shadow

    await asyncio.to_thread(shadow.remove, path)
    if await asyncio.to_thread(diskquota.release, path):
        # Its files went with its image (unmounted, deleted): git only has to forget it.
        await git("worktree", "prune", cwd=repo)
    else:
        try:
            await git("worktree", "remove", "--force", str(path), cwd=repo)
        except WorkspaceError:
            if path.exists():  # noqa: ASYNC240 - one stat call
                shutil.rmtree(path, ignore_errors=True)
            await git("worktree", "prune", cwd=repo)
    if branch:
        try:
            await git("branch", "-D", branch, cwd=repo)
        except WorkspaceError:
            if os.path.exists(path):  # noqa: ASYNC240 - one stat call
                raise
