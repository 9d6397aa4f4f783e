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
from projections.errors import ProjectionError
from projections.intake import RawClient, read_log
from projections.projector import OUTPUT_EVENTS_FILTER, Projector
from projections.wire import connect_reader
from projections.worker import ApplyWorker, RemoteApplier
from replay.history import last_sequence

Report = Callable[[int, int], Awaitable[None]]
APPLY_EVERY = 50000
REBUILD = "rebuild"  # the new file's name in the projector's worker


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
    """The new file, opened in the live projector's DuckDB worker beside its own file: no process
    to start, and the swap only closes one file and opens another in that same process."""

    def __init__(self, worker: ApplyWorker, path: Path) -> None:
        self.worker = worker
        self.path = path
        self.appliers: dict[str, RemoteApplier] = {}

    async def open(self) -> None:
        positions = await asyncio.to_thread(self.worker.open, REBUILD, self.path)
        self.appliers = {
            stream: RemoteApplier(self.worker, stream, name=REBUILD, position=positions[stream])
            for stream in (STREAM, OUTPUT_STREAM)
        }

    @property
    def position(self) -> int:
        return self.appliers[STREAM].position

    async def core(self) -> RemoteApplier:
        return self.appliers[STREAM]

    async def output(self) -> RemoteApplier:
        return self.appliers[OUTPUT_STREAM]

    def close(self) -> None:
        for applier in self.appliers.values():
            applier.close()


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
    if projector.worker is None:
        raise ProjectionError(f"the projector cannot rebuild yet: {projector.locked_out or 'no DuckDB file open'}")
    # The new file is written by the projector's own DuckDB worker process (projections.worker),
    # as a second file beside the live one: reading the log here and applying there do not share
    # a GIL, and no process is started. The live projector's batches interleave with it.
    new = _Target(projector.worker, target)
    await new.open()
    swapped = False
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
                await asyncio.to_thread(new.worker.release, REBUILD)  # checkpointed and closed
                await asyncio.to_thread(projector.release_database)
                os.replace(target, database)
                swapped = True
                await projector.open_database()
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    finally:
        new.close()
        if not swapped:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(new.worker.release, REBUILD, checkpoint=False)
            for leftover in (target, Path(str(target) + ".wal")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    return applied
