"""The shadow workspace (`--workspace shadow`, actors/shadow.py, docs/shadow.md).

Real `corral up`, real overlayfs in the agent's own mount namespace, real bwrap, real git, the
real validator with the default policy (a `.env` file is a critical `secret_file`). The agent
writes good files and a violating one; at a checkpoint the good ones are promoted into the real
worktree, the violating one stays pending and an approval is asked; a rejection discards only
it (the agent, resumed, no longer sees it), an approval promotes it. While the agent runs, a
pending file is not in the real worktree, and no overlay mount is left after the run.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors import sandbox, shadow
from tests.conftest import Cli, git
from tests.test_control import detach, events, start_up, stop_up, wait_state, wait_until

pytestmark = pytest.mark.skipif(
    sandbox.probe() is not None, reason=f"bubblewrap cannot make a sandbox here: {sandbox.probe()}"
)

AGENT = r"""
import json, os, subprocess, sys
open("good.txt", "w").write("good\n")
open("README.md", "a").write("more\n")
open(".env", "w").write("DB_PASSWORD=hunter2\n")
os.makedirs("src", exist_ok=True)
open("src/new.py", "w").write("print('new')\n")
status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout
ident = ["-c", "user.name=agent", "-c", "user.email=agent@example.com"]
subprocess.run(["git", "add", "src/new.py"], check=True)
commit = subprocess.run(["git", *ident, "commit", "-qm", "from the agent"], capture_output=True, text=True)
# attacks: leave the overlay (unmount it), reach the layers behind it
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
umount = libc.umount2(os.getcwd().encode(), 2)  # MNT_DETACH
umount_errno = ctypes.get_errno()
wt = os.environ["CORRAL_WORKTREE"]
layers = os.path.join(os.path.dirname(wt) + ".shadow", os.path.basename(wt), "upper")
try:
    open(os.path.join(layers, "planted.txt"), "w").write("x")
    planted = "written"
except OSError as exc:
    planted = type(exc).__name__
report = {"step": "written", "status": status, "commit": commit.returncode, "err": commit.stderr}
print(json.dumps({**report, "umount": umount, "umount_errno": umount_errno, "planted": planted}), flush=True)
for line in sys.stdin:
    if line.strip() == "look":
        names = ("good.txt", ".env", "README.md")
        seen = {name: (open(name).read() if os.path.exists(name) else None) for name in names}
        print(json.dumps({"step": "seen", **seen}), flush=True)
    elif line.strip() == "bye":
        break
"""


def agent(tmp_path: Path) -> list[str]:
    path = tmp_path / "shadow_agent.py"
    path.write_text(AGENT)
    return ["--", sys.executable, str(path)]


def policy(tmp_path: Path, on_reject: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(f'on_violation_reject = "{on_reject}"\n')
    return str(path)


def of_type(cli: Cli, execution_id: str, kind: str) -> list[dict[str, Any]]:
    return [json.loads(e["data"]) for e in events(cli, execution_id) if e["type"] == kind]


def wait_event(cli: Cli, execution_id: str, kind: str, what: str, match: Any = None) -> dict[str, Any]:
    found = wait_until(
        lambda: next((d for d in of_type(cli, execution_id, kind) if match is None or match(d)), None), 90, what
    )
    return found  # type: ignore[return-value]


def lines(cli: Cli, execution_id: str, step: str) -> list[dict[str, Any]]:
    out = cli("logs", execution_id).stdout
    return [json.loads(x) for x in out.splitlines() if x.startswith("{") and f'"step": "{step}"' in x]


def overlay_mounts(worktree: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(worktree) in line]


def start(cli: Cli, repo: Path, tmp_path: Path, on_reject: str) -> tuple[str, Path]:
    execution_id = detach(
        cli,
        repo,
        "--workspace",
        "shadow",
        "--policy",
        policy(tmp_path, on_reject),
        "--timeout",
        "300",
        *agent(tmp_path),
    )
    wait_until(lambda: lines(cli, execution_id, "written"), 60, "the agent to write its files")
    worktree = cli.home / "worktrees" / execution_id
    return execution_id, worktree


def checkpoint_and_hold(cli: Cli, execution_id: str, worktree: Path) -> dict[str, Any]:
    """The files are pending (not in the real worktree); a checkpoint promotes the good ones and
    holds .env for an approval."""
    written = lines(cli, execution_id, "written")[0]
    assert "good.txt" in written["status"] and ".env" in written["status"]  # git sees the merged view
    assert written["commit"] == 0, written["err"]  # and the agent can commit in it
    assert written["umount"] == -1 and written["umount_errno"] == 1  # EPERM: no capabilities
    assert written["planted"] == "FileNotFoundError"  # the layers are hidden
    assert not (shadow.upper_of(shadow.shadow_dir(worktree)) / "planted.txt").exists()
    assert not (worktree / "good.txt").exists() and not (worktree / ".env").exists()
    assert (worktree / "README.md").read_text() == "# demo\n"
    assert overlay_mounts(worktree) == []  # the overlay lives only in the agent's namespace
    pending = {r["path"]: r for r in json.loads(cli("changes", execution_id, "--json", check=True).stdout)}
    assert {p: r["state"] for p, r in pending.items()} == {
        "good.txt": "pending",
        ".env": "pending",
        "README.md": "pending",
        "src/new.py": "pending",
    }
    cli("checkpoint", execution_id, check=True)
    promoted = wait_event(cli, execution_id, "workspace.promoted", "the promotion of the checkpoint")
    assert sorted(promoted["files"]) == ["README.md", "good.txt", "src/new.py"]
    assert promoted["held"] == [".env"]
    assert (worktree / "good.txt").read_text() == "good\n"
    assert (worktree / "README.md").read_text() == "# demo\nmore\n"
    assert not (worktree / ".env").exists()
    rows = json.loads(cli("changes", execution_id, "--json", check=True).stdout)
    assert {r["path"]: r["state"] for r in rows} == {
        "good.txt": "promoted",
        "README.md": "promoted",
        "src/new.py": "promoted",
        ".env": "pending",
    }
    only = json.loads(cli("changes", execution_id, "--pending", "--json", check=True).stdout)
    assert [r["path"] for r in only] == [".env"]
    diff = json.loads(cli("diff", execution_id, "--json", check=True).stdout)
    assert "good.txt" in diff["diff"] and ".env" not in diff["diff"] and "hunter2" in diff["pending"]
    approval = wait_until(
        lambda: next(
            (
                a
                for a in json.loads(cli("approvals", "--json", check=True).stdout)
                if a["execution_id"] == execution_id and a["state"] == "pending"
            ),
            None,
        ),
        60,
        "the validator's approval",
    )
    return approval  # type: ignore[return-value]


def finish(cli: Cli, execution_id: str, worktree: Path) -> None:
    cli("input", execution_id, "bye\n", check=True)
    wait_state(cli, execution_id, "exited", "failed", "cancelled")
    assert overlay_mounts(worktree) == []
    assert not [
        line for line in Path("/proc/mounts").read_text().splitlines() if " overlay " in line and str(cli.home) in line
    ]


def test_reject_discards_only_the_violating_file(cli: Cli, repo: Path, tmp_path: Path) -> None:
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        execution_id, worktree = start(cli, repo, tmp_path, "continue")
        approval = checkpoint_and_hold(cli, execution_id, worktree)
        # the HTTP API answers from the same client functions: promoted and pending apart
        url = wait_until(lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "HTTP")
        token = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()
        with httpx.Client(base_url=str(url), headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            rows = http.get(f"/api/executions/{execution_id}/changes").json()
            assert {r["path"]: r["state"] for r in rows}[".env"] == "pending"
            only = http.get(f"/api/executions/{execution_id}/changes", params={"pending": "true"}).json()
            assert [r["path"] for r in only] == [".env"]
            diff = http.get(f"/api/executions/{execution_id}/diff", params={"pending": "true"}).json()
            assert "hunter2" in diff["diff"] and "good.txt" not in diff["diff"]
        cli("reject", approval["approval_id"], check=True)
        discarded = wait_event(cli, execution_id, "workspace.discarded", "the discard")
        assert discarded["files"] == [".env"] and discarded["through"] == "namespace"
        wait_state(cli, execution_id, "running")
        cli("input", execution_id, "look\n", check=True)
        seen = wait_until(lambda: lines(cli, execution_id, "seen"), 60, "the agent to look")[0]  # type: ignore[index]
        assert seen[".env"] is None  # gone from the agent's view
        assert seen["good.txt"] == "good\n" and seen["README.md"] == "# demo\nmore\n"
        assert not (worktree / ".env").exists() and (worktree / "good.txt").exists()
        assert json.loads(cli("changes", execution_id, "--pending", "--json", check=True).stdout) == []
        finish(cli, execution_id, worktree)
        assert not (worktree / ".env").exists()
        # the agent's commit reached its branch
        assert "from the agent" in git(repo, "log", "--format=%s", f"corral/{execution_id}")
    finally:
        stop_up(cli, up)


def test_approve_promotes_the_held_file(cli: Cli, repo: Path, tmp_path: Path) -> None:
    up = start_up(cli)
    try:
        execution_id, worktree = start(cli, repo, tmp_path, "cancel")
        approval = checkpoint_and_hold(cli, execution_id, worktree)
        cli("approve", approval["approval_id"], check=True)
        granted = wait_event(
            cli, execution_id, "workspace.promoted", "the held file promoted", lambda d: d.get("approval_id")
        )
        assert granted["files"] == [".env"]
        assert (worktree / ".env").read_text() == "DB_PASSWORD=hunter2\n"
        finish(cli, execution_id, worktree)
    finally:
        stop_up(cli, up)


def test_rejected_then_cancelled_discards_from_the_upper_layer(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """The default `on_violation_reject = "cancel"`: the agent is killed while frozen; the file goes."""
    up = start_up(cli)
    try:
        execution_id, worktree = start(cli, repo, tmp_path, "cancel")
        approval = checkpoint_and_hold(cli, execution_id, worktree)
        cli("reject", approval["approval_id"], check=True)
        discarded = wait_event(cli, execution_id, "workspace.discarded", "the discard")
        assert discarded["files"] == [".env"]
        wait_state(cli, execution_id, "cancelled", "exited", "failed")
        assert overlay_mounts(worktree) == []
        assert not (worktree / ".env").exists()
        assert not (shadow.upper_of(shadow.shadow_dir(worktree)) / ".env").exists()
        assert (worktree / "good.txt").exists()
    finally:
        stop_up(cli, up)


def test_shadow_without_the_sandbox_is_refused(cli: Cli, repo: Path, tmp_path: Path) -> None:
    result = cli("run", "--repo", str(repo), "--workspace", "shadow", "--sandbox", "off", *agent(tmp_path))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and 'workspace = "shadow" needs the sandbox' in result.stderr
    assert not (cli.home / "worktrees").exists() or not any((cli.home / "worktrees").iterdir())


def test_a_foreground_run_promotes_its_exit_checkpoint(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """`corral run` without `corral up`: the exit checkpoint is validated and promoted before it returns."""
    script = tmp_path / "exit_agent.py"
    script.write_text('open("out.txt", "w").write("out\\n")\nopen("README.md", "a").write("x\\n")\n')
    result = cli("run", "--repo", str(repo), "--workspace", "shadow", "--", sys.executable, str(script), check=True)
    execution_id = result.stderr.split(":")[1].strip()
    worktree = cli.home / "worktrees" / execution_id
    assert (worktree / "out.txt").read_text() == "out\n"
    assert (worktree / "README.md").read_text() == "# demo\nx\n"
    rows = json.loads(cli("changes", execution_id, "--json", check=True).stdout)
    assert {r["path"]: r["state"] for r in rows} == {"out.txt": "promoted", "README.md": "promoted"}
    assert overlay_mounts(worktree) == []
    started = of_type(cli, execution_id, "execution.started")[0]
    assert started["sandbox"]["workspace"] == "shadow"


def test_workspace_setting_defaults_template_flag(cli: Cli, repo: Path) -> None:
    from corral.config import ConfigError, parse_config, resolve_run

    config = parse_config('[defaults]\nworkspace = "shadow"\n[templates.plain]\nworkspace = "direct"\n')
    assert resolve_run(config, None, {}).settings.workspace == "shadow"
    assert resolve_run(config, "plain", {}).settings.workspace == "direct"
    assert resolve_run(config, "plain", {"workspace": "shadow"}).settings.workspace == "shadow"
    assert resolve_run(parse_config(""), None, {}).settings.workspace == "direct"
    with pytest.raises(ConfigError) as bad:
        parse_config('[defaults]\nworkspace = "ghost"\n')
    assert "workspace" in str(bad.value) and "\n" not in str(bad.value)
    wrong = cli("run", "--repo", str(repo), "--workspace", "ghost", "--", "true")
    assert wrong.returncode == 2 and "--workspace" in wrong.stderr


def test_discard_never_follows_a_symlink_the_agent_planted(tmp_path: Path) -> None:
    """An agent replaces the directory above a held file by a symlink to a host directory: the
    discard (as root) must not delete or write the host's file through it."""
    worktree = tmp_path / "worktrees" / "abcd1234"
    (worktree / "conf").mkdir(parents=True)
    (worktree / "conf" / "app.ini").write_text("promoted\n")
    host = tmp_path / "host"
    host.mkdir()
    (host / ".env").write_text("host secret\n")
    (host / "app.ini").write_text("host file\n")
    root = shadow.prepare(worktree)
    upper = shadow.upper_of(root)
    (upper / "conf").symlink_to(host)  # the agent's `conf -> /host`
    done = shadow.discard(worktree, root, ["conf/.env", "conf/app.ini"], None)
    assert done == []
    assert (host / ".env").read_text() == "host secret\n" and (host / "app.ini").read_text() == "host file\n"
    assert not shadow.safe_parents(upper, "conf/.env") and shadow.safe_parents(worktree, "conf/app.ini")
    shadow.remove(worktree)
    assert not root.exists() and (host / ".env").exists()


def test_merged_tree_is_what_the_agent_sees(tmp_path: Path) -> None:
    """Deletions (whiteouts), a directory deleted and made again (opaque), a directory replaced by
    a file and a file by a directory, a new executable, symlinks: through a real overlay mounted by
    `shadow.preexec`; the checkpoint's tree equals `git add -A` of a copy of the merged view."""
    import asyncio
    import subprocess

    from tests.conftest import commit_all, make_repo

    repo = make_repo(tmp_path / "repo")
    for rel, text in {
        "a.txt": "a",
        "d/b.txt": "b",
        "d/c.txt": "c",
        "e/f.txt": "f",
        "g": "g",
        "k/keep.txt": "k",
    }.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text + "\n")
    (repo / "link").symlink_to("a.txt")
    (repo / ".gitignore").write_text("*.log\n")
    commit_all(repo, "files")
    worktree = tmp_path / "worktrees" / "merged01"
    git(repo, "worktree", "add", "-q", "-b", "corral/merged01", str(worktree))
    root = shadow.prepare(worktree)
    copy = tmp_path / "copy"
    ops = (
        "rm a.txt && rm -rf d && mkdir d && echo n > d/new.txt && rm -rf e && echo e > e && rm g && mkdir g && "
        "echo x > g/x.txt && echo top > top.sh && chmod +x top.sh && mkdir -p h/i && echo z > h/i/z.txt && "
        "ln -s d/new.txt link2 && rm link && echo noise > build.log && echo more >> k/keep.txt && "
        f"mkdir {copy} && cp -a . {copy}/ && rm {copy}/.git"
    )
    subprocess.run(["sh", "-c", ops], preexec_fn=shadow.preexec(worktree, root, None), check=True)
    assert overlay_mounts(worktree) == []  # gone with the namespace
    assert (worktree / "a.txt").exists() and not (worktree / "top.sh").exists()  # the real worktree untouched
    entries = {e.path: e.kind for e in shadow.scan(shadow.upper_of(root))}
    assert entries["a.txt"] == "whiteout" and entries["d"] == "opaque" and entries["e"] == "file"

    seen, _ = asyncio.run(shadow.merged_tree(worktree, tmp_path / "m.index", root, max_file_bytes=0))
    env = {"GIT_INDEX_FILE": str(tmp_path / "ref.index"), "GIT_DIR": str(repo / ".git"), "GIT_WORK_TREE": str(copy)}
    subprocess.run(["git", "add", "-A"], cwd=copy, env={**os.environ, **env}, check=True)
    ref = subprocess.run(["git", "write-tree"], cwd=copy, env={**os.environ, **env}, check=True, capture_output=True)
    assert seen == ref.stdout.decode().strip()
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", seen], cwd=repo, capture_output=True, text=True)
    assert "build.log" not in listed.stdout and "top.sh" in listed.stdout and "d/b.txt" not in listed.stdout
    # the promotion makes the real worktree that tree, and nothing is pending any more
    done, held = asyncio.run(shadow.promote(worktree, root, tmp_path / "p.index", seen, set()))
    assert held == [] and "top.sh" in done and os.access(worktree / "top.sh", os.X_OK)
    assert not (worktree / "d" / "b.txt").exists() and (worktree / "e").read_text() == "e\n"
    assert os.readlink(worktree / "link2") == "d/new.txt" and not os.path.lexists(worktree / "link")
    assert shadow.pending(worktree, root) == [{"path": "build.log", "change": "added"}]
