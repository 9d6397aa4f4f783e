"""`corral replay` re-applies the original's recorded approval decisions, or leaves them to a human.

The example agent (examples/agent.py --ask-approval) asks for an approval on stderr and waits on
stdin for the decision; a real `corral up` runs the approver. The original is approved by an operator
through `corral approve`; its replay must then finish with no human decision, the recorded one
applied by the replay itself (its submission answers the replay's own approval request), and
`--ask-approvals` must leave the replay waiting until someone decides through the CLI.
"""

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import Cli, agent_command
from tests.test_approvals import logs, wait_pending
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until

# A replay that waits for a decision nobody gives never ends: the limit only ends such a hang.
REPLAY_LIMIT_S = 120


def events_of(cli: Cli, execution_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        cli(
            "sql",
            "SELECT id, type, actor, causation_id, data FROM events "
            f"WHERE execution_id = '{execution_id}' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )
    for row in rows:
        row["data"] = json.loads(row["data"])
    return rows


def one(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [e for e in events if e["type"] == kind]
    return found


def replay_of(cli: Cli, original: str) -> str:
    def found() -> str | None:
        rows = json.loads(
            cli("sql", f"SELECT execution_id FROM executions WHERE replay_of = '{original}'", "--json").stdout or "[]"
        )
        return rows[0]["execution_id"] if rows else None

    return wait_until(found, 60, f"the replay of {original}")  # type: ignore[return-value]


def last_input_offset(cli: Cli, original: str) -> float:
    rows = json.loads(
        cli("sql", f"SELECT max(offset_s) AS s FROM inputs WHERE execution_id = '{original}'", "--json").stdout
    )
    return float(rows[0]["s"] or 0.0)


def approved_original(cli: Cli, repo: Path) -> tuple[str, dict[str, Any]]:
    """An execution whose agent asked for a `deploy` approval, granted by an operator with a choice and note."""
    original = detach(cli, repo, *agent_command("deploy the site", "--ask-approval", "deploy", "--steps", "1"))
    approval = wait_pending(cli, original)
    cli("approve", approval["approval_id"], "--choice", "yes", "--note", "ship it", check=True)
    assert wait_state(cli, original, "exited")["exit_code"] == 0
    granted = one(events_of(cli, original), "approval.granted")["data"]
    assert (granted["choice"], granted["note"]) == ("yes", "ship it")
    return original, granted


def test_replay_reapplies_the_recorded_decision_without_a_human(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        original, granted = approved_original(cli, repo)
        try:
            replayed = cli("replay", original, timeout=REPLAY_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError("the replay waited for a human: the recorded decision was not re-applied") from None
        assert replayed.returncode == 0, replayed.stderr
        replay = replay_of(cli, original)
        assert wait_state(cli, replay, "exited")["exit_code"] == 0
        events = events_of(cli, replay)
        requested = one(events, "approval.requested")
        submitted = one(events, "approval.decision.submitted")
        decided = one(events, "approval.granted")
        assert [e["type"] for e in events if e["type"] == "approval.denied"] == []
        assert [e for e in events if e["type"] == "input.requested"] == []  # its lines are the replay's own
        # the same decision: granted, with the original's choice and note
        assert (decided["data"]["choice"], decided["data"]["note"]) == ("yes", "ship it")
        assert decided["data"]["approval_id"] == requested["data"]["approval_id"]
        # decided by the replay: its submission answers the replay's own request (a human's `corral
        # approve` names no cause), and the approver granted it because of that submission
        assert submitted["causation_id"] == requested["id"]
        assert decided["causation_id"] == submitted["id"]
        assert (submitted["data"]["approve"], submitted["data"]["choice"]) == (True, "yes")
        assert submitted["data"]["decided_by"] == decided["data"]["decided_by"]
        # (with NATS users the approver records the authenticated user, here the same operator
        # connection a human's `corral approve` uses, so `decided_by` names the user who replayed)
        assert decided["data"]["decided_by"] == granted["decided_by"]
        assert f"{requested['data']['approval_id']} approved choice=yes" in logs(cli, replay)
    finally:
        stop_up(cli, up)


def test_replay_with_ask_approvals_waits_for_a_human_decision(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        original, _ = approved_original(cli, repo)
        process = cli.popen("replay", original, "--ask-approvals", "-q")
        try:
            replay = replay_of(cli, original)
            approval = wait_pending(cli, replay)
            # The original's inputs are its approval lines (`approval_registered` / `approval_decision`
            # on the agent's stdin): let their offsets pass. Re-sent, they would answer this agent
            # with the original's "yes", past --ask-approvals.
            time.sleep(last_input_offset(cli, original) + 3)
            assert process.poll() is None  # still following its execution, which still waits
            assert f"{approval['approval_id']} approved" not in logs(cli, replay)
            # a human decides otherwise this time: refused if the recorded "yes" had been applied
            cli("reject", approval["approval_id"], "--note", "not this time", check=True)
            _, err = process.communicate(timeout=REPLAY_LIMIT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 3, err  # the example agent stops when told no
        events = events_of(cli, replay)
        submitted = one(events, "approval.decision.submitted")
        denied = one(events, "approval.denied")
        assert submitted["causation_id"] is None  # from `corral reject`, not from the replay
        assert denied["causation_id"] == submitted["id"]
        assert denied["data"]["note"] == "not this time"
        assert [e for e in events if e["type"] == "approval.granted"] == []
        assert [e for e in events if e["type"] == "input.requested"] == []  # nothing of the original re-sent
    finally:
        stop_up(cli, up)
