"""Circuit breakers as the log tells them, for the spawner's queue (docs/orchestration.md#circuit-breakers).

The conductor counts failures and opens and closes breakers (`breaker.opened`, `breaker.closed` on
the breaker's own id). A `template:<name>` breaker also holds plain runs of that template
(`corral run -t NAME`, a schedule's template executions): while it is open the spawner leaves their
requests unclaimed, queued and not lost, and records `execution.held` once for each. When a human
approves the escalation (`breaker.closed`, release) they are claimed as usual; when he rejects it,
the requests made while it was open are stopped (claimed and ended as cancelled). Pipeline stages
are held by the conductor before they are requested, so requests carrying a `pipeline_run` label
are left to it.
"""

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from events.approvals import encode
from events.envelope import Event, decode_event
from events.errors import EventError, WrongLastSequence
from events.subjects import STREAM, event_subject, events_of_type
from events.types import BreakerClosed, BreakerCounted, BreakerOpened, ExecutionHeld, ExecutionRequested

log = logging.getLogger(__name__)

_ID_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
TEMPLATE_PREFIX: Final = "template:"
RUN_LABEL: Final = "pipeline_run"  # a stage's request (actors/conductor.py): held by the conductor


def breaker_id(key: str) -> str:
    """The id a breaker's events are on: 8 characters of the key's hash (an execution id's alphabet)."""
    return encode(hashlib.sha256(f"breaker|{key}".encode()).digest(), _ID_ALPHABET, 8)


class Queued(Protocol):
    """A request in a spawner's queue (actors/spawner.py Pending)."""

    execution_id: str
    seq: int
    request: Event


Q = TypeVar("Q", bound=Queued)


@dataclass
class _Seen:
    opened_seq: int = 0
    closed_seq: int = 0
    closed: BreakerClosed | None = None
    failures: int = 0  # in a row, as the last `breaker.counted` said (when followed)
    counted_seq: int = 0

    @property
    def open(self) -> bool:
        return self.opened_seq > self.closed_seq


class BreakerWatch:
    """Breakers (those whose key starts with `prefix`; "" for all) as their events tell them, followed
    from the log: read once, then kept current by ordered consumers on the breaker event types.

    What it says may be a moment behind the log (a breaker opened just now): callers that act on "open"
    read the breaker again; "closed and no failures" lets them skip the reads."""

    KINDS: Final = ("breaker.opened", "breaker.closed")

    def __init__(self, prefix: str = "", *, counts: bool = False) -> None:
        self.prefix = prefix
        self.kinds = (*self.KINDS, "breaker.counted") if counts else self.KINDS
        self._seen: dict[str, _Seen] = {}  # breaker key -> its last opening, closing (and count)
        self.following = False

    async def follow(self, js: JetStreamContext, on_change: Callable[[], None] | None = None) -> list[Any]:
        """Read every breaker's last events, then follow new ones; return the subscriptions."""

        async def seen(msg: Msg) -> None:
            with contextlib.suppress(EventError):
                self._apply(decode_event(msg.data), msg.metadata.sequence.stream)
                if on_change is not None:
                    on_change()

        subs = [
            await js.subscribe(events_of_type(kind), cb=seen, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
            for kind in self.kinds
        ]
        first = "breaker.counted" if "breaker.counted" in self.kinds else "breaker.opened"
        info = await js.stream_info(STREAM, subjects_filter=events_of_type(first))
        for subject in info.state.subjects or {}:
            bid = subject.split(".")[2]
            for kind in self.kinds:
                with contextlib.suppress(NotFoundError, EventError):
                    stored = await js.get_last_msg(STREAM, event_subject(bid, kind))
                    self._apply(decode_event(stored.data or b""), stored.seq or 0)
        self.following = True
        return subs

    def _apply(self, event: Event, seq: int) -> None:
        data = event.data
        if not isinstance(data, BreakerOpened | BreakerClosed | BreakerCounted) or not data.key.startswith(self.prefix):
            return
        seen = self._seen.setdefault(data.key, _Seen())
        if isinstance(data, BreakerOpened):
            seen.opened_seq = max(seen.opened_seq, seq)
        elif isinstance(data, BreakerClosed):
            if seq > seen.closed_seq:
                seen.closed_seq, seen.closed = seq, data
        elif seq > seen.counted_seq:
            seen.counted_seq, seen.failures = seq, data.failures

    def quiet(self, key: str) -> bool:
        """Known closed with no failures counted (nothing to read or reset); False when not followed."""
        if not self.following:
            return False
        seen = self._seen.get(key)
        return seen is None or (not seen.open and seen.failures == 0)

    def closed(self, key: str) -> bool:
        """Known closed (it may have opened a moment ago: a caller holding runs reads it again)."""
        if not self.following:
            return False
        seen = self._seen.get(key)
        return seen is None or not seen.open


class TemplateBreakers(BreakerWatch):
    """Which `template:<name>` breakers are open, followed from the log."""

    def __init__(self) -> None:
        super().__init__(TEMPLATE_PREFIX)
        self._recorded: set[str] = set()  # executions whose execution.held this instance recorded

    def _key(self, queued: Queued) -> str | None:
        request = queued.request.data
        if not isinstance(request, ExecutionRequested) or not request.template or RUN_LABEL in request.labels:
            return None
        return f"{TEMPLATE_PREFIX}{request.template}"

    def holds(self, queued: Queued) -> bool:
        """Whether an open breaker holds this queued request (it is not to be claimed now)."""
        if not self._seen:
            return False
        key = self._key(queued)
        seen = self._seen.get(key) if key else None
        return seen is not None and seen.open

    async def sift(self, bus: Bus, actor: str, queue: Iterable[Q]) -> list[tuple[Q, str]]:
        """Record `execution.held` once for each queued request an open breaker holds (expected last
        subject sequence 0: once across spawners); return those a rejected escalation stops, with why."""
        if not self._seen:
            return []
        stopped: list[tuple[Q, str]] = []
        for queued in list(queue):
            key = self._key(queued)
            seen = self._seen.get(key) if key else None
            if key is None or seen is None:
                continue
            if seen.open:
                if queued.execution_id not in self._recorded:
                    self._recorded.add(queued.execution_id)
                    with contextlib.suppress(WrongLastSequence):
                        await bus.emit(
                            queued.execution_id,
                            ExecutionHeld(breaker=key, breaker_id=breaker_id(key)),
                            actor=actor,
                            causation_id=queued.request.id,
                            expected_last_subject_seq=0,
                        )
            elif seen.closed is not None and not seen.closed.release and seen.opened_seq < queued.seq < seen.closed_seq:
                who = f" by {seen.closed.decided_by}" if seen.closed.decided_by else ""
                stopped.append((queued, f"stopped at circuit breaker {key} (rejected{who})"))
        return stopped
