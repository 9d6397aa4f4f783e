"""Approvals: the book of every approval in the log, and decisions confirmed by an approver."""

import asyncio
from typing import Any
from urllib.parse import urlparse

import orjson
from nats.aio.msg import Msg

from actors.approver import APPROVAL_EVENTS, ApprovalBook, DecisionRefused, decider, submit_decision
from corral.errors import Conflict, CorralError, NotFound, UsageError
from corral.ops.control import CONFIRM_TIMEOUT_S, NotConfirmed
from corral.system import System
from events.subjects import execution_events, split_subject
from events.types import ApprovalDecisionSubmitted
from replay.history import follow


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
