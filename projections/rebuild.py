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
from projections.intake import Batch, IntakeClient, RawClient, read_log
from projections.projector import BatchApplier, Projector, open_database
from projections.wire import connect_wire
from replay.history import last_sequence

Report = Callable[[int, int], Awaitable[None]]
APPLY_EVERY = 50000


async def _reader(bus: Bus) -> RawClient:
    """A lean wire-protocol connection to the server the bus uses; nats-py where that cannot be."""
    found = bus.nc.connected_url
    options = bus.connect_options()
    if found is not None:
        wire = await connect_wire(
            f"nats://{found.hostname}:{found.port or 4222}",
            user=options.get("user"),
            password=options.get("password"),
            name="corral-rebuild",
        )
        if wire is not None:
            return wire
    client = IntakeClient()
    await client.connect(servers=bus.servers, name="corral-rebuild", **options)
    return client


async def _copy_log(client: RawClient, bus: Bus, applier: BatchApplier, *, until: int, report: Report) -> int:
    """Apply events after applier.position up to `until` from the stream; return how many.

    Batches are bulk-loaded (events and execution states) while the next one is read; the
    derived tables are filled once at the end with the same set-based statements."""
    start = applier.position
    if start >= until:
        return 0
    applied = 0

    async def apply(batch: Batch) -> None:
        nonlocal applied
        applied += await asyncio.to_thread(applier.apply, batch, derive=False)
        await report(applier.position - start, until - start)

    await read_log(client, bus.js, start_seq=start + 1, until=until, on_batch=apply, batch_size=APPLY_EVERY)
    await asyncio.to_thread(applier.derive)
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
    client = await _reader(bus)
    try:
        applied = await _copy_log(client, bus, applier, until=await last_sequence(bus.js), report=report)
        async with projector.paused():
            applied += await _copy_log(client, bus, applier, until=projector.position, report=report)
            con.execute("CHECKPOINT")
            con.close()
            projector.close_database()
            os.replace(target, database)
            projector.open_database()
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        applier.close()
        with contextlib.suppress(Exception):
            con.close()
    return applied
