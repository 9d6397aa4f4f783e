"""Codex CLI: `codex exec --json TASK`.

Lines: `thread.started` (thread id = session), `turn.started`, `item.started` / `item.completed`
(`command_execution`, `file_change`, `mcp_tool_call`, `web_search`, `agent_message`, `reasoning`,
`error`), `turn.completed` (usage of the turn), `turn.failed`, `error`. Codex reads its stdin to the
end when it is not a terminal, so the shim closes it: `corral input` is refused for Codex runs.
Codex reports no cost; usage ticks carry tokens only.
"""

import json
import re
from pathlib import Path
from typing import Any

from actors.adapters import Adapter, Fact, hook_command, json_object, network_error, summarize
from actors.shellpolicy import ENV, MARKER, ShellRules, refused_rule

PROGRAM = "codex"
INSTALL = "npm install @openai/codex"
CHANGE_KINDS = {"add": "created", "update": "modified", "delete": "deleted"}
PROBES = (["--version"], ["exec", "--help"])
# What Codex logs on stderr for a tool call its PreToolUse hook blocked (no JSON item is printed for it).
HOOK_BLOCKED = re.compile(r"Command blocked by PreToolUse hook: (?P<reason>.*?)\. Command: (?P<command>.*)$")


def features(help_text: str) -> dict[str, bool]:
    """What `codex exec --help` offers: its `resume` and `fork` subcommands. No input mid-run."""
    return {
        "stream_input": False,
        "resume": re.search(r"^\s+resume\s", help_text, re.MULTILINE) is not None,
        "fork": re.search(r"^\s+fork\s", help_text, re.MULTILINE) is not None,
        "live_usage": False,  # usage comes with turn.completed, once per `exec`
    }


def sandbox_as_config(extra: list[str]) -> list[str]:
    """`exec resume` / `exec fork` have no --sandbox option: say it as `-c sandbox_mode=...`."""
    out: list[str] = []
    words = iter(extra)
    for arg in words:
        if arg in ("--sandbox", "-s"):
            out += ["-c", f'sandbox_mode="{next(words, "workspace-write")}"']
        elif arg.startswith("--sandbox="):
            out += ["-c", f'sandbox_mode="{arg.split("=", 1)[1]}"']
        else:
            out.append(arg)
    return out


FULL_ACCESS = "danger-full-access"


def in_corral_sandbox(command: list[str]) -> list[str]:
    """Codex's own sandbox is a bubblewrap too, and one cannot be made inside Corral's: its sandbox
    mode becomes danger-full-access (whatever was asked: read-only included), so Corral's sandbox
    is what confines it (docs/sandbox.md, "Agents with a sandbox of their own")."""
    out: list[str] = []
    words = iter(command)
    for arg in words:
        if arg in ("--sandbox", "-s"):
            next(words, None)
            out += [arg, FULL_ACCESS]
        elif arg.startswith("--sandbox="):
            out.append(f"--sandbox={FULL_ACCESS}")
        elif arg.startswith("sandbox_mode=") and out and out[-1] in ("-c", "--config"):
            out.append(f'sandbox_mode="{FULL_ACCESS}"')
        else:
            out.append(arg)
    return out


def command_line(
    program: str, task: str, extra: list[str], *, resume: str | None = None, fork: bool = False
) -> list[str]:
    """`codex exec`; with `resume`, `codex exec resume SESSION` (appends to that session), or with
    `fork` too, `codex exec fork SESSION` (a new session from a copy of it; the recorded one is only read)."""
    problem = hook_problem(extra)  # refused here, before anything is requested (the spawner checks again)
    if problem:
        raise ValueError(problem)
    chosen = any(a.startswith(("--sandbox", "-s", "--dangerously")) or "sandbox_mode" in a for a in extra)
    if resume:
        defaults = [] if chosen else ["-c", 'sandbox_mode="workspace-write"']
        return [
            program,
            "exec",
            "fork" if fork else "resume",
            "--json",
            "--skip-git-repo-check",
            *defaults,
            *sandbox_as_config(extra),
            *(["--"] if task.startswith("-") else []),
            resume,
            task,
        ]
    defaults = [] if chosen else ["--sandbox", "workspace-write"]
    return [
        program,
        "exec",
        "--json",
        "--skip-git-repo-check",
        *defaults,
        *extra,
        *(["--"] if task.startswith("-") else []),
        task,
    ]


def hook_problem(words: list[str]) -> str | None:
    """Why these Codex options would replace or turn off the shell-policy hook (one line), or None."""
    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        value = following if word in ("-c", "--config") else word.split("=", 1)[1] if "=" in word else ""
        key = value.split("=", 1)[0].strip() if word.startswith(("-c", "--config")) else ""
        if key.startswith("hooks") or key == "features.hooks":
            return f"codex -c {value[:80]} would replace or turn off Corral's shell-policy hook; drop it"
        feature = following if word == "--disable" else word.split("=", 1)[1] if word.startswith("--disable=") else ""
        if feature == "hooks":
            return "codex --disable hooks would turn off Corral's shell-policy hook; drop it"
    return None


def shell_guard(
    command: list[str], env: dict[str, str], rules: ShellRules, run_dir: Path
) -> tuple[list[str], dict[str, str], list[str]]:
    """A PreToolUse hook on Bash given as a `-c` override, the lists in its environment.

    Codex runs a hook that is not managed only once a person has trusted it in its TUI, so the run
    gets `--dangerously-bypass-hook-trust` (for this invocation only; hooks a person disabled stay
    disabled, and untrusted project-local configuration is still not loaded). A `-c hooks...` of
    the run's own would replace Corral's hook and is refused.
    """
    problem = hook_problem(command)
    if problem:
        raise ValueError(problem)
    handler = f'{{type="command",command={json.dumps(hook_command())},timeout=60}}'
    override = f'hooks.PreToolUse=[{{matcher="Bash",hooks=[{handler}]}}]'
    at = command.index("--json") if "--json" in command else len(command)
    trust = ["--dangerously-bypass-hook-trust", "-c", "features.hooks=true", "-c", override]
    guarded = [*command[:at], *trust, *command[at:]]
    return guarded, {**env, ENV: rules.to_json()}, []


class CodexAdapter(Adapter):
    name = "codex"
    keeps_stdin = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = self.option("-m", "--model")
        self.started: set[str] = set()
        self.last_message: str | None = None

    def parse_line(self, line: str) -> list[Fact]:
        record = json_object(line)
        if record is None:
            return []
        kind = record.get("type")
        if kind == "thread.started" and record.get("thread_id"):
            return [("session.started", {"session_id": str(record["thread_id"]), "model": self.model})]
        if kind == "turn.started":
            self.turns += 1
            return []
        if kind in ("item.started", "item.completed"):
            item = record.get("item") or {}
            return self._item(item, completed=kind == "item.completed")
        if kind == "turn.completed":
            usage = record.get("usage") or {}
            tick = {
                "input_tokens": int(usage.get("input_tokens") or 0),
                "output_tokens": int(usage.get("output_tokens") or 0),
                "cache_read_tokens": int(usage.get("cached_input_tokens") or 0),
                "cache_write_tokens": int(usage.get("cache_write_input_tokens") or 0),
                "model": self.model,
            }
            return [("usage", tick), ("agent.result", {"ok": True, "text": self.last_message, "turns": self.turns})]
        if kind == "error":  # "Reconnecting... waiting for network (...)", "stream error: ..."
            message = str(record.get("message") or "")
            if network_error(message) or message.lower().startswith(("reconnecting", "stream error")):
                self.network_trouble(message)
            return []
        if kind == "turn.failed":
            error = (record.get("error") or {}).get("message")
            return [("agent.result", {"ok": False, "text": summarize(error or "turn failed"), "turns": self.turns})]
        return []

    def stderr_line(self, line: str) -> list[Fact]:
        """Codex reports a command its hook blocked only in its log: that line becomes `shell.blocked`."""
        found = HOOK_BLOCKED.search(line)
        if found is None or MARKER not in found["reason"]:
            return super().stderr_line(line)
        command = found["command"]
        rule = refused_rule(found["reason"]) or "shell_deny"
        refusal = self.refused(command)
        message = refusal[1] if refusal is not None else found["reason"]
        return [self.blocked(command, refusal[0] if refusal is not None else rule, message, None, "hook")]

    def _item(self, item: dict[str, Any], *, completed: bool) -> list[Fact]:
        item_id = str(item.get("id"))
        item_type = item.get("type")
        facts: list[Fact] = []
        if item_type == "agent_message" and completed and item.get("text"):
            self.last_message = str(item["text"])
            return [("agent.message", {"text": self.last_message})]
        call = self._call(item)
        if call is None:
            return []
        if item_id not in self.started:
            self.started.add(item_id)
            facts.append(("tool.called", {"call_id": item_id, **call}))
        if completed:
            facts.extend(self._completed(item_id, item, str(call["name"])))
        return facts

    def _call(self, item: dict[str, Any]) -> dict[str, Any] | None:
        item_type = item.get("type")
        if item_type == "command_execution":
            command = str(item.get("command") or "")
            return {"name": "shell", "input_summary": summarize(command), "shell_command": command}
        if item_type == "file_change":
            changes = [f"{c.get('kind')} {c.get('path')}" for c in item.get("changes") or []]
            return {"name": "apply_patch", "input_summary": summarize(", ".join(changes))}
        if item_type == "mcp_tool_call":
            name = f"{item.get('server')}.{item.get('tool')}"
            return {"name": name, "input_summary": summarize(item.get("arguments") or {})}
        if item_type == "web_search":
            return {"name": "web_search", "input_summary": summarize(item.get("query") or "")}
        return None

    def _completed(self, item_id: str, item: dict[str, Any], name: str) -> list[Fact]:
        status = item.get("status")
        facts: list[Fact] = []
        if item.get("type") == "command_execution":
            ok = item.get("exit_code") == 0 and status != "failed"
            summary = summarize(item.get("aggregated_output") or f"exit {item.get('exit_code')}")
        else:
            ok = status != "failed" and not item.get("error")
            summary = summarize(item.get("result") or item.get("error") or status or "")
        facts.append(("tool.result", {"call_id": item_id, "name": name, "ok": ok, "summary": summary}))
        if item.get("type") == "file_change" and ok:
            for change in item.get("changes") or []:
                facts.append(
                    (
                        "file.touched",
                        {
                            "path": self.relative(str(change.get("path"))),
                            "change": CHANGE_KINDS.get(str(change.get("kind")), "modified"),
                        },
                    )
                )
        return facts


ADAPTER = CodexAdapter


def state_paths(env: Any) -> list[tuple[Any, bool]]:
    """Sandbox hook (actors/sandbox.py): what Codex writes besides the worktree, (path, is a directory):
    $CODEX_HOME or ~/.codex (config, sessions, logs)."""
    from pathlib import Path

    return [(Path(env.get("CODEX_HOME") or Path(env.get("HOME") or Path.home()) / ".codex"), True)]
