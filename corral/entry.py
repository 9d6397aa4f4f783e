"""The `corral` command's entry point.

It imports nothing heavy itself, so a Ctrl-C at any moment, even while the CLI's modules are still
loading (over a second on a busy machine), ends the command with one line and exit 130 instead of
an import traceback.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    try:
        from corral.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return interrupted()


def interrupted() -> int:
    """Say it once, on a line of its own; a second Ctrl-C while saying it changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stderr.write("corral: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or a broken pipe: nothing left to tell
        pass
    return 130
