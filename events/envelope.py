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
        return envelope_bytes(
            self.id,
            self.type,
            self.execution_id,
            self.ts,
            self.actor,
            self.causation_id,
            self.correlation_id,
            self.data.model_dump(mode="json"),
            v=self.v,
        )


def envelope_bytes(
    event_id: str,
    event_type: str,
    execution_id: str,
    ts: datetime,
    actor: str,
    causation_id: str | None,
    correlation_id: str | None,
    data: dict[str, Any],
    *,
    v: int = SCHEMA_VERSION,
) -> bytes:
    """The wire form of an event whose payload `data` is already valid and in its JSON form.

    `Event.to_bytes` uses it too, so an envelope built here is byte for byte the one the model
    would write; the spawner uses it to publish what its shims spool without a model per event.
    """
    return orjson.dumps(
        {
            "id": event_id,
            "type": event_type,
            "execution_id": execution_id,
            "ts": ts.isoformat().replace("+00:00", "Z"),
            "actor": actor,
            "causation_id": causation_id,
            "correlation_id": correlation_id,
            "v": v,
            "data": data,
        }
    )


_STREAMS = ("stdout", "stderr")
_HEARTBEAT_KEYS = frozenset({"source", "note", "progress"})
_HEARTBEAT_SOURCES = ("agent", "wrapper", "adapter")


def trusted_payload(event_type: str, data: Any) -> dict[str, Any] | None:
    """The JSON form of an `output` or `heartbeat` payload of the plain shape, else None.

    These two types are nearly every event a running agent makes. When the payload has exactly
    the shape the models accept without conversion, its JSON form is built here, equal to
    `model.model_validate(data).model_dump(mode="json")` (tests/test_events.py checks it) at a
    fraction of the cost; anything else (None) must go through the model.
    """
    if type(data) is not dict:
        return None
    if event_type == "output":
        stream, n, text = data.get("stream"), data.get("n"), data.get("text")
        if len(data) == 3 and stream in _STREAMS and type(n) is int and type(text) is str:
            return {"stream": stream, "n": n, "text": text}
    elif event_type == "heartbeat" and data.keys() <= _HEARTBEAT_KEYS:
        source, note, progress = data.get("source", "agent"), data.get("note"), data.get("progress")
        if (
            source in _HEARTBEAT_SOURCES
            and (note is None or type(note) is str)
            and (progress is None or type(progress) is float)
        ):
            return {"source": source, "note": note, "progress": progress}
    return None


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
