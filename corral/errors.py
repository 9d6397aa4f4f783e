"""Errors the CLI reports as one line on stderr with a non-zero exit, and the HTTP API as JSON.

`exit_code` is what `corral` exits with; `status` is the HTTP status the API answers with.
"""


class CorralError(Exception):
    """An error a user can act on."""

    exit_code = 1
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CorralError):
    """Bad input on the command line: nothing was changed."""

    exit_code = 2
    status = 400


class NotFound(CorralError):
    """An id or name that matches nothing."""

    exit_code = 2
    status = 404


class Conflict(CorralError):
    """The request does not fit the state: the execution is not running, the approval is decided."""

    status = 409


class Forbidden(CorralError):
    """This user (NATS role, API token) may not do that."""

    status = 403


class BusUnavailable(CorralError):
    """NATS cannot be reached or started."""

    exit_code = 3
    status = 503
