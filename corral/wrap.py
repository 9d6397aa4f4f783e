"""`corral wrap -- TOOL ARGS`: run a third-party tool and heartbeat on its behalf (stub, being written)."""

from typing import Any

from corral.home import Home


def cmd_wrap(home: Home, args: Any) -> int:
    raise NotImplementedError
