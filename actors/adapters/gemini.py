"""Gemini CLI: `gemini -p TASK -o stream-json --yolo --skip-trust`.

Lines: `init` (session id, model), `message` (role user / assistant; assistant text arrives as
deltas, joined here into one agent.message), `tool_use` (tool_name, tool_id, parameters),
`tool_result` (status success / error, output), `error`, `result` (status, stats with per-model
tokens). Gemini reads a piped stdin as part of the prompt, so the shim closes it. No cost is reported.
"""

from typing import Any

from actors.adapters import Adapter, Fact, json_object, network_error, summarize

PROGRAM = "gemini"
INSTALL = "npm install @google/gemini-cli"
SHELL_TOOLS = ("run_shell_command",)
FILE_TOOLS = {"write_file": "created", "replace": "modified", "edit": "modified"}
PROBES = (["--version"], ["--help"])


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


class GeminiAdapter(Adapter):
    name = "gemini"
    keeps_stdin = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text: list[str] = []
        self.answer: list[str] = []
        self.tools: dict[str, tuple[str, dict[str, Any]]] = {}
        self.model_totals: dict[str, dict[str, int]] = {}

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
            facts.append(
                (
                    "tool.called",
                    {
                        "call_id": call_id,
                        "name": name,
                        "input_summary": summarize(params),
                        "shell_command": shell if isinstance(shell, str) else None,
                    },
                )
            )
        elif kind == "tool_result":
            call_id = str(record.get("tool_id"))
            name, params = self.tools.pop(call_id, ("?", {}))
            ok = record.get("status") == "success"
            detail = record.get("output") if ok else (record.get("error") or {}).get("message")
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
