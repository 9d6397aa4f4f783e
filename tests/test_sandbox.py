"""The sandbox of every execution (actors/sandbox.py, docs/sandbox.md), tested by attack.

Hostile agents under `corral run` try to write outside their worktree (`../`, absolute paths, a
symlinked directory), into git's own files (the worktree gitdir, the main repository's hooks and
config), to read Corral's credentials, to run a denied binary, to reach a loopback port without
a network, and to talk to their shim's control socket. Each attempt must fail inside the sandbox
(the agent reports the error) and leave nothing on the host; what an agent may do (commit on its
branch, write its worktree) still works.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors import sandbox
from tests.conftest import Cli, git, processes_mentioning

pytestmark = pytest.mark.skipif(
    sandbox.probe() is not None, reason=f"bubblewrap cannot make a sandbox here: {sandbox.probe()}"
)


def agent(tmp_path: Path, name: str, body: str) -> list[str]:
    """A python agent from a file of the test's directory: `-- python FILE`."""
    path = tmp_path / name
    path.write_text(body)
    return ["--", sys.executable, str(path)]


def reports(stdout: str) -> dict[str, dict[str, Any]]:
    """The agent's JSON lines, by attack."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            out[record["attack"]] = record
    return out


def started(cli: Cli, execution_id: str) -> dict[str, Any]:
    rows = json.loads(
        cli(
            "sql",
            f"SELECT data FROM events WHERE execution_id = '{execution_id}' AND type = 'execution.started'",
            "--json",
            check=True,
        ).stdout
    )
    data: dict[str, Any] = json.loads(rows[0]["data"]) if isinstance(rows[0]["data"], str) else rows[0]["data"]
    return data


def last_execution(cli: Cli) -> dict[str, Any]:
    runs: list[dict[str, Any]] = json.loads(cli("ps", "--all", "--json", check=True).stdout)
    return runs[0]


ATTACKS = r"""
import json, os, socket, subprocess, sys
from pathlib import Path

def attempt(name, action):
    try:
        result = action()
        print(json.dumps({"attack": name, "ok": True, "result": result}), flush=True)
    except Exception as exc:
        print(json.dumps({"attack": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)

def write(path, text="escaped\n", mode="w"):
    with open(path, mode) as f:
        f.write(text)

def run(*args):
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()

outside, host_tmp_name = sys.argv[1], sys.argv[2]
gitdir = Path(run("git", "rev-parse", "--absolute-git-dir"))
common = Path(run("git", "rev-parse", "--path-format=absolute", "--git-common-dir"))

attempt("parent", lambda: write("../escaped.txt"))
attempt("absolute", lambda: write(os.path.join(outside, "absolute.txt")))
attempt("host_tmp", lambda: write("/tmp/" + host_tmp_name))
attempt("home", lambda: write(os.path.expanduser("~/corral-escaped-" + host_tmp_name)))
os.symlink(outside, "outside-link")
attempt("symlink", lambda: write("outside-link/through-link.txt"))
os.symlink(os.path.expanduser("~"), "home-link")
attempt("symlink_home", lambda: write("home-link/corral-escaped-link-" + host_tmp_name))
attempt("gitdir_config", lambda: write(gitdir / "config.worktree", "[core]\n\tfsmonitor = touch /tmp/pwned\n", "a"))
attempt("gitdir_commondir", lambda: write(gitdir / "commondir", "/tmp\n"))
attempt("worktree_git_link", lambda: write(".git", "gitdir: /tmp\n"))
attempt("hooks", lambda: write(common / "hooks" / "post-checkout", "#!/bin/sh\ntouch /tmp/pwned\n"))
attempt("repo_config", lambda: write(common / "config", "[core]\n\thooksPath = /tmp\n", "a"))
attempt("git_config", lambda: run("git", "config", "core.hooksPath", "/tmp"))
attempt("other_branch_file", lambda: write(common / "refs" / "heads" / "corral" / "other", "0" * 40 + "\n"))
attempt("other_branch_ref", lambda: run("git", "update-ref", "refs/heads/corral/other2", "HEAD"))
attempt("main_branch", lambda: run("git", "update-ref", "refs/heads/main", "HEAD"))
attempt("credentials", lambda: Path(os.environ["CORRAL_HOME"], "credentials.json").read_text()[:20])
attempt("corral_home", lambda: sorted(os.listdir(os.environ["CORRAL_HOME"])))
attempt("su", lambda: run("su", "-c", "true"))
attempt("denied_tool", lambda: run("mytool"))
write("made-by-agent.txt", "inside\n")
commit = "git add made-by-agent.txt && git commit -q -m 'agent commit' && git log -1 --format=%s"
attempt("commit", lambda: run("sh", "-c", commit))
"""


def test_a_hostile_agent_writes_only_its_worktree_and_commits_only_its_branch(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "mytool").write_text("#!/bin/sh\necho ran\n")
    (tools / "mytool").chmod(0o755)
    policy = tmp_path / "policy.toml"
    policy.write_text('shell_deny = ["mytool", "su *"]\n')
    host_tmp_name = f"corral-escape-{uuid.uuid4().hex}"
    hooks_before = sorted(p.name for p in (repo / ".git" / "hooks").iterdir())
    git(repo, "branch", "corral/other")  # another execution's branch
    git(repo, "branch", "corral/other2")
    branches_before = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    config_before = (repo / ".git" / "config").read_text()
    done = cli(
        "run",
        "--repo",
        str(repo),
        "--policy",
        str(policy),
        "--env",
        f"PATH={tools}{os.pathsep}{cli.env['PATH']}",
        *agent(tmp_path, "attacks.py", ATTACKS),
        str(outside),
        host_tmp_name,
    )
    assert done.returncode == 0, done.stderr
    seen = reports(done.stdout)
    execution = last_execution(cli)
    worktree = Path(execution["worktree"])
    execution_id = execution["execution_id"]
    home = Path.home()
    try:
        # writes outside the worktree: refused inside, absent outside
        assert not seen["parent"]["ok"] and "Read-only file system" in seen["parent"]["error"]
        assert not (worktree.parent / "escaped.txt").exists()
        assert not (outside / "absolute.txt").exists()
        assert not Path("/tmp", host_tmp_name).exists()  # it wrote its private /tmp, gone with it
        assert not seen["home"]["ok"] and "Read-only file system" in seen["home"]["error"]
        assert not (home / f"corral-escaped-{host_tmp_name}").exists()
        assert not seen["symlink"]["ok"] and not (outside / "through-link.txt").exists()
        assert not seen["symlink_home"]["ok"] and "Read-only file system" in seen["symlink_home"]["error"]
        assert not (home / f"corral-escaped-link-{host_tmp_name}").exists()
        # git's own files: the worktree gitdir, its link, the repository's hooks and config
        for attack in ("gitdir_config", "gitdir_commondir", "worktree_git_link", "hooks", "repo_config"):
            assert not seen[attack]["ok"], seen[attack]
            assert "Read-only file system" in seen[attack]["error"], seen[attack]
        gitdir = repo / ".git" / "worktrees" / execution_id
        assert (gitdir / "config.worktree").read_text() == ""
        assert (gitdir / "commondir").read_text().strip() == "../.."
        assert (worktree / ".git").read_text().startswith("gitdir: ")
        assert sorted(p.name for p in (repo / ".git" / "hooks").iterdir()) == hooks_before
        assert (repo / ".git" / "config").read_text() == config_before
        assert not seen["git_config"]["ok"] and "Read-only file system" in seen["git_config"]["error"]
        # other branches: another execution's (written in its private refs directory: lost) and main
        assert not seen["main_branch"]["ok"] and "Read-only file system" in seen["main_branch"]["error"]
        after = git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
        assert [line for line in after if f"corral/{execution_id}" not in line] == branches_before.splitlines()
        # Corral's home: not there at all
        assert (cli.home / "credentials.json").is_file()  # there, outside
        assert not seen["credentials"]["ok"] and "FileNotFoundError" in seen["credentials"]["error"]
        assert seen["corral_home"]["ok"] and seen["corral_home"]["result"] == ["worktrees"]  # its own, only
        # denied binaries: the default deny list's `su *`, and a program of the run's policy on its PATH
        assert not seen["su"]["ok"] and "Permission denied" in seen["su"]["error"]
        assert not seen["denied_tool"]["ok"] and "Permission denied" in seen["denied_tool"]["error"]
        # what it may do: write its worktree and commit on its own branch
        assert seen["commit"] == {"attack": "commit", "ok": True, "result": "agent commit"}
        assert git(repo, "log", "-1", "--format=%s", f"corral/{execution_id}") == "agent commit"
        assert (worktree / "made-by-agent.txt").read_text() == "inside\n"
        assert started(cli, execution_id)["sandbox"] == {"mode": "bwrap", "network": "open"}
    finally:
        for leftover in (home / f"corral-escaped-{host_tmp_name}", home / f"corral-escaped-link-{host_tmp_name}"):
            leftover.unlink(missing_ok=True)


def test_the_mytool_of_that_test_does_run_without_a_deny_entry(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """The control of the denied-binary attack: the same program, not denied, runs in the sandbox."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "mytool").write_text("#!/bin/sh\necho mytool ran\n")
    (tools / "mytool").chmod(0o755)
    path = f"{tools}{os.pathsep}{cli.env['PATH']}"
    done = cli("run", "--repo", str(repo), "--env", f"PATH={path}", "--", "sh", "-c", "mytool")
    assert done.returncode == 0, done.stderr
    assert "mytool ran" in done.stdout


LISTENER_AGENT = r"""
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("connected", flush=True)
except OSError as exc:
    print(f"refused: {exc}", flush=True)
    sys.exit(1)
"""


@pytest.mark.parametrize("network", ["none", "open"])
def test_network_none_reaches_no_loopback_port_and_open_does(
    network: str, cli: Cli, repo: Path, tmp_path: Path
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed: nothing connected
            accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        done = cli(
            "run", "--repo", str(repo), "--network", network, *agent(tmp_path, "connect.py", LISTENER_AGENT), str(port)
        )
    finally:
        listener.close()
        thread.join(5)
    execution_id = last_execution(cli)["execution_id"]
    assert started(cli, execution_id)["sandbox"] == {"mode": "bwrap", "network": network}
    if network == "none":
        assert done.returncode == 1, done.stderr
        assert "refused:" in done.stdout and "connected" not in done.stdout
        assert not accepted
    else:
        assert done.returncode == 0, done.stderr
        assert "connected" in done.stdout
        assert len(accepted) == 1
    for conn in accepted:
        conn.close()
    status = json.loads(cli("status", execution_id, "--json", check=True).stdout)
    assert status["sandbox"] == {"mode": "bwrap", "network": network}


SHIM_AGENT = r"""
import hashlib, json, os, socket
names = [line.split()[-1] for line in open("/proc/net/unix") if "@corral-shim-" in line]
# its own shim (the address is derived from the run directory; see actors/shim.py socket_address)
run_dir = os.path.join(os.environ["CORRAL_HOME"], "run", os.environ["CORRAL_EXECUTION_ID"])
own = "@corral-shim-" + hashlib.sha1(run_dir.encode()).hexdigest()[:24]
print(json.dumps({"shims": len(names), "own_listed": own in names}), flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + own[1:])
try:
    s.sendall(b'{"op":"cancel","grace_s":0}\n')
except BrokenPipeError:
    pass  # answered and closed before reading a byte
print(json.dumps({"reply": s.makefile().readline().strip()}), flush=True)
print("still running", flush=True)
"""


def test_an_agent_cannot_command_a_shim_through_its_socket(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """With the host's network, a shim's abstract socket is reachable (/proc/net/unix names it): the
    shim answers no one inside a sandbox, so the agent cannot cancel itself or any other execution."""
    done = cli("run", "--repo", str(repo), *agent(tmp_path, "shim.py", SHIM_AGENT))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["shims"] >= 1 and lines[0]["own_listed"]
    replies = [json.loads(line["reply"]) for line in lines[1:]]
    assert replies and all(not r["ok"] and "inside a sandbox" in r["error"] for r in replies), replies
    assert "still running" in done.stdout
    assert last_execution(cli)["exit_reason"] == "exited"


def write_config(cli: Cli, tmp_path: Path, text: str) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(text)
    cli.env["CORRAL_CONFIG"] = str(config)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_no_sandbox_possible_refuses_the_run_in_one_line(mode: str, cli: Cli, repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such" / "bwrap"
    write_config(cli, tmp_path, f'[sandbox]\nmode = "{mode}"\nbwrap = "{missing}"\n')
    marker = tmp_path / "ran.txt"
    done = cli("run", "--repo", str(repo), "--", "sh", "-c", f"touch {marker}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if str(missing) in line]
    assert len(errors) == 1, done.stderr
    assert "not found" in errors[0] and "apt-get install bubblewrap" in errors[0] and 'mode = "off"' in errors[0]
    assert not marker.exists()
    execution = last_execution(cli)
    assert execution["state"] == "failed"
    rows = json.loads(
        cli(
            "sql",
            f"SELECT data FROM events WHERE execution_id = '{execution['execution_id']}' AND type = 'execution.failed'",
            "--json",
            check=True,
        ).stdout
    )
    failed = json.loads(rows[0]["data"]) if isinstance(rows[0]["data"], str) else rows[0]["data"]
    assert failed["stage"] == "spawn" and str(missing) in failed["error"]
    assert not (cli.home / "worktrees" / execution["execution_id"]).exists()  # nothing was made
    assert f"corral/{execution['execution_id']}" not in git(repo, "branch", "--list", "corral/*")


def test_sandbox_off_runs_unconfined(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """Only an explicit off (here: a template of corral.toml, then the flag over a config that says on)."""
    write_config(cli, tmp_path, '[sandbox]\nmode = "on"\n\n[templates.loose]\nsandbox = "off"\n')
    for run, name in ((["--template", "loose"], "template.txt"), (["--sandbox", "off"], "flag.txt")):
        marker = tmp_path / name
        done = cli("run", "--repo", str(repo), *run, "--", "sh", "-c", f"echo out > {marker}")
        assert done.returncode == 0, done.stderr
        assert marker.read_text() == "out\n"
        assert started(cli, last_execution(cli)["execution_id"])["sandbox"] == {"mode": "off"}


def test_an_unknown_network_is_refused_in_one_line(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """(network = "allow" is tested in tests/test_network_allow.py.)"""
    flag = cli("run", "--repo", str(repo), "--network", "closed", "--", "true")
    assert flag.returncode == 2 and flag.stderr.count("\n") == 1, flag.stderr
    assert "unknown network 'closed'" in flag.stderr and "open, none, allow" in flag.stderr
    write_config(cli, tmp_path, '[sandbox]\nnetwork = "closed"\n')
    config = cli("run", "--repo", str(repo), "--", "true")
    assert config.returncode == 2 and config.stderr.count("\n") == 1, config.stderr
    assert "sandbox.network" in config.stderr and "unknown network" in config.stderr
    assert not (cli.home / "worktrees").exists() or not any((cli.home / "worktrees").iterdir())


def test_denied_names_are_the_bare_command_entries_of_the_deny_list() -> None:
    patterns = ["sudo *", "su *", "curl", "mkfs*", "rm -rf /", "git push --force*", "dd if=*", "* | sh", "*>*.git/*"]
    assert sandbox.denied_names(patterns) == ["sudo", "su", "curl", "mkfs*"]


def test_bwrap_argv_in_order_hides_corral_home_after_what_it_rebinds(repo: Path, tmp_path: Path) -> None:
    """The order of the mounts is the protection: /tmp and $CORRAL_HOME are emptied before the
    worktree and git's writable parts are bound back, and the read-only covers come last."""
    home = tmp_path / "home"
    worktree = home / "worktrees" / "x1"
    worktree.parent.mkdir(parents=True)
    git(repo, "worktree", "add", "-q", "-b", "corral/x1", str(worktree))
    sandbox.prepare_worktree(worktree)
    spec = {
        "cwd": str(worktree),
        "command": ["true"],
        "env": {"PATH": "/usr/bin:/bin", "CORRAL_HOME": str(home)},
        "sandbox": {"mode": "bwrap", "network": "none", "bwrap": "bwrap", "hide": [str(home)], "deny": []},
    }
    spec["sandbox"] = sandbox.for_run(spec["sandbox"], tmp_path / "run")
    args = sandbox.sandbox_args(spec)
    pairs = [(args[i], args[i + 1]) for i in range(len(args) - 1) if args[i].startswith("--")]
    index = {pair: n for n, pair in enumerate(pairs)}
    assert index[("--tmpfs", "/tmp")] < index[("--ro-bind", str(repo / ".git"))] < index[("--tmpfs", str(home))]
    assert index[("--tmpfs", str(home))] < index[("--bind", str(worktree))]
    gitdir = repo / ".git" / "worktrees" / "x1"
    assert index[("--bind", str(gitdir))] < index[("--ro-bind", str(gitdir / "config.worktree"))]
    private = tmp_path / "run" / "branch"  # its branch's directory inside: only its own ref
    bound = [args[i + 1 : i + 3] for i in range(len(args) - 2) if args[i] == "--bind"]
    assert [str(private), str(repo / ".git" / "refs" / "heads" / "corral")] in bound
    assert [p.name for p in private.iterdir()] == ["x1"]
    assert (private / "x1").read_text().strip() == git(repo, "rev-parse", "corral/x1")
    assert "--unshare-net" in args and ("--cap-drop", "ALL") in index
    assert args[-2:] == ["--chdir", str(worktree)]
    git(repo, "worktree", "remove", "--force", str(worktree))
    git(repo, "branch", "-D", "corral/x1")


def test_bwrap_reports_a_killed_agent_as_its_signal() -> None:
    spec = {"sandbox": {"mode": "bwrap"}}
    assert sandbox.exit_status(spec, 137) == -9
    assert sandbox.exit_status(spec, 3) == 3
    assert sandbox.exit_status({"sandbox": {"mode": "off"}}, 137) == 137


def test_commits_reach_the_branch_when_the_shim_dies(cli: Cli, repo: Path) -> None:
    """The shim moves the agent's branch when the agent ends; a shim killed first leaves it to the
    spawner, which records the execution lost and moves the branch then."""
    from tests.test_control import detach, start_up, stop_up, wait_state, wait_until

    up = start_up(cli)
    try:
        script = "echo x > f.txt && git add f.txt && git commit -qm 'before the shim died' && echo committed; sleep 600"
        execution_id = detach(cli, repo, "--", "sh", "-c", script)
        wait_until(lambda: "committed" in cli("logs", execution_id).stdout, 60, "the agent's commit")
        assert git(repo, "log", "-1", "--format=%s", f"corral/{execution_id}") != "before the shim died"  # inside only
        run_dir = str(cli.home / "run" / execution_id)
        [shim] = [
            pid for pid in processes_mentioning(run_dir) if b"actors.shim" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        os.kill(shim, signal.SIGKILL)
        final = wait_state(cli, execution_id, "exited", "failed")
        assert final["exit_reason"] == "lost", final
        assert git(repo, "log", "-1", "--format=%s", f"corral/{execution_id}") == "before the shim died"
    finally:
        stop_up(cli, up)


def test_a_host_daemons_control_socket_is_covered(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount does not stop connect(): the Docker socket or the system bus would give
    root on the host. Tried with a socket of the test's own at such a place (in /run, seen inside)."""
    path = f"/run/corral-test-{uuid.uuid4().hex[:12]}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    worktree = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "corral/sock", str(worktree))
    code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); print('connected')"
    spec = {
        "cwd": str(worktree),
        "command": [sys.executable, "-c", code],
        "env": {"PATH": os.environ["PATH"]},
        "sandbox": sandbox.decide("on", "none"),
    }
    try:
        reached = []
        for sockets in ((), (path,)):
            monkeypatch.setattr(sandbox, "CONTROL_SOCKETS", sockets)
            done = subprocess.run(sandbox.wrap(spec, spec["command"]), capture_output=True, text=True, check=False)
            reached.append((done.returncode, done.stdout.strip(), done.stderr.strip().splitlines()[-1:]))
        assert reached[0][:2] == (0, "connected"), reached  # the control: not covered, it connects
        assert reached[1][0] == 1 and reached[1][2] == ["ConnectionRefusedError: [Errno 111] Connection refused"]
    finally:
        server.close()
        os.unlink(path)
        git(repo, "worktree", "remove", "--force", str(worktree))


def test_signals_for_the_agent_do_not_end_bwraps_monitor(cli: Cli, repo: Path) -> None:
    """bwrap's monitor (outside the sandbox) must outlive the signals meant for the agent, or its end
    reads as the agent's: a cancel's graceful SIGTERM reaches the agent, which cleans up and exits
    with its own code; an agent's `kill 0` (its whole process group) reaches only the sandbox."""
    from tests.test_control import detach, start_up, stop_up, wait_state, wait_until

    up = start_up(cli)
    try:
        graceful = "trap 'echo cleaned up; exit 4' TERM; echo ready; while :; do sleep 0.05; done"
        execution_id = detach(cli, repo, "--", "sh", "-c", graceful)
        wait_until(lambda: "ready" in cli("logs", execution_id).stdout, 60, "the agent's start")
        assert started(cli, execution_id)["sandbox"]["mode"] == "bwrap"
        cli("cancel", execution_id, "--grace", "30", check=True)
        final = wait_state(cli, execution_id, "exited")
        assert (final["exit_code"], final["signal"]) == (4, None), final  # not bwrap's -15 (or a kill after 30 s)
        assert "cleaned up" in cli("logs", execution_id).stdout

        group_kill = "trap 'echo got it; exit 3' TERM; kill -TERM 0; sleep 30"
        execution_id = detach(cli, repo, "--", "sh", "-c", group_kill)
        final = wait_state(cli, execution_id, "exited")
        assert (final["exit_code"], final["signal"]) == (3, None), final
        assert "got it" in cli("logs", execution_id).stdout
    finally:
        stop_up(cli, up)
