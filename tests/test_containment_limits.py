"""Limits through cgroups (issue 15, item 3), by attack: hostile agents under a real `corral up`.

- 10 children x 200 MB under `--memory 256M`: the tree together stays under the limit, the OOM
  kill is recorded as `limit.exceeded` (memory) and the exit reason says memory;
- an agent that widens its CPU affinity under `--cpus 1` still gets about one CPU (the group's
  cpuacct.usage over a wall interval);
- a 2,000-process fork bomb under `--pids 64` ends at the limit, is recorded, and leaves nothing;
- a daemon that double-forks, drops its environment and SIGKILLs the shim dies with the
  execution, and the execution's groups are removed;
- a process forking in a tight loop is frozen whole by `corral pause` and goes on after resume.

None of these skip where cgroups are usable (cgroup v1 with memory, cpu, pids and freezer, or a
writable cgroup v2 group); they skip with the reason where neither is.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.limits import PER_PROCESS, describe_limits, group_paths
from tests.conftest import Cli, processes_mentioning
from tests.test_control import detach, events, start_up, status, stop_up, wait_state, wait_until

MB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    describe_limits() == PER_PROCESS,
    reason="no usable cgroups here (neither cgroup v1 memory+cpu+pids+freezer hierarchies nor a "
    "writable cgroup v2 group): the limits are per process",
)


@pytest.fixture
def up(cli: Cli) -> Iterator[subprocess.Popen[str]]:
    process = start_up(cli)
    yield process
    stop_up(cli, process)


def script(tmp_path: Path, name: str, body: str, *args: str) -> list[str]:
    path = tmp_path / name
    path.write_text(body)
    return ["--", sys.executable, str(path), *args]


def data_of(event: dict[str, Any]) -> dict[str, Any]:
    data = event["data"]
    parsed: dict[str, Any] = json.loads(data) if isinstance(data, str) else data
    return parsed


def marked(execution_id: str) -> list[int]:
    """Live processes with the execution's marker in their environment."""
    marker = f"CORRAL_EXECUTION_ID={execution_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    marker in (entry / "environ").read_bytes().split(b"\0")
                    and ") Z " not in (entry / "stat").read_text()
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def groups_left(execution_id: str) -> list[Path]:
    return [path for path in group_paths(f"corral-{execution_id}") if path.exists()]


def group_dir(pid: int, controller: str) -> Path:
    """The directory of a process's group in a v1 hierarchy (or its v2 group, controller "")."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, relative = line.split(":", 2)
        if not controller and not controllers:
            return Path("/sys/fs/cgroup") / relative.lstrip("/")
        if controller and controller in controllers.split(","):
            for mount in Path("/sys/fs/cgroup").iterdir():  # "memory", or a joint one like "cpu,cpuacct"
                if controller in mount.name.split(",") and (mount / relative.lstrip("/")).is_dir():
                    return mount / relative.lstrip("/")
    raise AssertionError(f"process {pid} has no {controller or 'v2'} group")


def v1() -> bool:
    return describe_limits().startswith("cgroup v1")


def frozen(pid: int) -> bool:
    if v1():
        return (group_dir(pid, "freezer") / "freezer.state").read_text().strip() == "FROZEN"
    return "frozen 1" in (group_dir(pid, "") / "cgroup.events").read_text()


def pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split among their users, so a sum is real use)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def assert_nothing_left(execution_id: str) -> None:
    wait_until(lambda: not marked(execution_id), 15, f"every process of {execution_id} to be gone")
    wait_until(lambda: not groups_left(execution_id), 15, f"the groups of {execution_id} to be removed")


MEMORY_HOG = """
import os, sys, time
kids = []
for i in range(10):
    pid = os.fork()
    if pid == 0:
        held = b"x" * (200 * 1024 * 1024)  # touched: resident, not just reserved
        print(f"child {i} holds {len(held) >> 20} MB", flush=True)
        time.sleep(6)
        os._exit(0)
    kids.append(pid)
killed = sum(os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in kids)
print(f"{killed} children killed", flush=True)
sys.exit(1 if killed else 0)
"""


def test_memory_limit_covers_the_whole_tree(cli: Cli, repo: Path, tmp_path: Path, up: object) -> None:
    limit = 256 * MB
    execution_id = detach(cli, repo, "--memory", "256M", *script(tmp_path, "hog.py", MEMORY_HOG))
    peak = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = marked(execution_id)
        peak = max(peak, sum(pss(pid) for pid in pids))
        if not pids and status(cli, execution_id)["state"] in ("exited", "failed"):
            break
        time.sleep(0.05)
    final = wait_state(cli, execution_id, "exited")
    # 10 x 200 MB would be 2 GB; the group never held more than its limit (PSS: shared pages once;
    # a little room for the interpreter's file pages, which another group may be charged for)
    assert 0 < peak < limit + 32 * MB, f"{peak >> 20} MB resident at the peak"
    exceeded = [data_of(e) for e in events(cli, execution_id) if e["type"] == "limit.exceeded"]
    assert exceeded and exceeded[0]["limit"] == "memory", exceeded
    assert exceeded[0]["maximum"] == limit and exceeded[0]["value"] <= limit
    assert final["exit_reason"] == "memory_limit", final
    assert final["exit_code"] == 1  # the agent saw its children killed
    assert "children killed" in cli("logs", execution_id, check=True).stdout
    assert final["limits"] == describe_limits()
    assert_nothing_left(execution_id)


LIVE_LIMITS = """
import os, time
print("started", flush=True)  # its only output: nothing it writes later wakes the shim
time.sleep(1.5)
child = os.fork()
if child == 0:
    held = b"x" * (300 * 1024 * 1024)  # past --memory: the OOM killer ends this child
    os._exit(0)
os.waitpid(child, 0)
refused = 0
for _ in range(40):  # past --pids: the forks fail, the agent lives on
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except BlockingIOError:
        refused += 1
time.sleep(600)
"""


def test_limits_are_recorded_while_the_agent_runs(cli: Cli, repo: Path, tmp_path: Path, up: object) -> None:
    """The OOM kill of a child and the refused forks are recorded while the agent lives on, silent
    (the shim reads the group's counters while it runs), not only at its exit."""
    execution_id = detach(cli, repo, "--memory", "128M", "--pids", "16", *script(tmp_path, "limits.py", LIVE_LIMITS))

    def recorded() -> set[str]:
        return {data_of(e)["limit"] for e in events(cli, execution_id) if e["type"] == "limit.exceeded"}

    try:
        wait_until(lambda: recorded() == {"memory", "pids"}, 90, "both limits to be recorded while it runs")
    except AssertionError as exc:
        kinds = [(e["type"], e["data"]) for e in events(cli, execution_id) if e["type"] not in ("heartbeat",)]
        raise AssertionError(f"{exc}: {kinds}") from None
    assert status(cli, execution_id)["state"] == "running"
    cli("cancel", execution_id, "--grace", "0", check=True)
    wait_state(cli, execution_id, "exited")
    assert_nothing_left(execution_id)


CPU_SPINNER = """
import os, time
every = set(range(os.cpu_count() or 1))
os.sched_setaffinity(0, every)  # undo any narrowing: only a quota can hold this back
for _ in range(max(2, len(every))):
    if os.fork() == 0:
        os.sched_setaffinity(0, every)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pass
        os._exit(0)
print("spinning on", len(os.sched_getaffinity(0)), "cpus", flush=True)
os.wait()
"""


def test_cpu_quota_holds_against_sched_setaffinity(cli: Cli, repo: Path, tmp_path: Path, up: object) -> None:
    execution_id = detach(cli, repo, "--cpus", "1", *script(tmp_path, "spin.py", CPU_SPINNER))
    running = wait_state(cli, execution_id, "running")
    wait_until(lambda: "spinning on" in cli("logs", execution_id).stdout, 60, "the spinners to start")
    assert f"spinning on {os.cpu_count()} cpus" in cli("logs", execution_id).stdout  # affinity was not narrowed
    cpuacct = group_dir(running["pid"], "cpuacct") if v1() else group_dir(running["pid"], "")

    def usage_ns() -> int:
        if v1():
            return int((cpuacct / "cpuacct.usage").read_text())
        stat = dict(line.split() for line in (cpuacct / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) * 1000

    before, started = usage_ns(), time.monotonic()
    time.sleep(3)
    used, wall = usage_ns() - before, time.monotonic() - started
    cpus = used / 1e9 / wall
    assert 0 < cpus < 1.5, f"the group used {cpus:.2f} CPUs under --cpus 1"
    if v1():
        assert (group_dir(running["pid"], "cpu") / "cpu.cfs_quota_us").read_text().strip() == "100000"
    cli("cancel", execution_id, "--grace", "0", check=True)
    wait_state(cli, execution_id, "exited")
    assert_nothing_left(execution_id)


FORK_BOMB = """
import os, sys, time
forked = refused = 0
for _ in range(2000):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        break
    if pid == 0:
        try:
            if os.fork() == 0:  # every child forks again: the bomb doubles
                time.sleep(600)
                os._exit(0)
        except BlockingIOError:
            pass
        time.sleep(600)
        os._exit(0)
    forked += 1
print(f"forked {forked}, refused {refused}", flush=True)
sys.exit(3)
"""


def test_fork_bomb_ends_at_the_pids_limit(cli: Cli, repo: Path, tmp_path: Path, up: object) -> None:
    execution_id = detach(cli, repo, "--pids", "64", *script(tmp_path, "bomb.py", FORK_BOMB))
    final = wait_state(cli, execution_id, "exited", timeout=120)
    assert final["exit_code"] == 3, final
    text = cli("logs", execution_id, check=True).stdout
    forked = int(text.split("forked ")[1].split(",")[0])
    assert forked < 64 and "refused 1" in text, text
    exceeded = [data_of(e) for e in events(cli, execution_id) if e["type"] == "limit.exceeded"]
    assert [e["limit"] for e in exceeded] == ["pids"] and exceeded[0]["maximum"] == 64, exceeded
    assert_nothing_left(execution_id)  # the sleeping children died with the execution


DAEMON = """
import os, signal, sys, time
marker = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: no parent, its own session, no environment (no marker)
        os.execve(sys.executable, [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)", marker], {})
    os._exit(0)
time.sleep(1)
print("daemon started", flush=True)
try:
    os.kill(os.getppid(), signal.SIGKILL)  # the shim (in a sandbox's pid namespace: its init, which ignores it)
except OSError:
    pass
time.sleep(600)
"""


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_daemon_that_kills_the_shim_dies_with_the_execution(
    sandbox: str, cli: Cli, repo: Path, tmp_path: Path, up: object
) -> None:
    """Unsandboxed, the agent kills its shim itself and only the cgroup finds the daemon; in the
    sandbox (its own pid namespace) it cannot see the shim, so the test kills it for it."""
    marker = f"corral-daemon-{uuid.uuid4().hex}"
    execution_id = detach(cli, repo, "--sandbox", sandbox, *script(tmp_path, "daemon.py", DAEMON, marker))
    daemon_line = f"time.sleep(1) {marker}"  # its command line (the agent's names the marker too)
    wait_until(lambda: processes_mentioning(daemon_line), 60, "the daemon to start")
    daemon = processes_mentioning(daemon_line)
    assert b"CORRAL_EXECUTION_ID" not in Path(f"/proc/{daemon[0]}/environ").read_bytes()
    shim = f"actors.shim {cli.home / 'run' / execution_id}"
    with contextlib.suppress(AssertionError):  # (it goes for it a second after the daemon started)
        wait_until(lambda: not processes_mentioning(shim), 10, "the agent to kill its shim")
    for pid in processes_mentioning(shim):  # inside a sandbox it cannot see its shim: do it for it
        os.kill(pid, signal.SIGKILL)
    final = wait_state(cli, execution_id, "exited", "failed", timeout=60)
    assert final["state"] == "exited" and final["exit_reason"] == "lost", final
    wait_until(lambda: not processes_mentioning(daemon_line), 15, "the daemon to be killed")
    assert_nothing_left(execution_id)


FORKER = """
import os, sys, time
path = sys.argv[1]
count = 0
while True:
    if os.fork() == 0:
        time.sleep(0.3)
        os._exit(0)
    count += 1
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    if count % 10 == 0:
        with open(path + ".tmp", "w") as f:
            f.write(str(count))
        os.replace(path + ".tmp", path)
"""


def test_pause_freezes_a_forking_tree_whole(cli: Cli, repo: Path, tmp_path: Path, up: object) -> None:
    execution_id = detach(cli, repo, "--cpus", "0.5", *script(tmp_path, "forker.py", FORKER, "forks"))
    running = wait_state(cli, execution_id, "running")
    counter = Path(running["worktree"]) / "forks"  # (a sandboxed agent writes only its worktree)
    assert running["limits"] == describe_limits()

    def forks() -> int:
        try:
            return int(counter.read_text())
        except (OSError, ValueError):
            return 0

    wait_until(lambda: forks() >= 50, 60, "the agent to fork")
    paused = json.loads(cli("pause", execution_id, "--json", check=True).stdout)
    pids = paused["data"]["pids"]
    assert running["pid"] in pids and len(pids) > 1
    assert frozen(running["pid"])
    members = sorted(int(p) for p in marked(execution_id))
    count = forks()
    time.sleep(1.5)  # children sleep 0.3 s: unfrozen, they would have ended and been replaced
    assert forks() == count, "the agent forked while paused"
    assert sorted(int(p) for p in marked(execution_id)) == members == sorted(pids)
    assert status(cli, execution_id)["state"] == "paused"

    cli("resume", execution_id, check=True)
    assert not frozen(running["pid"])
    wait_until(lambda: forks() > count, 30, "the agent to fork again after resume")
    cancelled = json.loads(cli("cancel", execution_id, "--grace", "0", "--json", check=True).stdout)
    assert cancelled["data"]["reason"] == "cancelled"
    assert_nothing_left(execution_id)


IN_GROUPS = """
import sys, time
print("self", open("/proc/self/cgroup").read().replace("\\n", " "), flush=True)
if sys.argv[1] == "auto":  # the sandbox's own first process (its pid 1), which forked this one
    print("init", open("/proc/1/cgroup").read().replace("\\n", " "), flush=True)
print("ready", flush=True)
time.sleep(600)
"""


def in_execution_groups(cgroup_lines: str, execution_id: str) -> bool:
    """Whether /proc/PID/cgroup text puts a process in the execution's group in every hierarchy it needs."""
    wanted = {"memory", "cpu", "pids", "freezer"} if v1() else {""}
    found = set()
    for line in cgroup_lines.split():
        _, controllers, relative = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            if controller in wanted and relative.rstrip("/").endswith(f"/corral-{execution_id}"):
                found.add(controller)
    return found == wanted


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_every_process_of_the_agent_is_in_its_groups_from_its_start(
    sandbox: str, cli: Cli, repo: Path, tmp_path: Path, up: object
) -> None:
    """The agent's process runs its first line already in the execution's groups, and so do the
    sandbox's processes around it (bwrap's monitor outside, its init inside): the `sh` that starts
    them joins first (its one thread, through the v1 `tasks` files: actors/limits.py `join_files`)."""
    execution_id = detach(cli, repo, "--sandbox", sandbox, *script(tmp_path, "groups.py", IN_GROUPS, sandbox))
    running = wait_state(cli, execution_id, "running")
    text = str(wait_until(lambda: (t := cli("logs", execution_id).stdout) and "ready" in t and t, 60, "its groups"))
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in text.splitlines() if " " in line}
    assert in_execution_groups(lines["self"], execution_id), text
    if sandbox == "auto":
        assert in_execution_groups(lines["init"], execution_id), text
    members = [running["pid"], *marked(execution_id)]  # bwrap's monitor (or the agent) and the rest
    assert len(members) > 1
    for pid in members:
        assert in_execution_groups(Path(f"/proc/{pid}/cgroup").read_text(), execution_id), pid
    cli("cancel", execution_id, "--grace", "0", check=True)
    wait_state(cli, execution_id, "exited", "cancelled")
    assert_nothing_left(execution_id)
