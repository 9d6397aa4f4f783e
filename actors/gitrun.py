"""Short commands (git) run from worker threads, so the event loop of `corral up` never waits on them.

`asyncio.create_subprocess_exec` forks from the loop's own thread: the loop stands still until the
child has exec'd, and on a loaded machine (hundreds of shims starting) the child waits for a CPU
first. A profile of a burst of 500 spawns found the loop spending most of its time there (about
5 ms per git command, 14 commands per execution between its worktree and its exit checkpoint).
Here each command runs in a thread of a small pool (the GIL is not held while the child starts or
runs), and the loop only sees the result.

Two pools: `spawn` for what starts an agent (its worktree) and `bookkeeping` for what follows an
agent (checkpoints, diffs, removals), so exit checkpoints of agents that ended never queue in
front of a worktree an agent waits for. While spawn work is under way, bookkeeping runs one
command at a time (the CPU goes to the agents waiting to start; the checkpoints catch up after).
"""

import asyncio
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

T = TypeVar("T")

Pool = Literal["spawn", "bookkeeping"]
WORKERS: Final[dict[Pool, int]] = {"spawn": 4, "bookkeeping": 4}

_pools: dict[Pool, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_spawning = 0  # spawn-pool jobs submitted and not finished
_one_at_a_time = threading.Lock()  # bookkeeping's single lane while spawns wait


def _spawn_job(function: Callable[..., T], *args: object) -> T:
    global _spawning
    try:
        return function(*args)
    finally:
        with _lock:
            _spawning -= 1


def _bookkeeping_job(function: Callable[..., T], *args: object) -> T:
    if _spawning > 0:
        with _one_at_a_time:
            return function(*args)
    return function(*args)


def _submit(pool: Pool, function: Callable[..., T], *args: object) -> "asyncio.Future[T]":
    global _spawning
    if pool == "spawn":
        with _lock:
            _spawning += 1
        job: Callable[..., T] = _spawn_job
    else:
        job = _bookkeeping_job
    try:
        return asyncio.get_running_loop().run_in_executor(_pool(pool), job, function, *args)
    except BaseException:
        if pool == "spawn":
            with _lock:
                _spawning -= 1
        raise


def _pool(name: Pool) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(WORKERS[name], thread_name_prefix=f"corral-{name}")
        return pool


def run_sync(argv: list[str], cwd: str | Path | None, env: dict[str, str] | None) -> tuple[int, bytes, bytes]:
    """(returncode, stdout, stderr) of one command (stdin /dev/null; a signal is a negative code)."""
    done = subprocess.run(
        argv,
        cwd=None if cwd is None else str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


async def run(
    argv: list[str], *, cwd: str | Path | None, env: dict[str, str] | None = None, pool: Pool = "bookkeeping"
) -> tuple[int, bytes, bytes]:
    """`run_sync` in a thread of `pool`."""
    return await _submit(pool, run_sync, argv, cwd, env)


async def call(function: Callable[..., T], *args: object, pool: Pool = "spawn") -> T:
    """A blocking function (one that runs git) in a thread of `pool`."""
    return await _submit(pool, function, *args)


# Calls waiting in a pool and not started yet, by key: a caller with the same key shares the result.
_unstarted: dict[object, "asyncio.Future[Any]"] = {}
_running: set["asyncio.Task[None]"] = set()


async def shared(key: object, function: Callable[..., T], *args: object, pool: Pool = "spawn") -> T:
    """`call(function, *args)`, shared with the callers of the same `key` that come while it waits in
    the pool: only a call not started yet is joined (under the lock its start takes), so what it
    reads (a ref's commit) is read after every caller sharing it came: a burst's requests of one
    repository make one `git rev-parse`, not one each. Every sharer gets its result or exception."""
    loop = asyncio.get_running_loop()
    with _lock:
        waiting = _unstarted.get(key)
        first = waiting is None
        if waiting is None:
            waiting = _unstarted[key] = loop.create_future()
    if first:
        waiting.add_done_callback(_retrieved)

        def start(*given: object) -> T:
            with _lock:
                if _unstarted.get(key) is waiting:
                    del _unstarted[key]  # started: a caller from now on makes a call of its own
            return function(*given)

        async def run() -> None:
            try:
                result = await call(start, *args, pool=pool)
            except BaseException as exc:
                with _lock:
                    if _unstarted.get(key) is waiting:
                        del _unstarted[key]
                if not waiting.done():
                    waiting.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            if not waiting.done():
                waiting.set_result(result)

        task = loop.create_task(run())
        _running.add(task)
        task.add_done_callback(_running.discard)
    result: T = await asyncio.shield(waiting)
    return result


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """(an exception no sharer awaited any more is not reported as never retrieved)"""
    if not future.cancelled():
        future.exception()
