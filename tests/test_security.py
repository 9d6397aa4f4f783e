"""Security: NATS users per actor role, authenticated approvers, credentials off command lines, secret redaction.

Every test runs against a real nats-server started with Corral's users (tests/conftest.py); the
permission checks publish for real and read the server's refusal.
"""

import asyncio
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError

from actors.approver import Approver, DecisionRefused, approval_id_for, decision_api, submit_decision
from actors.bus import Bus, connect_bus
from actors.policy import Policy
from actors.redact import Redactor, is_secret_name, secret_values
from corral.server import EmbeddedServer
from events.auth import ROLES, CredentialSet, ensure_credentials, operator_role, read_credentials, render_auth_conf
from events.envelope import new_event
from events.errors import PublishError
from events.types import (
    EVENT_TYPES,
    ApprovalDecisionSubmitted,
    ApprovalNeeded,
    ExecutionStarted,
    PauseRequested,
    ValidationPassed,
)
from replay.history import follow
from tests.conftest import ROOT, Cli, agent_command, cli_environment
from tests.test_control import start_up, stop_up, wait_until

NOT_PUBLISHED_YET = {"replay.diverged"}  # docs/events.md: no actor records it yet


# --- the permission table ------------------------------------------------------------------------


def test_shipped_auth_file_is_the_rendered_table() -> None:
    """nats-auth.conf beside nats.conf is render_auth_conf()'s output: one source for the permissions."""
    assert (ROOT / "nats-auth.conf").read_text() == render_auth_conf()
    assert 'include "nats-auth.conf"' in (ROOT / "nats.conf").read_text()


def test_every_event_type_has_a_publisher() -> None:
    """A new event type nobody may publish would be refused at runtime: the table must name its role."""
    granted = set()
    for role in [*ROLES.values(), operator_role("operator")]:
        granted |= {p.split(".", 3)[3] for p in role.publish if p.startswith("corral.evt.*.")}
    assert set(EVENT_TYPES) - granted == NOT_PUBLISHED_YET
    assert not {p for p in operator_role("alice").publish if p.startswith("corral.api.approval.decide.")} - {
        "corral.api.approval.decide.alice"
    }


def test_secret_names() -> None:
    for name in ("OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "db_password", "APIKEY"):
        assert is_secret_name(name), name
    for name in ("PATH", "HOME", "KEYBOARD_LAYOUT", "TOKENIZER_PATH", "CORRAL_EXECUTION_ID"):
        assert not is_secret_name(name), name
    assert is_secret_name("DEPLOY_CREDS", ("DEPLOY_CREDS",))
    assert secret_values({"A_TOKEN": "abc", "B_TOKEN": "long-enough-value", "PATH": "/usr/bin"}) == [
        "long-enough-value"
    ]


def test_redactor_joins_a_secret_split_across_reads() -> None:
    secret = "sk-" + secrets.token_hex(16)
    redactor = Redactor([secret])
    text = f"key={secret}\nagain {secret}, and a prefix at the end: {secret[:5]}"
    out = b""
    for i in range(0, len(text), 7):  # every secret is cut at least once
        out += redactor.feed(text[i : i + 7].encode())
    out += redactor.finish()
    assert secret.encode() not in out
    assert out.decode() == f"key=***\nagain ***, and a prefix at the end: {secret[:5]}"


# --- roles against a real server ---------------------------------------------------------------------


async def as_role(server: EmbeddedServer, credentials: CredentialSet, user: str) -> Bus:
    return await connect_bus(server.url, name=f"test-{user}", credentials=credentials.get(user))


async def refused(bus: Bus, execution_id: str, data: object) -> bool:
    try:
        await asyncio.wait_for(bus.emit(execution_id, data, actor="test"), 20)  # type: ignore[arg-type]
    except PublishError as exc:
        return "may not publish" in str(exc)
    return False


async def test_each_role_does_its_job_and_nothing_else(
    nats_server: EmbeddedServer, credentials: CredentialSet, bus: Bus
) -> None:
    tap = await as_role(nats_server, credentials, "tap")
    validator = await as_role(nats_server, credentials, "validator")
    operator = await as_role(nats_server, credentials, "operator")
    spawner = await as_role(nats_server, credentials, "spawner")
    try:
        # tap reads the log but requests nothing
        assert await refused(tap, "sec00001", PauseRequested(reason="tap", requested_by="tap"))
        # the validator records validations, not the spawner's facts
        assert await refused(validator, "sec00001", ExecutionStarted(pid=1, pgid=1, host="h", command=("x",), cwd="/"))
        await validator.emit(
            "sec00001", ValidationPassed(checkpoint=1, policy_version="v1", duration_ms=1.0), actor="validator"
        )
        # the spawner records what the agent does; the operator asks for control actions
        await spawner.emit("sec00001", ExecutionStarted(pid=1, pgid=1, host="h", command=("x",), cwd="/"), actor="s")
        await operator.emit("sec00001", PauseRequested(reason="test", requested_by="alice"), actor="cli")
        # nobody but the approver records a decision in the log
        forged = ApprovalDecisionSubmitted(approval_id="AP-XXXXXX", approve=True, decided_by="mallory")
        assert await refused(operator, "sec00001", forged)

        seen: list[str] = []

        async def on_msg(seq: int, msg: object) -> bool:
            seen.append(msg.subject.split(".", 3)[3])  # type: ignore[attr-defined]
            return False

        await follow(tap.js, "corral.evt.sec00001.>", on_msg, stop_when_caught_up=True)
        assert seen == ["validation.passed", "execution.started", "pause.requested"]
    finally:
        for connection in (tap, validator, operator, spawner):
            await connection.close()


async def test_wrong_or_missing_credentials_are_refused(nats_server: EmbeddedServer) -> None:
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(nats_server.url, user="operator", password="wrong", allow_reconnect=False)
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(nats_server.url, allow_reconnect=False)


async def test_decided_by_is_the_authenticated_user(tmp_path: Path, bus: Bus) -> None:
    """alice's decision records alice, whatever the payload claims; she cannot use bob's subject."""
    credentials = ensure_credentials(tmp_path / "multi", ["alice", "bob"])
    server = EmbeddedServer(tmp_path / "multi-store", log_file=tmp_path / "multi.log", credentials=credentials).start()
    admin = await connect_bus(server.url, credentials=credentials.get("admin"))  # provisions the stream
    approver_bus = await connect_bus(server.url, credentials=credentials.get("approver"))
    alice = await connect_bus(server.url, credentials=credentials.get("alice"))
    approver = Approver(approver_bus, Policy())
    await approver.start()
    try:
        needed = new_event("sec00002", ApprovalNeeded(question="ship it?", category="deploy"), actor="test")
        await admin.publisher.publish(needed)
        approval_id = approval_id_for(needed.id)
        await asyncio.wait_for(_until(lambda: approval_id in approver.book.approvals), 30)

        claim = ApprovalDecisionSubmitted(approval_id=approval_id, approve=True, note="lgtm", decided_by="bob")
        record = await submit_decision(alice, "sec00002", claim)
        assert record["decided_by"] == "alice"
        await asyncio.wait_for(_until(lambda: approver.book.approvals[approval_id].state == "granted"), 30)
        assert approver.book.approvals[approval_id].decided_by == "alice"

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        creds = credentials.get("alice")
        assert creds is not None
        raw = await nats.connect(server.url, user=creds.user, password=creds.password, error_cb=on_error)
        try:
            await raw.publish(decision_api("bob"), b"{}")
            await raw.flush()
            await asyncio.wait_for(_until(lambda: bool(errors)), 10)
        finally:
            await raw.close()
        assert 'permissions violation for publish to "corral.api.approval.decide.bob"' in errors[0]

        with pytest.raises(DecisionRefused, match="not a decision"):
            await submit_decision(alice, "NOT AN ID", claim)
    finally:
        await approver.stop()
        for connection in (alice, admin, approver_bus):
            await connection.close()
        server.stop()


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(100000):
        if predicate():
            return
        await asyncio.sleep(0.05)


# --- the CLI, end to end ----------------------------------------------------------------------------


def _home_cli(tmp_path: Path, toml: str = "") -> Cli:
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    if toml:
        (home / "corral.toml").write_text(toml)
    env = cli_environment(CORRAL_HOME=str(home))
    env.pop("CORRAL_NATS_URL", None)
    return Cli(home, env)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_credentials_stay_off_command_lines_and_out_of_agents(tmp_path: Path, repo: Path) -> None:
    cli = _home_cli(tmp_path, '[security]\noperators = ["alice", "bob"]\n')
    up = start_up(cli)
    try:
        credentials_file = cli.home / "credentials.json"
        assert credentials_file.stat().st_mode & 0o777 == 0o600
        passwords = [p.encode() for p in read_credentials(credentials_file).users.values()]
        # 8 actors (notifier, conductor included), tap, api, provisioner, alice and bob (no default `operator`), admin
        assert len(passwords) == 14
        runtime = json.loads((cli.home / "runtime.json").read_text())
        for pid in (runtime["server_pid"], up.pid):
            line = _cmdline(pid)
            assert line and not any(p in line for p in passwords), pid
        for conf in (cli.home / "nats-conf").iterdir():
            assert not any(p in conf.read_bytes() for p in passwords), conf
        assert b"user: alice" in (cli.home / "nats-conf" / "nats-auth.conf").read_bytes()

        # an agent gets none of Corral's credentials in its environment
        script = "import os; print(sorted(k for k in os.environ if k.startswith('CORRAL_')))"
        env = {
            **cli.env,
            "CORRAL_NATS_USER": "alice",
            "CORRAL_NATS_PASSWORD": read_credentials(credentials_file).users["alice"],
        }
        result = Cli(cli.home, env)("run", "--repo", str(repo), "-q", "--", sys.executable, "-c", script, check=True)
        assert "CORRAL_EXECUTION_ID" in result.stdout
        assert "NATS" not in result.stdout and "CORRAL_PASS" not in result.stdout
    finally:
        stop_up(cli, up)
    log = (cli.home / "nats-server.log").read_text()
    assert "Violation" not in log, log[-2000:]


AGENT_PRINTING_SECRETS = """
import os, sys, time
key, creds = os.environ["MY_API_KEY"], os.environ["DEPLOY_CREDS"]
print("whole:", key, flush=True)
sys.stdout.write("split:" + key[:9]); sys.stdout.flush(); time.sleep(0.4)
sys.stdout.write(key[9:] + "|\\n"); sys.stdout.flush()
sys.stderr.write("creds on stderr: " + creds + "\\n"); sys.stderr.flush()
print("done")
"""


def test_secret_values_never_reach_the_log(tmp_path: Path, repo: Path) -> None:
    key, creds = "sk-" + secrets.token_hex(20), "c-" + secrets.token_hex(12)
    cli = _home_cli(tmp_path, '[security]\nsecret_env = ["DEPLOY_CREDS"]\n')
    cli = Cli(cli.home, {**cli.env, "MY_API_KEY": key, "DEPLOY_CREDS": creds})

    # a secret's value on the command line is refused before anything is recorded
    bad = cli("run", "--repo", str(repo), "--env", f"MY_API_KEY={key}", "--", sys.executable, "-c", "pass")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "never written into the event log" in bad.stderr
    assert key not in bad.stderr

    run = cli("run", "--repo", str(repo), "--env", "MY_API_KEY=***", "--", sys.executable, "-c", AGENT_PRINTING_SECRETS)
    assert run.returncode == 0, run.stderr
    assert "whole: ***" in run.stdout and "split:***|" in run.stdout and "done" in run.stdout
    execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]

    logs = cli("logs", execution_id, check=True).stdout
    count = json.loads(cli("sql", "SELECT count(*) AS n FROM events", "--json", check=True).stdout)[0]["n"]
    log = cli("tap", "--since", "all", "--limit", str(count), check=True).stdout  # every event of the log
    assert len(log.splitlines()) == count
    errors = cli("logs", "--stream", "stderr", execution_id, check=True).stdout
    assert "split:***|" in logs and "creds on stderr: ***" in errors
    for text in (run.stdout, run.stderr, logs, errors, log):
        assert key not in text and creds not in text
        assert key[:9] + key[9:] not in text
    requested = [json.loads(line) for line in log.splitlines() if '"execution.requested"' in line]
    assert requested[0]["data"]["env"] == {"MY_API_KEY": "***"}
    for path in (cli.home / "corral.duckdb",):
        assert key.encode() not in path.read_bytes()


def test_approval_decided_by_operator_user_end_to_end(tmp_path: Path, repo: Path) -> None:
    """`corral up` with two operators: alice approves from her own environment; the record says alice."""
    cli = _home_cli(tmp_path, '[security]\noperators = ["alice", "bob"]\n')
    up = start_up(cli)
    try:
        users = read_credentials(cli.home / "credentials.json").users
        alice = Cli(cli.home, {**cli.env, "CORRAL_NATS_USER": "alice", "CORRAL_NATS_PASSWORD": users["alice"]})
        execution_id = alice(
            "run", "--repo", str(repo), "--detach",
            *agent_command("ship", "--ask-approval", "deploy", "--steps", "1"),
            check=True,
        ).stdout.strip()  # fmt: skip

        def pending() -> str | None:
            rows = json.loads(alice("approvals", "--json", check=True).stdout)
            return next((r["approval_id"] for r in rows if r["execution_id"] == execution_id), None)

        approval_id = wait_until(pending, 60, "the approval")
        done = alice("approve", str(approval_id), "--choice", "yes", check=True)
        assert f"{approval_id}: answered 'yes'" in done.stdout
        rows = json.loads(alice("approvals", "--all", "--json", check=True).stdout)
        decided = next(r for r in rows if r["approval_id"] == approval_id)
        assert decided["state"] == "granted" and decided["decided_by"] == "alice"

        wrong = Cli(cli.home, {**cli.env, "CORRAL_NATS_USER": "bob", "CORRAL_NATS_PASSWORD": "not-bobs"})
        refused = wrong("approvals")
        assert refused.returncode != 0 and "refused user 'bob'" in refused.stderr
    finally:
        stop_up(cli, up)
    assert "Violation" not in (cli.home / "nats-server.log").read_text()


def test_home_without_credentials_talks_to_a_server_without_users(tmp_path: Path, repo: Path) -> None:
    """CORRAL_NATS_URL at a server with no users, no credentials anywhere: Corral connects without."""
    server = EmbeddedServer(tmp_path / "plain-store", log_file=tmp_path / "plain.log").start()
    try:
        env = cli_environment(CORRAL_HOME=str(tmp_path / "plain-home"), CORRAL_NATS_URL=server.url)
        result = Cli(tmp_path / "plain-home", env)(
            "run", "--repo", str(repo), "-q", "--", sys.executable, "-c", "print('plain')"
        )
        assert result.returncode == 0 and "plain" in result.stdout, result.stderr
        assert not (tmp_path / "plain-home" / "credentials.json").exists()
    finally:
        server.stop()


def test_bad_credentials_file_is_one_clear_error(tmp_path: Path) -> None:
    cli = _home_cli(tmp_path)
    (cli.home / "credentials.json").write_text("{not json")
    result = cli("ps")
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "not a Corral credentials file" in result.stderr and "remove it" in result.stderr
    assert not os.path.exists(cli.home / "runtime.json")
