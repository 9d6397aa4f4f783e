"""Errors raised by the projections package, and the size limit of a query's answer."""

MAX_BYTES = 7 * 1024 * 1024  # a query's answer: below NATS's max_payload of the shipped nats.conf (8MB)


class ProjectionError(Exception):
    """Base class for every projection error."""


class DatabaseLocked(ProjectionError):
    """Another process holds the DuckDB file."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"{path} is held by another process ({detail}); close that session "
            "(an open DuckDB CLI, notebook or second `corral up`) or use `corral sql`"
        )
        self.path = path
        self.detail = detail


class QueryError(ProjectionError):
    """A query failed; the message is DuckDB's own first line."""

    kind = "sql"  # how the NATS answer names it, for the CLI's exit code (corral/commands.py)


class QueryRefused(QueryError):
    """A statement `corral sql` does not run (not exactly one query): nothing ran."""

    kind = "refused"


class QueryTimeout(QueryError):
    """A query stopped after its time ([sql] timeout)."""

    kind = "timeout"
