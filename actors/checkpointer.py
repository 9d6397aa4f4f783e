"""The checkpointer: owns checkpoints, rollbacks and commits of every execution's worktree.

It learns the executions from the log (one ordered consumer per event type it needs; history is
read last-per-subject, so a restart costs one message per execution and type) and acts on:

- triggers: interval (while files changed), after N touched files, on pause, on approval
  request, on exit, on demand (`checkpoint.requested`). Bursts are debounced and the
  checkpoints of one execution never overlap (one task per execution; the hidden ref is
  created only if absent and `checkpoint.created` is appended against the sequence of the
  previous one, so two checkpointers never record the same n).
- `rollback.requested`: pause the agent (through `pause.requested`, waiting for the spawner's
  `execution.paused`), checkpoint what is there, restore the target (all or the named files),
  checkpoint the result, record `change.rolled_back`, resume the agent if it was running.
- `commit.requested`: a real commit on the execution's branch, recorded as `change.committed`.

Files larger than `[checkpoints] max_file_size` are left out of every checkpoint (never copied
into `.git`) and listed as `skipped` in `checkpoint.created`; the validator flags them.

A request that cannot be carried out is answered with `control.rejected` and the reason; the
CLI waits for the answer whose causation id is its request.
"""

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from actors import diskquota
from actors.bus import Bus
from actors.checkpoints import (
    DEFAULT_MAX_FILE_BYTES,
    IDENTITY,
    CheckpointError,
    Skipped,
    Snapshot,
    TreeMaker,
    checkpoint_ref,
    git,
    restore,
    take_checkpoint,
    tree_of,
)
from actors.runtime import Actor
from events.errors import PublishError, WrongLastSequence
from events.subjects import STREAM, ack_pending, ack_sequence, events_of_type, split_subject
from events.types import (
    ChangeCommitted,
    ChangeRolledBack,
    CheckpointCreated,
    ControlRejected,
    EventData,
    FileStat,
    PauseRequested,
    ResumeRequested,
    SkippedFile,
    WorkspaceDiscarded,
    WorkspacePromoted,
)

log = logging.getLogger(__name__)

REQUESTER: Final = "checkpointer"
NOTHING_CHANGED: Final = "nothing changed since"
# Which trigger names a coalesced checkpoint when several are due at once.
TRIGGER_ORDER: Final = ("demand", "rollback", "approval", "pause", "exit", "files", "interval")
STATE_TYPES: Final = (
    "workspace.created",
    "execution.started",
    "execution.paused",
    "execution.resumed",
    "execution.exited",
    "execution.failed",
    "file.touched",
    "checkpoint.created",
    "workspace.removed",
    "approval.requested",
    "control.rejected",
    # the shadow workspace (actors/shadow.py): promote what passed, discard what was rejected
    "validation.passed",
    "validation.failed",
    "approval.granted",
    "approval.denied",
)
REQUEST_TYPES: Final = ("checkpoint.requested", "rollback.requested", "commit.requested")
PAUSE_WAIT_S: Final = 15.0


@dataclass
class CheckpointSettings:
    """How often and on what the checkpointer checkpoints (corral.toml [checkpoints])."""

    interval_s: float = 60.0  # while files changed; 0 = never on a timer
    after_files: int = 25  # touched files since the last checkpoint; 0 = off
    debounce_s: float = 0.5  # a burst of triggers within this is one checkpoint
    on_pause: bool = True
    on_exit: bool = True
    on_approval: bool = True
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files are left out of checkpoints; 0 = no limit


@dataclass
class _Execution:
    execution_id: str
    worktree: Path | None = None
    repo: str | None = None
    base_commit: str | None = None
    n: int = 0
    last_commit: str | None = None
    last_tree: str | None = None
    last_skipped: tuple[Skipped, ...] = ()  # the files the newest checkpoint left out (too large)
    cp_seq: int = 0  # stream sequence of the newest checkpoint.created of this execution
    started: bool = False
    ended_seq: int = 0
    paused: bool = False
    touched: int = 0
    dirty: bool = False
    last_checkpoint_at: float = field(default_factory=time.monotonic)
    wanted: list[tuple[str, str | None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    removed: bool = False
    exit_made: bool | None = None  # its exit checkpoint was taken (True) or nothing had changed (False)
    shadow: Path | None = None  # workspace = "shadow": its overlay's directory (actors/shadow.py)
    pid: int | None = None  # its agent's first process (in the overlay's mount namespace)
    held: set[str] = field(default_factory=set)  # shadow: paths of critical violations awaiting a decision
    validator_approvals: set[str] = field(default_factory=set)
    promoted_n: int = 0  # shadow: the newest checkpoint promoted
    shadow_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def running(self) -> bool:
        return self.started and not self.ended_seq

    def ready(self) -> bool:
        """Is the worktree known and present on this host?"""
        return self.worktree is not None and not self.removed and self.worktree.is_dir()


class Checkpointer(Actor):
    """Checkpoints, rollbacks and commits, coordinated with the spawner only through events."""

    name = "checkpointer"

    def __init__(
        self,
        bus: Bus,
        *,
        state_dir: Path,
        settings: CheckpointSettings | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(bus, instance=instance)
        self.settings = settings or CheckpointSettings()
        self.state_dir = state_dir
        self.executions: dict[str, _Execution] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._own_pauses: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: list[Any] = []
        self._pending_history = 0
        self.caught_up = asyncio.Event()
        self._awaiting_promotion: set[str] = set()  # shadow executions checkpointed here, not promoted yet
        self.stats = {"checkpoints": 0, "skipped": 0, "rollbacks": 0, "commits": 0, "failed": 0, "exits_caught_up": 0}
        self._handlers: dict[str, Callable[[_Execution, dict[str, Any], int, bool], None]] = {
            "workspace.created": self._on_workspace,
            "execution.started": self._on_started,
            "execution.paused": self._on_paused,
            "execution.resumed": self._on_resumed,
            "execution.exited": self._on_ended,
            "execution.failed": self._on_ended,
            "file.touched": self._on_touched,
            "checkpoint.created": self._on_checkpoint,
            "workspace.removed": self._on_removed,
            "approval.requested": self._on_approval,
            "validation.passed": self._on_validation,
            "validation.failed": self._on_validation,
            "approval.granted": self._on_decision,
            "approval.denied": self._on_decision,
        }

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            **self.stats,
            "tracked": len(self.executions),
            "running": sum(1 for e in self.executions.values() if e.running),
            "caught_up": self.caught_up.is_set(),
        }

    # --- reading the log ---------------------------------------------------------------------

    async def prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        js = self.bus.js
        self._pending_history = len(STATE_TYPES)
        for kind in STATE_TYPES:
            has_history = await self._has_events(kind)
            if not has_history:
                self._pending_history -= 1
            self._subs.append(
                await js.subscribe(
                    events_of_type(kind),
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    cb=self._state_callback(has_history),
                    pending_msgs_limit=-1,
                    pending_bytes_limit=-1,
                )
            )
        for kind in REQUEST_TYPES:
            self._subs.append(
                await js.subscribe(
                    events_of_type(kind),
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                    cb=self._on_request,
                    pending_msgs_limit=-1,
                    pending_bytes_limit=-1,
                )
            )
        if self._pending_history == 0:
            self._on_caught_up()

    async def _has_events(self, kind: str) -> bool:
        info = await self.bus.js.stream_info(STREAM, subjects_filter=events_of_type(kind))
        return bool(info.state.subjects)

    def _state_callback(self, has_history: bool) -> Callable[[Msg], Any]:
        pending = [has_history]

        async def on_msg(msg: Msg) -> None:
            try:
                seq = ack_sequence(msg.reply)
                execution_id, kind = split_subject(msg.subject)
                raw = orjson.loads(msg.data)
                live = not pending[0]
                ex = self.executions.get(execution_id)
                if ex is None:
                    ex = self.executions[execution_id] = _Execution(execution_id)
                handler = self._handlers.get(kind)  # control.rejected: only _resolve matters
                if handler is not None:
                    handler(ex, raw, seq, live)
                self._resolve(raw)
            except Exception:
                log.exception("checkpointer: cannot handle %s", msg.subject)
            finally:
                if pending[0] and ack_pending(msg.reply) == 0:
                    pending[0] = False
                    self._pending_history -= 1
                    if self._pending_history == 0:
                        self._on_caught_up()

        return on_msg

    def _on_caught_up(self) -> None:
        self.caught_up.set()
        # Executions that ended while no checkpointer ran: take their exit checkpoint now. One whose
        # exit was looked at already and had nothing new (no checkpoint.created tells that) is left:
        # without its mark, every start of a checkpointer looked at every finished worktree again.
        checked = self._exits_checked()
        for execution_id in checked:
            known = self.executions.get(execution_id)
            if known is None or known.removed:  # its worktree is gone: the mark is no longer needed
                with contextlib.suppress(OSError):
                    (self._exit_marks / execution_id).unlink()
        for ex in self.executions.values():
            if (
                ex.ended_seq
                and ex.ended_seq > ex.cp_seq
                and self.settings.on_exit
                and ex.execution_id not in checked
                and ex.ready()
            ):
                self.stats["exits_caught_up"] += 1
                self._trigger(ex, "exit", None)

    @property
    def _exit_marks(self) -> Path:
        """One empty file per execution whose exit checkpoint found nothing changed (this host's worktrees)."""
        return self.state_dir / "exit-checked"

    def _exits_checked(self) -> set[str]:
        try:
            return set(os.listdir(self._exit_marks))
        except FileNotFoundError:
            return set()

    def _mark_exit_checked(self, ex: _Execution) -> None:
        with contextlib.suppress(OSError):
            self._exit_marks.mkdir(parents=True, exist_ok=True)
            (self._exit_marks / ex.execution_id).touch()

    def _resolve(self, raw: dict[str, Any]) -> None:
        cause = raw.get("causation_id")
        if cause is not None:
            waiter = self._waiters.get(cause)
            if waiter is not None and not waiter.done():
                waiter.set_result(raw)

    def _on_workspace(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        data = raw["data"]
        ex.worktree = Path(data["path"])
        ex.repo = data["repo"]
        ex.base_commit = data["base_commit"]
        ex.shadow = Path(data["shadow"]) if data.get("shadow") else None
        if ex.last_commit is None:
            ex.last_commit = ex.base_commit

    def _on_started(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        ex.started = True
        ex.pid = raw["data"].get("pid")
        ex.last_checkpoint_at = time.monotonic()

    def _on_paused(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        ex.paused = True
        ours = raw.get("causation_id") in self._own_pauses
        if live and not ours and self.settings.on_pause and ex.running:
            self._trigger(ex, "pause", None)

    def _on_resumed(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        ex.paused = False

    def _on_ended(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        ex.ended_seq = max(ex.ended_seq, seq)
        ex.paused = False
        if live and self.settings.on_exit:
            self._trigger(ex, "exit", None, delay=0.0)

    def _on_touched(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        if seq <= ex.cp_seq:
            return
        ex.dirty = True
        ex.touched += 1
        after = self.settings.after_files
        if live and after and ex.touched >= after:
            self._trigger(ex, "files", None, delay=max(self.settings.debounce_s, 0.0))

    def _on_checkpoint(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        if seq <= ex.cp_seq:
            return
        data = raw["data"]
        ex.cp_seq = seq
        if data["n"] >= ex.n:
            ex.n, ex.last_commit, ex.last_tree = data["n"], data["commit"], data["tree"]
            ex.last_skipped = tuple(Skipped(f["path"], f["size"]) for f in data.get("skipped") or ())

    def _on_removed(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        ex.removed = True
        if live:  # (one removed before this start: its mark is dropped once the history is read)
            with contextlib.suppress(OSError):
                (self._exit_marks / ex.execution_id).unlink()

    def _on_approval(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        if raw["data"].get("source") == "validator":
            ex.validator_approvals.add(raw["data"].get("approval_id"))
        if live and self.settings.on_approval and ex.running:
            self._trigger(ex, "approval", raw.get("id"), delay=0.0)

    async def _on_request(self, msg: Msg) -> None:
        try:
            execution_id, kind = split_subject(msg.subject)
            raw = orjson.loads(msg.data)
            ex = self.executions.get(execution_id)
            if ex is None:
                ex = self.executions[execution_id] = _Execution(execution_id)
            if kind == "checkpoint.requested":
                self._trigger(ex, "demand", raw["id"], delay=0.0)
            elif kind == "rollback.requested":
                self._spawn(self._rollback(ex, raw))
            elif kind == "commit.requested":
                self._spawn(self._commit(ex, raw))
        except Exception:
            log.exception("checkpointer: cannot handle %s", msg.subject)

    # --- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        interval = self.settings.interval_s
        tick = min(max(interval / 4, 0.2), 5.0) if interval > 0 else 5.0
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), tick)
            if interval <= 0 or not self.caught_up.is_set():
                continue
            now = time.monotonic()
            for ex in list(self.executions.values()):
                if ex.running and ex.dirty and now - ex.last_checkpoint_at >= interval and not ex.wanted:
                    self._trigger(ex, "interval", None, delay=0.0)

    async def on_stop(self) -> None:
        if any(ex.running for ex in self.executions.values()):
            await asyncio.sleep(0.1)  # exits the stopping spawner just recorded: let them arrive
        for _ in range(50):  # a shadow checkpoint taken here: its validation, then its promotion (at most 5 s)
            if not self._awaiting_promotion:
                break
            await asyncio.sleep(0.1)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        tasks = [t for t in self._tasks if not t.done()]
        tasks += [ex.task for ex in self.executions.values() if ex.task is not None and not ex.task.done()]
        if tasks:
            # Let a checkpoint in progress finish (it is short); cut off anything slower.
            _, slow = await asyncio.wait(tasks, timeout=5.0)
            for task in slow:
                task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- checkpoints -------------------------------------------------------------------------

    def _trigger(self, ex: _Execution, trigger: str, cause: str | None, *, delay: float | None = None) -> None:
        ex.wanted.append((trigger, cause))
        if ex.task is None or ex.task.done():
            wait = self.settings.debounce_s if delay is None else delay
            ex.task = asyncio.create_task(self._drain(ex, wait))

    async def _drain(self, ex: _Execution, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await self.caught_up.wait()  # the chain (n, parent) is known only once history is read
        while ex.wanted:
            wanted, ex.wanted = ex.wanted, []
            demands = [cause for trigger, cause in wanted if trigger == "demand"]
            others = [(t, c) for t, c in wanted if t != "demand"]
            try:
                if others:
                    trigger = min((t for t, _ in others), key=TRIGGER_ORDER.index)
                    cause = next((c for t, c in others if t == trigger and c), None)
                    made = await self.checkpoint(ex, trigger, cause)
                    if trigger == "exit":
                        ex.exit_made = made is not None
                for cause in demands:
                    await self._demanded(ex, cause)
            except (CheckpointError, PublishError) as exc:
                self.stats["failed"] += 1
                log.warning("checkpointer: %s: %s", ex.execution_id, exc)
            except Exception as exc:
                self.stats["failed"] += 1
                if not ex.ready():  # its worktree went away meanwhile (a spawn that failed late, a prune)
                    log.warning("checkpointer: %s: no checkpoint, its worktree is gone (%s)", ex.execution_id, exc)
                else:
                    log.exception("checkpointer: %s: checkpoint failed", ex.execution_id)

    async def exit_checkpoint(self, execution_id: str, timeout_s: float) -> bool | None:
        """Wait (at most `timeout_s`) for the exit checkpoint of an execution that ended: True when
        one was published, False when none will come (nothing had changed), None when unknown.

        `corral run`, with this checkpointer in its own process, then waits for the validation of
        an exit checkpoint only when there is one (there is no event for "nothing changed").
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            ex = self.executions.get(execution_id)
            if ex is not None and ex.exit_made is not None:
                return ex.exit_made
            await asyncio.sleep(0.01)
        return None

    async def _demanded(self, ex: _Execution, cause: str | None) -> None:
        if not ex.ready():
            reason = "its worktree is gone" if ex.removed else "it has no worktree on this host (yet)"
            await self._reject(ex, "checkpoint.requested", reason, cause)
            return
        try:
            made = await self.checkpoint(ex, "demand", cause)
        except CheckpointError as exc:
            await self._reject(ex, "checkpoint.requested", str(exc), cause)
            return
        if made is None:
            last = f"checkpoint {ex.n}" if ex.n else "its base commit"
            await self._reject(ex, "checkpoint.requested", f"{NOTHING_CHANGED} {last}", cause)

    async def checkpoint(self, ex: _Execution, trigger: str, cause: str | None) -> Snapshot | None:
        """Take one checkpoint now (serialized per execution); None when nothing changed."""
        if not ex.ready() or ex.base_commit is None:
            return None
        assert ex.worktree is not None
        # After a reboot a disk-quota worktree is an empty mount point until its image is mounted
        # again (corral up's spawner does it, maybe after this): never checkpoint it empty.
        try:
            await asyncio.to_thread(diskquota.remount, ex.worktree)
        except diskquota.DiskQuotaError as exc:
            log.warning("checkpointer: %s", exc)
            return None
        async with ex.lock:
            return await self._checkpoint_locked(ex, trigger, cause)

    def _shadow_tree(self, ex: _Execution) -> TreeMaker | None:
        """A shadow execution's checkpoints are of what its agent sees (actors/shadow.py merged_tree)."""
        if ex.shadow is None:
            return None
        from actors import shadow

        return functools.partial(shadow.merged_tree, root=ex.shadow, max_file_bytes=self.settings.max_file_bytes)

    async def _checkpoint_locked(self, ex: _Execution, trigger: str, cause: str | None) -> Snapshot | None:
        assert ex.worktree is not None
        assert ex.base_commit is not None
        started = time.perf_counter()
        parent = ex.last_commit or ex.base_commit
        if ex.last_tree is None:
            ex.last_tree = await tree_of(ex.worktree, parent)
        n, expected = ex.n + 1, ex.cp_seq
        index = self.state_dir / f"{ex.execution_id}.index"
        try:
            snap = await take_checkpoint(
                ex.worktree,
                index,
                execution_id=ex.execution_id,
                n=n,
                parent=parent,
                parent_tree=ex.last_tree,
                message=f"corral checkpoint {ex.execution_id} #{n} ({trigger})",
                max_file_bytes=self.settings.max_file_bytes,
                skipped_before=ex.last_skipped,
                tree_maker=self._shadow_tree(ex),
            )
        except CheckpointError as exc:
            if "already exists" in exc.reason:
                ref = checkpoint_ref(ex.execution_id, n)
                raise CheckpointError(str(ex.worktree), f"{ref} exists already") from None
            raise
        touched_before = ex.touched
        if snap is None:
            self.stats["skipped"] += 1
            if trigger == "exit":  # the worktree as it ended is checkpointed already: not again at a start
                self._mark_exit_checked(ex)
            ex.dirty = ex.touched > touched_before
            ex.touched = 0
            ex.last_checkpoint_at = time.monotonic()
            return None
        data = CheckpointCreated(
            n=snap.n,
            ref=snap.ref,
            commit=snap.commit,
            tree=snap.tree,
            parent=snap.parent,
            trigger=trigger,
            files=tuple(FileStat(path=f.path, added=f.added, deleted=f.deleted) for f in snap.files),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            skipped=tuple(SkippedFile(path=f.path, size=f.size) for f in snap.skipped),
        )
        event = self.bus.event(ex.execution_id, data, actor=self.instance, causation_id=cause)
        try:
            ack = await self.bus.publisher.publish(event, expected_last_subject_seq=expected)
        except WrongLastSequence:
            # Another checkpointer recorded a checkpoint meanwhile: ours is not part of the chain.
            await git("update-ref", "-d", snap.ref, snap.commit, cwd=ex.worktree, check=False)
            raise CheckpointError(str(ex.worktree), "another checkpointer recorded a checkpoint first") from None
        ex.n, ex.last_commit, ex.last_tree, ex.last_skipped = snap.n, snap.commit, snap.tree, snap.skipped
        ex.cp_seq = max(ex.cp_seq, ack.seq)
        if ex.shadow is not None:
            self._awaiting_promotion.add(ex.execution_id)
        ex.touched, ex.dirty = 0, False
        ex.last_checkpoint_at = time.monotonic()
        self.stats["checkpoints"] += 1
        return snap

    # --- the shadow workspace (actors/shadow.py, docs/shadow.md) ---------------------------------

    def _on_validation(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        """A checkpoint was judged: hold its critical paths; promote the rest (shadow executions)."""
        data = raw["data"]
        n = data.get("checkpoint")
        if ex.shadow is None or n is None:
            return
        violations = data.get("violations") or ()
        ex.held |= {v["path"] for v in violations if v.get("severity") == "critical" and v.get("path")}
        if live:
            self._spawn(self._promote(ex, int(n), raw.get("id")))

    def _on_decision(self, ex: _Execution, raw: dict[str, Any], seq: int, live: bool) -> None:
        """A validator's approval was decided: promote the held paths (granted) or discard them (denied)."""
        approval_id = raw["data"].get("approval_id")
        if ex.shadow is None or not live or approval_id not in ex.validator_approvals:
            return
        if raw["type"] == "approval.granted":
            self._spawn(self._promote(ex, None, raw.get("id"), granted=approval_id))
        else:
            self._spawn(self._discard(ex, str(approval_id), raw.get("id")))

    async def _promote(self, ex: _Execution, n: int | None, cause: str | None, *, granted: str | None = None) -> None:
        """Write checkpoint n's validated files (all but the held ones) into the real worktree; with
        `granted`, the held ones too, from the newest checkpoint promoted."""
        from actors import shadow

        assert ex.shadow is not None
        async with ex.shadow_lock:
            if not ex.ready():
                return
            assert ex.worktree is not None
            if granted is not None:
                n = ex.promoted_n or ex.n
                ex.held.clear()
            elif n is None or n < ex.promoted_n:
                return  # a newer checkpoint was promoted already
            if not n:
                return
            try:
                _, out, _ = await git("rev-parse", f"{checkpoint_ref(ex.execution_id, n)}^{{tree}}", cwd=ex.worktree)
                index = self.state_dir / f"{ex.execution_id}.promoted.index"
                files, held = await shadow.promote(ex.worktree, ex.shadow, index, out.strip(), set(ex.held))
            except (CheckpointError, OSError) as exc:
                log.warning("checkpointer: %s: promotion of checkpoint %s failed: %s", ex.execution_id, n, exc)
                self._awaiting_promotion.discard(ex.execution_id)
                return
            ex.promoted_n = max(ex.promoted_n, n)
            if ex.promoted_n >= ex.n:
                self._awaiting_promotion.discard(ex.execution_id)
            if files or held or granted:
                data = WorkspacePromoted(checkpoint=n, files=tuple(files), held=tuple(held), approval_id=granted)
                await self._emit(ex, data, cause)

    async def _discard(self, ex: _Execution, approval_id: str, cause: str | None) -> None:
        """Drop the held paths: the agent sees the worktree's version again (or no file)."""
        from actors import shadow

        assert ex.shadow is not None
        root = ex.shadow
        async with ex.shadow_lock:
            if not ex.ready():
                return
            assert ex.worktree is not None
            worktree = ex.worktree
            paths, ex.held = sorted(ex.held), set()
            pid = ex.pid if ex.running else None
            mounted = pid is not None and shadow.overlay_mounted(pid, worktree, root)
            done = await asyncio.to_thread(shadow.discard, worktree, root, paths, pid)
            left = sorted(set(paths) - set(done))
            if left and mounted:
                # its namespace is going away meanwhile (cancelled): the rest from the upper layer, once unmounted
                for _ in range(100):
                    if not shadow.overlay_mounted(pid or 0, worktree, root):
                        break
                    await asyncio.sleep(0.1)
                else:
                    log.warning("checkpointer: %s: cannot discard %s", ex.execution_id, left)
                    return
                done += await asyncio.to_thread(shadow.discard, worktree, root, left, None)
            through: Literal["namespace", "upper"] = "namespace" if mounted else "upper"
            await self._emit(ex, WorkspaceDiscarded(approval_id=approval_id, files=tuple(done), through=through), cause)

    # --- requests ----------------------------------------------------------------------------

    async def _reject(self, ex: _Execution, request: str, reason: str, cause: str | None) -> None:
        await self._emit(ex, ControlRejected(request=request, reason=reason), cause)

    async def _emit(self, ex: _Execution, data: EventData, cause: str | None) -> dict[str, Any]:
        event = self.bus.event(ex.execution_id, data, actor=self.instance, causation_id=cause)
        await self.bus.publisher.publish(event)
        return {"id": event.id}

    async def _ask(self, ex: _Execution, data: EventData, confirm: str, cause: str | None) -> str | None:
        """Publish a pause/resume request and wait for its confirmation; return the refusal, if any."""
        event = self.bus.event(ex.execution_id, data, actor=self.instance, causation_id=cause)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[event.id] = waiter
        if confirm == "execution.paused":
            self._own_pauses.add(event.id)
        try:
            await self.bus.publisher.publish(event)
            answer = await asyncio.wait_for(waiter, PAUSE_WAIT_S)
        except TimeoutError:
            return f"no spawner confirmed within {PAUSE_WAIT_S:.0f}s (is its `corral up` alive?)"
        finally:
            self._waiters.pop(event.id, None)
        if answer.get("type") == "control.rejected":
            return str(answer["data"].get("reason"))
        return None

    async def _rollback(self, ex: _Execution, raw: dict[str, Any]) -> None:
        cause = raw["id"]
        data = raw["data"]
        paths: list[str] = list(data.get("paths") or [])
        to = data.get("to_checkpoint")
        try:
            if not ex.ready() or ex.worktree is None or ex.base_commit is None:
                await self._reject(ex, "rollback.requested", "its worktree is not on this host (or gone)", cause)
                return
            target_n = ex.n if to is None else int(to)
            if target_n < 0 or target_n > ex.n:
                await self._reject(ex, "rollback.requested", f"no checkpoint {target_n} (it has 1..{ex.n})", cause)
                return
            target = ex.base_commit if target_n == 0 else checkpoint_ref(ex.execution_id, target_n)
            _, target_commit, _ = await git("rev-parse", "--verify", f"{target}^{{commit}}", cwd=ex.worktree)
            target_tree = await tree_of(ex.worktree, target_commit.strip())
            was_running = ex.running and not ex.paused
            if was_running:
                refusal = await self._ask(
                    ex, PauseRequested(reason="rollback", requested_by=REQUESTER), "execution.paused", cause
                )
                if refusal is not None:
                    await self._reject(ex, "rollback.requested", f"cannot pause the agent: {refusal}", cause)
                    return
            # change.rolled_back is the answer `corral rollback` waits for: it is recorded after the
            # agent runs again, so whoever reads the system after it sees it running, not paused
            try:
                async with ex.lock:
                    await self._checkpoint_locked(ex, "rollback", cause)  # what was there: never lost
                    current = ex.last_tree or await tree_of(ex.worktree, ex.last_commit or ex.base_commit)
                    changed = await restore(
                        ex.worktree,
                        self.state_dir / f"{ex.execution_id}.restore.index",
                        target=target_tree,
                        current=current,
                        paths=paths,
                    )
                    after = await self._checkpoint_locked(ex, "rollback", cause)
                rolled = ChangeRolledBack(
                    to_checkpoint=target_n,
                    paths=tuple(paths or changed),
                    checkpoint=after.n if after is not None else None,
                )
            finally:
                if was_running:
                    refusal = await self._ask(
                        ex, ResumeRequested(reason="rollback done", requested_by=REQUESTER), "execution.resumed", cause
                    )
                    if refusal is not None:
                        log.warning("checkpointer: %s: resume after rollback refused: %s", ex.execution_id, refusal)
            self.stats["rollbacks"] += 1
            await self._emit(ex, rolled, cause)
        except CheckpointError as exc:
            await self._reject(ex, "rollback.requested", exc.reason, cause)

    async def _commit(self, ex: _Execution, raw: dict[str, Any]) -> None:
        cause = raw["id"]
        data = raw["data"]
        paths: list[str] = list(data.get("paths") or [])
        message = data["message"]
        try:
            if not ex.ready() or ex.worktree is None:
                await self._reject(ex, "commit.requested", "its worktree is not on this host (or gone)", cause)
                return
            async with ex.lock:
                await git("add", "-A", "--", *(paths or ["."]), cwd=ex.worktree)
                code, _, _ = await git("diff", "--cached", "--quiet", "--", *paths, cwd=ex.worktree, check=False)
                if code == 0:
                    await self._reject(ex, "commit.requested", "nothing to commit (no changes in those paths)", cause)
                    return
                commit_args = ["commit", "--quiet", "--no-verify", "-m", message]
                if paths:
                    commit_args += ["--", *paths]
                _, name, _ = await git("config", "user.email", cwd=ex.worktree, check=False)
                await git(*commit_args, cwd=ex.worktree, env=None if name.strip() else IDENTITY)
                _, head, _ = await git("rev-parse", "HEAD", cwd=ex.worktree)
            self.stats["commits"] += 1
            await self._emit(ex, ChangeCommitted(commit=head.strip(), message=message, paths=tuple(paths)), cause)
        except CheckpointError as exc:
            await self._reject(ex, "commit.requested", exc.reason, cause)
