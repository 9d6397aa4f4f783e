"""The `corral` command's entry point.

It imports nothing heavy itself, so a Ctrl-C at any moment, even while the CLI's modules are still
loading (over a second on a busy machine), ends the command with one line and exit 130 instead of
an import traceback.
"""

from __future__ import annotations

from corral.interrupt import interrupted


def main() -> int:
    try:
        from corral.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return interrupted()
