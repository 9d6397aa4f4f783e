"""Human approvals: approvals, approve, reject.

`corral approvals` reads every `approval.*` event from the log (no projection needed) and lists
pending approvals first. `corral approve` / `corral reject` send the decision to the approvers on
`corral.api.approval.decide.<NATS user>` (the approver records `approval.decision.submitted` with
that authenticated user as `decided_by`) and wait for the answer: `approval.granted` /
`approval.denied` caused by that submission, or `control.rejected` saying who decided first.
See docs/approvals.md and docs/security.md.
"""

import argparse
import asyncio
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import orjson
from nats.aio.msg import Msg

from actors.approver import APPROVAL_EVENTS, ApprovalBook, DecisionRefused, decider, submit_decision
from corral import render
from corral.errors import Conflict, CorralError, NotFound, UsageError
from corral.home import Home
from corral.ops.control import CONFIRM_TIMEOUT_S, NotConfirmed
from corral.system import System
from events.subjects import execution_events, split_subject
from events.types import ApprovalDecisionSubmitted
from replay.history import follow


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    listing = sub.add_parser("approvals", help="list approvals: pending first (id, execution, category, question, age)")
    listing.add_argument("--all", action="store_true", help="include decided and expired approvals")
    listing.add_argument("--json", action="store_true")
    approve = sub.add_parser("approve", help="grant a pending approval (the first decision wins)")
    approve.add_argument("approval_id", metavar="AP_ID")
    approve.add_argument("--choice", help="one of the approval's options")
    approve.add_argument("--note", help="a note for the agent and the record")
    approve.add_argument(
        "--raise-budget",
        type=float,
        metavar="USD",
        help="a budget approval: continue until the execution's cost reaches USD (default: no limit)",
    )
    approve.add_argument("--json", action="store_true", help="print the confirming event")
    reject = sub.add_parser("reject", help="deny a pending approval (the first decision wins)")
    reject.add_argument("approval_id", metavar="AP_ID")
    reject.add_argument("--note", help="a note for the agent and the record")
    reject.add_argument("--json", action="store_true", help="print the confirming event")
    return {"approvals": cmd_approvals, "approve": cmd_approve, "reject": cmd_reject}


class UnknownApproval(NotFound):
    """No approval has that id (HTTP 404; `corral approve` exits 1 as it always did)."""

    exit_code = 1


async def read_book(system: System) -> ApprovalBook:
    """Every approval in the log, as the approver sees it."""
    book = ApprovalBook()

    async def on_msg(seq: int, msg: Msg) -> bool:
        execution_id, kind = split_subject(msg.subject)
        raw = orjson.loads(msg.data)
        if isinstance(raw, dict):
            book.apply(execution_id, kind, raw, seq)
        return False

    await follow(system.bus.js, APPROVAL_EVENTS, on_msg, stop_when_caught_up=True)
    return book


def _age(ts: datetime, now: datetime) -> float:
    return max(0.0, (now - ts).total_seconds())


async def cmd_approvals(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=()) as client:
        listed = await client.approvals(all=args.all)
    if args.json:
        render.print_json(listed)
        return 0
    if not listed:
        print("no pending approvals" if not args.all else "no approvals")
        return 0
    rows = []
    for a in listed:
        question = a["question"] if len(a["question"]) <= 70 else a["question"][:67] + "..."
        state = a["state"] if a["state"] == "pending" else f"{a['state']} ({a['decided_by'] or '-'})"
        rows.append(
            [
                a["approval_id"],
                a["execution_id"],
                state,
                a["category"],
                a["source"],
                render.human_duration(a["age_s"]),
                question,
            ]
        )
    print(render.table(["id", "execution", "state", "category", "source", "age", "question"], rows))
    return 0


async def submit_and_wait(
    system: System,
    execution_id: str,
    data: ApprovalDecisionSubmitted,
    *,
    timeout_s: float = CONFIRM_TIMEOUT_S,
    token: str | None = None,
) -> dict[str, Any]:
    """Send a decision to the approvers as this connection's NATS user; return the outcome it caused.

    The approver records the submission (with the authenticated user as `decided_by`) and answers
    with its id; the outcome, or the `control.rejected` saying who decided first, names it as cause.
    """
    try:
        record = await submit_decision(system.bus, execution_id, data, timeout_s=timeout_s, token=token)
    except DecisionRefused as exc:
        raise CorralError(str(exc)) from None
    answer: dict[str, Any] = {}
    done = asyncio.Event()

    async def on_event(seq: int, msg: Msg) -> bool:
        if msg.subject.split(".", 3)[3] not in ("approval.granted", "approval.denied", "control.rejected"):
            return False
        raw = orjson.loads(msg.data)
        if raw.get("causation_id") != record["id"]:
            return False
        answer.update(raw, seq=seq)
        return True

    follower = asyncio.create_task(
        follow(system.bus.js, execution_events(execution_id), on_event, start_seq=int(record["seq"]), done=done)
    )
    try:
        await asyncio.wait_for(asyncio.shield(follower), timeout_s)
    except TimeoutError:
        raise NotConfirmed(f"no approver decided the submission {record['id']} within {timeout_s:.0f}s") from None
    finally:
        done.set()
        follower.cancel()
    if answer.get("type") == "control.rejected":
        raise CorralError(str(answer["data"]["reason"]))
    return answer


def _decided_by(system: System) -> str:
    """The NATS user when the URL carries one (auth on), else the OS user."""
    for server in system.url.split(","):
        user = urlparse(server if "://" in server else f"nats://{server}").username
        if user:
            return user
    return decider()


async def decide(
    system: System,
    approval_id: str,
    *,
    approve: bool,
    choice: str | None = None,
    note: str | None = None,
    raise_budget: float | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Grant or deny a pending approval as this connection's user (or for the HTTP gateway's `token`);
    return the approval.granted / approval.denied event it caused."""
    book = await read_book(system)
    approval = book.find(approval_id)
    if approval is None:
        raise UnknownApproval(f"no approval {approval_id!r}; `corral approvals --all` lists them")
    if approval.state != "pending":
        raise Conflict(approval.decided_text())
    if choice is not None and approval.options and choice not in approval.options:
        raise UsageError(f"--choice must be one of: {', '.join(approval.options)} (got {choice!r})")
    if raise_budget is not None and approval.source != "budget":
        raise UsageError(f"--raise-budget is for budget approvals; {approval.approval_id} is not one")
    if raise_budget is not None and raise_budget <= 0:
        raise UsageError(f"--raise-budget must be more than 0 USD (got {raise_budget})")
    data = ApprovalDecisionSubmitted(
        approval_id=approval.approval_id,
        approve=approve,
        choice=choice,
        note=note,
        decided_by=token or _decided_by(system),
        raise_budget_usd=raise_budget,
    )
    try:
        return await submit_and_wait(system, approval.execution_id, data, token=token)
    except NotConfirmed:
        raise NotConfirmed(
            f"no approver answered about {approval.approval_id} within 15s; the decision is recorded and "
            "applies when an approver runs (`corral health`)"
        ) from None
    except CorralError as exc:
        message = exc.message
        message = message.split(" refused: ", 1)[1] if " refused: " in message else message
        if "already decided" in message or "already expired" in message:
            raise Conflict(message) from None
        raise type(exc)(message) from None


async def _decide(home: Home, args: Any, approve: bool) -> int:
    from corral.client import Client

    choice = getattr(args, "choice", None)
    async with Client.connect(home, actors=("approver",)) as client:
        answer = await client.decide(
            args.approval_id,
            approve=approve,
            choice=choice,
            note=args.note,
            raise_budget=getattr(args, "raise_budget", None),
        )
    approval_id, execution_id = answer["data"]["approval_id"], answer["execution_id"]
    if args.json:
        render.print_json(answer)
    else:
        if choice:  # the answer is the option picked, whatever its wording ("no" is not "approved")
            print(f"{approval_id}: answered {choice!r}; execution {execution_id}")
        else:
            verb = "approved" if answer["type"] == "approval.granted" else "rejected"
            print(f"{approval_id}: {verb}; execution {execution_id}")
    return 0


async def cmd_approve(home: Home, args: Any) -> int:
    return await _decide(home, args, True)


async def cmd_reject(home: Home, args: Any) -> int:
    return await _decide(home, args, False)
