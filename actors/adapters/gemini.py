"""Gemini CLI: `gemini -p TASK -o stream-json --yolo --skip-trust`.

Lines: `init` (session id, model), `message` (role user / assistant; assistant text arrives as
deltas, joined here into one agent.message), `tool_use` (tool_name, tool_id, parameters),
`tool_result` (status success / error, output), `error`, `result` (status, stats with per-model
tokens). Gemini reads a piped stdin as part of the prompt, so the shim closes it. No cost is reported.
"""

from pathlib import Path
from typing import Any

from actors.adapters import Adapter, Fact, json_object, network_error, summarize
from actors.shellpolicy import ENV, MARKER, ShellRules, gemini_policy_toml, refused_rule

PROGRAM = "gemini"
INSTALL = "npm install @google/gemini-cli"
SHELL_TOOLS = ("run_shell_command",)
FILE_TOOLS = {"write_file": "created", "replace": "modified", "edit": "modified"}
PROBES = (["--version"], ["--help"])
POLICY_FILE = "gemini-shell-policy.toml"  # in the execution's run directory


def features(help_text: str) -> dict[str, bool]:
    """What `gemini --help` offers: `--resume` (sessions are kept per project directory). No input mid-run."""
    return {
        "stream_input": False,
        "resume": "--resume" in help_text,
        "fork": False,
        "live_usage": False,  # stats come with the result, at the end
    }


def command_line(program: str, task: str, extra: list[str], *, resume: str | None = None) -> list[str]:
    approval = [] if any(a.startswith(("--yolo", "-y", "--approval-mode")) for a in extra) else ["--yolo"]
    again = ["--resume", resume] if resume else []
    return [program, "-p", task, "-o", "stream-json", *approval, "--skip-trust", *again, *extra]


def shell_guard(
    command: list[str], env: dict[str, str], rules: ShellRules, run_dir: Path
) -> tuple[list[str], dict[str, str], list[str]]:
    """The lists as an admin-tier policy file of Gemini CLI's policy engine (`--admin-policy FILE`).

    Gemini CLI's hooks come only from settings files (the system one must be owned by root in
    directories only root can write), so its policy engine is used: admin rules outrank every
    user, workspace and extension rule and hold in every approval mode, `--yolo` included. The
    file is written in the run directory and must be readable inside the sandbox.
    """
    path = run_dir / POLICY_FILE
    partial = path.with_name(POLICY_FILE + ".tmp")
    partial.write_text(gemini_policy_toml(rules))
    partial.chmod(0o444)
    partial.replace(path)
    return [command[0], "--admin-policy", str(path), *command[1:]], {**env, ENV: rules.to_json()}, [str(path)]


class GeminiAdapter(Adapter):
    name = "gemini"
    keeps_stdin = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text: list[str] = []
        self.answer: list[str] = []
        self.tools: dict[str, tuple[str, dict[str, Any]]] = {}
        self.model_totals: dict[str, dict[str, int]] = {}
        self.held: dict[str, Fact] = {}  # shell calls the policy refuses, until their result

    def finish(self) -> list[Fact]:
        """Shell calls still held never got a result: recorded as called, for the validator."""
        held = list(self.held.values())
        self.held.clear()
        return held + super().finish()

    def flush(self) -> list[Fact]:
        if not self.text:
            return []
        text = "".join(self.text)
        self.text = []
        return [("agent.message", {"text": text})] if text.strip() else []

    def parse_line(self, line: str) -> list[Fact]:
        record = json_object(line)
        if record is None:
            return []
        kind = record.get("type")
        if kind == "error" and network_error(str(record.get("message") or "")):
            self.network_trouble(str(record["message"]))
            return []
        if kind == "message":
            if record.get("role") == "assistant" and isinstance(record.get("content"), str):
                self.text.append(record["content"])
                self.answer.append(record["content"])
            return []
        facts = self.flush()
        if kind == "init" and record.get("session_id"):
            facts.append(("session.started", {"session_id": str(record["session_id"]), "model": record.get("model")}))
        elif kind == "tool_use":
            name = str(record.get("tool_name") or "?")
            params = record.get("parameters") or {}
            call_id = str(record.get("tool_id"))
            self.tools[call_id] = (name, params)
            shell = params.get("command") if name in SHELL_TOOLS else None
            called: Fact = (
                "tool.called",
                {
                    "call_id": call_id,
                    "name": name,
                    "input_summary": summarize(params),
                    "shell_command": shell if isinstance(shell, str) else None,
                },
            )
            if self.refused(shell) is not None:
                self.held[call_id] = called  # recorded with its result: blocked, or run after all
            else:
                facts.append(called)
        elif kind == "tool_result":
            call_id = str(record.get("tool_id"))
            name, params = self.tools.pop(call_id, ("?", {}))
            ok = record.get("status") == "success"
            detail = record.get("output") if ok else (record.get("error") or {}).get("message")
            blocked = self._blocked(record, call_id, name, params)
            if call_id in self.held:
                kind, data = self.held.pop(call_id)
                facts.append((kind, {**data, "shell_command": None}) if blocked else (kind, data))
            facts.append(
                (
                    "tool.result",
                    {
                        "call_id": call_id,
                        "name": name,
                        "ok": ok,
                        "summary": summarize(detail or record.get("status") or ""),
                    },
                )
            )
            facts.extend(blocked)
            path = params.get("file_path") or params.get("path")
            if ok and name in FILE_TOOLS and isinstance(path, str):
                facts.append(("file.touched", {"path": self.relative(path), "change": FILE_TOOLS[name]}))
        elif kind == "result":
            facts.extend(self._usage((record.get("stats") or {}).get("models") or {}))
            ok = record.get("status") == "success"
            text = "".join(self.answer) or (record.get("error") or {}).get("message")
            facts.append(("agent.result", {"ok": ok, "text": text}))
            self.answer = []
        return facts

    def _blocked(self, record: dict[str, Any], call_id: str, name: str, params: dict[str, Any]) -> list[Fact]:
        """`shell.blocked` for a shell call Gemini's policy engine refused under Corral's rules.

        The error type `policy_violation` is Gemini's own (a command's output cannot set it) and
        the message carries the rule Corral's policy file gave (actors/shellpolicy.py).
        """
        found = record.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        message = str(error.get("message") or "")
        command = params.get("command")
        if name not in SHELL_TOOLS or error.get("type") != "policy_violation" or MARKER not in message:
            return []
        if not isinstance(command, str):
            return []
        refusal = self.refused(command)
        rule = refusal[0] if refusal is not None else refused_rule(message) or "shell_deny"
        why = refusal[1] if refusal is not None else message
        return [self.blocked(command, rule, why, call_id, "policy_engine")]

    def _usage(self, models: dict[str, Any]) -> list[Fact]:
        facts: list[Fact] = []
        for model, totals in models.items():
            seen = self.model_totals.setdefault(model, {})
            tick: dict[str, Any] = {"model": model}
            for key, field in (
                ("input_tokens", "input_tokens"),
                ("output_tokens", "output_tokens"),
                ("cached", "cache_read_tokens"),
            ):
                value = int(totals.get(key) or 0)
                tick[field] = value - seen.get(key, 0)
                seen[key] = value
            if any(tick[f] for f in tick if f != "model"):
                facts.append(("usage", tick))
        return facts


ADAPTER = GeminiAdapter


def state_paths(env: Any) -> list[tuple[Any, bool]]:
    """Sandbox hook (actors/sandbox.py): what Gemini CLI writes besides the worktree, (path, is a directory):
    ~/.gemini (settings, chats, tmp)."""
    from pathlib import Path

    return [(Path(env.get("HOME") or Path.home()) / ".gemini", True)]
