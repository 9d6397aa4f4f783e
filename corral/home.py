"""CORRAL_HOME: where the NATS store, the DuckDB file and the running system's address live."""

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class Home:
    """Paths under one CORRAL_HOME."""

    root: Path

    @classmethod
    def from_env(cls) -> "Home":
        root = Path(os.environ.get("CORRAL_HOME") or Path.home() / ".corral").expanduser()
        return cls(root.resolve())

    def ensure(self) -> "Home":
        for path in (self.root, self.nats_store, self.worktrees, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def nats_store(self) -> Path:
        return self.root / "nats"

    @property
    def worktrees(self) -> Path:
        return self.root / "worktrees"

    @property
    def runs(self) -> Path:
        """One directory per live execution on this host: its shim's spec, spool and log."""
        return self.root / "run"

    @property
    def checkpoints(self) -> Path:
        """The checkpointer's temporary indexes, one per execution."""
        return self.root / "checkpoints"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def database(self) -> Path:
        return self.root / "corral.duckdb"

    @property
    def runtime_file(self) -> Path:
        return self.root / "runtime.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "system.lock"

    @property
    def server_log(self) -> Path:
        return self.root / "nats-server.log"

    @property
    def up_log(self) -> Path:
        return self.root / "up.log"

    def read_runtime(self) -> dict[str, Any] | None:
        """Return what the running system wrote about itself, or None."""
        try:
            data = orjson.loads(self.runtime_file.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_runtime(self, info: dict[str, Any]) -> None:
        tmp = self.runtime_file.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(info))
        os.replace(tmp, self.runtime_file)

    def clear_runtime(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.runtime_file.unlink()


class SystemLock:
    """The lock a running system holds for its lifetime; the kernel drops it if the holder dies."""

    def __init__(self, home: Home) -> None:
        self._path = home.lock_file
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self._path.parent.mkdir(parents=True, exist_ok=True)  # a fresh CORRAL_HOME
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holders(self) -> list[int]:
        """Pids of the processes that have the lock file open (the holder among them); for messages."""
        return processes_with_open(self._path)

    def is_held_elsewhere(self) -> bool:
        if self._fd is not None:
            return False
        if self.try_acquire():
            self.release()
            return False
        return True


def process_alive(pid: Any) -> bool:
    """Whether `pid` is a live process (a zombie, reaped or not, is dead: it holds nothing)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def processes_with_open(path: Path) -> list[int]:
    """Pids with a descriptor open on `path` (those this user may inspect)."""
    target = str(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        found.append(int(entry.name))
                        break
    return found
