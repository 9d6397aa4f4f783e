"""What every operation shares: notices, execution ids, the projector's queries, command checks."""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from actors.bus import PermissionRefused
from actors.redact import SECRET_PLACEHOLDER, is_secret_name
from corral.config import load_config
from corral.errors import CorralError, NotFound, UsageError
from corral.home import Home
from corral.rows import records
from corral.system import System
from events.ids import is_valid_execution_id
from events.subjects import API_EXPORT, API_SNAPSHOT, API_SQL, STREAM, events_of_type
from events.types import ExecutionRequested
from replay.history import last_sequence

MAX_REQUEST_BYTES = 1 << 20  # an execution.requested event: at most 1 MiB (docs/control.md)


def info(message: str) -> None:
    sys.stderr.write(f"corral: {message}\n")
    sys.stderr.flush()


async def known_execution_ids(system: System) -> list[str]:
    """List every execution id in the log, read from the stream's subjects (no projection needed)."""
    stream = await system.bus.js.stream_info(STREAM, subjects_filter=events_of_type("execution.requested"))
    return sorted(subject.split(".")[2] for subject in (stream.state.subjects or {}))


async def resolve_execution_id(system: System, prefix: str) -> str:
    """Return the one execution id starting with prefix, or raise a clear error."""
    if not is_valid_execution_id(prefix.lower()):
        raise NotFound(f"{prefix!r} is not an execution id; `corral ps --all` lists them")
    matches = [i for i in await known_execution_ids(system) if i.startswith(prefix.lower())]
    if not matches:
        raise NotFound(f"no execution matches {prefix!r}; `corral ps --all` lists them")
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (" …" if len(matches) > 5 else "")
        raise UsageError(f"{prefix!r} matches {len(matches)} executions ({shown}); type more of the id")
    return matches[0]


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def refuse_secret_env(env: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    """Stop a request that would write a secret's value into the event log (docs/security.md)."""
    for name, value in env.items():
        if is_secret_name(name, extra) and value != SECRET_PLACEHOLDER:
            raise UsageError(
                f"--env {name}: a secret's value is never written into the event log; export {name} where "
                f"the spawner runs (`corral up`, or this shell for a one-off `corral run`) — agents inherit it — "
                f"or pass --env {name}='{SECRET_PLACEHOLDER}' to record only that the agent uses it"
            )


def _tracked(repo: Path, base: str, path: str) -> bool:
    result = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-e", f"{base}:{path}"], capture_output=True, check=False
    )
    return result.returncode == 0


def check_command(command: list[str], repo: Path, base: str = "HEAD") -> list[str]:
    """Check the program exists; return the command with an untracked relative program made absolute.

    A relative program that the repository tracks (./scripts/agent.sh) runs from the worktree;
    one that only exists here (.venv/bin/python) is taken from where the user typed it.
    """
    if not command:
        raise UsageError("no command to run; put it after `--`, e.g. corral run -- python agent.py")
    program = command[0]
    if "/" in program and not os.path.isabs(program) and not _tracked(repo, base, program):
        local = Path(program).absolute()
        if local.is_file():
            command = [str(local), *command[1:]]
            program = command[0]
    if "/" in program:
        candidate = Path(program) if os.path.isabs(program) else repo / program
        if not candidate.is_file():
            raise UsageError(f"command not found: {program} (looked for {candidate})")
        if not os.access(candidate, os.X_OK):
            raise UsageError(f"command is not executable: {candidate} (chmod +x it)")
    elif shutil.which(program) is None:
        raise UsageError(f"command not found: {program} (not on PATH)")
    return command


def start_background_system(home: Home) -> int:
    """Start `corral up` detached from this terminal and wait until it is ready; return its pid."""
    home.ensure()
    with open(home.up_log, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral", "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=os.environ.copy(),
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        runtime = home.read_runtime()
        if runtime and runtime.get("ready") and runtime.get("pid") == process.pid:
            return process.pid
        if process.poll() is not None:
            raise CorralError(f"background `corral up` exited with {process.returncode}; see {home.up_log}")
        time.sleep(0.05)
    process.terminate()
    raise CorralError(f"background `corral up` did not become ready in 20s; see {home.up_log}")


def check_request_size(event: bytes) -> None:
    """Refuse a request whose event is over MAX_REQUEST_BYTES: one line, nothing published.

    Its command comes back in `execution.started`, and events have a size limit (the stream's);
    large text belongs in a file of the repository, not in the command line or the task.
    """
    if len(event) > MAX_REQUEST_BYTES:
        raise UsageError(
            f"the request is {len(event)} bytes; at most {MAX_REQUEST_BYTES} bytes (1 MiB: command, task, env, "
            "policy and labels together) may be submitted: put large text in a file of the repository; "
            "nothing was started"
        )


NO_RESPONDER_WAIT_S = 5.0


async def query(system: System, sql: str, *, max_rows: int = 10000) -> dict[str, Any]:
    """Run SQL on the projector's connection after it has applied every event logged so far."""
    # the projector stops a query after [sql] timeout (and may wait up to 10 s for its position)
    wait_s = max(60.0, load_config(system.home).sql.timeout_s + 20.0)
    return await _ask_projector(system, API_SQL, {"sql": sql, "max_rows": max_rows}, wait_s=wait_s)


EXPORT_WAIT_S = 3600.0


async def take_snapshot(system: System, path: Path) -> dict[str, Any]:
    """Have the projector copy every table into a DuckDB file at `path` (written aside, then put in
    place atomically: readers of the previous snapshot keep theirs). Operators only."""
    request = {"path": str(path)}  # absolute (snapshot_target): the projector has its own working directory
    return await _ask_projector(system, API_SNAPSHOT, request, wait_s=EXPORT_WAIT_S)


async def export_query(system: System, sql: str, path: Path) -> int:
    """Have the projector write the rows of one SELECT to a new Parquet file at `path` (absolute; an
    operator's request: `tap` may not send it); return how many rows it wrote."""
    request = {"sql": sql, "path": str(path)}  # absolute: the projector has its own working directory
    result = await _ask_projector(system, API_EXPORT, request, wait_s=EXPORT_WAIT_S)
    return int(result["rows"][0][0]) if result["rows"] else 0


async def _ask_projector(system: System, subject: str, request: dict[str, Any], *, wait_s: float) -> dict[str, Any]:
    request = {**request, "min_seq": await last_sequence(system.bus.js)}
    deadline = time.monotonic() + NO_RESPONDER_WAIT_S
    while True:
        try:
            reply = await system.bus.request(subject, orjson.dumps(request), timeout_s=wait_s)
            break
        except PermissionRefused as exc:  # this user may not ask that (tap and an export, a snapshot)
            raise CorralError(f"{exc} (docs/security.md)") from None
        except NoRespondersError:
            if time.monotonic() < deadline:  # a projector (re)starting subscribes in a moment
                await asyncio.sleep(0.2)
                continue
            raise CorralError(
                "no projector answers on this system (was `corral up` started with --actors without projector?)"
            ) from None
        except NatsTimeoutError:
            raise CorralError(f"the projector did not answer within {wait_s:g} s; see `corral status`") from None
    result: dict[str, Any] = orjson.loads(reply.data)
    if not result.get("ok"):
        kind = result.get("kind")
        if kind == "refused":  # not one query (docs/security.md, the query sandbox): nothing ran
            raise UsageError(f"refused: {result.get('error')}")
        if kind == "timeout":
            raise CorralError(f"timed out: {result.get('error')}")
        raise UsageError(f"SQL error: {result.get('error')}")
    return result


DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")


def parse_since(text: str) -> dict[str, Any]:
    """`--since` is a stream sequence (123), a duration (90s, 10m, 2h, 1d) or `all`."""
    if text == "all":
        return {"start_seq": 1}
    if text.isdigit():
        return {"start_seq": int(text)}
    match = DURATION.match(text)
    if not match:
        raise UsageError(f"--since expects a sequence number, a duration like 10m, or all; got {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return {"start_time": datetime.now(UTC) - timedelta(seconds=float(match.group(1)) * unit)}


def sql_text(value: str) -> str:
    """Quote a string as a DuckDB literal."""
    if "\0" in value:
        raise UsageError("text must not contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


async def rows(system: System, sql: str, *, max_rows: int = 100000) -> list[dict[str, Any]]:
    result = await query(system, sql, max_rows=max_rows)
    return records(result["columns"], result["rows"])


async def recorded_request(system: System, execution_id: str) -> ExecutionRequested:
    found = await rows(
        system,
        f"SELECT data FROM events WHERE execution_id = {sql_text(execution_id)} "
        "AND type = 'execution.requested' ORDER BY seq LIMIT 1",
    )
    if not found:
        raise NotFound(f"{execution_id} has no recorded request in the projections")
    return ExecutionRequested.model_validate(orjson.loads(found[0]["data"]))
