"""Checkpoints with plain git plumbing: the worktree's full state as a commit on a hidden ref.

A checkpoint goes through a temporary index kept per execution (so the agent's own index, HEAD
and files are never touched, and git's stat cache keeps `add -A` fast):

    GIT_INDEX_FILE=<tmp> git add -A        # every file of the worktree, .gitignore respected
    git write-tree                         # -> tree; equal to the previous tree: no checkpoint
    git commit-tree TREE -p PARENT         # -> commit, parent = the previous checkpoint (or base)
    git update-ref refs/corral/<id>/<n> COMMIT ''   # create-only: two writers never share an n
    git diff-tree -r --numstat PARENT_TREE TREE     # files and +/- (beside commit-tree/update-ref)

Restores (rollback) also go through a temporary index: `read-tree` the target, then
`checkout-index` writes its files; files the target does not have are deleted.
"""

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from actors.errors import WorkspaceError

REF_PREFIX: Final = "refs/corral"
IDENTITY: Final = {
    "GIT_AUTHOR_NAME": "Corral",
    "GIT_AUTHOR_EMAIL": "corral@localhost",
    "GIT_COMMITTER_NAME": "Corral",
    "GIT_COMMITTER_EMAIL": "corral@localhost",
}


class CheckpointError(WorkspaceError):
    """A git step of a checkpoint, diff or restore failed."""


def checkpoint_ref(execution_id: str, n: int) -> str:
    return f"{REF_PREFIX}/{execution_id}/{n}"


async def git(
    *args: str, cwd: str | Path, env: dict[str, str] | None = None, check: bool = True
) -> tuple[int, str, str]:
    """Run git; return (returncode, stdout, stderr). With check, a failure raises CheckpointError."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=str(cwd),
        env={**os.environ, **env} if env else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    code = proc.returncode or 0
    if check and code != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise CheckpointError(str(cwd), lines[-1] if lines else f"git {args[0]} failed (exit {code})")
    return code, out.decode(errors="replace"), err.decode(errors="replace")


@dataclass(frozen=True)
class FileStat:
    path: str
    added: int | None  # None for binary files
    deleted: int | None


def parse_numstat(text: str) -> list[FileStat]:
    stats = []
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        added, deleted, path = parts
        stats.append(FileStat(path, None if added == "-" else int(added), None if deleted == "-" else int(deleted)))
    return stats


async def snapshot_tree(worktree: Path, index: Path) -> str:
    """Stage the whole worktree into `index` (created from the worktree's own index) and return its tree."""
    if not index.exists():  # noqa: ASYNC240 - one stat call
        index.parent.mkdir(parents=True, exist_ok=True)
        _, own, _ = await git("rev-parse", "--git-path", "index", cwd=worktree)
        own_path = Path(own.strip())
        if not own_path.is_absolute():
            own_path = worktree / own_path
        _copy_if_present(own_path, index)  # its stat cache makes the first `add -A` cheap
    env = {"GIT_INDEX_FILE": str(index)}
    await git("add", "-A", cwd=worktree, env=env)
    _, tree, _ = await git("write-tree", cwd=worktree, env=env)
    return tree.strip()


async def tree_of(repo: str | Path, commit: str) -> str:
    _, out, _ = await git("rev-parse", f"{commit}^{{tree}}", cwd=repo)
    return out.strip()


@dataclass(frozen=True)
class Snapshot:
    n: int
    ref: str
    commit: str
    tree: str
    parent: str
    files: list[FileStat]


async def take_checkpoint(
    worktree: Path,
    index: Path,
    *,
    execution_id: str,
    n: int,
    parent: str,
    parent_tree: str,
    message: str,
) -> Snapshot | None:
    """Commit the worktree's state as checkpoint n on its hidden ref; None when nothing changed."""
    tree = await snapshot_tree(worktree, index)
    if tree == parent_tree:
        return None
    ref = checkpoint_ref(execution_id, n)

    async def commit_and_ref() -> str:
        _, out, _ = await git("commit-tree", tree, "-p", parent, "-m", message, cwd=worktree, env=IDENTITY)
        await git("update-ref", ref, out.strip(), "", cwd=worktree)
        return out.strip()

    # The numstat needs only the two trees: it runs beside commit-tree + update-ref.
    commit, (_, stat, _) = await asyncio.gather(
        commit_and_ref(), git("diff-tree", "-r", "--numstat", "--no-renames", parent_tree, tree, cwd=worktree)
    )
    return Snapshot(n, ref, commit, tree, parent, parse_numstat(stat))


async def numstat(repo: str | Path, old: str, new: str, paths: list[str] | None = None) -> list[FileStat]:
    """Files changed between two trees or commits, with lines added and deleted."""
    args = ["diff-tree", "-r", "--numstat", "--no-renames", old, new]
    if paths:
        args += ["--", *paths]
    _, out, _ = await git(*args, cwd=repo)
    return parse_numstat(out)


async def unified_diff(repo: str | Path, old: str, new: str, paths: list[str] | None = None) -> str:
    args = ["diff-tree", "-r", "-p", "--no-renames", "--no-color", old, new]
    if paths:
        args += ["--", *paths]
    _, out, _ = await git(*args, cwd=repo)
    return out


async def files_of(repo: str | Path, tree: str, paths: list[str] | None = None) -> set[str]:
    args = ["ls-tree", "-r", "-z", "--name-only", tree]
    if paths:
        args += ["--", *paths]
    _, out, _ = await git(*args, cwd=repo)
    return {name for name in out.split("\0") if name}


async def restore(worktree: Path, scratch_index: Path, *, target: str, current: str, paths: list[str]) -> list[str]:
    """Make the worktree's files those of tree `target` (all, or only under `paths`).

    `current` is a tree of the worktree as it is now (a checkpoint just taken); files in it but
    not in the target are deleted. Returns the paths written or deleted. The agent's own index
    and HEAD are not touched.
    """
    scope = paths or None
    wanted = await files_of(worktree, target, scope)
    present = await files_of(worktree, current, scope)
    env = {"GIT_INDEX_FILE": str(scratch_index)}
    _unlink(scratch_index)
    try:
        await git("read-tree", target, cwd=worktree, env=env)
        if wanted:
            if scope is None:
                await git("checkout-index", "-a", "-f", cwd=worktree, env=env)
            else:
                await git("checkout-index", "-f", "--", *sorted(wanted), cwd=worktree, env=env)
    finally:
        _unlink(scratch_index)
    gone = sorted(present - wanted)
    _delete_files(worktree, gone)
    changed = await numstat(worktree, current, target, scope)
    return sorted({s.path for s in changed} | set(gone))


def _copy_if_present(source: Path, target: Path) -> None:
    if source.exists():
        shutil.copyfile(source, target)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _delete_files(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        _remove_empty_parents(path.parent, root)


def _remove_empty_parents(directory: Path, root: Path) -> None:
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent
