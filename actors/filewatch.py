"""Watch a worktree for file changes (Linux inotify through ctypes; stdlib only, for the shim).

The shim reports what the agent creates, modifies and deletes as `file.touched` facts while it
works. Changes are gathered per path and reported at most every `interval_s`, folded into one
change per path (created then modified is "created"; created then deleted is nothing). The
`.git` directory is never watched. Where inotify is not available, `FileWatcher.open` returns
None and nothing is reported live (checkpoints still see every change).

Linux allows a user 128 inotify instances by default (fs.inotify.max_user_instances), one per
shim: past that, or where other software took them, a shim gets none. The spawner then watches
that agent's tree with its own `SharedWatch`, one instance for every such agent (watches per
instance are limited by fs.inotify.max_user_watches, tens of thousands, not by agents).
"""

import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ISDIR: Final = 0x40000000
IN_ONLYDIR: Final = 0x01000000
IN_NONBLOCK: Final = 0o4000
IN_CLOEXEC: Final = 0o2000000

WATCH_MASK: Final = (
    IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
)
_HEADER = struct.Struct("iIII")
IGNORED_DIRS: Final = frozenset({".git"})
MAX_WATCHED_DIRS: Final = 20000
MAX_PENDING: Final = 5000


class FileWatcher:
    """Recursive inotify watch of one directory tree; `read()` drains events into `pending`."""

    def __init__(self, root: Path, fd: int, libc: ctypes.CDLL, owners: "dict[int, FileWatcher] | None" = None) -> None:
        self.root = root
        self.fd = fd
        self._libc = libc
        self._owners = owners  # a SharedWatch's: watch descriptor -> the tree it belongs to
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root ("" = root)
        self.pending: dict[str, str] = {}  # path -> created | modified | deleted
        self._existed: dict[str, bool] = {}  # path -> did it exist before this batch
        self.overflowed = False

    @classmethod
    def open(cls, root: Path) -> "FileWatcher | None":
        instance = _new_instance()
        if instance is None:
            return None
        watcher = cls(root, *instance)
        watcher._add_tree("", report=False)
        return watcher

    def close(self) -> None:
        if self._owners is None:
            os.close(self.fd)
            return
        for wd in self._dirs:  # a tree of a shared instance: only its own watches go
            self._libc.inotify_rm_watch(self.fd, wd)
            self._owners.pop(wd, None)
        self._dirs.clear()

    def _add_dir(self, rel: str) -> bool:
        if len(self._dirs) >= MAX_WATCHED_DIRS:
            return False
        path = os.fsencode(os.path.join(self.root, rel) if rel else str(self.root))
        wd = self._libc.inotify_add_watch(self.fd, path, WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            return False
        self._dirs[wd] = rel
        if self._owners is not None:
            self._owners[wd] = self
        return True

    def _add_tree(self, rel: str, *, report: bool, changed_after_ns: int | None = None) -> list[str]:
        """Watch a directory and everything below it; report files already in a new directory.

        With `changed_after_ns`, return the files whose status changed after that time (ctime, which
        a process cannot set back): what was written before the watch was added."""
        recent: list[str] = []
        stack = [rel]
        while stack:
            current = stack.pop()
            if not self._add_dir(current):
                continue
            try:
                entries = list(os.scandir(os.path.join(self.root, current) if current else self.root))
            except OSError:
                continue
            for entry in entries:
                child = f"{current}/{entry.name}" if current else entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if entry.name not in IGNORED_DIRS:
                        stack.append(child)
                elif report:
                    self._note(child, "created")
                elif changed_after_ns is not None:
                    try:
                        if entry.stat(follow_symlinks=False).st_ctime_ns > changed_after_ns:
                            recent.append(child)
                    except OSError:
                        continue
        return recent

    def _note(self, path: str, change: str) -> None:
        if len(self.pending) >= MAX_PENDING and path not in self.pending:
            self.overflowed = True
            return
        before = self.pending.get(path)
        if before is None:
            self._existed[path] = change != "created"
            self.pending[path] = change
            return
        existed = self._existed[path]
        if change == "deleted":
            if existed:
                self.pending[path] = "deleted"
            else:
                del self.pending[path]  # created and deleted within one batch: nothing to report
                del self._existed[path]
        elif change == "created":
            self.pending[path] = "modified" if existed else "created"
        else:  # modified
            self.pending[path] = "created" if not existed else "modified"

    def read(self) -> None:
        """Read every queued inotify event (non-blocking) into `pending`."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            for wd, mask, name in _events(data):
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                    continue
                self.handle(wd, mask, name)

    def handle(self, wd: int, mask: int, name: str) -> None:
        """Fold one inotify event of this tree into `pending`."""
        base = self._dirs.get(wd)
        if base is None:
            return
        if mask & IN_IGNORED:
            self._dirs.pop(wd, None)
            if self._owners is not None:
                self._owners.pop(wd, None)
            return
        if not name:
            return
        if name in IGNORED_DIRS and not base:
            return
        path = f"{base}/{name}" if base else name
        if mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._add_tree(path, report=True)
            return
        if mask & (IN_CREATE | IN_MOVED_TO):
            self._note(path, "created")
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            self._note(path, "deleted")
        elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
            self._note(path, "modified")

    def take(self) -> list[tuple[str, str]]:
        """Return and forget the changes gathered so far, in path order."""
        changes = sorted(self.pending.items())
        self.pending.clear()
        self._existed.clear()
        self.overflowed = False
        return changes


class SharedWatch:
    """One inotify instance watching many trees: the spawner's, for agents whose shim got none."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self.fd = fd
        self._libc = libc
        self._owners: dict[int, FileWatcher] = {}

    @classmethod
    def open(cls) -> "SharedWatch | None":
        instance = _new_instance()
        return cls(*instance) if instance is not None else None

    def watch(self, root: Path, *, changed_after_ns: int | None = None) -> tuple[FileWatcher, list[str]]:
        """Watch one more tree (its own `pending`, `take()`, and `close()` that ends only its watches).

        Also returns the files of the tree changed after `changed_after_ns` (none without it)."""
        watcher = FileWatcher(root, self.fd, self._libc, self._owners)
        return watcher, watcher._add_tree("", report=False, changed_after_ns=changed_after_ns)

    def read(self) -> set[FileWatcher]:
        """Read every queued event (non-blocking) into its tree's `pending`; return the trees that got any."""
        changed: set[FileWatcher] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # BlockingIOError: drained
                return changed
            if not data:
                return changed
            for wd, mask, name in _events(data):
                if mask & IN_Q_OVERFLOW:  # lost events of unknown trees: each says it overflowed
                    for tree in set(self._owners.values()):
                        tree.overflowed = True
                    continue
                owner = self._owners.get(wd)
                if owner is not None:
                    owner.handle(wd, mask, name)
                    changed.add(owner)

    def close(self) -> None:
        os.close(self.fd)
        self._owners.clear()


def _new_instance() -> tuple[int, ctypes.CDLL] | None:
    """A new inotify instance (its fd, and libc to use it); None without inotify or past the user's limit.

    libc is this process's own (`CDLL(None)`: the symbols Python is linked with), not looked up
    with `ctypes.util.find_library`, which runs `ldconfig -p` (a fork and exec, ~5 ms of every
    spawn: bench/spawn.py)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    return (fd, libc) if fd >= 0 else None


def _events(data: bytes) -> Iterator[tuple[int, int, str]]:
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield wd, mask, os.fsdecode(raw)
