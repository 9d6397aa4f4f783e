"""Worktrees: the inventory of every execution's worktree (what pruning would lose), removal, and
pull requests of an execution's branch on the forge."""

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from actors import diskquota
from actors.errors import WorkspaceError
from actors.limits import disk_usage
from actors.worktree import remove_worktree
from corral.config import ForgeSettings, format_duration, load_config
from corral.errors import CorralError, UsageError
from corral.forge import Forge, ForgeError, PullRequest, repo_from_remote_url
from corral.home import Home
from corral.ops.base import query
from corral.ops.control import execution_row
from corral.rows import records
from corral.system import System
from events.envelope import new_event
from events.ids import is_valid_execution_id
from events.types import (
    EventData,
    PullRequestFailed,
    PullRequestOpened,
    PullRequestRequested,
    WorkspaceRemoved,
)
from events.units import parse_duration
from projections.state import ACTIVE_STATES

GIT_ENV = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def _git(*args: str, cwd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        check=False,
        env=GIT_ENV,
        stdin=subprocess.DEVNULL,
    )


def _git_out(*args: str, cwd: str | Path) -> str | None:
    """git's stdout, stripped, or None when git fails."""
    result = _git(*args, cwd=cwd)
    return result.stdout.strip() if result.returncode == 0 else None


def _git_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "fatal:", "!", "remote:"))]
    return (errors or lines or ["git failed"])[-1]


def _ref_exists(repo: str | Path, ref: str) -> bool:
    return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=repo).returncode == 0


def unmerged_commits(repo: str | Path, branch: str | None, head: str | None = None) -> int | None:
    """Commits on `branch` (and a worktree's HEAD) reachable from no other branch, tag or remote-tracking ref.

    Hidden checkpoint refs (refs/corral/*) do not count as merged: they are Corral's own, and
    pruning keeps them, but a commit only they hold is not in the user's history.
    """
    tips = []
    if branch and _ref_exists(repo, f"refs/heads/{branch}"):
        tips.append(f"refs/heads/{branch}")
    if head:
        tips.append(head)
    if not tips:
        return 0
    args = ["rev-list", "--count", *tips, "--not"]
    if branch:
        args.append(f"--exclude={branch}")
    args += ["--branches", "--tags", "--remotes"]
    out = _git_out(*args, cwd=repo)
    return int(out) if out is not None and out.isdigit() else None


def uncommitted_files(worktree: str | Path) -> int | None:
    """Entries of `git status --porcelain` (modified, staged, untracked), or None if git cannot tell."""
    result = _git("status", "--porcelain", "--untracked-files=all", cwd=worktree)
    if result.returncode != 0:
        return None
    return len([line for line in result.stdout.splitlines() if line.strip()])


def _is_worktree_top(path: Path) -> bool:
    """Whether `path` is itself a working git worktree (not merely inside some other repository)."""
    if not (path / ".git").exists():
        return False
    top = _git_out("rev-parse", "--show-toplevel", cwd=path)
    return top is not None and os.path.realpath(top) == os.path.realpath(path)


@dataclass
class Worktree:
    """One worktree Corral made, as found on disk and in git, joined with its execution's state."""

    path: str
    execution_id: str
    state: str  # the execution's state, or "unknown" when the log has no such execution
    repo: str | None
    branch: str | None
    exists: bool  # the directory is there (False: only a git registration is left)
    disk_bytes: int | None = None
    unmerged_commits: int | None = None
    uncommitted_files: int | None = None
    head: str | None = None
    ended_at: str | None = None
    age_s: float | None = None  # since the execution ended (or the directory last changed)
    orphan: str | None = None  # why it has no live execution; None when it has one
    problem: str | None = None  # what is wrong with it as a git worktree

    @property
    def live(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _parse_ts(text: Any) -> datetime | None:
    if not text:
        return None
    value = text if isinstance(text, datetime) else datetime.fromisoformat(str(text))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _registrations(repo: str) -> list[dict[str, str]]:
    """`git worktree list --porcelain` of a repository, one dict per worktree."""
    out = _git_out("worktree", "list", "--porcelain", cwd=repo)
    entries: list[dict[str, str]] = []
    for block in (out or "").split("\n\n"):
        entry: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            entry[key] = value
        if "worktree" in entry:
            entries.append(entry)
    return entries


def _repo_of_dir(path: Path) -> str | None:
    common = _git_out("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=path)
    if common is None:
        return None
    common_path = Path(common)
    return str(common_path.parent if common_path.name == ".git" else common_path)


def inspect(item: Worktree) -> Worktree:
    """Fill in disk usage, HEAD, unmerged commits and uncommitted files from disk and git."""
    path = Path(item.path)
    item.exists = path.is_dir()
    if item.exists:
        item.disk_bytes = disk_usage(path)
        if not _is_worktree_top(path):
            item.problem = "not a working git worktree any more (its repository or git registration is gone)"
            item.head = item.unmerged_commits = item.uncommitted_files = None
            return item
        item.problem = None
        item.head = _git_out("rev-parse", "--verify", "--quiet", "HEAD", cwd=path)
        item.uncommitted_files = uncommitted_files(path)
        item.unmerged_commits = unmerged_commits(path, item.branch, item.head)
    elif item.repo and Path(item.repo).is_dir():
        item.disk_bytes = 0
        item.uncommitted_files = 0
        item.unmerged_commits = unmerged_commits(item.repo, item.branch, item.head)
    return item


def scan_dirs(home: Home) -> list[Path]:
    """The execution directories under the worktrees folder (names that are not execution ids are not Corral's)."""
    if not home.worktrees.is_dir():
        return []
    return sorted(p for p in home.worktrees.iterdir() if p.is_dir() and is_valid_execution_id(p.name))


def build_inventory(
    home: Home, dirs: list[Path], rows: dict[str, dict[str, Any]], *, with_git: bool = True
) -> list[Worktree]:
    """Join the directories (listed before the executions were read) with the executions and git's registrations."""
    now = datetime.now(UTC)
    items: list[Worktree] = []
    repos: set[str] = set()
    for path in dirs:
        execution_id = path.name
        row = rows.get(execution_id)
        repo = row.get("repo") if row else None
        if repo is None or not Path(repo).is_dir():
            repo = _repo_of_dir(path) if (path / ".git").exists() else repo
        item = Worktree(
            path=str(path),
            execution_id=execution_id,
            state=row["state"] if row else "unknown",
            repo=repo,
            branch=(row.get("branch") if row else None) or f"corral/{execution_id}",
            exists=True,
            ended_at=str(row["ended_at"]) if row and row.get("ended_at") else None,
        )
        items.append(item)
        if repo:
            repos.add(repo)
    worktrees_root = os.path.realpath(home.worktrees)
    for row in rows.values():
        worktree = row.get("worktree")
        if row.get("repo") and worktree and os.path.realpath(os.path.dirname(worktree)) == worktrees_root:
            repos.add(row["repo"])
    seen = {os.path.realpath(item.path) for item in items}
    for repo in sorted(repos):
        if not Path(repo).is_dir():
            continue
        for entry in _registrations(repo):
            where = os.path.realpath(entry["worktree"])
            if os.path.dirname(where) != worktrees_root or where in seen or os.path.isdir(where):
                continue
            execution_id = os.path.basename(where)
            if not is_valid_execution_id(execution_id):
                continue
            seen.add(where)
            row = rows.get(execution_id)
            branch = entry.get("branch", "").removeprefix("refs/heads/") or None
            items.append(
                Worktree(
                    path=entry["worktree"],
                    execution_id=execution_id,
                    state=row["state"] if row else "unknown",
                    repo=repo,
                    branch=branch,
                    exists=False,
                    head=entry.get("HEAD"),
                    ended_at=str(row["ended_at"]) if row and row.get("ended_at") else None,
                )
            )
    for item in items:
        ended = _parse_ts(item.ended_at)
        if ended is not None:
            item.age_s = max(0.0, (now - ended).total_seconds())
        elif item.exists and not item.live:
            try:
                item.age_s = max(0.0, time.time() - Path(item.path).stat().st_mtime)
            except OSError:
                item.age_s = None
        if not item.exists:
            item.orphan = "directory is gone; only git's registration is left"
        elif item.state == "unknown":
            item.orphan = "unknown to the event log"
        elif not item.live:
            item.orphan = f"execution {item.state}"
        if with_git:
            inspect(item)
    return items


async def executions_by_id(system: System) -> dict[str, dict[str, Any]]:
    result = await query(
        system,
        "SELECT execution_id, state, repo, worktree, branch, base_commit, ended_at, workspace_removed FROM executions",
        max_rows=1_000_000,
    )
    return {row["execution_id"]: row for row in records(result["columns"], result["rows"])}


async def inventory(home: Home, system: System) -> list[Worktree]:
    await asyncio.to_thread(diskquota.remount_all, home.worktrees)  # after a reboot: their files are in images
    dirs = await asyncio.to_thread(scan_dirs, home)  # before the query: a newer directory is then in the log too
    rows = await executions_by_id(system)
    return await asyncio.to_thread(build_inventory, home, dirs, rows)


@dataclass
class Outcome:
    execution_id: str
    path: str
    action: str  # removed, would-remove, refused, kept, skipped, failed
    reason: str | None = None
    forced: bool = False
    freed_bytes: int | None = None
    branch: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def refusal(item: Worktree) -> str | None:
    """Why removing `item` would lose work, with what to do instead; None when nothing would be lost."""
    if item.problem:
        return f"{item.problem}; its files may be the only copy: look at {item.path}, then pass --force to delete it"
    reasons = []
    if item.unmerged_commits is None:
        reasons.append(f"cannot tell whether {item.branch} holds unmerged commits")
    elif item.unmerged_commits:
        n = item.unmerged_commits
        reasons.append(f"{n} commit{'s' if n != 1 else ''} on {item.branch} not merged into any branch, tag or remote")
    if item.exists and item.uncommitted_files is None:
        reasons.append("cannot read its git status")
    elif item.uncommitted_files:
        n = item.uncommitted_files
        reasons.append(f"{n} uncommitted file{'s' if n != 1 else ''} in {item.path}")
    if not reasons:
        return None
    todo = []
    if item.uncommitted_files:
        todo.append(f"commit them (`corral commit {item.execution_id} -m MSG`)")
    if item.unmerged_commits:
        todo.append(f"merge {item.branch} or push it (`corral pr {item.execution_id} --title T`)")
    todo.append("or pass --force to delete it anyway")
    return "; ".join(reasons) + ": " + ", ".join(todo)


async def remove(item: Worktree) -> None:
    """Delete the worktree (directory and git registration) and its branch; keep refs/corral/<id>/*."""
    path = Path(item.path)
    repo = item.repo if item.repo and os.path.isdir(item.repo) else None  # noqa: ASYNC240 - one stat call
    if repo is None or item.problem:
        await asyncio.to_thread(diskquota.release, path)  # its disk-quota mount and image, if it has one
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
    if repo is not None:
        await remove_worktree(Path(repo), path, branch=item.branch)
    if path.exists():  # noqa: ASYNC240 - one stat call
        raise WorkspaceError(str(path), "is still there after removing it")


def _ago(seconds: float) -> str:
    """A duration as `corral worktrees` shows ages (corral.render.human_duration's form; ops render nothing)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


async def prune_plan(home: Home, system: System, older_than: str | None) -> dict[str, Any]:
    """What `corral worktrees prune` looks at: {retention_s, retention (as said), outcomes (worktrees kept
    or skipped, and why), candidates (past the retention: `_prune_one` decides each, looking again)}."""
    if older_than is not None:
        try:
            retention = parse_duration(older_than)
        except ValueError as exc:
            raise UsageError(f"--older-than: {exc}") from None
        retention_text = older_than
    else:
        retention = load_config(home).worktrees.retention_s
        retention_text = f"{format_duration(retention)} ([worktrees] retention)"
    outcomes: list[dict[str, Any]] = []
    candidates: list[dict[str, Any]] = []
    for item in await inventory(home, system):
        if item.live:
            outcomes.append(asdict(Outcome(item.execution_id, item.path, "skipped", f"execution {item.state}")))
        elif item.age_s is not None and item.age_s < retention:
            why = f"ended {_ago(item.age_s)} ago, within the retention of {retention_text}"
            outcomes.append(asdict(Outcome(item.execution_id, item.path, "kept", why)))
        else:
            candidates.append(item.to_json())
    return {"retention_s": retention, "retention": retention_text, "outcomes": outcomes, "candidates": candidates}


async def _prune_one(system: System, item: Worktree, *, force: bool, dry_run: bool) -> Outcome:
    # Look again right before deciding: an earlier removal may have made these commits unreachable elsewhere.
    await asyncio.to_thread(inspect, item)
    details = {"unmerged_commits": item.unmerged_commits, "uncommitted_files": item.uncommitted_files}
    why = refusal(item)
    base: dict[str, Any] = {
        "execution_id": item.execution_id,
        "path": item.path,
        "branch": item.branch,
        "details": details,
    }
    if why and not force:
        return Outcome(**base, action="refused", reason=why)
    forced = why is not None
    reason = f"forced: {why.split(':')[0]}" if why else item.orphan
    if dry_run:
        return Outcome(**base, action="would-remove", reason=reason, forced=forced, freed_bytes=item.disk_bytes)
    try:
        await remove(item)
    except (WorkspaceError, OSError) as exc:
        return Outcome(**base, action="failed", reason=f"{exc}; nothing was recorded")
    await system.bus.publisher.publish(
        new_event(item.execution_id, WorkspaceRemoved(path=item.path, forced=forced), actor="cli")
    )
    return Outcome(**base, action="removed", reason=reason, forced=forced, freed_bytes=item.disk_bytes)


@dataclass(frozen=True)
class PrPlan:
    execution_id: str
    repo: str
    branch: str
    remote: str
    forge_repo: str
    base_url: str
    token: str = field(repr=False)
    ahead: int
    uncommitted: int | None


class PushFailed(CorralError):
    """git push of the execution's branch failed."""


def plan_pr(execution_id: str, row: dict[str, Any], forge: ForgeSettings, remote: str) -> PrPlan:
    """Check everything that can be checked locally, before anything is recorded or sent."""
    if not row.get("branch") or not row.get("repo"):
        raise CorralError(f"{execution_id} never got a worktree ({row.get('state')}); there is no branch to push")
    repo, branch = str(row["repo"]), str(row["branch"])
    if not Path(repo).is_dir():
        raise CorralError(f"the repository of {execution_id} is gone: {repo}")
    if not _ref_exists(repo, f"refs/heads/{branch}"):
        raise CorralError(f"branch {branch} no longer exists in {repo} (was the worktree pruned?)")
    base_commit = row.get("base_commit")
    ahead_text = None
    if base_commit:
        ahead_text = _git_out("rev-list", "--count", f"{base_commit}..refs/heads/{branch}", cwd=repo)
    ahead = int(ahead_text) if ahead_text and ahead_text.isdigit() else None
    if ahead is None:
        raise CorralError(f"cannot compare {branch} with its base {base_commit} in {repo}")
    if ahead == 0:
        raise CorralError(
            f"nothing committed on {branch} beyond its base {str(base_commit)[:10]}: "
            f"`corral commit {execution_id} -m MSG` first"
        )
    url = _git_out("remote", "get-url", "--push", remote, cwd=repo)
    if url is None:
        raise UsageError(
            f"no remote named {remote!r} in {repo}: add one (git -C {repo} remote add {remote} URL), "
            "or pass --remote NAME / set [forge] remote"
        )
    forge_repo = forge.repo or repo_from_remote_url(url)
    if forge_repo is None:
        raise UsageError(
            f'which forge repository? set [forge] repo = "owner/name" in corral.toml '
            f"(the URL of remote {remote!r}, {url}, names none)"
        )
    token = os.environ.get(forge.token_env, "").strip()
    if not token:
        raise UsageError(
            f"no forge token: set the environment variable {forge.token_env} ([forge] token_env) "
            "to a token that may open pull requests"
        )
    worktree = row.get("worktree")
    uncommitted = uncommitted_files(worktree) if worktree and Path(worktree).is_dir() else None
    return PrPlan(execution_id, repo, branch, remote, forge_repo, forge.base_url, token, ahead, uncommitted)


def push_and_open(plan: PrPlan, *, title: str, body: str | None, base: str | None) -> tuple[PullRequest, str]:
    """Check the forge, push the branch, open the pull request; on failure, leave local refs as they were."""
    forge = Forge(plan.base_url, plan.forge_repo, plan.token)
    if base is None:
        default = forge.repository().get("default_branch")
        if not isinstance(default, str) or not default:
            raise ForgeError(f"the forge names no default branch for {plan.forge_repo}; pass --base BRANCH")
        base = default
    else:
        forge.repository()  # the token and the repository are good before anything is pushed
    tracking = f"refs/remotes/{plan.remote}/{plan.branch}"
    before = _git_out("rev-parse", "--verify", "--quiet", tracking, cwd=plan.repo)
    refspec = f"refs/heads/{plan.branch}:refs/heads/{plan.branch}"
    pushed = _git("push", "--porcelain", plan.remote, refspec, cwd=plan.repo)
    if pushed.returncode != 0:
        raise PushFailed(
            f"git push of {plan.branch} to {plan.remote} failed: {_git_error(pushed)}; "
            "fix the remote (or its access) and run `corral pr` again"
        )
    try:
        pull = forge.open_pull_request(title=title, body=body, head=plan.branch, base=base)
    except ForgeError as exc:
        # The push updated our remote-tracking ref; put it back so nothing changed locally.
        if before:
            _git("update-ref", tracking, before, cwd=plan.repo)
        else:
            _git("update-ref", "-d", tracking, cwd=plan.repo)
        exc.message = f"{exc.message} ({plan.branch} was pushed to {plan.remote} and stays there)"
        raise
    return pull, base


async def _record(
    system: System, execution_id: str, data: EventData, cause: str | None = None, *, actor_name: str = "cli"
) -> str:
    event = new_event(execution_id, data, actor=actor_name, causation_id=cause)
    await system.bus.publisher.publish(event)
    return event.id


async def open_pr(
    system: System,
    execution_id: str,
    *,
    title: str,
    body: str | None = None,
    base: str | None = None,
    remote: str | None = None,
    actor_name: str = "cli",
) -> dict[str, Any]:
    """Push the execution's branch and open a pull request (pr.requested, then pr.opened or pr.failed):
    {execution_id, number, url, branch, base, remote, repo, commits, uncommitted}."""
    title = (title or "").strip()
    if not title:
        raise UsageError("--title must not be empty")
    forge = load_config(system.home).forge
    row = await execution_row(system, execution_id)
    plan = await asyncio.to_thread(plan_pr, execution_id, row, forge, remote or forge.remote)
    requested = PullRequestRequested(title=title, body=body, base=base)
    request_id = await _record(system, execution_id, requested, actor_name=actor_name)
    try:
        pull, merged_into = await asyncio.to_thread(push_and_open, plan, title=title, body=body, base=base)
    except CorralError as exc:
        await _record(system, execution_id, PullRequestFailed(error=exc.message), request_id, actor_name=actor_name)
        raise
    await _record(
        system,
        execution_id,
        PullRequestOpened(url=pull.url, number=pull.number, branch=plan.branch),
        request_id,
        actor_name=actor_name,
    )
    return {
        "execution_id": execution_id,
        "number": pull.number,
        "url": pull.url,
        "branch": plan.branch,
        "base": merged_into,
        "remote": plan.remote,
        "repo": plan.forge_repo,
        "commits": plan.ahead,
        "uncommitted": plan.uncommitted,
    }
