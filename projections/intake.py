"""A NATS connection for bulk intake: delivered messages go straight to a sink, undecoded.

nats-py builds a Msg and parses the header block of every delivered message; for the
projector, which only needs the reply subject (stream sequence), the subject and the payload,
that is most of the cost per event (every event carries a Nats-Msg-Id header). This client
hands those three raw values to a sink for the subscriptions registered with it, and leaves
every other subscription to nats-py as usual.
"""

from collections.abc import Callable

from nats.aio.client import Client

RawSink = Callable[[bytes, bytes, bytes, bytes], None]
_STATUS_PREFIX = b"NATS/1.0 "


def status_of(headers: bytes) -> int | None:
    """Return the status code of a status message's header block (408, 404, 409, 100)."""
    if headers and headers.startswith(_STATUS_PREFIX):
        code = headers[len(_STATUS_PREFIX) : len(_STATUS_PREFIX) + 3]
        if code.isdigit():
            return int(code)
    return None


class IntakeClient(Client):
    """nats-py Client whose registered subscriptions deliver (subject, reply, data, headers) raw."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_sinks: dict[int, RawSink] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        sink = self.raw_sinks.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        sink(subject, reply, data, headers)

    async def subscribe_raw(self, subject: str, sink: RawSink) -> int:
        """Subscribe and route every message of the subscription to sink; return its sid."""

        async def unused(_msg: object) -> None:  # nats-py wants a callback; the sink takes all
            return None

        sub = await self.subscribe(subject, cb=unused)
        self.raw_sinks[sub._id] = sink
        return sub._id
