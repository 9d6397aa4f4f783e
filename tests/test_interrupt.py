"""Ctrl-C at a terminal: one line, a clean exit, nothing else hit (issue: operator item 6).

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, so these tests start the
CLI in a process group of its own and signal the group, as a terminal does.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, Cli, agent_command, processes_mentioning


def _start(cli: Cli, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "corral", *args],
        env=cli.env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group: the signal below reaches it and its children only
    )


def _loading(pid: int) -> bool:
    """The CLI's imports have begun: pydantic's compiled core is mapped (the CLI imports it first thing)."""
    try:
        return "_pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _ctrl_c(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGINT)


def test_ctrl_c_while_the_command_loads(embedded_cli: Cli) -> None:
    """A Ctrl-C before the CLI has finished importing its modules used to print an import traceback."""
    process = _start(embedded_cli, "ps")
    deadline = time.monotonic() + 30
    while not _loading(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    _ctrl_c(process)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err
    if process.returncode != 0:  # not already done when the signal came
        assert process.returncode == 130, err
        assert err.strip().splitlines() == ["corral: interrupted"], err


def test_ctrl_c_on_an_attached_run_with_its_own_system(embedded_cli: Cli, repo: Path) -> None:
    """With no `corral up`, `corral run` runs the system itself: Ctrl-C stops the agent and records
    its exit. The embedded nats-server and the projector's worker are not in the terminal's process
    group, so they are not hit by the same Ctrl-C (the server used to die and be restarted, and
    the exit was never recorded)."""
    long_agent = agent_command("long", "--steps", "600", "--sleep", "0.1")
    process = _start(embedded_cli, "run", "--repo", str(repo), *long_agent)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "started pid" in line:
            break
    else:
        raise AssertionError(f"the agent never started: {''.join(seen)}")
    _ctrl_c(process)
    _, rest = process.communicate(timeout=90)
    err = "".join(seen) + rest
    assert "Traceback" not in err, err
    assert "interrupted; stopping the agent" in err, err
    assert "restarting it" not in err, err  # the embedded server was not hit
    assert "without a recorded exit" not in err, err
    assert "(stopped with its spawner)" in err, err
    assert process.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), err
    assert processes_mentioning(str(embedded_cli.home)) == []  # no server, worker or agent left


def test_ctrl_c_on_an_attached_run_detaches_from_a_running_system(cli: Cli, repo: Path) -> None:
    up = cli.popen("up", "--no-http")
    try:
        runtime = cli.home / "runtime.json"
        deadline = time.monotonic() + 60
        while not (runtime.exists() and json.loads(runtime.read_text() or "{}").get("ready")):
            assert up.poll() is None and time.monotonic() < deadline, "corral up did not get ready"
            time.sleep(0.05)
        run = _start(cli, "run", "--repo", str(repo), *agent_command("long", "--steps", "600", "--sleep", "0.1"))
        assert run.stderr is not None
        for line in run.stderr:
            if "started pid" in line:
                break
        _ctrl_c(run)
        _, rest = run.communicate(timeout=60)
        assert "Traceback" not in rest, rest
        assert run.returncode == 130, rest
        lines = rest.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("corral: detached from "), rest
        execution_id = lines[0].split()[3].rstrip(";")
        status = cli("status", execution_id, check=True).stdout
        assert "running" in status  # it keeps running: only the terminal was detached
        cli("cancel", execution_id, check=True)
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)
