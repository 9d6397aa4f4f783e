"""Run an analyst's SQL against the projections without letting it change them."""

from typing import Any

import duckdb

from projections.database import cursor as catalog_cursor
from projections.errors import QueryError

MAX_ROWS = 10000


def _utc_naive(column: str, kind: str) -> str:
    # Python's conversion of TIMESTAMPTZ needs pytz; UTC wall time carries the same instant.
    quoted = '"' + column.replace('"', '""') + '"'
    if kind == "TIMESTAMP WITH TIME ZONE":
        return f"{quoted}::TIMESTAMP AS {quoted}"
    return quoted


def run_query(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """Run one statement in a transaction that is always rolled back; return columns and rows."""
    cursor = catalog_cursor(con)
    try:
        cursor.execute("SET TimeZone = 'UTC'")
        cursor.begin()
        try:
            relation = cursor.sql(sql)
            if relation is None:
                return {"columns": [], "types": [], "rows": [], "truncated": False}
            columns = list(relation.columns)
            types = [str(t) for t in relation.types]
            relation = relation.project(", ".join(_utc_naive(c, t) for c, t in zip(columns, types, strict=True)))
            rows = relation.limit(max_rows + 1).fetchall()
        finally:
            cursor.rollback()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(first) from None
    finally:
        cursor.close()
    truncated = len(rows) > max_rows
    return {
        "columns": columns,
        "types": types,
        "rows": [list(r) for r in rows[:max_rows]],
        "truncated": truncated,
    }
