"""JSON Schema of every event type, for tool authors."""

from typing import Any, Literal

from pydantic import create_model

from events.envelope import Event
from events.types import EVENT_TYPES


def event_schema(type_name: str) -> dict[str, Any]:
    """Return the JSON Schema of one event type's envelope with its typed data."""
    payload = EVENT_TYPES[type_name]
    model = create_model(
        "Event_" + type_name.replace(".", "_"),
        __base__=Event,
        type=(Literal[type_name], type_name),  # type: ignore[arg-type]
        data=(payload, ...),
    )
    schema = model.model_json_schema(mode="serialization")
    schema.pop("title", None)
    schema["title"] = type_name
    schema["description"] = (payload.__doc__ or "").strip() or type_name
    schema["properties"].pop("seq", None)
    return schema


def all_schemas() -> dict[str, Any]:
    """Return {type name: JSON Schema} for the whole closed set."""
    return {name: event_schema(name) for name in sorted(EVENT_TYPES)}
