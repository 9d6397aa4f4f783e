"""One line and exit 130 for a Ctrl-C (corral/entry.py while the CLI loads, corral/cli.py after)."""

import signal
import sys


def interrupted() -> int:
    """Say it once, on a line of its own; a second Ctrl-C while saying it changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stderr.write("corral: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or a broken pipe: nothing left to tell
        pass
    return 130
