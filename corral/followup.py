"""Follow-ups: `corral run --resume EXEC_ID "next task"` continues a finished agent's session.

The new execution runs in the parent's worktree and branch (the CLIs keep their sessions per project
directory), with the CLI's own resume option (Claude Code `--resume`, Codex `exec resume`, Gemini
`--resume`, aider `--restore-chat-history`), and records `resume_of` / `resume_session`. What cannot
be continued is refused with one line saying why and what to do instead. See docs/adapters.md.
"""

import os
from dataclasses import dataclass

from actors.adapters import missing_feature, probe
from corral.commands import info, resolve_execution_id
from corral.errors import UsageError
from corral.history import recorded_request, rows, sql_text
from corral.home import Home
from corral.system import open_system
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


async def find_parent(home: Home, prefix: str, agent: str | None) -> Parent:
    """The finished execution a follow-up continues; UsageError saying why when it cannot be."""
    async with open_system(home, actors=("projector",)) as system:
        execution_id = await resolve_execution_id(system, prefix)
        request = await recorded_request(system, execution_id)
        quoted = sql_text(execution_id)
        found = await rows(system, f"SELECT state, worktree FROM executions WHERE execution_id = {quoted}")
        sessions = await rows(
            system,
            f"SELECT data->>'session_id' AS session_id FROM events WHERE execution_id = {quoted} "
            "AND type = 'session.started' ORDER BY seq DESC LIMIT 1",
        )
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
    session = sessions[0]["session_id"] if sessions else None
    if not session and request.agent not in SESSIONLESS:
        raise UsageError(
            f"{execution_id} recorded no session id ({request.agent} never started one): nothing to resume; "
            "start a new run with the whole task"
        )
    return Parent(execution_id, request, worktree, session)


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def check_budget_support(agent: str, program: str, max_cost: float | None) -> None:
    """Say once when a budget cannot pause this CLI (it reports usage only when it is done)."""
    if max_cost is None:
        return
    problem = missing_feature(agent, probe(agent, program), "live_usage")
    if problem:
        info(problem)
