"""Adapters for agent CLIs: build each CLI's command line, map its output lines to Corral's typed facts.

An adapter has two halves. `build_command` runs in the `corral` CLI when a run is requested;
`Adapter` runs inside the shim (standard library only), which feeds it the agent's stdout line by
line and records every fact it returns as an event beside the raw `output`. See docs/adapters.md.
"""

import importlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Fact = tuple[str, dict[str, Any]]  # (event type, payload)

AGENTS: dict[str, str] = {
    "claude-code": "actors.adapters.claude_code",
    "codex": "actors.adapters.codex",
    "gemini": "actors.adapters.gemini",
    "aider": "actors.adapters.aider",
}
NAMES = ("command", *AGENTS)
SUMMARY_CHARS = 500
# Where `.ci/run` installs the CLIs (gitignored): node packages and a virtualenv for aider.
LOCAL_AGENTS = Path(__file__).resolve().parents[2] / ".agents"
LOCAL_BIN_DIRS = (LOCAL_AGENTS / "node_modules" / ".bin", LOCAL_AGENTS / "aider-venv" / "bin")


def summarize(value: Any, limit: int = SUMMARY_CHARS) -> str:
    """A one-paragraph, bounded text for an input or a result (dicts as compact JSON)."""
    if isinstance(value, str):
        text = value
    else:
        import json

        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Adapter:
    """Maps one CLI's stdout to facts; the base class is the generic `command` adapter (text only)."""

    name = "command"
    keeps_stdin = True  # False: the shim closes the agent's stdin once started (CLIs that read it to EOF)

    def __init__(self, *, task: str | None = None, command: Sequence[str] = (), cwd: str | None = None) -> None:
        self.task = task
        self.command = list(command)
        self.cwd = cwd
        self._partial = ""
        self.stdin_done = False  # set by the adapter when the agent should see EOF on stdin

    # stdout -> facts

    def feed(self, text: str) -> list[Fact]:
        """Take a chunk of stdout; return the facts of every whole line in it."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        facts: list[Fact] = []
        for line in lines:
            try:
                facts.extend(self.parse_line(line.rstrip("\r")))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a line of a shape this adapter does not know stays plain output
        return facts

    def finish(self) -> list[Fact]:
        """The agent exited: the facts of a last unterminated line and of anything held back."""
        facts = self.parse_line(self._partial) if self._partial.strip() else []
        self._partial = ""
        return facts + self.flush()

    def parse_line(self, line: str) -> list[Fact]:
        return []

    def flush(self) -> list[Fact]:
        return []

    # stdin

    def initial_input(self) -> bytes:
        """Bytes written to the agent's stdin right after it starts (the task, for stream-json CLIs)."""
        return b""

    def encode_input(self, text: str) -> bytes:
        """How `corral input TEXT` reaches this agent."""
        return text.encode()

    def input_delivered(self) -> None:
        """Called after `encode_input`'s bytes were written."""

    def option(self, *names: str) -> str | None:
        """The value of a command-line option of the built command (`--model X` or `--model=X`)."""
        for index, arg in enumerate(self.command):
            for name in names:
                if arg == name and index + 1 < len(self.command):
                    return self.command[index + 1]
                if arg.startswith(name + "="):
                    return arg.split("=", 1)[1]
        return None

    def relative(self, path: str) -> str:
        """A path as the worktree sees it (relative when inside the agent's cwd)."""
        if self.cwd and os.path.isabs(path):
            try:
                return os.path.relpath(path, self.cwd) if Path(path).is_relative_to(self.cwd) else path
            except ValueError:
                return path
        return path


def adapter_class(agent: str | None) -> type[Adapter]:
    """The adapter class of an agent name (the base class for `command` or none)."""
    if not agent or agent == "command":
        return Adapter
    module_name = AGENTS.get(agent)
    if module_name is None:
        raise ValueError(f"unknown agent {agent!r} (known: {', '.join(NAMES)})")
    cls: type[Adapter] = importlib.import_module(module_name).ADAPTER
    return cls


def load_adapter(spec: dict[str, Any]) -> Adapter | None:
    """The adapter the shim uses for one execution spec; None for plain commands."""
    agent = spec.get("agent")
    if not agent or agent == "command" or agent not in AGENTS:
        return None
    return adapter_class(agent)(task=spec.get("task"), command=spec.get("command") or (), cwd=spec.get("cwd"))


def find_program(name: str) -> str | None:
    """A CLI's executable: $CORRAL_<NAME>_BIN, then PATH, then the project-local `.agents` install."""
    override = os.environ.get(f"CORRAL_{name.upper().replace('-', '_')}_BIN")
    if override:
        return override
    found = shutil.which(name)
    if found:
        return found
    for directory in LOCAL_BIN_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def build_command(agent: str, task: str | None, extra: Sequence[str] = ()) -> list[str]:
    """The command line that runs `task` with this agent's CLI (extra args appended); ValueError if impossible."""
    module_name = AGENTS.get(agent)
    if module_name is None:
        raise ValueError(f"unknown agent {agent!r} (known: {', '.join(NAMES)})")
    if not task:
        raise ValueError(f"--agent {agent} needs a task: corral run --agent {agent} 'what to do'")
    module = importlib.import_module(module_name)
    program = find_program(module.PROGRAM)
    if program is None:
        raise ValueError(
            f"{module.PROGRAM} not found for --agent {agent} (install it: {module.INSTALL}; "
            f"or set CORRAL_{module.PROGRAM.upper()}_BIN)"
        )
    command: list[str] = module.command_line(program, task, list(extra))
    return command


def agent_command_line(
    agent: str, task: str | None, words: Sequence[str], template_args: Sequence[str] = ()
) -> tuple[str, list[str]]:
    """`corral run --agent A [TASK...] [-- EXTRA...]` -> (task, command); ValueError if it cannot be built.

    The words before `--` are the task (unless --task gave it); those after it are passed to the CLI.
    """
    words = list(words)
    split = words.index("--") if "--" in words else len(words)
    positional, extra = words[:split], words[split + 1 :]
    if positional and task:
        raise ValueError(f"give the task once: either --task or as an argument, not both ({positional[0]!r})")
    text = task or " ".join(positional)
    return text, build_command(agent, text, [*template_args, *extra])


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on one line of a CLI's stream, or None for anything else (kept as text)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
