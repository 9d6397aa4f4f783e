"""The spawner watches the trees of agents whose shim got no inotify instance of its own.

A shim watches its agent's worktree with an inotify instance of its own (actors/filewatch.py),
and Linux allows a user 128 of them by default: past ~120 agents on a host, or where other
software took them, a shim gets none and its `execution.started` says `file_events: false` with a
warning. The spawner holds one more instance from its start (`SharedWatch`) and takes such an
agent's tree into it, so its `file.touched` events (and the checkpoints "after N files" that count
them) still come, from the spawner, with the shim's folding and cadence. The agent is already
running when its shim says so: what it changed before the watch was added is found by change time
(after its spec was written) and reported with the first batch. Only when the spawner
could not get an instance either does the execution keep the warning.

While no spawner runs (a supervisor restart), such an agent's changes are not reported live; the
adopting spawner takes the tree again, and checkpoints see every change in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from actors import gitrun
from actors.filewatch import FileWatcher, SharedWatch
from actors.shim import FILE_EVENTS_INTERVAL_S  # the shim's cadence: changes gathered, folded, then reported

Publish = Callable[[str, list[tuple[str, str]]], Awaitable[None]]


def wants_takeover(started: dict[str, Any]) -> bool:
    """An `execution.started` of a shim that wanted live file events and could not get inotify."""
    warnings = started.get("warnings") or ()
    return started.get("file_events") is False and any("inotify" in str(w) for w in warnings)


def watched_root(spec: dict[str, Any]) -> Path:
    """What the shim would have watched: the shadow workspace's upper layer, else the worktree."""
    return Path(spec["shadow"]) / "upper" if spec.get("shadow") else Path(spec["cwd"])


class FileTakeover:
    """The spawner's one inotify instance and the trees it watches for shims that have none."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._shared = SharedWatch.open()
        self._trees: dict[str, FileWatcher] = {}  # execution id -> its tree
        self._ids: dict[FileWatcher, str] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._catching_up: dict[str, asyncio.Task[None]] = {}  # execution id -> noting its early files
        if self._shared is not None:
            asyncio.get_running_loop().add_reader(self._shared.fd, self._changed)

    @property
    def available(self) -> bool:
        return self._shared is not None

    def take(self, execution_id: str, spec: dict[str, Any], *, started_after_ns: int | None = None) -> bool:
        """Watch an execution's tree; False when this spawner has no instance either.

        The agent was already running when its shim said it has no inotify: with `started_after_ns`
        (when the agent's launch began: its spec was written), the files it changed before the
        watch was added are found by their change time and reported with the first batch."""
        if self._shared is None or not spec.get("watch_files", True):
            return False
        if execution_id in self._trees:
            return True
        try:
            watcher, early = self._shared.watch(watched_root(spec), changed_after_ns=started_after_ns)
        except OSError:
            return False
        self._trees[execution_id] = watcher
        self._ids[watcher] = execution_id
        if early:
            task = asyncio.create_task(self._catch_up(execution_id, watcher, spec, early))
            self._catching_up[execution_id] = task
            task.add_done_callback(lambda _t: self._catching_up.pop(execution_id, None))
        return True

    async def _catch_up(self, execution_id: str, watcher: FileWatcher, spec: dict[str, Any], early: list[str]) -> None:
        """Note the files changed before the watch: modified where the worktree had them, else created."""
        with contextlib.suppress(Exception):  # live hints only: checkpoints see every change
            had = await gitrun.call(_existed_before, spec, early, pool="bookkeeping")
            for path in early:
                if path not in watcher.pending:  # what the watch saw since is newer
                    watcher._note(path, "modified" if path in had else "created")
            if watcher.pending and execution_id not in self._timers and self._trees.get(execution_id) is watcher:
                loop = asyncio.get_running_loop()
                self._timers[execution_id] = loop.call_later(FILE_EVENTS_INTERVAL_S, self._report, execution_id)

    async def release(self, execution_id: str) -> None:
        """The execution ends: report what its tree gathered meanwhile, then stop watching it."""
        catching_up = self._catching_up.get(execution_id)
        if catching_up is not None:
            await asyncio.shield(catching_up)
        watcher = self._trees.pop(execution_id, None)
        if watcher is None:
            return
        timer = self._timers.pop(execution_id, None)
        if timer is not None:
            timer.cancel()
        if self._shared is not None:
            self._shared.read()
        self._ids.pop(watcher, None)
        changes = watcher.take()
        watcher.close()
        if changes:
            await self._publish(execution_id, changes)

    def close(self) -> None:
        for task in self._catching_up.values():
            task.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for watcher in self._trees.values():
            watcher.close()
        self._trees.clear()
        self._ids.clear()
        if self._shared is not None:
            asyncio.get_running_loop().remove_reader(self._shared.fd)
            self._shared.close()
            self._shared = None

    def _changed(self) -> None:
        assert self._shared is not None
        loop = asyncio.get_running_loop()
        for watcher in self._shared.read():
            execution_id = self._ids.get(watcher)
            if execution_id is not None and watcher.pending and execution_id not in self._timers:
                self._timers[execution_id] = loop.call_later(FILE_EVENTS_INTERVAL_S, self._report, execution_id)

    def _report(self, execution_id: str) -> None:
        self._timers.pop(execution_id, None)
        watcher = self._trees.get(execution_id)
        if watcher is None or not watcher.pending:
            return
        task = asyncio.create_task(self._send(execution_id, watcher.take()))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, execution_id: str, changes: list[tuple[str, str]]) -> None:
        with contextlib.suppress(Exception):  # a bus that is down: these are live hints, checkpoints see all
            await self._publish(execution_id, changes)


def _existed_before(spec: dict[str, Any], paths: list[str]) -> set[str]:
    """Which of these paths the agent found in its workspace: the real worktree under a shadow
    workspace's overlay, else the files git tracks in the worktree."""
    root = Path(spec["cwd"])
    if spec.get("shadow"):
        return {path for path in paths if os.path.lexists(root / path)}
    done = subprocess.run(  # every tracked file (no pathspecs: any number of paths, any name)
        ["git", "ls-files", "-z"],
        cwd=root,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return set()
    return set(paths) & {os.fsdecode(name) for name in done.stdout.split(b"\0") if name}
