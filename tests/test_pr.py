"""`corral pr` end to end: a local bare repository as the remote, a local HTTP server as the forge."""

import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral.forge import repo_from_remote_url
from tests.conftest import Cli, agent_command, commit_all, git

TOKEN = "test-token-3f9c1d"  # must never reach the event log or a message
TOKEN_ENV = "CORRAL_TEST_FORGE_TOKEN"


@dataclass
class FakeForge:
    """A GitHub-shaped forge on 127.0.0.1: records each request, answers from `answers`."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)


@pytest.fixture
def forge() -> Iterator[FakeForge]:
    state = FakeForge(url="")
    state.answers = {
        ("GET", "/api/repos/acme/widgets"): (200, {"full_name": "acme/widgets", "default_branch": "main"}),
        ("POST", "/api/repos/acme/widgets/pulls"): (
            201,
            {"number": 42, "html_url": "http://127.0.0.1/acme/widgets/pull/42"},
        ),
    }

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "json": json.loads(body) if body else None,
                }
            )
            status, payload = state.answers.get((self.command, self.path), (404, {"message": "Not Found"}))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/api"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)")


@pytest.fixture
def remote(tmp_path: Path, repo: Path) -> Path:
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(repo, "remote", "add", "origin", str(bare))
    git(repo, "push", "-q", "origin", "main")
    return bare


@pytest.fixture
def pr_cli(cli: Cli, forge: FakeForge, tmp_path: Path, remote: Path) -> Cli:
    config = tmp_path / "corral.toml"
    config.write_text(f'[forge]\nbase_url = "{forge.url}"\nrepo = "acme/widgets"\ntoken_env = "{TOKEN_ENV}"\n')
    cli.env["CORRAL_CONFIG"] = str(config)
    cli.env[TOKEN_ENV] = TOKEN
    return cli


def run_agent(cli: Cli, repo: Path) -> tuple[str, Path]:
    result = cli("run", "--repo", str(repo), *agent_command("task", "--steps", "1"), check=True)
    match = re.search(r"worktree (\S+) \(branch corral/(\w+)\)", result.stderr)
    assert match, result.stderr
    return match.group(2), Path(match.group(1))


def pr_events(cli: Cli, execution_id: str) -> list[dict[str, Any]]:
    rows = json.loads(
        cli(
            "sql",
            f"SELECT type, data, causation_id FROM events WHERE execution_id = '{execution_id}' "
            "AND type LIKE 'pr.%' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )
    return [{"type": r["type"], "data": json.loads(r["data"]), "causation_id": r["causation_id"]} for r in rows]


def all_event_data(cli: Cli) -> str:
    return cli("sql", "SELECT string_agg(data::VARCHAR, ' ') FROM events", "--json", check=True).stdout


def test_pr_pushes_the_branch_and_opens_a_pull_request(pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge) -> None:
    execution_id, worktree = run_agent(pr_cli, repo)
    commit = commit_all(worktree, "agent work")
    branch = f"corral/{execution_id}"

    result = pr_cli("pr", execution_id[:5], "--title", "Fix the bug", "--body", "Done by an agent.", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {
        "execution_id": execution_id,
        "number": 42,
        "url": "http://127.0.0.1/acme/widgets/pull/42",
        "branch": branch,
        "base": "main",  # the forge's default branch
        "remote": "origin",
        "repo": "acme/widgets",
        "commits": 1,
    }
    # The branch is on the remote at the agent's commit.
    assert git(remote, "rev-parse", f"refs/heads/{branch}") == commit
    # What the forge received.
    get, post = forge.requests
    assert (get["method"], get["path"]) == ("GET", "/api/repos/acme/widgets")
    assert (post["method"], post["path"]) == ("POST", "/api/repos/acme/widgets/pulls")
    assert post["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert get["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert post["headers"]["content-type"] == "application/json"
    assert post["json"] == {"title": "Fix the bug", "body": "Done by an agent.", "head": branch, "base": "main"}
    # What the log recorded, linked by causation; the token is nowhere in it.
    events = pr_events(pr_cli, execution_id)
    assert [e["type"] for e in events] == ["pr.requested", "pr.opened"]
    assert events[0]["data"] == {"title": "Fix the bug", "body": "Done by an agent.", "base": None}
    assert events[1]["data"] == {"url": "http://127.0.0.1/acme/widgets/pull/42", "number": 42, "branch": branch}
    assert TOKEN not in all_event_data(pr_cli)

    # --base names the target; the human output is the URL.
    second = pr_cli("pr", execution_id, "--title", "Again", "--base", "release")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "http://127.0.0.1/acme/widgets/pull/42"
    assert f"pull request #42 opened: {branch} → release" in second.stderr
    assert forge.requests[-1]["json"]["base"] == "release"
    assert forge.requests[-1]["json"]["body"] == ""


def test_nothing_committed_is_a_clear_error(pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge) -> None:
    execution_id, _ = run_agent(pr_cli, repo)  # the agent's files are untracked: nothing committed
    before = refs(repo)
    result = pr_cli("pr", execution_id, "--title", "T")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"corral: error: nothing committed on corral/{execution_id} beyond its base")
    assert lines[0].endswith(f"`corral commit {execution_id} -m MSG` first")
    assert forge.requests == []
    assert refs(repo) == before
    assert git(remote, "for-each-ref", "--format=%(refname)") == "refs/heads/main"
    assert pr_events(pr_cli, execution_id) == []


def test_forge_refusal_is_one_line_and_changes_nothing_locally(
    pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge
) -> None:
    execution_id, worktree = run_agent(pr_cli, repo)
    commit_all(worktree, "agent work")
    forge.answers[("POST", "/api/repos/acme/widgets/pulls")] = (
        422,
        {"message": "Validation Failed", "errors": [{"message": "A pull request already exists for acme:corral/x."}]},
    )
    before = refs(repo)
    result = pr_cli("pr", execution_id, "--title", "T")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "the forge answered HTTP 422 to POST" in lines[0]
    assert "Validation Failed: A pull request already exists" in lines[0]
    assert "stays there" in lines[0]
    assert TOKEN not in result.stderr
    assert refs(repo) == before  # not even the remote-tracking ref moved
    events = pr_events(pr_cli, execution_id)
    assert [e["type"] for e in events] == ["pr.requested", "pr.failed"]
    assert "HTTP 422" in events[1]["data"]["error"]


def test_rejected_token_stops_before_the_push(pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge) -> None:
    execution_id, worktree = run_agent(pr_cli, repo)
    commit_all(worktree, "agent work")
    forge.answers[("GET", "/api/repos/acme/widgets")] = (401, {"message": "Bad credentials"})
    before = refs(repo)
    result = pr_cli("pr", execution_id, "--title", "T", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 401" in result.stderr and "Bad credentials" in result.stderr and "token" in result.stderr
    assert [r["method"] for r in forge.requests] == ["GET"]
    assert refs(repo) == before
    assert git(remote, "for-each-ref", "--format=%(refname)") == "refs/heads/main"  # nothing pushed
    assert [e["type"] for e in pr_events(pr_cli, execution_id)] == ["pr.requested", "pr.failed"]


def test_unreachable_forge(pr_cli: Cli, repo: Path, remote: Path, tmp_path: Path) -> None:
    execution_id, worktree = run_agent(pr_cli, repo)
    commit_all(worktree, "agent work")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "unreachable.toml"
    config.write_text(
        f'[forge]\nbase_url = "http://127.0.0.1:{port}"\nrepo = "acme/widgets"\ntoken_env = "{TOKEN_ENV}"\n'
    )
    pr_cli.env["CORRAL_CONFIG"] = str(config)
    before = refs(repo)
    result = pr_cli("pr", execution_id, "--title", "T")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"corral: error: cannot reach the forge at http://127.0.0.1:{port}")
    assert "check [forge] base_url" in lines[0]
    assert refs(repo) == before
    assert git(remote, "for-each-ref", "--format=%(refname)") == "refs/heads/main"


def test_bad_input_changes_nothing(pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge) -> None:
    execution_id, worktree = run_agent(pr_cli, repo)
    commit_all(worktree, "agent work")
    before = refs(repo)

    unknown = pr_cli("pr", "zzzzzzzz", "--title", "T")
    assert unknown.returncode == 2
    assert "no execution matches 'zzzzzzzz'" in unknown.stderr

    no_remote = pr_cli("pr", execution_id, "--title", "T", "--remote", "upstream")
    assert no_remote.returncode == 2
    assert "no remote named 'upstream'" in no_remote.stderr

    empty_title = pr_cli("pr", execution_id, "--title", "  ")
    assert empty_title.returncode == 2
    assert "--title must not be empty" in empty_title.stderr

    pr_cli.env.pop(TOKEN_ENV)
    no_token = pr_cli("pr", execution_id, "--title", "T")
    assert no_token.returncode == 2
    assert f"set the environment variable {TOKEN_ENV}" in no_token.stderr

    for result in (unknown, no_remote, empty_title, no_token):
        assert len(result.stderr.strip().splitlines()) == 1
    assert forge.requests == []
    assert refs(repo) == before
    assert pr_events(pr_cli, execution_id) == []


@pytest.mark.parametrize(
    ("url", "repo"),
    [
        ("git@github.com:acme/widgets.git", "acme/widgets"),
        ("https://github.com/acme/widgets.git", "acme/widgets"),
        ("https://github.com/acme/widgets", "acme/widgets"),
        ("ssh://git@github.example.com/acme/widgets.git", "acme/widgets"),
        ("/srv/git/widgets.git", None),
        ("../widgets.git", None),
        ("https://github.com/widgets", None),
    ],
)
def test_repo_from_remote_url(url: str, repo: str | None) -> None:
    assert repo_from_remote_url(url) == repo


def test_pr_over_the_http_api(pr_cli: Cli, repo: Path, remote: Path, forge: FakeForge) -> None:
    """POST /api/executions/{id}/pr does what `corral pr` does, in `corral up` (its [forge] and token)."""
    import httpx

    from tests.test_control import start_up, stop_up, wait_until

    up = start_up(pr_cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(lambda: json.loads((pr_cli.home / "runtime.json").read_text()).get("http_url"), 30, "HTTP")
        token = pr_cli("token", "create", "carol", "--role", "operator", check=True).stdout.strip()
        execution_id, worktree = run_agent(pr_cli, repo)
        commit_all(worktree, "agent work")
        with httpx.Client(base_url=str(url), headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            assert http.post(f"/api/executions/{execution_id}/pr", json={"title": ""}).status_code == 422
            opened = http.post(f"/api/executions/{execution_id}/pr", json={"title": "Fix it", "body": "by the API"})
            assert opened.status_code == 200, opened.text
            assert opened.json()["number"] == 42 and opened.json()["branch"] == f"corral/{execution_id}"
            forge.answers[("POST", "/api/repos/acme/widgets/pulls")] = (422, {"message": "A pull request exists"})
            failed = http.post(f"/api/executions/{execution_id}/pr", json={"title": "Again"})
            assert failed.status_code == 502 and "A pull request exists" in failed.json()["error"]
        kinds = [e["type"] for e in pr_events(pr_cli, execution_id)]
        assert kinds == ["pr.requested", "pr.opened", "pr.requested", "pr.failed"]
        posted = [r for r in forge.requests if r["method"] == "POST"]
        assert posted[0]["json"]["title"] == "Fix it" and posted[0]["json"]["body"] == "by the API"
    finally:
        stop_up(pr_cli, up)
