"""The notifier: tells a human, through webhooks, Slack or ntfy, when an execution needs them.

Each `[[notify]]` entry of corral.toml is a Target: a kind (webhook, slack, ntfy), a URL, the
event types it wants (by default approval.requested, execution.stalled, execution.crash_loop,
limit.exceeded, execution.failed, and execution.exited unless the exit is a success or a cancel
someone asked for), and filters on the execution's labels and template, read from its
`execution.requested` (cached).

Events come from one durable work consumer ("notifier") shared by every notifier instance, so
two `corral up` hosts send each notification once: an instance claims an event, delivers it to
every matching target (concurrently, each retried with exponential backoff, a bounded number of
attempts), then acks it. Every attempt is recorded: `notification.sent` or `notification.failed`
(`final` on the last), naming the target by its name, never its URL (a Slack webhook's URL is a
secret). A claim that outlives its instance (a crash) is redelivered; the new owner first reads
the execution's `notification.sent` events and skips the targets already served. The consumer is
created to deliver only events stored from then on, and an event older than STALE_AFTER_S when
claimed (no notifier ran for a long while) is dropped, not sent.

Webhook bodies are signed with HMAC-SHA256 when the entry names `secret_env`: header
`X-Corral-Signature: sha256=<hex>` over the exact body bytes. See docs/notifications.md.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import FetchTimeoutError, NotFoundError, ServiceUnavailableError

from actors.bus import Bus, ensure_work_consumer
from actors.runtime import Actor
from events.approvals import EXIT_CODE_APPROVAL, derived_id
from events.auth import VERSION
from events.envelope import Event, decode_event
from events.errors import EventError
from events.subjects import STREAM, event_subject, events_of_type
from events.types import EventData, ExecutionRequested, NotificationFailed, NotificationSent
from replay.history import follow

if TYPE_CHECKING:  # httpx is imported where something is sent: an idle notifier does without it
    import httpx

log = logging.getLogger(__name__)

Kind = Literal["webhook", "slack", "ntfy"]
CONSUMER: Final = "notifier"
ATTEMPTS: Final = 4  # per target and event: the first and three retries
BACKOFF_S: Final = 1.0  # before retry n: BACKOFF_S * 2**(n-1), at most BACKOFF_MAX_S
BACKOFF_MAX_S: Final = 30.0
REQUEST_TIMEOUT_S: Final = 10.0  # one attempt; below ACK_WAIT_S, and the claim is renewed before each
ACK_WAIT_S: Final = 30.0
MAX_IN_FLIGHT: Final = 16  # events one instance delivers at once (a slow target holds one slot)
STALE_AFTER_S: Final = 3600.0
MAX_TEXT: Final = 1500  # characters of a question or task in a message
SIGNATURE_HEADER: Final = "X-Corral-Signature"


@dataclass(frozen=True)
class Target:
    """Where to send which events (corral/config.py NotifyTarget.for_actor builds it)."""

    name: str
    kind: Kind
    url: str = field(repr=False)  # may be a secret: never logged nor recorded
    events: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    templates: tuple[str, ...] = ()
    secret_env: str | None = None
    link_base: str | None = None
    on_success: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"

    def wants(self, event_type: str, data: dict[str, Any], context: "Context") -> bool:
        """Whether this target is told about an event of this type, payload and execution."""
        if event_type not in self.events:
            return False
        if event_type == "execution.exited" and not self.on_success and not failed_exit(data):
            return False
        if any(context.labels.get(key) != value for key, value in self.labels.items()):
            return False
        return not self.templates or context.template in self.templates


def failed_exit(data: dict[str, Any]) -> bool:
    """An exit worth telling: not code 0, not code 90 (a tool asking for an approval: the
    approval.requested that follows says it, docs/approvals.md), and not one someone caused
    knowingly: a cancel they asked for, or a `corral down` stopping the agents of its host."""
    if data.get("exit_code") in (0, EXIT_CODE_APPROVAL):
        return False
    return data.get("reason") not in ("cancelled", "spawner_stopped")


@dataclass(frozen=True)
class Context:
    """What the execution's `execution.requested` says that filters and messages use."""

    labels: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    task: str | None = None
    agent: str | None = None

    @classmethod
    def of(cls, request: ExecutionRequested | None) -> "Context":
        if request is None:
            return cls()
        return cls(labels=dict(request.labels), template=request.template, task=request.task, agent=request.agent)


@dataclass(frozen=True)
class Notification:
    """One event, put in words for a human."""

    event_id: str
    event_type: str
    execution_id: str
    ts: str
    data: dict[str, Any]
    context: Context
    test: bool = False

    @property
    def approval_id(self) -> str | None:
        value = self.data.get("approval_id") if self.event_type == "approval.requested" else None
        return str(value) if value else None

    def title(self) -> str:
        e, d = self.execution_id, self.data
        kind = self.event_type
        if self.test:
            return "Corral: test notification"
        if kind == "approval.requested":
            return f"Approval needed: {e}"
        if kind == "execution.stalled":
            return f"Stalled: {e} (idle {d.get('idle_s', 0):.0f}s)"
        if kind == "execution.crash_loop":
            return f"Crash loop: {e} ({d.get('failures')} failures)"
        if kind == "limit.exceeded":
            return f"Limit exceeded: {e} ({d.get('limit')})"
        if kind == "execution.failed":
            return f"Failed to start: {e}"
        if kind == "execution.exited":
            code = d.get("exit_code")
            how = f"exit code {code}" if code is not None else f"signal {d.get('signal')}"
            return f"Exited: {e} ({how})"
        return f"{kind}: {e}"

    def lines(self) -> list[str]:
        """The message's body, plain text, one fact a line."""
        d = self.data
        kind = self.event_type
        out: list[str] = []
        if self.test:
            out.append("Sent by `corral notify test`: this target is reachable.")
        if kind == "approval.requested":
            out.append(_clip(str(d.get("question") or "")))
            if d.get("options"):
                out.append("Options: " + ", ".join(str(o) for o in d["options"]))
        elif kind == "execution.stalled":
            out.append(f"No output or heartbeat for {d.get('idle_s', 0):.0f}s; reaction: {d.get('reaction')}.")
        elif kind == "execution.crash_loop":
            out.append(f"{d.get('failures')} failures within {d.get('window_s', 0):.0f}s; retries stopped.")
        elif kind == "limit.exceeded":
            out.append(f"{d.get('limit')}: {d.get('value')} over the maximum {d.get('maximum')}.")
        elif kind == "execution.failed":
            out.append(f"{d.get('stage')}: {_clip(str(d.get('error') or ''))}")
        elif kind == "execution.exited":
            out.append(f"Reason: {d.get('reason', 'exited')}; ran {d.get('duration_s', 0):.0f}s.")
        ctx = self.context
        if ctx.task:
            out.append("Task: " + _clip(ctx.task, 300))
        if ctx.labels:
            out.append("Labels: " + ", ".join(f"{k}={v}" for k, v in sorted(ctx.labels.items())))
        if ctx.template:
            out.append(f"Template: {ctx.template}")
        return [line for line in out if line]

    def commands(self) -> list[str]:
        """What to type to act on it."""
        if self.approval_id:
            return [f"corral approve {self.approval_id}", f"corral reject {self.approval_id}"]
        return [f"corral status {self.execution_id}", f"corral logs {self.execution_id}"]

    def link(self, base: str | None) -> str | None:
        """The execution in the HTTP API (docs/api.md), when its public URL is configured."""
        return f"{base}/api/executions/{self.execution_id}" if base else None

    def decision_url(self, base: str | None) -> str | None:
        """Where an operator token POSTs `{"decision": "approve"|"reject"}` (docs/api.md)."""
        return f"{base}/api/approvals/{self.approval_id}/decision" if base and self.approval_id else None


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def notification_of(event: Event, context: Context) -> Notification:
    return Notification(
        event_id=event.id,
        event_type=event.type,
        execution_id=event.execution_id,
        ts=event.ts.isoformat().replace("+00:00", "Z"),
        data=event.data.model_dump(mode="json"),
        context=context,
    )


def sample_notification() -> Notification:
    """What `corral notify test` sends: an approval request, the message people will see most."""
    return Notification(
        event_id="01TESTTESTTESTTESTTESTTEST",
        event_type="approval.requested",
        execution_id="EX-TEST",
        ts=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        data={
            "approval_id": "AP-TEST00",
            "question": "This is a test: may the agent deploy to staging?",
            "options": ["approve", "reject"],
        },
        context=Context(labels={"corral": "test"}),
        test=True,
    )


# --- the request each kind gets ---------------------------------------------------------------------


class MissingSecret(Exception):
    """A webhook's secret_env names a variable this process does not have: nothing is sent unsigned."""


def sign(secret: bytes, body: bytes) -> str:
    """The X-Corral-Signature value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _mrkdwn(text: str) -> str:
    """Slack's three control characters, escaped (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _header_text(text: str) -> str:
    """A header value: ASCII as is, anything else as an RFC 2047 word (ntfy decodes it)."""
    text = " ".join(text.split())
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="


NTFY_PRIORITY: Final = {"approval.requested": "high", "execution.crash_loop": "high"}
NTFY_TAGS: Final = {
    "approval.requested": "question",
    "execution.stalled": "hourglass",
    "execution.crash_loop": "rotating_light",
    "limit.exceeded": "warning",
    "execution.failed": "x",
    "execution.exited": "x",
}


def build_request(
    target: Target, note: Notification, environ: Mapping[str, str] = os.environ
) -> tuple[dict[str, str], bytes]:
    """(headers, body) of the POST telling `target` about `note`; raises MissingSecret."""
    headers = {"User-Agent": f"corral-notifier/{VERSION}"}
    link = note.link(target.link_base)
    if target.kind == "ntfy":
        lines = [*note.lines(), *(f"$ {c}" for c in note.commands())]
        headers.update(
            {
                "Content-Type": "text/plain; charset=utf-8",
                "Title": _header_text(note.title()),
                "Priority": NTFY_PRIORITY.get(note.event_type, "default"),
                "Tags": ",".join(("corral", NTFY_TAGS.get(note.event_type, "bell"))),
            }
        )
        if link:
            headers["Click"] = link
        return headers, "\n".join(lines).encode()
    headers["Content-Type"] = "application/json"
    if target.kind == "slack":
        return headers, orjson.dumps(slack_message(note, link))
    body = orjson.dumps(
        {
            "target": target.name,
            "test": note.test,
            "title": note.title(),
            "text": "\n".join(note.lines()),
            "commands": note.commands(),
            "link": link,
            "approval_id": note.approval_id,
            "decision_url": note.decision_url(target.link_base),
            "execution": {
                "id": note.execution_id,
                "labels": note.context.labels,
                "template": note.context.template,
                "agent": note.context.agent,
                "task": _clip(note.context.task, MAX_TEXT) if note.context.task else None,
            },
            "event": {
                "id": note.event_id,
                "type": note.event_type,
                "execution_id": note.execution_id,
                "ts": note.ts,
                "data": note.data,
            },
        }
    )
    headers["X-Corral-Event"] = note.event_type
    headers["X-Corral-Delivery"] = note.event_id
    if target.secret_env:
        secret = environ.get(target.secret_env)
        if not secret:
            raise MissingSecret(
                f"environment variable {target.secret_env} (secret_env) is not set on {socket.gethostname()}: "
                "set it where `corral up` runs; nothing is sent unsigned"
            )
        headers[SIGNATURE_HEADER] = sign(secret.encode(), body)
    return headers, body


def slack_message(note: Notification, link: str | None) -> dict[str, Any]:
    """An incoming-webhook message: the title, the facts, the commands to decide, the link."""
    facts = "\n".join(_mrkdwn(line) for line in note.lines())
    commands = " · ".join(f"`{c}`" for c in note.commands())
    decide = "Decide: " if note.approval_id else "Look: "
    context = f"execution `{note.execution_id}` · {note.event_type}"
    if link:
        context += f" · <{link}|open>"
    return {
        "text": note.title(),  # the notification's own text (and what clients without blocks show)
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": note.title()[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": facts[:2900] or note.title()}},
            {"type": "section", "text": {"type": "mrkdwn", "text": decide + commands}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


@dataclass(frozen=True)
class Attempt:
    """How one POST went: a status (any answer) or an error (no answer)."""

    status_code: int | None
    error: str | None
    duration_ms: float
    fatal: bool = False  # nothing was sent, and no retry would change that (a missing secret)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """No answer, 408, 429 or a server error: another try may work. Other 4xx will not."""
        code = self.status_code
        return not self.fatal and (code is None or code in (408, 429) or code >= 500)


async def post(
    client: "httpx.AsyncClient", target: Target, note: Notification, environ: Mapping[str, str] = os.environ
) -> Attempt:
    """One attempt; never raises."""
    import httpx

    started = time.perf_counter()
    try:
        headers, body = build_request(target, note, environ)
    except MissingSecret as exc:
        return Attempt(None, str(exc), 0.0, fatal=True)
    try:
        answer = await client.post(target.url, content=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
    except httpx.TimeoutException:
        return Attempt(None, f"no answer from {target.host} in {REQUEST_TIMEOUT_S:.0f}s", _ms(started))
    except httpx.HTTPError as exc:
        return Attempt(None, f"cannot reach {target.host}: {_describe(exc)}", _ms(started))
    error: str | None = None
    if not 200 <= answer.status_code < 300:
        error = f"{target.host} answered {answer.status_code} {answer.reason_phrase}".strip()
        snippet = " ".join(answer.text[:200].split()) if answer.content else ""
        if snippet:
            error += f": {snippet}"
    return Attempt(answer.status_code, error, _ms(started))


def _describe(exc: "httpx.HTTPError") -> str:
    """The cause without the URL (it may be a secret): the innermost exception's text."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause) or type(cause).__name__
    return text.replace(str(exc.request.url) if _has_request(exc) else "\0", "<url>")[:300]


def _has_request(exc: "httpx.HTTPError") -> bool:
    try:
        exc.request  # noqa: B018 (raises RuntimeError when unset)
    except RuntimeError:
        return False
    return True


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


# --- the actor ------------------------------------------------------------------------------------

# Webhook secrets taken out of this process's environment by the first notifier that needed them.
_WITHHELD: dict[str, str] = {}


def withhold_secrets(targets: Sequence[Target]) -> dict[str, str]:
    """The targets' webhook secrets, removed from os.environ (kept here for the notifiers).

    Agents inherit the environment of the process that spawns them (actors/spawner.py): a secret
    left there would let any agent sign webhooks as Corral. Taken once per process; later
    notifiers of the same process find them here.
    """
    for target in targets:
        name = target.secret_env
        if name and name not in _WITHHELD and os.environ.get(name):
            _WITHHELD[name] = os.environ.pop(name)
    return {t.secret_env: _WITHHELD[t.secret_env] for t in targets if t.secret_env and t.secret_env in _WITHHELD}


class Notifier(Actor):
    """Delivers each matching event to its [[notify]] targets once across instances; records each attempt."""

    name = "notifier"

    def __init__(
        self,
        bus: Bus,
        targets: Sequence[Target] = (),
        *,
        instance: str | None = None,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.targets = tuple(targets)
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.contexts: OrderedDict[str, Context] = OrderedDict()
        self.sent = 0
        self.failed = 0
        self.stale = 0
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._secrets = withhold_secrets(self.targets)

    @property
    def event_types(self) -> tuple[str, ...]:
        return tuple(sorted({kind for t in self.targets for kind in t.events}))

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "targets": len(self.targets),
            "sent": self.sent,
            "failed": self.failed,
            "stale": self.stale,
            "in_flight": len(self._tasks),
        }

    async def prepare(self) -> None:
        if not self.targets:
            return  # idle: no consumer, so a host without [[notify]] claims nothing another host would send
        import httpx

        self._client = httpx.AsyncClient(follow_redirects=False)
        await self._ensure_consumer()

    async def _ensure_consumer(self) -> None:
        """The shared durable: the targets' event types, from the events stored after its creation on."""
        filters = [events_of_type(kind) for kind in self.event_types]
        await ensure_work_consumer(self.bus.js, STREAM, CONSUMER, filters, ACK_WAIT_S)

    async def run(self) -> None:
        if not self.targets:
            await self.stopping.wait()
            return
        sub = await self.bus.js.pull_subscribe_bind(CONSUMER, stream=STREAM)
        try:
            while not self.stopping.is_set():
                await self._slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=0.5)
                except (FetchTimeoutError, NatsTimeoutError, TimeoutError):
                    self._slots.release()
                    continue
                except ServiceUnavailableError:
                    self._slots.release()
                    await asyncio.sleep(0.5)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                for msg in msgs:
                    task = asyncio.create_task(self._deliver_claimed(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("notifier: a delivery failed unexpectedly", exc_info=task.exception())

    async def on_stop(self) -> None:
        """Let deliveries under way finish briefly; the rest go back to the consumer (another instance)."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5.0)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _deliver_claimed(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            await msg.ack()
            return
        try:
            await self.deliver(event, redelivered=msg.metadata.num_delivered > 1, claim=msg)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # stopping: another instance takes it now
            raise
        except Exception:
            log.exception("notifier: cannot deliver %s %s; trying again later", event.type, event.id)
            await msg.nak(delay=5.0)
            return
        await msg.ack()

    async def deliver(self, event: Event, *, redelivered: bool = False, claim: Msg | None = None) -> int:
        """Tell every target that wants `event`; return how many accepted it."""
        age = (datetime.now(UTC) - event.ts).total_seconds()
        if age > STALE_AFTER_S:
            self.stale += 1
            log.warning("notifier: %s %s is %.0fs old; not sent", event.type, event.id, age)
            return 0
        context = await self.context(event.execution_id)
        data = event.data.model_dump(mode="json")
        targets = [t for t in self.targets if t.wants(event.type, data, context)]
        if targets and redelivered:
            served = await self._already_sent(event.execution_id, event.id)
            targets = [t for t in targets if t.name not in served]
        if not targets:
            return 0
        note = notification_of(event, context)
        results = await asyncio.gather(*(self._deliver_one(t, note, claim) for t in targets))
        return sum(results)

    async def _deliver_one(self, target: Target, note: Notification, claim: Msg | None) -> bool:
        assert self._client is not None
        for attempt in range(1, self.attempts + 1):
            if claim is not None:
                with contextlib.suppress(Exception):
                    await claim.in_progress()  # the claim lasts ACK_WAIT_S from now
            result = await post(self._client, target, note, self._secrets)
            if result.ok:
                self.sent += 1
                await self._record(
                    note,
                    NotificationSent(
                        target=target.name,
                        kind=target.kind,
                        event_id=note.event_id,
                        event_type=note.event_type,
                        attempt=attempt,
                        status_code=result.status_code or 0,
                        duration_ms=result.duration_ms,
                    ),
                    f"{target.name}|{attempt}",
                )
                return True
            final = attempt == self.attempts or not result.retryable
            delay = None if final else min(BACKOFF_MAX_S, self.backoff_s * 2 ** (attempt - 1))
            self.failed += 1
            log.warning("notifier: %s attempt %d: %s", target.name, attempt, result.error)
            await self._record(
                note,
                NotificationFailed(
                    target=target.name,
                    kind=target.kind,
                    event_id=note.event_id,
                    event_type=note.event_type,
                    attempt=attempt,
                    status_code=result.status_code,
                    error=(result.error or "failed")[:500],
                    final=final,
                    retry_in_s=delay,
                ),
                f"{target.name}|{attempt}",
            )
            if final or delay is None:
                return False
            await asyncio.sleep(delay)
        return False

    async def _record(self, note: Notification, data: EventData, salt: str) -> None:
        event = self.bus.event(note.execution_id, data, actor=self.instance, causation_id=note.event_id)
        # The same attempt recorded twice (a publish retried) is stored once.
        event = event.model_copy(update={"id": derived_id(note.event_id, f"notify|{self.boot_id}|{salt}")})
        await self.bus.publisher.publish(event)

    async def _already_sent(self, execution_id: str, event_id: str) -> set[str]:
        """Targets a previous claim of this event already served (their notification.sent is in the log)."""
        served: set[str] = set()

        async def handle(_seq: int, msg: Msg) -> bool:
            with contextlib.suppress(EventError):
                sent = decode_event(msg.data).data
                if isinstance(sent, NotificationSent) and sent.event_id == event_id:
                    served.add(sent.target)
            return False

        subject = event_subject(execution_id, "notification.sent")
        await asyncio.wait_for(follow(self.bus.js, subject, handle, stop_when_caught_up=True), 10.0)
        return served

    async def context(self, execution_id: str) -> Context:
        """The execution's labels, template and task, from its `execution.requested` (cached)."""
        found = self.contexts.get(execution_id)
        if found is not None:
            return found
        request: ExecutionRequested | None = None
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, "execution.requested"))
            data = decode_event(stored.data or b"").data
            request = data if isinstance(data, ExecutionRequested) else None
        except (NotFoundError, EventError):
            pass
        context = Context.of(request)
        if request is not None:  # an execution not requested (yet): asked again next time
            self.contexts[execution_id] = context
            if len(self.contexts) > 10_000:
                self.contexts.popitem(last=False)
        return context
