"""Notifications ([[notify]], actors/notifier.py, `corral notify`): real receivers on 127.0.0.1.

A local http.server plays the webhook endpoint, Slack and ntfy; the notifiers connect to a real
nats-server as the `notifier` NATS user; `corral up` and `corral notify` run as real processes.
"""

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from actors.bus import Bus, connect_bus
from actors.notifier import Notifier, Target
from corral.server import EmbeddedServer
from events.auth import CredentialSet
from events.envelope import Event, decode_event, new_event
from events.types import (
    ApprovalRequested,
    EventData,
    ExecutionExited,
    ExecutionFailed,
    ExecutionRequested,
    NotificationFailed,
    NotificationSent,
    Output,
)
from replay.history import follow
from tests.conftest import Cli, agent_command
from tests.test_control import detach, start_up, stop_up, wait_until

SECRET = "s3cret-hmac-key-for-tests"
SLACK_TOKEN = "XOXSLACKTOKEN1234"


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # many notifications at once: the default backlog (5) resets connections


class Receiver:
    """An HTTP server on a free loopback port recording every POST; `script[path]` lists the status
    codes of its first answers (then 200)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    planned = receiver.script.get(self.path) or []
                    status = planned.pop(0) if planned else 200
                    receiver.received.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
                    )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def at(self, path: str) -> list[dict[str, Any]]:
        """The requests to `path` that were answered 2xx."""
        with self.lock:
            return [r for r in self.received if r["path"] == path and r["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signature_ok(request: dict[str, Any], secret: str = SECRET) -> bool:
    """What a receiver does: HMAC-SHA256 of the raw body, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, request["headers"].get("X-Corral-Signature", ""))


def write_config(cli: Cli, text: str) -> None:
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text(text)


# --- bad configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('kind = "email"\nurl = "http://x"', "notify[0].kind: expected 'webhook', 'slack' or 'ntfy'"),
        ('kind = "webhook"\nurl = "ftp://x/hook"', "notify[0].url: expected an http:// or https:// URL"),
        ('kind = "slack"\nurl = "https://x/T"\nsecret_env = "K"', 'notify[0]: secret_env is for kind = "webhook"'),
        (
            'kind = "webhook"\nurl = "http://x"\nevents = ["approval.requsted"]',
            "notify[0].events: unknown event type 'approval.requsted' (did you mean approval.requested?)",
        ),
        ('kind = "webhook"\nurl = "http://x"\nevents = ["output"]', "notify[0].events: 'output' cannot be notified"),
        ('kind = "webhook"\nurl = "http://x"\nsecert_env = "K"', "unknown key notify[0].secert_env (did you mean"),
        ('kind = "webhook"\nurl = "http://x"\ntemplates = ["nope"]', "notify[0].templates: no template 'nope'"),
        ('kind = "webhook"\nurl = "http://x"\nlabels = {team = 1}', "notify[0].labels.team: expected a string"),
        (f'kind = "webhook"\nurl = "https://user:{SLACK_TOKEN}@x/h"', "notify[0].url: expected a URL without"),
        (f'kind = "slack"\nurl = "hooks.example.com/{SLACK_TOKEN}"', "notify[0].url: expected an http://"),
    ],
)
def test_bad_notify_config_is_one_line_naming_the_key(embedded_cli: Cli, entry: str, expected: str) -> None:
    write_config(embedded_cli, f"[[notify]]\n{entry}\n")
    for command in (("notify", "list"), ("notify", "test")):
        done = embedded_cli(*command)
        assert done.returncode == 2, done
        assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
        assert SLACK_TOKEN not in done.stderr  # a URL may be a secret: never repeated
    assert not (embedded_cli.home / "runtime.json").exists()


def test_duplicate_names_and_no_entries(embedded_cli: Cli) -> None:
    write_config(
        embedded_cli, '[[notify]]\nkind = "ntfy"\nurl = "http://x/a"\n[[notify]]\nkind = "ntfy"\nurl = "http://x/b"\n'
    )
    done = embedded_cli("notify", "test")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "notify[1].name: another [[notify]] entry is named 'ntfy:x'" in done.stderr
    write_config(embedded_cli, "[spawner]\nmax_running = 2\n")
    done = embedded_cli("notify", "test")
    assert done.returncode == 2 and "no [[notify]] entries" in done.stderr and done.stderr.count("\n") == 1


# --- corral notify test / list -------------------------------------------------------------------


def test_notify_test_sends_a_sample_to_each_kind(embedded_cli: Cli, receiver: Receiver) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/hook"
    write_config(
        embedded_cli,
        f"""
[[notify]]
name = "hook"
kind = "webhook"
url = "{receiver.base}/hook"
secret_env = "HOOK_SECRET"
link_base = "https://corral.example.com/"

[[notify]]
kind = "slack"
url = "{receiver.base}/services/T000/B000/{SLACK_TOKEN}"

[[notify]]
kind = "ntfy"
url = "{receiver.base}/corral-alerts"

[[notify]]
name = "down"
kind = "webhook"
url = "{dead}"

[[notify]]
name = "unsigned"
kind = "webhook"
url = "{receiver.base}/unsigned"
secret_env = "NOT_SET_ANYWHERE"
""",
    )
    embedded_cli.env["HOOK_SECRET"] = SECRET
    done = embedded_cli("notify", "test")
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    assert lines[0].startswith("ok     hook: 127.0.0.1 answered 200")
    assert lines[1].startswith("ok     slack:127.0.0.1") and lines[2].startswith("ok     ntfy:127.0.0.1")
    assert lines[3].startswith("error  down: cannot reach 127.0.0.1") and "check the url" in lines[3]
    assert lines[4].startswith("error  unsigned: environment variable NOT_SET_ANYWHERE") and "export" in lines[4]
    assert "2 of 5 notification targets failed" in done.stderr
    assert SLACK_TOKEN not in done.stdout + done.stderr

    (hook,) = receiver.at("/hook")
    assert signature_ok(hook) and not signature_ok(hook, "another secret")
    body = json.loads(hook["body"])
    assert body["test"] is True and body["approval_id"] == "AP-TEST00"
    assert body["commands"] == ["corral approve AP-TEST00", "corral reject AP-TEST00"]
    assert body["link"] == "https://corral.example.com/api/executions/EX-TEST"
    assert body["decision_url"] == "https://corral.example.com/api/approvals/AP-TEST00/decision"
    assert hook["headers"]["X-Corral-Event"] == "approval.requested"
    assert receiver.at("/unsigned") == []  # nothing is sent unsigned

    (slack,) = receiver.at(f"/services/T000/B000/{SLACK_TOKEN}")
    message = json.loads(slack["body"])
    assert message["text"] == "Corral: test notification"
    texts = json.dumps(message["blocks"])
    assert "`corral approve AP-TEST00`" in texts and "`corral reject AP-TEST00`" in texts
    assert "may the agent deploy to staging?" in texts and "EX-TEST" in texts
    assert "X-Corral-Signature" not in slack["headers"]

    (ntfy,) = receiver.at("/corral-alerts")
    assert ntfy["headers"]["Title"] == "Corral: test notification"
    assert ntfy["headers"]["Priority"] == "high" and ntfy["headers"]["Tags"] == "corral,question"
    assert b"$ corral approve AP-TEST00" in ntfy["body"] and b"may the agent deploy" in ntfy["body"]

    listing = json.loads(embedded_cli("notify", "list", "--json", check=True).stdout)
    assert [t["name"] for t in listing] == ["hook", "slack:127.0.0.1", "ntfy:127.0.0.1", "down", "unsigned"]
    assert [t["signed"] for t in listing] == [True, False, False, False, False]
    assert SLACK_TOKEN not in json.dumps(listing)

    write_config(embedded_cli, f'[[notify]]\nkind = "ntfy"\nurl = "{receiver.base}/only"\n')
    done = embedded_cli("notify", "test", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["ok"] is True


# --- the notifier actor: retries, filters, once across instances ------------------------------------


async def _notifier_bus(nats_server: EmbeddedServer, credentials: CredentialSet, name: str) -> Bus:
    return await connect_bus(nats_server.url, name=name, credentials=credentials.get("notifier"))


def _event(execution_id: str, data: EventData, actor: str = "approver-test-1") -> Event:
    return new_event(execution_id, data, actor=actor)


async def _notifications(bus: Bus) -> list[Event]:
    found: list[Event] = []

    async def handle(_seq: int, msg: Any) -> bool:
        found.append(decode_event(msg.data))
        return False

    info = await bus.js.stream_info("CORRAL", subjects_filter="corral.evt.*.notification.*")
    if info.state.subjects:
        await follow(bus.js, "corral.evt.*.notification.*", handle, stop_when_caught_up=True)
    return found


async def _until(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_two_notifiers_deliver_once_retry_and_filter(
    bus: Bus,
    nats_server: EmbeddedServer,
    credentials: CredentialSet,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    base = receiver.base
    targets = [
        Target(name="all", kind="webhook", url=f"{base}/all", events=("approval.requested", "execution.exited"),
               secret_env="HOOK_SECRET"),
        Target(name="flaky", kind="webhook", url=f"{base}/flaky", events=("approval.requested",)),
        Target(name="red", kind="webhook", url=f"{base}/red", events=("approval.requested",), labels={"team": "red"}),
        Target(name="fast", kind="ntfy", url=f"{base}/fast", events=("approval.requested", "execution.exited"),
               templates=("fast",)),
        Target(name="slack", kind="slack", url=f"{base}/services/T/B/{SLACK_TOKEN}", events=("approval.requested",)),
    ]  # fmt: skip
    receiver.script["/flaky"] = [500, 500]  # the first event's first two attempts fail, its third passes
    buses = [await _notifier_bus(nats_server, credentials, f"notifier-{i}") for i in range(2)]
    notifiers = [Notifier(b, targets, instance=f"notifier-test-{i}", backoff_s=0.05) for i, b in enumerate(buses)]
    try:
        for n in notifiers:
            await n.start()
        red, fast = "EX-RED", "EX-FAST"
        await bus.publisher.publish(
            _event(red, ExecutionRequested(command=("true",), repo="/r", labels={"team": "red"}, task="paint it"),
                   actor="operator")
        )  # fmt: skip
        await bus.publisher.publish(
            _event(fast, ExecutionRequested(command=("true",), repo="/r", template="fast"), actor="operator")
        )
        approvals = [
            _event(red if i % 2 else fast, ApprovalRequested(approval_id=f"AP-{i:06d}", question=f"q{i}?"))
            for i in range(20)
        ]
        first = approvals[0]
        await bus.publisher.publish(first)
        await _until(lambda: len(receiver.at("/flaky")) == 1, "the flaky endpoint's third attempt")
        for event in approvals[1:]:
            await bus.publisher.publish(event)
        await bus.publisher.publish(_event(fast, Output(stream="stdout", n=1, text="noise"), actor="spawner-t-1"))
        await bus.publisher.publish(_event(red, ExecutionExited(exit_code=0, duration_s=1.0), actor="spawner-t-1"))
        await bus.publisher.publish(_event(red, ExecutionExited(exit_code=90, duration_s=1.0), actor="spawner-t-1"))
        await bus.publisher.publish(
            _event(red, ExecutionExited(exit_code=None, signal=15, reason="cancelled", duration_s=1.0), actor="s-1")
        )
        failed_exit = _event(fast, ExecutionExited(exit_code=3, duration_s=1.0), actor="spawner-t-1")
        await bus.publisher.publish(failed_exit)

        await _until(lambda: len(receiver.at("/all")) == 21, "every approval and the failed exit at /all")
        await _until(lambda: len(receiver.at("/flaky")) == 20, "every approval at /flaky")
        await _until(lambda: len(receiver.at("/red")) == 10 and len(receiver.at("/fast")) == 11, "the filtered ones")
        await _until(lambda: len(receiver.at(f"/services/T/B/{SLACK_TOKEN}")) == 20, "slack")
        await _until(lambda: sum(n.sent for n in notifiers) == 21 + 20 + 10 + 11 + 20, "every record")
        await asyncio.sleep(1.0)  # anything sent twice would show by now

        def ids(path: str) -> list[str]:
            return [r["headers"].get("X-Corral-Delivery") or "" for r in receiver.at(path)]

        every = sorted(e.id for e in approvals)
        assert sorted(ids("/all")) == sorted([*every, failed_exit.id])  # once each; exits 0, 90, cancelled not told
        assert sorted(ids("/flaky")) == every
        assert sorted(ids("/red")) == sorted(e.id for e in approvals if e.execution_id == red)
        assert all(signature_ok(r) for r in receiver.at("/all"))
        assert all(b"Task: paint it" in r["body"] for r in receiver.at("/red"))
        fast_titles = sorted(r["headers"]["Title"] for r in receiver.at("/fast"))
        assert fast_titles[0] == "Approval needed: EX-FAST" and fast_titles[-1] == "Exited: EX-FAST (exit code 3)"
        assert not any(r["status"] >= 300 for r in receiver.received if r["path"] != "/flaky")
        assert min(n.sent for n in notifiers) > 0  # both instances claimed work

        records = await _notifications(bus)
        sent = [e.data for e in records if isinstance(e.data, NotificationSent)]
        failed = [e.data for e in records if isinstance(e.data, NotificationFailed)]
        assert len(sent) == 82 and len({(s.target, s.event_id) for s in sent}) == 82
        assert [(f.target, f.event_id, f.attempt, f.status_code, f.final) for f in failed] == [
            ("flaky", first.id, 1, 500, False),
            ("flaky", first.id, 2, 500, False),
        ]
        assert failed[0].retry_in_s == 0.05 and failed[1].retry_in_s == 0.1
        (third,) = [s for s in sent if s.target == "flaky" and s.event_id == first.id]
        assert third.attempt == 3 and third.status_code == 200
        assert all(e.actor.startswith("notifier-test-") and e.causation_id for e in records)
        raw = b"".join(e.to_bytes() for e in records)
        assert SLACK_TOKEN.encode() not in raw and SECRET.encode() not in raw and b"/services/" not in raw

        # A claim redelivered after its instance died: the targets already served are skipped.
        before = len(receiver.received)
        assert await notifiers[0].deliver(first, redelivered=True) == 0
        assert len(receiver.received) == before
    finally:
        for n in notifiers:
            await n.stop()
        for b in buses:
            await b.close()


async def test_a_failing_target_gives_up_after_the_last_attempt(
    bus: Bus, nats_server: EmbeddedServer, credentials: CredentialSet, receiver: Receiver
) -> None:
    receiver.script["/down"] = [503] * 10
    receiver.script["/gone"] = [404] * 10
    targets = [
        Target(name="down", kind="webhook", url=f"{receiver.base}/down", events=("execution.exited",)),
        Target(name="gone", kind="slack", url=f"{receiver.base}/gone", events=("execution.exited",)),
        Target(name="nosecret", kind="webhook", url=f"{receiver.base}/x", events=("execution.exited",),
               secret_env="CORRAL_TEST_UNSET_SECRET"),
    ]  # fmt: skip
    nbus = await _notifier_bus(nats_server, credentials, "notifier")
    notifier = Notifier(nbus, targets, attempts=3, backoff_s=0.01)
    try:
        await notifier.start()
        exited = _event("EX-DOWN", ExecutionExited(exit_code=None, signal=9, duration_s=2.0), actor="spawner-t-1")
        await bus.publisher.publish(exited)
        await _until(lambda: notifier.failed == 5, "3 attempts at /down, 1 at /gone (404), 1 without secret")
        await asyncio.sleep(0.5)
        records = [e.data for e in await _notifications(bus)]
        failed = sorted(
            (f.target, f.attempt, f.status_code, f.final) for f in records if isinstance(f, NotificationFailed)
        )
        assert failed == [
            ("down", 1, 503, False),
            ("down", 2, 503, False),
            ("down", 3, 503, True),
            ("gone", 1, 404, True),  # a 4xx is not retried
            ("nosecret", 1, None, True),  # nothing sent unsigned, no retry
        ]
        assert len(receiver.received) == 4 and not receiver.at("/x")
        assert not any(isinstance(f, NotificationSent) for f in records)
    finally:
        await notifier.stop()
        await nbus.close()


async def test_a_stopping_notifier_hands_its_claim_to_another(
    bus: Bus, nats_server: EmbeddedServer, credentials: CredentialSet, receiver: Receiver
) -> None:
    """`corral down` on one host while it waits to retry: another host's notifier sends it, once."""
    receiver.script["/x"] = [503]
    target = Target(name="x", kind="webhook", url=f"{receiver.base}/x", events=("execution.failed",))
    buses = [await _notifier_bus(nats_server, credentials, f"notifier-{i}") for i in range(2)]
    first = Notifier(buses[0], [target], instance="notifier-first", backoff_s=60.0)
    second = Notifier(buses[1], [target], instance="notifier-second", backoff_s=0.01)
    try:
        await first.start()
        failed = _event("EX-STOP", ExecutionFailed(stage="spawn", error="no such file"), actor="spawner-t-1")
        await bus.publisher.publish(failed)
        await _until(lambda: first.failed == 1, "the first attempt (503)")
        await second.start()
        await first.stop()  # waits a moment for its retry, then gives the claim back
        await _until(lambda: second.sent == 1, "the second notifier's delivery")
        await asyncio.sleep(0.5)
        assert [r["status"] for r in receiver.received] == [503, 200]
        records = [(e.actor, type(e.data).__name__) for e in await _notifications(bus)]
        assert records == [("notifier-first", "NotificationFailed"), ("notifier-second", "NotificationSent")]
    finally:
        for n in (first, second):
            await n.stop()
        for b in buses:
            await b.close()


async def test_an_old_event_is_not_sent(
    bus: Bus, nats_server: EmbeddedServer, credentials: CredentialSet, receiver: Receiver
) -> None:
    """A notifier that was down for hours does not page anyone about what is long over."""
    target = Target(name="t", kind="webhook", url=f"{receiver.base}/t", events=("approval.requested",))
    nbus = await _notifier_bus(nats_server, credentials, "notifier")
    notifier = Notifier(nbus, [target])
    try:
        await notifier.start()
        old = new_event(
            "EX-OLD",
            ApprovalRequested(approval_id="AP-OLD000", question="?"),
            actor="approver-test-1",
            ts=datetime(2020, 1, 1, tzinfo=UTC),
        )
        fresh = _event("EX-NEW", ApprovalRequested(approval_id="AP-NEW000", question="?"))
        await bus.publisher.publish(old)
        await bus.publisher.publish(fresh)
        await _until(lambda: len(receiver.at("/t")) == 1, "the fresh event")
        await _until(lambda: notifier.stale == 1, "the old one dropped")
        assert receiver.at("/t")[0]["headers"]["X-Corral-Delivery"] == fresh.id
        await notifier.stop()

        # Restarted with more event types: the shared consumer is updated, not replaced (nothing replayed).
        wider = Target(name="t", kind="webhook", url=f"{receiver.base}/t", events=("approval.requested", "pr.failed"))
        notifier = Notifier(nbus, [wider])
        await notifier.start()
        info = await nbus.js.consumer_info("CORRAL", "notifier")
        assert sorted(info.config.filter_subjects or []) == [
            "corral.evt.*.approval.requested",
            "corral.evt.*.pr.failed",
        ]
        assert DeliverPolicy(info.config.deliver_policy) == DeliverPolicy.NEW
        await asyncio.sleep(1.0)
        assert len(receiver.at("/t")) == 1
    finally:
        await notifier.stop()
        await nbus.close()


# --- the bus: nobody else touches the notifier's durable; the notifier records nothing else ----------

OTHER_ROLES = ("spawner", "watchdog", "checkpointer", "validator", "approver", "projector", "tap", "operator", "api")


async def test_the_notifier_durable_and_role_hold_under_attack(
    bus: Bus, nats_server: EmbeddedServer, credentials: CredentialSet, receiver: Receiver
) -> None:
    """Switch notifications off (rewrite the filter, delete, pause) or steal them (fetch): refused for
    every other role; the notifier itself may not request executions, decide, or forge approvals."""
    from tests.test_attacks_bus import FOREVER, attacker

    target = Target(name="t", kind="webhook", url=f"{receiver.base}/t", events=("approval.requested",))
    nbus = await _notifier_bus(nats_server, credentials, "notifier")
    notifier = Notifier(nbus, [target])
    await notifier.start()
    await notifier.stop()  # its durable stays
    stream = "CORRAL"
    config = {"name": "notifier", "filter_subject": "corral.evt.*.nothing", "ack_policy": "explicit"}
    body: dict[str, Any] = {"stream_name": stream, "config": {**config, "durable_name": "notifier"}}
    try:
        for role in OTHER_ROLES:
            me = await attacker(nats_server, credentials, role)
            try:
                results = {
                    "named": await me.attempt(f"$JS.API.CONSUMER.CREATE.{stream}.notifier", body),
                    "named+filter": await me.attempt(f"$JS.API.CONSUMER.CREATE.{stream}.notifier.corral.evt.*.x", body),
                    "delete": await me.attempt(f"$JS.API.CONSUMER.DELETE.{stream}.notifier"),
                    "fetch": await me.attempt(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.notifier", {"batch": 1}),
                    "pause": await me.attempt(f"$JS.API.CONSUMER.PAUSE.{stream}.notifier", {"pause_until": FOREVER}),
                    "record": await me.publish("corral.evt.atk00001.notification.sent", b"{}"),
                }
                assert results == dict.fromkeys(results, "refused"), (role, results)
            finally:
                await me.nc.close()
        info = await bus.js.consumer_info(stream, "notifier")
        assert info.config.filter_subjects == ["corral.evt.*.approval.requested"]

        me = await attacker(nats_server, credentials, "notifier")
        try:
            for kind in ("execution.requested", "approval.granted", "approval.requested", "cancel.requested"):
                assert await me.publish(f"corral.evt.atk00001.{kind}", b"{}") == "refused", kind
            assert await me.publish("corral.api.approval.decide.operator", b"{}") == "refused"
        finally:
            await me.nc.close()
    finally:
        await nbus.close()


# --- end to end: corral up, a real agent asking, a real failure ---------------------------------------


def test_two_corral_up_hosts_notify_an_approval_and_failed_exits_once(cli: Cli, repo: Path, receiver: Receiver) -> None:
    """Two `corral up` on one NATS (another host's home, with the system's credentials file), both
    with the same [[notify]]: a real agent's approval and real failed exits reach the webhook once each."""
    config = f"""
[[notify]]
name = "ops"
kind = "webhook"
url = "{receiver.base}/ops"
secret_env = "HOOK_SECRET"
"""
    write_config(cli, config)
    cli.env["HOOK_SECRET"] = SECRET
    home = cli.home.parent / "other-host"
    other = Cli(home, {**cli.env, "CORRAL_HOME": str(home), "CORRAL_NATS_CREDS": str(cli.home / "credentials.json")})
    up = start_up(cli)
    write_config(other, config)
    second = start_up(other, "--actors", "notifier")
    try:
        asking = detach(cli, repo, *agent_command("deploy", "--ask-approval", "deploy", "--steps", "1"))

        def told(kind: str, execution_id: str) -> list[dict[str, Any]]:
            found = []
            for request in receiver.at("/ops"):
                body = json.loads(request["body"])
                if body["event"]["type"] == kind and body["execution"]["id"] == execution_id:
                    found.append(request)
            return found

        wait_until(lambda: told("approval.requested", asking), 60, "the approval's notification")
        request = told("approval.requested", asking)[0]
        assert signature_ok(request)
        body = json.loads(request["body"])
        approval_id = body["approval_id"]
        assert approval_id.startswith("AP-") and body["commands"][0] == f"corral approve {approval_id}"
        assert body["event"]["data"]["category"] == "deploy" and body["event"]["data"]["question"]
        cli("approve", approval_id, "--choice", "yes", check=True)

        # The agent inherits `corral up`'s environment, but not the webhook secret: it cannot sign.
        failing = [detach(cli, repo, "--", "sh", "-c", f'echo "secret=[$HOOK_SECRET]"; exit {3 + n}') for n in range(4)]
        wait_until(lambda: all(told("execution.exited", e) for e in failing), 60, "the failed exits' notifications")
        assert "secret=[]" in cli("logs", failing[0]).stdout

        def recorded() -> list[dict[str, Any]]:
            query = "SELECT execution_id, data FROM events WHERE type = 'notification.sent'"
            return json.loads(cli("sql", query, "--json", check=True).stdout)  # type: ignore[no-any-return]

        wait_until(lambda: {r["execution_id"] for r in recorded()} >= {asking, *failing}, 30, "the records")
        time.sleep(1.0)  # a second delivery would show by now
        for n, execution_id in enumerate(failing):
            (exited,) = told("execution.exited", execution_id)
            assert json.loads(exited["body"])["event"]["data"]["exit_code"] == 3 + n
        assert len(told("approval.requested", asking)) == 1 and told("execution.exited", asking) == []  # it exited 0
        assert len(receiver.at("/ops")) == 5
        assert sorted(r["execution_id"] for r in recorded()) == sorted([asking, *failing])
        assert {json.loads(r["data"])["target"] for r in recorded()} == {"ops"}
        health = json.loads(cli("health", "--json").stdout)
        notifiers = [a for a in health["actors"] if a["actor"] == "notifier" and a["alive"]]
        assert {a["pid"] for a in notifiers} == {up.pid, second.pid} and {a["targets"] for a in notifiers} == {1}
    finally:
        stop_up(other, second)
        stop_up(cli, up)
