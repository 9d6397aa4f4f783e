"""corral.toml: defaults, spawner and watchdog settings, and named execution templates.

The file is looked up in order: `$CORRAL_CONFIG` (must exist), `./corral.toml`, `$CORRAL_HOME/corral.toml`;
no file means all defaults. Every error is one line naming the file and the dotted key (docs/config.md).
"""

import contextlib
import difflib
import math
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

import actors.checkpointer
import actors.limits
import actors.watchdog
import events.stream
from corral import render
from corral.errors import CorralError, UsageError
from corral.home import Home
from events.auth import AuthError, check_name
from events.units import parse_duration
from events.units import show_value as _show

FILE_NAME = "corral.toml"
ENV_VAR = "CORRAL_CONFIG"

OnStall = Literal["notify", "pause", "cancel", "restart"]
FailureClass = Literal["exit", "signal", "timeout", "lost", "spawn", "workspace", "stalled"]

TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
NO_LIMIT_WORDS = frozenset({"none", "off", "unlimited"})

# TOML key -> ExecutionSettings / Template field; the same keys are allowed in [defaults] and [templates.NAME].
SETTING_KEYS: dict[str, str] = {
    "timeout": "timeout_s",
    "idle_timeout": "idle_timeout_s",
    "spawn_timeout": "spawn_timeout_s",
    "on_stall": "on_stall",
    "cancel_grace": "cancel_grace_s",
    "memory": "memory_bytes",
    "cpus": "cpus",
    "disk": "disk_bytes",
    "pids": "pids_max",
    "priority": "priority",
    "max_cost": "max_cost_usd",
    "workspace": "workspace",
}
SETTING_FIELDS: tuple[str, ...] = tuple(SETTING_KEYS.values())
# The idle timeout of agent runs (`--agent`) when nothing else sets one: an agent CLI that cannot
# reach its model retries quietly for ever otherwise. `[defaults] agent_idle_timeout` changes it.
DEFAULT_AGENT_IDLE_TIMEOUT_S = 600.0


class ConfigError(CorralError):
    """corral.toml cannot be used, or names something it does not define; nothing was started."""

    exit_code = 2


# --- sizes and durations -------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like "512M", "2G", "1.5G" (K/M/G/T are powers of 1024; "GiB"/"GB" too)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a size of at least 0 (got {value})")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            return round(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size like 512M, 2G, 1.5G (got {_show(value)})")


def format_duration(seconds: float | None) -> str:
    """The inverse of parse_duration for display: 5400 -> "1h30m", 0.5 -> "500ms", None -> "-"."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def format_size(size: int | None) -> str:
    """The inverse of parse_size for display: 2147483648 -> "2G", 1610612736 -> "1.5G", None -> "-"."""
    if size is None:
        return "-"
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit.lower()]
        if size >= scale:
            return f"{round(size / scale, 2):g}{unit}"
    return str(size)


def _network(value: str) -> str:
    """A sandbox network setting: "open" or "none" ("allow" is refused with what to use instead)."""
    from actors.sandbox import network_problem

    problem = network_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _allow(value: tuple[str, ...]) -> tuple[str, ...]:
    """A network allow list: host:port entries (actors/netallow.py)."""
    from actors.netallow import allow_problem

    problem = allow_problem(value)
    if problem:
        raise ValueError(problem)
    return value


AllowList = Annotated[tuple[StrictStr, ...], AfterValidator(_allow)]


def _no_limit(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in NO_LIMIT_WORDS


def _limit_duration(value: Any) -> float | None:
    if value is None:
        return None
    return 0.0 if _no_limit(value) else parse_duration(value)


def _limit_size(value: Any) -> int | None:
    if value is None:
        return None
    return 0 if _no_limit(value) else parse_size(value)


def _limit_cpus(value: Any) -> float | None:
    if value is None:
        return None
    if _no_limit(value):
        return 0.0
    if isinstance(value, str):  # from the command line (--cpus 1.5)
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"expected a number of CPUs like 1 or 0.5 (got {_show(value)})")


def _limit_count(value: Any) -> int | None:
    """A number of processes (pids): a whole number, or "none"."""
    if value is None:
        return None
    if _no_limit(value):
        return 0
    if isinstance(value, str):  # from the command line (--pids 512)
        with contextlib.suppress(ValueError):
            value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected a number of processes like 512, or none (got {_show(value)})")


def parse_cost(value: Any) -> float:
    """USD from a number or a string like "2.50" or "$2.50" (a budget)."""
    if isinstance(value, str):
        text = value.strip().removeprefix("$")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected an amount in USD like 2.50 (got {value!r})") from None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"expected an amount in USD like 2.50 (got {_show(value)})")


def _limit_cost(value: Any) -> float | None:
    if value is None:
        return None
    return 0.0 if _no_limit(value) else parse_cost(value)


def _argv(value: Any) -> Any:
    """A command as an array of strings, or one string split like a shell would."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r} into words: {exc}") from None
    if isinstance(value, list | tuple) and not value:
        raise ValueError("must not be empty")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
LimitDuration = Annotated[float | None, BeforeValidator(_limit_duration)]
LimitSize = Annotated[int | None, BeforeValidator(_limit_size)]
LimitCpus = Annotated[float | None, BeforeValidator(_limit_cpus)]
LimitCount = Annotated[int | None, BeforeValidator(_limit_count)]
LimitCost = Annotated[float | None, BeforeValidator(_limit_cost)]
Command = Annotated[tuple[StrictStr, ...], BeforeValidator(_argv)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the public, resolved settings -------------------------------------------------------------


class ExecutionSettings(_Frozen):
    """What governs one execution. None means no limit (a 0 or "none" given anywhere becomes None here).

    Fields accept raw values too (ExecutionSettings(timeout_s="2h", memory_bytes="2G")).
    """

    timeout_s: LimitDuration = None
    idle_timeout_s: LimitDuration = None
    spawn_timeout_s: LimitDuration = None
    on_stall: OnStall = "notify"
    cancel_grace_s: Duration = 10.0
    memory_bytes: LimitSize = None
    cpus: LimitCpus = None
    disk_bytes: LimitSize = None
    pids_max: LimitCount = actors.limits.DEFAULT_PIDS_MAX  # processes and threads of the agent's cgroup
    priority: StrictInt = 0
    max_cost_usd: LimitCost = None  # budget: the agent is paused for an approval when its cost reaches it
    workspace: Literal["direct", "shadow"] = "direct"  # shadow: an overlay, validated changes promoted (docs/shadow.md)

    @field_validator(
        "timeout_s",
        "idle_timeout_s",
        "spawn_timeout_s",
        "memory_bytes",
        "cpus",
        "disk_bytes",
        "pids_max",
        "max_cost_usd",
    )
    @classmethod
    def _zero_is_no_limit(cls, value: float | None) -> float | None:
        return value or None

    def timeouts(self) -> dict[str, float | None]:
        """As events.types.Timeouts fields."""
        return {"hard": self.timeout_s, "idle": self.idle_timeout_s, "spawn": self.spawn_timeout_s}

    def limits(self) -> dict[str, Any]:
        """As events.types.Limits fields."""
        return {
            "memory_bytes": self.memory_bytes,
            "cpus": self.cpus,
            "disk_bytes": self.disk_bytes,
            "pids_max": self.pids_max,
        }


class SpawnerSettings(_Frozen):
    max_running: int = 4
    stop_grace_s: float = 5.0


class WatchdogSettings(_Frozen):
    check_interval_s: float = 0.25
    crash_loop_failures: int = 3
    crash_loop_window_s: float = 600.0
    retry_max_attempts: int = 0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    retry_on: tuple[str, ...] = ("lost", "spawn")

    def for_actor(self, *, cancel_grace_s: float = 10.0) -> "actors.watchdog.WatchdogSettings":
        """The watchdog actor's settings from this section (and the default cancel grace)."""
        return actors.watchdog.WatchdogSettings(**self.model_dump(), cancel_grace_s=cancel_grace_s)

    def retry_delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1 = first retry): the watchdog's own formula."""
        return self.for_actor().retry_delay(attempt)


class CheckpointsSettings(_Frozen):
    interval_s: float = 60.0
    after_files: int = 25
    debounce_s: float = 0.5
    on_pause: bool = True
    on_exit: bool = True
    on_approval: bool = True
    max_file_bytes: int = 50 << 20  # larger files are left out of checkpoints (never copied into .git); 0 = no limit

    def for_actor(self) -> "actors.checkpointer.CheckpointSettings":
        """The checkpointer actor's settings from this section."""
        return actors.checkpointer.CheckpointSettings(**self.model_dump())


class WorktreesSettings(_Frozen):
    retention_s: float = 7 * 86400.0  # `corral worktrees prune` removes finished worktrees older than this


class ForgeSettings(_Frozen):
    """Where `corral pr` opens pull requests: a forge speaking GitHub's REST shape."""

    base_url: str = "https://api.github.com"
    repo: str | None = None  # "owner/name"; None: taken from the remote's URL
    token_env: str = "GITHUB_TOKEN"  # the environment variable holding the token (never the token itself)
    remote: str = "origin"


class MetricsSettings(_Frozen):
    """`corral up`'s Prometheus endpoint (docs/metrics.md); no port: no endpoint unless --metrics-port."""

    port: int | None = None
    address: str = "127.0.0.1"
    nats_monitor_port: int | None = None  # the embedded nats-server's own monitoring port (-m)


class HttpSettings(_Frozen):
    """`corral up`'s HTTP API (docs/api.md): where it binds, or off; TLS with a certificate and key."""

    enabled: bool = True
    address: str = "127.0.0.1:8765"
    tls_cert: str | None = None
    tls_key: str | None = None
    max_failed_logins: int = 10  # per client address and minute; then 429 until the minute has passed


class RetentionSettings(_Frozen):
    """[retention] (docs/retention.md): limits of the output stream; any limit set turns it on."""

    output_max_age_s: float | None = None
    output_max_bytes: int | None = None
    output_max_msgs: int | None = None

    @property
    def enabled(self) -> bool:
        return self.for_stream().enabled

    def for_stream(self) -> "events.stream.OutputRetention":
        """The limits as events/stream.py provisions them."""
        return events.stream.OutputRetention(
            max_age_s=self.output_max_age_s, max_bytes=self.output_max_bytes, max_msgs=self.output_max_msgs
        )


class ProjectorSettings(_Frozen):
    """[projector] (docs/config.md): the projector's DuckDB worker process."""

    memory_limit_bytes: int = 256 << 20  # DuckDB's memory_limit in the worker (its buffer pool and operators)
    threads: int = 0  # DuckDB's threads in the worker; 0: one per core (DuckDB's default)

    def duckdb_settings(self) -> dict[str, str | int]:
        """The settings the worker gives its DuckDB instance (projections.worker)."""
        settings: dict[str, str | int] = {"memory_limit": f"{self.memory_limit_bytes // 1024}KiB"}
        if self.threads:
            settings["threads"] = self.threads
        return settings


class SqlSettings(_Frozen):
    """[sql] (docs/security.md, the query sandbox): `corral sql` and every query of the CLI."""

    timeout_s: float = 10.0  # a query is interrupted after this long


class SnapshotSettings(_Frozen):
    """[snapshot] (docs/tables.md, "Snapshots"): the analysts' copy `corral up` refreshes by itself."""

    every_s: float = 0.0  # 0: only on demand (`corral snapshot`)
    path: str | None = None  # default $CORRAL_HOME/snapshot.duckdb


class SecuritySettings(_Frozen):
    """[security] (docs/security.md): NATS operator users and extra secret environment names."""

    operators: tuple[str, ...] = ("operator",)  # NATS users who may request control actions and decide
    secret_env: tuple[str, ...] = ()  # names whose values are secrets besides *KEY*, *TOKEN*, ...
    consumer_sweep_s: float = 60.0  # durables no role owns are removed this often (0: at start only)


class SandboxSettings(_Frozen):
    """[sandbox] (docs/sandbox.md): how agents are confined; templates and `corral run` flags override
    mode and network."""

    mode: Literal["auto", "on", "off"] = "auto"  # auto and on: refused where no sandbox can be made
    network: Literal["open", "none", "allow"] = "open"
    allow: tuple[str, ...] = ()  # network = "allow": the host:port pairs the agent may reach
    bwrap: str = "bwrap"  # the bubblewrap binary: a path, or a name looked up on PATH


class Template(_Frozen):
    """A named set of overrides; every setting left None falls through to [defaults].

    A limit explicitly set to no limit ("none" or 0 in the file) is kept as 0 here so that it overrides a default.
    """

    name: str
    description: str = ""
    workspace: str | None = None  # over [defaults] workspace: direct, shadow
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    agent: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = None
    idle_timeout_s: float | None = None
    spawn_timeout_s: float | None = None
    on_stall: OnStall | None = None
    cancel_grace_s: float | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    disk_bytes: int | None = None
    pids_max: int | None = None
    priority: int | None = None
    max_cost_usd: float | None = None
    policy: dict[str, Any] | None = None  # this template's [templates.NAME.policy], over [policy]
    sandbox: str | None = None  # over [sandbox] mode: auto, on, off
    network: str | None = None  # over [sandbox] network: open, none, allow
    allow: tuple[str, ...] | None = None  # over [sandbox] allow
    breaker_failures: int = 3  # plain runs' failures in a row that open `template:NAME` (0: none; orchestration.md)
    setup: str | None = None  # `sh -c` in the new worktree before the agent (actors/scripts.py)
    teardown: str | None = None  # `sh -c` after the agent, before its exit is recorded

    def overrides(self) -> dict[str, Any]:
        """The settings this template sets (field name -> value)."""
        return {name: getattr(self, name) for name in SETTING_FIELDS if getattr(self, name) is not None}


# --- [[notify]]: notifications that reach a human (docs/notifications.md) ----------------------

NotifyKind = Literal["webhook", "slack", "ntfy"]
# What a target gets when its entry names no `events`: the moments a human is needed or should know.
# `execution.exited` counts only when the exit is not a success (docs/notifications.md).
DEFAULT_NOTIFY_EVENTS: tuple[str, ...] = (
    "approval.requested",
    "execution.stalled",
    "execution.crash_loop",
    "limit.exceeded",
    "execution.failed",
    "execution.exited",
)
# Never notified: output is most of the log, and a notification about a notification would loop.
UNNOTIFIABLE_EVENTS: frozenset[str] = frozenset({"output", "heartbeat", "notification.sent", "notification.failed"})


class NotifyTarget(_Frozen):
    """One `[[notify]]` entry, checked: where to send which events (actors/notifier.py sends them).

    `url` may itself be a secret (a Slack incoming webhook's is): it is never logged nor recorded;
    events and messages name a target by `name` (default `kind:host`).
    """

    name: str
    kind: NotifyKind
    url: str = Field(repr=False)
    events: tuple[str, ...] = DEFAULT_NOTIFY_EVENTS
    labels: dict[str, str] = Field(default_factory=dict)  # all must equal the execution's labels
    templates: tuple[str, ...] = ()  # any of them (none: every execution)
    secret_env: str | None = None  # webhook only: the variable holding the HMAC-SHA256 secret
    link_base: str | None = None  # the HTTP API's public URL, for links in messages
    on_success: bool = False  # execution.exited with exit code 0 notifies too

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"

    def for_actor(self) -> "actors.notifier.Target":
        """The notifier's target (imported here: httpx is loaded only where notifications are sent)."""
        import actors.notifier

        return actors.notifier.Target(**self.model_dump())


class Config(_Frozen):
    source: Path | None = None
    searched: tuple[Path, ...] = ()
    defaults: ExecutionSettings = ExecutionSettings()
    spawner: SpawnerSettings = SpawnerSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    checkpoints: CheckpointsSettings = CheckpointsSettings()
    worktrees: WorktreesSettings = WorktreesSettings()
    forge: ForgeSettings = ForgeSettings()
    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings()
    security: SecuritySettings = SecuritySettings()
    retention: RetentionSettings = RetentionSettings()
    sql: SqlSettings = SqlSettings()
    projector: ProjectorSettings = ProjectorSettings()
    snapshot: SnapshotSettings = SnapshotSettings()
    sandbox: SandboxSettings = SandboxSettings()
    templates: dict[str, Template] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    prices: dict[str, dict[str, float]] = Field(default_factory=dict)  # [prices.MODEL], USD per million tokens
    notify: tuple[NotifyTarget, ...] = ()  # [[notify]] entries (docs/notifications.md)
    pipelines: dict[str, "Pipeline"] = Field(default_factory=dict)  # [pipelines.NAME] (docs/orchestration.md)
    schedules: dict[str, "ScheduleEntry"] = Field(default_factory=dict)  # [schedules.NAME] (docs/orchestration.md)
    hooks: dict[str, dict[str, Any]] = Field(default_factory=dict)  # [hooks.NAME] webhook triggers (corral/hooks.py)
    # [defaults] agent_idle_timeout: None when not written (then [defaults] idle_timeout if written,
    # else DEFAULT_AGENT_IDLE_TIMEOUT_S); 0 when written "none" (agents are not watched for idleness)
    agent_idle_timeout_s: float | None = None
    label: str = FILE_NAME  # how messages name the file: relative to the current directory when inside it


class ResolvedRun(_Frozen):
    """defaults < template < flags, merged for one `corral run`."""

    template: str | None = None
    settings: ExecutionSettings = ExecutionSettings()
    command: tuple[str, ...] | None = None  # the template's default command
    args: tuple[str, ...] = ()  # the template's extra args, appended to whichever command runs
    agent: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    sandbox: str = "auto"  # [sandbox] mode < template < --sandbox: auto, on, off
    network: str = "open"  # [sandbox] network < template < --network: open, none, allow
    allow: tuple[str, ...] = ()  # [sandbox] allow < template < --allow (each replaces the one before)

    @property
    def command_prefix(self) -> tuple[str, ...]:
        return (*(self.command or ()), *self.args)

    def argv(self, cli_command: Sequence[str] = ()) -> tuple[str, ...]:
        """The command to run: the CLI's command if given, else the template's; then the template's args."""
        base = tuple(cli_command) or self.command
        if not base:
            where = f" or set `command` in template {self.template!r}" if self.template else ""
            raise UsageError(f"no command to run: give one after `--`{where}")
        return (*base, *self.args)


# --- the file as written (keys as in TOML) -----------------------------------------------------


class _SettingsFile(_Frozen):
    timeout: LimitDuration = None
    idle_timeout: LimitDuration = None
    spawn_timeout: LimitDuration = None
    on_stall: OnStall | None = None
    cancel_grace: Duration | None = None
    memory: LimitSize = None
    cpus: LimitCpus = None
    disk: LimitSize = None
    pids: LimitCount = None
    priority: StrictInt | None = None
    max_cost: LimitCost = None
    workspace: Literal["direct", "shadow"] | None = None

    def fields(self) -> dict[str, Any]:
        values = {field: getattr(self, key) for key, field in SETTING_KEYS.items()}
        return {field: value for field, value in values.items() if value is not None}


class _DefaultsFile(_SettingsFile):
    agent_idle_timeout: LimitDuration = None  # [defaults] only: the idle timeout of agent runs


class _TemplateFile(_SettingsFile):
    description: StrictStr = ""
    policy: dict[str, Any] | None = None  # overrides [policy] key by key (actors/policy.py validates it)
    command: Command | None = None
    agent: Annotated[StrictStr, Field(min_length=1)] | None = None
    env: dict[str, StrictStr] = Field(default_factory=dict)
    args: tuple[StrictStr, ...] = ()
    sandbox: Literal["auto", "on", "off"] | None = None
    network: Annotated[StrictStr, AfterValidator(_network)] | None = None
    allow: AllowList | None = None
    breaker_failures: Annotated[StrictInt, Field(ge=0)] = 3
    setup: Annotated[StrictStr, Field(min_length=1)] | None = None
    teardown: Annotated[StrictStr, Field(min_length=1)] | None = None

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"bad environment variable name {key!r}")
        return env


class _SpawnerFile(_Frozen):
    max_running: Annotated[StrictInt, Field(ge=1)] = 4
    stop_grace: Duration = 5.0


class _WatchdogFile(_Frozen):
    check_interval: Annotated[Duration, Field(gt=0)] = 0.25
    crash_loop_failures: Annotated[StrictInt, Field(ge=0)] = 3
    crash_loop_window: Duration = 600.0
    retry_max_attempts: Annotated[StrictInt, Field(ge=0)] = 0
    retry_backoff: Duration = 5.0
    retry_backoff_max: Duration = 300.0
    retry_on: tuple[FailureClass, ...] = ("lost", "spawn")

    @model_validator(mode="after")
    def _backoff_order(self) -> "_WatchdogFile":
        if self.retry_backoff_max < self.retry_backoff:
            raise ValueError(
                f"retry_backoff_max ({format_duration(self.retry_backoff_max)}) must be at least "
                f"retry_backoff ({format_duration(self.retry_backoff)})"
            )
        return self


class _CheckpointsFile(_Frozen):
    interval: Duration = 60.0
    after_files: Annotated[StrictInt, Field(ge=0)] = 25
    debounce: Duration = 0.5
    on_pause: StrictBool = True
    on_exit: StrictBool = True
    on_approval: StrictBool = True
    max_file_size: LimitSize = 50 << 20


class _WorktreesFile(_Frozen):
    retention: Duration = 7 * 86400.0


_FORGE_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _ForgeFile(_Frozen):
    base_url: StrictStr = "https://api.github.com"
    repo: StrictStr | None = None
    token_env: StrictStr = "GITHUB_TOKEN"
    remote: Annotated[StrictStr, Field(min_length=1)] = "origin"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"expected an http:// or https:// URL (got {value!r})")
        return value.rstrip("/")

    @field_validator("repo")
    @classmethod
    def _owner_name(cls, value: str | None) -> str | None:
        if value is not None and not _FORGE_REPO.fullmatch(value):
            raise ValueError(f"expected owner/name (got {value!r})")
        return value

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise ValueError(f"expected the name of an environment variable, like GITHUB_TOKEN (got {value!r})")
        return value


class _MetricsFile(_Frozen):
    port: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None
    address: Annotated[StrictStr, Field(min_length=1)] = "127.0.0.1"
    nats_monitor_port: Annotated[StrictInt, Field(ge=1, le=65535)] | None = None


class _HttpFile(_Frozen):
    enabled: StrictBool = True
    address: Annotated[StrictStr, Field(min_length=1)] = "127.0.0.1:8765"
    tls_cert: Annotated[StrictStr, Field(min_length=1)] | None = None
    tls_key: Annotated[StrictStr, Field(min_length=1)] | None = None
    max_failed_logins: Annotated[StrictInt, Field(ge=1)] = 10


class _SecurityFile(_Frozen):
    operators: Annotated[tuple[StrictStr, ...], Field(min_length=1)] = ("operator",)
    secret_env: tuple[StrictStr, ...] = ()
    consumer_sweep: Annotated[Duration, Field(ge=0, le=86400)] = 60.0

    @field_validator("operators")
    @classmethod
    def _user_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            try:
                check_name(name)
            except AuthError as exc:
                raise ValueError(str(exc)) from None
        return tuple(dict.fromkeys(value))

    @field_validator("secret_env")
    @classmethod
    def _env_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"expected names of environment variables, like DEPLOY_CREDS (got {name!r})")
        return value


_Size = Annotated[int, BeforeValidator(parse_size)]


class _RetentionFile(_Frozen):
    output_max_age: Annotated[Duration, Field(ge=events.stream.OUTPUT_MIN_AGE_S)] | None = None
    output_max_bytes: Annotated[_Size, Field(ge=events.stream.OUTPUT_MIN_BYTES)] | None = None
    output_max_msgs: Annotated[StrictInt, Field(ge=1)] | None = None


class _SqlFile(_Frozen):
    timeout: Annotated[Duration, Field(gt=0, le=3600)] = 10.0


class _ProjectorFile(_Frozen):
    memory_limit: Annotated[_Size, Field(ge=64 << 20)] = 256 << 20
    threads: Annotated[StrictInt, Field(ge=0, le=256)] = 0


class _SnapshotFile(_Frozen):
    every: Annotated[Duration, Field(ge=0)] = 0.0
    path: StrictStr | None = None


class _PriceFile(_Frozen):
    """One model's price in USD per million tokens (an estimate used where the CLI reports no cost)."""

    input: Annotated[float, Field(ge=0)] = 0.0
    output: Annotated[float, Field(ge=0)] = 0.0
    cache_read: Annotated[float, Field(ge=0)] = 0.0
    cache_write: Annotated[float, Field(ge=0)] = 0.0


_HTTP_URL = re.compile(r"https?://[^\s/?#@]+(?:[/?#]\S*)?")


class _NotifyFile(_Frozen):
    """One `[[notify]]` table as written."""

    kind: NotifyKind
    url: StrictStr
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    events: tuple[StrictStr, ...] = DEFAULT_NOTIFY_EVENTS
    labels: dict[str, StrictStr] = Field(default_factory=dict)
    templates: tuple[StrictStr, ...] = ()
    secret_env: StrictStr | None = None
    link_base: StrictStr | None = None
    on_success: StrictBool = False

    @field_validator("url", "link_base")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        # The URL may be a secret (Slack's are): the message never repeats it.
        if value is not None and not _HTTP_URL.fullmatch(value):
            if "@" in urlsplit(value).netloc:
                raise ValueError("expected a URL without user:password@ (got one with credentials in it)")
            scheme = value.split(":", 1)[0][:10] if ":" in value else ""
            got = f"a URL starting {scheme + ':'!r}" if scheme.isalpha() else "no scheme"
            raise ValueError(f"expected an http:// or https:// URL (got {got})")
        return value

    @field_validator("events")
    @classmethod
    def _event_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from events.types import EVENT_TYPES

        if not value:
            raise ValueError("expected at least one event type (leave events out for the default ones)")
        for name in value:
            if name in UNNOTIFIABLE_EVENTS:
                raise ValueError(f"{name!r} cannot be notified")
            if name not in EVENT_TYPES:
                close = difflib.get_close_matches(name, list(EVENT_TYPES), n=1)
                hint = f" (did you mean {close[0]}?)" if close else " (`corral schema` lists the event types)"
                raise ValueError(f"unknown event type {name!r}{hint}")
        return tuple(dict.fromkeys(value))

    @field_validator("secret_env")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(f"expected the name of an environment variable, like HOOK_SECRET (got {value!r})")
        return value

    @model_validator(mode="after")
    def _kind_keys(self) -> "_NotifyFile":
        if self.secret_env is not None and self.kind != "webhook":
            raise ValueError(f'secret_env is for kind = "webhook" only (this one is {self.kind!r})')
        return self


class _SandboxFile(_Frozen):
    mode: Literal["auto", "on", "off"] = "auto"
    network: Annotated[StrictStr, AfterValidator(_network)] = "open"
    allow: AllowList = ()
    bwrap: Annotated[StrictStr, Field(min_length=1)] = "bwrap"


class _ConfigFile(_Frozen):
    defaults: _DefaultsFile = _DefaultsFile()
    spawner: _SpawnerFile = _SpawnerFile()
    watchdog: _WatchdogFile = _WatchdogFile()
    checkpoints: _CheckpointsFile = _CheckpointsFile()
    worktrees: _WorktreesFile = _WorktreesFile()
    forge: _ForgeFile = _ForgeFile()
    http: _HttpFile = _HttpFile()
    metrics: _MetricsFile = _MetricsFile()
    security: _SecurityFile = _SecurityFile()
    retention: _RetentionFile = _RetentionFile()
    sql: _SqlFile = _SqlFile()
    projector: _ProjectorFile = _ProjectorFile()
    snapshot: _SnapshotFile = _SnapshotFile()
    sandbox: _SandboxFile = _SandboxFile()
    templates: dict[str, _TemplateFile] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    prices: dict[str, _PriceFile] = Field(default_factory=dict)
    notify: list[_NotifyFile] = Field(default_factory=list)  # [[notify]]
    pipelines: dict[str, dict[str, Any]] = Field(default_factory=dict)  # checked by _pipelines
    schedules: dict[str, dict[str, Any]] = Field(default_factory=dict)  # checked by _schedules
    hooks: dict[str, dict[str, Any]] = Field(default_factory=dict)  # checked by corral/hooks.py hooks_of


_KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "": tuple(_ConfigFile.model_fields),
    "defaults": tuple(_DefaultsFile.model_fields),
    "spawner": tuple(_SpawnerFile.model_fields),
    "watchdog": tuple(_WatchdogFile.model_fields),
    "checkpoints": tuple(_CheckpointsFile.model_fields),
    "worktrees": tuple(_WorktreesFile.model_fields),
    "forge": tuple(_ForgeFile.model_fields),
    "http": tuple(_HttpFile.model_fields),
    "metrics": tuple(_MetricsFile.model_fields),
    "security": tuple(_SecurityFile.model_fields),
    "retention": tuple(_RetentionFile.model_fields),
    "sql": tuple(_SqlFile.model_fields),
    "projector": tuple(_ProjectorFile.model_fields),
    "snapshot": tuple(_SnapshotFile.model_fields),
    "sandbox": tuple(_SandboxFile.model_fields),
    "templates.*": tuple(_TemplateFile.model_fields),
    "notify.*": tuple(_NotifyFile.model_fields),
}

_TYPE_MESSAGES = {
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "tuple_type": "expected an array",
    "list_type": "expected an array",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
}


# --- loading -----------------------------------------------------------------------------------


def _label(path: Path, cwd: Path) -> str:
    """How error messages name a file: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _dotted(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _error_text(error: ErrorDetails) -> str:
    """One pydantic error as `dotted.key: message`."""
    loc = tuple(error["loc"])
    key = _dotted(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = [str(p) for p in loc[:-1]]
        scope = f"{parent[0]}.*" if len(parent) == 2 and parent[0] in ("templates", "notify") else ".".join(parent)
        known = _KNOWN_KEYS.get(scope, ())
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})" if known else ""
        return f"unknown key {key}{hint}"
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])
    elif kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind]
    elif kind == "literal_error":
        message = f"expected {ctx.get('expected')}"
    elif kind == "greater_than_equal":
        message = f"must be at least {ctx.get('ge')}"
    elif kind == "less_than_equal":
        message = f"must be at most {ctx.get('le')}"
    elif kind == "greater_than":
        message = f"must be more than {ctx.get('gt')}"
    else:
        message = error["msg"][:1].lower() + error["msg"][1:]
    scalar = isinstance(error.get("input"), str | int | float | bool)
    if "(got " not in message and kind != "missing" and scalar:
        message += f" (got {_show(error['input'])})"
    return f"{key}: {message}" if key else message


def _validation_message(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    return "; ".join(dict.fromkeys(_error_text(error) for error in errors))  # every one, on one line


def _one_line(text: str) -> str:
    return " ".join(text.split())


def candidates(home: Home, cwd: Path | None = None) -> tuple[Path | None, tuple[Path, ...]]:
    """(the file to load or None, the places looked at). Raises ConfigError if $CORRAL_CONFIG names nothing."""
    cwd = cwd or Path.cwd()
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        path = cwd / Path(explicit).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "no such file"
            raise ConfigError(f"{ENV_VAR}={explicit}: {what}")
        return path, (path,)
    searched = (cwd / FILE_NAME, home.root / FILE_NAME)
    for path in searched:
        if path.is_file():
            return path, searched
    return None, searched


def parse_config(text: str, source: Path | None = None, *, label: str = FILE_NAME) -> Config:
    """Validate the TOML text of a corral.toml; `label` names the file in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_one_line(f"{label}: invalid TOML: {exc}")) from None
    templates = raw.get("templates")
    if isinstance(templates, dict):
        for name in templates:
            if not TEMPLATE_NAME.fullmatch(name):
                raise ConfigError(
                    f"{label}: templates.{name}: bad template name: use lowercase letters, digits, - and _, "
                    "starting with a letter or digit"
                )
    try:
        parsed = _ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(f"{label}: {_validation_message(exc)}")) from None
    _check_policies(parsed.policy, {n: t.policy for n, t in parsed.templates.items()}, label)
    w = parsed.watchdog
    return Config(
        source=source,
        defaults=ExecutionSettings.model_validate(parsed.defaults.fields()),
        spawner=SpawnerSettings(max_running=parsed.spawner.max_running, stop_grace_s=parsed.spawner.stop_grace),
        watchdog=WatchdogSettings(
            check_interval_s=w.check_interval,
            crash_loop_failures=w.crash_loop_failures,
            crash_loop_window_s=w.crash_loop_window,
            retry_max_attempts=w.retry_max_attempts,
            retry_backoff_s=w.retry_backoff,
            retry_backoff_max_s=w.retry_backoff_max,
            retry_on=tuple(dict.fromkeys(w.retry_on)),
        ),
        checkpoints=CheckpointsSettings(
            interval_s=parsed.checkpoints.interval,
            after_files=parsed.checkpoints.after_files,
            debounce_s=parsed.checkpoints.debounce,
            on_pause=parsed.checkpoints.on_pause,
            on_exit=parsed.checkpoints.on_exit,
            on_approval=parsed.checkpoints.on_approval,
            max_file_bytes=parsed.checkpoints.max_file_size or 0,
        ),
        worktrees=WorktreesSettings(retention_s=parsed.worktrees.retention),
        forge=ForgeSettings(**parsed.forge.model_dump()),
        http=HttpSettings(**parsed.http.model_dump()),
        metrics=MetricsSettings(**parsed.metrics.model_dump()),
        security=SecuritySettings(
            operators=parsed.security.operators,
            secret_env=parsed.security.secret_env,
            consumer_sweep_s=parsed.security.consumer_sweep,
        ),
        retention=RetentionSettings(
            output_max_age_s=parsed.retention.output_max_age,
            output_max_bytes=parsed.retention.output_max_bytes,
            output_max_msgs=parsed.retention.output_max_msgs,
        ),
        sql=SqlSettings(timeout_s=parsed.sql.timeout),
        projector=ProjectorSettings(
            memory_limit_bytes=parsed.projector.memory_limit, threads=parsed.projector.threads
        ),
        snapshot=SnapshotSettings(every_s=parsed.snapshot.every, path=parsed.snapshot.path),
        sandbox=SandboxSettings(**parsed.sandbox.model_dump()),
        templates={
            name: Template(
                name=name,
                description=t.description,
                command=t.command,
                args=t.args,
                agent=t.agent,
                env=t.env,
                policy=t.policy,
                sandbox=t.sandbox,
                network=t.network,
                allow=t.allow,
                breaker_failures=t.breaker_failures,
                setup=t.setup,
                teardown=t.teardown,
                **t.fields(),
            )
            for name, t in sorted(parsed.templates.items())
        },
        policy=parsed.policy,
        prices={name: price.model_dump() for name, price in parsed.prices.items()},
        notify=_notify_targets(parsed.notify, set(parsed.templates), label),
        pipelines=_pipelines(parsed.pipelines, set(parsed.templates), label),
        schedules=_schedules(parsed.schedules, set(parsed.templates), set(parsed.pipelines), label),
        hooks=parsed.hooks,
        agent_idle_timeout_s=parsed.defaults.agent_idle_timeout,
        label=label,
    )


def _notify_targets(entries: list[_NotifyFile], templates: set[str], label: str) -> tuple[NotifyTarget, ...]:
    """[[notify]] as NotifyTargets: names unique (default `kind:host`), template filters defined."""
    targets: list[NotifyTarget] = []
    for i, entry in enumerate(entries):
        host = urlsplit(entry.url).hostname or "?"
        name = entry.name or f"{entry.kind}:{host}"
        if any(t.name == name for t in targets):
            raise ConfigError(
                f"{label}: notify[{i}].name: another [[notify]] entry is named {name!r}; give each a distinct name"
            )
        for template in entry.templates:
            if template not in templates:
                known = ", ".join(sorted(templates)) or "none defined"
                raise ConfigError(f"{label}: notify[{i}].templates: no template {template!r} (known: {known})")
        targets.append(
            NotifyTarget(
                name=name,
                kind=entry.kind,
                url=entry.url,
                events=entry.events,
                labels=entry.labels,
                templates=entry.templates,
                secret_env=entry.secret_env,
                link_base=entry.link_base.rstrip("/") if entry.link_base else None,
                on_success=entry.on_success,
            )
        )
    return tuple(targets)


def _check_policies(policy: dict[str, Any], templates: dict[str, dict[str, Any] | None], label: str) -> None:
    """[policy] and each template's policy (merged over it) must be valid policies (actors/policy.py)."""
    from actors.policy import PolicyError, merge_policy, parse_policy

    try:
        parse_policy(policy, where="policy")
        for name, override in sorted(templates.items()):
            if override is not None:
                parse_policy(merge_policy(policy, override), where=f"templates.{name}.policy")
    except PolicyError as exc:
        raise ConfigError(_one_line(f"{label}: {exc}")) from None


def load_config(home: Home, cwd: Path | None = None) -> Config:
    """The configuration in effect for commands run from `cwd` (default: the current directory)."""
    cwd = cwd or Path.cwd()
    source, searched = candidates(home, cwd)
    if source is None:
        return Config(searched=searched)
    label = _label(source, cwd)
    try:
        text = source.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text") from None
    return parse_config(text, source, label=label).model_copy(update={"searched": searched})


# --- merging -----------------------------------------------------------------------------------


def _flag_name(field: str) -> str:
    for suffix in ("_s", "_bytes", "_usd"):
        field = field.removesuffix(suffix)
    return "--" + field.replace("_", "-")


def resolve_run(config: Config, template: str | None, flags: dict[str, Any]) -> ResolvedRun:
    """Merge defaults < template < flags.

    `flags` keys are ExecutionSettings field names (timeout_s, memory_bytes, ...), "env" (merged over the
    template's env) and "agent"; None means not given. A 0 or "none" limit means no limit. Raw strings
    ("30s", "2G") are accepted too. Unknown template -> ConfigError; bad flag value -> UsageError.

    An agent run (`agent` other than "command") whose idle timeout no flag or template sets gets
    `[defaults] agent_idle_timeout`, else `[defaults] idle_timeout` if written, else
    DEFAULT_AGENT_IDLE_TIMEOUT_S; and `on_stall = "cancel"` unless a flag, the template or
    `[defaults]` says otherwise: it ends instead of running for ever (docs/config.md).
    """
    chosen: Template | None = None
    if template is not None:
        chosen = config.templates.get(template)
        if chosen is None:
            raise ConfigError(_unknown_template(config, template))
    merged: dict[str, Any] = config.defaults.model_dump()
    env: dict[str, str] = dict(chosen.env) if chosen else {}
    agent = chosen.agent if chosen else None
    sandboxing: dict[str, str] = {"sandbox": config.sandbox.mode, "network": config.sandbox.network}
    for key in SANDBOX_FLAGS:
        if chosen is not None and getattr(chosen, key) is not None:
            sandboxing[key] = getattr(chosen, key)
    allow = chosen.allow if chosen is not None and chosen.allow is not None else config.sandbox.allow
    if chosen:
        merged.update(chosen.overrides())
    for key, value in flags.items():
        if key not in SETTING_FIELDS and key not in ("env", "agent", "allow", *SANDBOX_FLAGS):
            raise TypeError(f"resolve_run: unknown flag {key!r}")
        if value is None:
            continue
        if key == "env":
            env.update(value)
        elif key == "agent":
            agent = value
        elif key == "allow":
            allow = _allow_flag(value)
        elif key in SANDBOX_FLAGS:
            sandboxing[key] = _sandbox_flag(key, value)
        else:
            merged[key] = value
    if agent and agent != "command":
        chosen_keys = set(chosen.overrides()) if chosen else set()
        given = {key for key, value in flags.items() if value is not None} | chosen_keys
        written = config.defaults.model_fields_set
        if "idle_timeout_s" not in given:
            if config.agent_idle_timeout_s is not None:
                merged["idle_timeout_s"] = config.agent_idle_timeout_s
            elif "idle_timeout_s" not in written:
                merged["idle_timeout_s"] = DEFAULT_AGENT_IDLE_TIMEOUT_S
        if "on_stall" not in given and "on_stall" not in written:
            merged["on_stall"] = "cancel"
    if flags.get("allow") and sandboxing["network"] != "allow":
        raise UsageError(f'--allow: only with --network allow (this run\'s network is "{sandboxing["network"]}")')
    try:
        settings = ExecutionSettings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        text = _error_text({**first, "loc": ()})
        raise UsageError(_one_line(f"{_flag_name(field)}: {text}" if field else text)) from None
    return ResolvedRun(
        template=template,
        settings=settings,
        command=chosen.command if chosen else None,
        args=chosen.args if chosen else (),
        agent=agent,
        env=env,
        sandbox=sandboxing["sandbox"],
        network=sandboxing["network"],
        allow=tuple(allow),
    )


SANDBOX_FLAGS = ("sandbox", "network")


def _sandbox_flag(key: str, value: str) -> str:
    """`--sandbox auto|on|off` or `--network open|none|allow`, checked (UsageError: one line)."""
    from actors.sandbox import MODES, network_problem

    if key == "network":
        problem = network_problem(value)
        if problem:
            raise UsageError(f"--network: {problem}")
    elif value not in MODES:
        raise UsageError(f"--sandbox: expected one of {', '.join(MODES)} (got {value!r})")
    return value


def _allow_flag(value: Sequence[str]) -> tuple[str, ...]:
    """`--allow HOST:PORT` (repeatable), checked (UsageError: one line)."""
    from actors.netallow import allow_problem

    entries = (value,) if isinstance(value, str) else tuple(value)
    problem = allow_problem(entries)
    if problem:
        raise UsageError(f"--allow: {problem}")
    return entries


def _unknown_template(config: Config, name: str) -> str:
    if config.source is None:
        looked = ", ".join(str(p) for p in config.searched) or FILE_NAME
        return f"no template {name!r}: no {FILE_NAME} found (looked at {looked})"
    known = ", ".join(config.templates) or "none defined"
    return f"no template {name!r} in {config.label} (known: {known}); `corral templates` lists them"


# --- corral templates --------------------------------------------------------------------------


def template_rows(config: Config) -> list[dict[str, Any]]:
    """Every template of corral.toml, resolved over [defaults] (`corral templates --json`, GET /api/templates)."""
    return [
        {
            "name": t.name,
            "description": t.description,
            "command": list(t.command) if t.command else None,
            "args": list(t.args),
            "agent": t.agent,
            "env": t.env,
            "overrides": t.overrides(),
            "settings": run.settings.model_dump(),
            "source": str(config.source),
        }
        for t, run in ((t, resolve_run(config, name, {})) for name, t in config.templates.items())
    ]


def cmd_templates(home: Home, args: Any) -> int:
    config = load_config(home)
    rows = [(t, resolve_run(config, name, {})) for name, t in config.templates.items()]
    if getattr(args, "json", False):
        render.print_json(template_rows(config))
    elif rows:
        print(
            render.table(
                ["name", "command", "timeout", "idle", "memory", "description"],
                [
                    [
                        t.name,
                        shlex.join(run.command_prefix) if run.command_prefix else None,
                        format_duration(run.settings.timeout_s),
                        format_duration(run.settings.idle_timeout_s),
                        format_size(run.settings.memory_bytes),
                        t.description or None,
                    ]
                    for t, run in rows
                ],
            )
        )
    if not rows:
        if config.source is None:
            looked = ", ".join(str(p) for p in config.searched)
            sys.stderr.write(f"corral: no templates: no {FILE_NAME} found (looked at {looked})\n")
        else:
            sys.stderr.write(f"corral: no templates in {config.source}; add a [templates.NAME] table\n")
    return 0


# --- [pipelines.NAME]: stages run one after another by the conductor (docs/orchestration.md) -----

PIPELINE_END = ("done", "fail")  # the edges that end a run: passed, failed


class PipelineStage(_Frozen):
    """One `[[pipelines.NAME.stages]]` entry, checked: an agent, a command, or a hook (`run`, a shell line)."""

    name: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
    agent: Literal["claude-code", "codex", "gemini", "aider"] | None = None
    template: StrictStr | None = None
    task: StrictStr | None = None  # {{variables}}: docs/orchestration.md
    command: tuple[StrictStr, ...] | None = None
    run: StrictStr | None = None  # a hook: `sh -c RUN` in the run's worktree (a verifier: the tests)
    on_passed: StrictStr | None = None  # default: the next stage, or done after the last
    on_failed: StrictStr = "fail"
    on_changes_requested: StrictStr = "fail"
    timeout: LimitDuration = None

    @property
    def kind(self) -> Literal["agent", "command", "hook"]:
        return "hook" if self.run is not None else "agent" if self.agent else "command"

    @model_validator(mode="after")
    def _one_thing_to_run(self) -> "PipelineStage":
        given = [k for k in ("agent", "command", "run") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"stage {self.name!r}: give one of agent, command or run (got {', '.join(given)})")
        if not given and self.template is None:
            raise ValueError(f"stage {self.name!r}: give agent (with task), command, run or template")
        if self.agent and not self.task:
            raise ValueError(f"stage {self.name!r}: an agent stage needs a task")
        return self


class Pipeline(_Frozen):
    name: str
    description: StrictStr = ""
    stages: Annotated[tuple[PipelineStage, ...], Field(min_length=1)]
    max_rounds: Annotated[StrictInt, Field(ge=1, le=100)] = 3  # a stage starts at most this often per run
    breaker_failures: Annotated[StrictInt, Field(ge=0)] = 3  # failures in a row that open a stage's breaker
    vars: dict[str, StrictStr] = Field(default_factory=dict)  # defaults of --var


def _pipelines(raw: dict[str, dict[str, Any]], templates: set[str], label: str) -> dict[str, Pipeline]:
    """[pipelines.NAME] tables as Pipelines: names, stage names unique, edges and templates defined."""
    found: dict[str, Pipeline] = {}
    for name, table in sorted(raw.items()):
        where = f"{label}: pipelines.{name}"
        if not TEMPLATE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: bad pipeline name: use lowercase letters, digits, - and _")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        try:
            pipeline = Pipeline.model_validate({**table, "name": name})
        except ValidationError as exc:
            raise ConfigError(_one_line(f"{where}: {_validation_message(exc)}")) from None
        names = [s.name for s in pipeline.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: two stages have the same name; names: {', '.join(names)}")
        for i, stage in enumerate(pipeline.stages):
            if stage.template is not None and stage.template not in templates:
                known = ", ".join(sorted(templates)) or "none defined"
                raise ConfigError(f"{where}.stages[{i}].template: no template {stage.template!r} (known: {known})")
            for key in ("on_passed", "on_failed", "on_changes_requested"):
                target = getattr(stage, key)
                if target is not None and target not in names and target not in PIPELINE_END:
                    raise ConfigError(
                        f"{where}.stages[{i}].{key}: no stage {target!r} (stages: {', '.join(names)}; or done, fail)"
                    )
        found[name] = pipeline
    return found


# --- [schedules.NAME]: patrol jobs fired by the conductor, once per tick (docs/orchestration.md) --


class ScheduleEntry(_Frozen):
    """One `[schedules.NAME]`: when (cron or every), what (a pipeline or a template) and where (repo)."""

    name: str
    cron: StrictStr | None = None  # 5 fields, UTC
    every: Duration | None = None  # or a fixed interval (at least 1s)
    pipeline: StrictStr | None = None
    template: StrictStr | None = None
    repo: Annotated[StrictStr, Field(min_length=1)]
    task: StrictStr | None = None  # a template's task (its agent's prompt)
    vars: dict[str, StrictStr] = Field(default_factory=dict)  # a pipeline's --var
    catch_up: Literal["none", "last"] = "none"
    breaker_failures: Annotated[StrictInt, Field(ge=0)] = 3  # failed ticks in a row that open schedule:NAME

    @model_validator(mode="after")
    def _when_and_what(self) -> "ScheduleEntry":
        from actors.schedule import Cron

        if (self.cron is None) == (self.every is None):
            raise ValueError("give one of cron or every")
        if self.cron is not None:
            try:
                Cron.parse(self.cron)
            except ValueError as exc:
                raise ValueError(f"cron {self.cron!r}: {exc}") from None
        if self.every is not None and self.every < 1:
            raise ValueError("every: at least 1s")
        if (self.pipeline is None) == (self.template is None):
            raise ValueError("give one of pipeline or template")
        return self


def _schedules(
    raw: dict[str, dict[str, Any]], templates: set[str], pipelines: set[str], label: str
) -> dict[str, ScheduleEntry]:
    found: dict[str, ScheduleEntry] = {}
    for name, table in sorted(raw.items()):
        where = f"{label}: schedules.{name}"
        if not TEMPLATE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: bad schedule name: use lowercase letters, digits, - and _")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        try:
            entry = ScheduleEntry.model_validate({**table, "name": name})
        except ValidationError as exc:
            raise ConfigError(_one_line(f"{where}: {_validation_message(exc)}")) from None
        if entry.template is not None and entry.template not in templates:
            raise ConfigError(
                f"{where}.template: no template {entry.template!r} (known: {', '.join(sorted(templates)) or 'none'})"
            )
        if entry.pipeline is not None and entry.pipeline not in pipelines:
            raise ConfigError(
                f"{where}.pipeline: no pipeline {entry.pipeline!r} (known: {', '.join(sorted(pipelines)) or 'none'})"
            )
        found[name] = entry
    return found
