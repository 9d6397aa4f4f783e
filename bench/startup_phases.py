"""`corral ...` with a timestamp at each phase of its start and stop (bench/startup.py --phases).

    CORRAL_T0=$(date +%s.%N) python bench/startup_phases.py run --repo R -q -- AGENT

Runs the CLI in this process with a few of Corral's functions wrapped (nothing else changes) and, at
exit, writes one line `PHASES {json}` to stderr: {mark: seconds since CORRAL_T0 (the launch, taken
by the caller before the interpreter started)}. Marks missing from a checkout are left out, so an
older tree given to `--compare` is traced as far as its functions match.
"""

import atexit
import functools
import inspect
import os
import sys
import time
from typing import Any

T0 = float(os.environ.get("CORRAL_T0") or time.time())
MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS.setdefault(name, time.time() - T0)  # the first time each mark is reached


def _report() -> None:
    mark("exit")
    import json

    sys.stderr.write("PHASES " + json.dumps({k: round(v, 4) for k, v in MARKS.items()}) + "\n")


def wrap(owner: Any, name: str, label: str) -> None:
    """Mark `label begin` / `label end` around owner.name (a function or method; async or not)."""
    original = getattr(owner, name, None)
    if original is None:
        return
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            mark(f"{label} begin")
            try:
                return await original(*args, **kwargs)
            finally:
                mark(f"{label} end")

        setattr(owner, name, wrapped_async)
    else:

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(f"{label} begin")
            try:
                return original(*args, **kwargs)
            finally:
                mark(f"{label} end")

        setattr(owner, name, wrapped)


def main() -> int:
    mark("interpreter ready")
    atexit.register(_report)
    import corral.entry as entry

    start_early = getattr(entry, "_start_early", None)  # the projector's worker, first thing (as main() does)
    if start_early is not None:
        start_early()
        mark("worker started early")
    import corral.cli as cli

    mark("imported")
    import corral.commands as commands
    import corral.server as server
    import corral.system as system
    import projections.projector as projector

    wrap(server.EmbeddedServer, "start_async", "server start")
    wrap(server.EmbeddedServer, "stop", "server stop")
    wrap(system, "_provision", "provision")
    wrap(system, "_start_actors", "actors start")
    wrap(system, "_shutdown", "shutdown")
    wrap(commands, "_after_exit", "summary")
    wrap(projector.Projector, "start", "projector start")
    wrap(projector.Projector, "stop", "projector stop")
    wrap(projector.Projector, "close_database", "projector worker close")
    original_follow = getattr(commands, "follow")  # noqa: B009 (replaced below for the trace)

    def follow(js: Any, subject: str, on_event: Any, **kwargs: Any) -> Any:
        async def seen(seq: int, msg: Any) -> Any:
            mark(msg.subject.split(".", 3)[3])  # execution.requested, workspace.created, ...
            return await on_event(seq, msg)

        return original_follow(js, subject, seen, **kwargs)

    setattr(commands, "follow", follow)  # noqa: B010 (a module attribute replaced for the trace)
    sys.argv = ["corral", *sys.argv[1:]]
    code = cli.main()
    mark("returned")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
