"""Adapters for agent CLIs: build each CLI's command line, map its output lines to Corral's typed facts.

An adapter has two halves. `build_command` runs in the `corral` CLI when a run is requested;
`Adapter` runs inside the shim (standard library only), which feeds it the agent's stdout line by
line and records every fact it returns as an event beside the raw `output`. See docs/adapters.md.
"""

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.shellpolicy import ShellRules

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

    def __init__(
        self,
        *,
        task: str | None = None,
        command: Sequence[str] = (),
        cwd: str | None = None,
        prices: dict[str, Any] | None = None,
        shell_policy: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.command = list(command)
        self.cwd = cwd
        self.prices = prices or {}
        # The execution's shell allow/deny lists, as its CLI's pre-tool hook applies them: a call
        # they refuse is held until the CLI's answer shows it blocked (`shell.blocked`).
        self.shell_rules: ShellRules | None = None
        if shell_policy:
            with contextlib.suppress(ValueError):
                self.shell_rules = ShellRules.from_data(shell_policy)
        self._partial = ""
        self.stdin_done = False  # set by the adapter when the agent should see EOF on stdin
        self.turns = 0  # model calls seen so far (progress against --max-turns)
        self._stderr_partial = ""
        # The CLI reports it cannot reach its model and retries: the last such message, and since
        # when (monotonic) with no progress after it. Any other fact clears it (docs/adapters.md).
        self.unreachable: str | None = None
        self.unreachable_since: float | None = None
        self.failure_recorded = False  # an agent.result with `failure` was recorded

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
        return self.priced(self.classified(facts))

    def feed_stderr(self, text: str) -> list[Fact]:
        """Take a chunk of stderr: only what tells that the CLI cannot reach its model is read there."""
        lines = (self._stderr_partial + text).split("\n")
        self._stderr_partial = lines.pop()
        facts: list[Fact] = []
        for line in lines:
            facts.extend(self.stderr_line(line.rstrip("\r")))
        return self.classified(facts) if facts else []

    def stderr_line(self, line: str) -> list[Fact]:
        """One line of stderr; by default a network error printed there marks the model unreachable."""
        if network_error(line):
            self.network_trouble(line)
        return []

    def refused(self, command: Any) -> tuple[str, str] | None:
        """(rule, message) when the execution's shell lists refuse `command` (its hook will block it)."""
        if self.shell_rules is None or not isinstance(command, str):
            return None
        return self.shell_rules.refusal(command)

    def blocked(self, command: str, rule: str, message: str, call_id: str | None, mechanism: str) -> Fact:
        """The `shell.blocked` fact of a command the CLI's pre-tool mechanism refused (it did not run)."""
        data = {"agent": self.name, "command": command[:4000], "rule": rule, "message": message[:500]}
        return ("shell.blocked", {**data, "call_id": call_id, "mechanism": mechanism})

    def finish(self) -> list[Fact]:
        """The agent exited: the facts of a last unterminated line and of anything held back.

        A CLI that was still failing to reach its model when it exited, and said nothing more,
        gets an `agent.result` with `failure: "network"`.
        """
        facts = self.parse_line(self._partial) if self._partial.strip() else []
        self._partial = ""
        if self._stderr_partial.strip():
            facts.extend(self.stderr_line(self._stderr_partial))
        self._stderr_partial = ""
        facts = self.classified(facts + self.flush())
        if self.unreachable and not self.failure_recorded and not any(k == "agent.result" for k, _ in facts):
            facts.append(self.network_result())
        return self.priced(facts)

    def network_trouble(self, message: str) -> None:
        """The CLI says it cannot reach its model (and usually retries): remember since when."""
        self.unreachable = summarize(message.strip(), 300)
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()

    def network_result(self) -> Fact:
        """The failure recorded when the CLI never got through to its model (the shim ends it, or it gave up)."""
        self.failure_recorded = True
        text = f"network unreachable: {self.unreachable or 'the model could not be reached'}"
        return ("agent.result", {"ok": False, "text": text, "turns": self.turns or None, "failure": "network"})

    def classified(self, facts: list[Fact]) -> list[Fact]:
        """Progress clears the unreachable state; a failed result while unreachable is a network failure."""
        was = self.unreachable
        for kind, data in facts:
            if kind == "agent.result":
                if not data.get("ok") and (was or self.unreachable or network_error(str(data.get("text") or ""))):
                    data["failure"] = "network"
                    self.failure_recorded = True
            else:
                self.unreachable = self.unreachable_since = None
        return facts

    def priced(self, facts: list[Fact]) -> list[Fact]:
        """Usage ticks the CLI gave no cost for get one from the price table, flagged `estimated`.

        A model with no price gets `cost_usd: null` (unknown, not $0) and `estimated: true`. Model
        names lose a context suffix (`claude-opus-4-8[1m]` -> `claude-opus-4-8`), so one model's
        ticks carry one name.
        """
        for _, data in (f for f in facts if f[0] == "usage"):
            if isinstance(data.get("model"), str):
                data["model"] = model_name(data["model"])
            if data.get("cost_usd") is None:
                cost = estimate_cost(data, self.prices)
                if cost is None and not any(data.get(f) for f in TOKEN_FIELDS):
                    cost = 0.0  # no tokens: nothing spent, whatever the price
                data["cost_usd"] = cost
                data["estimated"] = True
        return facts

    def max_turns(self) -> int | None:
        """The turn limit given to the CLI (`--max-turns N`), if it has one."""
        value = self.option("--max-turns")
        return int(value) if value and value.isdigit() else None

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

    def input_refusal(self) -> str:
        """Why `corral input` cannot reach this agent once its stdin is closed (one line, with what to do)."""
        if self.keeps_stdin:
            return "the agent's stdin is closed"
        return (
            f"{self.name} reads its stdin only at start, so it takes no input while it runs; "
            "continue it once it is done: corral run --resume EXEC_ID 'TEXT'"
        )

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
    return adapter_class(agent)(
        task=spec.get("task"),
        command=spec.get("command") or (),
        cwd=spec.get("cwd"),
        prices=spec.get("prices"),
        shell_policy=spec.get("shell_policy"),
    )


def shell_guard(
    agent: str | None, command: Sequence[str], env: dict[str, str], rules: ShellRules, run_dir: Path
) -> tuple[list[str], dict[str, str], list[str]]:
    """The agent's command and environment with its CLI's pre-tool mechanism applying `rules`, and
    the files that mechanism reads (to be readable inside the sandbox); ValueError if it cannot be
    applied (one line saying why and what to do).

    Each adapter module's `shell_guard` knows its CLI (docs/policy.md, "Before a command runs");
    a plain command, or a CLI without one, is returned unchanged.
    """
    module_name = AGENTS.get(agent or "")
    guard = getattr(importlib.import_module(module_name), "shell_guard", None) if module_name else None
    if guard is None or rules.empty:
        return list(command), dict(env), []
    guarded: tuple[list[str], dict[str, str], list[str]] = guard(list(command), dict(env), rules, run_dir)
    return guarded


def in_corral_sandbox(agent: str | None, command: Sequence[str]) -> list[str]:
    """The agent's command for a run inside Corral's sandbox (actors/sandbox.py).

    A CLI whose own sandbox is itself a bubblewrap (Codex's, on Linux) cannot make one inside
    Corral's: every command fails ("bwrap: setting up uid map: Operation not permitted"). Its
    adapter module's `in_corral_sandbox` hands the confinement to Corral's sandbox instead, which
    already keeps writes to the worktree and applies the network policy. Others run unchanged.
    """
    module_name = AGENTS.get(agent or "")
    rewrite = getattr(importlib.import_module(module_name), "in_corral_sandbox", None) if module_name else None
    return list(command) if rewrite is None else list(rewrite(list(command)))


def hook_command() -> str:
    """The PreToolUse hook command Claude Code and Codex run for each shell command (actors/shellhook.py).

    `-I`: the worktree (the hook's cwd) and PYTHON* variables stay out of its import path.
    """
    import shlex
    import sys

    return f"{shlex.quote(sys.executable)} -I -m actors.shellhook"


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


def build_command(
    agent: str, task: str | None, extra: Sequence[str] = (), *, resume: str | None = None, fork: bool = False
) -> list[str]:
    """The command line that runs `task` with this agent's CLI (extra args appended); ValueError if impossible.

    `resume`: continue that recorded session (its id; "" for a CLI that resumes from the worktree).
    `fork`: continue it as a new session, leaving the recorded one as it is (Claude Code
    `--fork-session`, `codex exec fork`); needs the CLI's `fork` capability.
    """
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
    if resume is not None and fork:
        problem = missing_feature(agent, probe(agent, program), "fork")
        if problem:
            raise ValueError(problem)
        command: list[str] = module.command_line(program, task, list(extra), resume=resume, fork=True)
    elif resume is not None:
        problem = missing_feature(agent, probe(agent, program), "resume")
        if problem:
            raise ValueError(problem)
        command = module.command_line(program, task, list(extra), resume=resume)
    else:
        command = module.command_line(program, task, list(extra))
    return command


def split_words(task: str | None, words: Sequence[str]) -> tuple[str, list[str]]:
    """`[TASK...] [-- EXTRA...]` -> (task, extra args); ValueError if the task is given twice."""
    words = list(words)
    split = words.index("--") if "--" in words else len(words)
    positional, extra = words[:split], words[split + 1 :]
    if positional and task:
        raise ValueError(f"give the task once: either --task or as an argument, not both ({positional[0]!r})")
    return task or " ".join(positional), extra


def agent_command_line(
    agent: str,
    task: str | None,
    words: Sequence[str],
    template_args: Sequence[str] = (),
    *,
    resume: str | None = None,
) -> tuple[str, list[str]]:
    """`corral run --agent A [TASK...] [-- EXTRA...]` -> (task, command); ValueError if it cannot be built.

    The words before `--` are the task (unless --task gave it); those after it are passed to the CLI.
    """
    text, extra = split_words(task, words)
    return text, build_command(agent, text, [*template_args, *extra], resume=resume)


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on one line of a CLI's stream, or None for anything else (kept as text)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# --- prices: cost estimated from tokens (Codex and Gemini report none) ----------------------------

# USD per million tokens: (input, output, cache read, cache write). Estimates from the providers'
# published list prices; the longest prefix of a model name wins; `[prices]` in corral.toml adds or
# overrides entries (docs/adapters.md). "test-model" is the scripted model server of the test suite.
DEFAULT_PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-opus-4": (5.0, 25.0, 0.5, 6.25),
    "claude-opus-4-0": (15.0, 75.0, 1.5, 18.75),
    "claude-opus-4-1": (15.0, 75.0, 1.5, 18.75),
    "claude-opus-4-2025": (15.0, 75.0, 1.5, 18.75),
    "claude-sonnet-4": (3.0, 15.0, 0.3, 3.75),
    "claude-haiku-4": (1.0, 5.0, 0.1, 1.25),
    "claude-3-5-haiku": (0.8, 4.0, 0.08, 1.0),
    "gpt-5": (1.25, 10.0, 0.125, 0.0),
    "gpt-5-mini": (0.25, 2.0, 0.025, 0.0),
    "gpt-5-nano": (0.05, 0.4, 0.005, 0.0),
    "gpt-4.1": (2.0, 8.0, 0.5, 0.0),
    "gpt-4.1-mini": (0.4, 1.6, 0.1, 0.0),
    "gpt-4o": (2.5, 10.0, 1.25, 0.0),
    "o3": (2.0, 8.0, 0.5, 0.0),
    "o4-mini": (1.1, 4.4, 0.275, 0.0),
    "gemini-2.5-pro": (1.25, 10.0, 0.31, 0.0),
    "gemini-2.5-flash": (0.3, 2.5, 0.075, 0.0),
    "gemini-2.5-flash-lite": (0.1, 0.4, 0.025, 0.0),
    "gemini-3-pro": (2.0, 12.0, 0.2, 0.0),
    "gemini-3.1-pro": (2.0, 12.0, 0.2, 0.0),
    "gemini-3-flash": (0.5, 3.0, 0.05, 0.0),
    "gemini-3.5-flash-lite": (0.1, 0.4, 0.025, 0.0),
    "test-model": (1.0, 2.0, 0.1, 0.0),
}
PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


def model_name(model: str) -> str:
    """A model as usage rows name it: without a `[1m]`-style context-window suffix."""
    return re.sub(r"\[[^\]]*\]$", "", model.strip()) or model


# What the CLIs print when they cannot reach their model server (connection refused, no route, DNS,
# "waiting for network"); an HTTP error from a server that answered is not one of them.
NETWORK_ERROR = re.compile(
    r"waiting for network|connection (?:error|failed|refused|reset)|failed to connect|fetch failed|"
    r"ECONNREFUSED|ECONNRESET|ENOTFOUND|EAI_AGAIN|ENETUNREACH|EHOSTUNREACH|network is unreachable|"
    r"APIConnectionError|Exception - Connection|getaddrinfo|name resolution|error sending request|"
    r"Unable to connect",
    re.IGNORECASE,
)


def network_error(text: str) -> bool:
    """Whether a line or message says the model server could not be reached."""
    return bool(text) and NETWORK_ERROR.search(text) is not None


def model_key(model: str) -> str:
    """A model name as the price table keys it: no provider prefix, no `[1m]`-style suffix, lowercase."""
    name = model.strip().lower().split("[", 1)[0]
    return name.rsplit("/", 1)[-1]


def price_of(model: str | None, prices: dict[str, Any] | None = None) -> tuple[float, float, float, float] | None:
    """The price of a model (longest matching prefix; `prices` over the defaults), or None if unknown."""
    if not model:
        return None
    table: dict[str, tuple[float, float, float, float]] = dict(DEFAULT_PRICES)
    for name, entry in (prices or {}).items():
        if isinstance(entry, dict):
            table[model_key(name)] = tuple(float(entry.get(f) or 0.0) for f in PRICE_FIELDS)  # type: ignore[assignment]
    key = model_key(model)
    matches = [name for name in table if key.startswith(name)]
    return table[max(matches, key=len)] if matches else None


def estimate_cost(tick: dict[str, Any], prices: dict[str, Any] | None = None) -> float | None:
    """USD for one usage tick's tokens at its model's price; None when the model has no price."""
    price = price_of(tick.get("model"), prices)
    if price is None:
        return None
    counts = [int(tick.get(f) or 0) for f in TOKEN_FIELDS]
    return round(sum(n * p for n, p in zip(counts, price, strict=True)) / 1e6, 10)


# --- capabilities: what the installed CLI supports, probed once per binary --------------------------

CAPABILITY_CACHE = "agent-capabilities.json"
PROBE_TIMEOUT_S = 60.0
VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?(?:[-+.][0-9A-Za-z.]+)?")


def corral_home() -> Path:
    return Path(os.environ.get("CORRAL_HOME") or Path.home() / ".corral").expanduser()


def _probe_key(program: str) -> str | None:
    """The cache key of a binary: its real path, mtime and size (an upgrade changes it)."""
    try:
        real = os.path.realpath(program)
        stat = os.stat(real)
    except OSError:
        return None
    return f"{real}|{stat.st_mtime_ns}|{stat.st_size}"


def _run_probes(program: str, probes: Sequence[Sequence[str]]) -> list[str]:
    """The output of each probe (`PROGRAM ARGS`), run at once; "" for a probe that fails."""
    env = {**os.environ, "NO_COLOR": "1", "CI": "1"}
    running: list[subprocess.Popen[str] | None] = []
    for args in probes:
        try:
            running.append(
                subprocess.Popen(
                    [program, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    text=True,
                    errors="replace",
                )
            )
        except OSError:
            running.append(None)
    outputs = []
    for process in running:
        if process is None:
            outputs.append("")
            continue
        try:
            out, _ = process.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        outputs.append(out or "")
    return outputs


def probe(agent: str, program: str) -> dict[str, Any]:
    """{program, version, features} of one CLI binary: from the cache, else by running `--version` / `--help`.

    The cache ($CORRAL_HOME/agent-capabilities.json) is keyed by the binary's real path, mtime and size.
    """
    module = importlib.import_module(AGENTS[agent])
    key = _probe_key(program)
    cache_file = corral_home() / CAPABILITY_CACHE
    cache: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(cache_file.read_text())
        cache = loaded if isinstance(loaded, dict) else {}
    cached = cache.get(f"{agent}|{key}") if key else None
    if isinstance(cached, dict) and isinstance(cached.get("features"), dict):
        return {**cached, "program": program, "cached": True}
    version_text, *help_texts = _run_probes(program, module.PROBES)
    found = VERSION.search(version_text)
    result = {
        "program": program,
        "version": found.group(0) if found else None,
        "features": module.features("\n".join(help_texts)),
        "cached": False,
    }
    if key and (found or any(help_texts)):
        cache[f"{agent}|{key}"] = {k: v for k, v in result.items() if k not in ("program", "cached")}
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{CAPABILITY_CACHE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(cache_file)
    return result


def missing_feature(agent: str, capabilities: dict[str, Any], feature: str) -> str | None:
    """One line saying that a CLI lacks `feature` and what to do; None when it has it."""
    if (capabilities.get("features") or {}).get(feature):
        return None
    what = FEATURE_TEXT.get(feature, feature)
    version = capabilities.get("version") or "of unknown version"
    module = importlib.import_module(AGENTS[agent])
    return f"{module.PROGRAM} {version} cannot {what} ({FEATURE_ADVICE.get(feature, 'upgrade it: ' + module.INSTALL)})"


FEATURE_TEXT = {
    "stream_input": "take input while it runs",
    "resume": "resume a recorded session",
    "fork": "fork a recorded session",
    "live_usage": "report usage while it runs",
}
FEATURE_ADVICE = {
    "stream_input": "continue it once it is done: corral run --resume EXEC_ID 'TEXT'",
    "resume": "start a new run with the whole task instead",
    "live_usage": "a --max-cost budget is checked when it reports usage, at the end, and cannot pause it",
}
