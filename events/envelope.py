"""The event envelope: what every event carries besides its typed payload."""

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from events.errors import MalformedEvent
from events.ids import new_ulid
from events.subjects import event_subject
from events.types import EventData, model_for

SCHEMA_VERSION = 1


class Event(BaseModel):
    """One immutable fact in the log; `seq` is its stream position once stored."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    execution_id: str
    ts: datetime
    actor: str
    causation_id: str | None = None
    correlation_id: str | None = None
    v: int = SCHEMA_VERSION
    data: EventData
    seq: int | None = None

    @property
    def subject(self) -> str:
        return event_subject(self.execution_id, self.type)

    def to_bytes(self) -> bytes:
        """Encode for the wire: orjson, without the stream position."""
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.type,
                "execution_id": self.execution_id,
                "ts": self.ts.isoformat().replace("+00:00", "Z"),
                "actor": self.actor,
                "causation_id": self.causation_id,
                "correlation_id": self.correlation_id,
                "v": self.v,
                "data": self.data.model_dump(mode="json"),
            }
        )


def new_event(
    execution_id: str,
    data: EventData,
    *,
    actor: str,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    ts: datetime | None = None,
    event_id: str | None = None,
) -> Event:
    """Build an envelope around a payload; the correlation id defaults to the execution id."""
    return Event(
        id=event_id or new_ulid(),
        type=data.TYPE,
        execution_id=execution_id,
        ts=ts or datetime.now(UTC),
        actor=actor,
        causation_id=causation_id,
        correlation_id=correlation_id or execution_id,
        data=data,
    )


def decode_event(payload: bytes, *, seq: int | None = None) -> Event:
    """Decode a wire payload into a typed Event, upcasting older schema versions."""
    try:
        raw: dict[str, Any] = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"not JSON ({exc})") from None
    if not isinstance(raw, dict) or "type" not in raw or "data" not in raw:
        raise MalformedEvent("missing type or data")
    raw = upcast(raw)
    model = model_for(raw["type"])
    try:
        data = model.model_validate(raw["data"])
        return Event(**{**raw, "data": data, "seq": seq})
    except ValueError as exc:
        raise MalformedEvent(str(exc).splitlines()[0]) from None


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    """Upgrade an older envelope version to the current one (version 1 is the first)."""
    return raw
