"""Opening the projections' DuckDB file."""

from pathlib import Path

import duckdb

from projections.errors import DatabaseLocked

# The projector writes row groups of this many rows instead of DuckDB's 122,880: a batch then
# fills whole row groups, which DuckDB writes straight into the file while inserting ("optimistic
# writes") instead of into the WAL at commit and again at the next checkpoint. Measured with
# 60,000-event batches: the commit went from ~40 % of an apply to ~3 %, an apply from ~150k to
# ~200k events/s (docs/performance.md). Readers open the file as usual; the size is not stored.
WRITE_ROW_GROUP_SIZE = 16384
CATALOG = "corral"


def open_database(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, translating the lock error into one a user can act on.

    A writer attaches the file with row groups of WRITE_ROW_GROUP_SIZE rows (see there) as the
    catalog CATALOG, the name `duckdb.connect` gives Corral's own corral.duckdb; a cursor of this
    connection starts in its in-memory catalog, so use `cursor()` below.
    """
    con: duckdb.DuckDBPyConnection | None = None
    try:
        if read_only:
            con = duckdb.connect(str(path), read_only=True)
        else:
            con = duckdb.connect()
            location = str(path).replace("'", "''")
            con.execute(f"ATTACH '{location}' AS {CATALOG} (ROW_GROUP_SIZE {WRITE_ROW_GROUP_SIZE})")
            con.execute(f"USE {CATALOG}")
        con.execute("SET TimeZone = 'UTC'")
        return con
    except duckdb.Error as exc:
        if con is not None:
            con.close()
        if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
            raise DatabaseLocked(str(path), str(exc).splitlines()[0]) from None
        raise


def cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of a connection from open_database, in the projections' catalog."""
    cur = con.cursor()
    if cur.execute("SELECT count(*) FROM duckdb_databases() WHERE database_name = ?", [CATALOG]).fetchone() == (1,):
        cur.execute(f"USE {CATALOG}")
    return cur
