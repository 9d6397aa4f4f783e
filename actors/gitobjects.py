"""Read a checkpoint's changes through one long-running `git cat-file --batch` per repository.

Spawning `git diff-tree -p` for every checkpoint costs a process start, a fresh object-store
open and a patch rendered to text, most of which the validator throws away: its rules need the
paths, modes and blob ids of the changed files, how many lines were added and deleted, and the
added lines themselves. This module keeps one `git cat-file --batch` process per repository,
compares the two commits' trees level by level (every level one pipelined batch; subtrees with
equal ids are skipped), then reads the changed blobs in one more batch.

Added and deleted lines are counted as multisets (a line present more often in the new blob is
added, more often in the old one deleted), not by git's LCS diff: the two agree except when
lines only moved, which is not new content for any rule. Binary detection is git's (a NUL byte
in the first 8,000 bytes). A new object written by a later checkpoint is found: git looks loose
objects up on demand and re-scans packs on a miss.
"""

import os
import subprocess
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from actors.policy import FileChange

MODE_TREE = "040000"
MODE_GITLINK = "160000"
MODE_SYMLINK = "120000"
NO_MODE = "000000"
BINARY_PROBE = 8000
REQUEST_CHUNK = 1000  # ids per write: the requests stay far below the pipe's buffer
_NO_NEWLINE = b"\x00no-newline"


class ObjectReader:
    """One `git cat-file --batch` process for one repository; thread-safe, reads in batches."""

    def __init__(self, repo: str | Path) -> None:
        self.repo = str(repo)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._objects: str | None = None
        self.zero = "0" * 40

    def _process(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            proc = self._proc = subprocess.Popen(
                ["git", "cat-file", "--batch-command", "--buffer"],
                cwd=self.repo,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            )
        return proc

    def read(self, ids: list[str]) -> list[tuple[str, bytes] | None]:
        """(type, content) of each object id, None for a missing one; raises RuntimeError if git fails.

        Loose objects (what a checkpoint writes) are inflated here directly, which is several
        times cheaper than a round trip through git; packed ones are asked of `git cat-file`.
        """
        out: list[tuple[str, bytes] | None] = [self._loose(i) for i in ids]
        packed = [n for n, found in enumerate(out) if found is None]
        if not packed:
            return out
        wanted = [ids[n] for n in packed]
        answers: list[tuple[str, bytes] | None] = []
        with self._lock:
            for start in range(0, len(wanted), REQUEST_CHUNK):
                try:
                    answers.extend(self._read_chunk(wanted[start : start + REQUEST_CHUNK]))
                except (OSError, ValueError, IndexError) as exc:
                    self._kill()
                    raise RuntimeError(f"git cat-file failed in {self.repo}: {exc}") from None
        for n, found in zip(packed, answers, strict=True):
            out[n] = found
        return out

    def _loose(self, oid: str) -> tuple[str, bytes] | None:
        objects = self._objects
        if objects is None:
            objects = self._objects = _objects_dir(self.repo)
        try:
            with open(f"{objects}/{oid[:2]}/{oid[2:]}", "rb") as f:
                raw = zlib.decompress(f.read())
        except (OSError, zlib.error):
            return None
        header, _, body = raw.partition(b"\0")
        kind, _, size = header.partition(b" ")
        if not size.isdigit() or int(size) != len(body):
            return None  # not what git wrote: let git answer
        return kind.decode(), body

    def _read_chunk(self, ids: list[str]) -> list[tuple[str, bytes] | None]:
        proc = self._process()
        stdin: IO[bytes] = proc.stdin  # type: ignore[assignment]
        stdout: IO[bytes] = proc.stdout  # type: ignore[assignment]
        stdin.write("".join(f"contents {i}\n" for i in ids).encode() + b"flush\n")
        stdin.flush()
        found: list[tuple[str, bytes] | None] = []
        for _ in ids:
            header = stdout.readline()
            if not header:
                raise OSError("git cat-file exited")
            parts = header.split()
            if len(parts) < 3:  # "<id> missing" (or ambiguous)
                found.append(None)
                continue
            size = int(parts[2])
            data = stdout.read(size)
            stdout.read(1)  # the newline after the content
            found.append((parts[1].decode(), data))
        return found

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    # --- commits and trees ----------------------------------------------------------------------

    def tree_of(self, commit: str) -> str:
        [found] = self.read([commit])
        if found is None or found[0] != "commit":
            raise RuntimeError(f"{commit} is not a commit of {self.repo}")
        first = found[1].split(b"\n", 1)[0]
        if not first.startswith(b"tree "):
            raise RuntimeError(f"commit {commit} has no tree")
        return first[5:].decode()

    def diff(
        self,
        parent: str | None,
        commit: str,
        *,
        stats: Mapping[str, tuple[int | None, int | None]] | None = None,
        known: Callable[[FileChange], bool] | None = None,
    ) -> list[FileChange]:
        """The files that differ between two commits (parent None: everything in commit is added).

        Without `stats`, `added`, `deleted` and `added_text` are computed for every file as
        multisets of lines. With `stats` (path -> lines added, deleted, as the checkpoint
        recorded them; None = binary) the counts come from there, files `known` says are already
        judged are not read at all, and `added_text` holds the new file's lines that the old
        one did not have anywhere (a line copied from elsewhere in the file is not new content).
        """
        new_tree = self.tree_of(commit)
        old_tree = self.tree_of(parent) if parent is not None else None
        self.zero = "0" * len(new_tree)
        changes = self._diff_trees(old_tree, new_tree)
        if stats is None:
            self._fill_lines(changes)
        else:
            self._fill_lean(changes, stats, known)
        changes.sort(key=lambda c: c.path)
        return changes

    def _fill_lean(
        self,
        changes: list[FileChange],
        stats: Mapping[str, tuple[int | None, int | None]],
        known: Callable[[FileChange], bool] | None,
    ) -> None:
        full: list[FileChange] = []
        lean: list[FileChange] = []
        for change in changes:
            counted = stats.get(change.path)
            if counted is None:
                full.append(change)  # not in the recorded numstat: count it here
                continue
            added, deleted = counted
            if added is None or deleted is None:
                change.binary = True
                continue
            change.added, change.deleted = added, deleted
            if change.status != "D" and added and not (known is not None and known(change)):
                lean.append(change)
        blobs = self._blobs([*lean, *full])  # one batch for both kinds
        for change in lean:
            new = _lines(_content(blobs, change.new_mode, change.new_sha))
            if change.old_mode == NO_MODE or change.new_mode == MODE_SYMLINK:
                # every line is added (a symlink's one line is its target, changed as a whole)
                change.added_text = _text(new)
            else:
                old = set(_lines(_content(blobs, change.old_mode, change.old_sha)))
                change.added_text = _text([line for line in new if line not in old])
        self._fill_lines(full, blobs)

    def _entries(self, data: bytes, width: int) -> dict[str, tuple[str, str]]:
        entries: dict[str, tuple[str, str]] = {}
        pos = 0
        end = len(data)
        while pos < end:
            space = data.index(b" ", pos)
            nul = data.index(b"\0", space)
            mode = data[pos:space].decode().rjust(6, "0")
            name = data[space + 1 : nul].decode("utf-8", "surrogateescape")
            entries[name] = (mode, data[nul + 1 : nul + 1 + width].hex())
            pos = nul + 1 + width
        return entries

    def _diff_trees(self, old_root: str | None, new_root: str) -> list[FileChange]:
        width = len(new_root) // 2
        changes: list[FileChange] = []
        # Each level: (prefix, old tree id or None, new tree id or None); one batch read per level.
        level: list[tuple[str, str | None, str | None]] = [("", old_root, new_root)]
        while level:
            wanted = list(dict.fromkeys(t for _, o, n in level for t in (o, n) if t is not None))
            objects = dict(zip(wanted, self.read(wanted), strict=True))
            following: list[tuple[str, str | None, str | None]] = []
            for prefix, old, new in level:
                old_entries = self._tree(objects, old, width)
                new_entries = self._tree(objects, new, width)
                for name in sorted(old_entries.keys() | new_entries.keys()):
                    path = f"{prefix}{name}"
                    o = old_entries.get(name)
                    n = new_entries.get(name)
                    if o == n:
                        continue
                    o_tree = o is not None and o[0] == MODE_TREE
                    n_tree = n is not None and n[0] == MODE_TREE
                    if o_tree or n_tree:
                        following.append((f"{path}/", o[1] if o_tree and o else None, n[1] if n_tree and n else None))
                    o_file = o if o is not None and not o_tree else None
                    n_file = n if n is not None and not n_tree else None
                    if o_file is None and n_file is None:
                        continue
                    changes.append(self._change(path, o_file, n_file))
            level = following
        return changes

    def _tree(
        self, objects: dict[str, tuple[str, bytes] | None], tree: str | None, width: int
    ) -> dict[str, tuple[str, str]]:
        if tree is None:
            return {}
        found = objects.get(tree)
        if found is None or found[0] != "tree":
            raise RuntimeError(f"tree {tree} missing in {self.repo}")
        return self._entries(found[1], width)

    def _change(self, path: str, old: tuple[str, str] | None, new: tuple[str, str] | None) -> FileChange:
        old_mode, old_sha = old if old is not None else (NO_MODE, self.zero)
        new_mode, new_sha = new if new is not None else (NO_MODE, self.zero)
        if old is None:
            status = "A"
        elif new is None:
            status = "D"
        else:
            status = "M" if old_mode[:2] == new_mode[:2] else "T"
        return FileChange(path, status, old_mode, new_mode, old_sha, new_sha)

    def _blobs(self, changes: list[FileChange]) -> dict[str, tuple[str, bytes] | None]:
        """The blobs of both sides of these changes (a gitlink has none), read in one batch."""
        unique = list(
            dict.fromkeys(
                sha
                for c in changes
                for mode, sha in ((c.old_mode, c.old_sha), (c.new_mode, c.new_sha))
                if mode not in (NO_MODE, MODE_GITLINK)
            )
        )
        return dict(zip(unique, self.read(unique), strict=True)) if unique else {}

    def _fill_lines(self, changes: list[FileChange], blobs: dict[str, tuple[str, bytes] | None] | None = None) -> None:
        if blobs is None:
            blobs = self._blobs(changes)
        for change in changes:
            old = _content(blobs, change.old_mode, change.old_sha)
            new = _content(blobs, change.new_mode, change.new_sha)
            if _binary(old) or _binary(new):
                change.binary = True
                continue
            old_lines = _lines(old)
            new_lines = _lines(new)
            if not old_lines:
                added = new_lines
                change.deleted = 0
            else:
                surplus = Counter(new_lines)
                surplus.subtract(old_lines)
                added = []
                for line in new_lines:
                    if surplus[line] > 0:
                        surplus[line] -= 1
                        added.append(line)
                change.deleted = len(old_lines) - (len(new_lines) - len(added))
            change.added = len(added)
            change.added_text = _text(added)


def _objects_dir(repo: str) -> str:
    """The object directory of a repository (shared by all its worktrees)."""
    result = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"{repo} is not a git repository")
    return f"{result.stdout.strip()}/objects"


def _content(blobs: dict[str, tuple[str, bytes] | None], mode: str, sha: str) -> bytes:
    if mode == NO_MODE:
        return b""
    if mode == MODE_GITLINK:  # what git's patch shows for a submodule
        return f"Subproject commit {sha}\n".encode()
    found = blobs.get(sha)
    if found is None:
        raise RuntimeError(f"blob {sha} missing")
    return found[1]


def _text(lines: list[bytes]) -> str:
    return b"\n".join(lines).replace(_NO_NEWLINE, b"").decode("utf-8", "replace") if lines else ""


def _binary(data: bytes) -> bool:
    return b"\0" in data[:BINARY_PROBE]


def _lines(data: bytes) -> list[bytes]:
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    else:
        lines[-1] += _NO_NEWLINE  # git shows a last line without newline as a different line
    return lines


class ObjectReaders:
    """At most `size` open readers, one per repository, the least recently used closed first."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._readers: OrderedDict[str, ObjectReader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, repo: str | Path) -> ObjectReader:
        key = str(repo)
        evicted: ObjectReader | None = None
        with self._lock:
            reader = self._readers.get(key)
            if reader is None:
                reader = self._readers[key] = ObjectReader(key)
                if len(self._readers) > self.size:
                    _, evicted = self._readers.popitem(last=False)
            self._readers.move_to_end(key)
        if evicted is not None:
            evicted.close()
        return reader

    def diff(
        self,
        repo: str | Path,
        parent: str | None,
        commit: str,
        *,
        stats: Mapping[str, tuple[int | None, int | None]] | None = None,
        known: Callable[[FileChange], bool] | None = None,
    ) -> list[FileChange]:
        return self.get(repo).diff(parent, commit, stats=stats, known=known)

    def close(self, repo: str | Path | None = None) -> None:
        with self._lock:
            if repo is None:
                readers = list(self._readers.values())
                self._readers.clear()
            else:
                found = self._readers.pop(str(repo), None)
                readers = [found] if found is not None else []
        for reader in readers:
            reader.close()
