"""The approver: turns requests for a human decision into approvals, applies decisions and expiry.

- `approval.needed` (from an agent's control line, the validator, or an exit with code 90) →
  `approval.requested` with an `AP-` id and `expires_at`.
- A decision request on `corral.api.approval.decide.<user>` (from `corral approve/reject` or any
  NATS client) → `approval.decision.submitted` with `decided_by` = that user: the server lets an
  operator publish only on its own subject (events/auth.py), so the decider is the authenticated
  NATS user, whatever the payload claims.
- `approval.decision.submitted` (recorded as above, or by any client of a server without users) → the first
  submission in stream order for a pending approval wins: `approval.granted` / `approval.denied`
  with the submission as causation; every other submission gets `control.rejected`
  ("AP-X already decided: granted by alice at ...").
- An approval still pending at `expires_at` → `approval.expired`.
- Then the reaction: a validator's approval resumes (granted) or cancels the paused agent; an
  expired one cancels it (policy `on_expire`); an agent that exited with code 90 is restarted
  after a grant with CORRAL_APPROVAL_ID / CORRAL_APPROVAL_CHOICE in its environment.

State comes from the log: one ordered consumer reads every `approval.*` event from the start, so
a restarted approver knows every pending approval. Every outcome of one approval carries the
same event id (derived from the approval's `approval.requested` id), so JetStream's duplicate
window lets only the first stored outcome in — granted, denied or expired, whichever approver
records it; the outcome read back from the stream is the one acted on. Ids of rejections and
reactions are derived the same way. See docs/approvals.md.
"""

import asyncio
import contextlib
import getpass
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus, PermissionRefused, refuse_reply
from actors.policy import Policy, PolicyError, effective_policy
from actors.runtime import Actor
from events.approvals import CROCKFORD, EXIT_CODE_APPROVAL, OUTCOMES, derived_id, encode
from events.auth import DECIDE_API, TOKEN_DECIDE_API
from events.envelope import decode_event
from events.errors import EventError, PublishError, WrongLastSequence
from events.ids import is_valid_execution_id, new_ulid
from events.subjects import STREAM, ack_pending, ack_sequence, event_subject, events_of_type, split_subject
from events.types import (
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalNeeded,
    ApprovalRequested,
    CancelRequested,
    ControlRejected,
    EventData,
    ExecutionRequested,
    ResumeRequested,
)

log = logging.getLogger(__name__)
SHADOW_WAIT_S: Final = 15.0  # a rejection in a shadow workspace: the discard before the resume

APPROVAL_EVENTS: Final = "corral.evt.*.approval.>"
REQUESTER: Final = "approver"
DECISION_REQUEST: Final = "approval.decision.submitted"
REPLAY_EFFECTS_S: Final = 240.0  # reactions to outcomes this recent are re-sent after a restart (dedup: 5 min)
KILL_GRACE_S: Final = 0.0  # a cancel for a refused, expired or over-budget approval: killed at once, never continued
POLICY_CACHE: Final = 10_000  # executions whose effective policy is remembered

_EXEC_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"


def approval_id_for(needed_id: str) -> str:
    """The approval id of an `approval.needed` event: `AP-` and six characters."""
    return "AP-" + encode(hashlib.sha256(f"{needed_id}|approval".encode()).digest()[:8], CROCKFORD, 6)


def restart_execution_id(approval_id: str) -> str:
    """The id of the execution that restarts a tool which exited 90, after its approval."""
    return encode(hashlib.sha256(f"{approval_id}|restart".encode()).digest()[:8], _EXEC_ALPHABET, 8)


def decider() -> str:
    """Who decides from this process: the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- state from the log ------------------------------------------------------------------------------


@dataclass
class Approval:
    approval_id: str
    execution_id: str
    question: str
    options: tuple[str, ...]
    category: str | None
    source: str
    requested_at: datetime
    expires_at: datetime | None
    event_id: str  # the approval.requested event's id
    needed_id: str | None
    seq: int
    state: str = "pending"  # pending, granted, denied, expired
    decided_by: str | None = None
    decided_at: datetime | None = None
    choice: str | None = None
    note: str | None = None
    decision_cause: str | None = None
    submissions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (event id, data), stream order
    deciding: str | None = None  # a submission this approver is recording the outcome of
    raise_budget: float | None = None  # a granted budget approval: the next limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "approval_id": self.approval_id,
            "execution_id": self.execution_id,
            "state": self.state,
            "category": self.category,
            "source": self.source,
            "question": self.question,
            "options": list(self.options),
            "requested_at": _iso(self.requested_at),
            "expires_at": _iso(self.expires_at),
            "decided_by": self.decided_by,
            "decided_at": _iso(self.decided_at),
            "choice": self.choice,
            "note": self.note,
        }

    def decided_text(self) -> str:
        if self.state == "expired":
            return f"{self.approval_id} already expired at {_iso(self.decided_at)}"
        return f"{self.approval_id} already decided: {self.state} by {self.decided_by} at {_iso(self.decided_at)}"


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat().replace("+00:00", "Z") if ts is not None else None


def _ts(raw: dict[str, Any]) -> datetime:
    try:
        return datetime.fromisoformat(str(raw["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return datetime.now(UTC)


@dataclass
class ApprovalBook:
    """Every approval and what happened to it, built by applying `approval.*` events in order."""

    approvals: dict[str, Approval] = field(default_factory=dict)
    needed: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # needed id -> (exec, raw)
    orphans: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # submissions for unknown ids

    def apply(self, execution_id: str, kind: str, raw: dict[str, Any], seq: int) -> Approval | None:
        data = raw.get("data") or {}
        if kind == "approval.needed":
            self.needed[str(raw.get("id"))] = (execution_id, raw)
            return None
        if kind == "approval.requested":
            approval_id = str(data.get("approval_id"))
            if approval_id in self.approvals:
                return self.approvals[approval_id]
            cause = raw.get("causation_id")
            source = "agent"
            if cause in self.needed:
                source = str((self.needed.pop(cause)[1].get("data") or {}).get("source") or "agent")
            expires = data.get("expires_at")
            created = Approval(
                approval_id=approval_id,
                execution_id=execution_id,
                question=str(data.get("question") or ""),
                options=tuple(data.get("options") or ()),
                category=data.get("category"),
                source=str(data.get("source") or source),
                requested_at=_ts(raw),
                expires_at=datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None,
                event_id=str(raw.get("id")),
                needed_id=cause,
                seq=seq,
            )
            self.approvals[approval_id] = created
            return created
        approval = self.approvals.get(str(data.get("approval_id")))
        if kind == DECISION_REQUEST:
            if approval is None:
                self.orphans.append((execution_id, raw))
                return None
            approval.submissions.append((str(raw.get("id")), data))
            return approval
        if approval is None or approval.state != "pending" or kind not in OUTCOMES:
            return approval
        approval.state = kind.removeprefix("approval.")
        approval.decided_at = _ts(raw)
        approval.decided_by = data.get("decided_by") if kind != "approval.expired" else None
        approval.choice = data.get("choice")
        approval.note = data.get("note")
        approval.raise_budget = data.get("raise_budget_usd")
        approval.decision_cause = raw.get("causation_id")
        approval.deciding = None
        return approval

    def find(self, text: str) -> Approval | None:
        """An approval by id (case-insensitive, `AP-` optional, any unique prefix)."""
        key = text.strip().upper()
        if not key.startswith("AP-"):
            key = "AP-" + key
        if key in self.approvals:
            return self.approvals[key]
        matches = [a for a in self.approvals.values() if a.approval_id.startswith(key)]
        return matches[0] if len(matches) == 1 else None


# --- the actor -----------------------------------------------------------------------------------------


class Approver(Actor):
    """Assigns approval ids, records decisions (first wins) and expiries, and applies their reactions."""

    name = "approver"

    def __init__(
        self,
        bus: Bus,
        policy: Policy | None = None,
        *,
        instance: str | None = None,
        check_interval_s: float = 0.25,
        policy_table: dict[str, Any] | None = None,
        templates: dict[str, dict[str, Any] | None] | None = None,
    ) -> None:
        """`policy` is [policy] of corral.toml; `policy_table` (its keys as written) and `templates`
        (each template's policy keys) let an execution's template and `--policy FILE` keys apply over it."""
        super().__init__(bus, instance=instance)
        self.policy = policy or Policy()
        if policy_table is None:
            policy_table = self.policy.model_dump(mode="json")
            policy_table["approval_timeout"] = policy_table.pop("approval_timeout_s")
        self.policy_table = policy_table
        self.template_policies = templates or {}
        self._policies: OrderedDict[str, Policy] = OrderedDict()
        self.check_interval_s = check_interval_s
        self.book = ApprovalBook()
        self.caught_up = asyncio.Event()
        self.exit90: set[str] = set()  # executions whose agent exited with code 90
        self._lock = asyncio.Lock()
        self._subs: list[Any] = []
        self._history_end = 0
        self._early_exits: list[tuple[str, dict[str, Any]]] = []
        self._effects_done: set[str] = set()

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "pending": sum(1 for a in self.book.approvals.values() if a.state == "pending"),
            "caught_up": self.caught_up.is_set(),
        }

    async def prepare(self) -> None:
        # Decisions are taken from the start (recorded now, decided once the history is read).
        self._subs.append(await self.bus.nc.subscribe(f"{DECIDE_API}.*", queue="approver", cb=self._on_submit))
        # the HTTP gateway's operator tokens: `decide.token.<name>`, the name is the decider
        self._subs.append(await self.bus.nc.subscribe(f"{TOKEN_DECIDE_API}.*", queue="approver", cb=self._on_submit))

    async def run(self) -> None:
        js = self.bus.js
        info = await js.stream_info(STREAM, subjects_filter=APPROVAL_EVENTS)
        self._history_end = int(info.state.last_seq)
        if not info.state.subjects:
            self.caught_up.set()
        self._subs.append(
            await js.subscribe(
                events_of_type("execution.exited"),
                cb=self._on_exit,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
        )
        self._subs.append(
            await js.subscribe(
                APPROVAL_EVENTS,
                cb=self._on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        )
        try:
            await self.caught_up.wait()
            await self._on_caught_up()
            while not self.stopping.is_set():
                try:
                    await self._expire_due()
                except Exception:
                    log.exception("approver: expiry check failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.check_interval_s)
        finally:
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # --- reading ---------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        try:
            execution_id, kind = split_subject(msg.subject)
            seq = ack_sequence(msg.reply)
            raw = orjson.loads(msg.data)
            if not isinstance(raw, dict):
                return
            live = self.caught_up.is_set()
            approval = self.book.apply(execution_id, kind, raw, seq)
            if live:
                await self._react(execution_id, kind, raw, approval)
        except Exception:
            log.exception("approver: cannot handle %s", msg.subject)
        finally:
            if not self.caught_up.is_set() and (
                ack_pending(msg.reply) == 0 or ack_sequence(msg.reply) >= self._history_end
            ):
                self.caught_up.set()

    async def _on_exit(self, msg: Msg) -> None:
        try:
            raw = orjson.loads(msg.data)
            if (raw.get("data") or {}).get("exit_code") != EXIT_CODE_APPROVAL:
                return
            execution_id, _ = split_subject(msg.subject)
            if not self.caught_up.is_set():
                self._early_exits.append((execution_id, raw))
                return
            await self._exited_90(execution_id, raw)
        except Exception:
            log.exception("approver: cannot handle %s", msg.subject)

    async def _on_caught_up(self) -> None:
        """History is read: finish what a stopped approver left undone."""
        now = datetime.now(UTC)
        for needed_id, (execution_id, raw) in list(self.book.needed.items()):
            await self._register(execution_id, needed_id, raw)
        for approval in list(self.book.approvals.values()):
            for submission, _ in list(approval.submissions):
                if approval.state != "pending" or approval.deciding is not None:
                    break
                await self._decide(approval, submission)
            recent = approval.decided_at is not None and (now - approval.decided_at).total_seconds() < REPLAY_EFFECTS_S
            if approval.state != "pending" and recent:
                await self._effects(approval)
            if approval.state in ("pending", "granted"):
                with contextlib.suppress(NotFoundError):
                    stored = await self.bus.js.get_last_msg(
                        STREAM, event_subject(approval.execution_id, "execution.exited")
                    )
                    data = (orjson.loads(stored.data or b"{}").get("data")) or {}
                    if data.get("exit_code") == EXIT_CODE_APPROVAL:
                        self.exit90.add(approval.execution_id)
                        if approval.state == "granted":
                            await self._restart(approval)
        for execution_id, raw in self._early_exits:
            await self._exited_90(execution_id, raw)
        self._early_exits.clear()

    async def _on_submit(self, msg: Msg) -> None:
        """Record a decision sent to the API as `approval.decision.submitted` by the subject's user.

        With NATS users (this approver has one), the subject's last token is the authenticated
        decider and a `decided_by` in the payload is ignored; on a server without users nobody is
        authenticated, and the payload's claim is kept, as for a submission published directly.
        """
        if msg.reply and refuse_reply(msg, self.instance):
            return  # nothing recorded: the answer would go where no inbox is (docs/security.md)
        user = msg.subject.rsplit(".", 1)[-1]
        reply: dict[str, Any]
        try:
            body = orjson.loads(msg.data)
            execution_id = str(body["execution_id"])
            if not is_valid_execution_id(execution_id):
                raise ValueError(f"{execution_id!r} is not an execution id")
            fields = dict(body["data"])
            if self.bus.user is not None or not fields.get("decided_by"):
                fields["decided_by"] = user
            data = ApprovalDecisionSubmitted.model_validate(fields)
            event = self.bus.event(execution_id, data, actor=self.instance, causation_id=body.get("causation_id"))
            event = event.model_copy(update={"id": str(body.get("id") or event.id)})
            ack = await self.bus.publisher.publish(event)
            reply = {"ok": True, "id": event.id, "seq": ack.seq, "decided_by": data.decided_by}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "error": f"not a decision ({type(exc).__name__}: {str(exc).splitlines()[0]})"}
        except PublishError as exc:
            reply = {"ok": False, "error": str(exc)}
        with contextlib.suppress(Exception):
            await msg.respond(orjson.dumps(reply))

    # --- the policy of an execution ------------------------------------------------------------

    async def policy_for(self, execution_id: str) -> Policy:
        """The execution's policy: [policy], its template's keys over it, its run's (`--policy FILE`) over both.

        Read from its `execution.requested` (once per execution); without one (an approval recorded
        by a client for an unknown execution), or with keys that no longer validate, [policy].
        """
        cached = self._policies.get(execution_id)
        if cached is not None:
            return cached
        policy = self.policy
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, "execution.requested"))
            request = decode_event(stored.data or b"").data
        except (NotFoundError, EventError):
            request = None
        if isinstance(request, ExecutionRequested) and (request.template or request.policy):
            try:
                policy = effective_policy(self.policy_table, self.template_policies, request.template, request.policy)
            except PolicyError as exc:
                log.warning("approver: the policy of %s cannot be used (%s); [policy] applies", execution_id, exc)
        self._policies[execution_id] = policy
        if len(self._policies) > POLICY_CACHE:
            self._policies.popitem(last=False)
        return policy

    # --- reacting --------------------------------------------------------------------------------

    async def _react(self, execution_id: str, kind: str, raw: dict[str, Any], approval: Approval | None) -> None:
        if kind == "approval.needed":
            await self._register(execution_id, str(raw.get("id")), raw)
        elif kind == DECISION_REQUEST:
            submission = str(raw.get("id"))
            if approval is None:
                data = raw.get("data") or {}
                await self._reject(execution_id, submission, f"no approval {data.get('approval_id')} on {execution_id}")
            elif approval.state != "pending":
                await self._reject(execution_id, submission, approval.decided_text())
            elif approval.deciding is None:
                await self._decide(approval, submission)
        elif kind in OUTCOMES and approval is not None:
            for submission, _ in approval.submissions:
                if submission != approval.decision_cause:
                    await self._reject(approval.execution_id, submission, approval.decided_text())
            await self._effects(approval)

    async def _emit(
        self, execution_id: str, data: EventData, *, cause: str | None, event_id: str, expected: int | None = None
    ) -> bool:
        """Record one event under a derived id; False when the same id was stored already."""
        event = self.bus.event(execution_id, data, actor=self.instance, causation_id=cause)
        event = event.model_copy(update={"id": event_id})
        ack = await self.bus.publisher.publish(event, expected_last_subject_seq=expected)
        return not ack.duplicate

    async def _register(self, execution_id: str, needed_id: str, raw: dict[str, Any]) -> None:
        data = raw.get("data") or {}
        try:
            needed = ApprovalNeeded.model_validate(data)
        except ValueError:
            self.book.needed.pop(needed_id, None)
            return
        timeout_s = (await self.policy_for(execution_id)).approval_timeout_s
        now = datetime.now(UTC)
        await self._emit(
            execution_id,
            ApprovalRequested(
                approval_id=approval_id_for(needed_id),
                question=needed.question,
                options=needed.options,
                category=needed.category,
                expires_at=now + timedelta(seconds=timeout_s),
                source=needed.source,
            ),
            cause=needed_id,
            event_id=derived_id(needed_id, "requested"),
        )

    async def _decide(self, approval: Approval, submission: str) -> None:
        """Record the outcome of `submission` (the first one seen while pending)."""
        async with self._lock:
            if approval.state != "pending" or approval.deciding is not None:
                return
            found = [d for s, d in approval.submissions if s == submission]
            data = found[0] if found else {}
            approve = bool(data.get("approve"))
            choice = data.get("choice")
            problem = None
            if approve and choice is not None and approval.options and choice not in approval.options:
                problem = f"choice {choice!r} is not one of {', '.join(approval.options)}"
            if not found:
                problem = "the submission is unknown"
            if problem is not None:
                approval.submissions = [s for s in approval.submissions if s[0] != submission]
                await self._reject(approval.execution_id, submission, f"{approval.approval_id}: {problem}")
                return
            approval.deciding = submission
            outcome: EventData
            if approve:
                outcome = ApprovalGranted(
                    approval_id=approval.approval_id,
                    choice=choice,
                    note=data.get("note"),
                    decided_by=data.get("decided_by"),
                    raise_budget_usd=data.get("raise_budget_usd"),
                )
            else:
                outcome = ApprovalDenied(
                    approval_id=approval.approval_id, note=data.get("note"), decided_by=data.get("decided_by")
                )
            await self._emit(
                approval.execution_id,
                outcome,
                cause=submission,
                event_id=derived_id(approval.event_id, "outcome"),
            )

    async def _expire_due(self) -> None:
        now = datetime.now(UTC)
        for approval in list(self.book.approvals.values()):
            if approval.state != "pending" or approval.expires_at is None or approval.expires_at > now:
                continue
            async with self._lock:
                if approval.state != "pending" or approval.deciding is not None:
                    continue
                approval.deciding = "expiry"
                await self._emit(
                    approval.execution_id,
                    ApprovalExpired(approval_id=approval.approval_id),
                    cause=approval.event_id,
                    event_id=derived_id(approval.event_id, "outcome"),
                )

    async def _reject(self, execution_id: str, submission: str, reason: str) -> None:
        await self._emit(
            execution_id,
            ControlRejected(request=DECISION_REQUEST, reason=reason),
            cause=submission,
            event_id=derived_id(submission, "rejected"),
        )

    async def _effects(self, approval: Approval) -> None:
        """What follows an outcome: resume or cancel the execution, or restart a tool that exited 90."""
        if approval.approval_id in self._effects_done:
            return
        self._effects_done.add(approval.approval_id)
        p = await self.policy_for(approval.execution_id)
        action: str | None = None
        paused = approval.source in ("validator", "budget")  # the agent waits stopped for the decision
        if approval.state == "granted":
            if approval.execution_id in self.exit90:
                await self._restart(approval)
                return
            action = "resume" if paused else None
        elif approval.state == "denied":
            reaction = p.on_violation_reject if approval.source == "validator" else p.on_reject
            if approval.source == "budget":
                reaction = "cancel"  # no to spending more
            action = "cancel" if reaction == "cancel" else ("resume" if paused else None)
        elif approval.state == "expired":
            expire_cancels = p.on_expire == "cancel" or approval.source == "budget"  # never spend unasked
            action = "cancel" if expire_cancels else ("resume" if paused else None)
        reason = f"approval {approval.approval_id} {approval.state}"
        if action == "resume" and approval.state == "denied" and approval.source == "validator":
            await self._shadow_discarded(approval.execution_id, approval.approval_id)
        if action == "resume":
            await self._emit(
                approval.execution_id,
                ResumeRequested(
                    reason=reason,
                    requested_by=REQUESTER,
                    max_cost_usd=approval.raise_budget if approval.state == "granted" else None,
                ),
                cause=approval.event_id,
                event_id=derived_id(approval.event_id, "resume"),
            )
        elif action == "cancel":  # killed at once: a paused agent is never continued, a running one stops now
            await self._emit(
                approval.execution_id,
                CancelRequested(grace_s=KILL_GRACE_S, reason=reason, requested_by=REQUESTER),
                cause=approval.event_id,
                event_id=derived_id(approval.event_id, "cancel"),
            )

    async def _shadow_discarded(self, execution_id: str, approval_id: str) -> None:
        """A shadow workspace (docs/shadow.md): the agent is resumed only once the checkpointer has
        discarded the rejected files, so it never runs on with them (at most SHADOW_WAIT_S)."""
        try:
            created = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, "workspace.created"))
        except NotFoundError:
            return
        if not orjson.loads(created.data or b"{}").get("data", {}).get("shadow"):
            return
        deadline = asyncio.get_running_loop().time() + SHADOW_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(NotFoundError):
                done = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, "workspace.discarded"))
                if orjson.loads(done.data or b"{}").get("data", {}).get("approval_id") == approval_id:
                    return
            await asyncio.sleep(0.05)
        log.warning("approver: %s: no workspace.discarded for %s; resumed anyway", execution_id, approval_id)

    async def _exited_90(self, execution_id: str, raw: dict[str, Any]) -> None:
        """An agent exited with 90: it waits for an approval, asked for or not."""
        self.exit90.add(execution_id)
        mine = [a for a in self.book.approvals.values() if a.execution_id == execution_id]
        if any(a.state == "pending" for a in mine):
            return  # restarted when granted
        granted = [a for a in mine if a.state == "granted"]
        if granted:
            await self._restart(granted[-1])
            return
        if any(e == execution_id for e, _ in self.book.needed.values()):
            return
        exit_id = str(raw.get("id"))
        await self._emit(
            execution_id,
            ApprovalNeeded(
                question=f"{execution_id} exited with code 90: it needs an approval to continue. Restart it approved?",
                options=(),
                category=None,
                source="exit_code",
            ),
            cause=exit_id,
            event_id=derived_id(exit_id, "needed"),
        )

    async def _restart(self, approval: Approval) -> None:
        """Request a new execution of the same request, with the approval in its environment (once)."""
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(approval.execution_id, "execution.requested"))
            original = decode_event(stored.data or b"")
        except (NotFoundError, EventError):
            log.warning("approver: no request of %s to restart", approval.execution_id)
            return
        if not isinstance(original.data, ExecutionRequested):
            return
        request = original.data
        env = {
            **request.env,
            "CORRAL_APPROVAL_ID": approval.approval_id,
            "CORRAL_APPROVAL_CHOICE": approval.choice or "",
        }
        new = request.model_copy(
            update={"env": env, "attempt": request.attempt + 1, "retry_of": request.retry_of or approval.execution_id}
        )
        new_id = restart_execution_id(approval.approval_id)
        with contextlib.suppress(WrongLastSequence):  # requested already (by a rival, or before a restart)
            await self._emit(
                new_id, new, cause=approval.event_id, event_id=derived_id(approval.event_id, "restart"), expected=0
            )


class DecisionRefused(Exception):
    """No approver took a decision, or it refused it; the message says which and what to do."""


def decision_api(user: str) -> str:
    """The subject a user sends decisions to: `corral.api.approval.decide.<user>`."""
    return f"{DECIDE_API}.{re.sub(r'[^A-Za-z0-9_-]', '_', user) or 'unknown'}"


async def submit_decision(
    bus: Bus,
    execution_id: str,
    data: ApprovalDecisionSubmitted,
    *,
    causation_id: str | None = None,
    timeout_s: float = 15.0,
    token: str | None = None,
) -> dict[str, Any]:
    """Send a decision to the approvers as this bus's NATS user; return {id, seq, decided_by} of the record.

    Without NATS users the subject names the claimed decider (data.decided_by, else the OS user).
    `token`: the HTTP gateway decides for one of its bearer tokens (`decide.token.<name>`, which only
    the `api` user may publish): the token's name is the decider.
    """
    user = bus.user or data.decided_by or decider()
    subject = decision_api(user) if token is None else f"{TOKEN_DECIDE_API}.{re.sub(r'[^A-Za-z0-9_-]', '_', token)}"
    body = {
        "execution_id": execution_id,
        "id": new_ulid(),
        "causation_id": causation_id,
        "data": data.model_dump(mode="json"),
    }
    try:
        msg = await bus.request(subject, orjson.dumps(body), timeout_s=timeout_s)
    except PermissionRefused as exc:
        raise DecisionRefused(f"{exc}; this user may not decide approvals (docs/security.md)") from None
    except NoRespondersError:
        raise DecisionRefused(
            "no approver runs to take the decision; start one (`corral up`), `corral health` lists them"
        ) from None
    except TimeoutError:
        raise DecisionRefused(f"no approver answered within {timeout_s:.0f}s; `corral health` lists them") from None
    answer: dict[str, Any] = orjson.loads(msg.data)
    if not answer.get("ok"):
        raise DecisionRefused(str(answer.get("error") or "refused"))
    return answer


def decision_subject(execution_id: str) -> str:
    """The subject a decision is published on: `corral.evt.<execution_id>.approval.decision.submitted`."""
    return event_subject(execution_id, DECISION_REQUEST)
