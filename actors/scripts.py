"""A template's setup and teardown scripts, run by the shim around the agent (docs/orchestration.md#setup-and-teardown).

`setup` runs in the new worktree before the agent starts, `teardown` after the agent (and every
process it started) has ended and before `execution.exited` is recorded, so the exit checkpoint
sees the worktree as teardown left it. Each is `sh -c LINE` in the agent's sandbox (the same bwrap
arguments but the network-allow gate's), in its working directory, with its environment and in its
cgroup (its limits); each is recorded as `setup.finished` / `teardown.finished` with its exit code,
duration and the tail of its output (both streams, secrets redacted like the agent's). A setup that
does not exit 0 fails the execution (`execution.failed`, stage `setup`) and the agent never starts;
a teardown's failure is recorded and changes nothing else. Each is stopped after SCRIPT_TIMEOUT_S.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from actors import sandbox

SCRIPT_TIMEOUT_S: Final = 600.0
OUTPUT_TAIL: Final = 4000  # characters of a script's output recorded


async def run_script(
    spec: Mapping[str, Any],
    phase: str,
    env: Mapping[str, str],
    preexec: Callable[[], None] | None,
    record: Callable[[str, dict[str, Any]], None],
    redact: Callable[[str], str] = lambda text: text,
) -> int:
    """Run the spec's `phase` script ("setup" or "teardown") and record `<phase>.finished`; its exit code
    (-N: signal N; 127: it could not start)."""
    line = str(spec[phase])
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *sandbox.wrap(spec, ["sh", "-c", line]),
            cwd=spec["cwd"],
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        output, code = f"cannot start the {phase} script: {getattr(exc, 'strerror', None) or exc}", 127
    else:
        try:
            out, _ = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_S)
            output = out.decode(errors="replace")
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            output = f"the {phase} script did not end within {SCRIPT_TIMEOUT_S:.0f}s: killed"
        code = sandbox.exit_status(spec, process.returncode if process.returncode is not None else -9)
    record(
        f"{phase}.finished",
        {
            "command": line,
            "exit_code": code,
            "duration_s": round(time.monotonic() - started, 6),
            "output": redact(output[-OUTPUT_TAIL:]),
        },
    )
    return code


def failure(code: int, output_tail: str) -> str:
    """The `execution.failed` error of a setup that did not exit 0."""
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    last = next((line.strip() for line in reversed(output_tail.splitlines()) if line.strip()), "")
    return f"setup script {how}" + (f": {last[:300]}" if last else "")
