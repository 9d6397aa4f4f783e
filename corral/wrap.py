"""`corral wrap [--interval S] -- TOOL [ARGS...]`: run a tool and heartbeat on its behalf.

For agents that cannot write heartbeats themselves (third-party CLIs). The tool inherits stdin
and stdout; its stderr goes through the wrapper line by line, and every `interval` seconds the
wrapper writes `{"corral":"heartbeat","source":"wrapper","note":...}` on stderr, but only if
the tool made progress since the previous tick:

- its process tree (the tool and its live descendants, found via /proc) used CPU time, at least
  1% of the interval (and at least one clock tick), so a hung tool whose runtime wakes up now and
  then does not look alive; or
- it wrote to stderr. Its stdout is inherited, the wrapper cannot see it: output on stdout only
  counts through the CPU it costs.

A hung tool (no CPU, no stderr) gets no heartbeats, so Corral's idle detection still fires.

Heartbeats are only written between whole lines of the tool's stderr: a partial line (a prompt)
is passed on after a short wait, and a heartbeat due meanwhile waits for that line's newline.
SIGTERM, SIGINT and SIGHUP are forwarded to the tool (a signal sent to the whole process group
reaches the tool twice); the wrapper exits with the tool's exit code, 128+N if signal N killed
it, 127 if the tool cannot be found. `python -m corral.wrap ...` does the same without the
import cost of the whole CLI.
"""

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from actors.heartbeat import format_heartbeat
from corral.errors import UsageError
from corral.home import Home

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PARTIAL_LINE_DELAY = 0.2  # seconds a partial line is held back waiting for its newline
MAX_PENDING = 64 * 1024  # a longer partial line is passed on at once
MIN_CPU_FRACTION = 0.01  # of the interval: less CPU than this is not progress
READ_SIZE = 64 * 1024
USAGE = "usage: corral wrap [--interval S] -- TOOL [ARGS...]"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cmd_wrap(home: Home, args: Any) -> int:
    """The `corral wrap` command (`home` is not used)."""
    return wrap(list(args.command), float(args.interval))


def wrap(command: Sequence[str], interval: float = 5.0) -> int:
    """Run `command` (a leading "--" is dropped), heartbeating while it works; return its exit code."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(f"wrap needs a command to run ({USAGE})")
    if not interval > 0:
        raise UsageError(f"--interval must be a positive number of seconds, not {interval}")
    return _Wrapper(argv, interval).run()


class _Wrapper:
    def __init__(self, argv: list[str], interval: float) -> None:
        self.argv = argv
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.reaped = False
        self.pending_signals: list[int] = []
        self.pending = bytearray()  # the tool's stderr not yet written: a partial line
        self.pending_since = 0.0
        self.at_line_start = True  # what we wrote to stderr ends with a newline
        self.beat_due: bytes | None = None  # a heartbeat waiting for the current line to end
        self.saw_output = False
        self.stderr_ok = True
        self.tree = _ProcessTree()

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            try:
                self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE)
            except FileNotFoundError:
                return _fail(127, f"{self.argv[0]}: command not found")
            except PermissionError:
                return _fail(126, f"{self.argv[0]}: permission denied")
            except OSError as exc:
                return _fail(126, f"{self.argv[0]}: cannot run: {exc.strerror or exc}")
            for sig in self.pending_signals:
                self._forward(sig)
            self.pending_signals.clear()
            self._loop(self.proc)
            code = self.proc.wait()
            self.reaped = True
            return 128 - code if code < 0 else code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self, proc: "subprocess.Popen[bytes]") -> None:
        assert proc.stderr is not None
        pipe = proc.stderr.fileno()
        os.set_blocking(pipe, False)
        selector = selectors.DefaultSelector()
        selector.register(pipe, selectors.EVENT_READ, "pipe")
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        pipe_open = True
        self.tree.sample(proc.pid)  # the baseline
        next_tick = time.monotonic() + self.interval
        try:
            while True:
                now = time.monotonic()
                deadline = next_tick
                if self.pending:
                    deadline = min(deadline, self.pending_since + PARTIAL_LINE_DELAY)
                timeout = max(0.0, deadline - now)
                if pidfd < 0:
                    timeout = min(timeout, 0.25)  # no pidfd: poll for the exit
                exited = False
                for key, _ in selector.select(timeout):
                    if key.data == "exit":
                        exited = True
                    elif not self._read(pipe):
                        selector.unregister(pipe)
                        pipe_open = False
                if exited or (pidfd < 0 and proc.poll() is not None):
                    break
                now = time.monotonic()
                if self.pending and now >= self.pending_since + PARTIAL_LINE_DELAY:
                    self._emit(bytes(self.pending))
                    self.pending.clear()
                if now >= next_tick:
                    self._tick(proc.pid)
                    next_tick += self.interval * max(1, int((now - next_tick) / self.interval) + 1)
            # The tool is gone: what it wrote is in the pipe already; a descendant that still holds
            # the pipe open must not keep the wrapper waiting.
            while pipe_open and self._read(pipe):
                pass
            if self.pending:
                self._emit(bytes(self.pending))
                self.pending.clear()
        finally:
            selector.close()
            if pidfd >= 0:
                os.close(pidfd)
            proc.stderr.close()

    def _read(self, pipe: int) -> bool:
        """Read what is available; False at end of file (or when nothing is left to read)."""
        try:
            data = os.read(pipe, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            return False
        if not data:
            return False
        self.saw_output = True
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending += data
        cut = self.pending.rfind(b"\n")
        if cut >= 0:
            self._emit(bytes(self.pending[: cut + 1]))
            del self.pending[: cut + 1]
            self.pending_since = time.monotonic()
        if len(self.pending) >= MAX_PENDING:
            self._emit(bytes(self.pending))
            self.pending.clear()
        return True

    def _emit(self, data: bytes) -> None:
        """Write the tool's stderr bytes, then a heartbeat that waited for the line to end."""
        if not data:
            return
        self._write(data)
        self.at_line_start = data.endswith(b"\n")
        if self.at_line_start and self.beat_due is not None:
            self._write(self.beat_due)
            self.beat_due = None

    def _tick(self, pid: int) -> None:
        cpu_ticks = self.tree.sample(pid)
        cpu = cpu_ticks / CLOCK_TICKS
        notes = []
        if cpu_ticks >= 1 and cpu >= MIN_CPU_FRACTION * self.interval:
            notes.append(f"cpu {cpu:.2f}s")
        if self.saw_output:
            notes.append("output")
        self.saw_output = False
        if not notes:
            self.beat_due = None  # no progress in this interval: a waiting heartbeat is stale
            return
        line = format_heartbeat(", ".join(notes), source="wrapper")
        if self.at_line_start:
            self._write(line)
        else:
            self.beat_due = line

    def _write(self, data: bytes) -> None:
        if not self.stderr_ok:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(2, view) :]
        except BlockingIOError:
            # stderr is non-blocking (shared with someone who set O_NONBLOCK): wait until writable
            _wait_writable(2)
            self._write(bytes(view))
        except OSError:
            self.stderr_ok = False  # nobody reads our stderr any more; keep draining the tool's

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            self.pending_signals.append(signum)
        else:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self.proc is not None and not self.reaped:
            # Not yet reaped, so the pid cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)


def _wait_writable(fd: int) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_WRITE)
        sel.select(1.0)


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"corral: error: {message}\n")
    sys.stderr.flush()
    return code


class _ProcessTree:
    """CPU time used by a process and its live descendants, read from /proc.

    Each process is known by (pid, start time) so a reused pid is not mistaken for the old one.
    Its count is utime+stime+cutime+cstime: the CPU of a child that exited and was reaped moves
    into its parent's cutime/cstime and is not lost. A descendant that leaves the tree (orphaned
    by a double fork) is not followed.
    """

    def __init__(self) -> None:
        self.known: dict[tuple[int, int], int] = {}

    def sample(self, root: int) -> int:
        """Return the clock ticks the tree used since the previous sample."""
        current: dict[tuple[int, int], int] = {}
        for pid in self._tree(root):
            stat = _read_stat(pid)
            if stat is not None:
                current[(pid, stat[0])] = stat[1]
        used = sum(max(0, ticks - self.known.get(key, 0)) for key, ticks in current.items())
        self.known = current
        return used

    def _tree(self, root: int) -> list[int]:
        pids = [root]
        i = 0
        while i < len(pids):
            children = _children(pids[i])
            if children is None:
                return _tree_by_scan(root)
            pids.extend(children)
            i += 1
        return pids


def _children(pid: int) -> list[int] | None:
    """Children of every thread of `pid`; None if the kernel has no /proc/PID/task/TID/children."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # the thread is there, the file is not: not supported
        except OSError:
            pass
    return out


def _tree_by_scan(root: int) -> list[int]:
    """The tree of `root` from the parent pid of every process (slower)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read_stat_fields(int(name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(name))
    pids = [root]
    i = 0
    while i < len(pids):
        pids.extend(children.get(pids[i], ()))
        i += 1
    return pids


def _read_stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return data[data.rfind(b")") + 2 :].split()


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(start time, utime+stime+cutime+cstime) of `pid`, in clock ticks; None if it is gone."""
    fields = _read_stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    # fields[0] is field 3 (state): utime..cstime are fields 14-17, starttime is field 22
    return int(fields[19]), sum(int(x) for x in fields[11:15])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m corral.wrap [--interval S] -- TOOL [ARGS...]`, lighter than the whole CLI."""
    parser = argparse.ArgumentParser(prog="corral wrap", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats (default: 5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- TOOL [ARGS...]")
    args = parser.parse_args(argv)
    try:
        return cmd_wrap(Home.from_env(), args)
    except UsageError as exc:
        sys.stderr.write(f"corral: error: {exc.message}\n")
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
