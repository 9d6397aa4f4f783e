"""Submitting: what `corral run` (and POST /api/executions) takes, checked into an execution request."""

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.adapters import build_command, split_words
from actors.errors import WorkspaceError
from actors.policy import PolicyError, effective_policy
from actors.worktree import repo_root, resolve_commit
from corral.config import Config, ConfigError, load_config, resolve_run
from corral.errors import UsageError
from corral.home import Home
from corral.ops import followup
from corral.ops.base import check_command, check_request_size, refuse_secret_env
from corral.system import System
from events.envelope import new_event
from events.ids import new_execution_id
from events.types import ExecutionRequested, Limits, SandboxRequest, Timeouts


class RunSpec(BaseModel):
    """What `corral run` takes (and `POST /api/executions`): a command, or an agent and a task."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(".", description="git repository to branch from (a path on the host that runs Corral)")
    base: str = Field("HEAD", description="commit or ref to start from")
    command: list[str] = Field(default_factory=list, description="the program and its arguments")
    agent: Literal["command", "claude-code", "codex", "gemini", "aider"] | None = None
    task: str | None = Field(None, description="the task text (an agent's prompt)")
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    template: str | None = Field(None, description="a template of corral.toml")
    priority: int | None = None
    timeout: str | float | None = Field(None, description="hard wall-clock limit, e.g. 30m")
    idle_timeout: str | float | None = None
    spawn_timeout: str | float | None = None
    on_stall: Literal["notify", "pause", "cancel", "restart"] | None = None
    workspace: Literal["direct", "shadow"] | None = Field(None, description="shadow: an overlay (docs/shadow.md)")
    memory: str | int | None = Field(None, description="memory limit, e.g. 2G")
    cpus: str | float | None = None
    disk: str | int | None = None
    pids: str | int | None = None
    max_cost: str | float | None = Field(None, description="budget in USD")
    sandbox: str | None = None
    network: str | None = None
    allow: list[str] | None = Field(None, description='network = "allow": host:port pairs the agent may reach')
    policy: dict[str, Any] | None = Field(None, description="policy keys for this run (over [policy])")
    resume: str | None = Field(None, description="a follow-up of this finished execution (id or prefix)")


async def build_request(
    home: Home, spec: RunSpec, *, system: System | None = None, requested_by: str | None = None
) -> tuple[str, ExecutionRequested]:
    """Check a RunSpec as `corral run` does and return (new execution id, its request): nothing is sent.

    `system`: a connected one to look a follow-up's parent up in (else one is joined for that)."""

    config = load_config(home)
    parent = await followup.find_parent(home, spec.resume, spec.agent, system) if spec.resume else None
    command = list(spec.command)
    if command and command[0] == "--":
        command = command[1:]
    if not parent and not spec.agent and not spec.template and not command:
        check_command([], Path("."))  # "nothing to run" first, wherever it comes from
    try:
        repo = repo_root(parent.request.repo if parent else spec.repo)
        resolve_commit(repo, spec.base)
    except WorkspaceError as exc:
        raise UsageError(str(exc)) from None
    try:
        resolved = resolve_run(
            config,
            spec.template,
            {
                "timeout_s": _text(spec.timeout),
                "idle_timeout_s": _text(spec.idle_timeout),
                "spawn_timeout_s": _text(spec.spawn_timeout),
                "on_stall": spec.on_stall,
                # a follow-up keeps its parent's workspace (a shadow one's pending files are there)
                "workspace": spec.workspace or (parent.request.workspace if parent else None),
                "memory_bytes": _text(spec.memory),
                "cpus": _text(spec.cpus),
                "disk_bytes": _text(spec.disk),
                "pids_max": _text(spec.pids),
                "priority": spec.priority,
                "max_cost_usd": _text(spec.max_cost),
                "env": {**(parent.request.env if parent else {}), **spec.env},
                "agent": spec.agent or (parent.request.agent if parent else None),
                "sandbox": spec.sandbox,
                "network": spec.network,
                "allow": spec.allow,
            },
        )
    except ConfigError as exc:
        raise UsageError(exc.message) from None
    refuse_secret_env(resolved.env, config.security.secret_env)
    task = spec.task
    agent_args: list[str] = []
    if resolved.agent and resolved.agent != "command":
        try:  # the adapter builds the CLI's command line from the task (actors/adapters)
            task, extra = split_words(spec.task, command)
            agent_args = list(parent.request.agent_args) if parent and not extra else [*resolved.args, *extra]
            built = build_command(resolved.agent, task, agent_args, resume=parent.resume_arg if parent else None)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        command = check_command(built, repo, spec.base)
        followup.check_budget_support(resolved.agent, command[0], resolved.settings.max_cost_usd)
    else:
        command = check_command(list(resolved.argv(command)), repo, spec.base)
    settings = resolved.settings
    if settings.workspace == "shadow" and resolved.sandbox == "off":
        from actors.shadow import NEEDS_SANDBOX

        raise UsageError(NEEDS_SANDBOX)
    policy = _checked_policy(config, resolved.template, spec.policy)
    request = ExecutionRequested(
        command=tuple(command),
        repo=str(repo),
        base=spec.base,
        task=task,
        agent=resolved.agent or "command",
        template=resolved.template,
        env=resolved.env,
        priority=settings.priority,
        timeouts=Timeouts(hard=settings.timeout_s, idle=settings.idle_timeout_s, spawn=settings.spawn_timeout_s),
        limits=Limits(
            memory_bytes=settings.memory_bytes,
            cpus=settings.cpus,
            disk_bytes=settings.disk_bytes,
            pids_max=settings.pids_max,
        ),
        on_stall=settings.on_stall,
        workspace=settings.workspace,
        labels=spec.labels,
        requested_by=requested_by or os.environ.get("USER"),
        max_cost_usd=settings.max_cost_usd,
        prices=config.prices,
        agent_args=tuple(agent_args),
        resume_of=parent.execution_id if parent else None,
        resume_session=parent.session_id if parent else None,
        worktree=parent.worktree if parent else None,
        policy=policy,
        sandbox=SandboxRequest.model_validate(
            {"mode": resolved.sandbox, "network": resolved.network, "allow": resolved.allow}
        ),
    )
    execution_id = new_execution_id()
    check_request_size(new_event(execution_id, request, actor="cli").to_bytes())
    return execution_id, request


def _text(value: Any) -> Any:
    """Numbers from JSON become the text the duration/size parsers read (`30` seconds, `2e9` bytes)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return value


def _checked_policy(config: Config, template: str | None, keys: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per-run policy keys, checked over [policy] and the template's (actors/policy.py)."""
    if not keys:
        return None
    try:
        templates = {t.name: t.policy for t in config.templates.values()}
        effective_policy(config.policy, templates, template, keys)
    except PolicyError as exc:
        raise UsageError(f"policy: {exc}; nothing was started") from None
    return keys
