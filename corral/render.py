"""Print results for people (aligned tables) and for programs (JSON)."""

import math
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from corral.rows import records as records  # moved to corral/rows.py (the operations use it)

MAX_CELL = 60


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        places = 3
        if 0 < abs(value) < 1 and math.isfinite(value):  # three significant digits: $0.0019 is not 0
            places = min(max(places, 2 - math.floor(math.log10(abs(value)))), 15)
        return f"{value:.{places}f}".rstrip("0").rstrip(".")
    text = " ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    text = text.replace("\n", "⏎")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
