"""Errors the CLI reports as one line on stderr with a non-zero exit."""


class CorralError(Exception):
    """An error a user can act on; `exit_code` is what `corral` exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CorralError):
    """Bad input on the command line: nothing was changed."""

    exit_code = 2


class NotFound(CorralError):
    """An id or name that matches nothing."""

    exit_code = 2


class BusUnavailable(CorralError):
    """NATS cannot be reached or started."""

    exit_code = 3
