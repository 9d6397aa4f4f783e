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
from events.subjects import OUTPUT_STREAM
from projections.batch import Gathered
from projections.intake import RawClient, read_log
from projections.projector import OUTPUT_EVENTS_FILTER, BatchApplier, OutputApplier, Projector, open_database
from projections.wire import connect_reader
from replay.history import last_sequence

Report = Callable[[int, int], Awaitable[None]]
APPLY_EVERY = 50000


async def _copy_log(client: RawClient, bus: Bus, applier: BatchApplier, *, until: int, report: Report) -> int:
    """Apply events after applier.position up to `until` from the stream; return how many.

    Batches are bulk-loaded (events and execution states) while the next one is read; the
    derived tables are filled once at the end with the same set-based statements."""
    start = applier.position
    if start >= until:
        return 0
    applied = 0

    async def apply(batch: Gathered) -> None:
        nonlocal applied
        applied += await asyncio.to_thread(applier.apply_gathered, batch, derive=False)
        await report(applier.position - start, until - start)

    await read_log(
        client, bus.js, start_seq=start + 1, until=until, on_batch=apply, batch_size=APPLY_EVERY, gather=True
    )
    await asyncio.to_thread(applier.derive)
    return applied


async def _copy_output(client: RawClient, bus: Bus, output: OutputApplier, *, until: int) -> int:
    """Apply the output stream's chunks still held (its limits removed the older ones) up to `until`."""
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
    con = open_database(target)
    applier = BatchApplier(con, tmp_dir=projector.tmp_dir)
    output = OutputApplier(con, tmp_dir=projector.tmp_dir)
    client = await connect_reader(bus, name="corral-rebuild")
    try:
        applied = await _copy_log(client, bus, applier, until=await last_sequence(bus.js), report=report)
        if projector.output_position is not None:
            applied += await _copy_output(client, bus, output, until=projector.output_position)
        async with projector.paused():
            applied += await _copy_log(client, bus, applier, until=projector.position, report=report)
            if projector.output_position is not None:
                applied += await _copy_output(client, bus, output, until=projector.output_position)
            con.execute("CHECKPOINT")
            con.close()
            projector.close_database()
            os.replace(target, database)
            projector.open_database()
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        applier.close()
        output.close()
        with contextlib.suppress(Exception):
            con.close()
    return applied
