"""The validator: applies the policy to every checkpoint and every reported shell command.

For each `checkpoint.created` it reads the checkpoint's changes from the repository's object
store (actors/gitobjects.py: loose objects inflated directly, packed ones through one long-running
`git cat-file` per repository, no process per checkpoint; line counts from the checkpoint's own
numstat), evaluates the execution's policy (its template's policy over `[policy]`), also compares
git's own files (the worktree's `.git` link, the repository's config and hooks)
with the snapshot taken when the worktree was created, and records `validation.passed` or
`validation.failed` with every violation. A critical violation asks the spawner to pause the
agent (`pause.requested`, requested_by "validator") and asks a human (`approval.needed`, source
"validator"); the approver takes it from there.

For each `tool.called` with a `shell_command`, the shell allow/deny lists and the command
categories (merge, deploy, deps_add) apply; only failures are recorded.

Checkpoints and tool calls come from durable work consumers shared by all validator instances,
so each is validated by one instance; what it records has ids derived from the checkpoint's (or
tool call's) event id, so a redelivery after a crash stores nothing twice (JetStream's duplicate
window). Per-file results are cached by path, blobs and policy version. See docs/policy.md.
"""

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from actors.bus import Bus
from actors.gitobjects import ObjectReaders
from actors.policy import (
    FindingCache,
    Policy,
    PolicyError,
    effective_policy,
    git_protection_paths,
    git_tampering,
)
from actors.runtime import Actor
from events.approvals import derived_id
from events.envelope import decode_event
from events.errors import EventError
from events.subjects import STREAM, event_subject, events_of_type
from events.types import (
    ApprovalNeeded,
    CheckpointCreated,
    EventData,
    ExecutionRequested,
    PauseRequested,
    ToolCalled,
    ValidationFailed,
    ValidationPassed,
    Violation,
    WorkspaceCreated,
)

log = logging.getLogger(__name__)

REQUESTER = "validator"
CHECKPOINT_CONSUMER = "validator"
TOOL_CONSUMER = "validator-tools"


def recorded_stats(data: CheckpointCreated) -> dict[str, tuple[int | None, int | None]]:
    """Lines added and deleted per path, as the checkpoint recorded them (None: binary).

    A type change is two numstat lines for one path; they are added up."""
    stats: dict[str, tuple[int | None, int | None]] = {}
    for f in data.files:
        seen = stats.get(f.path)
        if seen is None:
            stats[f.path] = (f.added, f.deleted)
        elif None in seen or f.added is None or f.deleted is None:
            stats[f.path] = (None, None)
        else:
            stats[f.path] = (seen[0] + f.added, seen[1] + f.deleted)  # type: ignore[operator]
    return stats


class _Context:
    __slots__ = ("policy", "repo", "template", "worktree")

    def __init__(self, repo: str | None, worktree: str | None, template: str | None, policy: Policy) -> None:
        self.repo = repo
        self.worktree = worktree
        self.template = template
        self.policy = policy


class Validator(Actor):
    """Validates checkpoints and shell commands against the policy; critical → pause and approval."""

    name = "validator"

    def __init__(
        self,
        bus: Bus,
        *,
        policy: dict[str, Any] | None = None,
        templates: dict[str, dict[str, Any] | None] | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.policy_table = policy or {}
        self.template_policies = templates or {}
        self.cache = FindingCache()
        self.readers = ObjectReaders()  # one `git cat-file --batch` per repository
        self.contexts: OrderedDict[str, _Context] = OrderedDict()
        self.baselines: dict[str, dict[str, tuple[int, int, str]]] = {}
        self.validated = 0
        self.failed = 0
        self._policies: dict[tuple[str | None, str | None], Policy] = {}
        self._sub: Any = None

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "validated": self.validated,
            "failed": self.failed,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }

    def policy_for(self, template: str | None, run: dict[str, Any] | None = None) -> Policy:
        key = (template, orjson.dumps(run, option=orjson.OPT_SORT_KEYS).decode() if run else None)
        if key not in self._policies:
            try:
                self._policies[key] = effective_policy(self.policy_table, self.template_policies, template, run)
            except PolicyError:
                log.exception("validator: bad policy for template %s (or the run's); using [policy]", template)
                self._policies[key] = effective_policy(self.policy_table, {}, None)
        return self._policies[key]

    async def prepare(self) -> None:
        # Git's own files are snapshotted when a worktree is created, before the agent runs.
        self._sub = await self.bus.js.subscribe(
            events_of_type("workspace.created"),
            cb=self._on_workspace,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.consume(CHECKPOINT_CONSUMER, events_of_type("checkpoint.created"), self._on_checkpoint))
            tg.create_task(self.consume(TOOL_CONSUMER, events_of_type("tool.called"), self._on_tool))

    async def on_stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await asyncio.to_thread(self.readers.close)

    async def _on_workspace(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            return
        if isinstance(event.data, WorkspaceCreated):
            path = event.data.path
            self.baselines[event.execution_id] = await asyncio.to_thread(git_protection_paths, path)

    # --- context -------------------------------------------------------------------------------

    async def _last(self, execution_id: str, kind: str) -> EventData | None:
        try:
            stored = await self.bus.js.get_last_msg(STREAM, event_subject(execution_id, kind))
        except NotFoundError:
            return None
        try:
            return decode_event(stored.data or b"").data
        except EventError:
            return None

    async def context(self, execution_id: str) -> _Context:
        ctx = self.contexts.get(execution_id)
        if ctx is not None and ctx.worktree is not None:
            return ctx
        request = await self._last(execution_id, "execution.requested")
        workspace = await self._last(execution_id, "workspace.created")
        template = request.template if isinstance(request, ExecutionRequested) else None
        repo = workspace.repo if isinstance(workspace, WorkspaceCreated) else None
        if repo is None and isinstance(request, ExecutionRequested):
            repo = request.repo
        worktree = workspace.path if isinstance(workspace, WorkspaceCreated) else None
        run_policy = request.policy if isinstance(request, ExecutionRequested) else None
        ctx = _Context(repo, worktree, template, self.policy_for(template, run_policy))
        self.contexts[execution_id] = ctx
        if len(self.contexts) > 10_000:
            self.contexts.popitem(last=False)
        return ctx

    # --- checkpoints ---------------------------------------------------------------------------

    async def _on_checkpoint(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            await msg.ack()
            return
        if not isinstance(event.data, CheckpointCreated):
            await msg.ack()
            return
        try:
            await self.validate_checkpoint(event.execution_id, event.id, event.data)
        except Exception:
            log.exception("validator: cannot validate checkpoint %s of %s", event.data.n, event.execution_id)
            await msg.nak(delay=2.0)
            return
        await msg.ack()

    async def validate_checkpoint(self, execution_id: str, event_id: str, data: CheckpointCreated) -> list[Violation]:
        """Validate one checkpoint and record the outcome; return its violations."""
        ctx = await self.context(execution_id)
        policy = ctx.policy
        started = time.perf_counter()
        violations: list[Violation] = []
        repo = ctx.repo or ctx.worktree  # the worktrees of a repository share its objects: one reader
        if repo is None:
            violations.append(
                Violation(
                    path=None, rule="unreadable", severity="warning", message="the execution's repository is unknown"
                )
            )
        else:
            try:
                changes = await asyncio.to_thread(
                    self.readers.diff,
                    repo,
                    data.parent,
                    data.commit,
                    stats=recorded_stats(data),
                    known=lambda change: policy.file_key(change) in self.cache,
                )
            except (OSError, RuntimeError) as exc:
                changes = []
                violations.append(
                    Violation(
                        path=None, rule="unreadable", severity="warning", message=f"cannot read the diff: {exc}"[:500]
                    )
                )
            violations.extend(policy.check_files(changes, cache=self.cache))
        violations.extend(policy.check_skipped((f.path, f.size) for f in data.skipped))
        if ctx.worktree is not None:
            now = await asyncio.to_thread(git_protection_paths, ctx.worktree)
            before = self.baselines.setdefault(execution_id, now)
            violations.extend(policy.violation(f) for f in git_tampering(before, now))
            self.baselines[execution_id] = now  # each change is reported once
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.validated += 1
        outcome: EventData
        if violations:
            self.failed += 1
            outcome = ValidationFailed(
                checkpoint=data.n, policy_version=policy.version, violations=tuple(violations), duration_ms=duration_ms
            )
        else:
            outcome = ValidationPassed(checkpoint=data.n, policy_version=policy.version, duration_ms=duration_ms)
        await self._emit(execution_id, outcome, event_id, "validation")
        critical = [v for v in violations if v.severity == "critical"]
        if critical:
            await self._escalate(execution_id, event_id, critical, f"checkpoint {data.n}")
        return violations

    # --- tool calls ----------------------------------------------------------------------------

    async def _on_tool(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventError:
            await msg.ack()
            return
        if isinstance(event.data, ToolCalled) and event.data.shell_command:
            try:
                await self.validate_command(event.execution_id, event.id, event.data.shell_command)
            except Exception:
                log.exception("validator: cannot validate a tool call of %s", event.execution_id)
                await msg.nak(delay=2.0)
                return
        await msg.ack()

    async def validate_command(self, execution_id: str, event_id: str, command: str) -> list[Violation]:
        ctx = await self.context(execution_id)
        started = time.perf_counter()
        violations = ctx.policy.check_command(command)
        if not violations:
            return []
        self.failed += 1
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        await self._emit(
            execution_id,
            ValidationFailed(
                checkpoint=None,
                policy_version=ctx.policy.version,
                violations=tuple(violations),
                duration_ms=duration_ms,
            ),
            event_id,
            "validation",
        )
        critical = [v for v in violations if v.severity == "critical"]
        if critical:
            await self._escalate(execution_id, event_id, critical, f"shell command {command[:200]!r}")
        return violations

    # --- recording -----------------------------------------------------------------------------

    async def _emit(self, execution_id: str, data: EventData, cause: str, salt: str) -> None:
        event = self.bus.event(execution_id, data, actor=self.instance, causation_id=cause)
        event = event.model_copy(update={"id": derived_id(cause, salt)})
        await self.bus.publisher.publish(event)

    async def _escalate(self, execution_id: str, cause: str, critical: list[Violation], what: str) -> None:
        """Pause the agent and ask a human about the first critical category."""
        first = critical[0]
        category = first.category or first.rule
        shown = "; ".join(v.message for v in critical[:5])
        if len(critical) > 5:
            shown += f" (+{len(critical) - 5} more)"
        await self._emit(
            execution_id,
            PauseRequested(reason=f"policy: {category}: {first.message}"[:500], requested_by=REQUESTER),
            cause,
            "pause",
        )
        await self._emit(
            execution_id,
            ApprovalNeeded(
                question=f"{what} of {execution_id} violates the policy: {shown}. Allow it and resume?"[:2000],
                options=("approve", "reject"),
                category=category,
                source="validator",
            ),
            cause,
            "approval",
        )
