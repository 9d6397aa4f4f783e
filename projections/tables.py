"""The DuckDB tables Corral projects, documented column by column in docs/tables.md."""

from typing import Final

from projections.derived import DERIVED_DDL, DERIVED_TABLES, EXECUTION_HISTORY_COLUMNS

SCHEMA_VERSION: Final = 5  # a file written with another version is rebuilt from the log

EVENT_COLUMNS: Final = {
    "seq": "UBIGINT",
    "id": "VARCHAR",
    "type": "VARCHAR",
    "execution_id": "VARCHAR",
    "ts": "TIMESTAMPTZ",
    "actor": "VARCHAR",
    "causation_id": "VARCHAR",
    "correlation_id": "VARCHAR",
    "v": "USMALLINT",
    "data": "JSON",
}

# Columns of the executions table that the projector derives with `projections.state.evolve`.
STATE_COLUMNS: Final = {
    "execution_id": "VARCHAR PRIMARY KEY",
    "state": "VARCHAR",
    "command": "VARCHAR[]",
    "repo": "VARCHAR",
    "base": "VARCHAR",
    "task": "VARCHAR",
    "agent": "VARCHAR",
    "template": "VARCHAR",
    "priority": "INTEGER",
    "requested_by": "VARCHAR",
    "replay_of": "VARCHAR",
    "fork_of": "VARCHAR",
    "requested_at": "TIMESTAMPTZ",
    "spawner": "VARCHAR",
    "host": "VARCHAR",
    "worktree": "VARCHAR",
    "branch": "VARCHAR",
    "base_commit": "VARCHAR",
    "pid": "INTEGER",
    "started_at": "TIMESTAMPTZ",
    "ended_at": "TIMESTAMPTZ",
    "exit_code": "INTEGER",
    "signal": "INTEGER",
    "duration_s": "DOUBLE",
    "exit_reason": "VARCHAR",
    "error": "VARCHAR",
    "last_heartbeat_at": "TIMESTAMPTZ",
    "timeout_s": "DOUBLE",
    "idle_timeout_s": "DOUBLE",
    "hard_deadline": "TIMESTAMPTZ",
    "paused_at": "TIMESTAMPTZ",
    "last_stalled_at": "TIMESTAMPTZ",
    "attempt": "INTEGER",
    "retry_of": "VARCHAR",
    "workspace_removed": "BOOLEAN",
    "updated_seq": "UBIGINT",
}

# Aggregates over the output table, maintained with set-based SQL per applied batch.
OUTPUT_AGGREGATE_COLUMNS: Final = {
    "output_chunks": "UBIGINT DEFAULT 0",
    "output_bytes": "UBIGINT DEFAULT 0",
    "last_output_at": "TIMESTAMPTZ",
}


def _columns(columns: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())


DDL: Final = [
    """CREATE TABLE IF NOT EXISTS projector_position (
        stream VARCHAR PRIMARY KEY, seq UBIGINT NOT NULL, schema_version INTEGER NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL)""",
    f"CREATE TABLE IF NOT EXISTS events ({_columns(EVENT_COLUMNS)})",
    """CREATE TABLE IF NOT EXISTS output (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, stream VARCHAR, n UINTEGER, text VARCHAR)""",
    f"CREATE TABLE IF NOT EXISTS executions ({_columns(STATE_COLUMNS)}, {_columns(OUTPUT_AGGREGATE_COLUMNS)}, "
    f"{_columns(EXECUTION_HISTORY_COLUMNS)})",
    """CREATE TABLE IF NOT EXISTS rejected_events (
        seq UBIGINT, subject VARCHAR, payload VARCHAR, error VARCHAR)""",
    # the event ids of the output stream's chunks (CORRAL_OUTPUT): a repeated id is a duplicate
    "CREATE TABLE IF NOT EXISTS output_ids (id VARCHAR, seq UBIGINT)",
    *DERIVED_DDL,
]

TABLES: Final = ("events", "output", "executions", "rejected_events", *DERIVED_TABLES)


def json_columns_spec(columns: dict[str, str]) -> str:
    """Return a read_json `columns={...}` literal for these columns."""
    inner = ", ".join(f"{name}: '{kind.split()[0]}'" for name, kind in columns.items())
    return "{" + inner + "}"
