"""corral.toml: defaults, spawner and watchdog settings, and named templates (stub, being written)."""

from typing import Any

from corral.home import Home


def cmd_templates(home: Home, args: Any) -> int:
    raise NotImplementedError
