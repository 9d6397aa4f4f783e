"""The `corral` command: parse arguments, run one command, turn errors into one line and an exit code."""

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any, Final

from corral import __version__, commands, config, control, wrap
from corral.errors import CorralError
from corral.home import Home
from corral.interrupt import interrupted
from events.errors import EventError
from projections.errors import ProjectionError


def build_parser(*, only_run: bool = False, core_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line; `only_run`: just `corral run`'s, without importing the feature modules
    (a `corral run` that starts its own system is timed from the shell: issue 20 §6); `core_only`:
    every command of this module, without the feature modules' (`corral ps` and the other commands
    of COMMANDS need none of them: ~40 ms of imports less, more on a busy machine, issue 20 §5)."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Supervise headless coding agents: each run is an execution in its own git "
        "worktree, recorded in an append-only event log (NATS JetStream) and projected to DuckDB.",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run a command in a new worktree and stream its output")
    run.add_argument("--repo", default=".", help="git repository to branch from (default: .)")
    run.add_argument("--base", default="HEAD", help="commit or ref to start from (default: HEAD)")
    run.add_argument("--task", help="the task text, recorded with the request")
    run.add_argument(
        "--agent",
        choices=["command", "claude-code", "codex", "gemini", "aider"],
        help="the agent CLI: its adapter builds the command from the task and maps its output to events "
        "(default: command = the program after --)",
    )
    run.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment")
    run.add_argument("--label", action="append", metavar="NAME=VALUE", help="labels to record")
    run.add_argument("--template", "-t", help="a template of corral.toml (`corral templates` lists them)")
    run.add_argument("--priority", type=int, metavar="N", help="queue order: higher runs first (default 0)")
    run.add_argument("--timeout", help="hard wall-clock limit, e.g. 30m (frozen while paused; 0 = none)")
    run.add_argument("--idle-timeout", help="stalled after this long without output or heartbeat, e.g. 5m")
    run.add_argument("--spawn-timeout", help="give up if not started this long after being claimed")
    run.add_argument("--on-stall", choices=["notify", "pause", "cancel", "restart"], help="what a stall does")
    run.add_argument("--memory", help="memory limit of the agent's whole process tree, e.g. 2G")
    run.add_argument("--cpus", help="CPU quota of the agent's whole process tree, e.g. 1")
    run.add_argument("--pids", help="processes (and threads) the agent's tree may have, e.g. 512; none: no limit")
    run.add_argument("--disk", help="worktree disk quota: writes past it fail (ENOSPC), the agent is paused, e.g. 5G")
    run.add_argument(
        "--workspace",
        choices=["direct", "shadow"],
        help="shadow: the agent writes into an overlay; validated changes are promoted (docs/shadow.md)",
    )
    run.add_argument(
        "--max-cost",
        metavar="USD",
        help="budget: at this cost the agent is paused and an approval requested (corral approve ID "
        "[--raise-budget USD] continues it, corral reject cancels it)",
    )
    run.add_argument(
        "--resume",
        metavar="EXEC_ID",
        help="a follow-up: continue that finished execution's agent session, in its worktree and branch",
    )
    run.add_argument("--policy", metavar="FILE", help="a TOML file of policy keys for this run (over [policy])")
    run.add_argument(
        "--fanout",
        metavar="AGENT:N,...",
        help="best of N: the same task by several agents from one base, ranked (= corral fanout --agents)",
    )
    run.add_argument(
        "--judge", metavar="CMD", help="with --fanout: a shell line run in each worktree; exit 0 ranks first"
    )
    run.add_argument(
        "--sandbox",
        choices=["auto", "on", "off"],
        help="confine the agent (docs/sandbox.md; default [sandbox] mode, auto): off runs it unconfined",
    )
    run.add_argument("--network", metavar="open|none|allow", help="the agent's network in the sandbox (default open)")
    run.add_argument(
        "--allow",
        action="append",
        metavar="HOST:PORT",
        help="with --network allow: a host:port the agent may reach (repeat it); nothing else is reachable",
    )
    run.add_argument("--detach", "-d", action="store_true", help="print the execution id and return")
    run.add_argument("--quiet", "-q", action="store_true", help="only the agent's own output")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    if only_run:
        return parser

    up = sub.add_parser("up", help="run NATS, the actors and the projector in the foreground")
    up.add_argument(
        "--actors",
        help="comma-separated subset of: spawner, watchdog, checkpointer, validator, approver, projector (default all)",
    )
    up.add_argument("--max-running", type=int, help="agents this spawner runs at once (default: corral.toml, 4)")
    up.add_argument(
        "--nats",
        metavar="URL[,URL...]",
        help="NATS server or cluster to use instead of the embedded one (default: $CORRAL_NATS_URL)",
    )
    up.add_argument("--metrics-port", metavar="PORT", help="serve Prometheus metrics on PORT (docs/metrics.md)")
    up.add_argument("--metrics-address", metavar="ADDR", help="address the metrics port binds (default: 127.0.0.1)")
    up.add_argument(
        "--http", metavar="HOST:PORT", help="serve the HTTP API there (default: [http] address, 127.0.0.1:8765)"
    )
    up.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")

    down = sub.add_parser("down", help="stop a running `corral up`")
    down.add_argument("--timeout", type=float, default=30.0)

    ps = sub.add_parser("ps", help="list executions (running ones unless --all)")
    ps.add_argument("--all", "-a", action="store_true", help="include finished executions")
    ps.add_argument("--json", action="store_true")
    ps.add_argument("--tree", action="store_true", help="every execution, with replays, forks and retries nested")

    logs = sub.add_parser("logs", help="print an execution's output")
    logs.add_argument("execution_id", metavar="EXEC_ID")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it exits")
    logs.add_argument("--stream", choices=["stdout", "stderr"], help="only one stream")
    logs.add_argument("--tail", "-n", type=int, metavar="N", help="only the last N lines (with -f: then live)")
    logs.add_argument("--since", metavar="DURATION", help="only output of the last DURATION (90s, 10m, 2h, 1d)")
    logs.add_argument("--timestamps", "-t", action="store_true", help="put the time each line was produced before it")
    logs.add_argument("--json", action="store_true", help="one JSON object per output chunk: ts, stream, n, text")

    tap = sub.add_parser("tap", help="print events as JSON lines, live")
    tap.add_argument("pattern", nargs="?", help="subject pattern or execution id (default: all)")
    tap.add_argument("--since", help="start at a sequence number, a duration ago (10m) or `all`")
    tap.add_argument("--limit", type=int, help="exit after this many events")
    tap.add_argument(
        "--no-follow",
        action="store_true",
        help="print the events stored so far and exit (default: keep following, like `nats sub`)",
    )

    snapshot = sub.add_parser(
        "snapshot", help="write a consistent copy of the DuckDB projections that any tool can open while Corral runs"
    )
    snapshot.add_argument(
        "path", nargs="?", metavar="PATH", help="the file to write or replace (default: $CORRAL_HOME/snapshot.duckdb)"
    )
    snapshot.add_argument("--json", action="store_true")
    sql = sub.add_parser("sql", help="query the DuckDB projections (read-only)")
    sql.add_argument("sql", metavar="SQL")
    sql.add_argument("--json", action="store_true")
    sql.add_argument("--max-rows", type=int, default=10000)

    projections = sub.add_parser("projections", help="manage the DuckDB projections")
    psub = projections.add_subparsers(dest="action", metavar="ACTION", required=True)
    rebuild = psub.add_parser("rebuild", help="rebuild every table from the event log")
    rebuild.add_argument(
        "--force",
        action="store_true",
        help="swap in the rebuilt tables even when they hold less history than the live ones (a trimmed log)",
    )

    def control(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("execution_id", metavar="EXEC_ID")
        parser.add_argument("--json", action="store_true", help="print the confirming event as JSON")
        return parser

    send = control("input", "send text to a running agent's stdin (a newline is added to TEXT)")
    send.add_argument("text", nargs="?", metavar="TEXT")
    send.add_argument("--file", "-f", metavar="F", help="send this file's bytes as they are (- for stdin)")
    control("pause", "stop the agent's whole process tree (timers freeze)").add_argument("--reason")
    control("resume", "continue a paused agent").add_argument("--reason")
    cancel = control("cancel", "SIGTERM the agent's process tree, SIGKILL after the grace period")
    cancel.add_argument("--grace", type=float, help="seconds between SIGTERM and SIGKILL (default 10)")
    cancel.add_argument("--reason")
    control("extend", "move the hard timeout of a running agent").add_argument("seconds", type=float, metavar="SECONDS")
    control("priority", "reorder a queued execution (higher runs first)").add_argument(
        "priority", type=int, metavar="N"
    )
    control("status", "state, pid, timers, last output and heartbeat, queue position")
    health = sub.add_parser("health", help="every actor instance: alive, lag, last seen, version")
    health.add_argument("--json", action="store_true")

    templates = sub.add_parser("templates", help="list the execution templates of corral.toml")
    templates.add_argument("--json", action="store_true")

    wrap = sub.add_parser("wrap", help="run a tool and write heartbeats on its behalf while it works")
    wrap.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats (default: 5)")
    wrap.add_argument("command", nargs=argparse.REMAINDER, help="-- TOOL [ARGS...]")

    creds = sub.add_parser("credentials", help="this home's NATS users; --server-env writes a server's passwords")
    creds.add_argument("--server-env", metavar="FILE", help="write CORRAL_PASS_<USER>=... for a nats-server (0600)")
    creds.add_argument("--json", action="store_true")

    schema = sub.add_parser("schema", help="JSON Schema of every event type")
    schema.add_argument("--type", help="one event type only")
    schema.add_argument("--list", action="store_true", help="list the types and their subjects")
    if core_only:
        return parser
    for module in features():
        COMMANDS.update(module.add_parsers(sub))
    _group_commands(parser, sub)
    return parser


# `corral --help` lists the commands by topic (every command is in exactly one; a test checks it).
TOPICS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("run and control", ("run", "input", "pause", "resume", "cancel", "extend", "priority", "status", "ps", "logs")),
    ("changes", ("checkpoint", "checkpoints", "changes", "diff", "commit", "rollback", "pr", "worktrees")),
    ("approvals", ("approvals", "approve", "reject")),
    ("history", ("search", "compare", "replay", "fork", "export", "tap", "sql", "snapshot")),
    ("system", ("up", "down", "health", "templates", "credentials", "projections", "schema", "wrap")),
    ("api and notifications", ("token", "mcp", "notify")),
    ("orchestration", ("pipelines", "pipeline", "breakers", "tickets", "schedules", "fanout", "pick")),
)


def _group_commands(parser: argparse.ArgumentParser, sub: "argparse._SubParsersAction[Any]") -> None:
    helps = {action.dest: action.help or "" for action in sub._choices_actions}
    lines = []
    for topic, names in TOPICS:
        lines.append(f"{topic}:")
        lines += [f"  {name:<12} {helps.get(name, '')}" for name in names]
        lines.append("")
    lines.append("`corral COMMAND --help` for one command; docs/README.md for the documentation.")
    parser.epilog = "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub.help = "one of the commands below"
    sub._choices_actions.clear()  # listed by topic in the epilog instead of one long list


def features() -> tuple[Any, ...]:
    """The feature modules: each adds its own subcommands and returns {command name: handler}."""
    from corral import (
        approvals,
        changes,
        fanout,
        history,
        mcp_server,
        notify,
        pipelines,
        schedules,
        tickets,
        tokens,
        worktrees,
    )

    return (changes, worktrees, history, approvals, tokens, mcp_server, notify, pipelines, tickets, schedules, fanout)


COMMANDS: dict[str, Any] = {
    "run": commands.cmd_run,
    "up": commands.cmd_up,
    "down": commands.cmd_down,
    "ps": commands.cmd_ps,  # (with --tree: corral/history.py's cmd_ps_tree, set when the features load)
    "logs": commands.cmd_logs,
    "tap": commands.cmd_tap,
    "sql": commands.cmd_sql,
    "snapshot": commands.cmd_snapshot,
    "projections": commands.cmd_rebuild,
    "schema": commands.cmd_schema,
    "input": control.cmd_input,
    "pause": control.cmd_pause,
    "resume": control.cmd_resume,
    "cancel": control.cmd_cancel,
    "extend": control.cmd_extend,
    "priority": control.cmd_priority,
    "status": control.cmd_status,
    "health": control.cmd_health,
    "templates": config.cmd_templates,
    "wrap": wrap.cmd_wrap,
    "credentials": commands.cmd_credentials,
}


CORE_COMMANDS: Final = frozenset(COMMANDS)  # before the feature modules add theirs (build_parser)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # a command of this module (its first word) needs no feature module: the others are not loaded
    core = words[:1] != [] and words[0] in CORE_COMMANDS
    parser = build_parser(only_run=words[:1] == ["run"], core_only=core)
    args, extra = parser.parse_known_args(argv)
    if core and args.cmd == "ps" and args.tree:  # `corral ps --tree` is corral/history.py's
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    if extra:
        # `corral rollback EXEC --to 2 a.py b.py`: paths after an option still are paths.
        if isinstance(getattr(args, "path", None), list) and not any(e.startswith("-") for e in extra):
            args.path.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="corral: %(name)s: %(message)s")
    home = Home.from_env()
    handler = COMMANDS[args.cmd]
    try:
        result = handler(home, args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except CorralError as exc:
        sys.stderr.write(f"corral: error: {exc.message}\n")
        return exc.exit_code
    except (ProjectionError, EventError) as exc:
        sys.stderr.write(f"corral: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:
        return 0
