"""Provision the append-only event stream, the bounded output stream and the durable consumers the actors share."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from events.subjects import (
    ALL_EVENTS,
    HEALTH_BUCKET,
    OUTPUT_EVENTS,
    OUTPUT_STREAM,
    OUTPUT_TYPE,
    RETIRED_OUTPUT,
    STREAM,
    events_of_type,
)
from events.types import EVENT_TYPES

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


def event_stream_config(*, replicas: int = 1, subjects: list[str] | None = None) -> StreamConfig:
    """Return the configuration of the event log: file storage, no deletes, no purges.

    `subjects` None: every event subject; with log retention on, `core_subjects()`.
    """
    return StreamConfig(
        name=STREAM,
        description="Corral event log (append-only)",
        subjects=list(subjects or [ALL_EVENTS]),
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
    cluster has grown (best effort), never down. Only the provisioner may create or update a
    stream (events/auth.py): other roles read it (actors/bus.py, `provision=False`).
    """
    try:
        info = await when_ready(lambda: js.stream_info(STREAM))
    except NotFoundError:
        return await _add_event_stream(js, replicas)
    current = info.config
    have = current.num_replicas or 1
    subjects = list(current.subjects or [ALL_EVENTS])  # log retention's explicit list stays (ensure_output_retention)
    if (
        current.deny_delete is not True
        or current.deny_purge is not True
        or current.duplicate_window != DUPLICATE_WINDOW_S
    ):
        await when_ready(lambda: js.update_stream(event_stream_config(replicas=have, subjects=subjects)))
    if have < replicas:
        try:
            await js.update_stream(event_stream_config(replicas=replicas, subjects=subjects))
            return replicas
        except Exception as exc:  # no room for more replicas yet
            log.warning("stream %s keeps %s replica(s), not %s: %s", STREAM, have, replicas, exc)
    return have


async def _add_event_stream(js: JetStreamContext, replicas: int) -> int:
    return await _add_stream(js, lambda count: event_stream_config(replicas=count), replicas)


async def _add_stream(js: JetStreamContext, make: Callable[[int], StreamConfig], replicas: int) -> int:
    """Create a stream with `replicas`, or as many as the cluster can place right now."""
    for count in range(replicas, 0, -1):
        config = make(count)

        async def add(config: StreamConfig = config) -> None:
            await js.add_stream(config)

        try:
            await when_ready(add)
        except APIError as exc:
            if exc.err_code not in _PLACEMENT_CODES or count == 1:
                raise
            continue
        if count < replicas:
            log.warning(
                "stream %s created with %s replica(s): too few servers online for %s", config.name, count, replicas
            )
        return count
    return 1


# --- log retention (docs/retention.md) -----------------------------------------------------------

OUTPUT_MIN_BYTES = 1024 * 1024  # well above one coalesced output chunk (16 KiB of text)
OUTPUT_MIN_AGE_S = 1.0


@dataclass(frozen=True)
class OutputRetention:
    """Limits of the output stream; None is no limit. Retention is on when any limit is set."""

    max_age_s: float | None = None
    max_bytes: int | None = None
    max_msgs: int | None = None

    @property
    def enabled(self) -> bool:
        return any(limit is not None for limit in (self.max_age_s, self.max_bytes, self.max_msgs))


def core_subjects() -> list[str]:
    """The core stream's subjects with retention on: one per event type of the closed set, output aside."""
    return sorted(events_of_type(kind) for kind in EVENT_TYPES if kind != OUTPUT_TYPE)


def output_stream_config(
    retention: OutputRetention, *, replicas: int = 1, subjects: list[str] | None = None
) -> StreamConfig:
    """The bounded stream of output events: limits, discard old, no deletes or purges through the API.

    The duplicate window cannot be longer than the age limit (nats-server refuses it).
    """
    window = DUPLICATE_WINDOW_S
    if retention.max_age_s is not None:
        window = min(window, retention.max_age_s)
    return StreamConfig(
        name=OUTPUT_STREAM,
        description="Corral output events, bounded by [retention] (docs/retention.md)",
        subjects=list(subjects or [OUTPUT_EVENTS]),
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=window,
        max_msg_size=MAX_EVENT_BYTES,
        max_age=retention.max_age_s or 0.0,
        max_bytes=retention.max_bytes if retention.max_bytes is not None else -1,
        max_msgs=retention.max_msgs if retention.max_msgs is not None else -1,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


def _limits(config: StreamConfig) -> tuple[Any, ...]:
    return (
        sorted(config.subjects or []),
        config.max_age or 0.0,
        config.max_bytes if config.max_bytes is not None else -1,
        config.max_msgs if config.max_msgs is not None else -1,
        config.duplicate_window,
        config.deny_delete is True,
        config.deny_purge is True,
        config.discard,
    )


async def _stream_config(js: JetStreamContext, name: str) -> StreamConfig | None:
    try:
        info = await when_ready(lambda: js.stream_info(name))
    except NotFoundError:
        return None
    return info.config


async def ensure_output_retention(js: JetStreamContext, retention: OutputRetention, *, replicas: int = 1) -> bool:
    """Bring the streams to `retention`; return whether the output stream receives output now.

    On: CORRAL lists every event type's subject but output's (events of other types are routed as
    before: publishers do not change), then CORRAL_OUTPUT takes `corral.evt.*.output` with the
    limits. Off: CORRAL_OUTPUT gives its subject up (it keeps what it holds, under its limits,
    readable as before), then CORRAL takes `corral.evt.>` again. Streams never overlap, so each
    step happens in that order. Messages already in CORRAL stay there: it is append-only.
    """
    core = await _stream_config(js, STREAM)
    if core is None:
        await _add_event_stream(js, replicas)
        core = await _stream_config(js, STREAM)
        assert core is not None
    core_replicas = core.num_replicas or 1
    output = await _stream_config(js, OUTPUT_STREAM)
    if retention.enabled:
        wanted = core_subjects()
        if sorted(core.subjects or []) != wanted:
            await when_ready(lambda: js.update_stream(event_stream_config(replicas=core_replicas, subjects=wanted)))
            log.info("stream %s: output events now go to %s", STREAM, OUTPUT_STREAM)
        if output is None:
            await _add_stream(js, lambda count: output_stream_config(retention, replicas=count), core_replicas)
            return True
        have = output.num_replicas or 1
        config = output_stream_config(retention, replicas=have)
        if _limits(output) != _limits(config):
            await when_ready(lambda: js.update_stream(config))
        if have < core_replicas:
            try:
                await js.update_stream(output_stream_config(retention, replicas=core_replicas))
            except Exception as exc:  # no room for more replicas yet
                log.warning("stream %s keeps %s replica(s), not %s: %s", OUTPUT_STREAM, have, core_replicas, exc)
        return True
    if output is not None and sorted(output.subjects or []) != [RETIRED_OUTPUT]:
        output.subjects = [RETIRED_OUTPUT]
        retired = output
        await when_ready(lambda: js.update_stream(retired))
        log.info("stream %s: receives no output any more (log retention is off)", OUTPUT_STREAM)
    if sorted(core.subjects or []) != [ALL_EVENTS]:
        await when_ready(lambda: js.update_stream(event_stream_config(replicas=core_replicas)))
    return False


async def output_stream_exists(js: JetStreamContext) -> bool:
    """Whether the output stream exists (receiving output now, or retired but still readable)."""
    try:
        await js.stream_info(OUTPUT_STREAM)
    except NotFoundError:
        return False
    return True


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
        name=durable,  # created on CONSUMER.CREATE.CORRAL.<durable>.<filter>: only its role may (events/auth.py)
        durable_name=durable,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
    )
    try:
        current = (await js.consumer_info(STREAM, durable)).config
    except NotFoundError:
        await js.add_consumer(STREAM, config)
        return
    if current.filter_subject != filter_subject or current.ack_wait != ack_wait_s:
        await js.add_consumer(STREAM, config)  # create-or-update: this role's own durable only


# --- the health bucket ------------------------------------------------------------------------------

HEALTH_TTL_S = 3600.0  # a record nobody rewrites (an instance killed without stopping) goes after this


async def ensure_health_bucket(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create the `corral_health` KV bucket, or scale it up to `replicas`: the provisioner's job.

    Each actor instance writes only `<role>.<instance>` (events/auth.py, actors/runtime.py).
    """
    try:
        info = await when_ready(lambda: js.stream_info(f"KV_{HEALTH_BUCKET}"))
    except NotFoundError:
        for count in range(replicas, 0, -1):
            try:
                await when_ready(
                    lambda count=count: js.create_key_value(  # type: ignore[misc]
                        KeyValueConfig(bucket=HEALTH_BUCKET, history=1, ttl=HEALTH_TTL_S, replicas=count)
                    )
                )
                return
            except APIError as exc:
                if exc.err_code not in _PLACEMENT_CODES or count == 1:
                    raise
        return
    have = info.config.num_replicas or 1
    if have < replicas:
        info.config.num_replicas = replicas
        try:
            await js.update_stream(info.config)
        except Exception as exc:  # no room for more replicas yet
            log.warning("bucket %s keeps %s replica(s), not %s: %s", HEALTH_BUCKET, have, replicas, exc)
