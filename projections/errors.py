"""Errors raised by the projections package."""


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
