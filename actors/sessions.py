"""Make a recorded agent session reachable from a fork's new worktree, before the agent starts.

A fork that continues a conversation (`corral fork ID --at N --prompt TEXT`) runs the CLI with its
session option in a new worktree. The spawner calls `carry_session` once it has created that
worktree, on the host the agent runs on, with the agent's own environment (HOME, CLAUDE_CONFIG_DIR,
CODEX_HOME):

- Claude Code keeps a session as `<config>/projects/<project>/<session>.jsonl`, where <config> is
  $CLAUDE_CONFIG_DIR or ~/.claude and <project> the working directory's real path with every
  character other than a letter or digit turned into `-` (longer than 200: cut, plus a hash), and
  `--resume` looks only in the directory of the current one. The file is copied (never moved or
  changed) into the new worktree's project directory; `--fork-session` then writes the continued
  conversation under a new session id, so neither the original nor the copy is appended to.
- Codex keeps sessions by id under $CODEX_HOME/sessions whatever the directory, and `codex exec
  fork` writes a new one: nothing is copied, the session is only looked for.

Standard library only (it runs in the spawner). See docs/adapters.md.
"""

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
CLAUDE_NAME_LIMIT = 200


def carry_session(agent: str, session_id: str, cwd: str | Path, env: Mapping[str, str]) -> str | None:
    """Make `session_id` of `agent` usable by a CLI started in `cwd`; return why it cannot be, or None."""
    if not SESSION_ID.fullmatch(session_id):
        return f"{session_id!r} is not a session id"
    try:
        if agent == "claude-code":
            return _carry_claude(session_id, Path(cwd), env)
        if agent == "codex":
            return _find_codex(session_id, env)
    except OSError as exc:
        return f"cannot copy the {agent} session {session_id} to {cwd}: {exc}"
    return None  # other agents continue from files in the worktree, or not at all


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def claude_config_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("CLAUDE_CONFIG_DIR") or _home(env) / ".claude")


def _java_hash(text: str) -> int:
    """JavaScript's `(h << 5) - h + charCode | 0` over UTF-16 code units, as Claude Code hashes long names."""
    value = 0
    data = text.encode("utf-16-le")
    for i in range(0, len(data), 2):
        value = (value * 31 + int.from_bytes(data[i : i + 2], "little")) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def claude_project_name(cwd: str) -> str:
    """The directory under `<config>/projects` where Claude Code keeps the sessions of `cwd`."""
    # JavaScript replaces UTF-16 code units: a character outside the BMP becomes two dashes
    name = re.sub(r"[^a-zA-Z0-9]", lambda m: "-" * (2 if ord(m.group()) > 0xFFFF else 1), cwd)
    if len(name) <= CLAUDE_NAME_LIMIT:
        return name
    return f"{name[:CLAUDE_NAME_LIMIT]}-{_base36(abs(_java_hash(cwd)))}"


def _carry_claude(session_id: str, cwd: Path, env: Mapping[str, str]) -> str | None:
    projects = claude_config_dir(env) / "projects"
    target_dir = projects / claude_project_name(os.path.realpath(cwd))
    target = target_dir / f"{session_id}.jsonl"
    if target.is_file():
        return None
    found = [p for p in projects.glob(f"*/{session_id}.jsonl") if p.is_file()]
    if not found:
        return (
            f"the claude-code session {session_id} is not on this host (no {projects}/*/{session_id}.jsonl); "
            "fork on the host it ran on, or with --new-session"
        )
    # Copies made for earlier forks are never appended to (--fork-session), so the longest is the original.
    source = max(found, key=lambda p: p.stat().st_size)
    target_dir.mkdir(parents=True, exist_ok=True)
    partial = target_dir / f".{session_id}.jsonl.corral-{os.getpid()}"
    try:
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    extras = source.parent / session_id  # subagent transcripts and stored tool results, when it has any
    if extras.is_dir() and not (target_dir / session_id).exists():
        shutil.copytree(extras, target_dir / session_id, symlinks=True)
    return None


def codex_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("CODEX_HOME") or _home(env) / ".codex")


def _find_codex(session_id: str, env: Mapping[str, str]) -> str | None:
    home = codex_home(env)
    patterns = (f"sessions/*/*/*/rollout-*-{session_id}.jsonl", f"archived_sessions/rollout-*-{session_id}.jsonl")
    if any(next(home.glob(pattern), None) is not None for pattern in patterns):
        return None
    return (
        f"the codex session {session_id} is not on this host (no rollout file under {home}/sessions); "
        "fork on the host it ran on, or with --new-session"
    )
