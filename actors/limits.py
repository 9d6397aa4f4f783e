"""Resource limits for an agent process, and the disk usage of its worktree.

Two ways to limit memory and CPU:

- rlimit+affinity (works everywhere): `make_preexec()` returns a `preexec_fn` that sets
  RLIMIT_AS and narrows the CPU affinity in the child before it execs the agent.
- cgroup v2 (when the unified hierarchy is mounted and a group can be created): `CgroupLimit`
  makes a child group with memory.max and cpu.max and puts the agent in it.

`describe_limits()` says which one this machine gets.
"""

import contextlib
import functools
import math
import os
import resource
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "CgroupLimit",
    "cgroup_v2_available",
    "describe_limits",
    "disk_usage",
    "make_preexec",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_ENV = "CORRAL_CGROUP"  # a delegated cgroup v2 directory to create execution groups in
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's minimum


# rlimit + affinity


def make_preexec(memory_bytes: int | None, cpus: float | None) -> Callable[[], None] | None:
    """A `preexec_fn` applying the limits in the child before exec; None if there is nothing to do.

    - memory: RLIMIT_AS (soft and hard, so the agent cannot lift it) set to `memory_bytes`, or to
      the current hard limit if that is lower. This bounds virtual address space, not resident
      memory: an allocation beyond it fails (MemoryError in Python, ENOMEM / bad_alloc elsewhere)
      instead of the process being killed. Runtimes that reserve large address ranges up front
      (V8/Node, the JVM, some Go programs) need a limit well above their real use.
    - cpus: the child's CPU affinity is narrowed with sched_setaffinity to ceil(cpus) of the CPUs
      this process may currently use. This only approximates a CPU quota: 0.5 gives a whole CPU,
      and the agent competes with whatever else runs there. The CPUs are picked from an offset
      derived from the calling process's pid, so that many agents do not all land on the first
      ones. If ceil(cpus) covers every allowed CPU, affinity is left as it is.

    Everything is computed here, in the parent; the returned function only makes two system
    calls, as little as possible runs between fork and exec.
    """
    if memory_bytes is not None and memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be positive, not {memory_bytes!r}")
    if cpus is not None and not (cpus > 0 and math.isfinite(cpus)):
        raise ValueError(f"cpus must be a positive number, not {cpus!r}")

    rlimit: tuple[int, int] | None = None
    if memory_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        value = int(memory_bytes) if hard == resource.RLIM_INFINITY else min(int(memory_bytes), hard)
        rlimit = (value, value)

    affinity: frozenset[int] | None = None
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        wanted = math.ceil(cpus)
        if wanted < len(allowed):
            start = os.getpid() % len(allowed)
            affinity = frozenset(allowed[(start + i) % len(allowed)] for i in range(wanted))

    if rlimit is None and affinity is None:
        return None

    def preexec() -> None:
        if rlimit is not None:
            resource.setrlimit(resource.RLIMIT_AS, rlimit)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)

    return preexec


# cgroup v2


def _own_cgroup() -> Path | None:
    """This process's cgroup v2 directory, from the `0::/path` line of /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            relative = line[3:].strip().lstrip("/")
            if relative.endswith(" (deleted)"):
                return None
            return CGROUP_ROOT / relative if relative else CGROUP_ROOT
    return None


def _cgroup_base() -> Path | None:
    explicit = os.environ.get(CGROUP_ENV)
    return Path(explicit) if explicit else _own_cgroup()


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


@functools.cache
def cgroup_v2_available() -> bool:
    """True if execution groups with the memory and cpu controllers can be made with cgroup v2.

    That takes the unified hierarchy mounted at /sys/fs/cgroup (not a hybrid set-up, where it
    sits at /sys/fs/cgroup/unified) and a base group, $CORRAL_CGROUP or else this process's own
    group, that we may write and whose children get the memory and cpu controllers. The answer
    comes from a real attempt, cached for the life of the process: the controllers are enabled in
    the base's cgroup.subtree_control if they are not yet (this fails while processes sit in the
    base itself, cgroup v2's "no internal processes" rule, which is why a delegated
    $CORRAL_CGROUP is usually needed), then a probe group is created and removed again.
    """
    if not (CGROUP_ROOT / "cgroup.controllers").is_file():
        return False
    base = _cgroup_base()
    if base is None or not (base / "cgroup.controllers").is_file() or not os.access(base, os.W_OK | os.X_OK):
        return False
    if not {"memory", "cpu"} <= _read_words(base / "cgroup.controllers"):
        return False
    probe = base / f"corral-probe-{os.getpid()}"
    try:
        CgroupLimit._enable_controllers(base)
        probe.mkdir()
    except OSError:
        return False
    try:
        return (probe / "memory.max").is_file() and (probe / "cpu.max").is_file()
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


class CgroupLimit:
    """A cgroup v2 group for one execution, with memory.max and cpu.max; removed by `close()`.

        with CgroupLimit("corral-k3x9q2mf", memory_bytes=2 << 30, cpus=1.5) as group:
            proc = subprocess.Popen(cmd, preexec_fn=group.join_preexec())

    `join_preexec()` puts the child in the group before it execs, so nothing it starts escapes;
    `add(pid)` moves a running process (its children started before that stay outside). The
    memory limit is enforced by the kernel's OOM killer (SIGKILL), swap is turned off for the
    group when the kernel allows it; cpu.max is a real quota of `cpus` CPUs per period.
    Raises OSError when the group cannot be made; check `cgroup_v2_available()` first.
    """

    def __init__(
        self,
        name: str,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        *,
        base: Path | None = None,
    ) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad cgroup name {name!r}")
        if memory_bytes is not None and memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, not {memory_bytes!r}")
        if cpus is not None and not (cpus > 0 and math.isfinite(cpus)):
            raise ValueError(f"cpus must be a positive number, not {cpus!r}")
        parent = base if base is not None else _cgroup_base()
        if parent is None:
            raise OSError("no cgroup v2 group found for this process")
        self.memory_bytes = memory_bytes
        self.cpus = cpus
        self._enable_controllers(parent)
        self.path = parent / name
        self.path.mkdir()
        try:
            if memory_bytes is not None:
                (self.path / "memory.max").write_text(f"{int(memory_bytes)}\n")
                with contextlib.suppress(OSError):  # no swap accounting in this kernel
                    (self.path / "memory.swap.max").write_text("0\n")
            if cpus is not None:
                (self.path / "cpu.max").write_text(f"{self.cpu_max(cpus)}\n")
        except BaseException:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            raise
        self._closed = False

    @staticmethod
    def cpu_max(cpus: float) -> str:
        """The cpu.max value for `cpus` CPUs: "<quota> <period>" in microseconds."""
        quota = max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))
        return f"{quota} {CPU_PERIOD_US}"

    @staticmethod
    def _enable_controllers(parent: Path) -> None:
        enabled = _read_words(parent / "cgroup.subtree_control")
        missing = [c for c in ("memory", "cpu") if c not in enabled]
        if missing:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing) + "\n")

    def add(self, pid: int) -> None:
        """Move process `pid` (not its threads' later children started before) into the group."""
        (self.path / "cgroup.procs").write_text(f"{int(pid)}\n")

    def join_preexec(self) -> Callable[[], None]:
        """A `preexec_fn` that moves the child into the group before exec."""
        procs = os.fsencode(self.path / "cgroup.procs")

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" moves the writing process
            finally:
                os.close(fd)

        return join

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def close(self, *, kill: bool = True, timeout: float = 2.0) -> None:
        """Remove the group; processes still in it are killed first (or, kill=False, left to fail)."""
        if self._closed:
            return
        if kill and self.pids():
            try:
                (self.path / "cgroup.kill").write_text("1\n")  # Linux 5.14+
            except OSError:
                for pid in self.pids():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.path.rmdir()  # EBUSY while processes remain
        self._closed = True

    def __enter__(self) -> "CgroupLimit":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def describe_limits() -> str:
    """How this machine limits agents: "cgroup v2" or "rlimit+affinity"."""
    return "cgroup v2" if cgroup_v2_available() else "rlimit+affinity"


# disk


def disk_usage(path: Path) -> int:
    """Bytes of disk used under `path` (st_blocks * 512, like `du -sB1 -x`).

    Symlinks are not followed (the link itself counts), other file systems mounted below are not
    entered, a file with several hard links counts once. Entries that vanish or cannot be read
    while walking are skipped. Iterative over os.scandir: one lstat per entry and no recursion.
    """
    try:
        top = os.lstat(path)
    except OSError:
        return 0
    total = top.st_blocks * 512
    if not stat.S_ISDIR(top.st_mode):
        return total
    device = top.st_dev
    seen: set[int] = set()  # inodes of files with more than one link
    stack = [os.fspath(path)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if info.st_dev != device:
                    continue
                if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                    if info.st_ino in seen:
                        continue
                    seen.add(info.st_ino)
                total += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    stack.append(entry.path)
    return total
