"""Errors raised by actors."""


class ActorError(Exception):
    """Base class for every actor error."""


class WorkspaceError(ActorError):
    """A git worktree could not be created or removed."""

    def __init__(self, repo: str, reason: str) -> None:
        super().__init__(f"{repo}: {reason}")
        self.repo = repo
        self.reason = reason


class SpawnError(ActorError):
    """The agent command could not be started."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"cannot start {command!r}: {reason}")
        self.command = command
        self.reason = reason
