"""The event vocabulary: envelope round trip, closed type set, ids, output coalescing."""

import orjson
import pytest

from actors.output import OutputCoalescer
from events.envelope import decode_event, envelope_bytes, new_event, trusted_payload
from events.errors import MalformedEvent, UnknownEventType
from events.ids import new_execution_id, new_ulid
from events.schema import all_schemas
from events.subjects import event_subject, split_subject
from events.types import EVENT_TYPES, ExecutionRequested, Output


def test_envelope_round_trip() -> None:
    event = new_event("abc123", ExecutionRequested(command=("ls", "-l"), repo="/r"), actor="cli")
    decoded = decode_event(event.to_bytes(), seq=7)
    assert decoded.data == event.data
    assert decoded.seq == 7
    assert decoded.subject == "corral.evt.abc123.execution.requested"
    assert decoded.correlation_id == "abc123"


def test_unknown_and_malformed_payloads() -> None:
    with pytest.raises(UnknownEventType):
        decode_event(orjson.dumps({"type": "nope", "data": {}}))
    with pytest.raises(MalformedEvent):
        decode_event(b"not json")
    event = new_event("abc", Output(stream="stdout", n=1, text="x"), actor="a")
    raw = orjson.loads(event.to_bytes())
    raw["data"]["stream"] = "stdin"
    with pytest.raises(MalformedEvent):
        decode_event(orjson.dumps(raw))


def test_every_type_has_a_schema_and_a_dotless_id_subject() -> None:
    schemas = all_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) >= 40
    for name, schema in schemas.items():
        assert schema["properties"]["type"]["const"] == name
    assert split_subject(event_subject("k3x9", "file.touched")) == ("k3x9", "file.touched")


def test_ids() -> None:
    ids = {new_execution_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 8 and "." not in i for i in ids)
    first, second = new_ulid(1000), new_ulid(2000)
    assert len(first) == 26 and first < second


def test_coalescer_cuts_on_lines_and_extracts_control_lines() -> None:
    coalescer = OutputCoalescer(max_bytes=32, parse_control=True)
    chunks, controls = coalescer.feed(b"hello\n" + b'{"corral": "heart')
    assert chunks == [] and controls == []
    chunks, controls = coalescer.feed(b'beat"}\n' + b"x" * 40 + b"\nend")
    assert [c.kind for c in controls] == ["heartbeat"]
    assert chunks == ["hello\n" + "x" * 40 + "\n"]
    assert coalescer.flush() is None  # a partial line waits
    assert coalescer.finish() == ("end", [])


def test_coalescer_keeps_multibyte_characters_whole() -> None:
    coalescer = OutputCoalescer()
    text = "héllo wörld ✓\n".encode()
    for byte in text:
        coalescer.feed(bytes([byte]))
    assert coalescer.flush() == "héllo wörld ✓\n"


TRUSTED_CASES = [
    ("output", {"stream": "stdout", "n": 1, "text": "step 1\n"}),
    ("output", {"stream": "stderr", "n": 7, "text": 'naïve ✓ \u0000 "quoted"\n'}),
    ("heartbeat", {"source": "agent"}),
    ("heartbeat", {"source": "wrapper", "note": "running the tests", "progress": 0.25}),
    ("heartbeat", {"source": "adapter", "note": "turn 3 of 10", "progress": None}),
    ("heartbeat", {}),
]
UNTRUSTED_CASES = [
    ("output", {"stream": "stdin", "n": 1, "text": "x"}),  # the model refuses it
    ("output", {"stream": "stdout", "n": True, "text": "x"}),  # a bool is not an int here
    ("output", {"stream": "stdout", "n": 1, "text": "x", "extra": 1}),
    ("output", {"stream": "stdout", "n": "1", "text": "x"}),  # the model would convert it
    ("heartbeat", {"source": "agent", "progress": 1}),  # an int the model turns into 1.0
    ("heartbeat", {"source": "robot"}),
    ("heartbeat", {"note": 5}),
    ("heartbeat", {"source": "agent", "mood": "fine"}),
    ("heartbeat", ["not", "a", "dict"]),
    ("usage", {"input_tokens": 1}),  # only output and heartbeat have a fast path
]


@pytest.mark.parametrize(("kind", "data"), TRUSTED_CASES)
def test_trusted_payload_equals_the_models_json_and_envelope(kind: str, data: dict[str, object]) -> None:
    model = EVENT_TYPES[kind]
    fast = trusted_payload(kind, data)
    assert fast == model.model_validate(data).model_dump(mode="json")
    event = new_event(new_execution_id(), model.model_validate(data), actor="spawner-x", causation_id=new_ulid())
    built = envelope_bytes(
        event.id,
        event.type,
        event.execution_id,
        event.ts,
        event.actor,
        event.causation_id,
        event.correlation_id,
        fast or {},
    )
    assert built == event.to_bytes(), "the spawner's direct encoding must be the model's, byte for byte"
    assert decode_event(built) == event


@pytest.mark.parametrize(("kind", "data"), UNTRUSTED_CASES)
def test_anything_but_the_plain_shape_goes_through_the_model(kind: str, data: object) -> None:
    assert trusted_payload(kind, data) is None
