"""Provision the append-only event stream and the durable consumers the actors share."""

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
from nats.js.errors import NotFoundError

from events.subjects import ALL_EVENTS, STREAM

DUPLICATE_WINDOW_S = 300.0
MAX_EVENT_BYTES = 4 * 1024 * 1024


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


async def ensure_event_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create the event stream, or bring an existing one to the current configuration."""
    config = event_stream_config(replicas=replicas)
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return
    current = info.config
    if (
        current.deny_delete is not True
        or current.deny_purge is not True
        or current.duplicate_window != config.duplicate_window
    ):
        await js.update_stream(config)


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
