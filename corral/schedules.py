"""`corral schedules`, and the `[schedules.NAME]` of corral.toml resolved for the conductor.

A schedule fires a pipeline run or a template's execution at each tick of its `cron` (5 fields,
UTC) or `every` interval; the conductor claims each tick with `schedule.fired` (one conductor per
tick across every `corral up` of a cluster) and requests what this module resolved.
See docs/orchestration.md#schedules.
"""

import argparse
import logging
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import NotFoundError

from actors.breakers import breaker_id
from actors.conductor import ScheduledJob, schedule_id
from actors.schedule import Cron, Every
from corral import render
from corral.client import Client, RunSpec, build_request
from corral.config import Config, ScheduleEntry, load_config
from corral.errors import CorralError
from corral.home import Home
from corral.pipelines import check_variables, resolve_stages
from events.envelope import decode_event
from events.errors import EventError
from events.subjects import STREAM, event_subject
from events.types import PipelineRequested, ScheduleFired

log = logging.getLogger(__name__)


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral schedules` to `sub`; return {command name: handler(home, args)}."""
    schedules = sub.add_parser("schedules", help="the [schedules.NAME] of corral.toml: when, what, last and next tick")
    schedules.add_argument("--json", action="store_true")
    return {"schedules": cmd_schedules}


def when_of(entry: ScheduleEntry) -> Cron | Every:
    return Cron.parse(entry.cron) if entry.cron is not None else Every(float(entry.every or 60.0))


async def resolve(home: Home, config: Config, entry: ScheduleEntry) -> ScheduledJob:
    """The request each tick of `entry` makes, resolved as `corral pipeline run` / `corral run -t` would."""
    if entry.pipeline is not None:
        pipeline = config.pipelines[entry.pipeline]
        values = {**pipeline.vars, **entry.vars, "schedule": entry.name}
        check_variables(pipeline, values)
        stages = await resolve_stages(home, pipeline, entry.repo, "HEAD", None)
        payload = PipelineRequested(
            pipeline=pipeline.name,
            repo=str(stages[0]["request"]["repo"]),
            vars=values,
            stages=tuple(stages),
            max_rounds=pipeline.max_rounds,
            breaker_failures=pipeline.breaker_failures,
            requested_by=f"schedule:{entry.name}",
        ).model_dump(mode="json")
        target = "pipeline"
    else:
        spec = RunSpec.model_validate({"repo": entry.repo, "template": entry.template, "task": entry.task})
        _, request = await build_request(home, spec, requested_by=f"schedule:{entry.name}")
        payload = request.model_dump(mode="json")
        target = "template"
    catch_up: Any = entry.catch_up
    return ScheduledJob(entry.name, when_of(entry), target, payload, catch_up, entry.breaker_failures)  # type: ignore[arg-type]


async def for_conductor(home: Home, config: Config) -> tuple[ScheduledJob, ...]:
    """Every schedule that resolves; one that does not (a repository gone) is logged and left out."""
    jobs = []
    for entry in config.schedules.values():
        try:
            jobs.append(await resolve(home, config, entry))
        except CorralError as exc:
            log.error("schedule %s will not fire: %s", entry.name, exc.message)
    return tuple(jobs)


async def schedule_rows(client: Client) -> list[dict[str, Any]]:
    config = load_config(client.home)
    now = datetime.now(UTC)
    rows = []
    for entry in config.schedules.values():
        when = when_of(entry)
        nxt = when.next(now)
        row: dict[str, Any] = {
            "name": entry.name,
            "when": entry.cron if entry.cron is not None else f"every {entry.every:g}s",
            "target": f"pipeline {entry.pipeline}" if entry.pipeline else f"template {entry.template}",
            "repo": entry.repo,
            "catch_up": entry.catch_up,
            "next_tick": nxt.isoformat() if nxt else None,
            "last_tick": None,
            "last_target_id": None,
            "breaker": "closed",  # schedule:NAME (docs/orchestration.md#circuit-breakers)
            "held": False,  # its last tick waits for a human's decision on the open breaker
        }
        try:
            stored = await client.system.bus.js.get_last_msg(
                STREAM, event_subject(schedule_id(entry.name), "schedule.fired")
            )
            fired = decode_event(stored.data or b"").data
            if isinstance(fired, ScheduleFired):
                row.update(last_tick=fired.tick.isoformat(), last_target_id=fired.target_id, last_late=fired.late)
        except (NotFoundError, EventError):
            fired = None
        seqs = {}
        bid = breaker_id(f"schedule:{entry.name}")
        for kind in ("breaker.opened", "breaker.closed"):
            try:
                seqs[kind] = (await client.system.bus.js.get_last_msg(STREAM, event_subject(bid, kind))).seq or 0
            except NotFoundError:
                seqs[kind] = 0
        if seqs["breaker.opened"] > seqs["breaker.closed"]:
            row["breaker"] = "open"
            row["held"] = isinstance(fired, ScheduleFired) and fired.held
        rows.append(row)
    return rows


async def cmd_schedules(home: Home, args: Any) -> int:
    config = load_config(home)
    if not config.schedules:
        if args.json:
            render.print_json([])
        else:
            print(f"no schedules in {config.label}; add [schedules.NAME] (docs/orchestration.md)")
        return 0
    async with Client.connect(home) as client:
        rows = await schedule_rows(client)
    if args.json:
        render.print_json(rows)
        return 0
    columns = ["name", "when", "target", "catch_up", "last_tick", "last_target_id", "next_tick", "breaker", "held"]
    print(render.table(columns, [[r.get(c) for c in columns] for r in rows]))
    return 0
