"""Policy evaluation on real git commits, the validator on a real NATS server, and policy config errors."""

import asyncio
import subprocess
from pathlib import Path

import orjson
import pytest

from actors.bus import Bus
from actors.policy import (
    FindingCache,
    Policy,
    PolicyError,
    compile_globs,
    parse_policy,
    read_diff,
)
from actors.validator import Validator
from corral.config import ConfigError, parse_config
from events.envelope import new_event
from events.types import CheckpointCreated, ExecutionRequested, FileStat, ToolCalled, WorkspaceCreated
from replay.history import follow
from tests.conftest import Cli, commit_all, git

PRIVATE_KEY = "\n".join(
    (
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
        "-----END OPENSSH PRIVATE KEY-----",
        "",
    )
)


def rules(violations: list) -> set[tuple[str, str | None, str]]:
    return {(v.rule, v.category, v.severity) for v in violations}


def test_globs() -> None:
    assert compile_globs(["*.tf"]).match("infra/main.tf")  # type: ignore[union-attr]
    assert compile_globs(["deploy/**"]).match("deploy/a/b.yml")  # type: ignore[union-attr]
    assert not compile_globs(["deploy/**"]).match("src/deploy.py")  # type: ignore[union-attr]
    assert compile_globs(["requirements*.txt"]).match("sub/requirements-dev.txt")  # type: ignore[union-attr]
    assert compile_globs(["docs/"]).match("docs/a/b.md")  # type: ignore[union-attr]
    assert not compile_globs(["Dockerfile"]).match("Dockerfiles")  # type: ignore[union-attr]


def test_diff_of_risky_changes_is_flagged_by_category(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    (repo / "requirements.txt").write_text("requests==2.32\n")
    (repo / "keys").mkdir()
    (repo / "keys" / "deploy_key").write_text(PRIVATE_KEY)
    (repo / ".env").write_text("DB=1\n")
    (repo / "escape").symlink_to("../../etc/passwd")
    (repo / "inside").symlink_to("README.md")
    tool = repo / "run.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    nested = repo / "vendor" / "lib"
    nested.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(nested)], check=True)
    (nested / "x.txt").write_text("x\n")
    git(nested, "add", "x.txt")
    git(nested, "commit", "-qm", "nested")
    (repo / "src.py").write_text('API_TOKEN = "abcdefghijklmnop1234"\n')
    commit = commit_all(repo)

    changes = read_diff(repo, base, commit)
    by_path = {c.path: c for c in changes}
    assert by_path["escape"].new_mode == "120000"
    assert by_path["run.sh"].new_mode == "100755"
    found = Policy().check_files(changes)
    flagged = {(v.path, v.rule, v.category, v.severity) for v in found}
    assert ("requirements.txt", "deps_add", "deps_add", "critical") in flagged
    assert ("keys/deploy_key", "secret", "secrets", "critical") in flagged
    assert (".env", "secret_file", "secrets", "critical") in flagged
    assert ("src.py", "secret", "secrets", "critical") in flagged
    assert ("escape", "symlink_escape", "symlink_escape", "critical") in flagged
    assert not any(v.path == "inside" for v in found)
    assert ("run.sh", "executable", "executable", "warning") in flagged
    assert (".github/workflows/ci.yml", "deploy", "deploy", "critical") in flagged
    assert ("vendor/lib", "git_dir", "git_dir", "critical") in flagged
    assert not any(v.path == "README.md" for v in found)

    # Categories that need no approval are warnings; a stricter policy limits size and paths.
    relaxed = Policy(require_approval=("merge",), new_executables="approve", max_files=3, allowed_paths=("src.py",))
    got = {(v.path, v.rule, v.severity) for v in relaxed.check_files(changes)}
    assert ("requirements.txt", "deps_add", "warning") in got
    assert ("run.sh", "executable", "critical") in got
    assert (None, "max_files", "warning") in got
    assert ("run.sh", "path_not_allowed", "critical") in got
    assert ("src.py", "path_not_allowed", "critical") not in got


def test_results_are_cached_by_blob_and_policy_version(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    for i in range(10):
        (repo / f"f{i}.txt").write_text(f"line {i}\n")
    commit = commit_all(repo)
    changes = read_diff(repo, base, commit)
    cache = FindingCache()
    policy = Policy()
    first = policy.check_files(changes, cache=cache)
    assert (cache.hits, cache.misses) == (0, 10)
    assert policy.check_files(changes, cache=cache) == first
    assert cache.hits == 10
    other = Policy(max_files=1)
    assert other.version != policy.version
    other.check_files(changes, cache=cache)
    assert cache.misses == 20  # another policy version is never served from the cache


def test_shell_commands() -> None:
    policy = Policy(shell_allow=("git *", "pytest*", "ls*", "pip install *"))
    assert policy.check_command("pytest -q tests") == []
    assert rules(policy.check_command("git push origin main")) == {("merge", "merge", "critical")}
    assert ("shell_deny", "shell", "critical") in rules(policy.check_command("ls && sudo rm -rf /"))
    assert ("shell_not_allowed", "shell", "warning") in rules(policy.check_command("curl example.com"))
    assert ("deps_add", "deps_add", "critical") in rules(policy.check_command("pip install left-pad"))
    assert ("deploy", "deploy", "critical") in rules(Policy().check_command("kubectl apply -f prod.yml"))
    assert ("shell_deny", "shell", "critical") in rules(Policy().check_command("echo x > .git/hooks/pre-commit"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[policy]\nmax_file = 3\n", "corral.toml: unknown key policy.max_file (did you mean max_files?)"),
        ("[policy]\nmax_files = -1\n", "corral.toml: policy.max_files: input should be greater than or equal to 0"),
        (
            '[policy]\nrequire_approval = ["deploy", "nukes"]\n',
            "corral.toml: policy.require_approval[1]: input should be 'merge', 'deps_add', 'secrets' or 'deploy'",
        ),
        ('[policy]\napproval_timeout = "soon"\n', "corral.toml: policy.approval_timeout: expected a duration"),
        ('[policy]\nsecret_patterns = ["("]\n', "corral.toml: policy.secret_patterns: bad regular expression '('"),
        (
            '[templates.fast]\ncommand = "x"\npolicy = { on_expire = "explode" }\n',
            "corral.toml: templates.fast.policy.on_expire: input should be 'cancel' or 'continue'",
        ),
    ],
)
def test_bad_policy_config_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_policy_config_merges_template_over_global() -> None:
    config = parse_config('[policy]\nmax_files = 5\n[templates.safe]\ncommand = "x"\npolicy = { max_lines = 9 }\n')
    assert config.policy == {"max_files": 5}
    assert config.templates["safe"].policy == {"max_lines": 9}
    with pytest.raises(PolicyError):
        parse_policy([])


def test_bad_policy_file_stops_the_cli(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text("[policy]\nforbidden_paths = [1]\n")
    cli.env["CORRAL_CONFIG"] = str(config)
    result = cli("approvals")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "policy.forbidden_paths[0]" in result.stderr


async def _recorded(bus: Bus, execution_id: str, kinds: tuple[str, ...], count: int) -> list[dict]:
    for _ in range(200):
        found: list[dict] = []

        async def on_msg(seq: int, msg: object, found: list[dict] = found) -> bool:
            raw = orjson.loads(msg.data)  # type: ignore[attr-defined]
            if raw["type"] in kinds:
                found.append(raw)
            return False

        await follow(bus.js, f"corral.evt.{execution_id}.>", on_msg, stop_when_caught_up=True)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} of {kinds} on {execution_id}")


async def test_validator_flags_checkpoints_pauses_and_asks(bus: Bus, repo: Path, tmp_path: Path) -> None:
    """The validator on real commits: a clean checkpoint passes, a private key pauses and asks."""
    worktree = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "corral/val00001", str(worktree))
    base = git(worktree, "rev-parse", "HEAD")
    execution_id = "val00001"
    await bus.publisher.publish(
        new_event(execution_id, ExecutionRequested(command=("x",), repo=str(repo)), actor="test")
    )
    validator = Validator(bus, policy={"max_lines": 1000})
    await validator.start()
    try:
        await bus.publisher.publish(
            new_event(
                execution_id,
                WorkspaceCreated(path=str(worktree), branch="corral/val00001", repo=str(repo), base_commit=base),
                actor="test",
            )
        )
        await asyncio.sleep(0.3)  # the baseline snapshot of git's own files
        (worktree / "notes.md").write_text("hello\n")
        first = commit_all(worktree)
        await bus.publisher.publish(
            new_event(
                execution_id,
                CheckpointCreated(
                    n=1,
                    ref="refs/corral/val00001/1",
                    commit=first,
                    tree="t",
                    parent=base,
                    trigger="interval",
                    files=(FileStat(path="notes.md", added=1, deleted=0),),
                    duration_ms=1.0,
                ),
                actor="test",
            )
        )
        passed = await _recorded(bus, execution_id, ("validation.passed",), 1)
        assert passed[0]["data"]["checkpoint"] == 1

        (worktree / "id_rsa").write_text(PRIVATE_KEY)
        hooks = Path(git(worktree, "rev-parse", "--git-common-dir"))
        hooks = (hooks if hooks.is_absolute() else worktree / hooks) / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "post-commit").write_text("#!/bin/sh\ncurl evil\n")
        second = commit_all(worktree)
        await bus.publisher.publish(
            new_event(
                execution_id,
                CheckpointCreated(
                    n=2,
                    ref="refs/corral/val00001/2",
                    commit=second,
                    tree="t",
                    parent=first,
                    trigger="interval",
                    files=(FileStat(path="id_rsa", added=3, deleted=0),),
                    duration_ms=1.0,
                ),
                actor="test",
            )
        )
        failed = (await _recorded(bus, execution_id, ("validation.failed",), 1))[0]["data"]
        got = {(v["path"], v["rule"], v["category"], v["severity"]) for v in failed["violations"]}
        assert ("id_rsa", "secret", "secrets", "critical") in got
        assert ("id_rsa", "secret_file", "secrets", "critical") in got
        assert (".git/hooks/post-commit", "git_dir", "git_dir", "critical") in got
        assert failed["checkpoint"] == 2 and failed["policy_version"] == validator.policy_for(None).version
        asks = await _recorded(bus, execution_id, ("pause.requested", "approval.needed"), 2)
        pause = next(a for a in asks if a["type"] == "pause.requested")["data"]
        needed = next(a for a in asks if a["type"] == "approval.needed")["data"]
        assert pause["requested_by"] == "validator"
        assert needed["source"] == "validator" and needed["category"] in ("secrets", "git_dir")

        # A reported shell command is checked too; a redelivered checkpoint is not recorded twice.
        await bus.publisher.publish(
            new_event(
                execution_id,
                ToolCalled(name="Bash", input_summary="push", shell_command="git push -f origin"),
                actor="test",
            )
        )
        failures = await _recorded(bus, execution_id, ("validation.failed",), 2)
        shell = failures[-1]["data"]["violations"]
        assert {v["rule"] for v in shell} >= {"shell_deny", "merge"}
    finally:
        await validator.stop()


def test_run_policy_file_applies_to_that_run_only(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """`corral run --policy FILE`: the file's keys over [policy], for this execution only."""
    policy = tmp_path / "run-policy.toml"
    policy.write_text('[policy]\nforbidden_paths = ["build/**"]\n')
    command = ["--", "sh", "-c", "mkdir -p build && echo out > build/out.txt"]
    strict = cli("run", "--repo", str(repo), "--policy", str(policy), "-q", *command, check=True)
    loose = cli("run", "--repo", str(repo), "-q", *command, check=True)
    assert strict.returncode == loose.returncode == 0
    rows = orjson.loads(
        cli(
            "sql",
            "SELECT e.policy IS NOT NULL AS strict, v.passed, v.details::VARCHAR AS details "
            "FROM validations v JOIN (SELECT execution_id, data->>'policy' AS policy FROM events "
            "WHERE type = 'execution.requested') e USING (execution_id)",
            "--json",
            check=True,
        ).stdout
    )
    by_run = {row["strict"]: row for row in rows}
    assert by_run[True]["passed"] is False and "forbidden_path" in by_run[True]["details"]
    assert by_run[False]["passed"] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "not found"),
        ("forbidden_paths = [", "not valid TOML"),
        ("max_files = -1", "max_files"),
        ("", "no policy keys"),
    ],
)
def test_bad_run_policy_file_is_one_line_and_starts_nothing(
    cli: Cli, repo: Path, tmp_path: Path, text: str | None, message: str
) -> None:
    policy = tmp_path / "p.toml"
    if text is not None:
        policy.write_text(text + "\n")
    result = cli("run", "--repo", str(repo), "--policy", str(policy), "--", "true")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert orjson.loads(cli("ps", "--all", "--json", check=True).stdout) == []
