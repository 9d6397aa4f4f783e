"""Prometheus metrics for `corral up --metrics-port`: the text exposition format over a tiny HTTP server.

Every figure comes from what the whole system shares, not from the actors this process happens to
run, so a `corral up --actors spawner` on one host reports the same executions as any other:

- one ordered consumer reads the low-volume event types (execution lifecycle, `checkpoint.created`,
  `validation.*`, `approval.*`) from the start of the log and folds them with the projections' own
  `evolve` (execution states) and the approver's `ApprovalBook` (pending approvals);
- each scrape asks JetStream for the stream's last sequence (events stored), the projector for its
  position (the one in this process, else `corral.api.projections.position`, else the projector's
  health record), and reads the `corral_health` bucket for every actor instance.

The HTTP side is asyncio's own server and a minimal HTTP/1.1 reader: GET /metrics, nothing else.
See docs/metrics.md.
"""

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, get_args

import orjson
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from actors.approver import APPROVAL_EVENTS, ApprovalBook
from actors.runtime import HEALTH_INTERVAL_S, health_state, read_health
from corral.errors import CorralError, UsageError
from events.envelope import decode_event
from events.subjects import (
    ALL_EVENTS,
    API_POSITION,
    OUTPUT_STREAM,
    STREAM,
    ack_pending,
    ack_sequence,
    events_of_type,
    split_subject,
)
from projections.state import Execution, State, evolve

if TYPE_CHECKING:
    from corral.system import System

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_ADDRESS: Final = "127.0.0.1"
STATES: Final[tuple[str, ...]] = get_args(State)
LIFECYCLE_TYPES: Final = (
    "execution.requested",
    "execution.queued",
    "execution.claimed",
    "execution.started",
    "execution.paused",
    "execution.resumed",
    "execution.exited",
    "execution.failed",
)
CHECKPOINT_TYPE: Final = "checkpoint.created"
VALIDATION_TYPES: Final = ("validation.passed", "validation.failed")
# Seconds; checkpoints and validations are usually tens of milliseconds, big trees take seconds.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CATCH_UP_WAIT_S: Final = 10.0
POSITION_TIMEOUT_S: Final = 1.0
MAX_HEADER_LINES: Final = 100
READ_TIMEOUT_S: Final = 10.0


def watched_subjects() -> list[str]:
    """The subjects the collector reads: everything but the high-volume output, heartbeats and files."""
    kinds = (*LIFECYCLE_TYPES, CHECKPOINT_TYPE, *VALIDATION_TYPES)
    return [events_of_type(kind) for kind in kinds] + [APPROVAL_EVENTS]


# --- the exposition format -------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Lines of the Prometheus text format 0.0.4: HELP and TYPE once per metric, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.family(name, kind, help_text)
        for labels, value in samples:
            self.sample(name, value, labels)

    def histogram(self, name: str, help_text: str, hist: "Histogram") -> None:
        self.family(name, "histogram", help_text)
        for bound, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, {"le": _number(bound)})
        self.sample(f"{name}_sum", hist.total)
        self.sample(f"{name}_count", hist.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class Histogram:
    """Observations in fixed buckets (upper bounds, seconds); +Inf is implied."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        running, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


# --- what the log says -------------------------------------------------------------------------------


class LogFold:
    """Execution states, approvals and duration histograms folded from the watched events, in order."""

    def __init__(self) -> None:
        self.executions: dict[str, Execution] = {}
        self.approvals = ApprovalBook()
        self.checkpoint = Histogram()
        self.validation = Histogram()
        self.position = 0  # stream sequence of the newest event folded

    def apply(self, seq: int, subject: str, payload: bytes) -> None:
        if seq <= self.position:
            return  # a redelivery after an ordered consumer's reset
        self.position = seq
        execution_id, kind = split_subject(subject)
        if kind.startswith("approval."):
            raw = orjson.loads(payload)
            if isinstance(raw, dict):
                self.approvals.apply(execution_id, kind, raw, seq)
            return
        if kind == CHECKPOINT_TYPE or kind in VALIDATION_TYPES:
            data = orjson.loads(payload).get("data") or {}
            duration_ms = data.get("duration_ms")
            if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool) and duration_ms >= 0:
                (self.checkpoint if kind == CHECKPOINT_TYPE else self.validation).observe(duration_ms / 1000.0)
            return
        event = decode_event(payload, seq=seq)
        after = evolve(self.executions.get(execution_id), event)
        if after is not None:
            self.executions[execution_id] = after

    def states(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for execution in self.executions.values():
            counts[execution.state] = counts.get(execution.state, 0) + 1
        return counts

    def pending_approvals(self) -> int:
        return sum(1 for a in self.approvals.approvals.values() if a.state == "pending")


# --- the collector ---------------------------------------------------------------------------------


class MetricsCollector:
    """Follows the watched events of a System and renders every metric on demand."""

    def __init__(self, system: "System") -> None:
        self.system = system
        self.fold = LogFold()
        self.caught_up = asyncio.Event()
        self.handled = 0
        self._target = 0
        self._sub: Any = None

    async def start(self) -> None:
        js = self.system.bus.js
        self._sub = await js.subscribe(
            ALL_EVENTS,
            stream=STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            config=ConsumerConfig(filter_subjects=watched_subjects()),
            cb=self._on_msg,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        info = await self._sub.consumer_info()
        self._target = int(info.delivered.consumer_seq or 0) + int(info.num_pending or 0)
        if self.handled >= self._target:
            self.caught_up.set()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        try:
            self.fold.apply(ack_sequence(msg.reply), msg.subject, msg.data)
        except Exception:
            log.exception("metrics: cannot fold %s", msg.subject)
        finally:
            self.handled += 1
            if not self.caught_up.is_set() and (
                ack_pending(msg.reply) == 0 or (self._target and self.handled >= self._target)
            ):
                self.caught_up.set()

    # --- what each scrape asks ---------------------------------------------------------------

    async def _last_seq(self) -> int:
        info = await self.system.bus.js.stream_info(STREAM)
        return int(info.state.last_seq)

    async def _health_records(self) -> list[dict[str, Any]]:
        """Every record of the health bucket (actors/runtime.py read_health: the role from the key,
        `written_at` from the server), but those forgotten after HEALTH_RETENTION_S."""
        now = time.time()
        return [r for r in await read_health(self.system.bus.js) if health_state(r, now) != "forgotten"]

    async def _position(self, records: list[dict[str, Any]]) -> int | None:
        """The projector's position: in this process, else by request, else from its health record."""
        projector = self.system.projector
        if projector is not None:
            return projector.position
        try:
            reply = await self.system.bus.nc.request(API_POSITION, b"", timeout=POSITION_TIMEOUT_S)
            position = orjson.loads(reply.data).get("position")
            if isinstance(position, int):
                return position
        except (NoRespondersError, NatsTimeoutError, TimeoutError, orjson.JSONDecodeError, AttributeError):
            pass
        positions = [int(r["position"]) for r in records if r.get("actor") == "projector" and "position" in r]
        return max(positions) if positions else None

    async def _event_time(self, seq: int) -> float | None:
        """Wall-clock time the event at `seq` was stored, or None when it cannot be read."""
        try:
            msg = await self.system.bus.js.get_msg(STREAM, seq=seq)
        except Exception:
            return None
        if isinstance(msg.time, datetime):
            return msg.time.timestamp()
        return None

    async def _output_metrics(self, out: "Exposition", records: list[dict[str, Any]]) -> None:
        """Under log retention (docs/retention.md), the output stream's own counters and lag."""
        try:
            info = await self.system.bus.js.stream_info(OUTPUT_STREAM)
        except Exception:
            return  # no output stream: output is in the core log, counted above
        last = int(info.state.last_seq or 0)
        out.metric(
            "corral_output_events_stored_total",
            "counter",
            "Output events stored in CORRAL_OUTPUT (its last sequence), under log retention.",
            [({}, last)],
        )
        out.metric(
            "corral_output_events_retained",
            "gauge",
            "Output events CORRAL_OUTPUT still holds (its limits remove the oldest).",
            [({}, int(info.state.messages or 0))],
        )
        projector = self.system.projector
        position = projector.output_position if projector is not None else None
        if position is None:
            found = [int(r["output_position"]) for r in records if "output_position" in r]
            position = max(found) if found else None
        if position is not None:
            out.metric(
                "corral_output_events_projected_total",
                "counter",
                "CORRAL_OUTPUT sequence up to which the projector has applied output to DuckDB.",
                [({}, position)],
            )
            out.metric(
                "corral_projector_output_lag_events",
                "gauge",
                "Output events stored in CORRAL_OUTPUT but not projected yet.",
                [({}, max(0, last - position))],
            )

    def _published(self) -> int:
        """Events stored through this process's connections: the system's own and each actor's."""
        buses = [self.system.bus, *getattr(self.system, "buses", [])]
        return sum(bus.publisher.published for bus in {id(b): b for b in buses}.values())

    async def render(self) -> str:
        """Every metric, as of now, in the Prometheus text format."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.caught_up.wait(), CATCH_UP_WAIT_S)
        last_seq = await self._last_seq()
        records = await self._health_records()
        position = await self._position(records)
        out = Exposition()
        out.metric(
            "corral_executions",
            "gauge",
            "Executions by state, as the projections define it (projections/state.py).",
            (({"state": state}, n) for state, n in self.fold.states().items()),
        )
        out.metric(
            "corral_events_stored_total",
            "counter",
            "Events stored in the event log (the stream's last sequence).",
            [({}, last_seq)],
        )
        out.metric(
            "corral_events_published_total",
            "counter",
            "Events this process published and JetStream acknowledged (its actors and API).",
            [({}, self._published())],
        )
        if position is not None:
            lag = max(0, last_seq - position)
            lag_s = 0.0
            if lag:
                stored_at = await self._event_time(position + 1)
                lag_s = max(0.0, time.time() - stored_at) if stored_at is not None else 0.0
            out.metric(
                "corral_events_projected_total",
                "counter",
                "Stream sequence up to which the projector has applied the log to DuckDB.",
                [({}, position)],
            )
            out.metric("corral_projector_lag_events", "gauge", "Events stored but not projected yet.", [({}, lag)])
            out.metric(
                "corral_projector_lag_seconds",
                "gauge",
                "Age of the oldest event not projected yet (0 when caught up).",
                [({}, round(lag_s, 3))],
            )
        await self._output_metrics(out, records)
        out.histogram(
            "corral_checkpoint_duration_seconds",
            "Time to take a checkpoint (checkpoint.created duration_ms).",
            self.fold.checkpoint,
        )
        out.histogram(
            "corral_validation_duration_seconds",
            "Time to validate a checkpoint or command (validation.passed/failed duration_ms).",
            self.fold.validation,
        )
        out.metric(
            "corral_approvals_pending",
            "gauge",
            "Approvals requested and not yet granted, denied or expired.",
            [({}, self.fold.pending_approvals())],
        )
        now = time.time()
        rows = sorted(records, key=lambda r: (str(r.get("actor", "")), str(r.get("instance", ""))))
        ages = [
            ({"actor": str(r.get("actor", "")), "instance": str(r.get("instance", ""))}, _age(r, now)) for r in rows
        ]
        out.metric(
            "corral_actor_up",
            "gauge",
            f"1 if the actor instance reported within {3 * HEALTH_INTERVAL_S:g}s (corral_health bucket), else 0.",
            ((labels, 1 if age <= 3 * HEALTH_INTERVAL_S else 0) for labels, age in ages),
        )
        out.metric(
            "corral_actor_last_seen_seconds",
            "gauge",
            "Seconds since the actor instance last wrote its health record.",
            ((labels, round(age, 3)) for labels, age in ages),
        )
        out.metric(
            "corral_metrics_log_position",
            "gauge",
            "Stream sequence of the newest watched event this exporter has read.",
            [({}, self.fold.position)],
        )
        return out.text()


def _age(record: dict[str, Any], now: float) -> float:
    try:
        return max(0.0, now - float(record.get("written_at", record.get("last_seen", 0))))
    except (TypeError, ValueError):
        return math.inf


# --- the HTTP side -----------------------------------------------------------------------------------


def parse_port(value: object, *, where: str = "--metrics-port") -> int:
    """A TCP port from the command line or corral.toml; 0 means any free port."""
    text = str(value).strip()
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise UsageError(f"{where}: expected a port number, 1 to 65535 (0: any free port) (got {value!r})")
    return int(text)


class BadRequest(Exception):
    """What the client sent is not an HTTP request this server reads."""


class MetricsServer:
    """Serves GET /metrics over plain HTTP/1.1, one response per connection."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.collector: MetricsCollector | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        """Bind the port (before anything else starts, so a taken port changes nothing)."""
        try:
            self._server = await asyncio.start_server(self._handle, self.address, self.port)
        except OSError as exc:
            if isinstance(exc, socket.gaierror):
                reason = f"cannot resolve the address ({exc.strerror})"
            else:
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise CorralError(
                f"cannot serve metrics on {self.address}:{self.port}: {reason}; "
                "pick another --metrics-port (or --metrics-address)"
            ) from None
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = [False]
        try:
            status, body, content_type = await self._respond(reader, head_only)
        except BadRequest:
            status, body, content_type = "400 Bad Request", b"bad request\n", "text/plain; charset=utf-8"
        except Exception as exc:  # a failed scrape (NATS unreachable, ...) must not take the process down
            log.exception("metrics: scrape failed")
            status, body = "500 Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode()
            content_type = "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + (b"" if head_only[0] else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, head_only: list[bool]) -> tuple[str, bytes, str]:
        try:
            request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            for _ in range(MAX_HEADER_LINES):
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
                if line in (b"\r\n", b"\n", b""):
                    break
        except (TimeoutError, ConnectionError, ValueError) as exc:  # ValueError: a line over the reader's limit
            raise BadRequest(str(exc)) from None
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise BadRequest("not an HTTP request")
        method, target = parts[0], parts[1].split("?", 1)[0]
        head_only[0] = method == "HEAD"
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET\n", text
        if target == "/metrics":
            if self.collector is None:
                return "503 Service Unavailable", b"corral is starting\n", text
            return "200 OK", (await self.collector.render()).encode(), CONTENT_TYPE
        if target == "/":
            return "200 OK", b"corral metrics: GET /metrics (Prometheus text format)\n", text
        return "404 Not Found", b"not found; metrics are at /metrics\n", text
