"""Checkpoints with plain git plumbing: the worktree's full state as a commit on a hidden ref.

A checkpoint goes through a temporary index kept per execution (so the agent's own index, HEAD
and files are never touched, and git's stat cache keeps `add -A` fast):

    GIT_INDEX_FILE=<tmp> git add -A        # every file of the worktree, .gitignore respected
    git write-tree                         # -> tree; equal to the previous tree: no checkpoint
    git commit-tree TREE -p PARENT         # -> commit, parent = the previous checkpoint (or base)
    git update-ref refs/corral/<id>/<n> COMMIT ''   # create-only: two writers never share an n
    git diff-tree -r --numstat PARENT_TREE TREE     # files and +/- (beside commit-tree/update-ref)

A file larger than `max_file_bytes` ([checkpoints] max_file_size) is kept out of `git add` by
pathspec, so it is never copied into the repository's object store, and is listed as skipped.

Restores (rollback) also go through a temporary index: `read-tree` the target, then
`checkout-index` writes its files; files the target does not have are deleted.
"""

import asyncio
import os
import re
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from actors import gitrun
from actors.errors import WorkspaceError
from actors.gitdir import linked_gitdir

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
    """Run git; return (returncode, stdout, stderr). With check, a failure raises CheckpointError.

    It runs in a thread (actors/gitrun.py): forking from the event loop stalled `corral up` while
    hundreds of exit checkpoints ran beside a burst of spawns."""
    code, out, err = await gitrun.run(
        ["git", *args], cwd=cwd, env={**os.environ, **env} if env else None, pool="bookkeeping"
    )
    code = code or 0
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


DEFAULT_MAX_FILE_BYTES: Final = 50 << 20  # [checkpoints] max_file_size


@dataclass(frozen=True)
class Skipped:
    """A file left out of a checkpoint: larger than [checkpoints] max_file_size."""

    path: str
    size: int


async def snapshot_tree(worktree: Path, index: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """Stage the whole worktree into `index` (created from the worktree's own index) and return its tree."""
    tree, _ = await snapshot_tree_skipping(worktree, index, max_file_bytes=max_file_bytes)
    return tree


async def snapshot_tree_skipping(
    worktree: Path, index: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> tuple[str, list[Skipped]]:
    """Stage the worktree into `index` and return its tree, and the files too large to stage.

    `git add` writes every file it stages into the repository's object store, outside any disk
    quota of the worktree: a 300 MB file the agent made would be copied into `.git`. Files
    larger than `max_file_bytes` (0: no limit) are excluded by pathspec: a new one stays out of
    the tree, a tracked one keeps the version already staged. Only what git would stage is
    looked at (untracked and modified files, .gitignore respected), one lstat each.
    """
    # An execution's first checkpoint seeds its index in a thread, with the git calls': on `corral
    # up`'s loop, every one copied an index there, beside everyone else's spawns and exits.
    if not index.exists() and not await gitrun.call(_seed_index, worktree, index, pool="bookkeeping"):  # noqa: ASYNC240
        _, own, _ = await git("rev-parse", "--git-path", "index", cwd=worktree)
        own_path = Path(own.strip())
        if not own_path.is_absolute():
            own_path = worktree / own_path
        await gitrun.call(_copy_if_present, own_path, index, pool="bookkeeping")
    env = {"GIT_INDEX_FILE": str(index)}
    _, listed, _ = await git("ls-files", "-z", "--others", "--modified", "--exclude-standard", cwd=worktree, env=env)
    names = [n for n in listed.split("\0") if n]
    skipped = _too_large(worktree, names, max_file_bytes) if max_file_bytes else []
    excluded = [f":(exclude,literal){s.path}" for s in skipped]
    if names:  # nothing untracked, modified or deleted: `add -A` would stage nothing (an agent that
        # changed nothing since the last checkpoint: one git process less at each, its exit's too)
        await git("add", "-A", *(["--", ".", *excluded] if excluded else []), cwd=worktree, env=env)
    _, tree, _ = await git("write-tree", cwd=worktree, env=env)
    return tree.strip(), skipped


def _seed_index(worktree: Path, index: Path) -> bool:
    """Make `index` a copy of the worktree's own (its stat cache makes the first `add -A` cheap),
    unless it is there already. False when git must be asked where the worktree's index is."""
    if index.exists():
        return True
    index.parent.mkdir(parents=True, exist_ok=True)
    own_path = own_index(worktree)
    if own_path is None:
        return False
    _copy_if_present(own_path, index)
    return True


def own_index(worktree: Path) -> Path | None:
    """A linked worktree's own index, from the gitdir its `.git` file names (what `git rev-parse
    --git-path index` answers there, without a git process: one less in every execution's first
    checkpoint); None for anything else (a repository's own directory, GIT_DIR or GIT_INDEX_FILE
    set), where git is asked. The `.git` file read is the one every git command of the
    checkpoint follows after it, so it names the same gitdir as git would."""
    if "GIT_INDEX_FILE" in os.environ or "GIT_DIR" in os.environ:
        return None
    gitdir = linked_gitdir(worktree)
    return gitdir / "index" if gitdir is not None else None


def _too_large(worktree: Path, names: list[str], limit: int) -> list[Skipped]:
    """Of the files `git add -A` would stage (`ls-files --others --modified`), those larger than `limit`."""
    found = []
    for name in dict.fromkeys(names):  # a modified file may be listed twice
        try:
            st = os.lstat(worktree / name)
        except OSError:
            continue  # deleted: `add -A` records that, nothing is copied
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            found.append(Skipped(name, st.st_size))
    return found


async def tree_of(repo: str | Path, commit: str) -> str:
    """The tree of a commit. A commit named by its full object id always has the same tree (its id
    is a hash of it): those are remembered, so the executions of a burst started from one base
    commit ask git once for its tree (every first checkpoint, exit checkpoints included, asks)."""
    named = commit if _OBJECT_ID.fullmatch(commit) else None
    known = _trees.get(named) if named else None
    if known is not None:
        return known
    _, out, _ = await git("rev-parse", f"{commit}^{{tree}}", cwd=repo)
    tree = out.strip()
    if named:
        if len(_trees) >= TREES_KEPT:
            del _trees[next(iter(_trees))]  # the oldest first
        _trees[named] = tree
    return tree


_OBJECT_ID: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256, lower case, whole
TREES_KEPT: Final = 4096
_trees: dict[str, str] = {}  # commit id -> its tree id


@dataclass(frozen=True)
class Snapshot:
    n: int
    ref: str
    commit: str
    tree: str
    parent: str
    files: list[FileStat]
    skipped: tuple[Skipped, ...] = ()


# Makes the tree of a worktree other than by staging it (the shadow workspace's merged view).
TreeMaker = Callable[[Path, Path], Awaitable[tuple[str, list[Skipped]]]]


async def take_checkpoint(
    worktree: Path,
    index: Path,
    *,
    execution_id: str,
    n: int,
    parent: str,
    parent_tree: str,
    message: str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    skipped_before: tuple[Skipped, ...] = (),
    tree_maker: "TreeMaker | None" = None,
) -> Snapshot | None:
    """Commit the worktree's state as checkpoint n on its hidden ref; None when nothing changed.

    Files over `max_file_bytes` are not in it (`Snapshot.skipped`); a new such file alone (the
    tree unchanged, the skipped files not those of the previous checkpoint) is a checkpoint too,
    so that the log says it is there and was left out.
    """
    if tree_maker is not None:  # workspace = "shadow" (actors/shadow.py): what the agent sees
        tree, skipped = await tree_maker(worktree, index)
    else:
        tree, skipped = await snapshot_tree_skipping(worktree, index, max_file_bytes=max_file_bytes)
    if tree == parent_tree and tuple(skipped) == tuple(skipped_before):
        return None
    ref = checkpoint_ref(execution_id, n)

    async def commit_and_ref() -> str:
        _, out, _ = await git("commit-tree", tree, "-p", parent, "-m", message, cwd=worktree, env=IDENTITY)
        await git("update-ref", ref, out.strip(), "", cwd=worktree)
        return out.strip()

    # The numstat needs only the two trees: it runs beside commit-tree + update-ref.
    commit, (_, numstat_out, _) = await asyncio.gather(
        commit_and_ref(), git("diff-tree", "-r", "--numstat", "--no-renames", parent_tree, tree, cwd=worktree)
    )
    return Snapshot(n, ref, commit, tree, parent, parse_numstat(numstat_out), tuple(skipped))


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
