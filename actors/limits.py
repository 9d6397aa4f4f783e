"""Resource limits for an agent's process tree, and the disk usage of its worktree.

Every execution gets its own cgroup where this machine lets Corral make one (`execution_group()`):

- cgroup v2 (the unified hierarchy mounted at /sys/fs/cgroup): `CgroupLimit`, one group with
  memory.max, cpu.max and pids.max, frozen with cgroup.freeze and ended with cgroup.kill.
- cgroup v1 (memory, cpu, pids and freezer hierarchies): `CgroupV1Limit`, a group per hierarchy
  under a `corral` parent inside this process's own group there; memory.limit_in_bytes (+memsw),
  cpu.cfs_quota_us, pids.max, and the freezer for pause and for killing without a race.

The kernel applies each limit to the whole tree: children, daemons that left the session, and
anything that calls sched_setaffinity. The agent is put in before it execs (`join_preexec()`).

Where neither can be made, rlimit+affinity (works everywhere, per process): `make_preexec()`
returns a `preexec_fn` that sets RLIMIT_AS and narrows the CPU affinity in the child.

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
from typing import Self

__all__ = [
    "CgroupLimit",
    "CgroupV1Limit",
    "ExecutionGroup",
    "cgroup_v1_available",
    "cgroup_v2_available",
    "describe_limits",
    "disk_usage",
    "execution_group",
    "group_paths",
    "make_preexec",
    "remove_groups",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_ENV = "CORRAL_CGROUP"  # a delegated cgroup v2 directory to create execution groups in; "off": none
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's minimum
V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")  # the v1 hierarchies an execution needs
V1_PARENT = "corral"  # the group, in each v1 hierarchy, that holds the execution groups
PER_PROCESS = "per process (rlimit+affinity)"
DEFAULT_PIDS_MAX = 4096


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


# cgroups: what both versions share


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _read_keyed(path: Path, key: str) -> int | None:
    """The number after `key` in a flat-keyed cgroup file ("oom_kill 3" lines); None if absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _check_limits(memory_bytes: int | None, cpus: float | None, pids_max: int | None) -> None:
    if memory_bytes is not None and memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be positive, not {memory_bytes!r}")
    if cpus is not None and not (cpus > 0 and math.isfinite(cpus)):
        raise ValueError(f"cpus must be a positive number, not {cpus!r}")
    if pids_max is not None and pids_max <= 0:
        raise ValueError(f"pids_max must be positive, not {pids_max!r}")


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad cgroup name {name!r}")


def _join_preexec(join_files: list[Path]) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into every group (one `join_files` entry per hierarchy)."""
    paths = [os.fsencode(p) for p in join_files]

    def join() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0": the writing process (its only thread, in a v1 `tasks` file)
            finally:
                os.close(fd)

    return join


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


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
    return Path(explicit) if explicit and not _cgroups_off() else _own_cgroup()


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


class _Group:
    """What both cgroup versions' execution groups share: `with` closes (kills and removes) the group."""

    def close(self) -> None:
        raise NotImplementedError

    def oom_events(self) -> int | None:
        """A file descriptor that turns readable when the OOM killer may have struck in the group,
        for a watcher that would otherwise poll `oom_kills()`; None where the kernel offers none."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class CgroupLimit(_Group):
    """A cgroup v2 group for one execution, with memory.max, cpu.max and pids.max; removed by `close()`.

        with CgroupLimit("corral-k3x9q2mf", memory_bytes=2 << 30, cpus=1.5) as group:
            proc = subprocess.Popen(cmd, preexec_fn=group.join_preexec())

    `join_preexec()` puts the child in the group before it execs, so nothing it starts escapes;
    `add(pid)` moves a running process (its children started before that stay outside). The
    memory limit is enforced by the kernel's OOM killer (SIGKILL), swap is turned off for the
    group when the kernel allows it; cpu.max is a real quota of `cpus` CPUs per period; pids.max
    makes fork() fail with EAGAIN past it (when the pids controller is there). `freeze()` stops
    the whole group at once (cgroup.freeze), `kill()` ends it at once (cgroup.kill).
    Raises OSError when the group cannot be made; check `cgroup_v2_available()` first.
    """

    version = 2
    description = "cgroup v2"

    def __init__(
        self,
        name: str,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        *,
        pids_max: int | None = None,
        base: Path | None = None,
    ) -> None:
        _check_name(name)
        _check_limits(memory_bytes, cpus, pids_max)
        parent = base if base is not None else _cgroup_base()
        if parent is None:
            raise OSError("no cgroup v2 group found for this process")
        self.memory_bytes = memory_bytes
        self.cpus = cpus
        self.pids_max = pids_max
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
            if pids_max is not None and (self.path / "pids.max").is_file():
                (self.path / "pids.max").write_text(f"{int(pids_max)}\n")
        except BaseException:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            raise
        self._closed = False

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    @staticmethod
    def cpu_max(cpus: float) -> str:
        """The cpu.max value for `cpus` CPUs: "<quota> <period>" in microseconds."""
        quota = max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))
        return f"{quota} {CPU_PERIOD_US}"

    @staticmethod
    def _enable_controllers(parent: Path) -> None:
        """Give the parent's children the memory, cpu and pids controllers it has (a limit on one
        it lacks then fails to be written, with OSError)."""
        enabled = _read_words(parent / "cgroup.subtree_control")
        available = _read_words(parent / "cgroup.controllers")
        missing = [c for c in ("memory", "cpu", "pids") if c in available and c not in enabled]
        if missing:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing) + "\n")

    def add(self, pid: int) -> None:
        """Move process `pid` (not its threads' later children started before) into the group."""
        (self.path / "cgroup.procs").write_text(f"{int(pid)}\n")

    @property
    def join_files(self) -> list[Path]:
        """What a process writes "0" into to join the group (`cgroup.procs`)."""
        return [self.path / "cgroup.procs"]

    def join_preexec(self) -> Callable[[], None]:
        """A `preexec_fn` that moves the child into the group before exec."""
        return _join_preexec(self.join_files)

    def pids(self) -> list[int]:
        return _read_pids(self.path / "cgroup.procs")

    def freeze(self, timeout: float = 2.0) -> bool:
        """Stop every process of the group at once; True once the kernel says all are frozen."""
        (self.path / "cgroup.freeze").write_text("1\n")
        deadline = time.monotonic() + timeout
        while _read_keyed(self.path / "cgroup.events", "frozen") != 1:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def thaw(self) -> None:
        (self.path / "cgroup.freeze").write_text("0\n")

    def frozen(self) -> bool:
        return _read_keyed(self.path / "cgroup.events", "frozen") == 1

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process of the group (cgroup.kill, or one by one before Linux 5.14) until
        none is left; True when the group is empty."""
        deadline = time.monotonic() + timeout
        while self.pids():
            try:
                (self.path / "cgroup.kill").write_text("1\n")  # Linux 5.14+
            except OSError:
                _kill_pids(self.pids())
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def oom_kills(self) -> int:
        """How many processes of the group the OOM killer ended."""
        return _read_keyed(self.path / "memory.events", "oom_kill") or 0

    def pids_refused(self) -> int:
        """How many forks pids.max refused."""
        return _read_keyed(self.path / "pids.events", "max") or 0

    def memory_peak(self) -> int | None:
        return _read_int(self.path / "memory.peak") or _read_int(self.path / "memory.current")

    def cpu_usage_ns(self) -> int | None:
        usec = _read_keyed(self.path / "cpu.stat", "usage_usec")
        return None if usec is None else usec * 1000

    def close(self, *, kill: bool = True, timeout: float = 2.0) -> None:
        """Remove the group; processes still in it are killed first (or, kill=False, left to fail)."""
        if self._closed:
            return
        if kill:
            self.kill(timeout)
        self.path.rmdir()  # EBUSY while processes remain
        self._closed = True


# cgroup v1


def _v1_hierarchies() -> dict[str, Path]:
    """controller -> this process's own group directory in the v1 hierarchy holding it.

    Mount points come from /proc/self/mountinfo (a hierarchy may hold several controllers, like
    "cpu,cpuacct"), the group inside from /proc/self/cgroup ("4:memory:/some/group").
    """
    mounts: dict[str, Path] = {}
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    for line in mountinfo:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup" or fields[3] != "/":
            continue
        for option in tail[2].split(","):
            if option in V1_CONTROLLERS or option == "cpuacct":
                mounts.setdefault(option, Path(fields[4]))
    found: dict[str, Path] = {}
    for line in own:
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        relative = parts[2].strip().lstrip("/")
        if relative.endswith(" (deleted)"):
            continue
        for controller in parts[1].split(","):
            if controller in mounts:
                found[controller] = mounts[controller] / relative if relative else mounts[controller]
    return found


@functools.cache
def cgroup_v1_available() -> bool:
    """True if execution groups can be made in the v1 memory, cpu, pids and freezer hierarchies.

    The answer comes from a real attempt, cached for the life of the process: the `corral`
    parent group is made in each (it stays, empty, for the next execution) and a probe group
    inside it is created and removed again.
    """
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        return False  # the unified hierarchy is mounted at the root: v2 or nothing
    own = _v1_hierarchies()
    if not set(V1_CONTROLLERS) <= set(own):
        return False
    made: list[Path] = []
    try:
        for directory in dict.fromkeys(own[c] / V1_PARENT for c in V1_CONTROLLERS):
            directory.mkdir(exist_ok=True)
            probe = directory / f"corral-probe-{os.getpid()}"
            probe.mkdir()
            made.append(probe)
        return True
    except OSError:
        return False
    finally:
        for probe in made:
            with contextlib.suppress(OSError):
                probe.rmdir()


class CgroupV1Limit(_Group):
    """The cgroup v1 groups of one execution: a directory named `name` under a `corral` parent in
    each of the memory, cpu (and cpuacct), pids and freezer hierarchies, inside this process's
    own group there; removed by `close()`.

    - memory.limit_in_bytes (and memory.memsw.limit_in_bytes, so swap is no way out) bound the
      whole tree; past it the kernel's OOM killer SIGKILLs a process of the group, counted in
      memory.oom_control's oom_kill.
    - cpu.cfs_quota_us / cpu.cfs_period_us: a quota of `cpus` CPUs per period over the whole
      group, whatever CPU affinity its processes give themselves.
    - pids.max: fork() and clone() fail with EAGAIN past it (threads count).
    - the freezer stops and continues the whole group at once; `kill()` freezes it, SIGKILLs
      every process in it and thaws it until it is empty, so nothing forks between two rounds.

    Raises OSError when a group cannot be made (the ones already made are removed again).
    """

    version = 1
    description = "cgroup v1 (memory, cpu, pids, freezer)"

    def __init__(
        self,
        name: str,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        *,
        pids_max: int | None = None,
        bases: dict[str, Path] | None = None,
    ) -> None:
        _check_name(name)
        _check_limits(memory_bytes, cpus, pids_max)
        own = bases if bases is not None else _v1_hierarchies()
        missing = [c for c in V1_CONTROLLERS if c not in own]
        if missing:
            raise OSError(f"no cgroup v1 hierarchy for {', '.join(missing)}")
        self.memory_bytes = memory_bytes
        self.cpus = cpus
        self.pids_max = pids_max
        self.dirs: dict[str, Path] = {}
        controllers = [*V1_CONTROLLERS, *(["cpuacct"] if "cpuacct" in own else [])]
        made: list[Path] = []
        try:
            for controller in controllers:
                path = own[controller] / V1_PARENT / name
                if path not in made:  # co-mounted controllers (cpu,cpuacct) share a directory
                    path.parent.mkdir(exist_ok=True)
                    path.mkdir()
                    made.append(path)
                self.dirs[controller] = path
            memory = self.dirs["memory"]
            if memory_bytes is not None:
                (memory / "memory.limit_in_bytes").write_text(f"{int(memory_bytes)}\n")
                if (memory / "memory.memsw.limit_in_bytes").is_file():  # swap accounting on
                    (memory / "memory.memsw.limit_in_bytes").write_text(f"{int(memory_bytes)}\n")
            if cpus is not None:
                cpu = self.dirs["cpu"]
                (cpu / "cpu.cfs_period_us").write_text(f"{CPU_PERIOD_US}\n")
                (cpu / "cpu.cfs_quota_us").write_text(f"{max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))}\n")
            if pids_max is not None:
                (self.dirs["pids"] / "pids.max").write_text(f"{int(pids_max)}\n")
        except BaseException:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        self._closed = False
        self._oom_fd: int | None = None

    @property
    def paths(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def oom_events(self) -> int | None:
        """An eventfd the kernel signals at each OOM in the group (memory.oom_control registered
        through cgroup.event_control): read it when it turns readable, then `oom_kills()`. No poll
        and no wake-up while nothing happens; closed by `close()`. None where it cannot be made."""
        if self._oom_fd is None and not self._closed:
            memory = self.dirs["memory"]
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
                try:  # (the kernel keeps what it needs: the control file may be closed at once)
                    (memory / "cgroup.event_control").write_text(f"{efd} {control}\n")
                finally:
                    os.close(control)
            except OSError:
                os.close(efd)
                return None
            self._oom_fd = efd
        return self._oom_fd

    def add(self, pid: int) -> None:
        """Move process `pid` into every group of the execution."""
        for path in self.paths:
            (path / "cgroup.procs").write_text(f"{int(pid)}\n")

    @property
    def join_files(self) -> list[Path]:
        """What a single-threaded process writes "0" into to join every group: each hierarchy's `tasks`.

        Not `cgroup.procs`: moving a whole thread group write-locks the kernel's
        cgroup_threadgroup_rwsem, which waits for an RCU grace period (5-15 ms here, under load
        more); moving only the writing thread itself ("0" into `tasks`) skips that lock. For a
        single-threaded process (the `sh` that execs the agent, a child between fork and exec)
        its one thread is the whole process, and whatever it execs and forks is born in the groups.
        """
        return [path / "tasks" for path in self.paths]

    def join_preexec(self) -> Callable[[], None]:
        """A `preexec_fn` that moves the (single-threaded) child into every group before exec."""
        return _join_preexec(self.join_files)

    def pids(self) -> list[int]:
        return _read_pids(self.dirs["freezer"] / "cgroup.procs")

    def freeze(self, timeout: float = 2.0) -> bool:
        """Stop every process of the group at once; True once the freezer reports FROZEN (a
        process in an uninterruptible sleep keeps it FREEZING)."""
        state = self.dirs["freezer"] / "freezer.state"
        state.write_text("FROZEN\n")
        deadline = time.monotonic() + timeout
        while state.read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def thaw(self) -> None:
        (self.dirs["freezer"] / "freezer.state").write_text("THAWED\n")

    def frozen(self) -> bool:
        try:
            return (self.dirs["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
        except OSError:
            return False

    def kill(self, timeout: float = 5.0) -> bool:
        return _kill_v1(self.dirs["freezer"], timeout)

    def oom_kills(self) -> int:
        memory = self.dirs["memory"]
        kills = _read_keyed(memory / "memory.oom_control", "oom_kill")
        if kills is None:  # kernels before 4.13 count no kills: hitting the limit is the sign
            return 1 if (_read_int(memory / "memory.failcnt") or 0) > 0 else 0
        return kills

    def pids_refused(self) -> int:
        return _read_keyed(self.dirs["pids"] / "pids.events", "max") or 0

    def memory_peak(self) -> int | None:
        return _read_int(self.dirs["memory"] / "memory.max_usage_in_bytes")

    def cpu_usage_ns(self) -> int | None:
        return _read_int(self.dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in self.dirs else None

    def close(self, *, kill: bool = True, timeout: float = 2.0) -> None:
        """Remove the groups; processes still in them are killed first (or, kill=False, left to fail)."""
        if self._closed:
            return
        if self._oom_fd is not None:  # (closing it unregisters the event)
            os.close(self._oom_fd)
            self._oom_fd = None
        if kill:
            self.kill(timeout)
        self.thaw()  # a frozen, empty group can be removed, but leave nothing frozen behind
        errors = []
        for path in self.paths:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        self._closed = True


def _kill_v1(freezer: Path, timeout: float) -> bool:
    """Freeze, SIGKILL every process listed, thaw, until the freezer group is empty (a frozen
    process cannot fork between the listing and its kill; the kill lands when it is thawed)."""
    procs, state = freezer / "cgroup.procs", freezer / "freezer.state"
    deadline = time.monotonic() + timeout
    while pids := _read_pids(procs):
        with contextlib.suppress(OSError):
            state.write_text("FROZEN\n")
        _kill_pids(_read_pids(procs) or pids)
        with contextlib.suppress(OSError):
            state.write_text("THAWED\n")
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


ExecutionGroup = CgroupLimit | CgroupV1Limit


def execution_group(
    name: str, memory_bytes: int | None = None, cpus: float | None = None, pids_max: int | None = None
) -> ExecutionGroup | None:
    """The groups of one execution in whichever cgroup version this machine offers; None when
    neither can be made here, or $CORRAL_CGROUP is "off" (then `make_preexec()`'s per-process
    limits are what is left)."""
    if _cgroups_off():
        return None
    try:
        if (CGROUP_ROOT / "cgroup.controllers").is_file():
            if cgroup_v2_available():
                return CgroupLimit(name, memory_bytes, cpus, pids_max=pids_max)
            return None
        hierarchies = _v1_hierarchies()  # (read once: /proc/self/mountinfo is parsed for it)
        if set(V1_CONTROLLERS) <= set(hierarchies):
            return CgroupV1Limit(name, memory_bytes, cpus, pids_max=pids_max, bases=hierarchies)
    except OSError:
        return None
    return None


def group_paths(name: str) -> list[Path]:
    """Where `execution_group(name)` made (or would make) its directories, from this process's
    groups: for finding what is left of an execution."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        base = _cgroup_base()
        return [base / name] if base is not None else []
    own = _v1_hierarchies()
    return list(dict.fromkeys(own[c] / V1_PARENT / name for c in (*V1_CONTROLLERS, "cpuacct") if c in own))


def remove_groups(paths: list[Path], timeout: float = 5.0) -> list[Path]:
    """Kill every process in the given group directories and remove them; the ones left.

    For a shim that is gone (its spawner cleans up after it from the paths it wrote down): a v2
    group through cgroup.kill, v1 groups through their freezer directory (freeze, SIGKILL, thaw),
    then every directory, the freezer's last. Missing directories are already removed.
    """
    existing = [p for p in paths if p.is_dir()]
    for path in existing:
        if (path / "cgroup.kill").is_file() or (path / "cgroup.freeze").is_file():
            with contextlib.suppress(OSError):
                (path / "cgroup.kill").write_text("1\n")
            _kill_until_empty(path, timeout)
        elif (path / "freezer.state").is_file():
            _kill_v1(path, timeout)
    for path in existing:
        _kill_until_empty(path, timeout)  # another hierarchy's view (nothing should remain)
    left = []
    for path in sorted(existing, key=lambda p: (p / "freezer.state").is_file()):
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            left.append(path)
    return left


def _kill_until_empty(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (pids := _read_pids(path / "cgroup.procs")) and time.monotonic() < deadline:
        _kill_pids(pids)
        time.sleep(0.005)


def _cgroups_off() -> bool:
    """$CORRAL_CGROUP=off: no cgroups even where they could be made (per-process limits only)."""
    return os.environ.get(CGROUP_ENV, "").strip().lower() == "off"


def describe_limits() -> str:
    """How this machine limits agents: "cgroup v2", "cgroup v1 (memory, cpu, pids, freezer)" or
    "per process (rlimit+affinity)"."""
    if _cgroups_off():
        return PER_PROCESS
    if cgroup_v2_available():
        return CgroupLimit.description
    if cgroup_v1_available():
        return CgroupV1Limit.description
    return PER_PROCESS


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
