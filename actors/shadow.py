"""The shadow workspace (`workspace = "shadow"`, docs/shadow.md): the agent writes into an overlay.

The agent's launch runs in a private mount namespace where an overlay is mounted on its worktree
path before bubblewrap starts (`preexec`): lowerdir = the real worktree, upperdir + workdir = the
execution's shadow directory (`shadow_dir`, beside the worktrees directory, never under the
worktree). bwrap's bind of the worktree then shows the merged view; everything on the host (the
checkpointer, the validator, `corral diff`) keeps seeing the real worktree, which is the
*promoted* state. The namespace, and with it the mount, ends with its last process.

- A checkpoint of a shadow execution is the merged view (`merged_tree`): the real worktree staged
  as always, then the upper layer's entries over it (regular files and symlinks added, overlay
  whiteouts -- character devices 0/0 -- and opaque directories removing what is below).
- After the validator judged checkpoint n, the checkpointer `promote`s what differs between the
  real worktree and checkpoint n, except the paths held (critical violations awaiting a human):
  each file is written from checkpoint n's blob to a temporary file beside it and renamed over the
  path, so it appears whole. The agent already sees those files through its upper layer, so what
  it sees never changes during a promotion.
- A rejected approval `discard`s only the held paths: through the agent's merged view
  (`/proc/PID/root` of a process in its namespace: the kernel resolves the path in that mount
  namespace) the worktree's version is written back, or the file removed when the worktree has
  none; the upper layer is never modified behind a mounted overlay. With no agent left, the upper
  entries are removed directly (nothing has it mounted).
- `pending` lists the upper entries whose content differs from the real worktree.

Standard library only in the part the shim imports (`preexec`, `shadow_dir`, `mount_options`).
"""

import asyncio
import contextlib
import ctypes
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from actors.checkpoints import CheckpointError, Skipped, snapshot_tree_skipping

MODES: Final = ("direct", "shadow")
CLONE_NEWNS: Final = 0x00020000
MS_REC: Final = 1 << 14
MS_PRIVATE: Final = 1 << 18
OPAQUE_XATTR: Final = "trusted.overlay.opaque"
SUFFIX: Final = ".shadow"
NEEDS_SANDBOX: Final = (
    'workspace = "shadow" needs the sandbox (an unconfined agent can unmount its overlay): '
    'drop --sandbox off / [sandbox] mode = "off", or use workspace = "direct"'
)
_TEMP_PREFIX: Final = ".corral-promote-"


class ShadowError(Exception):
    """The shadow workspace cannot be made or used; the message is one line."""


def shadow_dir(worktree: str | Path) -> Path:
    """The execution's shadow directory: `<worktrees>.shadow/<name>` (upper/ and work/ in it).

    Beside the worktrees directory, so it is never under a worktree (overlayfs refuses an upper
    layer inside its lower one) nor listed as one; the same for a follow-up continuing in the
    worktree, which so sees the pending files its parent left.
    """
    path = Path(worktree)
    return path.parent.with_name(path.parent.name + SUFFIX) / path.name


def upper_of(root: str | Path) -> Path:
    return Path(root) / "upper"


def prepare(worktree: str | Path) -> Path:
    """Make the shadow directory of a worktree (upper/ and work/); return it."""
    root = shadow_dir(worktree)
    for sub in ("upper", "work"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def remove(worktree: str | Path) -> None:
    """Remove the shadow directory of a worktree (with the worktree)."""
    root = shadow_dir(worktree)
    if root.is_dir():
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.parent.rmdir()  # the last one: the `.shadow` directory too


def mount_options(worktree: str | Path, root: str | Path) -> bytes:
    """overlayfs options: no redirects (a renamed directory is copied: the upper layer stays a plain
    list of files), no metacopy (a chmod copies the data), no index."""
    paths = [str(worktree), str(upper_of(root)), str(Path(root) / "work")]
    for path in paths:
        if any(c in path for c in ",:\\"):
            raise ShadowError(f"the path {path!r} cannot be an overlay layer (it has a ',', ':' or '\\')")
    return (
        f"lowerdir={paths[0]},upperdir={paths[1]},workdir={paths[2]},redirect_dir=off,metacopy=off,index=off"
    ).encode()


def preexec(worktree: str | Path, root: str | Path, inner: Callable[[], Any] | None) -> Callable[[], None]:
    """The agent's `preexec_fn`: `inner` (the cgroup join), then a private mount namespace with the
    overlay on the worktree, and the working directory moved onto it."""
    options = mount_options(worktree, root)
    target = os.fsencode(str(worktree))
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        if inner is not None:
            inner()
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "shadow workspace: unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "shadow workspace: private mount propagation")
        if libc.mount(b"overlay", target, b"overlay", 0, options) != 0:
            raise OSError(ctypes.get_errno(), "shadow workspace: mount overlay")
        os.chdir(target)

    return run


def overlay_mounted(pid: int, worktree: str | Path, root: str | Path) -> bool:
    """Whether process `pid` lives in a mount namespace with this shadow overlay on the worktree."""
    upper = f"upperdir={upper_of(root)}"
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(" - ", 1)
                mounted_here = len(fields) == 2 and fields[0].split()[4] == str(worktree)
                if mounted_here and fields[1].startswith("overlay ") and upper in fields[1]:
                    return True
    except (OSError, IndexError):
        return False
    return False


# --- the upper layer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the worktree, '/'-separated
    kind: str  # "file", "symlink", "whiteout", "opaque" (a directory hiding what was below), "dir"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str | Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def scan(upper: str | Path) -> list[Entry]:
    """Every entry of the upper layer (top-down; `.git` at the top skipped)."""
    root = Path(upper)
    out: list[Entry] = []
    if not root.is_dir():
        return out

    def walk(directory: Path, prefix: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            if not prefix and name == ".git":
                continue
            full = directory / name
            rel = prefix + name
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if _is_whiteout(st):
                out.append(Entry(rel, "whiteout"))
            elif stat.S_ISLNK(st.st_mode):
                out.append(Entry(rel, "symlink"))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(rel, "file"))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(rel, "opaque" if _is_opaque(full) else "dir"))
                walk(full, rel + "/")

    walk(root, "")
    return out


def present_in_upper(upper: str | Path, rel: str) -> bool:
    """Whether the upper layer decides what the agent sees at `rel` (its entry, or a whiteout or an
    opaque directory above it)."""
    root = Path(upper)
    if os.path.lexists(root / rel):
        return True
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = root.joinpath(*parts[:i])
        try:
            st = os.lstat(above)
        except OSError:
            return False
        if _is_whiteout(st) or (stat.S_ISDIR(st.st_mode) and _is_opaque(above)):
            return True
    return False


# --- git: the merged tree, promotion -------------------------------------------------------------


async def _git(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=str(cwd),
        env={**os.environ, **env} if env else None,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[0] != "check-ignore"):
        lines = err.decode(errors="replace").strip().splitlines()
        raise CheckpointError(str(cwd), lines[-1] if lines else f"git {args[0]} failed (exit {proc.returncode})")
    return out


def _z(items: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(i) + b"\0" for i in items)


async def merged_tree(worktree: Path, index: Path, root: Path, *, max_file_bytes: int) -> tuple[str, list[Skipped]]:
    """The tree the agent sees: the real worktree staged into `index`, the upper layer over it.

    Returns (tree, skipped) like checkpoints.snapshot_tree_skipping; ignored files of the upper
    layer stay out (as `git add -A` leaves them out), and so do files over `max_file_bytes`.
    """
    _, skipped = await snapshot_tree_skipping(worktree, index, max_file_bytes=max_file_bytes)
    upper = upper_of(root)
    entries = await asyncio.to_thread(scan, upper)
    env = {"GIT_INDEX_FILE": str(index)}
    if entries:
        adds: list[Entry] = [e for e in entries if e.kind in ("file", "symlink")]
        gone = {e.path for e in entries if e.kind == "whiteout"}
        hiding = {e.path for e in entries if e.kind == "opaque"}  # what was below is gone
        files_now = {e.path for e in adds}  # a directory the agent replaced by a file
        dirs_now = {e.path for e in entries if e.kind in ("dir", "opaque")}  # a file replaced by a directory
        # the index is listed only when something of the worktree's may go (one git process less)
        replaced = any((worktree / p).is_dir() and not (worktree / p).is_symlink() for p in files_now) or any(
            (worktree / p).is_symlink() or ((worktree / p).exists() and not (worktree / p).is_dir()) for p in dirs_now
        )

        async def listed() -> list[str]:
            if not (gone or hiding or replaced):
                return []
            return [p for p in (await _git("ls-files", "-z", cwd=worktree, env=env)).decode().split("\0") if p]

        async def ignored() -> set[str]:
            if not adds:
                return set()
            out = await _git("check-ignore", "-z", "--stdin", cwd=worktree, env=env, stdin=_z(e.path for e in adds))
            return {p for p in out.decode().split("\0") if p}

        staged, left_out = await asyncio.gather(listed(), ignored())
        removals: set[str] = set()
        for path in staged:
            above = {"/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)}
            if path in gone or path in dirs_now or above & (gone | hiding | files_now):
                removals.add(path)
        adds = [e for e in adds if e.path not in left_out]
        kept: list[Entry] = []
        for entry in adds:
            size = os.lstat(upper / entry.path).st_size
            if entry.kind == "file" and max_file_bytes and size > max_file_bytes:
                skipped.append(Skipped(entry.path, size))
            else:
                kept.append(entry)
        lines: list[bytes] = [b"0 " + b"0" * 40 + b"\t" + os.fsencode(p) + b"\0" for p in sorted(removals)]
        files = [e for e in kept if e.kind == "file"]
        if files:
            shas = (
                await _git(
                    "hash-object", "-w", "--no-filters", "--stdin-paths", cwd=worktree,
                    stdin="".join(f"{upper / e.path}\n" for e in files).encode(),
                )
            ).decode().split()  # fmt: skip
            for entry, sha in zip(files, shas, strict=True):
                mode = "100755" if os.lstat(upper / entry.path).st_mode & 0o111 else "100644"
                lines.append(f"{mode} {sha}\t".encode() + os.fsencode(entry.path) + b"\0")
        for entry in (e for e in kept if e.kind == "symlink"):
            target = os.fsencode(os.readlink(upper / entry.path))
            sha = (await _git("hash-object", "-w", "--stdin", cwd=worktree, stdin=target)).decode().strip()
            lines.append(f"120000 {sha}\t".encode() + os.fsencode(entry.path) + b"\0")
        if lines:
            await _git("update-index", "-z", "--index-info", cwd=worktree, env=env, stdin=b"".join(lines))
    tree = (await _git("write-tree", cwd=worktree, env=env)).decode().strip()
    return tree, skipped


@dataclass(frozen=True)
class Change:
    path: str
    mode: str  # the new mode ("000000": deleted)
    sha: str


async def tree_changes(worktree: Path, old: str, new: str) -> list[Change]:
    """What differs between two trees, as the new side's mode and blob per path."""
    out = await _git("diff-tree", "-r", "-z", "--no-renames", old, new, cwd=worktree)
    parts = out.decode(errors="surrogateescape").split("\0")
    changes = []
    i = 0
    while i + 1 < len(parts):
        meta, path = parts[i], parts[i + 1]
        i += 2
        fields = meta.lstrip(":").split()
        if len(fields) >= 5:
            changes.append(Change(path, fields[1], fields[3]))
    return changes


async def _blobs(worktree: Path, shas: list[str]) -> dict[str, bytes]:
    """The contents of blobs, read by one `git cat-file --batch`."""
    if not shas:
        return {}
    out = await _git("cat-file", "--batch", cwd=worktree, stdin="".join(f"{s}\n" for s in shas).encode())
    found: dict[str, bytes] = {}
    pos = 0
    for sha in shas:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3:
            size = int(header[2])
            found[sha] = out[pos : pos + size]
            pos += size + 1
    return found


def _held(path: str, held: set[str]) -> bool:
    return path in held or any(path.startswith(h.rstrip("/") + "/") for h in held)


def _clear_parents(root: Path, rel: str) -> None:
    """Make the directories above `rel` exist in `root`; a file or a symlink in the way is removed
    (never followed: a symlinked directory could lead anywhere on the host)."""
    parts = rel.split("/")[:-1]
    here = root
    for part in parts:
        here = here / part
        if os.path.islink(here) or (os.path.lexists(here) and not here.is_dir()):
            os.unlink(here)
        if not os.path.lexists(here):
            here.mkdir()


def safe_parents(root: Path, rel: str) -> bool:
    """Whether every directory above `rel` under `root` is a real directory or absent (no symlink).

    Paths under /proc/PID/root are resolved in the agent's namespace, but an absolute symlink met
    on the way is resolved from the caller's root: an agent's `dir -> /etc` would turn a write of
    `dir/x` into a write of the host's /etc/x. Such a path is never touched.
    """
    here = root
    for part in rel.split("/")[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _remove_empty_parents(root: Path, rel: str) -> None:
    here = (root / rel).parent
    while here != root and root in here.parents:
        try:
            here.rmdir()
        except OSError:
            return
        here = here.parent


def write_whole(root: Path, rel: str, mode: str, content: bytes) -> None:
    """Write one file (or symlink) at `root/rel` whole: a temporary file beside it renamed over it."""
    _clear_parents(root, rel)
    target = root / rel
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    tmp = target.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{target.name}"[:255])
    _remove_path(tmp)
    if mode == "120000":
        os.symlink(os.fsdecode(content), tmp)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o755 if mode == "100755" else 0o644)
        try:
            os.write(fd, content)  # (a short write on a regular file only at ENOSPC, which raises)
            os.fchmod(fd, 0o755 if mode == "100755" else 0o644)
        finally:
            os.close(fd)
    os.replace(tmp, target)


async def real_tree(worktree: Path, index: Path) -> str:
    """The real worktree (the promoted state) as a tree, staged into its own `index`."""
    tree, _ = await snapshot_tree_skipping(worktree, index, max_file_bytes=0)
    return tree


async def promote(
    worktree: Path, root: Path, index: Path, target_tree: str, held: set[str]
) -> tuple[list[str], list[str]]:
    """Write into the real worktree what differs between it and `target_tree` (a validated
    checkpoint's tree), except the `held` paths and paths the agent undid since (no upper entry).

    Returns (promoted paths, held paths that differ). Each file appears whole (temporary + rename).
    """
    current = await real_tree(worktree, index)
    changes = await tree_changes(worktree, current, target_tree)
    upper = upper_of(root)
    todo = [c for c in changes if not _held(c.path, held) and present_in_upper(upper, c.path)]
    waiting = sorted(c.path for c in changes if _held(c.path, held))
    contents = await _blobs(worktree, sorted({c.sha for c in todo if c.mode != "000000"}))

    def apply() -> list[str]:
        done = []
        for change in todo:
            if change.mode == "000000":
                if not safe_parents(worktree, change.path):
                    continue
                _remove_path(worktree / change.path)
                _remove_empty_parents(worktree, change.path)
            elif change.mode == "160000":
                continue  # a gitlink: never written (the validator flags it)
            else:
                write_whole(worktree, change.path, change.mode, contents[change.sha])
            done.append(change.path)
        return done

    return await asyncio.to_thread(apply), waiting


def discard(worktree: Path, root: Path, paths: Iterable[str], pid: int | None) -> list[str]:
    """Make the agent see the real worktree's version of `paths` again (or no file where it has none).

    With the agent's namespace alive (`pid`'s, with this overlay mounted): through its merged view,
    `/proc/PID/root/<worktree>/<path>` (the copy lands in the upper layer, equal to the worktree's);
    else the upper layer's entries are removed (nothing has it mounted).
    """
    upper = upper_of(root)
    mounted = pid is not None and overlay_mounted(pid, worktree, root)
    done = []
    for rel in paths:
        rel = rel.strip("/")
        if not rel or rel == ".git" or rel.startswith(".git/") or ".." in rel.split("/"):
            continue
        real = worktree / rel
        if not safe_parents(worktree, rel):
            continue
        if mounted:
            merged_root = Path(f"/proc/{pid}/root{worktree}")
            merged = merged_root / rel
            if not safe_parents(merged_root, rel):
                continue  # the agent put a symlink above it: never followed (see safe_parents)
            try:
                if real.is_dir() and not real.is_symlink():
                    continue  # a directory of the worktree: left as the agent has it
                if os.path.lexists(real):
                    mode = "120000" if real.is_symlink() else ("100755" if os.stat(real).st_mode & 0o111 else "100644")
                    content = os.fsencode(os.readlink(real)) if real.is_symlink() else real.read_bytes()
                    write_whole(merged_root, rel, mode, content)
                else:
                    _remove_path(merged)
                    _remove_empty_parents(merged_root, rel)
            except OSError:
                continue
        else:
            if not safe_parents(upper, rel):
                continue
            _remove_path(upper / rel)
            _remove_empty_parents(upper, rel)
        done.append(rel)
    return done


def pending(worktree: Path, root: Path) -> list[dict[str, str]]:
    """The upper layer's entries that differ from the real worktree: [{path, change}], change one of
    added, modified, deleted."""
    upper = upper_of(root)
    out = []
    for entry in scan(upper):
        real = worktree / entry.path
        if entry.kind == "whiteout":
            if os.path.lexists(real):
                out.append({"path": entry.path, "change": "deleted"})
        elif entry.kind in ("file", "symlink"):
            if not os.path.lexists(real) or real.is_dir():
                out.append({"path": entry.path, "change": "added"})
            elif not _same(upper / entry.path, real):
                out.append({"path": entry.path, "change": "modified"})
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
        if stat.S_ISLNK(sa.st_mode) or stat.S_ISLNK(sb.st_mode):
            return stat.S_ISLNK(sa.st_mode) == stat.S_ISLNK(sb.st_mode) and os.readlink(a) == os.readlink(b)
        if sa.st_size != sb.st_size or (sa.st_mode & 0o111 != 0) != (sb.st_mode & 0o111 != 0):
            return False
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False
