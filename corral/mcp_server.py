"""(being written this session; see issue 16)"""

import argparse
from typing import Any


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    return {}
