"""Provision the append-only event stream and the durable consumers the actors share."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from events.subjects import ALL_EVENTS, STREAM

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 300.0
MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_REPLICAS = 3
JETSTREAM_READY_S = 30.0
# JetStream answers these while a cluster elects its leaders; the call is worth repeating.
_NOT_READY_CODES = (10008,)  # "JetStream system temporarily unavailable"
# And these when the placement asked for more servers than can hold a replica right now.
_PLACEMENT_CODES = (10005, 10023, 10074)  # no suitable peers, insufficient resources, not clustered

T = TypeVar("T")


def cluster_size(server_info: dict[str, Any], *, configured: int = 1) -> int:
    """How many servers form the cluster of the server this connection landed on (1 if none).

    A clustered server names its cluster in INFO and lists the client URLs of every member it
    is routed to, itself included (`connect_urls`); a standalone server sends neither. A cluster
    that does not advertise its members (`no_advertise`) is counted by the URLs Corral was given.
    """
    if not server_info.get("cluster"):
        return 1
    members = len(set(server_info.get("connect_urls") or ()))
    return max(members or configured, 1)


def replicas_for(size: int) -> int:
    """Replicas of the event log and the KV bucket on a cluster of `size` servers: at most 3."""
    return max(1, min(MAX_REPLICAS, size))


async def when_ready(call: Callable[[], Awaitable[T]], *, timeout_s: float = JETSTREAM_READY_S) -> T:
    """Run a JetStream API call, repeating it while the cluster is still electing its leaders."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except (ServiceUnavailableError, NoRespondersError, NatsTimeoutError, TimeoutError):
            if time.monotonic() > deadline:
                raise
        except APIError as exc:
            if exc.err_code not in _NOT_READY_CODES or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def event_stream_config(*, replicas: int = 1) -> StreamConfig:
    """Return the configuration of the event log: file storage, no deletes, no purges."""
    return StreamConfig(
        name=STREAM,
        description="Corral event log (append-only)",
        subjects=[ALL_EVENTS],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=MAX_EVENT_BYTES,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


async def ensure_event_stream(js: JetStreamContext, *, replicas: int = 1) -> int:
    """Create the event stream, or bring an existing one to the current configuration.

    Returns the stream's replicas. On a cluster with a member down, the creation falls back to
    as many replicas as can be placed (and says so); an existing stream is scaled up when the
    cluster has grown (best effort: only an operator may update it), never down.
    """
    try:
        info = await when_ready(lambda: js.stream_info(STREAM))
    except NotFoundError:
        return await _add_event_stream(js, replicas)
    current = info.config
    have = current.num_replicas or 1
    if (
        current.deny_delete is not True
        or current.deny_purge is not True
        or current.duplicate_window != DUPLICATE_WINDOW_S
    ):
        await when_ready(lambda: js.update_stream(event_stream_config(replicas=have)))
    if have < replicas:
        try:
            await js.update_stream(event_stream_config(replicas=replicas))
            return replicas
        except Exception as exc:  # no room for more replicas yet, or a role that may not update streams
            log.warning("stream %s keeps %s replica(s), not %s: %s", STREAM, have, replicas, exc)
    return have


async def _add_event_stream(js: JetStreamContext, replicas: int) -> int:
    for count in range(replicas, 0, -1):
        config = event_stream_config(replicas=count)

        async def add(config: StreamConfig = config) -> None:
            await js.add_stream(config)

        try:
            await when_ready(add)
        except APIError as exc:
            if exc.err_code not in _PLACEMENT_CODES or count == 1:
                raise
            continue
        if count < replicas:
            log.warning("stream %s created with %s replica(s): too few servers online for %s", STREAM, count, replicas)
        return count
    return 1


async def ensure_work_consumer(
    js: JetStreamContext,
    durable: str,
    filter_subject: str,
    *,
    ack_wait_s: float = 30.0,
    max_ack_pending: int = 1000,
) -> None:
    """Create the durable pull consumer several actor instances share (each message claimed once)."""
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
    )
    try:
        await js.consumer_info(STREAM, durable)
    except NotFoundError:
        await js.add_consumer(STREAM, config)
