"""Follow-ups and session forks: continuing a finished agent's conversation.

`corral run --resume EXEC_ID "next task"`: the new execution runs in the parent's worktree and branch
(the CLIs keep their sessions per project directory), with the CLI's own resume option (Claude Code
`--resume`, Codex `exec resume`, Gemini `--resume`, aider `--restore-chat-history`), and records
`resume_of` / `resume_session`. What cannot be continued is refused with one line saying why and
what to do instead.

`corral fork EXEC_ID --at N --prompt TEXT` (corral/history.py): `plan_fork` builds the fork's command
so that it continues the original's conversation as a new session (Claude Code `--resume SESSION
--fork-session`, `codex exec fork SESSION`; aider `--restore-chat-history` when the checkpoint holds
its chat history), recorded as `resume_session`; the spawner makes the session file reachable from
the new worktree (actors/sessions.py). When it cannot, the fork starts a new conversation and says
why in one line. See docs/adapters.md and docs/history.md.
"""

import importlib
import os
import subprocess
from dataclasses import dataclass

from actors.adapters import AGENTS, build_command, find_program, missing_feature, probe
from corral.errors import UsageError
from corral.home import Home
from corral.ops.base import info, recorded_request, resolve_execution_id, rows, sql_text
from corral.system import System, open_system
from events.types import ExecutionRequested
from projections.state import ACTIVE_STATES

SESSIONLESS = ("aider",)  # resumes from files in the worktree, not from a session id


@dataclass(frozen=True)
class Parent:
    execution_id: str
    request: ExecutionRequested
    worktree: str
    session_id: str | None

    @property
    def resume_arg(self) -> str:
        """What the adapter's `resume` gets: the session id ("" for a CLI that needs none)."""
        return self.session_id or ""


async def find_parent(home: Home, prefix: str, agent: str | None, system: System | None = None) -> Parent:
    """The finished execution a follow-up continues; UsageError saying why when it cannot be.

    `system`: a connected one (the HTTP gateway's); without, one is joined or started for the lookup."""
    if system is None:
        async with open_system(home, actors=("projector",)) as opened:
            return await find_parent(home, prefix, agent, opened)
    execution_id = await resolve_execution_id(system, prefix)
    request = await recorded_request(system, execution_id)
    quoted = sql_text(execution_id)
    found = await rows(system, f"SELECT state, worktree FROM executions WHERE execution_id = {quoted}")
    session = await recorded_session(system, execution_id)
    row = found[0] if found else {"state": "requested", "worktree": None}
    busy = []
    if row["worktree"]:
        states = ", ".join(sql_text(s) for s in ACTIVE_STATES)
        busy = await rows(
            system,
            f"SELECT execution_id FROM executions WHERE worktree = {sql_text(row['worktree'])} "
            f"AND state IN ({states}) AND execution_id <> {quoted}",
        )
    if request.agent == "command":
        raise UsageError(f"{execution_id} ran a plain command: there is no agent session to continue")
    if agent and agent != request.agent:
        raise UsageError(f"{execution_id} ran --agent {request.agent}; a follow-up continues with the same agent")
    if row["state"] in ACTIVE_STATES:
        raise UsageError(
            f"{execution_id} is {row['state']}; a follow-up starts once it has ended "
            f"(`corral logs -f {execution_id}` waits for it)"
        )
    worktree = row["worktree"]
    if not worktree or not _is_dir(worktree):
        raise UsageError(
            f"the worktree of {execution_id} is gone; start from one of its checkpoints instead: "
            f"corral fork {execution_id} --at N --prompt TEXT"
        )
    if busy:
        raise UsageError(f"{busy[0]['execution_id']} already runs in {worktree}; wait for it, or continue that one")
    if not session and request.agent not in SESSIONLESS:
        raise UsageError(
            f"{execution_id} recorded no session id ({request.agent} never started one): nothing to resume; "
            "start a new run with the whole task"
        )
    return Parent(execution_id, request, worktree, session)


async def recorded_session(system: System, execution_id: str) -> str | None:
    """The agent session an execution recorded last (`session.started`), or None."""
    found = await rows(
        system,
        f"SELECT data->>'session_id' AS session_id FROM events WHERE execution_id = {sql_text(execution_id)} "
        "AND type = 'session.started' ORDER BY seq DESC LIMIT 1",
    )
    return str(found[0]["session_id"]) if found and found[0]["session_id"] else None


@dataclass(frozen=True)
class ForkPlan:
    """How a `--prompt` fork of an agent execution runs."""

    command: tuple[str, ...]
    session: str | None  # the session it continues as a new one (recorded as resume_session)
    not_continued: str | None  # why the conversation is not continued (None: it is, or --new-session)
    continues: str | None = None  # what it continues, said when the fork starts


AIDER_HISTORY = ".aider.chat.history.md"


def plan_fork(
    original: str,
    request: ExecutionRequested,
    session: str | None,
    prompt: str,
    *,
    commit: str,
    new_session: bool,
) -> ForkPlan:
    """The command of a fork of agent execution `original` at checkpoint `commit`, given `prompt`.

    The CLI arguments are the original's (`agent_args`); the conversation is continued as a fork of
    the recorded session when the CLI can (its `fork` capability), else a new one starts and
    `not_continued` says why. UsageError when the command cannot be built (CLI not found).
    """
    agent = request.agent
    args = list(request.agent_args)

    def build(resume: str | None = None, fork: bool = False) -> tuple[str, ...]:
        try:
            return tuple(build_command(agent, prompt, args, resume=resume, fork=fork))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    if new_session:
        return ForkPlan(build(), None, None)
    if agent in SESSIONLESS:  # aider: the conversation is a file in the worktree, if the checkpoint kept it
        history = _option(args, "--chat-history-file") or AIDER_HISTORY
        if not os.path.isabs(history) and _in_commit(request.repo, commit, history):
            return ForkPlan(build(resume=""), None, None, f"aider's chat history ({history} at the checkpoint)")
        return ForkPlan(
            build(),
            None,
            f"aider keeps its conversation in {history}, which the checkpoint does not hold "
            "(aider adds .aider* to .gitignore unless run with --no-gitignore)",
        )
    if not session:
        return ForkPlan(build(), None, f"{original} recorded no session id ({agent} never started one)")
    module = importlib.import_module(AGENTS[agent])
    program = find_program(module.PROGRAM)
    if program is None:
        build()  # raises the error saying how to install it
    capabilities = probe(agent, str(program))
    if agent == "gemini" and not capabilities["features"].get("fork"):
        version = capabilities.get("version") or "of unknown version"
        reason = f"gemini {version} cannot fork a session (its --resume continues the original's own session file)"
        return ForkPlan(build(), None, reason)
    problem = missing_feature(agent, capabilities, "fork")
    if problem:
        return ForkPlan(build(), None, problem)
    return ForkPlan(build(resume=session, fork=True), session, None, f"{agent} session {session} as a new session")


def _option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _in_commit(repo: str, commit: str, path: str) -> bool:
    done = subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{commit}:{path}"], capture_output=True, check=False)
    return done.returncode == 0


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def check_budget_support(agent: str, program: str, max_cost: float | None) -> None:
    """Say once when a budget cannot pause this CLI (it reports usage only when it is done)."""
    if max_cost is None:
        return
    problem = missing_feature(agent, probe(agent, program), "live_usage")
    if problem:
        info(problem)
