"""The spawner: claims execution requests, runs each agent in its own worktree, records what it does."""

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from actors.bus import Bus
from actors.errors import WorkspaceError
from actors.output import ControlLine, OutputCoalescer
from actors.runtime import Actor
from actors.worktree import add_worktree, remove_worktree, repo_root, resolve_commit
from events.envelope import Event, decode_event
from events.errors import EventError, WrongLastSequence
from events.publisher import PubAck
from events.subjects import SPAWNER_CONSUMER, events_of_type
from events.types import (
    ExecutionClaimed,
    ExecutionExited,
    ExecutionFailed,
    ExecutionRequested,
    ExecutionStarted,
    Heartbeat,
    Output,
    ProtocolError,
    WorkspaceCreated,
)

FLUSH_INTERVAL_S = 0.05
READ_SIZE = 64 * 1024
DRAIN_AFTER_EXIT_S = 2.0


@dataclass
class RunningExecution:
    """What the spawner holds for one live agent."""

    execution_id: str
    request_id: str
    process: asyncio.subprocess.Process | None = None
    pgid: int | None = None
    started: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None


class OutputPump:
    """Read an agent's stdout and stderr, and publish them as output events without ever waiting on the bus."""

    def __init__(self, spawner: "Spawner", run: RunningExecution) -> None:
        self.spawner = spawner
        self.run = run
        self.outbox: deque[Event] = deque()
        self.wakeup = asyncio.Event()
        self.acks: list[asyncio.Future[PubAck]] = []
        self.chunk_number = 0
        self.coalescers = {
            "stdout": OutputCoalescer(),
            "stderr": OutputCoalescer(parse_control=True),
        }

    def _queue_text(self, stream: str, text: str | None) -> None:
        if not text:
            return
        self.chunk_number += 1
        self._queue(Output(stream=stream, n=self.chunk_number, text=text))  # type: ignore[arg-type]

    def _queue(self, data: Any) -> None:
        self.outbox.append(
            self.spawner.bus.event(
                self.run.execution_id,
                data,
                actor=self.spawner.instance,
                causation_id=self.run.request_id,
            )
        )
        self.wakeup.set()

    def _queue_controls(self, controls: list[ControlLine]) -> None:
        for control in controls:
            if control.error is not None:
                self._queue(ProtocolError(line=control.raw[:2000], error=control.error))
            elif control.kind == "heartbeat":
                try:
                    self._queue(Heartbeat(source="agent", **control.fields))
                except ValueError as exc:
                    self._queue(ProtocolError(line=control.raw[:2000], error=str(exc).splitlines()[0]))
            else:
                self._queue(
                    ProtocolError(
                        line=control.raw[:2000],
                        error=f"unsupported control message {control.kind!r} (supported: heartbeat)",
                    )
                )

    async def read(self, stream: str, reader: asyncio.StreamReader) -> None:
        """Read one pipe until EOF, queueing complete chunks."""
        coalescer = self.coalescers[stream]
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            chunks, controls = coalescer.feed(data)
            self._queue_controls(controls)
            for chunk in chunks:
                self._queue_text(stream, chunk)
        text, controls = coalescer.finish()
        self._queue_controls(controls)
        self._queue_text(stream, text)

    async def tick(self, done: asyncio.Event) -> None:
        """Flush partial chunks that have waited long enough."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), FLUSH_INTERVAL_S)
            for stream, coalescer in self.coalescers.items():
                self._queue_text(stream, coalescer.flush())

    async def publish(self, done: asyncio.Event) -> None:
        """Move queued events to the publisher in order, keeping their acknowledgement futures."""
        publisher = self.spawner.bus.publisher
        while True:
            while self.outbox:
                event = self.outbox.popleft()
                self.acks.append(await publisher.send(event.subject, event.to_bytes(), msg_id=event.id))
            if len(self.acks) > 256:
                self.acks = [ack for ack in self.acks if not ack.done() or ack.exception()]
            if done.is_set() and not self.outbox:
                break
            self.wakeup.clear()
            waiter = asyncio.create_task(self.wakeup.wait())
            stopper = asyncio.create_task(done.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    async def settle(self) -> None:
        """Wait until every queued event is stored (raises if one could not be)."""
        if self.acks:
            await asyncio.gather(*self.acks)


class Spawner(Actor):
    """Claims `execution.requested`, owns worktrees and agent processes."""

    name = "spawner"

    def __init__(
        self,
        bus: Bus,
        *,
        worktrees: Path,
        max_running: int = 16,
        stop_grace_s: float = 5.0,
        instance: str | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.worktrees = worktrees
        self.max_running = max_running
        self.stop_grace_s = stop_grace_s
        self.host = socket.gethostname()
        self.running: dict[str, RunningExecution] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "running": len(self.running), "max_running": self.max_running}

    async def run(self) -> None:
        await self.consume(
            SPAWNER_CONSUMER,
            events_of_type("execution.requested"),
            self.claim_next_request,
            ready=self._wait_for_slot,
        )

    async def _wait_for_slot(self) -> None:
        while len(self.running) >= self.max_running and not self.stopping.is_set():
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), 0.5)

    async def claim_next_request(self, msg: Msg) -> None:
        """Claim one request: an optimistic append of `execution.claimed` that only one spawner wins.

        JetStream redelivers a request whose claimer died before acknowledging it; the claim
        event makes the second delivery a no-op instead of a second run.
        """
        try:
            request = decode_event(msg.data)
        except EventError:
            await msg.term()
            return
        if not isinstance(request.data, ExecutionRequested):
            await msg.term()
            return
        try:
            await self.bus.emit(
                request.execution_id,
                ExecutionClaimed(spawner=self.instance, host=self.host),
                actor=self.instance,
                causation_id=request.id,
                expected_last_subject_seq=0,
            )
        except WrongLastSequence:
            await msg.ack()
            return
        await msg.ack()
        run = RunningExecution(request.execution_id, request.id)
        self.running[run.execution_id] = run
        task = asyncio.create_task(self._execute(run, request.data), name=f"exec-{run.execution_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, run: RunningExecution, data: Any) -> None:
        await self.bus.emit(run.execution_id, data, actor=self.instance, causation_id=run.request_id)

    async def _execute(self, run: RunningExecution, request: ExecutionRequested) -> None:
        try:
            await self._execute_inner(run, request)
        except Exception as exc:  # a bug here must still leave a record, not a silent hang
            with contextlib.suppress(Exception):
                await self._emit(run, ExecutionFailed(stage="internal", error=repr(exc)))
            raise
        finally:
            self.running.pop(run.execution_id, None)
            self._slot_freed.set()

    async def _execute_inner(self, run: RunningExecution, request: ExecutionRequested) -> None:
        branch = f"corral/{run.execution_id}"
        path = self.worktrees / run.execution_id
        try:
            repo = repo_root(request.repo)
            base_commit = resolve_commit(repo, request.base)
            await add_worktree(repo, path, branch=branch, commit=base_commit)
        except WorkspaceError as exc:
            await self._emit(run, ExecutionFailed(stage="workspace", error=str(exc)))
            return
        await self._emit(run, WorkspaceCreated(path=str(path), branch=branch, repo=str(repo), base_commit=base_commit))
        env = {
            **os.environ,
            **request.env,
            "CORRAL_EXECUTION_ID": run.execution_id,
            "CORRAL_WORKTREE": str(path),
        }
        if run.stop_reason is not None:
            await remove_worktree(repo, path, branch=branch)
            await self._emit(run, ExecutionFailed(stage="spawn", error="spawner stopped before start"))
            return
        try:
            process = await asyncio.create_subprocess_exec(
                *request.command,
                cwd=str(path),
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            await remove_worktree(repo, path, branch=branch)
            await self._emit(
                run,
                ExecutionFailed(stage="spawn", error=f"cannot start {request.command[0]!r}: {exc.strerror or exc}"),
            )
            return
        run.process = process
        run.pgid = process.pid
        run.started = time.monotonic()
        await self._emit(
            run,
            ExecutionStarted(pid=process.pid, pgid=process.pid, host=self.host, command=request.command, cwd=str(path)),
        )
        await self._supervise(run, process)

    async def _supervise(self, run: RunningExecution, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        pump = OutputPump(self, run)
        done = asyncio.Event()
        readers = asyncio.gather(pump.read("stdout", process.stdout), pump.read("stderr", process.stderr))
        ticker = asyncio.create_task(pump.tick(done))
        publisher = asyncio.create_task(pump.publish(done))
        returncode = await process.wait()
        try:
            # A grandchild may hold the pipes open after the agent exits; don't wait forever.
            await asyncio.wait_for(asyncio.shield(readers), DRAIN_AFTER_EXIT_S)
        except TimeoutError:
            self._signal_group(run, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readers, 1.0)
        self._signal_group(run, signal.SIGKILL)  # nothing of the group may outlive its leader
        done.set()
        await ticker
        await publisher
        await pump.settle()
        duration = time.monotonic() - run.started
        await self._emit(
            run,
            ExecutionExited(
                exit_code=returncode if returncode >= 0 else None,
                signal=-returncode if returncode < 0 else None,
                duration_s=round(duration, 6),
                reason="spawner_stopped" if run.stop_reason == "spawner_stopped" else "exited",
            ),
        )

    @staticmethod
    def _signal_group(run: RunningExecution, sig: int) -> None:
        if run.pgid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pgid, sig)

    async def on_stop(self) -> None:
        """Terminate every agent this spawner runs (SIGTERM, SIGKILL after the grace) and record their exits."""
        for run in list(self.running.values()):
            run.stop_reason = "spawner_stopped"
            self._signal_group(run, signal.SIGTERM)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.stop_grace_s)
            for run in list(self.running.values()):
                self._signal_group(run, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=DRAIN_AFTER_EXIT_S + 5)
