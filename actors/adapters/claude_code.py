"""Claude Code: `claude -p --output-format stream-json --input-format stream-json --verbose`.

Lines: `system/init` (session, model, tools), `assistant` (text and tool_use blocks, one line per
block), `user` (tool_result blocks, with `tool_use_result` for file writes), `result` (per-turn
usage, cumulative `modelUsage` with costUSD, num_turns). The task and every `corral input` go in
as stream-json user messages; stdin is closed once every message sent has its `result`.
"""

import json
from pathlib import Path
from typing import Any

from actors.adapters import (
    Adapter,
    Fact,
    estimate_cost,
    hook_command,
    json_object,
    network_error,
    probe,
    summarize,
)
from actors.shellpolicy import ENV, MARKER, ShellRules

PROGRAM = "claude"
INSTALL = "npm install @anthropic-ai/claude-code"
FILE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
PROBES = (["--version"], ["--help"])
NO_HOOKS = ("--bare", "--safe-mode")  # options under which Claude Code runs no hooks at all
NO_HOOKS_ENV = ("CLAUDE_CODE_SIMPLE", "CLAUDE_CODE_SAFE_MODE")  # what those options set


def features(help_text: str) -> dict[str, bool]:
    """What `claude --help` offers: input mid-run, replayed inputs, session resume and fork."""
    return {
        "stream_input": "--input-format" in help_text,
        "replay_input": "--replay-user-messages" in help_text,
        "resume": "--resume" in help_text,
        "fork": "--fork-session" in help_text,
        "live_usage": True,  # every model call's line carries its input tokens
    }


def command_line(
    program: str, task: str, extra: list[str], *, resume: str | None = None, fork: bool = False
) -> list[str]:
    """Stream-json in and out when the CLI supports it; otherwise the task as the prompt argument.

    `resume` continues that session; with `fork` as a new session id (`--fork-session`), so the
    recorded session file is only read (a fork's spawner copies it to the new worktree's project
    directory first: actors/sessions.py).
    """
    for word in extra:
        if word in NO_HOOKS:  # refused here, before anything is requested (the spawner checks again)
            raise ValueError(
                f"claude {word} runs no hooks, so Corral's shell policy could not be enforced; drop {word}"
            )
    permission = (
        []
        if any(a.startswith(("--permission-mode", "--dangerously")) for a in extra)
        else ["--permission-mode", "acceptEdits"]
    )
    extra = [*extra, "--resume", resume, *(["--fork-session"] if fork else [])] if resume else extra
    found = probe("claude-code", program)["features"]
    if found.get("stream_input"):
        # Replayed user messages tell which inputs the CLI has taken, so stdin closes only when all are answered.
        replay = ["--replay-user-messages"] if found.get("replay_input") else []
        return [
            program,
            "-p",
            "--output-format",
            "stream-json",
            "--input-format",
            "stream-json",
            "--verbose",
            *replay,
            *permission,
            *extra,
        ]
    return [program, "-p", task, "--output-format", "stream-json", "--verbose", *permission, *extra]


def shell_guard(
    command: list[str], env: dict[str, str], rules: ShellRules, run_dir: Path
) -> tuple[list[str], dict[str, str], list[str]]:
    """A PreToolUse hook on Bash in the execution's own settings (`--settings JSON`), the lists in its env.

    Claude Code takes one `--settings` (the last one given): any the run already has are merged
    into Corral's (their hooks kept, Corral's added). `disableAllHooks` is set false, so no
    project or user settings file in the worktree can turn the hook off; `--bare` and
    `--safe-mode` run no hooks and are refused.
    """
    settings: dict[str, Any] = {}
    out: list[str] = []
    words = iter(command)
    for word in words:
        if word in NO_HOOKS:
            raise ValueError(
                f"claude {word} runs no hooks, so Corral's shell policy could not be enforced; drop {word}"
            )
        if word == "--settings" or word.startswith("--settings="):
            value = word.split("=", 1)[1] if "=" in word else next(words, "")
            settings = _merge_settings(settings, _load_settings(value))
        else:
            out.append(word)
    found = settings.get("hooks")
    hooks: dict[str, Any] = found if isinstance(found, dict) else {}
    listed = hooks.get("PreToolUse")
    pre: list[Any] = listed if isinstance(listed, list) else []
    guard = {"matcher": "Bash", "hooks": [{"type": "command", "command": hook_command(), "timeout": 60}]}
    settings = {**settings, "hooks": {**hooks, "PreToolUse": [*pre, guard]}, "disableAllHooks": False}
    guarded_env = {k: v for k, v in env.items() if k not in NO_HOOKS_ENV}
    guarded_env[ENV] = rules.to_json()
    return [out[0], "--settings", json.dumps(settings, separators=(",", ":")), *out[1:]], guarded_env, []


def _load_settings(value: str) -> dict[str, Any]:
    """A `--settings` value: a JSON object, or the path of a file holding one."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise ValueError(f"claude --settings {value}: cannot read it ({exc.strerror or exc})") from None
    try:
        loaded = json.loads(text)
    except ValueError:
        raise ValueError(f"claude --settings {value[:200]}: not a JSON object") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"claude --settings {value[:200]}: not a JSON object")
    return loaded


def _merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    hooks: dict[str, Any] = {}
    for source in (base.get("hooks"), extra.get("hooks")):
        for event, groups in (source if isinstance(source, dict) else {}).items():
            hooks[event] = [*hooks.get(event, []), *(groups if isinstance(groups, list) else [])]
    if hooks:
        merged["hooks"] = hooks
    return merged


def user_message(text: str) -> bytes:
    message = {"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": text}]}}
    return json.dumps(message).encode() + b"\n"


class ClaudeCodeAdapter(Adapter):
    name = "claude-code"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream_input = "stream-json" in self.command and "--input-format" in self.command
        self.keeps_stdin = self.stream_input
        self.replayed = "--replay-user-messages" in self.command
        self.sent = 1 if self.stream_input else 0  # user messages written to stdin (the task first)
        self.taken = 0  # user messages the CLI replayed (taken into a turn)
        self.pending_turns = self.sent
        self.sessions: set[str] = set()
        self.tools: dict[str, tuple[str, dict[str, Any]]] = {}  # tool_use id -> (name, input)
        self.model_totals: dict[str, dict[str, float]] = {}
        self.calls: set[str] = set()  # model calls (assistant message ids) already ticked
        self.estimated_cost = 0.0  # live estimates not yet replaced by a result's reported cost
        # Bash calls the shell policy refuses, held until their result shows the hook blocked them:
        # tool_use id -> (the tool.called fact, command, rule, message)
        self.held: dict[str, tuple[Fact, str, str, str]] = {}

    def initial_input(self) -> bytes:
        return user_message(self.task or "") if self.stream_input else b""

    def encode_input(self, text: str) -> bytes:
        return user_message(text) if self.stream_input else text.encode()

    def input_delivered(self) -> None:
        if self.stream_input:
            self.sent += 1
            self.pending_turns += 1

    def parse_line(self, line: str) -> list[Fact]:
        record = json_object(line)
        if record is None:
            return []
        kind = record.get("type")
        if kind == "system" and record.get("subtype") == "init":
            session = str(record.get("session_id") or "")
            if not session or session in self.sessions:
                return []
            self.sessions.add(session)
            return [
                (
                    "session.started",
                    {
                        "session_id": session,
                        "model": record.get("model"),
                        "tools": [str(t) for t in record.get("tools") or []],
                    },
                )
            ]
        if kind == "system" and record.get("subtype") == "api_retry":
            # No HTTP status: the request never got an answer (connection refused, DNS, no route).
            if record.get("error_status") is None or network_error(str(record.get("error") or "")):
                attempt = f"attempt {record.get('attempt')} of {record.get('max_retries')}"
                self.network_trouble(f"cannot reach the model API, retrying ({attempt}): {record.get('error')}")
            return []
        if kind == "assistant":
            message = record.get("message") or {}
            return self._live_usage(message) + self._assistant(message)
        if kind == "user":
            return self._user(record)
        if kind == "result":
            return self._result(record)
        return []

    def _assistant(self, message: dict[str, Any]) -> list[Fact]:
        facts: list[Fact] = []
        for block in message.get("content") or []:
            if block.get("type") == "text" and block.get("text"):
                facts.append(("agent.message", {"text": block["text"]}))
            elif block.get("type") == "tool_use":
                name = str(block.get("name") or "?")
                tool_input = block.get("input") or {}
                self.tools[str(block.get("id"))] = (name, tool_input)
                shell = tool_input.get("command") if name == "Bash" else None
                called: Fact = (
                    "tool.called",
                    {
                        "call_id": block.get("id"),
                        "name": name,
                        "input_summary": summarize(tool_input),
                        "shell_command": shell if isinstance(shell, str) else None,
                    },
                )
                refusal = self.refused(shell)
                if refusal is not None and isinstance(shell, str):
                    self.held[str(block.get("id"))] = (called, shell, *refusal)
                else:
                    facts.append(called)
        return facts

    def _held_result(self, call_id: str, ok: bool, text: str) -> list[Fact]:
        """A held Bash call's result: blocked by the hook (the command did not run) or, should the
        hook have let it through, the call as usual (the validator then judges it)."""
        called, command, rule, message = self.held.pop(call_id)
        if not ok and MARKER in text:
            kind, data = called
            # no shell_command: nothing ran for the validator to judge; shell.blocked says what was refused
            return [(kind, {**data, "shell_command": None}), self.blocked(command, rule, message, call_id, "hook")]
        return [called]

    def flush(self) -> list[Fact]:
        """Calls still held when the CLI ends never got a result: recorded as called, for the validator."""
        facts = [called for called, *_ in self.held.values()]
        self.held.clear()
        return facts

    def _live_usage(self, message: dict[str, Any]) -> list[Fact]:
        """One estimated cost tick per model call, from its input tokens (its output is counted at the result).

        Tokens are left to the result's running totals, so they are never counted twice; the result's
        tick then carries the reported cost minus these estimates.
        """
        call = str(message.get("id") or "")
        usage = message.get("usage")
        if not call or call in self.calls or not isinstance(usage, dict):
            return []
        self.calls.add(call)
        self.turns += 1
        tokens = {
            "model": message.get("model"),
            "input_tokens": int(usage.get("input_tokens") or 0),
            "output_tokens": int(usage.get("output_tokens") or 0),
            "cache_read_tokens": int(usage.get("cache_read_input_tokens") or 0),
            "cache_write_tokens": int(usage.get("cache_creation_input_tokens") or 0),
        }
        cost = estimate_cost(tokens, self.prices)
        if not cost:
            return []
        self.estimated_cost += cost
        return [("usage", {"model": tokens["model"], "cost_usd": cost, "estimated": True})]

    def _user(self, record: dict[str, Any]) -> list[Fact]:
        facts: list[Fact] = []
        if record.get("isReplay"):
            self.taken += 1
            return facts
        content = (record.get("message") or {}).get("content")
        for block in content if isinstance(content, list) else []:
            if block.get("type") != "tool_result":
                continue
            call_id = str(block.get("tool_use_id"))
            name, tool_input = self.tools.pop(call_id, (None, {}))
            ok = not block.get("is_error")
            result = block.get("content")
            if isinstance(result, list):
                result = "\n".join(str(part.get("text", "")) for part in result if isinstance(part, dict))
            held = self._held_result(call_id, ok, str(result or "")) if call_id in self.held else []
            facts.extend(held[:1])  # the call first, then its result, then what was blocked
            facts.append(
                ("tool.result", {"call_id": call_id, "name": name, "ok": ok, "summary": summarize(result or "")})
            )
            facts.extend(held[1:])
            if ok and name in FILE_TOOLS:
                path = tool_input.get("file_path") or tool_input.get("notebook_path")
                detail = record.get("tool_use_result")
                created = isinstance(detail, dict) and detail.get("type") == "create"
                if isinstance(path, str):
                    facts.append(
                        ("file.touched", {"path": self.relative(path), "change": "created" if created else "modified"})
                    )
        return facts

    def _result(self, record: dict[str, Any]) -> list[Fact]:
        facts: list[Fact] = []
        # modelUsage and total_cost_usd are running totals of the process; usage is per turn.
        per_model = record.get("modelUsage")
        if isinstance(per_model, dict) and per_model:
            for model, totals in per_model.items():
                seen = self.model_totals.setdefault(model, {})
                tick: dict[str, Any] = {"model": model}
                for key, field in (
                    ("inputTokens", "input_tokens"),
                    ("outputTokens", "output_tokens"),
                    ("cacheReadInputTokens", "cache_read_tokens"),
                    ("cacheCreationInputTokens", "cache_write_tokens"),
                    ("costUSD", "cost_usd"),
                ):
                    value = float(totals.get(key) or 0)
                    delta = value - seen.get(key, 0.0)
                    seen[key] = value
                    tick[field] = round(delta, 10) if field == "cost_usd" else int(delta)
                if any(tick[f] for f in tick if f != "model"):
                    facts.append(("usage", tick))
            if facts and self.estimated_cost:
                first = facts[0][1]
                first["cost_usd"] = round(first["cost_usd"] - self.estimated_cost, 10)
                self.estimated_cost = 0.0
            for _, tick in facts:
                tick["settled"] = True  # the total so far is what Claude Code reported: no estimate left
        elif isinstance(record.get("usage"), dict):
            usage = record["usage"]
            facts.append(
                (
                    "usage",
                    {
                        "input_tokens": int(usage.get("input_tokens") or 0),
                        "output_tokens": int(usage.get("output_tokens") or 0),
                        "cache_read_tokens": int(usage.get("cache_read_input_tokens") or 0),
                        "cache_write_tokens": int(usage.get("cache_creation_input_tokens") or 0),
                        "cost_usd": round(float(record.get("total_cost_usd") or 0.0) - self.estimated_cost, 10),
                        "settled": True,
                    },
                )
            )
            self.estimated_cost = 0.0
        ok = record.get("subtype") == "success" and not record.get("is_error")
        text = record.get("result")
        facts.append(
            (
                "agent.result",
                {"ok": ok, "text": text if isinstance(text, str) else None, "turns": record.get("num_turns")},
            )
        )
        if self.stream_input:
            # Several messages may be answered in one turn; without replays, count one result per message.
            self.pending_turns -= 1
            if (self.taken >= self.sent) if self.replayed else (self.pending_turns <= 0):
                self.stdin_done = True
        return facts


ADAPTER = ClaudeCodeAdapter


def state_paths(env: Any) -> list[tuple[Any, bool]]:
    """Sandbox hook (actors/sandbox.py): what Claude Code writes besides the worktree, (path, is a directory).

    Its config directory ($CLAUDE_CONFIG_DIR or ~/.claude: sessions, todos, settings) and, without
    $CLAUDE_CONFIG_DIR, ~/.claude.json (its global state).
    """
    from pathlib import Path

    home = Path(env.get("HOME") or Path.home())
    if env.get("CLAUDE_CONFIG_DIR"):
        return [(Path(env["CLAUDE_CONFIG_DIR"]), True)]
    return [(home / ".claude", True), (home / ".claude.json", False)]
