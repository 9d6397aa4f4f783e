"""Corral's event vocabulary: the envelope, the closed set of event types, subjects, codec and publisher."""

from events.envelope import Event, new_event
from events.ids import new_execution_id, new_ulid
from events.types import EVENT_TYPES, EventData

__all__ = ["EVENT_TYPES", "Event", "EventData", "new_event", "new_execution_id", "new_ulid"]
