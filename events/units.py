"""Units of corral.toml and the command line that the actors read too: durations ("30s", "1h30m").

Below the CLI (corral/config.py imports it): a policy's approval_timeout is parsed by the actors.
"""

import math
import re
from typing import Any

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)"
_DURATION_RE = re.compile(f"(?:{_DURATION_PART})+", re.IGNORECASE)


def show_value(value: Any) -> str:
    """A value as the user wrote it in TOML (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return repr(value)


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "30s", "10m", "2h", "1h30m", "500ms", "1d"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration of at least 0 (got {value})")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            return float(text)
        if _DURATION_RE.fullmatch(text):
            return sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in re.findall(_DURATION_PART, text, re.I))
    raise ValueError(f"expected a duration like 30s, 10m, 2h (got {show_value(value)})")
