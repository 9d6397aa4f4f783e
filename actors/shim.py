"""The per-execution shim: owns one agent's process tree and pipes, and outlives the spawner.

In the spirit of containerd-shim and conmon. The spawner starts `python -m actors.shim RUN_DIR`
in its own session; the shim starts the agent, coalesces its output, parses its stderr control
lines, and appends every fact as one JSON line to `RUN_DIR/spool.jsonl`:

    {"id": ULID, "ts": epoch seconds, "type": event type, "data": {...}, "cause": request id}

The spawner turns spool lines into events (the ULID is the event id and the JetStream message
id, so a line published twice is stored once) and remembers how far it got in `published`. If
the spawner dies, the agent keeps running and the spool keeps growing; a restarted spawner
re-attaches and publishes from where it stopped. The shim never talks to NATS.

Control reaches the shim on an abstract unix socket, one JSON line in and one out per
connection: watch (a byte per spool append, kept open), input, pause, resume, cancel, extend,
status. The shim is a child subreaper, so descendants that start their own session are still
found (and stopped, resumed or killed) through their parent chain.

Only the standard library and orjson are imported here: hundreds of shims may start at once.
"""

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

import actors.sandbox as sandbox
from actors import netallow
from actors.adapters import load_adapter, probe
from actors.filewatch import FileWatcher
from actors.output import ControlLine, OutputCoalescer
from actors.redact import Redactor, secret_values
from events.ids import new_ulid

SPEC = "spec.json"
SPOOL = "spool.jsonl"
PUBLISHED = "published"
FLUSH_INTERVAL_S = 0.05
READ_SIZE = 64 * 1024
DRAIN_AFTER_EXIT_S = 2.0
STOP_CHECK_S = 2.0
DISK_CHECK_S = 2.0
# The cgroup's refused-fork counter (and its OOM kills where the kernel signals none) is read at
# most every GROUP_CHECK_S while the agent writes (on its own wake-ups) and every GROUP_IDLE_CHECK_S
# when it is silent: a timer a second per shim was two thirds of an idle shim's CPU.
GROUP_CHECK_S = 1.0
GROUP_IDLE_CHECK_S = 5.0
CGROUPS = "cgroups.json"  # the execution's cgroup directories, for a spawner cleaning up after a dead shim
FILE_EVENTS_INTERVAL_S = 0.5
INPUT_TIMEOUT_S = 5.0
MAX_INPUT_BYTES = 1 << 20  # `corral input` and input.requested: at most 1 MiB of text (docs/control.md)
# One control request line on the socket: an input of MAX_INPUT_BYTES whose every character JSON
# escapes to six bytes, and room for the rest of the request.
CONTROL_LINE_LIMIT = 6 * MAX_INPUT_BYTES + 64 * 1024
PR_SET_CHILD_SUBREAPER = 36
HEARTBEAT_FIELDS: dict[str, type | tuple[type, ...]] = {"note": str, "progress": (int, float), "source": str}
_IN_MODIFY = 0x00000002
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_INOTIFY_EVENT = struct.Struct("iIII")


def socket_address(run_dir: Path) -> str:
    """The abstract unix socket of the shim of one run directory (no path length limit, no file)."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:24]
    return f"\0corral-shim-{digest}"


async def request(run_dir: Path, op: dict[str, Any], *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one control request to a shim and return its reply; raise ConnectionError if none runs."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_address(run_dir)), timeout_s)
    try:
        writer.write(orjson.dumps(op) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        if not line:
            raise ConnectionError("the shim closed the connection")
        reply: dict[str, Any] = orjson.loads(line)
        return reply
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


LISTENER: socket.socket | None = None  # the control socket, when actors.shimfork bound it already
TERMINAL_RECORDS = ("execution.exited", "execution.failed")  # a shim's last spool record


class SpoolWatch:
    """Which spools were appended to: one inotify instance (IN_MODIFY) for every spool a spawner tails.

    The kernel reports a shim's appends at no cost to the shim, and hundreds of spools changing
    between two reads are one wake-up and one read for the spawner. A spawner that has one asks
    its shims for a quiet watch (no byte per append; the connection still ends with the shim, and
    the shim writes one byte when it has spooled its terminal record: the spawner publishes that
    at once, since its acknowledgement frees the agent's slot).
    """

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self.fd = fd
        self._libc = libc

    @classmethod
    def open(cls) -> "SpoolWatch | None":
        """A new watch, or None where inotify is not available (or this user has no instance left)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(fd, libc) if fd >= 0 else None

    def add(self, spool: Path) -> int | None:
        """Start watching one spool; its watch descriptor, or None if it cannot be watched."""
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(spool), _IN_MODIFY))
        return wd if wd >= 0 else None

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> set[int] | None:
        """The watch descriptors of the spools appended to since the last read; None if the kernel's
        queue overflowed (then any spool may have changed)."""
        changed: set[int] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # BlockingIOError: all read
                return changed
            if not data:
                return changed
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
                offset += 16 + length
                if mask & _IN_Q_OVERFLOW:
                    return None
                if not mask & _IN_IGNORED:  # (the watch's end: removed, or its file deleted)
                    changed.add(wd)

    def close(self) -> None:
        os.close(self.fd)


# --- processes ---------------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """Return (state, ppid, pgrp) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as reader:
            raw = reader.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _children_listed() -> bool:
    """This kernel lists a thread's children in /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)."""
    global _CHILDREN_LISTED
    if _CHILDREN_LISTED is None:
        _CHILDREN_LISTED = os.path.exists(f"/proc/self/task/{os.getpid()}/children")
    return _CHILDREN_LISTED


_CHILDREN_LISTED: bool | None = None


def children_of(pid: int) -> list[int]:
    """The children of a process, of every one of its threads ([] when it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as reader:
                found.extend(int(child) for child in reader.read().split())
        except (OSError, ValueError):
            continue
    return found


def process_tree(root: int, pgid: int | None) -> dict[int, str]:
    """Every live process under `root` (by parent chain) or in process group `pgid`: pid -> state.

    The chain is followed down through /proc's children lists: a few reads per process of the
    tree, not a read of every process on the machine (with hundreds of agents, two or three such
    scans per shim were a third of its CPU: bench/spawn.py --burst). The group's members are
    below `root` too when `root` is the shim: it is a child subreaper, and every member of the
    agent's group descends from the agent (a process joins a group only of its own session).
    Without children lists (a kernel built without them) every process is looked at."""
    if not _children_listed():
        return _scan_tree(root, pgid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    tree: dict[int, str] = {}
    for pid in found:
        stat = _read_stat(pid)
        if stat is not None and stat[0] not in ("Z", "X"):
            tree[pid] = stat[0]
    return tree


def _scan_tree(root: int, pgid: int | None) -> dict[int, str]:
    """process_tree from a read of every process's stat (where /proc has no children lists)."""
    stats: dict[int, tuple[str, int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read_stat(int(name))
            if stat is not None:
                stats[int(name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    if pgid is not None:
        found.update(pid for pid, (_, _, group) in stats.items() if group == pgid)
    found.discard(os.getpid())
    return {pid: stats[pid][0] for pid in found if pid in stats and stats[pid][0] not in ("Z", "X")}


def reap_orphans(agent_pid: int | None) -> None:
    """Collect zombies re-parented to this process (never the agent: asyncio waits for it).

    Only this process's own children are looked at (its children lists), not every process."""
    me = os.getpid()
    if _children_listed():
        candidates = [pid for pid in children_of(me) if pid != agent_pid]
    else:
        candidates = [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != agent_pid]
    for pid in candidates:
        stat = _read_stat(pid)
        if stat and stat[1] == me and stat[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def signal_pids(pids: list[int] | dict[int, str], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def input_too_large(size: int) -> str:
    """Why an input of `size` bytes is refused (it names the limit)."""
    return f"the input is {size} bytes; at most {MAX_INPUT_BYTES} bytes (1 MiB) may be sent to an agent"


def heartbeat_problem(fields: dict[str, Any]) -> str | None:
    """Why a heartbeat control line's fields cannot be taken (None when they can)."""
    for key, value in fields.items():
        if key not in HEARTBEAT_FIELDS:
            return f"heartbeat field {key!r} is not allowed (allowed: {', '.join(HEARTBEAT_FIELDS)})"
        if (value is not None and not isinstance(value, HEARTBEAT_FIELDS[key])) or (
            key == "source" and value not in ("agent", "wrapper")
        ):
            return f"heartbeat field {key!r} has the wrong type"
    return None


def approval_problem(fields: dict[str, Any]) -> str | None:
    """Why an `approval_needed` control line cannot be taken (None when it can)."""
    unknown = sorted(set(fields) - {"question", "options", "category"})
    if unknown:
        return f"approval_needed field {unknown[0]!r} is not allowed (allowed: question, options, category)"
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        return "approval_needed needs a non-empty string 'question'"
    if len(question) > 4000:
        return "approval_needed 'question' is longer than 4000 characters"
    options = fields.get("options")
    if options is not None and (
        not isinstance(options, list) or len(options) > 20 or not all(isinstance(o, str) and o for o in options)
    ):
        return "approval_needed 'options' must be a list of at most 20 non-empty strings"
    category = fields.get("category")
    if category is not None and (not isinstance(category, str) or not category or len(category) > 64):
        return "approval_needed 'category' must be a short string"
    return None


# --- the shim ----------------------------------------------------------------------------------


class Shim:
    """One agent, its pipes, its spool and its timers."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.spec: dict[str, Any] = orjson.loads((run_dir / SPEC).read_bytes())
        self.spool_fd = os.open(run_dir / SPOOL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.watchers: set[asyncio.StreamWriter] = set()  # told a byte per spool append
        self.quiet_watchers: set[asyncio.StreamWriter] = set()  # watch the spool themselves (inotify)
        self.ended = False  # the terminal record is spooled
        self.told: set[str] = set()  # lines sent `once` (approval lines), so a re-tell is dropped
        self.process: asyncio.subprocess.Process | None = None
        self.chunk_number = 0
        self.coalescers = {"stdout": OutputCoalescer(), "stderr": OutputCoalescer(parse_control=True)}
        # Secret values of the agent's environment never reach the spool (actors/redact.py).
        secrets = secret_values(self.spec.get("env") or {}, self.spec.get("secret_env") or ())
        self.redactors = {stream: Redactor(secrets) for stream in self.coalescers}
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.paused_since: float | None = None
        self.paused_total = 0.0
        hard = self.spec.get("hard_timeout_s")
        self.deadline: float | None = self.started + float(hard) if hard else None
        self.timers_changed = asyncio.Event()
        self.stop_reason: str | None = None
        self.stop_cause: str | None = None
        self.finished = asyncio.Event()
        self.last_output_at: float | None = None
        self.cgroup: Any = None  # the execution's cgroup(s) (actors/limits.py), None: per-process limits
        self.limits_in_force = "none"
        self.oom_kills = 0  # the OOM kills in the group recorded so far
        self.pids_refused = 0  # the forks pids.max refused, as of the last check
        self._group_polled = False  # the group's counters are read on wake-ups (_group_watch)
        self._group_due = 0.0  # (monotonic) when they may be read again
        self._poll_memory = False  # the OOM kills are polled too (no eventfd from the kernel)
        self._oom_fd: int | None = None  # the group's OOM eventfd, watched by the loop
        self._flushed_at = dict.fromkeys(self.coalescers, -FLUSH_INTERVAL_S)  # loop time of each stream's last chunk
        self._flush_timer: asyncio.TimerHandle | None = None  # one for both streams
        self._files_timer: asyncio.TimerHandle | None = None
        self.adapter = load_adapter(self.spec)  # maps an agent CLI's stdout to typed facts (actors/adapters)
        self.cost = 0.0  # USD reported or estimated so far (usage ticks)
        self.budget: float | None = self.spec.get("max_cost_usd")  # paused for an approval when reached
        self.budget_paused = False
        self.live_usage = True  # the CLI reports usage while it runs (else a budget cannot pause it)
        self.watching_files = False
        self._network_timer: asyncio.TimerHandle | None = None  # the adapter reports the model unreachable

    # spool

    def record(self, type_: str, data: dict[str, Any], cause: str | None = None) -> None:
        line: dict[str, Any] = {"id": new_ulid(), "ts": time.time(), "type": type_, "data": data}
        if cause:
            line["cause"] = cause
        os.write(self.spool_fd, orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        if type_ in TERMINAL_RECORDS:
            # The agent's end frees a slot: a quiet watcher is told at once (a byte; its spawner
            # publishes the end without gathering more); one that connects later gets it with the
            # watch's answer.
            self.ended = True
            for writer in self.quiet_watchers:
                if not writer.is_closing():
                    writer.write(b"\n")
        if self.watchers:  # a spawner that does not watch the spool itself (an older one): a byte
            for writer in list(self.watchers):
                if writer.is_closing():
                    self.watchers.discard(writer)
                elif writer.transport.get_write_buffer_size() == 0:
                    writer.write(b"\n")

    def _output(self, stream: str, text: str | None) -> None:
        if text:
            self.chunk_number += 1
            self.last_output_at = time.time()
            self.record("output", {"stream": stream, "n": self.chunk_number, "text": text})
            if self.adapter is not None:
                self._facts(self.adapter.feed(text) if stream == "stdout" else self.adapter.feed_stderr(text))

    def _facts(self, facts: list[tuple[str, dict[str, Any]]]) -> None:
        ticked = False
        for kind, data in facts:
            if kind == "file.touched" and self.watching_files:
                continue  # the file watcher reports them from the worktree itself
            self.record(kind, data)
            if kind == "usage":
                self.cost += float(data.get("cost_usd") or 0.0)
                ticked = True
        if ticked:
            self._progress()
            self._check_budget()
        adapter = self.adapter
        if adapter is not None and adapter.stdin_done and self.process and self.process.stdin:
            self.process.stdin.close()  # every message sent has its answer: let the agent finish
        if adapter is not None and adapter.unreachable_since is not None and self._network_timer is None:
            self._watch_network()

    def _watch_network(self) -> None:
        """The CLI cannot reach its model and retries (its retry lines keep the execution active):
        after the idle timeout with no progress, record the network failure and end it, as the
        watchdog's idle timeout would (docs/adapters.md)."""
        adapter, idle = self.adapter, self.spec.get("network_timeout_s")
        if adapter is None or not idle or adapter.unreachable_since is None:
            return
        wait = adapter.unreachable_since + float(idle) - time.monotonic()
        self._network_timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._network_due)

    def _network_due(self) -> None:
        self._network_timer = None
        adapter, idle = self.adapter, self.spec.get("network_timeout_s")
        if adapter is None or adapter.unreachable_since is None or not idle:
            return
        if self.paused_since is not None or self.stop_reason is not None or self.process is None:
            return
        if time.monotonic() - adapter.unreachable_since < float(idle):
            self._watch_network()  # progress came and went since: a new episode
            return
        self.record(*adapter.network_result())
        self.record("execution.timed_out", {"kind": "idle", "limit_s": float(idle)})
        self._terminate("timeout", None, float(self.spec.get("cancel_grace_s") or 10.0))

    def _progress(self) -> None:
        """A heartbeat with progress toward the limit the CLI's output lets us measure (budget, else turns)."""
        adapter = self.adapter
        note = None
        if self.budget:
            progress = self.cost / self.budget
            note = f"{usd(self.cost)} of {usd(self.budget)} budget"
        elif adapter is not None and (limit := adapter.max_turns()):
            progress = adapter.turns / limit
            note = f"turn {adapter.turns} of {limit}"
        if note is not None:
            self.record("heartbeat", {"source": "adapter", "note": note, "progress": round(min(progress, 1.0), 4)})

    def _check_budget(self) -> None:
        """Past the budget: record it; pause the agent and ask for an approval when it can still be stopped."""
        if self.budget is None or self.cost < self.budget or self.budget_paused or self.stop_reason is not None:
            return
        budget, self.budget = self.budget, None  # asked once; a resume sets the next budget
        self.record("limit.exceeded", {"limit": "cost", "value": round(self.cost, 6), "maximum": budget})
        if self.live_usage and self.process is not None and self.process.returncode is None:
            self.budget_paused = True
            asyncio.get_running_loop().create_task(self._budget_pause(budget))

    async def _budget_pause(self, budget: float) -> None:
        reply = await self.pause(None) if self.paused_since is None else {"ok": True}
        if not reply.get("ok"):
            self.budget_paused = False
            return  # it ended (or cannot be stopped): limit.exceeded says what happened
        question = (
            f"{self.spec.get('execution_id')} has spent {usd(self.cost)} of its {usd(budget)} budget and is paused. "
            "Approve to continue (corral approve ID --raise-budget USD sets the next limit), reject to cancel it."
        )
        self.record("approval.needed", {"question": question, "options": [], "category": "budget", "source": "budget"})

    def _controls(self, controls: list[ControlLine]) -> None:
        for control in controls:
            line = control.raw[:2000]
            if control.error is not None:
                self.record("protocol.error", {"line": line, "error": control.error})
            elif control.kind == "heartbeat":
                problem = heartbeat_problem(control.fields) if control.fields else None
                if problem:
                    self.record("protocol.error", {"line": line, "error": problem})
                else:
                    self.record("heartbeat", {"source": "agent", **control.fields})
            elif control.kind == "approval_needed":
                problem = approval_problem(control.fields)
                if problem:
                    self.record("protocol.error", {"line": line, "error": problem})
                else:
                    fields = control.fields
                    data = {"question": fields["question"], "options": list(fields.get("options") or [])}
                    self.record("approval.needed", {**data, "category": fields.get("category"), "source": "agent"})
            else:
                self.record(
                    "protocol.error",
                    {
                        "line": line,
                        "error": f"unsupported control message {control.kind!r}"
                        " (supported: heartbeat, approval_needed)",
                    },
                )

    # process tree

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def tree(self) -> dict[int, str]:
        """The agent's processes: its parent chain and process group, and everything in its cgroup."""
        found = process_tree(os.getpid(), self.pid) if self.pid else {}
        if self.cgroup is not None:
            for pid in self.cgroup.pids():
                if pid not in found and (stat := _read_stat(pid)) is not None and stat[0] not in ("Z", "X"):
                    found[pid] = stat[0]
        return found

    async def _script(self, phase: str, preexec: Any) -> bool:
        """The template's setup or teardown script (actors/scripts.py); False when a setup failed (recorded)."""
        from actors.redact import Redactor, secret_values
        from actors.scripts import failure, run_script

        spec = self.spec
        redactor = Redactor(secret_values(spec.get("env") or {}, spec.get("secret_env") or ()))
        recorded: dict[str, Any] = {}

        def record(kind: str, data: dict[str, Any]) -> None:
            recorded.update(data)
            self.record(kind, data)

        def redact(text: str) -> str:
            return (redactor.feed(text.encode()) + redactor.finish()).decode(errors="replace")

        env = netallow.environment(spec.get("sandbox") or {}, spec["env"])
        code = await run_script(spec, phase, env, preexec, record, redact)
        if phase == "setup" and code != 0:
            self.record("execution.failed", {"stage": "setup", "error": failure(code, recorded.get("output", ""))})
            return False
        return True

    # limits (actors/limits.py): a cgroup per execution where the machine has one

    def _limits(self) -> Any:
        """Make the execution's cgroup (every execution, limits or not: pause, cancel and exit act
        on the whole group) and return the `preexec_fn` that joins the agent to it; where no cgroup
        can be made, the per-process rlimit+affinity `preexec_fn` (or None)."""
        from actors.limits import PER_PROCESS, execution_group, make_preexec

        spec = self.spec
        memory, cpus, pids_max = spec.get("memory_bytes"), spec.get("cpus"), spec.get("pids_max")
        self.cgroup = execution_group(f"corral-{spec['execution_id']}", memory, cpus, pids_max)
        if self.cgroup is not None:
            self.limits_in_force = self.cgroup.description
            # Written before the agent starts: a spawner that finds this shim dead kills and removes them.
            paths = [str(path) for path in self.cgroup.paths]
            tmp = self.run_dir / (CGROUPS + ".tmp")
            tmp.write_bytes(orjson.dumps({"version": self.cgroup.version, "paths": paths}))
            tmp.rename(self.run_dir / CGROUPS)
            return self.cgroup.join_preexec()
        self.limits_in_force = PER_PROCESS if memory or cpus else "none"
        return make_preexec(memory, cpus)

    def _agent_join(self, preexec: Any) -> tuple[Any, list[str]]:
        """(preexec_fn, the groups' join files) for the agent's start: a cgroup alone is joined by the `sh`
        that starts it (sandbox.wrap `join`), not by a preexec_fn, which makes Python fork instead of
        vfork (bench/spawn.py). A shadow workspace's preexec_fn (it joins too) and per-process
        limits stay; so does a command not found on PATH (its start fails as before, execution.failed)."""
        spec = self.spec
        if self.cgroup is None or spec.get("shadow"):
            return preexec, []
        program = str(spec["command"][0])
        if (spec.get("sandbox") or {}).get("mode") != "bwrap" and (
            ("/" in program and not os.path.isabs(program))
            or shutil.which(program, path=(spec.get("env") or {}).get("PATH")) is None
        ):
            return preexec, []
        return None, [str(path) for path in self.cgroup.join_files]

    def _check_group(self, *, memory: bool = True, pids: bool = True) -> None:
        """Record the limits the kernel enforced since the last check: OOM kills, refused forks."""
        group = self.cgroup
        if group is None:
            return
        # (only the execution's own limits are recorded: one of a group above it has no maximum here)
        if memory and (kills := group.oom_kills()) > self.oom_kills:
            self.oom_kills = kills
            peak = group.memory_peak()
            maximum = self.spec.get("memory_bytes")
            if maximum:
                value = peak if peak is not None else maximum
                self.record("limit.exceeded", {"limit": "memory", "value": value, "maximum": maximum})
        if pids and (refused := group.pids_refused()) > self.pids_refused:
            first = self.pids_refused == 0
            self.pids_refused = refused
            maximum = self.spec.get("pids_max")
            if first and maximum:  # a fork bomb is refused thousands of times: recorded once
                self.record("limit.exceeded", {"limit": "pids", "value": len(group.pids()), "maximum": maximum})

    async def _group_watch(self, done: asyncio.Event) -> None:
        """Record the group's limits while the agent runs (its exit checks them all once more).

        An OOM kill at once where the kernel signals it (cgroup v1: an eventfd, no wake-up while
        nothing happens). Refused forks (and OOM kills elsewhere) are polled without a timer of
        their own while the agent writes: its output's wake-ups read them at most every
        GROUP_CHECK_S (`_poll_group`); a silent agent's every GROUP_IDLE_CHECK_S.
        """
        group = self.cgroup
        if group is None:
            return
        loop = asyncio.get_running_loop()
        if self.spec.get("memory_bytes"):
            self._oom_fd = group.oom_events()
            if self._oom_fd is not None:
                loop.add_reader(self._oom_fd, self._oom_signalled, self._oom_fd)
            self._poll_memory = self._oom_fd is None
        self._group_polled = self._poll_memory or bool(self.spec.get("pids_max"))
        try:
            while self._group_polled and not done.is_set():
                await asyncio.sleep(max(0.0, self._group_due - GROUP_CHECK_S + GROUP_IDLE_CHECK_S - time.monotonic()))
                if time.monotonic() >= self._group_due:
                    self._poll_group()
            await done.wait()
        finally:
            self._unwatch_oom()

    def _poll_group(self) -> None:
        self._group_due = time.monotonic() + GROUP_CHECK_S
        with contextlib.suppress(OSError):
            self._check_group(memory=self._poll_memory, pids=bool(self.spec.get("pids_max")))

    def _oom_signalled(self, fd: int) -> None:
        with contextlib.suppress(OSError):  # (BlockingIOError: read already)
            os.eventfd_read(fd)
        self._oom_recheck(0.05)

    def _oom_recheck(self, delay: float) -> None:
        """The kernel signals an OOM as it begins, before its kill is counted: read the count
        until it moved, a few times over about three seconds."""
        before = self.oom_kills
        with contextlib.suppress(OSError):
            self._check_group(pids=False)
        if self.oom_kills == before and self._oom_fd is not None and delay < 2.0:
            asyncio.get_running_loop().call_later(delay, self._oom_recheck, delay * 2)

    def _unwatch_oom(self) -> None:
        if self._oom_fd is not None:
            asyncio.get_running_loop().remove_reader(self._oom_fd)
            self._oom_fd = None  # (the group closes it)
        self._group_polled = False

    def _close_group(self, returncode: int) -> None:
        """The agent has exited: record what the group's limits did, kill what is left in it, remove it.

        An agent that did not exit 0 after the OOM killer struck in its group ended because of
        its memory limit: that is its exit reason (unless something stopped it first).
        """
        group = self.cgroup
        if group is None:
            return
        self._unwatch_oom()
        with contextlib.suppress(OSError):
            self._check_group()
        if self.oom_kills and self.stop_reason is None and returncode != 0 and self.spec.get("memory_bytes"):
            self.stop_reason = "memory_limit"
        with contextlib.suppress(OSError):
            group.close(timeout=5.0)

    # main

    async def main(self) -> int:
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            asyncio.get_running_loop().add_signal_handler(sig, self._terminate, "spawner_stopped", None, 5.0)
        if LISTENER is not None:  # bound by the fork server's child before the spawner got the pid
            server = await asyncio.start_unix_server(self._serve, sock=LISTENER, limit=CONTROL_LINE_LIMIT)
        else:
            server = await asyncio.start_unix_server(
                self._serve, path=socket_address(self.run_dir), limit=CONTROL_LINE_LIMIT
            )
        try:
            await self._run_agent()
        finally:
            # however the shim ends (a spawn failure, a bug): no group, frozen or not, outlives it
            if self.cgroup is not None:
                with contextlib.suppress(OSError):
                    self.cgroup.close(timeout=5.0)
            server.close()
            for writer in [*self.watchers, *self.quiet_watchers]:
                writer.close()
            os.fsync(self.spool_fd)
            os.close(self.spool_fd)
        return 0

    @staticmethod
    def _file_events_note(spec: dict[str, Any], watcher: FileWatcher | None) -> dict[str, Any]:
        """Whether live file events flow, and a warning when they were wanted but cannot."""
        if not spec.get("watch_files", True):
            return {"file_events": False}
        if watcher is not None:
            return {"file_events": True}
        try:
            limit = Path("/proc/sys/fs/inotify/max_user_instances").read_text().strip()
            where = f"this user's {limit} inotify instances (fs.inotify.max_user_instances) are used up"
        except OSError:
            where = "inotify is not available here"
        return {
            "file_events": False,
            "warnings": [
                f"no live file events: {where}; checkpoints are still taken on pause, exit, approval and "
                "`corral checkpoint`, but not after N files (raise the sysctl to get them back)"
            ],
        }

    async def _run_agent(self) -> None:
        spec = self.spec
        command: list[str] = spec["command"]
        preexec = self._limits()
        if spec.get("shadow"):  # workspace = "shadow": its worktree path is an overlay in its own mount namespace
            from actors import shadow

            preexec = shadow.preexec(spec["cwd"], spec["shadow"], preexec)
        if self.adapter is not None:  # what this host's CLI supports (cached per binary): recorded first
            capabilities = await asyncio.to_thread(probe, self.adapter.name, command[0])
            self.live_usage = bool(capabilities["features"].get("live_usage"))
            self.record("agent.capabilities", {"agent": self.adapter.name, **capabilities})
        # Watch the worktree before the agent starts, so its first writes are seen too.
        watched = shadow_upper(spec) or Path(spec["cwd"])  # (shadow: its writes land in the upper layer)
        watcher = FileWatcher.open(watched) if spec.get("watch_files", True) else None
        # The agent's stdout and stderr are plain pipes read from loop callbacks (not stream
        # reader tasks): a wake-up per write instead of two, hundreds of shims at once.
        if spec.get("setup") and not await self._script("setup", preexec):  # actors/scripts.py
            if watcher is not None:
                watcher.close()
            return
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        gate = netallow.Gate.wanted(spec, self.record)  # network = "allow": its sockets go in before it runs
        agent_preexec, join = self._agent_join(preexec)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *sandbox.wrap(spec, command, gate.bwrap_args() if gate else (), join),  # bwrap unless mode = "off"
                cwd=spec["cwd"],
                env=netallow.environment(spec.get("sandbox") or {}, spec["env"]),
                stdin=asyncio.subprocess.PIPE,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                preexec_fn=agent_preexec,
                pass_fds=gate.child_fds if gate else (),
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            if gate is not None:
                gate.abandon()
            error = getattr(exc, "strerror", None) or str(exc)
            self.record("execution.failed", {"stage": "spawn", "error": f"cannot start {command[0]!r}: {error}"})
            if watcher is not None:
                watcher.close()
            return
        if gate is not None and not await self._open_gate(gate, (out_r, out_w, err_r, err_w), watcher):
            return
        self.started = time.monotonic()
        if self.deadline is not None:
            self.deadline = self.started + float(spec["hard_timeout_s"])
        self.record(
            "execution.started",
            {
                "pid": self.process.pid,
                "pgid": self.process.pid,
                "host": socket.gethostname(),
                "command": command,
                "sandbox": sandbox.in_force(spec),
                "cwd": spec["cwd"],
                "limits": self.limits_in_force,
                **self._file_events_note(spec, watcher),
            },
        )
        os.close(out_w)
        os.close(err_w)
        process = self.process
        self.watching_files = watcher is not None
        if self.adapter is not None and process.stdin is not None:
            if first := self.adapter.initial_input():
                process.stdin.write(first)
            if not self.adapter.keeps_stdin:
                process.stdin.close()
        done = asyncio.Event()
        readers = asyncio.gather(self._read("stdout", out_r), self._read("stderr", err_r))
        helpers = [
            asyncio.create_task(self._timers(done)),
        ]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, reap_orphans, process.pid)
        if spec.get("disk_bytes"):
            helpers.append(asyncio.create_task(self._disk_quota(done, int(spec["disk_bytes"]))))
        if self.cgroup is not None:
            helpers.append(asyncio.create_task(self._group_watch(done)))
        if watcher is not None:
            loop.add_reader(watcher.fd, self._files_changed, watcher)
        returncode = sandbox.exit_status(spec, await process.wait())  # bwrap's 128+N is signal N
        # its commits onto its real branch (a thread only when it moved: no pool per shim otherwise)
        synced = await asyncio.to_thread(sandbox.sync_branch, spec) if sandbox.branch_moved(spec) else None
        if synced and " not moved " in synced:
            self._output("stderr", f"corral: {synced}\n")
        try:
            # A grandchild may hold the pipes open after the agent exits; don't wait forever.
            await asyncio.wait_for(asyncio.shield(readers), DRAIN_AFTER_EXIT_S)
        except TimeoutError:
            signal_pids(self.tree(), signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readers, 1.0)
        # Nothing the agent started may outlive it: its group and every descendant.
        for _ in range(3):
            left = self.tree()
            if not left:
                break
            signal_pids(left, signal.SIGKILL)  # a stopped process dies too, and is never continued first
            await asyncio.sleep(0.05)
        # From here on a child's end is asyncio's to read (the teardown script's, on its pidfd in
        # this loop): the orphan reaper would race it for the exit status. The tree's last zombies
        # are collected once now.
        loop.remove_signal_handler(signal.SIGCHLD)
        reap_orphans(process.pid)
        done.set()
        for task in helpers:
            task.cancel()
        if gate is not None:
            gate.close()
        if spec.get("teardown"):  # in its cgroup still, before the exit is recorded (actors/scripts.py)
            await self._script("teardown", preexec)
        self._close_group(returncode)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._files_timer is not None:
            self._files_timer.cancel()
        if self._network_timer is not None:
            self._network_timer.cancel()
        if watcher is not None:
            loop.remove_reader(watcher.fd)
            watcher.read()
            self._touched(watcher)
        for stream, coalescer in self.coalescers.items():
            self._output(stream, coalescer.flush(final=True))
        if self.adapter is not None:
            self._facts(self.adapter.finish())
        self._disk_full_at_exit()
        self.record(
            "execution.exited",
            {
                "exit_code": returncode if returncode >= 0 else None,
                "signal": -returncode if returncode < 0 else None,
                "duration_s": round(time.monotonic() - self.started, 6),
                "reason": self.stop_reason or "exited",
            },
            self.stop_cause,
        )
        if watcher is not None:  # after the end is recorded: closing an inotify instance waits for the
            watcher.close()  # kernel's grace period (~13 ms p50 in a busy pipeline), and the end frees a slot

    async def _open_gate(self, gate: netallow.Gate, pipes: tuple[int, ...], watcher: FileWatcher | None) -> bool:
        """network = "allow": the proxy and forwards inside the agent's namespace, then the agent runs.
        False: they could not be made; the agent (which never ran) is killed and the start failed."""
        gate.started()
        try:
            await gate.attach()
            return True
        except (OSError, TimeoutError) as exc:
            error = f"cannot serve the allow list inside the agent's network namespace: {exc}"
        gate.abandon()
        gate.close()
        signal_pids(self.tree(), signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()
        for fd in pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        if watcher is not None:
            watcher.close()
        self.record("execution.failed", {"stage": "spawn", "error": error})
        return False

    def _touched(self, watcher: FileWatcher) -> None:
        for path, change in watcher.take():
            self.record("file.touched", {"path": path, "change": change})

    def _files_changed(self, watcher: FileWatcher) -> None:
        """inotify has news: gather it; report it FILE_EVENTS_INTERVAL_S after the first change."""
        watcher.read()
        if watcher.pending and self._files_timer is None:
            self._files_timer = asyncio.get_running_loop().call_later(
                FILE_EVENTS_INTERVAL_S, self._report_files, watcher
            )

    def _report_files(self, watcher: FileWatcher) -> None:
        self._files_timer = None
        if watcher.pending:
            self._touched(watcher)

    def _read(self, stream: str, fd: int) -> "asyncio.Future[None]":
        """Read one of the agent's pipes from a loop callback; the future resolves at its end."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)

        def ready() -> None:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            try:
                if data:
                    self._feed(stream, data)
                    return
                loop.remove_reader(fd)
                os.close(fd)
                self._end(stream)
            except Exception as exc:  # handed to whoever waits for the pipe
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(fd)
                if not ended.done():
                    ended.set_exception(exc)
                return
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(fd, ready)
        return ended

    def _feed(self, stream: str, data: bytes) -> None:
        coalescer = self.coalescers[stream]
        chunks, controls = coalescer.feed(self.redactors[stream].feed(data))
        if controls:
            self._controls(controls)
        for chunk in chunks:
            self._output(stream, chunk)
        if coalescer.flushable:
            self._flush_or_wait(stream, asyncio.get_running_loop())
        if self._group_polled and time.monotonic() >= self._group_due:
            self._poll_group()

    def _end(self, stream: str) -> None:
        coalescer = self.coalescers[stream]
        redactor = self.redactors[stream]
        chunks, controls = coalescer.feed(redactor.finish())
        self._controls(controls)
        for chunk in chunks:
            self._output(stream, chunk)
        text, controls = coalescer.finish()
        self._controls(controls)
        self._output(stream, text)

    def _flush_or_wait(self, stream: str, loop: asyncio.AbstractEventLoop) -> None:
        """Whole lines wait: write them now if the stream's last chunk is FLUSH_INTERVAL_S old, else
        when it will be (at most a chunk per stream per interval, besides size cuts).

        An agent that writes now and then has each write recorded at once, with no timer; a chatty
        one has its lines gathered into a chunk per interval. One timer serves both streams, and a
        partial line alone arms none (it waits for its end, or for PARTIAL_LINE_BYTES).
        """
        now = time.monotonic()  # the loop's clock
        due = self._flushed_at[stream] + FLUSH_INTERVAL_S
        if now >= due - 0.001:  # (a timer may fire a hair early)
            self._flushed_at[stream] = now
            self._output(stream, self.coalescers[stream].flush())
        elif self._flush_timer is None or self._flush_timer.when() > due:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            self._flush_timer = loop.call_at(due, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        loop = asyncio.get_running_loop()
        for stream, coalescer in self.coalescers.items():
            if coalescer.flushable:
                self._flush_or_wait(stream, loop)

    async def _timers(self, done: asyncio.Event) -> None:
        """The hard timeout: wall clock while running; frozen while paused."""
        while not done.is_set():
            self.timers_changed.clear()
            wait: float | None = None
            if self.deadline is not None and self.paused_since is None and self.stop_reason is None:
                wait = self.deadline - time.monotonic()
                if wait <= 0:
                    limit = float(self.spec["hard_timeout_s"])
                    self.record("execution.timed_out", {"kind": "hard", "limit_s": limit})
                    self._terminate("timeout", None, float(self.spec.get("cancel_grace_s") or 10.0))
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.timers_changed.wait(), wait)

    _disk_exceeded = False  # limit.exceeded (disk) recorded

    def _disk_full_at_exit(self) -> None:
        """Record the quota reached by an agent that ended on its ENOSPC before the next poll saw it."""
        from actors import diskquota

        maximum, cwd = self.spec.get("disk_bytes"), Path(self.spec["cwd"])
        if maximum and not self._disk_exceeded and diskquota.is_mounted(cwd):
            used = diskquota.full(cwd, int(maximum))
            if used is not None:
                self._disk_exceeded = True
                self.record("limit.exceeded", {"limit": "disk", "value": used, "maximum": int(maximum)})

    async def _disk_quota(self, done: asyncio.Event, maximum: int) -> None:
        """Record a disk quota reached, and pause the agent there (docs/control.md).

        A worktree on its own file system (actors/diskquota.py) cannot grow past the quota: the
        kernel refused the writes with ENOSPC, and one statvfs per poll sees it full. Elsewhere
        the worktree is walked like du, and the agent paused after the fact.
        """
        from actors import diskquota
        from actors.limits import disk_usage

        cwd = Path(self.spec["cwd"])
        kernel = diskquota.is_mounted(cwd)
        while not done.is_set():
            await asyncio.sleep(DISK_CHECK_S)
            if self.paused_since is not None or self.stop_reason is not None:
                continue
            if kernel:
                full_at = diskquota.full(cwd, maximum)
                full, used = full_at is not None, full_at or 0
            else:
                used = await asyncio.to_thread(disk_usage, cwd)
                full = used > maximum
            if full:
                self._disk_exceeded = True
                self.record("limit.exceeded", {"limit": "disk", "value": used, "maximum": maximum})
                await self.pause(None)

    # control

    def _terminate(self, reason: str, cause: str | None, grace_s: float) -> None:
        """Stop the agent: SIGTERM to the tree, SIGKILL after `grace_s`.

        A paused tree is killed where it stands (SIGKILL reaches a stopped process; SIGCONT would
        let it run again, and a stopped process cannot act on SIGTERM anyway), and so is any tree
        when `grace_s` is 0 (an approval rejected or expired, a budget refused): the agent runs no
        further instruction.
        """
        if self.stop_reason is not None or self.process is None or self.process.returncode is not None:
            return
        self.stop_reason = reason
        self.stop_cause = cause
        self.timers_changed.set()
        if self.paused_since is not None or grace_s <= 0:
            self._kill_tree()
            return
        tree = self.tree()
        # not to bwrap's monitor: its end would read as the agent's while the agent still runs
        # (it dies with the rest in _kill_tree, or when the agent has ended)
        tree.pop(sandbox.monitor_of(self.spec, self.pid) or 0, None)
        signal_pids(tree, signal.SIGTERM)
        signal_pids(tree, signal.SIGCONT)  # a process stopped by someone else cannot act on SIGTERM
        asyncio.get_running_loop().call_later(grace_s, self._kill_tree)

    def _kill_tree(self) -> None:
        """SIGKILL every process of the tree, until none is left (a fork racing the first pass too).

        With a cgroup, the whole group first: frozen while it is killed (v1) or cgroup.kill (v2),
        so nothing forks its way out, and a daemon that left the parent chain dies too.
        """
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.kill()
        for _ in range(3):
            tree = self.tree()
            if not tree:
                return
            signal_pids(tree, signal.SIGKILL)

    async def pause(self, cause: str | None) -> dict[str, Any]:
        if self.paused_since is not None:
            return {"ok": False, "error": "already paused"}
        if self.cgroup is not None:
            return await self._freeze(cause)
        deadline = time.monotonic() + STOP_CHECK_S
        while True:
            tree = self.tree()
            running = [pid for pid, state in tree.items() if state not in ("T", "t")]
            if not running and tree:
                break
            if time.monotonic() > deadline:
                signal_pids(tree, signal.SIGCONT)
                return {"ok": False, "error": f"processes {running[:5]} did not stop within {STOP_CHECK_S:.0f}s"}
            signal_pids(running, signal.SIGSTOP)
            await asyncio.sleep(0.01)
        self.paused_since = time.monotonic()
        self.timers_changed.set()
        self.record("execution.paused", {"pids": sorted(tree)}, cause)
        return {"ok": True, "pids": sorted(tree)}

    async def resume(self, cause: str | None, max_cost_usd: float | None = None) -> dict[str, Any]:
        if self.paused_since is None:
            return {"ok": False, "error": "not paused"}
        if self.budget_paused:  # past the budget: go on up to the new one (none given: no limit)
            self.budget_paused = False
            self.budget = max_cost_usd
        if self.cgroup is not None:
            return await self._thaw(cause)
        deadline = time.monotonic() + STOP_CHECK_S
        while True:
            tree = self.tree()
            stopped = [pid for pid, state in tree.items() if state in ("T", "t")]
            if not stopped:
                break
            if time.monotonic() > deadline:
                return {"ok": False, "error": f"processes {stopped[:5]} did not continue"}
            signal_pids(stopped, signal.SIGCONT)
            await asyncio.sleep(0.01)
        paused_for = time.monotonic() - self.paused_since
        self.paused_total += paused_for
        if self.deadline is not None:
            self.deadline += paused_for
        self.paused_since = None
        self.timers_changed.set()
        self.record("execution.resumed", {"pids": sorted(tree)}, cause)
        return {"ok": True, "pids": sorted(tree)}

    async def _freeze(self, cause: str | None) -> dict[str, Any]:
        """Pause through the freezer: the whole group stops at once, so no process forks its way
        out between two rounds of signals (the signal rounds are the fallback without a cgroup)."""
        group = self.cgroup
        try:
            frozen = await asyncio.to_thread(group.freeze, STOP_CHECK_S)
        except OSError as exc:
            return {"ok": False, "error": f"cannot freeze the agent's cgroup: {exc}"}
        if not frozen:
            with contextlib.suppress(OSError):
                group.thaw()
            return {"ok": False, "error": f"the agent's processes did not freeze within {STOP_CHECK_S:.0f}s"}
        pids = sorted(group.pids())
        self.paused_since = time.monotonic()
        self.timers_changed.set()
        self.record("execution.paused", {"pids": pids}, cause)
        return {"ok": True, "pids": pids}

    async def _thaw(self, cause: str | None) -> dict[str, Any]:
        group = self.cgroup
        try:
            group.thaw()
        except OSError as exc:
            return {"ok": False, "error": f"cannot thaw the agent's cgroup: {exc}"}
        pids = sorted(group.pids())
        paused_for = time.monotonic() - (self.paused_since or time.monotonic())
        self.paused_total += paused_for
        if self.deadline is not None:
            self.deadline += paused_for
        self.paused_since = None
        self.timers_changed.set()
        self.record("execution.resumed", {"pids": pids}, cause)
        return {"ok": True, "pids": pids}

    async def deliver_input(self, text: str, cause: str | None) -> dict[str, Any]:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            refusal = self.adapter.input_refusal() if self.adapter else "the agent's stdin is closed"
            return {"ok": False, "error": refusal}
        size = len(text.encode(errors="surrogatepass"))
        if size > MAX_INPUT_BYTES:
            return {"ok": False, "error": input_too_large(size)}
        data = self.adapter.encode_input(text) if self.adapter is not None else text.encode()
        try:
            process.stdin.write(data)
            await asyncio.wait_for(process.stdin.drain(), INPUT_TIMEOUT_S)
        except TimeoutError:
            return {"ok": False, "error": f"the agent did not read its stdin within {INPUT_TIMEOUT_S:.0f}s"}
        except (BrokenPipeError, ConnectionResetError):
            return {"ok": False, "error": "the agent closed its stdin"}
        if self.adapter is not None:
            self.adapter.input_delivered()
        self.record("input.delivered", {"text": text, "bytes": len(data)}, cause)
        return {"ok": True, "bytes": len(data)}

    def extend(self, seconds: float, cause: str | None) -> dict[str, Any]:
        if self.deadline is None:
            return {"ok": False, "error": "it has no hard timeout (start it with --timeout)"}
        self.deadline += seconds
        remaining = self.deadline - (self.paused_since or time.monotonic())
        hard_deadline = time.time() + remaining
        self.timers_changed.set()
        self.record("timeout.extended", {"hard_deadline": _iso(hard_deadline)}, cause)
        return {"ok": True, "hard_deadline": _iso(hard_deadline)}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        remaining = None
        if self.deadline is not None:
            remaining = round(self.deadline - (self.paused_since or now), 3)
        return {
            "ok": True,
            "pid": self.pid,
            "paused": self.paused_since is not None,
            "paused_total_s": round(self.paused_total + (now - self.paused_since if self.paused_since else 0), 3),
            "hard_remaining_s": remaining,
            "stopping": self.stop_reason,
            "processes": len(self.tree()),
            "last_output_at": self.last_output_at,
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not sandbox.peer_outside(writer.get_extra_info("socket")):  # an agent reaching a shim's socket
                writer.write(b'{"ok":false,"error":"refused: the caller runs inside a sandbox"}\n')
                await writer.drain()
                return
            try:
                line = await reader.readline()
            except ValueError:  # longer than CONTROL_LINE_LIMIT: answered, not dropped in silence
                error = f"the control request is longer than {CONTROL_LINE_LIMIT} bytes"
                writer.write(orjson.dumps({"ok": False, "error": error}) + b"\n")
                await writer.drain()
                return
            op: dict[str, Any] = orjson.loads(line) if line else {}
            kind = op.get("op")
            cause = op.get("cause")
            if kind == "watch":
                # quiet: the spawner watches the spool file itself and only needs to see this
                # connection end with the shim; otherwise it is told a byte per spool append.
                watchers = self.quiet_watchers if op.get("quiet") else self.watchers
                watchers.add(writer)
                writer.write(b"\n\n" if self.ended and op.get("quiet") else b"\n")
                try:
                    await reader.read()  # until the spawner goes away
                except asyncio.CancelledError:
                    return  # the shim is ending (asyncio.run cancels what is left): so does the watch
                finally:
                    watchers.discard(writer)
                return
            reply: dict[str, Any]
            if self.process is None or self.process.returncode is not None:
                reply = {"ok": False, "error": "the agent is not running"}
            elif kind == "input" and op.get("once") and str(op["text"]) in self.told:
                reply = {"ok": True, "duplicate": True}  # a restarted spawner telling it again
            elif kind == "input":
                reply = await self.deliver_input(str(op["text"]), cause)
                if op.get("once") and reply.get("ok"):
                    self.told.add(str(op["text"]))
            elif kind == "pause":
                reply = await self.pause(cause)
            elif kind == "resume":
                reply = await self.resume(cause, op.get("max_cost_usd"))
            elif kind == "cancel":  # a paused agent is killed as it stands, never continued (_terminate)
                self._terminate(str(op.get("reason") or "cancelled"), cause, float(op.get("grace_s", 10.0)))
                reply = {"ok": True}
            elif kind == "extend":
                reply = self.extend(float(op["seconds"]), cause)
            elif kind == "status":
                reply = self.status()
            else:
                reply = {"ok": False, "error": f"unknown op {kind!r}"}
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
        except (ConnectionError, orjson.JSONDecodeError, KeyError, ValueError):
            pass
        finally:
            writer.close()


def shadow_upper(spec: dict[str, Any]) -> Path | None:
    """A shadow workspace's upper layer (actors/shadow.py), where the agent's writes land; else None."""
    return Path(spec["shadow"]) / "upper" if spec.get("shadow") else None


def usd(amount: float) -> str:
    """$2.5000 for amounts of a cent or more; tiny ones in two significant digits ($1e-07)."""
    return f"${amount:.4f}" if amount >= 0.01 or amount == 0 else f"${amount:.2g}"


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1e6):06d}Z"


def _watch_children_with_pidfds() -> None:
    """The agent's end is waited for on a pidfd in the loop, not in a thread per child.

    Python 3.11's default child watcher starts a thread for every subprocess (its waitpid): a
    thread's start is waited for, ~4 ms per shim before the agent counts as running when the
    cores are busy. 3.12 uses pidfds by itself where the kernel has them (Linux 5.3+)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an older kernel, or a seccomp filter that refuses it
        return
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m actors.shim RUN_DIR\n")
        return 2
    shim = Shim(Path(sys.argv[1]))
    # asyncio checks every signal handler added or removed against signal.valid_signals(), which
    # builds a set of 64 enum members each time (~0.1 ms; 8 times in a shim's life): the set is
    # the same for the whole process, so this process asks once.
    valid = signal.valid_signals()
    signal.valid_signals = lambda: valid
    _watch_children_with_pidfds()
    # Everything imported and built so far lives as long as the shim: keep it out of the
    # collector's full passes.
    gc.freeze()
    return asyncio.run(shim.main())


if __name__ == "__main__":
    sys.exit(main())
