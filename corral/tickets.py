"""`corral tickets [add|import]`: units of work run by a pipeline (seed 002, docs/orchestration.md#tickets).

A ticket is created ready (`ticket.created`) with its pipeline run resolved in it (as `corral
pipeline run` resolves one, with `{{title}}`, `{{goal}}` and `{{ticket_id}}` among the variables);
a conductor claims it (`ticket.claimed`, once across conductors), requests the run, and finishes the
ticket with the run's outcome and its last stage's result (`ticket.finished`).
"""

import argparse
import csv
import io
import os
from pathlib import Path
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral import render
from corral.client import Client
from corral.config import ConfigError, Pipeline, load_config
from corral.errors import UsageError
from corral.home import Home
from corral.pipelines import _vars, check_variables, resolve_stages
from corral.system import System
from events.envelope import new_event
from events.errors import WrongLastSequence
from events.ids import new_execution_id
from events.types import PipelineRequested, TicketCreated

MAX_IMPORT: Final = 10_000
COLUMNS: Final = "ticket_id, state, priority, title, pipeline, run_id, reason, created_at, finished_at"


class TicketSpec(BaseModel):
    """One ticket as `add` takes it, or one line / row of an `import` file."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    title: str = Field(min_length=1, max_length=500)
    goal: str = Field(min_length=1)
    repo: str | None = None
    pipeline: str | None = None
    priority: int = 0


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral tickets` to `sub`; return {command name: handler(home, args)}."""
    tickets = sub.add_parser("tickets", help="tickets: list them, add one, import many (a pipeline runs each)")
    tickets.add_argument("--json", action="store_true")
    actions = tickets.add_subparsers(dest="tickets_cmd", metavar="ACTION")
    add = actions.add_parser("add", help="add a ready ticket: its pipeline runs it")
    add.add_argument("--title", required=True)
    add.add_argument("--goal", required=True)
    add.add_argument("--repo", default=".", help="git repository (default: .)")
    add.add_argument("--pipeline", help="the pipeline that runs it (default: the only one of corral.toml)")
    add.add_argument("--priority", type=int, default=0, help="queue order of its executions (higher first)")
    add.add_argument("--var", action="append", metavar="NAME=VALUE", help="a {{NAME}} of the stages")
    add.add_argument("--json", action="store_true")
    imported = actions.add_parser("import", help="add tickets from a JSON lines or CSV file (all or none)")
    imported.add_argument("file", metavar="FILE")
    imported.add_argument("--repo", default=".", help="for rows without a repo (default: .)")
    imported.add_argument("--pipeline", help="for rows without a pipeline")
    imported.add_argument("--json", action="store_true")
    return {"tickets": cmd_tickets}


def _pipeline_for(name: str | None, pipelines: dict[str, Pipeline], label: str) -> Pipeline:
    if name is None:
        if len(pipelines) != 1:
            known = ", ".join(sorted(pipelines)) or f"none in {label}"
            raise UsageError(f"which pipeline runs the ticket? give --pipeline NAME (known: {known})")
        return next(iter(pipelines.values()))
    found = pipelines.get(name)
    if found is None:
        known = ", ".join(sorted(pipelines)) or f"none in {label}"
        raise ConfigError(f"no pipeline {name!r} (known: {known}); add [pipelines.{name}] (docs/orchestration.md)")
    return found


def read_file(path: str) -> list[TicketSpec]:
    """Tickets of a JSON lines file (one object a line) or a CSV file with a header row; UsageError naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}; nothing was added") from None
    rows: list[tuple[int, Any]] = []
    if path.endswith(".csv") or not text.lstrip().startswith("{"):
        reader = csv.DictReader(io.StringIO(text))
        for number, row in enumerate(reader, start=2):
            rows.append((number, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not JSON ({exc}); nothing was added") from None
    if not rows:
        raise UsageError(f"{path}: no tickets in it; nothing was added")
    if len(rows) > MAX_IMPORT:
        raise UsageError(f"{path}: {len(rows)} tickets; at most {MAX_IMPORT} at once; nothing was added")
    specs = []
    for number, raw in rows:
        try:
            specs.append(TicketSpec.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "row"
            raise UsageError(f"{path}:{number}: {where}: {first['msg']}; nothing was added") from None
    return specs


async def create(
    home: Home,
    system: System,
    specs: list[TicketSpec],
    *,
    repo: str,
    pipeline: str | None,
    extra: dict[str, str],
    ticket_id: str | None = None,
    requested_by: str | None = None,
) -> list[dict[str, Any]]:
    """Check every ticket (its pipeline resolved), then record them all: all or none.

    `ticket_id` (one ticket: a webhook's delivery, corral/hooks.py): recorded once under it; a second
    time it is {..., duplicate: true} and records nothing."""
    if ticket_id is not None and len(specs) != 1:
        raise UsageError("a fixed ticket id is for one ticket")
    config = load_config(home)
    resolved: dict[tuple[str, str], list[dict[str, Any]]] = {}
    events = []
    for spec in specs:
        chosen = _pipeline_for(spec.pipeline or pipeline, config.pipelines, config.label)
        this_id = ticket_id or new_execution_id()
        values = {**chosen.vars, **extra, "title": spec.title, "goal": spec.goal, "ticket_id": this_id}
        check_variables(chosen, values)
        where = spec.repo or repo
        key = (chosen.name, where)
        if key not in resolved:
            resolved[key] = await resolve_stages(home, chosen, where, "HEAD", system)
        stages = resolved[key]
        run = PipelineRequested(
            pipeline=chosen.name,
            repo=str(stages[0]["request"]["repo"]),
            vars=values,
            stages=tuple(stages),
            max_rounds=chosen.max_rounds,
            breaker_failures=chosen.breaker_failures,
            priority=spec.priority,
            requested_by=requested_by or os.environ.get("USER"),
        )
        data = TicketCreated(
            title=spec.title,
            goal=spec.goal,
            repo=run.repo,
            pipeline=chosen.name,
            priority=spec.priority,
            run=run.model_dump(mode="json"),
            requested_by=run.requested_by,
        )
        events.append(new_event(this_id, data, actor="cli" if requested_by is None else "api"))
    duplicate = False
    for event in events:
        try:
            await system.bus.publisher.publish(event, expected_last_subject_seq=0 if ticket_id else None)
        except WrongLastSequence:
            duplicate = True  # (a fixed id only: one ticket)
    added = [
        {"ticket_id": e.execution_id, "title": e.data.title, "pipeline": e.data.pipeline}  # type: ignore[attr-defined]
        for e in events
    ]
    if duplicate:
        added[0]["duplicate"] = True
    return added


async def list_tickets(client: Client) -> list[dict[str, Any]]:
    """`corral tickets --json` (and `GET /api/tickets`): newest first, with the last stage's result
    and each hook stage's (`hooks`: stage, step, outcome, exit_code, result; from `ticket.finished`)."""
    rows = await client.records(
        f"SELECT {COLUMNS}, result, (SELECT CAST(e.data->'hooks' AS VARCHAR) FROM events e"
        " WHERE e.type = 'ticket.finished' AND e.execution_id = tickets.ticket_id LIMIT 1) AS hooks"
        " FROM tickets ORDER BY created_seq DESC"
    )
    for row in rows:
        hooks = row.get("hooks")
        row["hooks"] = orjson.loads(hooks) if isinstance(hooks, str) else []
    return rows


async def add_tickets(client: Client, specs: list[TicketSpec]) -> list[dict[str, Any]]:
    """`POST /api/tickets`: like `corral tickets add`, the repository a path on the host that runs Corral."""
    client._require_operator("add tickets")
    if any(spec.repo is None for spec in specs):
        raise UsageError("give repo: the path of a git repository on the host that runs Corral")
    return await create(client.home, client.system, specs, repo=".", pipeline=None, extra={})


async def cmd_tickets(home: Home, args: Any) -> int:
    action = getattr(args, "tickets_cmd", None)
    async with Client.connect(home) as client:
        if action is None:
            rows = await list_tickets(client)
            if args.json:
                render.print_json(rows)
            elif not rows:
                print("no tickets; add one: corral tickets add --title T --goal G --pipeline NAME")
            else:
                columns = [c.strip() for c in COLUMNS.split(",")]
                print(render.table(columns, [[r[c] for c in columns] for r in rows]))
            return 0
        client._require_operator("add tickets")
        if action == "add":
            specs = [
                TicketSpec(
                    title=args.title, goal=args.goal, repo=args.repo, pipeline=args.pipeline, priority=args.priority
                )
            ]
            extra = _vars(args.var)
        else:
            specs = read_file(args.file)
            extra = {}
        added = await create(home, client.system, specs, repo=args.repo, pipeline=args.pipeline, extra=extra)
    if args.json:
        render.print_json(added)
    else:
        for row in added:
            print(row["ticket_id"])
    return 0
