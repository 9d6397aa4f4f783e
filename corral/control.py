"""Live control from the CLI: input, pause, resume, cancel, extend, priority, status, health.

Each control command appends a request event and waits for the event the owning actor records
in answer (its causation id is the request's id), or for `control.rejected` with the reason.
"""

import sys
from pathlib import Path
from typing import Any

import orjson

from corral import render
from corral.errors import UsageError
from corral.home import Home
from corral.ops.base import info, resolve_execution_id
from corral.ops.control import check_input_size, execution_row, require_state
from corral.ops.control import refusal_text as refusal_text  # re-exported (moved to corral/ops)
from corral.system import System


def status_lines(status: dict[str, Any]) -> list[str]:
    """`corral status` as text: one `key  value` line per known value; nested values as JSON."""
    width = max(len(k) for k in status)
    lines = []
    for key, value in status.items():
        if value is None and key == "cost_usd" and status.get("agent") not in (None, "command"):
            value = "unknown (no price for the model: add it under [prices] in corral.toml)"
        if value is None:
            continue
        shown = render.human_duration(value) if key.endswith("_s") and isinstance(value, int | float) else value
        if isinstance(shown, dict | list | tuple):  # agent_features: JSON, not Python's repr
            shown = orjson.dumps(shown).decode()
        lines.append(f"{key.ljust(width)}  {render.cell(shown) if not isinstance(shown, str) else shown}")
    return lines


def _print(args: Any, answer: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        render.print_json(answer)
    else:
        print(text)


async def _target(system: System, args: Any, allowed: tuple[str, ...], action: str) -> tuple[str, dict[str, Any]]:
    execution_id = await resolve_execution_id(system, args.execution_id)
    row = await execution_row(system, execution_id)
    require_state(execution_id, row, allowed, action)
    return execution_id, row


def read_input(args: Any) -> str:
    """The bytes `corral input` sends: TEXT plus a newline, or a file (or stdin) as it is."""
    if args.file is not None:
        if args.text is not None:
            raise UsageError("give the input as TEXT or --file, not both")
        try:
            return sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"cannot send {args.file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if args.text is None:
        raise UsageError("nothing to send; give TEXT or --file F (- for stdin)")
    return str(args.text) if args.text.endswith("\n") else args.text + "\n"


async def cmd_input(home: Home, args: Any) -> int:
    from corral.client import Client

    text = read_input(args)
    check_input_size(text)
    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.input(args.execution_id, text)
    _print(args, answer, f"{answer['execution_id']}: delivered {answer['data']['bytes']} bytes to stdin")
    return 0


async def cmd_pause(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.pause(args.execution_id, args.reason)
    pids = answer["data"]["pids"]
    text = f"{answer['execution_id']}: paused ({len(pids)} process{'es' if len(pids) != 1 else ''} stopped)"
    _print(args, answer, text)
    return 0


async def cmd_resume(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.resume(args.execution_id, args.reason)
    _print(args, answer, f"{answer['execution_id']}: resumed")
    return 0


async def cmd_cancel(home: Home, args: Any) -> int:
    from corral.client import Client

    if args.grace is not None and args.grace < 0:
        raise UsageError("--grace must be 0 or more seconds")
    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.cancel(args.execution_id, grace_s=args.grace, reason=args.reason)
    data = answer["data"]
    how = f"signal {data['signal']}" if data.get("signal") else f"exit code {data.get('exit_code')}"
    _print(args, answer, f"{answer['execution_id']}: {data.get('reason', 'ended')} ({how})")
    return 0


async def cmd_extend(home: Home, args: Any) -> int:
    from corral.client import Client

    if args.seconds <= 0:
        raise UsageError("SECONDS must be more than 0")
    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.extend(args.execution_id, args.seconds)
    _print(args, answer, f"{answer['execution_id']}: hard timeout now {answer['data']['hard_deadline']}")
    return 0


async def cmd_priority(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=("projector",)) as client:
        answer = await client.priority(args.execution_id, args.priority)
    position = answer.pop("queue_position")
    _print(args, answer, f"{answer['execution_id']}: priority {args.priority}, queue position {position}")
    return 0


async def cmd_status(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=("projector",)) as client:
        status = await client.status(args.execution_id)
    if args.json:
        render.print_json(status)
        return 0
    for line in status_lines(status):
        print(line)
    return 0


async def cmd_health(home: Home, args: Any) -> int:
    """Every actor instance of the last HEALTH_RETENTION_S: alive, or gone (silent > HEALTH_MISSED_BEATS beats).

    Exit 0 when every actor that reported in that time has an alive instance: the instances of a
    crashed `corral up` show as gone beside their successors, and are forgotten after the retention.
    """
    from corral.client import Client

    async with Client.connect(home, actors=()) as client:
        health = await client.health()
    rows, down = health["actors"], health["down"]
    if args.json:
        render.print_json(health)
        return 1 if down else 0
    if not rows:
        info("no actor has reported; is `corral up` running?")
        return 1
    print(
        render.table(
            ["actor", "instance", "state", "last seen", "lag", "version", "detail"],
            [
                [
                    r.get("actor"),
                    r.get("instance"),
                    "ALIVE" if r["alive"] else "gone",
                    render.human_duration(r["last_seen_s"]) + " ago",
                    r["lag"],
                    r.get("version"),
                    _detail(r),
                ]
                for r in rows
            ],
        )
    )
    if down:
        info(f"no alive instance of: {', '.join(down)}")
    return 1 if down else 0


def _detail(record: dict[str, Any]) -> str:
    skip = {"actor", "instance", "alive", "state", "last_seen", "last_seen_s", "lag", "version", "host", "pid"}
    skip |= {"started_at", "key", "written_at", "boot_id", "beat", "interval_s"}
    return " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
