"""The PreToolUse hook that applies Corral's shell policy before a command runs (Claude Code, Codex).

Both CLIs run `python -I -m actors.shellhook` (the spawner puts it in their per-execution
settings: actors/adapters/claude_code.py, codex.py) with the tool call as JSON on stdin:

    {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": "..."}, ...}

and the execution's `shell_allow` / `shell_deny` in `CORRAL_SHELL_POLICY`. A command the lists
refuse ends the hook with exit code 2 and one line on stderr, which both CLIs treat as "blocked":
the command does not run and the model reads the line as the tool's error.

Fail-closed: anything other than a clear "allowed" (no policy in the environment, input that is
not a tool call with a command, an unexpected error) also exits 2 with the reason. Only exit
code 2 blocks in these CLIs: any other non-zero status lets the command run, so nothing here may
end in a traceback. `-I` keeps the agent's worktree (its cwd) and PYTHON* variables out of the
import path. Standard library only (actors/shellpolicy.py): it starts once per shell command.
"""

import json
import os
import sys
from typing import Any, Final

from actors.shellpolicy import ENV, MARKER, ShellRules, refusal_text

BLOCK: Final = 2  # the exit code both CLIs read as "do not run this tool call"
MAX_INPUT: Final = 8 << 20  # a tool call larger than this is refused unread


def decide(raw: bytes, policy: str | None) -> tuple[int, str]:
    """(exit code, stderr line) for one tool call: (0, "") allows it, (2, why) blocks it."""
    if policy is None:
        return BLOCK, f"{MARKER}: refused (policy_unavailable): {ENV} is not set for this hook, so nothing may run"
    try:
        rules = ShellRules.from_json(policy)
    except ValueError as exc:
        return BLOCK, f"{MARKER}: refused (policy_unavailable): {ENV} is unusable ({exc}), so nothing may run"
    if len(raw) > MAX_INPUT:
        return BLOCK, f"{MARKER}: refused (malformed_input): the tool call is larger than {MAX_INPUT} bytes"
    try:
        call: Any = json.loads(raw)
    except ValueError:
        return BLOCK, f"{MARKER}: refused (malformed_input): the hook's input is not JSON"
    tool_input = call.get("tool_input") if isinstance(call, dict) else None
    command = tool_input.get("command") if isinstance(tool_input, dict) else None
    if isinstance(command, list) and all(isinstance(part, str) for part in command):
        command = " ".join(command)  # an argv-style call: judged as the line it would be
    if not isinstance(command, str):
        return BLOCK, f"{MARKER}: refused (malformed_input): the hook's input has no tool_input.command string"
    found = rules.refusal(command)
    if found is None:
        return 0, ""
    return BLOCK, refusal_text(*found)


def main() -> int:
    try:
        raw = sys.stdin.buffer.read(MAX_INPUT + 1)
        code, why = decide(raw, os.environ.get(ENV))
    except BaseException as exc:  # fail closed: every failure blocks
        code, why = BLOCK, f"{MARKER}: refused (hook_error): {type(exc).__name__}: {exc}"
    if why:
        try:
            sys.stderr.write(why.replace("\n", " ") + "\n")
            sys.stderr.flush()
        except BaseException:  # the exit code alone still blocks
            pass
    return code


if __name__ == "__main__":
    os._exit(main())  # no interpreter teardown that could fail after the decision
