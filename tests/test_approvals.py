"""Human approvals through the CLI against a real `corral up`: agents asking, deciders racing, expiry, restarts."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import orjson

from actors.approver import APPROVAL_EVENTS, ApprovalBook, Approver, approval_id_for
from actors.bus import Bus
from actors.policy import Policy
from events.envelope import new_event
from events.types import ApprovalDecisionSubmitted, ApprovalNeeded
from replay.history import follow
from tests.conftest import Cli, agent_command
from tests.test_control import detach, events, start_up, stop_up, wait_state, wait_until


def pending(cli: Cli, execution_id: str) -> dict | None:
    rows = json.loads(cli("approvals", "--json", check=True).stdout)
    return next((r for r in rows if r["execution_id"] == execution_id and r["state"] == "pending"), None)


def wait_pending(cli: Cli, execution_id: str) -> dict:
    return wait_until(lambda: pending(cli, execution_id), 60, f"an approval of {execution_id}")  # type: ignore[return-value]


def logs(cli: Cli, execution_id: str) -> str:
    return cli("logs", execution_id).stdout


def test_agent_asks_is_registered_and_resumes_after_approve(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("deploy the site", "--ask-approval", "deploy", "--steps", "1"))
        approval = wait_pending(cli, execution_id)
        assert approval["approval_id"].startswith("AP-")
        assert approval["category"] == "deploy" and approval["source"] == "agent"
        assert approval["options"] == ["yes", "no"]
        wait_until(lambda: f"waiting for {approval['approval_id']}" in logs(cli, execution_id), what="registration")
        listing = cli("approvals", check=True).stdout
        assert approval["approval_id"] in listing and "deploy" in listing

        bad_choice = cli("approve", approval["approval_id"], "--choice", "maybe")
        assert bad_choice.returncode == 2 and bad_choice.stderr.count("\n") == 1 and "yes, no" in bad_choice.stderr

        done = cli("approve", approval["approval_id"].lower(), "--choice", "yes", "--note", "go", check=True)
        assert f"{approval['approval_id']}: answered 'yes'" in done.stdout
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        assert f"{approval['approval_id']} approved choice=yes" in logs(cli, execution_id)
        granted = [e for e in events(cli, execution_id) if e["type"] == "approval.granted"]
        assert len(granted) == 1
        assert json.loads(granted[0]["data"])["decided_by"]

        again = cli("reject", approval["approval_id"])
        assert again.returncode == 1 and again.stderr.count("\n") == 1
        assert "already decided: granted by" in again.stderr
        unknown = cli("approve", "AP-NOPE00")
        assert unknown.returncode == 1 and "no approval" in unknown.stderr
        shown = json.loads(cli("approvals", "--all", "--json", check=True).stdout)
        assert any(r["approval_id"] == approval["approval_id"] and r["state"] == "granted" for r in shown)
    finally:
        stop_up(cli, up)


def test_waiting_for_a_decision_is_not_a_stall(cli: Cli, repo: Path) -> None:
    """The watchdog stops an agent's idle clock while it waits for an approval, and restarts it after."""
    up = start_up(cli)
    try:
        execution_id = detach(
            cli,
            repo,
            "--idle-timeout",
            "1s",
            "--on-stall",
            "cancel",
            *agent_command("ship it", "--ask-approval", "deploy", "--steps", "1", "--sleep", "0"),
        )
        approval = wait_pending(cli, execution_id)
        time.sleep(4)  # four idle timeouts pass while the human thinks
        assert [e["type"] for e in events(cli, execution_id) if e["type"] == "execution.stalled"] == []
        cli("approve", approval["approval_id"], "--choice", "yes", check=True)
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0, final
        assert [e["type"] for e in events(cli, execution_id) if e["type"] == "execution.stalled"] == []
    finally:
        stop_up(cli, up)


def test_reject_tells_the_agent_and_malformed_requests_are_protocol_errors(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        bad = detach(
            cli,
            repo,
            "--",
            "sh",
            "-c",
            'echo \'{"corral": "approval_needed", "options": "x"}\' >&2; sleep 0.3; echo still here',
        )
        wait_state(cli, bad, "exited")
        kinds = [e["type"] for e in events(cli, bad)]
        assert "protocol.error" in kinds and "approval.needed" not in kinds
        assert "still here" in logs(cli, bad)

        execution_id = detach(cli, repo, *agent_command("push", "--ask-approval", "merge", "--steps", "1"))
        approval = wait_pending(cli, execution_id)
        out = cli("reject", approval["approval_id"], "--note", "not today", "--json", check=True)
        assert json.loads(out.stdout)["type"] == "approval.denied"
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 3  # the example agent stops when told no
        assert "rejected" in logs(cli, execution_id)
    finally:
        stop_up(cli, up)


def test_twenty_concurrent_deciders_first_wins(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("race", "--ask-approval", "deploy", "--steps", "1"))
        approval = wait_pending(cli, execution_id)
        deciders = [
            cli.popen(*(("approve", approval["approval_id"]) if i % 2 else ("reject", approval["approval_id"])))
            for i in range(20)
        ]
        results = [
            (p.wait(timeout=120), p.stdout.read() if p.stdout else "", p.stderr.read() if p.stderr else "")
            for p in deciders
        ]
        winners = [r for r in results if r[0] == 0]
        losers = [r for r in results if r[0] != 0]
        assert len(winners) == 1, results
        assert len(losers) == 19
        for _, _, err in losers:
            assert err.count("\n") == 1 and "already decided" in err, err
        outcomes = [e for e in events(cli, execution_id) if e["type"] in ("approval.granted", "approval.denied")]
        assert len(outcomes) == 1
        rejected = [e for e in events(cli, execution_id) if e["type"] == "control.rejected"]
        # Losers that read the log after the decision are refused before publishing anything;
        # the others' submissions are each answered by one control.rejected.
        assert len(rejected) <= 19
        wait_state(cli, execution_id, "exited")
    finally:
        stop_up(cli, up)


def test_expiry_tells_the_agent_and_cancels(cli: Cli, repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('[policy]\napproval_timeout = "2s"\non_expire = "cancel"\n')
    cli.env["CORRAL_CONFIG"] = str(config)
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("wait", "--ask-approval", "deploy", "--steps", "1"))
        wait_until(
            lambda: any(e["type"] == "approval.expired" for e in events(cli, execution_id)),
            60,
            "the approval to expire",
        )
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] != 0
        kinds = [e["type"] for e in events(cli, execution_id)]
        assert "approval.granted" not in kinds
        rows = json.loads(cli("approvals", "--all", "--json", check=True).stdout)
        assert [r["state"] for r in rows if r["execution_id"] == execution_id] == ["expired"]
        late = cli("approve", rows[0]["approval_id"])
        assert late.returncode == 1 and "expired" in late.stderr
    finally:
        stop_up(cli, up)


def test_pending_approval_survives_a_killed_up(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    execution_id = detach(cli, repo, *agent_command("survive", "--ask-approval", "deploy", "--steps", "1"))
    approval = wait_pending(cli, execution_id)
    wait_until(lambda: "waiting for" in logs(cli, execution_id), what="registration")
    os.kill(up.pid, signal.SIGKILL)  # the agent's shim outlives it
    up.wait()
    up = start_up(cli)
    try:
        assert pending(cli, execution_id) is not None
        cli("approve", approval["approval_id"], "--choice", "yes", check=True)
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        assert "approved choice=yes" in logs(cli, execution_id)
    finally:
        stop_up(cli, up)


def test_exit_code_90_is_restarted_with_the_approval(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("tool", "--exit-for-approval", "--steps", "1"))
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 90
        approval = wait_pending(cli, execution_id)
        assert approval["source"] == "exit_code"
        cli("approve", approval["approval_id"], check=True)

        def restarted() -> str | None:
            out = cli(
                "sql",
                f"SELECT execution_id FROM executions WHERE retry_of = '{execution_id}'",
                "--json",
                check=True,
            ).stdout
            rows = json.loads(out)
            return rows[0]["execution_id"] if rows else None

        new_id = str(wait_until(restarted, 60, "the restart"))
        done = wait_state(cli, new_id, "exited")
        assert done["exit_code"] == 0
        assert f"approved by {approval['approval_id']}" in logs(cli, new_id)
    finally:
        stop_up(cli, up)


async def test_two_approvers_twenty_submissions_one_outcome(bus: Bus) -> None:
    """Several approver instances: one outcome per approval, every other submission rejected once."""
    approvers = [Approver(bus, Policy(), instance=f"approver-{i}") for i in range(2)]
    for approver in approvers:
        await approver.start()
    try:
        needed = new_event("race0001", ApprovalNeeded(question="ok?", category="deploy"), actor="test")
        await bus.publisher.publish(needed)
        approval_id = approval_id_for(needed.id)

        for _ in range(600):
            if all(approval_id in a.book.approvals for a in approvers):
                break
            await asyncio.sleep(0.05)
        submissions = [
            new_event(
                "race0001",
                ApprovalDecisionSubmitted(approval_id=approval_id, approve=i % 2 == 0, decided_by=f"user{i}"),
                actor="test",
            )
            for i in range(20)
        ]
        await asyncio.gather(*(bus.publisher.publish(s) for s in submissions))

        async def settled() -> ApprovalBook:
            while True:
                book = ApprovalBook()
                counts = {"rejected": 0}

                async def on_msg(seq: int, msg: object, book: ApprovalBook = book) -> bool:
                    subject = msg.subject  # type: ignore[attr-defined]
                    raw = orjson.loads(msg.data)  # type: ignore[attr-defined]
                    book.apply(subject.split(".")[2], subject.split(".", 3)[3], raw, seq)
                    return False

                await follow(bus.js, APPROVAL_EVENTS, on_msg, stop_when_caught_up=True)

                async def on_rejected(seq: int, msg: object, counts: dict[str, int] = counts) -> bool:
                    counts["rejected"] += 1
                    return False

                await follow(bus.js, "corral.evt.race0001.control.rejected", on_rejected, stop_when_caught_up=True)
                if book.approvals[approval_id].state != "pending" and counts["rejected"] >= 19:
                    await asyncio.sleep(0.5)
                    return book
                await asyncio.sleep(0.1)

        book = await asyncio.wait_for(settled(), 30)
        info = await bus.js.stream_info("CORRAL", subjects_filter="corral.evt.race0001.>")
        subjects = info.state.subjects or {}
        outcomes = subjects.get("corral.evt.race0001.approval.granted", 0) + subjects.get(
            "corral.evt.race0001.approval.denied", 0
        )
        assert outcomes == 1
        assert subjects.get("corral.evt.race0001.control.rejected") == 19
        assert subjects.get("corral.evt.race0001.approval.requested") == 1
        approval = book.approvals[approval_id]
        assert approval.decision_cause == approval.submissions[0][0]  # the first submission in stream order
    finally:
        for approver in approvers:
            await approver.stop()


def test_decision_made_while_no_spawner_runs_reaches_the_agent(cli: Cli, repo: Path) -> None:
    """An approval decided while `corral up` is down is told to the agent by the next spawner, once."""
    up = start_up(cli)
    execution_id = detach(cli, repo, *agent_command("retell", "--ask-approval", "deploy", "--steps", "1"))
    approval = wait_pending(cli, execution_id)
    wait_until(lambda: "waiting for" in logs(cli, execution_id), what="registration")
    os.kill(up.pid, signal.SIGKILL)  # the agent's shim outlives it
    up.wait()
    cli("approve", approval["approval_id"], "--choice", "yes", check=True)  # no spawner runs now
    up = start_up(cli)
    try:
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        assert logs(cli, execution_id).count("approved choice=yes") == 1
        told = [e for e in events(cli, execution_id) if e["type"] == "input.delivered"]
        texts = [json.loads(e["data"])["text"] for e in told]
        assert sum('"approval_registered"' in t for t in texts) == 1  # the re-tell of it was dropped
        assert sum('"approval_decision"' in t for t in texts) == 1
    finally:
        stop_up(cli, up)
