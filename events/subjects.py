"""Subject names, stream and consumer names and header keys: the one place they are spelled."""

from typing import Final

STREAM: Final = "CORRAL"
EVENT_PREFIX: Final = "corral.evt"
ALL_EVENTS: Final = "corral.evt.>"

# Log retention (docs/retention.md): with [retention] set, output events are stored in their own
# bounded stream; the core stream CORRAL then lists every other type's subject explicitly.
OUTPUT_STREAM: Final = "CORRAL_OUTPUT"
OUTPUT_TYPE: Final = "output"
OUTPUT_EVENTS: Final = "corral.evt.*.output"
# CORRAL_OUTPUT's subject once retention is switched off again: it keeps (and still bounds) what it
# holds, readable as before, and receives nothing new. No Corral role may publish to it.
RETIRED_OUTPUT: Final = "corral.retired.output"

SPAWNER_CONSUMER: Final = "spawner"
PROJECTOR_CONSUMER: Final = "projector"

# Request/reply services offered by a running `corral up` (core NATS, not part of the log).
API_SQL: Final = "corral.api.sql"
API_REBUILD: Final = "corral.api.projections.rebuild"
API_POSITION: Final = "corral.api.projections.position"
API_SNAPSHOT: Final = "corral.api.projections.snapshot"  # operators only: `corral snapshot` (a DuckDB copy)
API_EXPORT: Final = "corral.api.projections.export"  # operators only: `corral export` (Parquet files)

HEALTH_BUCKET: Final = "corral_health"

HDR_MSG_ID: Final = "Nats-Msg-Id"
HDR_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
HDR_STATUS: Final = "Status"


def event_subject(execution_id: str, event_type: str) -> str:
    """Return the subject an event of this type for this execution is published on."""
    return f"{EVENT_PREFIX}.{execution_id}.{event_type}"


def execution_events(execution_id: str) -> str:
    """Return the filter matching every event of one execution."""
    return f"{EVENT_PREFIX}.{execution_id}.>"


def events_of_type(event_type: str) -> str:
    """Return the filter matching one event type across all executions."""
    return f"{EVENT_PREFIX}.*.{event_type}"


def ack_sequence(reply: str | bytes) -> int:
    """Return the stream sequence from a JetStream delivery's reply subject.

    $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (9 tokens), or the v2
    form with domain and account hash in front and a random token at the end (12 tokens).
    """
    tokens = reply.split(b"." if isinstance(reply, bytes) else ".")  # type: ignore[arg-type]
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def ack_stream(reply: str) -> str:
    """Return the name of the stream a JetStream delivery came from (see ack_sequence)."""
    tokens = reply.split(".")
    return tokens[2] if len(tokens) == 9 else tokens[4]


def ack_time_ns(reply: str) -> int:
    """Return the time the delivered message was stored, in ns since the epoch (see ack_sequence)."""
    tokens = reply.split(".")
    return int(tokens[7] if len(tokens) == 9 else tokens[9])


def ack_pending(reply: str) -> int:
    """Return how many matching messages followed this delivery when it was sent."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def split_subject(subject: str) -> tuple[str, str]:
    """Return (execution_id, event_type) of an event subject."""
    parts = subject.split(".", 3)
    return parts[2], parts[3]


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both filters (`*` one token, `>` the rest)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(left) == len(right)
