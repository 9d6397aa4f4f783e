"""Live control through the CLI against a running `corral up`: real NATS, real agents, real signals."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.limits import PER_PROCESS, describe_limits
from corral.system import ALL_ACTORS
from tests.conftest import Cli, agent_command, processes_mentioning


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_up(cli: Cli, *args: str) -> subprocess.Popen[str]:
    before = (cli.home / "runtime.json").stat().st_mtime_ns if (cli.home / "runtime.json").exists() else 0
    up = cli.popen("up", *args)

    def ready() -> bool:
        runtime = cli.home / "runtime.json"
        if up.poll() is not None:
            raise AssertionError(f"corral up exited: {up.stderr.read() if up.stderr else ''}")
        return (
            runtime.exists()
            and runtime.stat().st_mtime_ns != before
            and json.loads(runtime.read_text()).get("pid") == up.pid
            and json.loads(runtime.read_text()).get("ready")
        )

    wait_until(ready, 30, "corral up to be ready")
    return up


def stop_up(cli: Cli, up: subprocess.Popen[str]) -> None:
    if up.poll() is None:
        cli("down")
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


@pytest.fixture
def up(cli: Cli) -> Iterator[subprocess.Popen[str]]:
    process = start_up(cli)
    yield process
    stop_up(cli, process)


def status(cli: Cli, execution_id: str) -> dict:
    return json.loads(cli("status", execution_id, "--json", check=True).stdout)


def events(cli: Cli, execution_id: str) -> list[dict]:
    return json.loads(
        cli(
            "sql",
            f"SELECT type, causation_id, data FROM events WHERE execution_id = '{execution_id}' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )


def wait_state(cli: Cli, execution_id: str, *states: str, timeout: float = 60.0) -> dict:
    return wait_until(  # type: ignore[return-value]
        lambda: (s := status(cli, execution_id))["state"] in states and s,
        timeout,
        f"{execution_id} to be {'/'.join(states)}",
    )


def proc_state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2]


def stopped(pid: int) -> bool:
    """Stopped by a signal (state T), or frozen in its cgroup (a paused execution's, actors/limits.py)."""
    if proc_state(pid) in ("T", "t"):
        return True
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if "freezer" in controllers.split(","):
            state = Path("/sys/fs/cgroup/freezer") / relative.lstrip("/") / "freezer.state"
            return state.is_file() and state.read_text().strip() == "FROZEN"
        if not controllers and (Path("/sys/fs/cgroup") / "cgroup.controllers").is_file():
            events = Path("/sys/fs/cgroup") / relative.lstrip("/") / "cgroup.events"
            return events.is_file() and "frozen 1" in events.read_text().splitlines()
    return False


def detach(cli: Cli, repo: Path, *args: str) -> str:
    return cli("run", "--repo", str(repo), "--detach", *args, check=True).stdout.strip()


def test_input_pause_resume_cancel(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(
        cli, repo, "--timeout", "600", *agent_command("--steps", "1", "--sleep", "0", "--read-input", "--grandchild")
    )
    wait_state(cli, execution_id, "running")

    sent = cli("input", execution_id, "hello agent", check=True)
    assert f"{execution_id}: delivered 12 bytes" in sent.stdout
    wait_until(lambda: "input: hello agent" in cli("logs", execution_id).stdout, what="the agent to echo its input")
    delivered = [e for e in events(cli, execution_id) if e["type"] == "input.delivered"]
    assert [json.loads(e["data"])["text"] for e in delivered] == ["hello agent\n"]

    paused = json.loads(cli("pause", execution_id, "--json", check=True).stdout)
    pids = paused["data"]["pids"]
    assert len(pids) >= 2  # the agent and its grandchild in another session
    assert all(stopped(pid) for pid in pids), [proc_state(p) for p in pids]
    first = status(cli, execution_id)
    time.sleep(0.5)
    second = status(cli, execution_id)
    assert first["state"] == second["state"] == "paused"
    assert first["hard_remaining_s"] == second["hard_remaining_s"], "the hard timer must be frozen while paused"

    refused = cli("pause", execution_id)
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "paused" in refused.stderr

    cli("resume", execution_id, check=True)
    assert not any(stopped(pid) for pid in pids)
    assert status(cli, execution_id)["state"] == "running"

    cancelled = json.loads(cli("cancel", execution_id, "--grace", "2", "--json", check=True).stdout)
    assert cancelled["type"] == "execution.exited"
    assert cancelled["data"]["reason"] == "cancelled"
    for pid in pids:  # nothing of the tree survives, including the grandchild with its own session
        wait_until(lambda pid=pid: proc_state(pid) in (None, "Z"), 10, f"pid {pid} to be gone")
    final = status(cli, execution_id)
    assert final["state"] == "exited"
    assert final["exit_reason"] == "cancelled"
    assert not (cli.home / "run" / execution_id).exists()

    after = cli("input", execution_id, "too late")
    assert after.returncode != 0
    assert "nothing to send input to" in after.stderr
    assert after.stderr.count("\n") == 1


def test_cancel_escalates_to_sigkill_after_the_grace(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, *agent_command("--ignore-term", "--steps", "1", "--sleep", "600"))
    wait_state(cli, execution_id, "running")
    done = json.loads(cli("cancel", execution_id, "--grace", "0.5", "--json", check=True).stdout)
    assert done["data"]["signal"] == signal.SIGKILL
    assert done["data"]["reason"] == "cancelled"


def test_hard_timeout_extend_and_refusals(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    timed = detach(cli, repo, "--timeout", "6s", *agent_command("--steps", "1", "--sleep", "600"))
    wait_state(cli, timed, "running")
    cli("pause", timed, check=True)  # the hard timer is frozen from here: no race with slow CLI calls
    no_timeout = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "600"))
    wait_state(cli, no_timeout, "running")

    refused = cli("extend", no_timeout, "10")
    assert refused.returncode == 1
    assert "no hard timeout" in refused.stderr
    assert refused.stderr.count("\n") == 1

    # Wait for the rejection of this request, not for "the last event": the agent's own events
    # (file.touched, output) may be recorded after it.
    def extend_rejections() -> list[dict]:
        return [
            e
            for e in events(cli, no_timeout)
            if e["type"] == "control.rejected" and json.loads(e["data"])["request"] == "timeout.extend.requested"
        ]

    rejected = wait_until(extend_rejections, what="the extend request's control.rejected")
    assert isinstance(rejected, list) and len(rejected) == 1, rejected
    assert "no hard timeout" in json.loads(rejected[0]["data"])["reason"]

    before = status(cli, timed)["hard_remaining_s"]
    extended = json.loads(cli("extend", timed, "1", "--json", check=True).stdout)
    assert extended["type"] == "timeout.extended"
    assert status(cli, timed)["hard_remaining_s"] == pytest.approx(before + 1, abs=0.01)
    priority = cli("priority", timed, "3")
    assert priority.returncode == 1
    assert "paused" in priority.stderr

    cli("resume", timed, check=True)
    final = wait_state(cli, timed, "exited")
    assert final["exit_reason"] == "timeout"
    kinds = [e["type"] for e in events(cli, timed)]
    assert kinds.index("timeout.extended") < kinds.index("execution.timed_out") < kinds.index("execution.exited")
    cli("cancel", no_timeout, "--grace", "0", check=True)


def test_queue_runs_by_priority_and_cancels_queued(cli: Cli, repo: Path, tmp_path: Path) -> None:
    (tmp_path / "corral.toml").write_text("[spawner]\nmax_running = 1\n")
    cli.env["CORRAL_CONFIG"] = str(tmp_path / "corral.toml")
    up = start_up(cli)
    try:
        blocker = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "600"))
        wait_state(cli, blocker, "running")
        low = detach(cli, repo, *agent_command("low", "--steps", "1", "--sleep", "0"))
        high = detach(cli, repo, *agent_command("high", "--steps", "1", "--sleep", "0"))
        dropped = detach(cli, repo, *agent_command("dropped", "--steps", "1", "--sleep", "0"))
        for execution_id in (low, high, dropped):
            wait_state(cli, execution_id, "queued")
        assert status(cli, high)["queue_position"] == 2

        moved = cli("priority", high, "5", check=True)
        assert "queue position 1" in moved.stdout
        assert status(cli, high)["queue_position"] == 1
        cancelled = json.loads(cli("cancel", dropped, "--json", check=True).stdout)
        assert cancelled["data"]["reason"] == "cancelled"

        cli("cancel", blocker, "--grace", "1", check=True)
        wait_state(cli, low, "exited")
        order = json.loads(
            cli(
                "sql",
                "SELECT execution_id FROM events WHERE type = 'execution.started' ORDER BY seq",
                "--json",
                check=True,
            ).stdout
        )
        assert [row["execution_id"] for row in order] == [blocker, high, low]
        assert "execution.started" not in [e["type"] for e in events(cli, dropped)]
    finally:
        stop_up(cli, up)


def _step_lines(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/\d+:", text, flags=re.MULTILINE)]


def test_agent_survives_a_killed_spawner_and_nothing_is_lost(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    # 30 s: the kill lands while it runs even when each CLI call takes seconds on a loaded machine
    execution_id = detach(cli, repo, *agent_command("--steps", "100", "--sleep", "0.3", "--heartbeat"))
    wait_state(cli, execution_id, "running")
    agent_pid = status(cli, execution_id)["pid"]
    os.kill(up.pid, signal.SIGKILL)  # the spawner and projector die; NATS (external here) lives
    up.wait()
    time.sleep(1.0)  # the agent keeps writing; the shim spools it
    assert proc_state(agent_pid) not in (None, "Z"), "the agent must outlive its spawner"
    up = start_up(cli)
    try:
        final = wait_state(cli, execution_id, "exited", timeout=120)
        assert final["exit_code"] == 0
        logs = cli("logs", execution_id, check=True).stdout
        assert _step_lines(logs) == list(range(1, 101)), "every output line exactly once, in order"
        kinds = [e["type"] for e in events(cli, execution_id)]
        assert kinds.count("execution.exited") == 1
        assert kinds.count("execution.started") == 1
        assert kinds.count("heartbeat") == 100
    finally:
        stop_up(cli, up)


def test_agent_that_ends_while_no_spawner_watches_is_reconciled(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    # Slow enough that the kill lands while it runs, even on a loaded machine (a CLI poll may take 1 s).
    execution_id = detach(cli, repo, *agent_command("--steps", "3", "--sleep", "2", "--exit", "3"))
    wait_state(cli, execution_id, "running")
    os.kill(up.pid, signal.SIGKILL)
    up.wait()
    run_dir = cli.home / "run" / execution_id
    assert run_dir.is_dir(), "the kill must land while the agent runs"

    def finished() -> bool:
        return b"execution.exited" in (run_dir / "spool.jsonl").read_bytes()

    wait_until(finished, 30, "the agent to finish")
    up = start_up(cli)
    try:
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 3
        assert _step_lines(cli("logs", execution_id, check=True).stdout) == [1, 2, 3]
        wait_until(lambda: not run_dir.exists(), 10, "the run directory to be cleaned up")
    finally:
        stop_up(cli, up)


def test_killed_shim_is_recorded_as_lost(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    execution_id = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "600"))
    running = wait_state(cli, execution_id, "running")
    shims = processes_mentioning(f"actors.shim {cli.home / 'run' / execution_id}")
    assert len(shims) == 1
    os.kill(shims[0], signal.SIGKILL)
    final = wait_state(cli, execution_id, "exited")
    assert final["exit_reason"] == "lost"
    wait_until(lambda: proc_state(running["pid"]) in (None, "Z"), 10, "the orphaned agent to be killed")


def test_whole_up_killed_with_its_embedded_server(embedded_cli: Cli, repo: Path) -> None:
    cli = embedded_cli
    up = start_up(cli)
    store = str(cli.home / "nats")
    try:
        execution_id = detach(cli, repo, *agent_command("--steps", "60", "--sleep", "0.1"))
        wait_state(cli, execution_id, "running")
        os.kill(up.pid, signal.SIGKILL)
        up.wait()
        up = start_up(cli)
        assert (
            len([p for p in processes_mentioning(store) if "nats-server" in Path(f"/proc/{p}/cmdline").read_text()])
            == 1
        )
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        assert _step_lines(cli("logs", execution_id, check=True).stdout) == list(range(1, 61))
    finally:
        stop_up(cli, up)
    wait_until(lambda: not processes_mentioning(store), 15, "no nats-server left for this home")


def test_memory_limit_and_disk_quota(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    hog = "x = b'x' * (1024 * 1024 * 1024); print('allocated')"  # 1 GB, touched
    result = cli("run", "--repo", str(repo), "--memory", "300M", "--", sys.executable, "-c", hog)
    if describe_limits() == PER_PROCESS:  # RLIMIT_AS: the allocation fails in the agent
        assert result.returncode == 1
        assert "MemoryError" in result.stderr
    else:  # its cgroup: the OOM killer ends it, and the run says why (tests/test_containment_limits.py)
        assert result.returncode == 128 + signal.SIGKILL, result.stderr
        assert "memory limit" in result.stderr
    writer = (  # the kernel refuses the write past the quota (actors/diskquota.py): the agent goes on
        "import time\ntry:\n    open('big.bin', 'wb').write(b'x' * 4_000_000)\nexcept OSError as exc:\n"
        "    print(exc, flush=True)\nprint('written', flush=True)\ntime.sleep(600)\n"
    )
    execution_id = detach(cli, repo, "--disk", "1M", "--", sys.executable, "-c", writer)
    paused = wait_state(cli, execution_id, "paused", timeout=30)
    assert paused["state"] == "paused"
    exceeded = [json.loads(e["data"]) for e in events(cli, execution_id) if e["type"] == "limit.exceeded"]
    assert exceeded[0]["limit"] == "disk"
    assert exceeded[0]["value"] > exceeded[0]["maximum"] == 1024 * 1024
    cli("cancel", execution_id, "--grace", "0", check=True)


def test_stalled_agent_is_detected_and_cancelled(cli: Cli, repo: Path, up: subprocess.Popen[str]) -> None:
    quiet = detach(cli, repo, "--idle-timeout", "1", "--on-stall", "cancel", *agent_command("--sleep", "600"))
    beating = detach(
        cli,
        repo,
        "--idle-timeout",
        "3",
        "--on-stall",
        "cancel",
        "--",
        sys.executable,
        "-m",
        "corral.wrap",
        "--interval",
        "0.3",
        "--",
        sys.executable,
        "-c",
        "import time\nend = time.time() + 6\nwhile time.time() < end: pass\nprint('worked')",
    )
    final = wait_state(cli, quiet, "exited")
    assert final["exit_reason"] == "cancelled"
    kinds = [e["type"] for e in events(cli, quiet)]
    assert kinds.index("execution.stalled") < kinds.index("execution.timed_out") < kinds.index("execution.exited")
    stalled = next(json.loads(e["data"]) for e in events(cli, quiet) if e["type"] == "execution.stalled")
    assert stalled["reaction"] == "cancel"
    assert stalled["idle_s"] >= 1
    # A busy tool under `corral wrap` heartbeats for 6 s with no output (idle limit 3 s): never idle.
    done = wait_state(cli, beating, "exited")
    assert done["exit_code"] == 0
    beating_kinds = [e["type"] for e in events(cli, beating)]
    assert "execution.stalled" not in beating_kinds
    assert beating_kinds.count("heartbeat") >= 3


def test_run_with_a_template_and_flags_overriding_it(cli: Cli, repo: Path, tmp_path: Path) -> None:
    agent = json.dumps(str(Path(__file__).parents[1] / "examples" / "agent.py"))
    (tmp_path / "corral.toml").write_text(
        "[defaults]\n"
        'idle_timeout = "10m"\n'
        "[templates.quick]\n"
        f"command = [{json.dumps(sys.executable)}, {agent}]\n"
        'args = ["--steps", "2", "--sleep", "0"]\n'
        'timeout = "5m"\n'
        "priority = 3\n"
    )
    cli.env["CORRAL_CONFIG"] = str(tmp_path / "corral.toml")
    result = cli("run", "--repo", str(repo), "--template", "quick", "--timeout", "90s", "-q")
    assert result.returncode == 0, result.stderr
    assert "agent: done, 2 files written" in result.stdout
    row = json.loads(
        cli("sql", "SELECT template, priority, timeout_s, idle_timeout_s FROM executions", "--json", check=True).stdout
    )
    assert row == [{"template": "quick", "priority": 3, "timeout_s": 90.0, "idle_timeout_s": 600.0}]
    unknown = cli("run", "--repo", str(repo), "--template", "nope")
    assert unknown.returncode == 2
    assert "no template 'nope'" in unknown.stderr
    assert unknown.stderr.count("\n") == 1


def test_health_lists_every_actor_of_the_running_system(cli: Cli, up: subprocess.Popen[str]) -> None:
    report = wait_until(
        lambda: (
            (r := json.loads(cli("health", "--json", check=True).stdout))
            and {a["actor"] for a in r["actors"]} == set(ALL_ACTORS)
            and r
        ),
        30,
        "every actor to report its health",
    )
    assert all(actor["alive"] for actor in report["actors"])  # type: ignore[index]
    assert all(actor["pid"] == up.pid for actor in report["actors"])  # type: ignore[index]
    table = cli("health", check=True).stdout
    assert "watchdog" in table and "ALIVE" in table


def test_up_stops_while_its_nats_server_is_away(cli: Cli, repo: Path, nats_server) -> None:
    """SIGTERM to a `corral up` whose (external) NATS server died: it stops instead of waiting out a
    request timeout per actor and per step (80 s here before: health records, the log's end)."""
    up = start_up(cli)
    nats_server.process.kill()
    nats_server.process.wait()
    time.sleep(2)  # its connections notice and start reconnecting
    up.send_signal(signal.SIGTERM)
    try:
        code = up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()
        raise AssertionError("corral up did not stop within 60 s of SIGTERM with its NATS server away") from None
    assert code == 0
    assert up.stderr is not None and "stopped" in up.stderr.read()
