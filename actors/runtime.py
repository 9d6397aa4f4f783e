"""The runtime every actor shares: lifecycle, health heartbeat, work-queue consumer loop, clean stop."""

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Self

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError, KeyWrongLastSequenceError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from actors.bus import Bus
from events.auth import VERSION as __version__
from events.stream import ensure_work_consumer
from events.subjects import HEALTH_BUCKET, STREAM

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 5.0
# `corral health`: an instance silent for more than this many beats is gone (not alive, whatever its
# record says), and forgotten once silent for HEALTH_RETENTION_S (a crashed `corral up`'s instances).
HEALTH_MISSED_BEATS = 3
HEALTH_RETENTION_S = 600.0


def health_key(actor: str, instance: str) -> str:
    """The key of an instance's record in the health bucket: `<role>.<instance>`.

    The role is the first token, so NATS lets each role write its own instances' keys only
    (`$KV.corral_health.<role>.>`, events/auth.py).
    """
    return f"{actor}.{instance}"


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
        self.boot_id = uuid.uuid4().hex  # this process's run of the instance: a restart is another boot
        self.beat = 0  # how many health records this boot wrote: monotonic
        self.health_overwritten = 0  # records of this instance someone else wrote (and it replaced)
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
            "boot_id": self.boot_id,
            "beat": self.beat,
            "interval_s": HEALTH_INTERVAL_S,
        }

    async def _run_all(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.run())
            tg.create_task(self._heartbeat())

    @property
    def health_key(self) -> str:
        return health_key(self.name, self.instance)

    async def _heartbeat(self) -> None:
        """Write the health record every HEALTH_INTERVAL_S; the provisioner created the bucket.

        Each write after the first expects the revision of the last one: a record someone else
        wrote meanwhile (the same role's credentials, on this instance's key) is reported and
        replaced, so a forgery lasts one beat at most while the instance lives.
        """
        revision = 0  # of this instance's last confirmed write
        while not self.stopping.is_set():
            if self._health is None:
                with contextlib.suppress(Exception):  # no bucket yet: next beat
                    self._health = await self.bus.js.key_value(HEALTH_BUCKET)
            if self._health is not None:
                self.beat += 1
                record = orjson.dumps(self.health())
                try:
                    if revision:
                        revision = await self._health.update(self.health_key, record, last=revision)
                    else:
                        revision = await self._health.put(self.health_key, record)
                except KeyWrongLastSequenceError:
                    self.health_overwritten += 1
                    log.warning(
                        "%s: health record %s was written by another client; rewriting it",
                        self.instance,
                        self.health_key,
                    )
                    revision = 0
                    with contextlib.suppress(Exception):
                        revision = await self._health.put(self.health_key, record)
                except Exception:  # not confirmed (a reconnect): the next beat writes without expectation
                    revision = 0
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
        # With the server away (a stop while NATS is down) the delete would wait out its timeout for
        # every actor, one group after another: the record is left (it shows as stale in `corral health`).
        if self._health is not None and self.bus.nc.is_connected:
            with contextlib.suppress(Exception):
                await self._health.delete(self.health_key)

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
                    msgs = await self._fetch_unless_stopped(sub)
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

    async def _fetch_unless_stopped(self, sub: Any, batch: int = 1) -> list[Msg]:
        """One fetch (0.5 s at most), given up when the actor stops: stopping then takes no wait.

        With `batch` > 1 it returns what the consumer has waiting, up to `batch`, as soon as there is
        one message: the request is a no-wait pull with an expiry (what nats-py sends for a batch),
        which the server (2.9 and later) answers as soon as it has delivered what was pending, or
        at the first message when none was (tests/test_runtime.py checks it).

        A message the server hands over just as the fetch is given up is not acked, and comes
        again after the consumer's ack wait, as after a crash.
        """
        fetching = asyncio.ensure_future(sub.fetch(batch, timeout=0.5))
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({fetching, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the actor's task cancelled: the fetch goes with it
            fetching.cancel()
            raise
        finally:
            stopped.cancel()
        if not fetching.done():
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetching
            return []
        msgs: list[Msg] = fetching.result()
        return msgs


# --- reading the health bucket (`corral health`) -----------------------------------------------------


async def read_health(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every live record of the health bucket, with `key`, and `written_at`: the server's time of the write.

    Listed through the bucket stream's subjects (no consumer). The role is the key's first token,
    which only that role's NATS user may write (events/auth.py): it wins over the `actor` a record
    claims. `written_at`, not the record's own `last_seen`, says when the instance last beat.
    """
    prefix = f"$KV.{HEALTH_BUCKET}."
    stream = f"KV_{HEALTH_BUCKET}"
    try:
        info = await js.stream_info(stream, subjects_filter=prefix + ">")
    except NotFoundError:
        return []
    records = []
    for subject in sorted(info.state.subjects or {}):
        try:
            msg = await js.get_msg(stream, subject=subject, direct=bool(info.config.allow_direct))
        except Exception:  # deleted (a stopped actor) or gone since the listing
            continue
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            continue
        try:
            record = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        key = subject.removeprefix(prefix)
        role, _, instance = key.partition(".")
        if instance:  # <role>.<instance>; a key of the layout before it (one token) keeps its claims
            record["actor"], record["instance"] = role, instance
        record["key"] = key
        record["written_at"] = msg.time.timestamp() if msg.time else float(record.get("last_seen") or 0)
        records.append(record)
    return records


def health_state(record: dict[str, Any], now: float) -> str:
    """`alive` (beat within HEALTH_MISSED_BEATS beats), `gone` (silent longer), `forgotten` (past the retention)."""
    silent = now - float(record.get("written_at") or 0)
    if silent <= HEALTH_MISSED_BEATS * HEALTH_INTERVAL_S:
        return "alive"
    return "gone" if silent <= HEALTH_RETENTION_S else "forgotten"
