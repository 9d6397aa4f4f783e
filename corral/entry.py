"""The `corral` command's entry point.

It imports nothing heavy itself, so a Ctrl-C at any moment, even while the CLI's modules are still
loading (over a second on a busy machine), ends the command with one line and exit 130 instead of
an import traceback.
"""

from __future__ import annotations

from corral.interrupt import interrupted


def main() -> int:
    try:
        _start_early()
        from corral.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return interrupted()


def _start_early() -> None:
    """`corral run` with no system running starts one for itself: its projector's DuckDB worker
    (a process that takes ~0.3 s to load) is started now, before this process loads its own
    modules, and taken by the projector when it starts (projections/spawn.py). Not for a run that
    only submits (--detach), nor when a system runs on this home (this command is its client)."""
    import sys

    args = sys.argv[1:]
    if not args or args[0] != "run" or any(a in ("--detach", "-d", "-h", "--help") for a in args[1:]):
        return
    from corral.home import Home
    from projections.spawn import start_early

    home = Home.from_env()
    if home.runtime_file.exists():
        return  # a system runs here (or a crashed one left its file: `corral run` sorts that out)
    start_early(home.database)
