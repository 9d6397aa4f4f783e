"""Rebuild the projections from the log into a new file, then swap it in atomically.

The live projector keeps running while the new file is built; it pauses only for the final
catch-up and the swap. A crash mid-rebuild leaves the old file untouched.
"""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from actors.bus import Bus
from events.subjects import OUTPUT_STREAM, STREAM
from projections.batch import Gathered
from projections.intake import RawClient, read_log
from projections.projector import OUTPUT_EVENTS_FILTER, Projector
from projections.wire import connect_reader
from projections.worker import ApplyWorker, RemoteApplier
from replay.history import last_sequence

Report = Callable[[int, int], Awaitable[None]]
APPLY_EVERY = 50000


async def _copy_log(client: RawClient, bus: Bus, target: "_Target", *, until: int, report: Report) -> int:
    """Apply events after the target's position up to `until` from the stream; return how many.

    Batches are bulk-loaded (events and execution states) while the next one is read; the
    derived tables are filled once at the end with the same set-based statements."""
    start = target.position
    if start >= until:
        return 0
    applied = 0

    async def apply(batch: Gathered) -> None:
        nonlocal applied
        applier = await target.core()
        applied += await asyncio.to_thread(applier.apply_gathered, batch, derive=False)
        await report(applier.position - start, until - start)

    await read_log(
        client, bus.js, start_seq=start + 1, until=until, on_batch=apply, batch_size=APPLY_EVERY, gather=True
    )
    await asyncio.to_thread((await target.core()).derive)
    return applied


class _Target:
    """The new file's worker process, started while the first batch is read."""

    def __init__(self, path: Path, tmp_dir: Path) -> None:
        self.started = ApplyWorker(path, tmp_dir=tmp_dir)  # on the loop's thread: see ApplyWorker
        self.starting = asyncio.create_task(self._open())
        self.worker: ApplyWorker | None = None
        self.appliers: dict[str, RemoteApplier] = {}

    async def _open(self) -> ApplyWorker:
        await asyncio.to_thread(self.started.open)
        return self.started

    @property
    def position(self) -> int:
        return self.appliers[STREAM].position if self.appliers else 0  # a new file starts at 0

    async def _ready(self) -> ApplyWorker:
        if self.worker is None:
            self.worker = await self.starting
            self.appliers = {name: RemoteApplier(self.worker, name) for name in (STREAM, OUTPUT_STREAM)}
        return self.worker

    async def core(self) -> RemoteApplier:
        await self._ready()
        return self.appliers[STREAM]

    async def output(self) -> RemoteApplier:
        await self._ready()
        return self.appliers[OUTPUT_STREAM]

    async def close(self, *, keep: bool) -> None:
        for applier in self.appliers.values():
            applier.close()
        if not self.starting.done():
            with contextlib.suppress(BaseException):
                await self.starting
        if not keep:
            await asyncio.to_thread(self.started.kill)


async def _copy_output(client: RawClient, bus: Bus, target: _Target, *, until: int) -> int:
    """Apply the output stream's chunks still held (its limits removed the older ones) up to `until`."""
    output = await target.output()
    info = await bus.js.stream_info(OUTPUT_STREAM)
    start = max(output.position + 1, int(info.state.first_seq or 1))
    until = min(until, int(info.state.last_seq or 0))
    if info.state.messages == 0 or start > until:
        return 0
    applied = 0

    async def apply(batch: Gathered) -> None:
        nonlocal applied
        applied += await asyncio.to_thread(output.apply_gathered, batch)

    await read_log(
        client,
        bus.js,
        start_seq=start,
        until=until,
        on_batch=apply,
        batch_size=APPLY_EVERY,
        stream=OUTPUT_STREAM,
        filter_subject=OUTPUT_EVENTS_FILTER,
        gather=True,
    )
    return applied


async def rebuild_database(bus: Bus, projector: Projector, *, report: Report) -> int:
    """Rebuild every table of the projector's database from the log; return events applied."""
    database = projector.database
    target = database.with_name(database.name + ".rebuild")
    for leftover in (target, Path(str(target) + ".wal")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    # The new file is written by a worker process of its own (projections.worker), as the live
    # projector's is: reading the log here and applying there do not share a GIL. It starts while
    # the first batch is read, and becomes the projector's worker once the new file is swapped in.
    new = _Target(target, projector.tmp_dir)
    adopted = False
    try:
        client = await connect_reader(bus, name="corral-rebuild")
        try:
            applied = await _copy_log(client, bus, new, until=await last_sequence(bus.js), report=report)
            if projector.output_position is not None:
                applied += await _copy_output(client, bus, new, until=projector.output_position)
            async with projector.paused():
                applied += await _copy_log(client, bus, new, until=projector.position, report=report)
                if projector.output_position is not None:
                    applied += await _copy_output(client, bus, new, until=projector.output_position)
                worker = await new._ready()
                await asyncio.to_thread(worker.release)  # checkpointed and closed, the process kept
                await asyncio.to_thread(projector.close_database)
                os.replace(target, database)
                await projector.open_database(worker)
                adopted = True
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    finally:
        await new.close(keep=adopted)
    return applied
