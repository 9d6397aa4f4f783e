"""A crashed `corral up` is always replaceable by a new one (issue 19, item 0b).

Real `corral up` processes with their embedded nats-server, real agents, real SIGKILL.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cli, agent_command
from tests.test_control import detach, start_up, status, stop_up, wait_state, wait_until


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _delivered(cli: Cli, execution_id: str, text: str) -> bool:
    rows = json.loads(
        cli(
            "sql",
            f"SELECT data->>'text' AS text FROM events WHERE execution_id = '{execution_id}' "
            "AND type = 'input.delivered'",
            "--json",
            check=True,
        ).stdout
    )
    return any(row["text"] == text for row in rows)


def _hold_lock(cli: Cli, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the home's system lock for `seconds` (read "held" from it first)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))",
            str(cli.home / "system.lock"),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkilled_up_is_replaced_every_time(embedded_cli: Cli, repo: Path) -> None:
    """Five rounds: an agent gets input, is paused and resumed, `corral up` is SIGKILLed, a new
    `corral up` starts in the same home, adopts the agent and delivers input to it."""
    cli = embedded_cli
    up = start_up(cli)
    execution_id = detach(cli, repo, *agent_command("--steps", "1", "--sleep", "0", "--read-input"))
    try:
        wait_state(cli, execution_id, "running")
        for round_ in range(5):
            runtime = json.loads((cli.home / "runtime.json").read_text())
            server_pid = runtime["server_pid"]
            cli("input", execution_id, f"before {round_}", check=True)
            cli("pause", execution_id, check=True)
            cli("resume", execution_id, check=True)

            os.kill(up.pid, signal.SIGKILL)
            up.wait()
            # the embedded server is bound to die with its parent
            wait_until(lambda pid=server_pid: not _alive(pid), 15, f"round {round_}: nats-server {server_pid} to end")

            up = start_up(cli)  # fails at once if the dead system is taken for a live one
            assert json.loads((cli.home / "runtime.json").read_text())["pid"] == up.pid
            assert status(cli, execution_id)["state"] == "running", f"round {round_}"
            # the actors run: input reaches the adopted agent
            cli("input", execution_id, f"after {round_}", check=True)
            wait_until(lambda r=round_: _delivered(cli, execution_id, f"after {r}\n"), 30, f"input of round {round_}")
    finally:
        cli("cancel", execution_id, "--grace", "0")
        stop_up(cli, up)


def test_a_dead_systems_address_is_never_joined(embedded_cli: Cli, tmp_path: Path) -> None:
    """runtime.json left by a dead `corral up` while another process holds the lock for a moment
    (a dying process's last threads, or a system still starting): commands wait for the lock
    instead of joining the dead address or refusing to start."""
    cli = embedded_cli
    cli.home.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cli.home / "runtime.json").write_text(
        json.dumps({"url": "nats://127.0.0.1:9", "pid": dead.pid, "mode": "up", "ready": True})
    )
    holder = _hold_lock(cli, 2)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    up = start_up(cli)
    try:
        assert holder.poll() is not None, "the new system started while the lock was held"
        assert cli("ps", "--json", check=True).stdout.strip() == "[]"
    finally:
        stop_up(cli, up)
        holder.wait()


def test_a_lock_holder_that_never_publishes_is_named(embedded_cli: Cli) -> None:
    cli = embedded_cli
    cli.home.mkdir(parents=True, exist_ok=True)
    holder = _hold_lock(cli, 60)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = cli("ps", timeout=60)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"locked by pid {holder.pid}" in lines[0] and "kill PID" in lines[0]
    finally:
        holder.kill()
        holder.wait()
