"""Starting the projector's DuckDB worker process (projections/worker_process.py), and starting it early.

A `corral run` with no system running starts a system for itself, projector included, and the
projector's worker is a Python process that loads DuckDB (~0.3 s of one core) before it can open
the file. Started only when the projector starts, it was the last thing a short run waited for
(issue 20 §6). So `corral/entry.py` starts it first thing (`start_early`), while the command loads
its own modules on the other core, and the projector takes it (`take_early`) instead of starting
one. The process only loads its modules until it is asked to open a file: if the command turns
out to be a client of a running system, or never starts a projector, it is ended at exit.

The process ends when its stdin closes, and with the thread that started it (PR_SET_PDEATHSIG,
worker_process._die_with_parent): start it on the thread that will run the event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "projections.worker_process"
EARLY_EXIT_WAIT_S = 5.0


@dataclass
class Spawned:
    """A started worker process and the parent's ends of its query pipes (file descriptors)."""

    process: subprocess.Popen[bytes]
    query_requests: int  # write end: query requests in
    answers: int  # read end: their answers out

    def end(self) -> None:
        """Close the parent's ends: the process ends (its stdin closed); killed if it does not."""
        for fd in (self.query_requests, self.answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        end_process(self.process, EARLY_EXIT_WAIT_S)


def end_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Close a worker's stdin and stdout (it ends once its stdin closes), reap it; killed after `timeout_s`."""
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn(database: Path) -> Spawned:
    """Start a worker process for `database` (shown by `ps`; opened only when asked)."""
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, str(os.getpid()), str(database), str(requests_r), str(answers_w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(requests_r, answers_w),
            process_group=0,  # a Ctrl-C at the terminal is the Corral process's to handle, not the worker's
        )
    except BaseException:
        os.close(requests_w)
        os.close(answers_r)
        raise
    finally:
        os.close(requests_r)
        os.close(answers_w)
    return Spawned(process, requests_w, answers_r)


_early: tuple[Path, Spawned] | None = None


def start_early(database: Path) -> None:
    """Start a worker for `database` now, for this process's projector to take (best effort)."""
    global _early
    if _early is not None:
        return
    try:
        _early = (database, spawn(database))
    except OSError:
        return
    atexit.register(discard_early)


def take_early(database: Path) -> Spawned | None:
    """The worker started early for `database`, if there is one and it still runs (once)."""
    global _early
    if _early is None:
        return None
    wanted, spawned = _early
    if wanted != database or spawned.process.poll() is not None:
        return None
    _early = None
    return spawned


def discard_early() -> None:
    """End the worker started early if no projector took it (at exit)."""
    global _early
    if _early is not None:
        spawned, _early = _early[1], None
        spawned.end()
