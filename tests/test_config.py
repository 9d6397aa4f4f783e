"""corral.toml: parsing, validation messages, lookup order, precedence, and `corral templates`."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.config import (
    Config,
    ConfigError,
    ExecutionSettings,
    format_duration,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    resolve_run,
)
from corral.errors import CorralError, UsageError
from corral.home import Home

G = 1024**3
M = 1024**2

FULL = """
[defaults]
timeout = "2h"
idle_timeout = "10m"
spawn_timeout = 60
on_stall = "pause"
cancel_grace = "15s"
memory = "2G"
cpus = 1.5
disk = "5G"
priority = 3

[spawner]
max_running = 8
stop_grace = "7s"

[watchdog]
check_interval = "500ms"
crash_loop_failures = 5
crash_loop_window = "1h30m"
retry_max_attempts = 2
retry_backoff = "2s"
retry_backoff_max = "1m"
retry_on = ["lost", "spawn", "lost", "timeout"]

[templates.fast]
description = "quick fixes"
command = ["python", "agent.py"]
args = ["--quick"]
agent = "claude"
env = { MODE = "fast", LEVEL = "1" }
timeout = "5m"
memory = "512M"
on_stall = "cancel"

[templates.long]
command = "python 'my agent.py' --deep"
timeout = "none"
cpus = 0

[policy]
forbidden_paths = ["secrets/**"]
max_files = 50
"""


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    write(tmp_path / "work" / "corral.toml", text)
    return load_config(Home(tmp_path / "home"), cwd=tmp_path / "work")


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert "\n" not in caught.value.message
    return caught.value.message


# --- sizes and durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("45", 45.0),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        ("2m 30s", 150.0),
        ("10M", 600.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["abc", "", "10x", "h", "1h30", -1, True, None, [1], float("nan"), "-5s"])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("1K", 1024),
        ("512M", 512 * M),
        ("512m", 512 * M),
        ("2G", 2 * G),
        ("1.5G", 3 * G // 2),
        ("2GiB", 2 * G),
        ("2GB", 2 * G),
        ("1T", 1024 * G),
    ],
)
def test_parse_size(value: Any, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["abc", "", "2X", "G", -1, True, 1.5, None, "1.5.5G"])
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(("text", "shown"), [("1h30m", "1h30m"), ("500ms", "500ms"), ("2h", "2h"), ("90s", "1m30s")])
def test_format_duration_round_trips(text: str, shown: str) -> None:
    assert format_duration(parse_duration(text)) == shown
    assert parse_duration(shown) == parse_duration(text)


@pytest.mark.parametrize("text", ["2G", "1.5G", "512M", "3K", "100"])
def test_format_size_round_trips(text: str) -> None:
    assert format_size(parse_size(text)) == text


# --- loading -----------------------------------------------------------------------------------


def test_no_file_means_defaults(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    config = load_config(Home(tmp_path / "home"), cwd=tmp_path / "work")
    assert config.source is None
    assert config.searched == (tmp_path / "work" / "corral.toml", tmp_path / "home" / "corral.toml")
    assert config.defaults == ExecutionSettings()
    assert config.defaults.timeout_s is None
    assert config.defaults.on_stall == "notify"
    assert config.defaults.cancel_grace_s == 10.0
    assert config.spawner.max_running == 4
    assert config.spawner.stop_grace_s == 5.0
    assert config.watchdog.check_interval_s == 0.25
    assert config.watchdog.crash_loop_failures == 3
    assert config.watchdog.crash_loop_window_s == 600.0
    assert config.watchdog.retry_max_attempts == 0
    assert config.watchdog.retry_backoff_s == 5.0
    assert config.watchdog.retry_backoff_max_s == 300.0
    assert config.watchdog.retry_on == ("lost", "spawn")
    assert config.templates == {}
    assert config.policy == {}


def test_full_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    assert config.source == tmp_path / "work" / "corral.toml"
    d = config.defaults
    assert (d.timeout_s, d.idle_timeout_s, d.spawn_timeout_s) == (7200.0, 600.0, 60.0)
    assert (d.on_stall, d.cancel_grace_s, d.priority) == ("pause", 15.0, 3)
    assert (d.memory_bytes, d.cpus, d.disk_bytes) == (2 * G, 1.5, 5 * G)
    assert (config.spawner.max_running, config.spawner.stop_grace_s) == (8, 7.0)
    w = config.watchdog
    assert (w.check_interval_s, w.crash_loop_failures, w.crash_loop_window_s) == (0.5, 5, 5400.0)
    assert (w.retry_max_attempts, w.retry_backoff_s, w.retry_backoff_max_s) == (2, 2.0, 60.0)
    assert w.retry_on == ("lost", "spawn", "timeout")
    assert [w.retry_delay(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 60.0]
    assert list(config.templates) == ["fast", "long"]
    fast = config.templates["fast"]
    assert fast.name == "fast"
    assert fast.description == "quick fixes"
    assert fast.command == ("python", "agent.py")
    assert fast.args == ("--quick",)
    assert fast.agent == "claude"
    assert fast.env == {"MODE": "fast", "LEVEL": "1"}
    assert fast.overrides() == {"timeout_s": 300.0, "memory_bytes": 512 * M, "on_stall": "cancel"}
    assert fast.idle_timeout_s is None
    long = config.templates["long"]
    assert long.command == ("python", "my agent.py", "--deep")
    assert long.timeout_s == 0  # explicitly no limit, kept so it overrides the default
    assert config.policy == {"forbidden_paths": ["secrets/**"], "max_files": 50}


def test_config_models_are_frozen(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    with pytest.raises(ValueError, match="frozen"):
        config.defaults.timeout_s = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        config.templates["fast"].command = ("x",)  # type: ignore[misc]


# --- precedence --------------------------------------------------------------------------------


def test_defaults_only(tmp_path: Path) -> None:
    run = resolve_run(load_text(tmp_path, FULL), None, {})
    assert run.template is None
    assert run.settings == load_text(tmp_path, FULL).defaults
    assert run.command is None
    assert run.command_prefix == ()
    assert run.env == {}


def test_template_overrides_defaults(tmp_path: Path) -> None:
    run = resolve_run(load_text(tmp_path, FULL), "fast", {})
    assert run.template == "fast"
    s = run.settings
    assert s.timeout_s == 300.0  # template
    assert s.memory_bytes == 512 * M  # template
    assert s.on_stall == "cancel"  # template
    assert s.idle_timeout_s == 600.0  # default
    assert s.priority == 3  # default
    assert run.command_prefix == ("python", "agent.py", "--quick")
    assert run.agent == "claude"
    assert run.env == {"MODE": "fast", "LEVEL": "1"}


def test_template_none_clears_a_default_limit(tmp_path: Path) -> None:
    run = resolve_run(load_text(tmp_path, FULL), "long", {})
    assert run.settings.timeout_s is None
    assert run.settings.cpus is None
    assert run.settings.memory_bytes == 2 * G


def test_flags_override_template(tmp_path: Path) -> None:
    flags: dict[str, Any] = {
        "timeout_s": 42.0,
        "memory_bytes": None,  # not given: the template's value stays
        "priority": -1,
        "idle_timeout_s": 0,  # 0 = no limit, overriding the default
        "cpus": 0.5,
        "env": {"LEVEL": "2", "EXTRA": "x"},
        "agent": "codex",
    }
    run = resolve_run(load_text(tmp_path, FULL), "fast", flags)
    assert run.settings.timeout_s == 42.0
    assert run.settings.memory_bytes == 512 * M
    assert run.settings.priority == -1
    assert run.settings.idle_timeout_s is None
    assert run.settings.cpus == 0.5
    assert run.env == {"MODE": "fast", "LEVEL": "2", "EXTRA": "x"}
    assert run.agent == "codex"


def test_flags_accept_raw_strings(tmp_path: Path) -> None:
    run = resolve_run(load_text(tmp_path, FULL), None, {"timeout_s": "1h30m", "disk_bytes": "1G"})
    assert run.settings.timeout_s == 5400.0
    assert run.settings.disk_bytes == G


def test_bad_flag_value_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        resolve_run(load_text(tmp_path, FULL), None, {"idle_timeout_s": "soon"})
    assert caught.value.message == "--idle-timeout: expected a duration like 30s, 10m, 2h (got 'soon')"


def test_unknown_flag_key_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="timeout"):
        resolve_run(load_text(tmp_path, FULL), None, {"timeout": 5})


def test_unknown_template_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_run(load_text(tmp_path, FULL), "fsat", {})
    assert caught.value.message == (
        "no template 'fsat' in corral.toml (known: fast, long); `corral templates` lists them"
    )
    assert isinstance(caught.value, CorralError)
    assert caught.value.exit_code != 0


def test_unknown_template_without_a_file_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    config = load_config(Home(tmp_path / "home"), cwd=tmp_path / "work")
    with pytest.raises(ConfigError, match=r"no template 'x': no corral.toml found \(looked at .*work/corral.toml"):
        resolve_run(config, "x", {})


def test_argv(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)
    fast = resolve_run(config, "fast", {})
    assert fast.argv() == ("python", "agent.py", "--quick")
    assert fast.argv(["sh", "-c", "true"]) == ("sh", "-c", "true", "--quick")
    with pytest.raises(UsageError, match="no command to run"):
        resolve_run(config, None, {}).argv([])


# --- error messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[templates.fast]\ntimeout = "abc"\n',
            "corral.toml: templates.fast.timeout: expected a duration like 30s, 10m, 2h (got 'abc')",
        ),
        ("[defaults]\ntimout = 5\n", "corral.toml: unknown key defaults.timout (did you mean timeout?)"),
        ("[spawner]\nmax_runing = 5\n", "corral.toml: unknown key spawner.max_runing (did you mean max_running?)"),
        ("[templates.a]\ncomand = ['x']\n", "corral.toml: unknown key templates.a.comand (did you mean command?)"),
        ("[defualts]\n", "corral.toml: unknown key defualts (did you mean defaults?)"),
        (
            '[defaults]\nmemory = "lots"\n',
            "corral.toml: defaults.memory: expected a size like 512M, 2G, 1.5G (got 'lots')",
        ),
        ("[defaults]\ncpus = true\n", "corral.toml: defaults.cpus: expected a number of CPUs like 1 or 0.5 (got true)"),
        ("[defaults]\npriority = '3'\n", "corral.toml: defaults.priority: expected an integer (got '3')"),
        (
            '[defaults]\non_stall = "panic"\n',
            "corral.toml: defaults.on_stall: expected 'notify', 'pause', 'cancel' or 'restart' (got 'panic')",
        ),
        ("[spawner]\nmax_running = 0\n", "corral.toml: spawner.max_running: must be at least 1 (got 0)"),
        ('[watchdog]\ncheck_interval = "0s"\n', "corral.toml: watchdog.check_interval: must be more than 0 (got '0s')"),
        (
            '[watchdog]\nretry_on = ["lost", "oops"]\n',
            "corral.toml: watchdog.retry_on[1]: expected 'exit', 'signal', 'timeout', 'lost', 'spawn', 'workspace' "
            "or 'stalled' (got 'oops')",
        ),
        (
            '[watchdog]\nretry_backoff = "10s"\nretry_backoff_max = "1s"\n',
            "corral.toml: watchdog: retry_backoff_max (1s) must be at least retry_backoff (10s)",
        ),
        ("[templates.a]\ncommand = []\n", "corral.toml: templates.a.command: must not be empty"),
        ("[templates.a]\nenv = { A = 1 }\n", "corral.toml: templates.a.env.A: expected a string (got 1)"),
        ("[templates.a]\nargs = 'x'\n", "corral.toml: templates.a.args: expected an array (got 'x')"),
        ("templates = 3\n", "corral.toml: templates: expected a table (got 3)"),
        ("defaults = [1]\n", "corral.toml: defaults: expected a table"),
        (
            "[templates.Fast]\n",
            "corral.toml: templates.Fast: bad template name: use lowercase letters, digits, - and _, "
            "starting with a letter or digit",
        ),
    ],
)
def test_error_messages_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    assert error_for(tmp_path, text) == message


@pytest.mark.parametrize(
    ("text", "line"),
    [("[defaults]\ntimeout = 5\n\n[oops\n", 4), ("[defaults]\ntimeout = 5\ntimeout = 6\n", 3), ("x = \n", 1)],
)
def test_toml_syntax_errors_give_the_line(tmp_path: Path, text: str, line: int) -> None:
    message = error_for(tmp_path, text)
    assert message.startswith("corral.toml: invalid TOML: ")
    assert f"(at line {line}," in message


def test_several_errors_are_all_listed(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[defaults]\ntimeout = "x"\nmemory = "y"\ncpus = "z"\n')
    assert message.startswith("corral.toml: defaults.timeout: expected a duration like 30s, 10m, 2h (got 'x'); ")
    assert "; defaults.memory: " in message and "; defaults.cpus: expected a number of CPUs" in message
    assert "\n" not in message and "more)" not in message


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "corral.toml").write_bytes(b"[defaults]\n# \xff\n")
    with pytest.raises(ConfigError, match=r"^corral.toml: not UTF-8 text$"):
        load_config(Home(tmp_path / "home"), cwd=tmp_path / "work")


def test_policy_is_kept_raw() -> None:
    # Validated by actors/policy.py (tests/test_policy.py), kept as written for the actors.
    config = parse_config("[policy]\nshell_deny = ['rm -rf *']\n[policy.budget]\nusd = 5.5\n")
    assert config.policy == {"shell_deny": ["rm -rf *"], "budget": {"usd": 5.5}}


# --- lookup order ------------------------------------------------------------------------------


@pytest.fixture
def three_files(tmp_path: Path) -> tuple[Home, Path, Path]:
    home = Home(tmp_path / "home")
    write(home.root / "corral.toml", "[spawner]\nmax_running = 1\n")
    cwd = tmp_path / "work"
    write(cwd / "corral.toml", "[spawner]\nmax_running = 2\n")
    explicit = write(tmp_path / "elsewhere" / "mine.toml", "[spawner]\nmax_running = 3\n")
    return home, cwd, explicit


def test_corral_config_wins(three_files: tuple[Home, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd, explicit = three_files
    monkeypatch.setenv("CORRAL_CONFIG", str(explicit))
    config = load_config(home, cwd=cwd)
    assert (config.source, config.spawner.max_running) == (explicit, 3)


def test_corral_config_relative_to_cwd(three_files: tuple[Home, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd, _ = three_files
    monkeypatch.setenv("CORRAL_CONFIG", "../elsewhere/mine.toml")
    assert load_config(home, cwd=cwd).spawner.max_running == 3


def test_cwd_before_home(three_files: tuple[Home, Path, Path]) -> None:
    home, cwd, _ = three_files
    config = load_config(home, cwd=cwd)
    assert (config.source, config.spawner.max_running) == (cwd / "corral.toml", 2)


def test_home_when_cwd_has_none(three_files: tuple[Home, Path, Path], tmp_path: Path) -> None:
    home, _, _ = three_files
    config = load_config(home, cwd=tmp_path)
    assert (config.source, config.spawner.max_running) == (home.root / "corral.toml", 1)


def test_missing_corral_config_is_an_error(
    three_files: tuple[Home, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, cwd, _ = three_files
    monkeypatch.setenv("CORRAL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"^CORRAL_CONFIG=.*nope\.toml: no such file$"):
        load_config(home, cwd=cwd)


def test_errors_in_the_home_file_name_its_path(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    write(home.root / "corral.toml", "[defaults]\nmemory = 'x'\n")
    (tmp_path / "work").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(home, cwd=tmp_path / "work")
    assert caught.value.message.startswith(f"{home.root / 'corral.toml'}: defaults.memory: ")


# --- corral templates (the real CLI) -----------------------------------------------------------


def corral(cwd: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_CONFIG", "CORRAL_NATS_URL")}
    env.update({"CORRAL_HOME": str(cwd.parent / "home"), **extra_env})
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_templates_table(tmp_path: Path) -> None:
    write(tmp_path / "work" / "corral.toml", FULL)
    result = corral(tmp_path / "work", "templates")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "COMMAND", "TIMEOUT", "IDLE", "MEMORY", "DESCRIPTION"]
    assert lines[1].split() == ["fast", "python", "agent.py", "--quick", "5m", "10m", "512M", "quick", "fixes"]
    assert lines[2].split() == ["long", "python", "'my", "agent.py'", "--deep", "-", "10m", "2G", "-"]
    assert len(lines) == 3


def test_templates_json(tmp_path: Path) -> None:
    write(tmp_path / "work" / "corral.toml", FULL)
    result = corral(tmp_path / "work", "templates", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [t["name"] for t in listed] == ["fast", "long"]
    fast = listed[0]
    assert fast["command"] == ["python", "agent.py"]
    assert fast["args"] == ["--quick"]
    assert fast["env"] == {"MODE": "fast", "LEVEL": "1"}
    assert fast["overrides"] == {"timeout_s": 300.0, "memory_bytes": 512 * M, "on_stall": "cancel"}
    assert fast["settings"]["timeout_s"] == 300.0
    assert fast["settings"]["idle_timeout_s"] == 600.0
    assert listed[1]["settings"]["timeout_s"] is None


def test_templates_none_defined(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = corral(tmp_path / "work", "templates")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no templates" in result.stderr
    assert str(tmp_path / "work" / "corral.toml") in result.stderr
    assert str(tmp_path / "home" / "corral.toml") in result.stderr

    as_json = corral(tmp_path / "work", "templates", "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == []


def test_templates_from_corral_config(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    mine = write(tmp_path / "mine.toml", "[templates.only]\ncommand = ['true']\n")
    result = corral(tmp_path / "work", "templates", "--json", CORRAL_CONFIG=str(mine))
    assert result.returncode == 0, result.stderr
    assert [t["name"] for t in json.loads(result.stdout)] == ["only"]


def test_templates_bad_file_is_one_line(tmp_path: Path) -> None:
    write(tmp_path / "work" / "corral.toml", '[templates.fast]\ntimeout = "abc"\n')
    result = corral(tmp_path / "work", "templates")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "corral: error: corral.toml: templates.fast.timeout: expected a duration like 30s, 10m, 2h (got 'abc')"
    ]


def test_templates_missing_corral_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = corral(tmp_path / "work", "templates", CORRAL_CONFIG=str(tmp_path / "nope.toml"))
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"corral: error: CORRAL_CONFIG={tmp_path / 'nope.toml'}: no such file"]


def test_projector_settings(tmp_path: Path) -> None:
    """[projector] memory_limit and threads reach the DuckDB worker's settings (docs/config.md)."""
    default = load_text(tmp_path, "")
    assert default.projector.duckdb_settings() == {"memory_limit": f"{256 * 1024}KiB"}
    config = load_text(tmp_path, '[projector]\nmemory_limit = "256M"\nthreads = 1\n')
    assert config.projector.memory_limit_bytes == 256 << 20
    assert config.projector.duckdb_settings() == {"memory_limit": f"{256 * 1024}KiB", "threads": 1}
    for bad in ('memory_limit = "10M"', 'memory_limit = "lots"', "threads = -1", 'threads = "2"', "limit = 1"):
        with pytest.raises(CorralError) as refused:
            load_text(tmp_path, f"[projector]\n{bad}\n")
        assert "\n" not in str(refused.value) and "projector" in str(refused.value)
