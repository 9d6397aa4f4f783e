"""Rebuild the projections from the log into a new file, then swap it in atomically.

The live projector keeps running while the new file is built; it pauses only for the final
catch-up and the swap. A crash mid-rebuild leaves the old file untouched.
"""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.msg import Msg

from actors.bus import Bus
from events.subjects import ALL_EVENTS
from projections.projector import BatchApplier, Projector, open_database
from replay.history import follow, last_sequence

Report = Callable[[int, int], Awaitable[None]]
APPLY_EVERY = 20000


async def _copy_log(bus: Bus, applier: BatchApplier, *, until: int, report: Report) -> int:
    """Apply events after applier.position up to `until` from the stream; return how many."""
    if applier.position >= until:
        return 0
    batch: list[tuple[int, str, bytes]] = []
    applied = 0
    start = applier.position
    applying: asyncio.Task[None] | None = None

    async def apply(todo: list[tuple[int, str, bytes]]) -> None:
        nonlocal applied
        applied += await asyncio.to_thread(applier.apply, todo)
        await report(applier.position - start, until - start)

    async def flush() -> None:
        # Reading the next batch from the stream overlaps applying this one in DuckDB.
        nonlocal applying, batch
        if applying is not None:
            await applying
            applying = None
        if batch:
            todo, batch = batch, []
            applying = asyncio.create_task(apply(todo))

    async def on_event(seq: int, msg: Msg) -> bool:
        if seq <= until:
            batch.append((seq, msg.subject, msg.data))
        if len(batch) >= APPLY_EVERY:
            await flush()
        return seq >= until

    try:
        await follow(bus.js, ALL_EVENTS, on_event, start_seq=applier.position + 1)
        await flush()
        await flush()
    finally:
        if applying is not None:
            with contextlib.suppress(BaseException):
                await applying
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
    try:
        applied = await _copy_log(bus, applier, until=await last_sequence(bus.js), report=report)
        async with projector.paused():
            applied += await _copy_log(bus, applier, until=projector.position, report=report)
            con.execute("CHECKPOINT")
            con.close()
            projector.close_database()
            os.replace(target, database)
            projector.open_database()
    finally:
        applier.close()
        with contextlib.suppress(Exception):
            con.close()
    return applied
