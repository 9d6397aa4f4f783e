"""Errors raised by the events package."""


class EventError(Exception):
    """Base class for every error of the events package."""


class UnknownEventType(EventError):
    """A payload names an event type that is not in the closed set."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"unknown event type {type_name!r}; `corral schema` lists the known types")
        self.type_name = type_name


class MalformedEvent(EventError):
    """A payload is not a valid event envelope."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed event: {reason}")
        self.reason = reason


class PublishError(EventError):
    """JetStream refused or never acknowledged a publish."""

    def __init__(self, subject: str, reason: str, *, code: int | None = None) -> None:
        super().__init__(f"publish to {subject} failed: {reason}")
        self.subject = subject
        self.reason = reason
        self.code = code


class WrongLastSequence(PublishError):
    """An optimistic append lost: the subject already moved past the expected sequence."""
