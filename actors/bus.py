"""The bus an actor holds: a NATS connection, its JetStream context and a pipelined publisher."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlparse

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from events.envelope import Event, new_event
from events.publisher import PubAck, Publisher
from events.stream import ensure_event_stream
from events.types import EventData

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Bus:
    """Everything an actor needs to read and append events."""

    nc: NATS
    js: JetStreamContext
    publisher: Publisher
    servers: list[str]
    clock: Clock = utc_now

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
    url: str | list[str], *, name: str = "corral", connect_timeout_s: float = 2.0, replicas: int = 1
) -> Bus:
    """Connect to NATS, make sure the event stream exists and return a ready Bus."""
    servers = url if isinstance(url, list) else [u for u in url.split(",") if u]
    await _probe(servers, connect_timeout_s)

    async def quiet(_exc: Exception) -> None:
        # Disconnects are retried forever; the failures that matter surface as timeouts.
        return None

    nc = await nats.connect(
        error_cb=quiet,
        servers=servers,
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        pending_size=64 * 1024 * 1024,
    )
    js = nc.jetstream(timeout=10.0)
    await ensure_event_stream(js, replicas=replicas)
    publisher = await Publisher(nc).start()
    return Bus(nc=nc, js=js, publisher=publisher, servers=servers)
