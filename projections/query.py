"""Run an analyst's SQL against the projections without letting it change them."""

from typing import Any

import duckdb

from projections.errors import QueryError

MAX_ROWS = 10000


def run_query(con: duckdb.DuckDBPyConnection, sql: str, *, max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """Run one statement in a transaction that is always rolled back; return columns and rows."""
    cursor = con.cursor()
    try:
        cursor.begin()
        try:
            cursor.execute(sql)
            if cursor.description is None:
                return {"columns": [], "types": [], "rows": [], "truncated": False}
            columns = [d[0] for d in cursor.description]
            types = [str(d[1]) for d in cursor.description]
            rows = cursor.fetchmany(max_rows + 1)
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
