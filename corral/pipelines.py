"""`corral pipelines`, `corral pipeline run|status|cancel`: the CLI of [pipelines.NAME] (docs/orchestration.md).

`pipeline run` resolves every stage as `corral run` would (template, defaults, the agent CLI's
command line, limits) and records one `pipeline.requested` with the stages in it; the conductor
(actors/conductor.py) does the rest from the log. Without --detach the command follows the run and
prints each stage's start and end; its exit code is 0 when the run passed.
"""

import argparse
import asyncio
import contextlib
import os
import re
import sys
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as NatsNotFound
from pydantic import BaseModel, ConfigDict, Field

from actors.conductor import VARIABLE
from corral import render
from corral.client import Client, RunSpec, build_request
from corral.config import ConfigError, Pipeline, PipelineStage, load_config
from corral.errors import CorralError, NotFound, UsageError
from corral.home import Home, SystemLock
from corral.ops.base import parse_env, start_background_system
from corral.system import System, open_system
from events.envelope import decode_event, new_event
from events.errors import EventError, WrongLastSequence
from events.ids import is_valid_execution_id, new_execution_id
from events.subjects import STREAM, event_subject, events_of_type, execution_events
from events.types import (
    BreakerClosed,
    BreakerCounted,
    BreakerOpened,
    PipelineCancelRequested,
    PipelineFinished,
    PipelineHeld,
    PipelineRequested,
    StageFinished,
    StageStarted,
)
from replay.history import follow

BUILTINS: Final = ("run_id", "pipeline", "repo", "base", "stage", "round", "worktree", "branch", "changed_files")
FACTS: Final = ("outcome", "verdict", "comments", "result", "exit_code", "execution_id", "stage")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral pipelines` and `corral pipeline` to `sub`; return {command name: handler(home, args)}."""
    listing = sub.add_parser("pipelines", help="list the pipelines of corral.toml ([pipelines.NAME])")
    listing.add_argument("--json", action="store_true")
    pipeline = sub.add_parser("pipeline", help="run a pipeline, show a run's stages, cancel a run")
    actions = pipeline.add_subparsers(dest="pipeline_cmd", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run a pipeline's stages one after another (the conductor drives it)")
    run.add_argument("name", metavar="NAME")
    run.add_argument("--repo", default=".", help="git repository to branch from (default: .)")
    run.add_argument("--base", default="HEAD", help="commit or ref to start from (default: HEAD)")
    run.add_argument("--var", action="append", metavar="NAME=VALUE", help="a {{NAME}} of the stages' tasks")
    run.add_argument("--detach", "-d", action="store_true", help="print the run id and return")
    run.add_argument("--json", action="store_true", help="print the finished run as JSON")
    status = actions.add_parser("status", help="a run's stages, executions and outcomes")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--json", action="store_true")
    cancel = actions.add_parser("cancel", help="cancel a run: its running stage is cancelled, no stage follows")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--reason")
    breakers = sub.add_parser(
        "breakers", help="circuit breakers of pipeline stages and templates: failures, open or closed"
    )
    breakers.add_argument("--json", action="store_true")
    return {"pipelines": cmd_pipelines, "pipeline": cmd_pipeline, "breakers": cmd_breakers}


# --- resolving a run ---------------------------------------------------------------------------------


def _words(stage: PipelineStage) -> list[str]:
    return [w for w in (stage.task, stage.run, *(stage.command or ())) if w]


def check_variables(pipeline: Pipeline, values: dict[str, str]) -> None:
    """Every {{name}} a stage uses must be a --var, a pipeline var, a built-in or an earlier stage's fact."""
    stages = [s.name for s in pipeline.stages]
    known = {*values, *BUILTINS, *(f"previous.{f}" for f in FACTS), *(f"{s}.{f}" for s in stages for f in FACTS)}
    for stage in pipeline.stages:
        for word in _words(stage):
            for match in VARIABLE.finditer(word):
                if match.group(1) not in known:
                    raise UsageError(
                        f"pipeline {pipeline.name}: stage {stage.name} uses {{{{{match.group(1)}}}}}, which is not "
                        f"known: give it with --var {match.group(1)}=VALUE, or use one of {', '.join(BUILTINS)}, "
                        "previous.<fact>, <stage>.<fact> (docs/orchestration.md); nothing was started"
                    )


async def resolve_stages(
    home: Home, pipeline: Pipeline, repo: str, base: str, system: System | None
) -> list[dict[str, Any]]:
    """Each stage as the conductor needs it: its execution request resolved as `corral run` resolves one
    (a bad template or a missing agent CLI is refused now), the task and command still with their {{variables}}."""
    resolved = []
    for stage in pipeline.stages:
        command: list[str] = []
        if stage.kind == "hook":
            command = ["sh", "-c", stage.run or "true"]
        elif stage.kind == "command":
            command = list(stage.command or ())
        spec = RunSpec.model_validate(
            {
                "repo": repo,
                "base": base,
                "command": command,
                "agent": stage.agent,
                "task": stage.task,
                "template": stage.template,
                "timeout": stage.timeout,
            }
        )
        try:
            _, request = await build_request(home, spec, system=system)
        except CorralError as exc:
            raise UsageError(f"pipeline {pipeline.name}: stage {stage.name}: {exc.message}") from None
        kind = "agent" if request.agent != "command" and stage.kind != "hook" else stage.kind
        resolved.append(
            {
                "name": stage.name,
                "kind": kind,
                "task": stage.task,
                "run": stage.run,
                "command": list(request.command),
                "on_passed": stage.on_passed,
                "on_failed": stage.on_failed,
                "on_changes_requested": stage.on_changes_requested,
                "request": request.model_dump(mode="json"),
            }
        )
    return resolved


def _pipeline(home: Home, name: str) -> Pipeline:
    config = load_config(home)
    found = config.pipelines.get(name)
    if found is None:
        known = ", ".join(sorted(config.pipelines)) or f"none in {config.label}"
        raise ConfigError(f"no pipeline {name!r} (known: {known}); add [pipelines.{name}] (docs/orchestration.md)")
    return found


def _vars(given: list[str] | None) -> dict[str, str]:
    values = parse_env(given or [])
    for key in values:
        if not _VAR_NAME.fullmatch(key):
            raise UsageError(f"--var {key}=...: a name is letters, digits, _ and -, starting with a letter")
    return values


# --- commands ----------------------------------------------------------------------------------------


async def cmd_pipelines(home: Home, args: Any) -> int:
    config = load_config(home)
    rows: list[dict[str, Any]] = [
        {
            "name": p.name,
            "description": p.description,
            "max_rounds": p.max_rounds,
            "vars": p.vars,
            "stages": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "agent": s.agent,
                    "template": s.template,
                    "on_passed": s.on_passed,
                    "on_failed": s.on_failed,
                    "on_changes_requested": s.on_changes_requested,
                }
                for s in p.stages
            ],
        }
        for p in config.pipelines.values()
    ]
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        print(f"no pipelines in {config.label}; add [pipelines.NAME] (docs/orchestration.md)")
        return 0
    table = [[r["name"], " → ".join(s["name"] for s in r["stages"]), r["max_rounds"], r["description"]] for r in rows]
    print(render.table(["name", "stages", "max_rounds", "description"], table))
    return 0


async def cmd_pipeline(home: Home, args: Any) -> int:
    if args.pipeline_cmd == "run":
        return await _run(home, args)
    run_id = args.run_id
    if not is_valid_execution_id(run_id):
        raise UsageError(f"{run_id!r} is not a run id (8 characters, as `corral pipeline run` printed it)")
    async with Client.connect(home) as client:
        if args.pipeline_cmd == "cancel":
            return await _cancel(client, run_id, args.reason)
        report = await run_status(client.system, run_id)
    if args.json:
        render.print_json(report)
    else:
        _print_status(report)
    return 0


async def _run(home: Home, args: Any) -> int:
    pipeline = _pipeline(home, args.name)
    values = {**pipeline.vars, **_vars(args.var)}
    check_variables(pipeline, values)
    if args.detach and not SystemLock(home).is_held_elsewhere():
        pid = start_background_system(home)
        sys.stderr.write(f"corral: started a background system (corral up, pid {pid}); stop it with `corral down`\n")
    async with open_system(home) as system:
        stages = await resolve_stages(home, pipeline, args.repo, args.base, system)
        run_id = new_execution_id()
        request = PipelineRequested(
            pipeline=pipeline.name,
            repo=str(stages[0]["request"]["repo"]),
            base=args.base,
            vars=values,
            stages=tuple(stages),
            max_rounds=pipeline.max_rounds,
            breaker_failures=pipeline.breaker_failures,
            requested_by=os.environ.get("USER"),
        )
        if args.detach:
            await system.bus.publisher.publish(new_event(run_id, request, actor="cli"))
            print(run_id)
            return 0
        finished = await _follow_run(system, run_id, request, quiet=args.json)
        if args.json:
            render.print_json(await run_status(system, run_id))
    return 0 if finished.outcome == "passed" else 1


class RunRequest(BaseModel):
    """`POST /api/pipelines/{name}/runs`: what `corral pipeline run NAME` takes."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(description="git repository (a path on the host that runs Corral)")
    base: str = "HEAD"
    vars: dict[str, str] = Field(default_factory=dict)


async def request_run(client: Client, name: str, spec: RunRequest, *, run_id: str | None = None) -> dict[str, Any]:
    """Check and record a run of pipeline `name`; {run_id, pipeline}. The conductor runs it.

    `run_id` given (a webhook's delivery, corral/hooks.py): recorded once under it; a second request
    with it is {run_id, pipeline, duplicate: true} and records nothing."""
    client._require_operator("run pipelines")
    pipeline = _pipeline(client.home, name)
    values = {**pipeline.vars, **_vars([f"{k}={v}" for k, v in spec.vars.items()])}
    check_variables(pipeline, values)
    stages = await resolve_stages(client.home, pipeline, spec.repo, spec.base, client.system)
    fixed = run_id
    run_id = run_id or new_execution_id()
    request = PipelineRequested(
        pipeline=pipeline.name,
        repo=str(stages[0]["request"]["repo"]),
        base=spec.base,
        vars=values,
        stages=tuple(stages),
        max_rounds=pipeline.max_rounds,
        breaker_failures=pipeline.breaker_failures,
        requested_by=client.decider or os.environ.get("USER"),
    )
    event = new_event(run_id, request, actor="api" if client.decider else "cli")
    try:
        await client.system.bus.publisher.publish(event, expected_last_subject_seq=0 if fixed else None)
    except WrongLastSequence:
        return {"run_id": run_id, "pipeline": pipeline.name, "duplicate": True}
    return {"run_id": run_id, "pipeline": pipeline.name}


async def cancel_run(client: Client, run_id: str, reason: str | None = None) -> dict[str, Any]:
    """Ask the conductor to cancel a run that is not finished; {run_id, cancel_requested}."""
    client._require_operator("cancel pipeline runs")
    if not is_valid_execution_id(run_id):
        raise UsageError(f"{run_id!r} is not a run id (8 characters, as `corral pipeline run` printed it)")
    report = await run_status(client.system, run_id)
    if report["state"] not in ("requested", "running"):
        raise UsageError(f"pipeline run {run_id} is {report['state']}: nothing to cancel")
    data = PipelineCancelRequested(reason=reason, requested_by=client.decider or os.environ.get("USER"))
    await client.system.bus.publisher.publish(new_event(run_id, data, actor="api" if client.decider else "cli"))
    return {"run_id": run_id, "cancel_requested": True}


async def _follow_run(system: System, run_id: str, request: PipelineRequested, *, quiet: bool) -> PipelineFinished:
    """Publish the run and print its stages until pipeline.finished."""
    ended: asyncio.Future[PipelineFinished] = asyncio.get_running_loop().create_future()

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    async def handle(_seq: int, msg: Msg) -> bool:
        try:
            data = decode_event(msg.data).data
        except EventError:
            return False
        if isinstance(data, StageStarted):
            say(f"{run_id} stage {data.stage} (round {data.round}) started: execution {data.execution_id}")
        elif isinstance(data, StageFinished):
            extra = f", verdict {data.verdict}" if data.verdict else ""
            code = f" (exit code {data.exit_code})" if data.exit_code is not None else ""
            say(f"{run_id} stage {data.stage} {data.outcome}{code}{extra} → {data.next}")
            if data.error:
                say(f"  {data.error}")
        elif isinstance(data, PipelineFinished):
            if not ended.done():
                ended.set_result(data)
            return True
        return False

    done = asyncio.Event()
    follower = asyncio.create_task(follow(system.bus.js, execution_events(run_id), handle, done=done))
    await system.bus.publisher.publish(new_event(run_id, request, actor="cli"))
    say(f"{run_id}: pipeline {request.pipeline} requested ({len(request.stages)} stages)")
    try:
        finished = await ended
    finally:
        done.set()
        follower.cancel()
        with contextlib.suppress(BaseException):
            await follower
    say(f"{run_id}: pipeline {finished.outcome}" + (f": {finished.reason}" if finished.reason else ""))
    return finished


async def run_status(system: System, run_id: str) -> dict[str, Any]:
    """A run from its events: the pipeline, its state and each step (stage, execution, outcome)."""
    if not is_valid_execution_id(run_id) or len(run_id) != 8:
        raise UsageError(f"{run_id!r} is not a run id (8 characters, as `corral pipeline run` printed it)")
    report: dict[str, Any] = {"run_id": run_id, "state": None, "steps": []}
    steps: dict[int, dict[str, Any]] = {}

    async def handle(_seq: int, msg: Msg) -> bool:
        try:
            event = decode_event(msg.data)
        except EventError:
            return False
        data = event.data
        if isinstance(data, PipelineRequested):
            report.update(pipeline=data.pipeline, repo=data.repo, vars=data.vars, requested_at=event.ts.isoformat())
            report["state"] = report["state"] or "requested"
        elif isinstance(data, StageStarted):
            report["state"] = "running"
            steps[data.step] = {
                "step": data.step,
                "stage": data.stage,
                "round": data.round,
                "kind": data.kind,
                "execution_id": data.execution_id,
                "started_at": event.ts.isoformat(),
                "outcome": None,
            }
        elif isinstance(data, StageFinished) and data.step in steps:
            steps[data.step].update(
                outcome=data.outcome,
                exit_code=data.exit_code,
                verdict=data.verdict,
                comments=data.comments,
                result=data.result,
                error=data.error,
                next=data.next,
                finished_at=event.ts.isoformat(),
            )
        elif isinstance(data, PipelineFinished):
            report.update(state=data.outcome, reason=data.reason, finished_at=event.ts.isoformat())
        elif isinstance(data, PipelineCancelRequested) and report["state"] in ("requested", "running"):
            report["cancel_requested"] = True
        elif isinstance(data, PipelineHeld):
            report["held"] = {"stage": data.stage, "breaker": data.breaker, "at": event.ts.isoformat()}
        return False

    await follow(system.bus.js, execution_events(run_id), handle, stop_when_caught_up=True)
    if report["state"] is None:
        raise NotFound(f'no pipeline run {run_id}; `corral sql "SELECT * FROM pipelines"` lists them')
    report["steps"] = [steps[k] for k in sorted(steps)]
    return report


def _print_status(report: dict[str, Any]) -> None:
    head = f"{report['run_id']}  {report.get('pipeline')}  {report['state']}"
    if report.get("reason"):
        head += f": {report['reason']}"
    elif report.get("held") and report["state"] in ("requested", "running"):
        head += f" (held before stage {report['held']['stage']}: circuit breaker {report['held']['breaker']} is open)"
    print(head)
    columns = ("step", "stage", "round", "execution_id", "outcome", "verdict", "next")
    rows = [[s.get(c) if c != "outcome" else s["outcome"] or "running" for c in columns] for s in report["steps"]]
    if rows:
        print(render.table(["step", "stage", "round", "execution", "outcome", "verdict", "next"], rows))


async def _cancel(client: Client, run_id: str, reason: str | None) -> int:
    await cancel_run(client, run_id, reason)
    print(f"{run_id}: cancel requested")
    return 0


# --- circuit breakers ----------------------------------------------------------------------------------


async def breakers(client: Client) -> list[dict[str, Any]]:
    """Every breaker the conductors counted: key, failures in a row, open or closed, its escalation."""
    js = client.system.bus.js
    try:
        info = await js.stream_info(STREAM, subjects_filter=events_of_type("breaker.counted"))
    except NatsNotFound:
        return []
    found: list[dict[str, Any]] = []
    for subject in sorted(info.state.subjects or {}):
        bid = subject.split(".")[2]
        row: dict[str, Any] = {"breaker_id": bid, "state": "closed", "failures": 0}
        seqs = {"opened": 0, "closed": 0}
        for kind in ("breaker.counted", "breaker.opened", "breaker.closed"):
            try:
                stored = await js.get_last_msg(STREAM, event_subject(bid, kind))
                event = decode_event(stored.data or b"")
            except (NatsNotFound, EventError):
                continue
            data = event.data
            if isinstance(data, BreakerCounted):
                row.update(key=data.key, failures=data.failures, counted_at=event.ts.isoformat())
            elif isinstance(data, BreakerOpened):
                seqs["opened"] = stored.seq or 0
                row.update(key=data.key, threshold=data.threshold, opened_at=event.ts.isoformat())
            elif isinstance(data, BreakerClosed):
                seqs["closed"] = stored.seq or 0
                row.update(
                    closed_at=event.ts.isoformat(),
                    released=data.release,
                    decided_by=data.decided_by,
                    approval_id=data.approval_id,
                )
        if seqs["opened"] > seqs["closed"]:
            row["state"] = "open"
            pending = await client.records(
                "SELECT approval_id FROM approvals WHERE execution_id = "
                f"'{bid}' AND status = 'pending' ORDER BY requested_seq DESC LIMIT 1"
            )
            row["approval_id"] = pending[0]["approval_id"] if pending else None
        found.append(row)
    return found


async def cmd_breakers(home: Home, args: Any) -> int:
    async with Client.connect(home) as client:
        rows = await breakers(client)
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        print("no circuit breakers yet: they count failures of stages, templates and schedules (docs/orchestration.md)")
        return 0
    table = [
        [r.get("key"), r["state"], r["failures"], r.get("approval_id") if r["state"] == "open" else r.get("decided_by")]
        for r in rows
    ]
    print(render.table(["breaker", "state", "failures", "approval / decided by"], table))
    return 0
