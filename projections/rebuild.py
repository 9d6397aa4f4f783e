"""Rebuild the projections from the log into a new file, then swap it in atomically.

The live projector keeps running while the new file is built; it pauses only for the final
catch-up and the swap. A crash mid-rebuild leaves the old file untouched.
"""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import duckdb

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


class RebuildRefused(ProjectionError):
    """The rebuilt tables would hold less than the live ones (a trimmed log, retention)."""


COUNTED: Final = ("executions", "events", "output")
_COUNT_SQL: Final = "SELECT " + ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in COUNTED)


async def _copy_log(
    client: RawClient, bus: Bus, target: "_Target", *, until: int, report: Report, total: int | None = None
) -> int:
    """Apply events after the target's position up to `until` from the stream; return how many.

    Batches are bulk-loaded (events and execution states) while the next one is read; the
    derived tables are filled once at the end with the same set-based statements. Progress
    counts messages read, out of `total` (the stream's message count: a trimmed log has fewer
    messages than its last sequence)."""
    start = target.position
    if start >= until:
        return 0
    applied = 0
    read = 0
    wanted = total if total is not None else until - start

    async def apply(batch: Gathered) -> None:
        nonlocal applied, read
        applier = await target.core()
        read += len(batch)
        applied += await asyncio.to_thread(applier.apply_gathered, batch, derive=False)
        await report(min(read, wanted), wanted)

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


def _file_counts(path: Path) -> dict[str, int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute(_COUNT_SQL).fetchone()
    finally:
        con.close()
    return dict(zip(COUNTED, (int(v) for v in row or (0, 0, 0)), strict=True))


def _live_counts(projector: Projector) -> dict[str, int]:
    answer = projector.query(_COUNT_SQL, max_rows=1)
    [row] = answer["rows"]
    return dict(zip(COUNTED, (int(v) for v in row), strict=True))


async def _why_less(bus: Bus) -> str:
    """What the log lost: a trimmed core stream, or output under [retention]."""
    reasons = []
    info = await bus.js.stream_info(STREAM)
    first = int(info.state.first_seq or 1)
    if first > 1:
        reasons.append(f"the log {STREAM} starts at sequence {first:,} (the {first - 1:,} before it are gone)")
    with contextlib.suppress(Exception):
        output = await bus.js.stream_info(OUTPUT_STREAM)
        if int(output.state.first_seq or 1) > 1:
            reasons.append(f"[retention] removed the oldest {int(output.state.first_seq) - 1:,} output chunks")
    return "; ".join(reasons) or "the log holds less than the tables were built from"


def _refusal(live: dict[str, int], new: dict[str, int], why: str) -> str | None:
    lost = [f"{live[t] - new[t]:,} {t if t != 'output' else 'output rows'}" for t in COUNTED if new[t] < live[t]]
    if not lost:
        return None
    return (
        f"refused: the rebuilt tables would lose {', '.join(lost)} ({why}); "
        "the live tables are kept; rebuild anyway with `corral projections rebuild --force`"
    )


async def rebuild_database(bus: Bus, projector: Projector, *, report: Report, force: bool = False) -> int:
    """Rebuild every table of the projector's database from the log; return events applied.

    Unless `force`, refuses (RebuildRefused, nothing changed) when the new file would hold fewer
    executions, events or output rows than the live one: history the log no longer has."""
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
            messages = int((await bus.js.stream_info(STREAM)).state.messages or 0)
            applied = await _copy_log(
                client, bus, new, until=await last_sequence(bus.js), report=report, total=messages
            )
            if projector.output_position is not None:
                applied += await _copy_output(client, bus, new, until=projector.output_position)
            async with projector.paused():
                # up to the higher of the live lanes (the live projector then reads the rest again)
                applied += await _copy_log(client, bus, new, until=projector.applied_upto, report=report)
                if projector.output_position is not None:
                    applied += await _copy_output(client, bus, new, until=projector.output_position)
                await asyncio.to_thread(new.worker.release, REBUILD)  # checkpointed and closed
                if not force:
                    counts = await asyncio.to_thread(_file_counts, target)
                    refusal = _refusal(await asyncio.to_thread(_live_counts, projector), counts, await _why_less(bus))
                    if refusal is not None:
                        raise RebuildRefused(refusal)
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
