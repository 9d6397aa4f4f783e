"""A pipelined JetStream publisher: many publishes in flight, each acknowledged, retried on loss.

nats-py's one-at-a-time `js.publish` waits a round trip per event (about 7k events/s here).
This publisher sends each event with its own reply inbox and keeps up to `window` of them in
flight; the `Nats-Msg-Id` header (the event id) lets JetStream drop the copies a retry makes.
"""

import asyncio
import contextlib
import itertools
import time
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from events.envelope import Event
from events.errors import PublishError, WrongLastSequence
from events.subjects import HDR_EXPECTED_LAST_SUBJECT_SEQ, HDR_MSG_ID, HDR_STATUS, OUTPUT_TYPE

# 10071 "wrong last sequence: N"; a cluster answers 10164 "wrong last sequence" (no N) when the
# expected sequence is checked against a rival proposal still in flight.
_WRONG_LAST_SEQUENCE = (10071, 10164)
UNAVAILABLE_RETRY_S = 0.5
# Terminal events wait for their execution's output in flight (`_output_stored`).
_TERMINAL_SUFFIXES = (".execution.exited", ".execution.failed")


class PubAck:
    """Where JetStream stored an event."""

    __slots__ = ("duplicate", "seq", "stream")

    def __init__(self, stream: str, seq: int, duplicate: bool) -> None:
        self.stream = stream
        self.seq = seq
        self.duplicate = duplicate


class _InFlight:
    __slots__ = ("attempts", "future", "headers", "payload", "sent_at", "subject", "unavailable", "unavailable_since")

    def __init__(self, subject: str, payload: bytes, headers: dict[str, str], future: "asyncio.Future[PubAck]") -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.future = future
        self.attempts = 1
        self.sent_at = time.monotonic()
        self.unavailable = False  # refused with 503 (no stream leader) or not sent: resent soon
        self.unavailable_since = 0.0


class Publisher:
    """Publish events to JetStream with pipelined acknowledgements."""

    def __init__(
        self,
        nc: NATS,
        *,
        window: int = 8192,
        ack_timeout_s: float = 5.0,
        attempts: int = 5,
        unavailable_s: float = 60.0,
    ) -> None:
        self._nc = nc
        self._window = asyncio.Semaphore(window)
        self._ack_timeout_s = ack_timeout_s
        self._attempts = attempts
        self._unavailable_s = unavailable_s
        self._prefix = f"_INBOX.{NUID().next().decode()}."
        self._tokens = itertools.count()
        self._pending: dict[str, _InFlight] = {}
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.published = 0  # events acknowledged as newly stored (not duplicates): corral_events_published_total

    async def start(self) -> "Publisher":
        """Subscribe to the acknowledgement inbox; call once before publishing."""
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack, pending_msgs_limit=-1)
        self._sweeper = asyncio.create_task(self._retry_lost())
        return self

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """Stop listening for acknowledgements; outstanding publishes fail."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(PublishError(entry.subject, "publisher closed"))
        self._pending.clear()

    def refuse(self, subject: str, reason: str) -> None:
        """Fail at once the publishes to a subject the server refused (permissions; case-insensitive)."""
        for token, entry in list(self._pending.items()):
            if entry.subject.lower() == subject.lower():
                self._finish(token)
                if not entry.future.done():
                    entry.future.set_exception(PublishError(entry.subject, reason))

    def _finish(self, token: str) -> _InFlight | None:
        entry = self._pending.pop(token, None)
        if entry is not None:
            self._window.release()
        return entry

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        entry = self._pending.get(token)
        if entry is None:
            return
        try:
            ack = self._parse_ack(entry.subject, msg)
        except PublishError as exc:
            self._finish(token)
            if not entry.future.done():
                entry.future.set_exception(exc)
            return
        if ack is None:  # no stream answered (503): leave it to the sweeper to retry
            self._unavailable(entry)
            return
        self._finish(token)
        if not ack.duplicate:
            self.published += 1
        if not entry.future.done():
            entry.future.set_result(ack)

    def _unavailable(self, entry: _InFlight) -> None:
        """No stream took it (a cluster electing a leader, a server restarting): resend it shortly.

        Such resends do not use up the attempts meant for lost acknowledgements: an election
        answers 503 at once, and five quick refusals would fail a publish a second later.
        """
        now = time.monotonic()
        if not entry.unavailable_since:
            entry.unavailable_since = now
        entry.unavailable = True
        entry.sent_at = now - self._ack_timeout_s + UNAVAILABLE_RETRY_S

    def _give_up(self, token: str, entry: _InFlight, reason: str) -> None:
        self._finish(token)
        if not entry.future.done():
            entry.future.set_exception(PublishError(entry.subject, reason))

    async def _retry_lost(self) -> None:
        """Resend publishes whose acknowledgement did not come; the msg id makes resends safe."""
        while True:
            await asyncio.sleep(min(self._ack_timeout_s / 4, UNAVAILABLE_RETRY_S))
            now = time.monotonic()
            for token, entry in list(self._pending.items()):
                if now - entry.sent_at < self._ack_timeout_s:
                    continue
                if entry.unavailable:
                    if now - entry.unavailable_since > self._unavailable_s:
                        self._give_up(token, entry, f"JetStream took no event for {self._unavailable_s:g}s")
                        continue
                    entry.unavailable = False
                elif entry.attempts >= self._attempts:
                    self._give_up(token, entry, f"no acknowledgement after {entry.attempts} attempts")
                    continue
                else:
                    entry.attempts += 1
                entry.sent_at = now
                with contextlib.suppress(Exception):
                    await self._nc.publish(
                        entry.subject, entry.payload, reply=self._prefix + token, headers=entry.headers
                    )

    async def send(
        self, subject: str, payload: bytes, *, msg_id: str, expected_last_subject_seq: int | None = None
    ) -> "asyncio.Future[PubAck]":
        """Put one publish on the wire and return a future of its acknowledgement.

        Waits only for a free slot in the window, never for the acknowledgement itself,
        so a caller can keep reading its input while earlier events are being stored.
        A lost acknowledgement is retried with the same msg id, so JetStream stores it once.
        """
        if subject.endswith(_TERMINAL_SUFFIXES):
            await self._output_stored(subject)
        await self._window.acquire()
        headers = {HDR_MSG_ID: msg_id}
        if expected_last_subject_seq is not None:
            headers[HDR_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = _InFlight(subject, payload, headers, future)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except Exception:
            self._unavailable(self._pending[token])  # the sweeper resends it once the link is back
        return future

    async def _output_stored(self, subject: str) -> None:
        """Wait until this execution's output in flight is stored (or has failed).

        With log retention, output and the terminal event go to different streams, which store
        independently: a reader that stops at the exit must find every earlier chunk already
        stored (docs/retention.md). One stream stores in order anyway; this costs one round trip.
        """
        output = subject.split(".", 3)
        if len(output) < 4:
            return
        output[3] = OUTPUT_TYPE
        output_subject = ".".join(output)
        waiting = [e.future for e in self._pending.values() if e.subject == output_subject and not e.future.done()]
        if waiting:
            await asyncio.wait(waiting)

    @staticmethod
    def _parse_ack(subject: str, msg: Msg) -> PubAck | None:
        if msg.headers and msg.headers.get(HDR_STATUS) == "503":
            return None
        body: dict[str, Any] = orjson.loads(msg.data) if msg.data else {}
        error = body.get("error")
        if error:
            code = error.get("err_code")
            if code in _WRONG_LAST_SEQUENCE:
                raise WrongLastSequence(subject, error.get("description", ""), code=code)
            raise PublishError(subject, error.get("description", str(error)), code=code)
        return PubAck(body["stream"], body["seq"], bool(body.get("duplicate", False)))

    async def publish(self, event: Event, *, expected_last_subject_seq: int | None = None) -> PubAck:
        """Publish one event and wait until JetStream has stored it."""
        future = await self.send(
            event.subject,
            event.to_bytes(),
            msg_id=event.id,
            expected_last_subject_seq=expected_last_subject_seq,
        )
        return await future
