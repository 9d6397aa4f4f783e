"""aider: `aider --message TASK --yes-always --no-auto-commits --no-suggest-shell-commands ...`; plain text.

Recognised lines: `Model: NAME with ... edit format` (model), `Applied edit to PATH` (file edit),
`Creating empty file PATH` (marks it created), `Tokens: 1.2k sent, 30 received. Cost: $0.01
message, $0.02 session.` (a usage tick), `Commit SHA message`. aider stays in its chat loop only
without --message, so the shim closes its stdin.
"""

import re
from typing import Any

from actors.adapters import Adapter, Fact, network_error

PROGRAM = "aider"
INSTALL = "pip install aider-chat"
DEFAULTS = (
    "--yes-always",
    "--no-auto-commits",
    "--no-check-update",
    "--analytics-disable",
    "--no-pretty",
    "--no-fancy-input",
    "--no-show-release-notes",
    "--no-show-model-warnings",
    # Shell commands the model suggests are never run under Corral: --yes-always answers "no" to
    # them (aider asks for an explicit yes), and with this aider does not ask the model for any.
    "--no-suggest-shell-commands",
)
TOKENS = re.compile(r"^Tokens: (?P<parts>.*?)\.(?: Cost: \$(?P<cost>[\d.]+) message.*)?$")
PART = re.compile(r"(?P<n>[\d.]+)(?P<unit>[kKmM]?) (?P<what>sent|received|cache write|cache hit)")
APPLIED = re.compile(r"^Applied edit to (?P<path>.+)$")
CREATING = re.compile(r"^Creating empty file (?P<path>.+)$")
MODEL = re.compile(r"^(?:Main model|Model): (?P<model>\S+)")
PROBES = (["--version"], ["--help"])


def features(help_text: str) -> dict[str, bool]:
    """aider keeps no session id; it resumes by reloading the chat history it wrote in the worktree."""
    return {
        "stream_input": False,
        "resume": "--restore-chat-history" in help_text,
        "fork": False,
        "live_usage": True,  # a Tokens line after every model call
    }


def command_line(program: str, task: str, extra: list[str], *, resume: str | None = None) -> list[str]:
    given = {a.split("=", 1)[0] for a in extra}
    defaults = [flag for flag in DEFAULTS if flag not in given and flag.replace("--no-", "--") not in given]
    again = ["--restore-chat-history"] if resume is not None and "--restore-chat-history" not in given else []
    return [program, "--message", task, *defaults, *again, *extra]


def tokens(number: str, unit: str) -> int:
    return round(float(number) * {"": 1, "k": 1e3, "m": 1e6}[unit.lower()])


class AiderAdapter(Adapter):
    name = "aider"
    keeps_stdin = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = self.option("--model")
        self.created: set[str] = set()

    def parse_line(self, line: str) -> list[Fact]:
        line = line.strip()
        if network_error(line):  # litellm's "...Exception - Connection error.", then "Retrying in N seconds..."
            self.network_trouble(line)
            return []
        if match := MODEL.match(line):
            self.model = match["model"]
            return []
        if match := CREATING.match(line):
            self.created.add(self.relative(match["path"]))
            return []
        if match := APPLIED.match(line):
            path = self.relative(match["path"])
            change = "created" if path in self.created else "modified"
            self.created.discard(path)
            return [("file.touched", {"path": path, "change": change})]
        if match := TOKENS.match(line):
            self.turns += 1
            # No "Cost:" part when aider knows no price for the model: then it is estimated (Adapter.priced).
            tick: dict[str, Any] = {"model": self.model, "cost_usd": float(match["cost"]) if match["cost"] else None}
            fields = {
                "sent": "input_tokens",
                "received": "output_tokens",
                "cache write": "cache_write_tokens",
                "cache hit": "cache_read_tokens",
            }
            for part in PART.finditer(match["parts"]):
                tick[fields[part["what"]]] = tokens(part["n"], part["unit"])
            return [("usage", tick)]
        return []


ADAPTER = AiderAdapter


def state_paths(env: Any) -> list[tuple[Any, bool]]:
    """Sandbox hook (actors/sandbox.py): what aider writes besides the worktree (its chat history
    files are in the repository's root, the worktree), (path, is a directory): ~/.aider (caches,
    analytics, installs)."""
    from pathlib import Path

    return [(Path(env.get("HOME") or Path.home()) / ".aider", True)]
