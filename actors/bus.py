"""The bus an actor holds: a NATS connection, its JetStream context and a pipelined publisher."""

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import AuthorizationError
from nats.js import JetStreamContext, JetStreamManager
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.nuid import NUID
from nats.protocol.parser import PERMISSIONS_ERR

from events.auth import PROVISIONER, ROLES, Credentials, environment_credentials
from events.envelope import Event, new_event
from events.publisher import PubAck, Publisher
from events.stream import cluster_size, ensure_event_stream, replicas_for, when_ready
from events.subjects import STREAM
from events.types import EventData

Clock = Callable[[], datetime]

_nuid = NUID()


def named(config: ConsumerConfig | None, **params: Any) -> ConsumerConfig:
    """A consumer configuration with a name: its durable's, or a fresh random one for an ephemeral.

    nats-py then creates it on `$JS.API.CONSUMER.CREATE.<stream>.<name>[.<filter>]`, the only form
    NATS users may publish (events/auth.py): the name-less form takes the name from the payload and
    would let anyone rewrite anyone's durable. A random name also keeps an ephemeral's name unguessable.
    """
    config = (config or ConsumerConfig()).evolve(**params)
    if not config.name:
        config.name = config.durable_name or _nuid.next().decode()
    return config


class _NamedConsumers(JetStreamManager):
    async def add_consumer(
        self,
        stream: str,
        config: ConsumerConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (nats-py's signature)
        **params: Any,
    ) -> ConsumerInfo:
        return await super().add_consumer(stream, named(config, **params), timeout=timeout)


class CorralJetStream(JetStreamContext):
    """nats-py's JetStream context, creating every consumer (ordered ones and KV watchers too) by name."""

    @property
    def _jsm(self) -> JetStreamManager:
        return _NamedConsumers(conn=self._nc, prefix=self._prefix, timeout=self._timeout)

    async def add_consumer(
        self,
        stream: str,
        config: ConsumerConfig | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (nats-py's signature)
        **params: Any,
    ) -> ConsumerInfo:
        return await super().add_consumer(stream, named(config, **params), timeout=timeout)


def utc_now() -> datetime:
    return datetime.now(UTC)


REPLY_PREFIX = "_INBOX."  # nats-py's inboxes; what every role may subscribe to (events/auth.py READ_SUBSCRIBE)


def answerable(reply: str | None) -> bool:
    """Whether Corral's responders (`corral.api.*`) answer on this reply subject: an inbox only.

    nats-server checks no permission on a request's reply subject, and a responder may publish its
    answer there (allow_responses): `corral.evt.<id>.cancel.requested` as the reply would append the
    answer to the log, `$JS.API.…` would make it a JetStream request. No stream captures `_INBOX.>`
    (docs/security.md, "The bus")."""
    if not reply:
        return False
    return reply.startswith(REPLY_PREFIX) and not any(c in reply for c in "*> \t\r\n")


def refuse_reply(msg: Msg, responder: str) -> bool:
    """True (and a log line) when `msg` asks for its answer on a subject Corral does not answer."""
    if answerable(msg.reply):
        return False
    logging.getLogger("actors.bus").warning(
        "%s: request on %s not answered: its reply subject %r is not an inbox (%s…); docs/security.md",
        responder,
        msg.subject,
        msg.reply,
        REPLY_PREFIX,
    )
    return True


class PermissionRefused(Exception):
    """The server refused this connection a publish (permissions); the message is the server's."""


class Refusals:
    """Subjects the server refused this connection (permissions), for a request to fail at once
    instead of waiting for an answer that cannot come (subjects compared without case)."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}

    def watch(self, subject: str) -> "asyncio.Future[str]":
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(subject.lower(), []).append(future)
        return future

    def unwatch(self, subject: str, future: "asyncio.Future[str]") -> None:
        waiting = self._waiters.get(subject.lower(), [])
        if future in waiting:
            waiting.remove(future)
        if not waiting:
            self._waiters.pop(subject.lower(), None)

    def refused(self, subject: str, text: str) -> bool:
        """Tell the requests waiting on `subject`; True when one was (it reports the refusal itself)."""
        told = False
        for future in self._waiters.pop(subject.lower(), []):
            if not future.done():
                future.set_result(text)
                told = True
        return told


@dataclass
class Bus:
    """Everything an actor needs to read and append events."""

    nc: NATS
    js: JetStreamContext
    publisher: Publisher
    servers: list[str]
    clock: Clock = utc_now
    replicas: int = 1  # of the event log; KV buckets and other streams use as many
    credentials: Credentials | None = field(default=None, repr=False)  # None: a server without authorization
    refusals: Refusals = field(default_factory=Refusals)

    async def request(self, subject: str, payload: bytes, *, timeout_s: float) -> Msg:
        """A core request that fails at once (PermissionRefused) when the server refuses its publish."""
        refused = self.refusals.watch(subject)
        sent = asyncio.ensure_future(self.nc.request(subject, payload, timeout=timeout_s))
        try:
            waiting: set[asyncio.Future[Any]] = {sent, refused}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not sent.done():
                sent.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sent
                raise PermissionRefused(refused.result())
            return sent.result()
        finally:
            self.refusals.unwatch(subject, refused)

    @property
    def user(self) -> str | None:
        """The NATS user this bus authenticated as (None without authorization)."""
        return self.credentials.user if self.credentials else None

    def connect_options(self) -> dict[str, Any]:
        """What another connection of the same actor needs to authenticate like this one."""
        if self.credentials is None:
            return {}
        return {"user": self.credentials.user, "password": self.credentials.password}

    async def emit(
        self,
        execution_id: str,
        data: EventData,
        *,
        actor: str,
        causation_id: str | None = None,
        expected_last_subject_seq: int | None = None,
    ) -> PubAck:
        """Append one event and wait until it is stored."""
        event = new_event(execution_id, data, actor=actor, causation_id=causation_id, ts=self.clock())
        return await self.publisher.publish(event, expected_last_subject_seq=expected_last_subject_seq)

    async def send(
        self, execution_id: str, data: EventData, *, actor: str, causation_id: str | None = None
    ) -> "asyncio.Future[PubAck]":
        """Put one event on the wire now and return the future of its storing (`emit` without the
        wait: the caller goes on meanwhile, and awaits the future before it records anything after it)."""
        event = self.event(execution_id, data, actor=actor, causation_id=causation_id)
        return await self.publisher.send(event.subject, event.to_bytes(), msg_id=event.id)

    def event(self, execution_id: str, data: EventData, *, actor: str, causation_id: str | None = None) -> Event:
        return new_event(execution_id, data, actor=actor, causation_id=causation_id, ts=self.clock())

    async def close(self) -> None:
        await self.publisher.close()
        if not self.nc.is_closed:
            await self.nc.drain()


async def _probe(servers: list[str], timeout_s: float) -> None:
    """Fail fast with OSError when no server answers (nats-py would retry an initial connect forever)."""
    last: OSError = OSError("no NATS server given")
    for server in servers:
        parsed = urlparse(server if "://" in server else f"nats://{server}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            last = exc if isinstance(exc, OSError) else OSError(str(exc))
            continue
        writer.close()
        return
    raise last


async def connect_bus(
    url: str | list[str],
    *,
    name: str = "corral",
    connect_timeout_s: float = 2.0,
    replicas: int | None = None,
    credentials: Credentials | None = None,
    provision: bool | None = None,
) -> Bus:
    """Connect to NATS and return a ready Bus; with `provision`, make sure the event stream exists.

    `replicas` None: as many as the cluster has servers, at most 3 (1 on a single server).
    `credentials`: the NATS user of this connection's role (events/auth.py); None takes
    CORRAL_NATS_USER / CORRAL_NATS_PASSWORD when both are set, else connects without.
    `provision` False (every role but the provisioner, which alone may create and update streams):
    the stream is only read; `replicas` is then the stream's (or the wanted count if there is none yet).
    None: False for the users of Corral's roles but the provisioner, True for others (admin, a user
    of a server you configured yourself, no user at all).
    """
    credentials = credentials or environment_credentials()
    if provision is None:
        provision = credentials is None or credentials.user == PROVISIONER or credentials.user not in ROLES
    servers = url if isinstance(url, list) else [u for u in url.split(",") if u]
    await _probe(servers, connect_timeout_s)
    publisher: Publisher | None = None
    refused: set[str] = set()
    refusals = Refusals()
    connecting = True

    async def on_error(exc: Exception) -> None:
        # Disconnects are retried forever; the failures that matter surface as timeouts. A permission
        # violation is a bug or a misconfigured role: say so once, and fail the publish at once.
        text = str(exc)
        if connecting and "authorization violation" in text.lower():
            raise AuthorizationError  # wrong credentials: nats-py would retry the first connect forever
        if PERMISSIONS_ERR not in text:
            return
        subject = text.rsplit(" to ", 1)[-1].strip().strip('"')
        who = credentials.user if credentials else "anonymous"
        if refusals.refused(subject, f"NATS refused user {who}: {text.removeprefix('nats: ')}"):
            return  # a request waited for it and reports it as its own error
        if subject not in refused:
            refused.add(subject)
            sys.stderr.write(f"corral: {name}: NATS refused user {who}: {text.removeprefix('nats: ')}\n")
        if publisher is not None:
            publisher.refuse(subject, f"NATS user {who} may not publish to it (docs/security.md)")

    nc = await nats.connect(
        error_cb=on_error,
        servers=servers,
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        pending_size=64 * 1024 * 1024,
        **({"user": credentials.user, "password": credentials.password} if credentials else {}),
    )
    connecting = False
    js = CorralJetStream(nc, timeout=10.0)
    wanted = replicas if replicas is not None else replicas_for(cluster_size(nc._server_info, configured=len(servers)))
    if provision:
        stored = await ensure_event_stream(js, replicas=wanted)
    else:
        try:
            stored = (await when_ready(lambda: js.stream_info(STREAM))).config.num_replicas or 1
        except NotFoundError:  # not provisioned yet (corral/system.py says so when it matters)
            stored = wanted
    publisher = await Publisher(nc).start()
    return Bus(
        nc=nc, js=js, publisher=publisher, servers=servers, replicas=stored, credentials=credentials, refusals=refusals
    )


async def ensure_work_consumer(
    js: JetStreamContext, stream: str, name: str, filters: list[str], ack_wait_s: float
) -> None:
    """The durable pull consumer `name` shared by an actor's instances (the notifier, the conductor):
    every event of `filters` stored after its creation, each acked by one instance. Made if missing;
    when another instance (or this one, configured otherwise) wanted other subjects, the last started
    wins, keeping the consumer's position."""
    filters = sorted(filters)
    config = ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subjects=filters,
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=1000,
    )
    try:
        current = (await js.consumer_info(stream, name)).config
    except NotFoundError:
        await js.add_consumer(stream, config)
        return
    if sorted(current.filter_subjects or [current.filter_subject or ""]) != filters:
        await js.add_consumer(stream, config.evolve(deliver_policy=current.deliver_policy))
