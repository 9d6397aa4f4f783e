"""`corral up --metrics-port`: the Prometheus endpoint scraped over real HTTP while real agents run."""

import asyncio
import contextlib
import json
import math
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from actors.bus import connect_bus
from corral.server import free_port
from corral.system import ALL_ACTORS
from events.subjects import STREAM
from tests.conftest import Cli, agent_command
from tests.test_control import detach, stop_up, wait_state, wait_until

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def launch(cli: Cli, *args: str) -> "subprocess.Popen[str]":
    """`corral up ARGS` once ready; killed if it never gets there, so no process outlives the test."""
    up = cli.popen("up", *args)
    runtime = cli.home / "runtime.json"

    def ready() -> bool:
        if up.poll() is not None:
            raise AssertionError(f"corral up exited: {up.stderr.read() if up.stderr else ''}")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            written = json.loads(runtime.read_text())
            return bool(written.get("pid") == up.pid and written.get("ready"))
        return False

    try:
        wait_until(ready, 60, "corral up to be ready")
    except BaseException:
        up.kill()
        up.communicate()
        raise
    return up


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples keyed by (name, sorted labels), and the TYPE of each family; checks the format's rules."""
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE of {name} given twice"
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, labels, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types and family in helps, f"{name} has no HELP/TYPE before it"
            key = (name, tuple(sorted(LABEL.findall(labels or ""))))
            assert key not in samples, f"{key} given twice"
            samples[key] = math.inf if value == "+Inf" else float(value)
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    return samples, types


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def ready_scrape(port: int) -> tuple[Samples, dict[str, str]]:
    def attempt() -> tuple[Samples, dict[str, str]] | None:
        try:
            return scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return None

    return wait_until(attempt, 60, "the metrics endpoint")  # type: ignore[return-value]


def wait_metric(port: int, predicate: object, what: str) -> Samples:
    def check() -> Samples | None:
        samples, _ = scrape(port)
        return samples if predicate(samples) else None  # type: ignore[operator]

    return wait_until(check, 60, what)  # type: ignore[return-value]


def check_histogram(samples: Samples, name: str) -> int:
    buckets = sorted(
        ((float(dict(labels)["le"]), v) for (n, labels), v in samples.items() if n == f"{name}_bucket"),
    )
    assert buckets and buckets[-1][0] == math.inf
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name} buckets must be cumulative"
    assert counts[-1] == value(samples, f"{name}_count")
    assert value(samples, f"{name}_sum") >= 0
    return int(counts[-1])


def sql_count(cli: Cli, where: str) -> int:
    rows = json.loads(cli("sql", f"SELECT count(*) AS n FROM executions WHERE {where}", "--json", check=True).stdout)
    return int(rows[0]["n"])


def log_last_seq(cli: Cli) -> int:
    """The event stream's last sequence, asked of the test's nats-server directly."""

    async def ask() -> int:
        bus = await connect_bus(cli.env["CORRAL_NATS_URL"])
        try:
            return int((await bus.js.stream_info(STREAM)).state.last_seq)
        finally:
            await bus.close()

    return asyncio.run(ask())


def test_metrics_follow_executions_checkpoints_and_approvals(cli: Cli, repo: Path) -> None:
    port = free_port()
    up = launch(cli, "--metrics-port", str(port))
    try:
        samples, types = ready_scrape(port)
        assert types["corral_executions"] == "gauge"
        assert types["corral_checkpoint_duration_seconds"] == "histogram"
        assert value(samples, "corral_executions", state="exited") == 0
        assert value(samples, "corral_approvals_pending") == 0
        assert value(samples, "corral_events_stored_total") == log_last_seq(cli)
        for actor in ALL_ACTORS:
            ups = [v for (n, labels), v in samples.items() if n == "corral_actor_up" and ("actor", actor) in labels]
            assert ups == [1.0], f"{actor}: {ups}"

        for task in ("first", "second"):
            cli("run", "--repo", str(repo), *agent_command(task, "--steps", "2", "--sleep", "0"), check=True)
        execution_id = detach(cli, repo, *agent_command("third", "--steps", "1", "--read-input"))
        wait_state(cli, execution_id, "running")
        samples = wait_metric(
            port,
            lambda s: (
                value(s, "corral_executions", state="exited") == 2
                and value(s, "corral_executions", state="running") == 1
            ),
            "two exited and one running execution",
        )
        before = check_histogram(samples, "corral_checkpoint_duration_seconds")
        (Path(json.loads(cli("status", execution_id, "--json", check=True).stdout)["worktree"]) / "new.txt").write_text(
            "x\n"
        )
        cli("checkpoint", execution_id, check=True)
        samples = wait_metric(
            port,
            lambda s: check_histogram(s, "corral_checkpoint_duration_seconds") > before,
            "the demanded checkpoint to be counted",
        )
        assert check_histogram(samples, "corral_validation_duration_seconds") >= 1
        cli("input", execution_id, "quit", check=True)
        wait_state(cli, execution_id, "exited")

        asking = detach(cli, repo, *agent_command("deploy it", "--ask-approval", "deploy", "--steps", "1"))
        wait_metric(port, lambda s: value(s, "corral_approvals_pending") == 1, "one pending approval")
        pending = json.loads(cli("approvals", "--json", check=True).stdout)
        cli("approve", pending[0]["approval_id"], "--choice", "yes", check=True)
        wait_state(cli, asking, "exited")
        samples = wait_metric(
            port,
            lambda s: (
                value(s, "corral_approvals_pending") == 0
                and value(s, "corral_executions", state="exited") == 4
                and value(s, "corral_projector_lag_events") == 0
            ),
            "the approval decided and everything projected",
        )

        # Once idle, the log, the projections and the metrics agree.
        stored = log_last_seq(cli)
        samples = wait_metric(
            port,
            lambda s: (
                value(s, "corral_events_stored_total") == stored and value(s, "corral_events_projected_total") == stored
            ),
            "stored and projected to reach the log's last sequence",
        )
        assert value(samples, "corral_projector_lag_seconds") == 0
        assert value(samples, "corral_events_published_total") > 0
        for state in ("exited", "running", "queued", "failed"):
            assert value(samples, "corral_executions", state=state) == sql_count(cli, f"state = '{state}'"), state
        assert check_histogram(samples, "corral_checkpoint_duration_seconds") == sql_count_checkpoints(cli)

        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", data=b"x", timeout=10)
        assert posted.value.code == 405
        assert json.loads((cli.home / "runtime.json").read_text())["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
    finally:
        stop_up(cli, up)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def sql_count_checkpoints(cli: Cli) -> int:
    sql = "SELECT count(*) AS n FROM events WHERE type = 'checkpoint.created'"
    rows = json.loads(cli("sql", sql, "--json", check=True).stdout)
    return int(rows[0]["n"])


def test_a_spawner_only_up_reports_the_whole_system(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """Metrics come from the log, the health bucket and the projector's position request, not local actors."""
    others = launch(cli, "--actors", "watchdog,checkpointer,validator,approver,projector,notifier,conductor")
    home = tmp_path / "spawner-home"
    # Another host's home: it gets the system's NATS credentials file, as a real second host would.
    spawner_cli = Cli(
        home, {**cli.env, "CORRAL_HOME": str(home), "CORRAL_NATS_CREDS": str(cli.home / "credentials.json")}
    )
    port = free_port()
    spawner: subprocess.Popen[str] | None = None
    try:
        spawner = launch(spawner_cli, "--actors", "spawner", "--metrics-port", str(port))
        ready_scrape(port)
        spawner_cli("run", "--repo", str(repo), *agent_command("remote", "--steps", "1", "--sleep", "0"), check=True)
        stored = log_last_seq(cli)
        samples = wait_metric(
            port,
            lambda s: (
                value(s, "corral_executions", state="exited") == 1
                and value(s, "corral_events_projected_total") >= stored
            ),
            "the execution and its projection",
        )
        actors = {
            dict(labels)["actor"]: dict(labels)["instance"]
            for (n, labels), _ in samples.items()
            if n == "corral_actor_up"
        }
        assert set(actors) == set(ALL_ACTORS)
        assert actors["spawner"].endswith(f"-{spawner.pid}") and actors["projector"].endswith(f"-{others.pid}")
        assert value(samples, "corral_events_stored_total") >= stored
    finally:
        if spawner is not None:
            stop_up(spawner_cli, spawner)
        stop_up(cli, others)


def test_bad_metrics_ports_fail_with_one_line_and_start_nothing(cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli("up", "--metrics-port", str(port), timeout=60)
    assert busy.returncode == 1
    assert busy.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in busy.stderr and "in use" in busy.stderr
    assert not (cli.home / "runtime.json").exists()
    for bad in ("abc", "70000", "-1"):
        result = cli("up", f"--metrics-port={bad}", timeout=60)
        assert result.returncode == 2, bad
        assert result.stderr.count("\n") == 1 and "--metrics-port" in result.stderr, result.stderr
    alone = cli("up", "--metrics-address", "0.0.0.0", timeout=60)
    assert alone.returncode == 2 and "--metrics-port" in alone.stderr
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text("[metrics]\nport = 99999\n")
    configured = cli("up", timeout=60)
    assert configured.returncode == 2 and "metrics.port: must be at most 65535" in configured.stderr
    assert not (cli.home / "runtime.json").exists()


def test_port_from_corral_toml_and_the_nats_monitoring_port(embedded_cli: Cli) -> None:
    port, monitor = free_port(), free_port()
    embedded_cli.home.mkdir(parents=True, exist_ok=True)
    (embedded_cli.home / "corral.toml").write_text(f"[metrics]\nport = {port}\nnats_monitor_port = {monitor}\n")
    up = launch(embedded_cli, "--actors", "projector")
    try:
        samples, _ = ready_scrape(port)
        ups = {dict(labels)["actor"]: v for (n, labels), v in samples.items() if n == "corral_actor_up"}
        assert ups == {"projector": 1.0}
        # NATS's own monitoring port is open, and agrees with Corral's figure of the log.
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz?streams=true", timeout=10) as response:
            jsz = json.loads(response.read())
        streams = [s for a in jsz["account_details"] for s in a.get("stream_detail", [])]
        last_seq = next(s["state"]["last_seq"] for s in streams if s["name"] == STREAM)
        assert value(samples, "corral_events_stored_total") == last_seq
    finally:
        stop_up(embedded_cli, up)


def test_output_stream_metrics_under_log_retention(cli: Cli, repo: Path) -> None:
    """With [retention], the output stream's stored/retained/projected counters and its lag."""
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text("[retention]\noutput_max_msgs = 10\n")
    port = free_port()
    up = launch(cli, "--metrics-port", str(port))
    try:
        samples, types = ready_scrape(port)
        assert types["corral_output_events_stored_total"] == "counter"
        assert types["corral_output_events_retained"] == "gauge"
        cli("run", "--repo", str(repo), *agent_command("out", "--steps", "20", "--sleep", "0.1"), check=True)
        samples = wait_metric(
            port,
            lambda s: (
                (s.get(("corral_output_events_stored_total", ())) or 0) > 10
                and s.get(("corral_projector_output_lag_events", ())) == 0
            ),
            "output projected",
        )
        stored = value(samples, "corral_output_events_stored_total")
        assert value(samples, "corral_output_events_retained") == 10  # the limit holds
        assert value(samples, "corral_output_events_projected_total") == stored
    finally:
        stop_up(cli, up)
