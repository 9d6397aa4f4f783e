"""Query answers as data: {columns, rows} to one dict per row (no printing; corral/render.py prints)."""

from collections.abc import Sequence
from typing import Any


def records(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]
