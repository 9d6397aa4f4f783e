"""A minimal NATS client for reading the log in bulk: the wire protocol parsed with bytes.find.

nats-py parses every delivered message with a regular expression and a Python-level state
machine; reading a whole stream, that parser is most of the cost (a profile of a 300k-event
rebuild spent ~60 % of the event loop in it). This client speaks just enough of the protocol
for the projector's intake and `projections.intake.read_log`: CONNECT (user and password, or
none), SUB/UNSUB, PUB, PING/PONG, and MSG/HMSG frames handed raw to a sink. No TLS, no
reconnects: a lost connection sets `error`; the projector connects again and resumes after its
applied position, a rebuild fails and leaves the old tables in place. `connect_wire` returns
None when the server asks for what this client does not do (TLS, nkeys, tokens), so the caller
can fall back to nats-py (`connect_reader` does).
"""

import asyncio
import contextlib
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import orjson

from projections.intake import DeliverySink, IntakeClient, RawClient, RawSink, StatusSink, delivery_sink

if TYPE_CHECKING:
    from actors.bus import Bus

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
# A JetStream delivery with headers and a reply of the usual 9 tokens
# ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>): subject, sid, stream
# sequence, header and total sizes in one match, for the subscriptions of subscribe_deliveries.
# Anything else (statuses, MSG without headers, the longer reply form) takes the general path.
_DELIVERY = re.compile(rb"HMSG ([^ \r\n]+) (\d+) \$JS\.ACK\.[^ .]+\.[^ .]+\.\d+\.(\d+)\.\d+\.\d+\.\d+ (\d+) (\d+)\r\n")


class WireError(RuntimeError):
    pass


class WireClient:
    """One plain-TCP NATS connection whose subscriptions deliver (subject, reply, data, headers)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._sinks: dict[int, RawSink] = {}
        self._deliveries: dict[bytes, DeliverySink] = {}  # sid (as on the wire) -> its fast path
        self._next_sid = 0
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="corral-wire-reader")

    def new_inbox(self) -> str:
        return f"_INBOX.{secrets.token_hex(11)}"

    async def subscribe_raw(self, subject: str, sink: RawSink) -> int:
        self._next_sid += 1
        sid = self._next_sid
        self._sinks[sid] = sink
        self._writer.write(f"SUB {subject} {sid}\r\n".encode())
        await self._writer.drain()
        return sid

    async def subscribe_deliveries(self, subject: str, on_delivery: DeliverySink, on_status: StatusSink) -> int:
        """Subscribe to a pull consumer's deliveries (projections.intake.subscribe_deliveries):
        each parsed with one regular-expression match, no split and no reply parsing in Python."""
        sid = await self.subscribe_raw(subject, delivery_sink(on_delivery, on_status))
        self._deliveries[str(sid).encode()] = on_delivery
        return sid

    async def unsubscribe_raw(self, sid: int) -> None:
        self._sinks.pop(sid, None)
        self._deliveries.pop(str(sid).encode(), None)
        self._writer.write(f"UNSUB {sid}\r\n".encode())
        await self._writer.drain()

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "") -> None:
        if self.error is not None:
            raise WireError(f"NATS connection lost: {self.error}")
        head = f"PUB {subject} {reply} {len(payload)}\r\n" if reply else f"PUB {subject} {len(payload)}\r\n"
        self._writer.write(head.encode() + payload + b"\r\n")
        await self._writer.drain()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        buf = b""
        reader = self._reader
        sinks = self._sinks
        deliveries = self._deliveries
        match = _DELIVERY.match
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise WireError("the server closed the connection")
                buf = buf + data if buf else data
                pos = 0
                end = len(buf)
                while pos < end:
                    if deliveries:
                        found = match(buf, pos)
                        if found is not None:
                            subject, sid, seq, hlen, tlen = found.groups()
                            on_delivery = deliveries.get(sid)
                            if on_delivery is not None:
                                start = found.end()
                                stop = start + int(tlen)
                                if stop + 2 > end:
                                    break  # the rest of this frame has not arrived yet
                                on_delivery(int(seq), subject, buf[start + int(hlen) : stop])
                                pos = stop + 2
                                continue
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    op = buf[pos : pos + 4]
                    if op == b"HMSG" or op[:3] == b"MSG":
                        parts = buf[pos:eol].split(b" ")
                        if op == b"HMSG":
                            hlen, tlen = int(parts[-2]), int(parts[-1])
                            reply = parts[3] if len(parts) == 6 else b""
                        else:
                            hlen, tlen = 0, int(parts[-1])
                            reply = parts[3] if len(parts) == 5 else b""
                        start = eol + 2
                        stop = start + tlen
                        if stop + 2 > end:
                            break  # the rest of this frame has not arrived yet
                        sink = sinks.get(int(parts[2]))
                        if sink is not None:
                            sink(parts[1], reply, buf[start + hlen : stop], buf[start : start + hlen])
                        pos = stop + 2
                        continue
                    line = buf[pos:eol]
                    pos = eol + 2
                    if line == b"PING":
                        self._writer.write(b"PONG\r\n")
                    elif line.startswith(b"-ERR"):
                        raise WireError(line[5:].decode(errors="replace").strip(" '"))
                    # INFO, +OK, PONG: nothing to do
                buf = buf[pos:]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc


async def connect_wire(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    name: str = "corral-reader",
    timeout_s: float = 5.0,
) -> WireClient | None:
    """Connect to one NATS server; None if it needs what this client does not speak."""
    parsed = urlparse(url if "://" in url else f"nats://{url}")
    if parsed.scheme not in ("nats", ""):
        return None
    user = user or parsed.username
    password = password or parsed.password
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222, limit=READ_SIZE * 4), timeout_s
    )
    try:
        first = await asyncio.wait_for(reader.readline(), timeout_s)
        if not first.startswith(b"INFO "):
            raise WireError(f"unexpected greeting from {url}: {first[:80]!r}")
        info = orjson.loads(first[5:])
        if info.get("tls_required") or info.get("nonce"):
            writer.close()
            return None
        options: dict[str, object] = {
            "verbose": False,
            "pedantic": False,
            "lang": "python-corral",
            "version": "1",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "name": name,
        }
        if user:
            options["user"] = user
            options["pass"] = password or ""
        writer.write(b"CONNECT " + orjson.dumps(options) + b"\r\nPING\r\n")
        await writer.drain()
        while True:
            line = (await asyncio.wait_for(reader.readline(), timeout_s)).strip()
            if line == b"PONG":
                break
            if line.startswith(b"-ERR"):
                reason = line[5:].decode(errors="replace").strip("' ")
                raise WireError(f"NATS refused the connection: {reason}")
            if not line and reader.at_eof():
                raise WireError("the server closed the connection")
    except BaseException:
        writer.close()
        raise
    client = WireClient(reader, writer)
    client.start()
    return client


AUTH_TIMEOUT = "Authentication Timeout"  # the server's words when CONNECT came after its auth timeout
AUTH_TIMEOUT_RETRIES = 5


async def _connect_retrying(url: str, **kwargs: Any) -> WireClient | None:
    """connect_wire, again when the server gave up waiting for our CONNECT: on a loaded machine a
    process may not run for the server's authorization timeout between the connection and its
    CONNECT (seen at load 10-16: `corral up` stopped, "an actor failed: NATS refused the
    connection: Authentication Timeout"). That is no refusal of the credentials."""
    for attempt in range(AUTH_TIMEOUT_RETRIES):
        try:
            return await connect_wire(url, **kwargs)
        except WireError as exc:
            if AUTH_TIMEOUT not in str(exc) or attempt == AUTH_TIMEOUT_RETRIES - 1:
                raise
            log.warning("NATS at %s timed out our CONNECT (a loaded machine); connecting again", url)
            await asyncio.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


async def connect_reader(bus: "Bus", *, name: str, reconnected_cb: Any = None) -> RawClient:
    """A lean wire-protocol connection to a server of the bus, as the bus's NATS user.

    Falls back to nats-py (IntakeClient, reconnecting by itself and calling `reconnected_cb`)
    where the server asks for what WireClient does not speak (TLS, nkeys). A WireClient does not
    reconnect: its owner watches `error` and connects again (the projector does).
    """
    options = bus.connect_options()
    candidates = []
    found = bus.nc.connected_url
    if found is not None:
        candidates.append(f"nats://{found.hostname}:{found.port or 4222}")
    candidates += [url for url in bus.servers if url not in candidates]
    failure: BaseException | None = None
    for url in candidates:
        try:
            wire = await _connect_retrying(url, user=options.get("user"), password=options.get("password"), name=name)
        except WireError:
            raise  # the server refused us (credentials): another server will too
        except (OSError, TimeoutError) as exc:
            failure = exc
            continue
        if wire is None:
            break
        return wire
    else:
        if failure is not None:
            raise failure
    client = IntakeClient()
    extra = {"reconnected_cb": reconnected_cb} if reconnected_cb is not None else {}
    await client.connect(
        servers=bus.servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=1, **options, **extra
    )
    return client
