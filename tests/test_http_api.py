"""The HTTP API against a real `corral up` (uvicorn on a free port), real tokens, a real HTTP client.

Every state-changing route is attacked with no token, an unknown token, a revoked token and a
read-only (tap) token; SSE is read, cut mid-stream and resumed with Last-Event-ID.
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cli, agent_command, cli_environment, make_repo
from tests.test_adapters import model_server as model_server  # the fixture
from tests.test_control import start_up, stop_up, wait_until


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One `corral up --http 127.0.0.1:0` (embedded NATS) for the module, an operator and a tap token."""
    root = tmp_path_factory.mktemp("http")
    env = cli_environment(CORRAL_HOME=str(root / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(root / "home", env)
    repo = make_repo(root / "repo")
    cli.home.mkdir(parents=True, exist_ok=True)  # the attacks below fail many logins on purpose
    (cli.home / "corral.toml").write_text("[http]\nmax_failed_logins = 100000\n")
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        runtime = json.loads((cli.home / "runtime.json").read_text())
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        assert runtime["pid"] == up.pid
        operator = cli("token", "create", "alice", "--role", "operator", check=True).stdout.strip()
        tap = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()
        yield {"cli": cli, "url": url, "repo": repo, "operator": operator, "tap": tap, "up": up}
    finally:
        stop_up(cli, up)


def client(api: dict[str, Any], token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api[token]}"} if token else {}
    return httpx.Client(base_url=api["url"], headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> str:
    """The response is a JSON error with this status and one line of text."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and isinstance(body["error"], str) and "\n" not in body["error"]
    return str(body["error"])


def submit(api: dict[str, Any], command: list[str], **extra: Any) -> str:
    with client(api, "operator") as http:
        response = http.post("/api/executions", json={"repo": str(api["repo"]), "command": command, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["execution_id"])


def state_of(api: dict[str, Any], execution_id: str) -> dict[str, Any]:
    with client(api, "tap") as http:
        response = http.get(f"/api/executions/{execution_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for_state(api: dict[str, Any], execution_id: str, *states: str) -> dict[str, Any]:
    return wait_until(  # type: ignore[return-value]
        lambda: (s := state_of(api, execution_id))["state"] in states and s, 60, f"{execution_id} {states}"
    )


def read_sse(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """The next `count` events of an SSE response: {id, event, data}; comments skipped."""
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith(":") or line.startswith("retry:"):
            continue
        if not line:
            if "data" in current:
                found.append(current)
                if len(found) == count:
                    return found
            current = {}
            continue
        key, _, value = line.partition(": ")
        current[key] = json.loads(value) if key == "data" else value
    return found


def test_probes_need_no_token_and_openapi_lists_the_routes(api: dict[str, Any]) -> None:
    with client(api) as http:
        assert http.get("/healthz").json() == {"ok": True}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ok"] is True
        spec = http.get("/openapi.json").json()
        for path in (
            "/api/executions",
            "/api/executions/{execution_id}/input",
            "/api/approvals/{approval_id}/decision",
            "/api/events",
            "/api/sql",
        ):
            assert path in spec["paths"], path
        assert "RunSpec" in spec["components"]["schemas"]
        assert http.get("/docs").status_code == 200


STATE_CHANGING = [
    ("POST", "/api/executions", {"repo": ".", "command": ["true"]}),
    ("POST", "/api/executions/{id}/input", {"text": "x"}),
    ("POST", "/api/executions/{id}/pause", None),
    ("POST", "/api/executions/{id}/resume", None),
    ("POST", "/api/executions/{id}/cancel", None),
    ("POST", "/api/executions/{id}/extend", {"seconds": 5}),
    ("POST", "/api/executions/{id}/priority", {"priority": 3}),
    ("POST", "/api/approvals/AP-NOPE00/decision", {"decision": "approve"}),
    ("POST", "/api/executions/{id}/checkpoint", None),
    ("POST", "/api/executions/{id}/commit", {"message": "m"}),
    ("POST", "/api/executions/{id}/rollback", {"to": 0}),
    ("POST", "/api/executions/{id}/pr", {"title": "t"}),
    ("POST", "/api/executions/{id}/replay", None),
    ("POST", "/api/executions/{id}/fork", {"at": 0}),
    ("POST", "/api/worktrees/prune", {"dry_run": True}),
]
READING = [
    ("GET", "/api/executions", None),
    ("GET", "/api/executions/{id}", None),
    ("GET", "/api/executions/{id}/logs", None),
    ("GET", "/api/executions/{id}/workspace", None),
    ("GET", "/api/worktrees", None),
    ("GET", "/api/approvals", None),
    ("GET", "/api/search?q=x", None),
    ("POST", "/api/sql", {"sql": "SELECT 1"}),
    ("GET", "/api/health", None),
    ("GET", "/api/templates", None),
]


def test_every_route_refuses_callers_without_a_valid_token(api: dict[str, Any]) -> None:
    execution_id = submit(api, ["sh", "-c", "sleep 60"])
    wait_for_state(api, execution_id, "running")
    revoked = api["cli"]("token", "create", "gone", "--role", "operator", check=True).stdout.strip()
    assert api["cli"]("token", "revoke", "gone", check=True).returncode == 0
    with httpx.Client(base_url=api["url"], timeout=30) as http:
        for method, path, body in STATE_CHANGING + READING:
            target = path.replace("{id}", execution_id)
            for headers in ({}, {"Authorization": "Bearer corral_not-a-token"}, {"Authorization": f"Bearer {revoked}"}):
                response = http.request(method, target, json=body, headers=headers)
                error_of(response, 401)
                assert response.headers["www-authenticate"].startswith("Bearer")
            # the tap token reads, and is refused (403) everything that changes state
            tap = {"Authorization": f"Bearer {api['tap']}"}
            response = http.request(method, target, json=body, headers=tap)
            if (method, path, body) in STATE_CHANGING:
                assert "read-only" in error_of(response, 403)
            else:
                assert response.status_code == 200, (target, response.text)
    # nothing the refused calls asked for happened: still running, not paused, no input delivered
    assert state_of(api, execution_id)["state"] == "running"
    with client(api, "tap") as http:
        rows = http.post(
            "/api/sql",
            json={"sql": f"SELECT type FROM events WHERE execution_id = '{execution_id}' AND type LIKE '%requested'"},
        ).json()["rows"]
    assert rows == [["execution.requested"]]
    with client(api, "operator") as http:
        assert http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 0}).status_code == 200


def test_tokens_are_stored_hashed_and_listed_without_secrets(api: dict[str, Any]) -> None:
    cli = api["cli"]
    stored = (cli.home / "tokens.json").read_text()
    assert api["operator"] not in stored and api["tap"] not in stored
    assert (cli.home / "tokens.json").stat().st_mode & 0o777 == 0o600
    listed = json.loads(cli("token", "list", "--json", check=True).stdout)
    assert {(t["name"], t["role"]) for t in listed} >= {("alice", "operator"), ("tapper", "tap")}
    assert api["operator"] not in json.dumps(listed)
    again = cli("token", "create", "alice", "--role", "operator")
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    bad_role = cli("token", "create", "bob", "--role", "admin")
    assert bad_role.returncode == 2
    bad_name = cli("token", "create", "no/slash", "--role", "tap")
    assert bad_name.returncode == 2 and bad_name.stderr.count("\n") == 1
    unknown = cli("token", "revoke", "nobody")
    assert unknown.returncode == 2 and "no token named" in unknown.stderr
    assert json.loads(cli("token", "list", "--json", check=True).stdout) == listed  # nothing changed


def test_run_input_pause_resume_logs_cancel_over_http(api: dict[str, Any]) -> None:
    execution_id = submit(
        api, agent_command("--steps", "1", "--sleep", "0", "--read-input")[1:], labels={"team": "web"}
    )
    wait_for_state(api, execution_id, "running")
    with client(api, "operator") as http:
        delivered = http.post(f"/api/executions/{execution_id}/input", json={"text": "hello agent"})
        assert delivered.status_code == 200, delivered.text
        assert delivered.json()["type"] == "input.delivered" and delivered.json()["data"]["bytes"] == 12
        wait_until(
            lambda: (
                "input: hello agent"
                in "".join(c["text"] for c in http.get(f"/api/executions/{execution_id}/logs").json())
            ),
            60,
            "the agent to echo its input",
        )
        paused = http.post(f"/api/executions/{execution_id}/pause", json={"reason": "lunch"})
        assert paused.status_code == 200 and paused.json()["type"] == "execution.paused"
        assert "pause needs it running" in error_of(http.post(f"/api/executions/{execution_id}/pause"), 409)
        assert state_of(api, execution_id)["state"] == "paused"
        assert http.post(f"/api/executions/{execution_id}/resume").json()["type"] == "execution.resumed"
        extended = http.post(f"/api/executions/{execution_id}/extend", json={"seconds": 60})
        assert extended.status_code in (200, 409), extended.text  # 409: no hard timeout to extend
        listed = http.get("/api/executions", params={"label": "team=web"}).json()
        assert [r["execution_id"] for r in listed] == [execution_id]
        tail = http.get(f"/api/executions/{execution_id}/logs", params={"tail": 1}).json()
        assert len(tail) == 1
        ended = http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 1, "reason": "done"})
        assert ended.status_code == 200 and ended.json()["type"] in ("execution.exited", "execution.failed")
        assert "nothing to cancel" in error_of(http.post(f"/api/executions/{execution_id}/cancel"), 409)
        requests = http.post(
            "/api/sql",
            json={
                "sql": "SELECT type, actor, data->>'requested_by' AS who FROM events "
                f"WHERE execution_id = '{execution_id}' AND type IN ('pause.requested', 'execution.requested') "
                "ORDER BY seq"
            },
        ).json()["rows"]
    assert requests == [["execution.requested", "api", "alice"], ["pause.requested", "api", "alice"]]


def test_bad_input_gets_one_json_error_and_changes_nothing(api: dict[str, Any]) -> None:
    with client(api, "operator") as http:
        # (runs of earlier tests may still record events, e.g. their exit checkpoints: count what
        # this test's calls could have caused, requests of any kind)
        requests = "SELECT count(*) FROM events WHERE type LIKE '%requested'"
        before = http.post("/api/sql", json={"sql": requests}).json()["rows"][0][0]
        assert "no execution matches" in error_of(http.get("/api/executions/zzzzzzzz"), 404)
        assert "not an execution id" in error_of(http.get("/api/executions/NOT-AN-ID!/logs"), 404)
        assert "bogus" in error_of(http.post("/api/executions", json={"repo": ".", "bogus": 1}), 422)
        assert "no such directory" in error_of(
            http.post("/api/executions", json={"repo": "/nonexistent/repo", "command": ["true"]}), 400
        )
        assert "no command to run" in error_of(http.post("/api/executions", json={"repo": str(api["repo"])}), 400)
        assert error_of(
            http.post("/api/executions", content=b"{not json", headers={"content-type": "application/json"}), 422
        )
        assert "timeout" in error_of(
            http.post("/api/executions", json={"repo": str(api["repo"]), "command": ["true"], "timeout": "soon"}), 400
        )
        assert "not a subject" in error_of(http.get("/api/events", params={"subject": "foo.>"}), 400)
        assert "no approval" in error_of(
            http.post("/api/approvals/AP-NOPE00/decision", json={"decision": "approve"}), 404
        )
        assert error_of(http.post("/api/approvals/AP-NOPE00/decision", json={"decision": "maybe"}), 422)
        # the SQL sandbox holds over HTTP too
        for sql in (
            "DROP TABLE events",
            f"SELECT content FROM read_text('{api['cli'].home}/credentials.json')",
            "COPY events TO '/tmp/stolen.csv'",
            "SELECT 1; DELETE FROM executions",
        ):
            refusal = error_of(http.post("/api/sql", json={"sql": sql}), 400)
            assert "refused" in refusal or "file system operations are disabled" in refusal, sql
        assert not Path("/tmp/stolen.csv").exists()
        after = http.post("/api/sql", json={"sql": requests}).json()["rows"][0][0]
    assert after == before  # not one request from all of that


def test_sse_resumes_with_last_event_id_without_loss_or_repeat(api: dict[str, Any]) -> None:
    execution_id = submit(api, ["sh", "-c", "for i in $(seq 1 30); do echo line $i; done"])
    wait_for_state(api, execution_id, "exited")
    headers = {"Authorization": f"Bearer {api['tap']}"}
    with httpx.Client(base_url=api["url"], headers=headers, timeout=30) as http:
        with http.stream("GET", f"/api/executions/{execution_id}/events", params={"follow": "false"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            everything = read_sse(response, 10_000)
        assert everything[0]["event"] == "execution.requested"
        assert [int(e["id"]) for e in everything] == [e["data"]["seq"] for e in everything]
        assert len({e["id"] for e in everything}) == len(everything)
        # a live follower cut after 5 events, then resumed from the last id it saw
        with http.stream("GET", f"/api/executions/{execution_id}/events") as response:
            first = read_sse(response, 5)
        with http.stream(
            "GET",
            f"/api/executions/{execution_id}/events",
            params={"follow": "false"},
            headers={"Last-Event-ID": first[-1]["id"]},
        ) as response:
            rest = read_sse(response, 10_000)
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    assert sum(e["data"]["data"]["text"].count("line") for e in everything if e["event"] == "output") == 30


def test_sse_follows_live_events_with_a_subject_filter(api: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {api['tap']}"}
    with (
        httpx.Client(base_url=api["url"], headers=headers, timeout=60) as http,
        http.stream("GET", "/api/events", params={"subject": "corral.evt.*.execution.exited"}) as response,
    ):
        execution_id = submit(api, ["true"])
        exits = read_sse(response, 1)
    assert exits[0]["event"] == "execution.exited" and exits[0]["data"]["execution_id"] == execution_id


def test_approval_decided_over_http_records_the_token_name(api: dict[str, Any]) -> None:
    execution_id = submit(api, agent_command("deploy", "--ask-approval", "deploy", "--steps", "1")[1:])
    with client(api, "operator") as http:
        approval = wait_until(
            lambda: next((a for a in http.get("/api/approvals").json() if a["execution_id"] == execution_id), None),
            60,
            "the approval",
        )
        mine = http.get("/api/approvals", params={"execution_id": execution_id[:5]}).json()
        assert [a["approval_id"] for a in mine] == [approval["approval_id"]]
        assert "no execution matches" in error_of(http.get("/api/approvals", params={"execution_id": "zzzzzzzz"}), 404)
        assert "read-only" in error_of(
            httpx.post(
                f"{api['url']}/api/approvals/{approval['approval_id']}/decision",
                json={"decision": "approve", "choice": "yes"},
                headers={"Authorization": f"Bearer {api['tap']}"},
            ),
            403,
        )
        assert "must be one of" in error_of(
            http.post(
                f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "approve", "choice": "x"}
            ),
            400,
        )
        granted = http.post(
            f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "approve", "choice": "yes"}
        )
        assert granted.status_code == 200, granted.text
        assert granted.json()["type"] == "approval.granted"
        assert granted.json()["data"]["decided_by"] == "alice"
        again = http.post(f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "reject"})
        assert "already decided: granted by alice" in error_of(again, 409)
    assert wait_for_state(api, execution_id, "exited")["exit_code"] == 0


def test_failed_logins_are_rate_limited(tmp_path: Path) -> None:
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    up = start_up(cli, "--http", "127.0.0.1:0", "--actors", "projector")
    try:
        url = wait_until(lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "HTTP")
        assert listening_sockets(up.pid) == 1
        good = cli("token", "create", "ok", "--role", "tap", check=True).stdout.strip()
        with httpx.Client(base_url=str(url), timeout=30) as http:
            assert http.get("/api/health", headers={"Authorization": f"Bearer {good}"}).status_code == 200
            statuses = [
                http.get("/api/health", headers={"Authorization": f"Bearer wrong-{i}"}).status_code for i in range(12)
            ]
            assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
            blocked = http.get("/api/health", headers={"Authorization": f"Bearer {good}"})
            assert "too many failed logins" in error_of(blocked, 429) and int(blocked.headers["retry-after"]) > 0
    finally:
        stop_up(cli, up)


def test_an_address_in_use_is_one_line_and_the_default_is_skipped(tmp_path: Path) -> None:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    try:
        taken = cli("up", "--http", f"127.0.0.1:{port}", "--actors", "projector", timeout=60)
        assert taken.returncode == 1
        assert f"cannot serve HTTP on 127.0.0.1:{port}" in taken.stderr and "--no-http" in taken.stderr
        assert "Traceback" not in taken.stderr
        assert not (cli.home / "runtime.json").exists()
        bad = cli("up", "--http", "localhost:http", "--actors", "projector", timeout=60)
        assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
        (cli.home / "corral.toml").write_text(f'[http]\naddress = "127.0.0.1:{port}"\n')
        up = start_up(cli, "--actors", "projector")  # the configured address is taken: said, and up runs on
        try:
            runtime = cli.home / "runtime.json"  # (written once `corral up` has started: not at once)
            wait_until(lambda: runtime.exists() and "http_url" in json.loads(runtime.read_text()), 60, "HTTP decided")
            assert json.loads((cli.home / "runtime.json").read_text())["http_url"] is None
        finally:
            stop_up(cli, up)
        assert "HTTP API not served" in (up.stderr.read() if up.stderr else "")
    finally:
        holder.close()


def test_no_http_serves_nothing(tmp_path: Path) -> None:
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    up = start_up(cli, "--no-http", "--actors", "projector")
    try:
        assert "http_url" not in json.loads((cli.home / "runtime.json").read_text())
        assert listening_sockets(up.pid) == 0  # (NATS is its own process; no metrics port either)
    finally:
        stop_up(cli, up)


def listening_sockets(pid: int) -> int:
    """How many TCP sockets process `pid` listens on (from /proc: no tool needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                listening += 1
    return listening


def test_checkpoint_changes_diff_rollback_commit_over_http(api: dict[str, Any]) -> None:
    execution_id = submit(api, ["sh", "-c", "sleep 60"])
    worktree = Path(wait_for_state(api, execution_id, "running")["worktree"])
    (worktree / "a.txt").write_text("one\n")
    with client(api, "operator") as http:
        first = http.post(f"/api/executions/{execution_id}/checkpoint")
        assert first.status_code == 200, first.text
        assert first.json()["type"] == "checkpoint.created" and first.json()["data"]["n"] == 1
        unchanged = http.post(f"/api/executions/{execution_id}/checkpoint").json()
        assert unchanged["checkpoint"] is None and "nothing changed since checkpoint 1" in unchanged["reason"]
        (worktree / "a.txt").write_text("two\n")
        (worktree / "b.txt").write_text("new\n")
        changed = {f["path"]: f["status"] for f in http.get(f"/api/executions/{execution_id}/changes").json()}
        assert changed == {"a.txt": "A", "b.txt": "A"}
        since = {f["path"] for f in http.get(f"/api/executions/{execution_id}/changes", params={"since": 1}).json()}
        assert since == {"a.txt", "b.txt"}
        diff = http.get(f"/api/executions/{execution_id}/diff", params={"path": "a.txt", "from": 1}).json()["diff"]
        assert "-one" in diff and "+two" in diff and "b.txt" not in diff
        assert "outside the worktree" in error_of(
            http.get(f"/api/executions/{execution_id}/diff", params={"path": "../../etc/passwd"}), 400
        )
        assert "has no checkpoint 9" in error_of(
            http.post(f"/api/executions/{execution_id}/rollback", json={"to": 9}), 404
        )
        rolled = http.post(f"/api/executions/{execution_id}/rollback", json={"to": 1, "paths": ["a.txt"]})
        assert rolled.status_code == 200, rolled.text
        assert (worktree / "a.txt").read_text() == "one\n" and (worktree / "b.txt").read_text() == "new\n"
        # the agent was paused for the rollback; its answer comes once it runs again
        assert state_of(api, execution_id)["state"] == "running"
        assert "empty" in error_of(http.post(f"/api/executions/{execution_id}/commit", json={"message": " "}), 400)
        committed = http.post(f"/api/executions/{execution_id}/commit", json={"message": "from the API"})
        assert committed.status_code == 200 and committed.json()["type"] == "change.committed"
        checkpoints = http.get(f"/api/executions/{execution_id}/checkpoints").json()
        assert [cp["n"] for cp in checkpoints][:1] == [1]
        # what `corral changes/commit` render besides: the worktree as the log records it
        ws = http.get(f"/api/executions/{execution_id}/workspace").json()
        assert (ws["execution_id"], Path(ws["path"])) == (execution_id, worktree)
        assert ws["branch"] == f"corral/{execution_id}"
        assert ws["present"] is True and ws["shadow"] is None and ws["checkpoints"] == checkpoints
        assert len(ws["base_commit"]) == 40
        listed = {w["execution_id"]: w for w in http.get("/api/worktrees").json()}
        assert listed[execution_id]["state"] == "running" and Path(listed[execution_id]["path"]) == worktree
        pruned = http.post("/api/worktrees/prune", json={"older_than": "0s", "dry_run": True}).json()
        assert {o["execution_id"]: o["action"] for o in pruned}[execution_id] == "skipped"  # it runs
        http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 0})


def test_replay_and_fork_over_http(api: dict[str, Any]) -> None:
    original = submit(api, ["sh", "-c", "echo v1 > f.txt; echo wrote"])
    assert wait_for_state(api, original, "exited")["exit_code"] == 0
    with client(api, "operator") as http:
        checkpoints = wait_until(
            lambda: http.get(f"/api/executions/{original}/checkpoints").json(), 60, "the exit checkpoint"
        )
        n = checkpoints[-1]["n"]
        replayed = http.post(f"/api/executions/{original}/replay")
        assert replayed.status_code == 201, replayed.text
        assert replayed.json()["replay_of"] == original
        forked = http.post(f"/api/executions/{original}/fork", json={"at": n, "command": ["cat", "f.txt"]})
        assert forked.status_code == 201, forked.text
        assert forked.json()["fork_of"] == original and forked.json()["checkpoint"] == n
        assert "has no checkpoint '99'" in error_of(http.post(f"/api/executions/{original}/fork", json={"at": 99}), 404)
        assert "not both" in error_of(
            http.post(f"/api/executions/{original}/fork", json={"at": n, "command": ["true"], "prompt": "x"}), 400
        )
    replay_id, fork_id = replayed.json()["execution_id"], forked.json()["execution_id"]
    assert wait_for_state(api, replay_id, "exited")["exit_code"] == 0
    assert wait_for_state(api, fork_id, "exited")["exit_code"] == 0
    with client(api, "tap") as http:
        assert "v1" in "".join(c["text"] for c in http.get(f"/api/executions/{fork_id}/logs").json())
        lineage = http.post(
            "/api/sql",
            json={
                "sql": f"SELECT replay_of, fork_of FROM executions WHERE execution_id IN ('{replay_id}', '{fork_id}') "
                "ORDER BY replay_of NULLS LAST"
            },
        ).json()["rows"]
    assert lineage == [[original, None], [None, original]]
    with client(api, "tap") as http:  # the three side by side (issue 18): a column each, trees against the first
        three = http.get("/api/compare", params={"ids": f"{original},{replay_id[:6]},{fork_id}"})
        assert three.status_code == 200, three.text
        compared = three.json()
        assert [s["execution_id"] for s in compared["executions"]] == [original, replay_id, fork_id]
        assert [d["execution_id"] for d in compared["tree_diffs"]] == [replay_id, fork_id]
        assert compared["timeline"] and all(len(row) == 3 for row in compared["timeline"])
        assert compared["timeline"][0][0]["type"] == "execution.requested"
        assert "2 to 10" in error_of(http.get("/api/compare", params={"ids": original}), 400)
        assert "named twice" in error_of(http.get("/api/compare", params={"ids": f"{original},{original}"}), 400)
        assert "not both" in error_of(http.get("/api/compare", params={"ids": original, "a": original}), 400)
        assert "no execution matches" in error_of(http.get("/api/compare", params={"ids": f"{original},zzzzzzzz"}), 404)


async def test_the_api_user_decides_only_as_a_token_and_tap_cannot_decide(api: dict[str, Any]) -> None:
    """The bus itself holds: the gateway's NATS user `api` may not decide as an operator (or as
    anyone outside `decide.token.*`), and `tap` may not decide at all, whatever the server checks."""
    import asyncio

    import nats

    from events.auth import read_credentials

    url = json.loads((api["cli"].home / "runtime.json").read_text())["url"]
    users = read_credentials(api["cli"].home / "credentials.json")
    for user, subject in (
        ("api", "corral.api.approval.decide.operator"),
        ("api", "corral.api.approval.decide.alice"),
        ("tap", "corral.api.approval.decide.token.alice"),
        ("tap", "corral.evt.abcdefgh.pause.requested"),
    ):
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))  # noqa: B023 (each connection is closed before the next loop)

        creds = users.get(user)
        assert creds is not None
        raw = await nats.connect(url, user=creds.user, password=creds.password, error_cb=on_error)
        try:
            await raw.publish(subject, b"{}")
            await raw.flush()
            for _ in range(200):
                if errors:
                    break
                await asyncio.sleep(0.05)
        finally:
            await raw.close()
        assert errors and f'permissions violation for publish to "{subject}"' in errors[0], (user, subject)


def test_the_sdk_example_of_the_docs_runs_and_approves(api: dict[str, Any], tmp_path: Path) -> None:
    """docs/sdk.md's script, as printed there: submit, follow, approve what the agent asks."""
    import re
    import subprocess
    import sys

    text = (Path(__file__).resolve().parents[1] / "docs" / "sdk.md").read_text()
    script = tmp_path / "approve_all.py"
    script.write_text(re.search(r"```python\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    agent = agent_command("deploy", "--ask-approval", "deploy", "--steps", "1")[1:]
    result = subprocess.run(
        [sys.executable, str(script), str(api["repo"]), "--", *agent],
        env=api["cli"].env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "[the agent asks:" in result.stdout and "approved choice=yes" in result.stdout
    assert re.search(r"\[\w{8}: exited, exit code 0\]", result.stdout)


def test_sse_joining_the_live_stream_mid_run_loses_and_repeats_nothing(api: dict[str, Any]) -> None:
    """Several followers start (catch up, then join the shared live consumer) while output pours in."""
    import threading

    execution_id = submit(api, ["sh", "-c", "sleep 1; for i in $(seq 1 400); do echo line $i; done; sleep 1"])
    headers = {"Authorization": f"Bearer {api['tap']}"}
    seen: list[list[dict[str, Any]]] = [[] for _ in range(4)]

    def follower(index: int) -> None:
        time.sleep(0.3 * index)  # staggered: some before the output starts, some in the middle of it
        with (
            httpx.Client(base_url=api["url"], headers=headers, timeout=120) as http,
            http.stream("GET", f"/api/executions/{execution_id}/events") as response,
        ):
            for event in iter_sse(response):
                seen[index].append(event)
                if event["event"] in ("execution.exited", "execution.failed"):
                    return

    threads = [threading.Thread(target=follower, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    with (
        httpx.Client(base_url=api["url"], headers=headers, timeout=60) as http,
        http.stream("GET", f"/api/executions/{execution_id}/events", params={"follow": "false"}) as response,
    ):
        everything = read_sse(response, 100_000)
    end = next(i for i, e in enumerate(everything) if e["event"] in ("execution.exited", "execution.failed"))
    stored = [e["id"] for e in everything[: end + 1]]  # (a checkpoint or validation may come after the exit)
    for events in seen:
        assert [e["id"] for e in events] == stored, "each follower: every event up to the exit, in order, once"
    output = "".join(e["data"]["data"]["text"] for e in seen[-1] if e["event"] == "output")
    assert output.count("line ") == 400


def iter_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith((":", "retry:")):
            continue
        if not line:
            if "data" in current:
                yield current
            current = {}
            continue
        key, _, value = line.partition(": ")
        current[key] = json.loads(value) if key == "data" else value


def test_tls_from_the_http_section(tmp_path: Path) -> None:
    """[http] tls_cert / tls_key: the API answers over HTTPS (a self-signed certificate made here)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    cli.home.mkdir(parents=True)
    (cli.home / "corral.toml").write_text(f'[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    up = start_up(cli, "--http", "127.0.0.1:0", "--actors", "projector")
    try:
        url = wait_until(lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "HTTP")
        assert str(url).startswith("https://127.0.0.1:")
        token = cli("token", "create", "t", "--role", "tap", check=True).stdout.strip()
        import ssl

        trust = ssl.create_default_context(cafile=str(cert))
        answer = httpx.get(f"{url}/api/health", headers={"Authorization": f"Bearer {token}"}, verify=trust)
        assert answer.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP on the TLS port is not served
            httpx.get(str(url).replace("https://", "http://") + "/healthz", timeout=10)
    finally:
        stop_up(cli, up)


@pytest.mark.slow
def test_a_follow_up_over_http_continues_the_agents_session(
    cli: Cli, repo: Path, tmp_path: Path, model_server: Any
) -> None:
    """POST /api/executions with `resume`: the real Claude Code continues its conversation, in the
    same worktree (what the console's review comments do for a finished agent CLI)."""
    from actors.adapters import find_program
    from tests.helpers.model_server import FILE_NAME
    from tests.test_adapters import isolated_env

    if find_program("claude") is None:
        pytest.skip("claude is not installed (sh scripts/install-agents.sh installs it under .agents/)")
    env, extra = isolated_env("claude-code", cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    up = start_up(run, "--http", "127.0.0.1:0")
    try:
        url = wait_until(lambda: json.loads((run.home / "runtime.json").read_text()).get("http_url"), 30, "HTTP")
        token = run("token", "create", "reviewer", "--role", "operator", check=True).stdout.strip()
        with httpx.Client(base_url=str(url), headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            spec = {"repo": str(repo), "agent": "claude-code", "task": f"create {FILE_NAME}", "command": extra}
            first = http.post("/api/executions", json=spec)
            assert first.status_code == 201, first.text
            parent = first.json()["execution_id"]
            done = wait_until(
                lambda: (s := http.get(f"/api/executions/{parent}").json())["state"] in ("exited", "failed") and s,
                300,
                "the first run",
            )
            assert done["exit_code"] == 0, done  # type: ignore[index]
            asked = len(model_server.requests)
            second = http.post(
                "/api/executions", json={"repo": str(repo), "resume": parent[:6], "task": "now say done"}
            )
            assert second.status_code == 201, second.text
            child = second.json()["execution_id"]
            ended = wait_until(
                lambda: (s := http.get(f"/api/executions/{child}").json())["state"] in ("exited", "failed") and s,
                300,
                "the follow-up",
            )
            assert ended["exit_code"] == 0, ended  # type: ignore[index]
            assert ended["worktree"] == done["worktree"]  # type: ignore[index]
            again = http.post("/api/executions", json={"repo": str(repo), "resume": "zzzzzzzz", "task": "x"})
            assert "no execution matches" in error_of(again, 404)
        later = [json.dumps(r.body) for r in model_server.requests[asked:] if r.method == "POST"]
        assert any("now say done" in body and f"create {FILE_NAME}" in body for body in later), later[-1:]
    finally:
        stop_up(run, up)


def test_executions_are_listed_in_pages_with_their_total(api: dict[str, Any]) -> None:
    """GET /api/executions?limit=&offset=: a page of the listing's order, X-Total-Count = all of them."""
    ids = [submit(api, ["true"], labels={"pages": "yes"}) for _ in range(3)]
    for execution_id in ids:
        wait_for_state(api, execution_id, "exited", "failed")
    with client(api, "tap") as http:
        everything = http.get("/api/executions", params={"label": "pages=yes"})
        assert everything.headers["X-Total-Count"] == "3"
        listed = everything.json()
        assert sorted(r["execution_id"] for r in listed) == sorted(ids)
        assert all("_total" not in row and "reason" in row and "attention" in row for row in listed)
        pages = []
        for offset in (0, 2, 5):
            page = http.get("/api/executions", params={"label": "pages=yes", "limit": 2, "offset": offset})
            assert page.status_code == 200 and page.headers["X-Total-Count"] == "3", page.text
            pages.append(page.json())
        assert [len(p) for p in pages] == [2, 1, 0]
        assert pages[0] + pages[1] == listed, "the pages are the listing, in its order, row for row"
        none = http.get("/api/executions", params={"label": "pages=no"})
        assert none.json() == [] and none.headers["X-Total-Count"] == "0"
        assert "offset" in error_of(http.get("/api/executions", params={"offset": -1}), 422)


@pytest.fixture(scope="module")
def retention_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A `corral up --http` with log retention on (output in its own stream), an operator, a tap token."""
    root = tmp_path_factory.mktemp("http-retention")
    env = cli_environment(CORRAL_HOME=str(root / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(root / "home", env)
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text("[retention]\noutput_max_msgs = 10000\n")
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        operator = cli("token", "create", "alice", "--role", "operator", check=True).stdout.strip()
        tap = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()
        yield {"cli": cli, "url": url, "repo": make_repo(root / "repo"), "operator": operator, "tap": tap}
    finally:
        stop_up(cli, up)


def test_sse_with_log_retention_resumes_across_both_streams(retention_api: dict[str, Any]) -> None:
    """With log retention (output in its own stream) each id is CORE:OUTPUT; a follower cut mid-way
    and resumed with Last-Event-ID gets every event once, in the same order."""
    api = retention_api
    url, token = api["url"], api["operator"]
    execution_id = submit(api, ["sh", "-c", "for i in $(seq 1 40); do echo line $i; sleep 0.01; done"])
    wait_for_state(api, execution_id, "exited")
    route = f"/api/executions/{execution_id}/events"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        with http.stream("GET", route, params={"follow": "false"}) as response:
            everything = read_sse(response, 10_000)
        assert everything[0]["event"] == "execution.requested"
        assert all(":" in e["id"] for e in everything), "CORE:OUTPUT positions"
        output = [e for e in everything if e["event"] == "output"]
        assert "".join(e["data"]["data"]["text"] for e in output).count("line ") == 40
        assert [int(e["id"].split(":")[1]) for e in output] == [e["data"]["seq"] for e in output]
        assert len({e["id"] for e in everything}) == len(everything)
        first_output = everything.index(output[0])  # cut there, the last id is "N:-" (no output seen yet)
        for cut in (first_output, len(everything) // 2):
            with http.stream("GET", route) as response:
                first = read_sse(response, cut)
            with http.stream(
                "GET", route, params={"follow": "false"}, headers={"Last-Event-ID": first[-1]["id"]}
            ) as response:
                rest = read_sse(response, 10_000)
            assert [e["id"] for e in first + rest] == [e["id"] for e in everything], f"resumed after {first[-1]}"
        # the same events by subject and a duration: the same ids (the positions count this subject's events)
        params = {"subject": f"corral.evt.{execution_id}.>", "since": "1h", "follow": "false"}
        with http.stream("GET", "/api/events", params=params) as response:
            assert [e["id"] for e in read_sse(response, 10_000)] == [e["id"] for e in everything]


def positions_of(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["data"]["stream"], e["data"]["seq"]) for e in events]


def test_sse_with_log_retention_live_followers_get_every_event_once_and_resume_live(
    retention_api: dict[str, Any],
) -> None:
    """Followers join the shared live consumers of both streams while output pours in; one is cut
    mid-stream and reconnects (live) with Last-Event-ID. Each gets every core event and output chunk
    once, in stored order, with the same CORE:OUTPUT ids as a reader of the stored log."""
    import threading

    api = retention_api
    script = "sleep 1; for i in $(seq 1 300); do echo line $i; sleep 0.005; done; sleep 1"  # many chunks
    execution_id = submit(api, ["sh", "-c", script])
    headers = {"Authorization": f"Bearer {api['tap']}"}
    route = f"/api/executions/{execution_id}/events"
    seen: list[list[dict[str, Any]]] = [[] for _ in range(4)]
    cut_at: list[str] = []

    def finished(events: list[dict[str, Any]]) -> bool:
        text = "".join(e["data"]["data"]["text"] for e in events if e["event"] == "output")
        return "line 300\n" in text and any(e["event"] in ("execution.exited", "execution.failed") for e in events)

    def follower(index: int) -> None:
        time.sleep(0.3 * index)  # staggered: some before the output starts, some in the middle of it
        with httpx.Client(base_url=api["url"], headers=headers, timeout=120) as http:
            resume: dict[str, str] = {}
            while True:
                with http.stream("GET", route, headers=resume) as response:
                    assert response.status_code == 200, response.read()
                    for event in iter_sse(response):
                        seen[index].append(event)
                        if finished(seen[index]):
                            return
                        outputs = sum(e["event"] == "output" for e in seen[index])
                        if index == 3 and not cut_at and event["event"] == "output" and outputs == 10:
                            cut_at.append(event["id"])  # cut mid-output; reconnect from the last id
                            break
                resume = {"Last-Event-ID": seen[index][-1]["id"]}

    threads = [threading.Thread(target=follower, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert cut_at, "the last follower was cut mid-output"
    with (
        httpx.Client(base_url=api["url"], headers=headers, timeout=60) as http,
        http.stream("GET", route, params={"follow": "false"}) as response,
    ):
        everything = read_sse(response, 100_000)
    for events in seen:
        assert finished(events)
        stored = everything[: len(events)]
        assert positions_of(events) == positions_of(stored), "every event up to the end, in stored order, once"
        assert [e["id"] for e in events] == [e["id"] for e in stored], "the ids a reader of the log gets"
    assert {stream for stream, _ in positions_of(everything)} == {"CORRAL", "CORRAL_OUTPUT"}


def test_sse_with_log_retention_refuses_callers_without_a_valid_token(retention_api: dict[str, Any]) -> None:
    api = retention_api
    revoked = api["cli"]("token", "create", "gone", "--role", "operator", check=True).stdout.strip()
    assert api["cli"]("token", "revoke", "gone", check=True).returncode == 0
    execution_id = submit(api, ["true"])
    with httpx.Client(base_url=api["url"], timeout=30) as http:
        for route in ("/api/events", f"/api/executions/{execution_id}/events"):
            for headers in ({}, {"Authorization": "Bearer corral_not-a-token"}, {"Authorization": f"Bearer {revoked}"}):
                response = http.get(route, params={"follow": "false"}, headers=headers)
                error_of(response, 401)
            tap = {"Authorization": f"Bearer {api['tap']}"}
            with http.stream("GET", route, params={"follow": "false", "since": "all"}, headers=tap) as response:
                assert response.status_code == 200
                assert read_sse(response, 1), "the tap token reads events"
