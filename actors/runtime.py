"""The runtime every actor shares: lifecycle, health heartbeat, work-queue consumer loop, clean stop."""

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Self

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, FetchTimeoutError, ServiceUnavailableError
from nats.js.kv import KeyValue

from actors.bus import Bus
from corral import __version__
from events.stream import ensure_work_consumer
from events.subjects import HEALTH_BUCKET, STREAM

HEALTH_INTERVAL_S = 5.0


def instance_name(actor: str) -> str:
    """Return a name unique to this actor instance: actor, host and pid."""
    return f"{actor}-{socket.gethostname().split('.')[0]}-{os.getpid()}"


class Actor:
    """Base of the five actors and the projector.

    Subclasses implement `run()`; it is started in a task group beside the health heartbeat, so
    a crash in either stops the actor loudly instead of silently. `stop()` is idempotent.
    """

    name: ClassVar[str] = "actor"

    def __init__(self, bus: Bus, *, instance: str | None = None) -> None:
        self.bus = bus
        self.instance = instance or instance_name(self.name)
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._health: KeyValue | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Prepare (consumers, tables) and start the actor's tasks."""
        await self.prepare()
        self._main = asyncio.create_task(self._run_all(), name=self.instance)

    async def prepare(self) -> None:
        """Create what the actor needs before its loop runs."""

    async def run(self) -> None:
        """The actor's main loop; return when `self.stopping` is set."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release what the actor owns (processes, files) after its loop ended."""

    def health(self) -> dict[str, Any]:
        """Return the actor's health record (more keys may be added by subclasses)."""
        return {
            "actor": self.name,
            "instance": self.instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "last_seen": time.time(),
        }

    async def _run_all(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.run())
            tg.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        try:
            self._health = await self.bus.js.key_value(HEALTH_BUCKET)
        except BucketNotFoundError:
            with contextlib.suppress(Exception):
                self._health = await self.bus.js.create_key_value(
                    KeyValueConfig(bucket=HEALTH_BUCKET, history=1, ttl=3600, replicas=self.bus.replicas)
                )
        while not self.stopping.is_set():
            if self._health is not None:
                with contextlib.suppress(Exception):
                    await self._health.put(self.instance, orjson.dumps(self.health()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HEALTH_INTERVAL_S)

    async def wait(self) -> None:
        """Wait until the actor's tasks end; raise what made them fail."""
        if self._main is not None:
            await asyncio.shield(self._main)

    async def stop(self) -> None:
        """Stop the loop, release what the actor owns, and forget its health record."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self._main is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._main), 5.0)
            except TimeoutError:
                self._main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._main
            except (Exception, asyncio.CancelledError):
                # A failed loop was already reported to whoever awaited wait(); stopping goes on.
                pass
        await self.on_stop()
        if self._health is not None:
            with contextlib.suppress(Exception):
                await self._health.delete(self.instance)

    async def consume(
        self,
        durable: str,
        filter_subject: str,
        handle: Callable[[Msg], Awaitable[None]],
        *,
        ready: Callable[[], Awaitable[None]] | None = None,
        ack_wait_s: float = 30.0,
    ) -> None:
        """Claim messages one at a time from a durable consumer shared by all instances.

        `handle` must ack (or nak) the message. `ready` is awaited before each fetch, so an
        actor at its capacity stops claiming and leaves the work to other instances.
        """
        await ensure_work_consumer(self.bus.js, durable, filter_subject, ack_wait_s=ack_wait_s)
        sub = await self.bus.js.pull_subscribe_bind(durable, stream=STREAM)
        try:
            while not self.stopping.is_set():
                if ready is not None:
                    await ready()
                    if self.stopping.is_set():
                        break
                try:
                    msgs = await sub.fetch(1, timeout=0.5)
                except (FetchTimeoutError, NatsTimeoutError, TimeoutError):
                    continue
                except ServiceUnavailableError:  # the consumer's leader is being elected (a node left)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await handle(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
