"""`network = "allow"` (actors/netallow.py, docs/sandbox.md), tested by attack.

A plain command agent in its own network namespace, with one loopback listener of the test on
its allow list and another not: the listed one is reached directly and through Corral's proxy;
the other is refused both ways, a CONNECT to an unlisted host gets 403, and each refusal is a
`network.blocked` event. Bad allow entries are refused in one line with nothing recorded. The
real agent CLIs of the contract suite complete their scripted task with only the loopback model
server listed.
"""

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from actors import netallow, sandbox
from actors.adapters import find_program
from tests.conftest import Cli
from tests.helpers.model_server import FILE_NAME, FILE_TEXT, ModelServer
from tests.test_adapters import PROGRAMS, isolated_env, sql
from tests.test_adapters import model_server as model_server  # the fixture

pytestmark = pytest.mark.skipif(
    sandbox.probe() is not None, reason=f"bubblewrap cannot make a sandbox here: {sandbox.probe()}"
)


class _Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def listener(name: str) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server of the test on the host's 127.0.0.1 that answers its name; `.hits` counts requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# What the agent tries: each attempt prints one JSON line {"attack", "ok", "result" | "error"}.
AGENT = r"""
import json, os, socket, sys
from urllib.parse import urlsplit

listed, unlisted = int(sys.argv[1]), int(sys.argv[2])
proxy = urlsplit(os.environ["HTTPS_PROXY"])

def attempt(name, action):
    try:
        print(json.dumps({"attack": name, "ok": True, "result": action()}), flush=True)
    except Exception as exc:
        print(json.dumps({"attack": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)

def http(sock, request):
    sock.sendall(request)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.decode(errors="replace")

def get_direct(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return http(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

def get_proxied(host, port):
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as s:
        target = f"http://{host}:{port}/"
        return http(s, f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())

def connect(host, port):
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = s.recv(65536).decode(errors="replace")
        if " 200 " not in answer.split("\r\n")[0]:
            return answer
        return http(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

attempt("listed_direct", lambda: get_direct(listed))
attempt("listed_proxy", lambda: get_proxied("127.0.0.1", listed))
attempt("listed_connect", lambda: connect("127.0.0.1", listed))
attempt("unlisted_direct", lambda: get_direct(unlisted))
attempt("unlisted_proxy", lambda: get_proxied("127.0.0.1", unlisted))
attempt("unlisted_connect", lambda: connect("127.0.0.1", unlisted))
attempt("other_host_connect", lambda: connect("example.com", 443))
attempt("outside_direct", lambda: socket.create_connection(("192.0.2.1", 443), timeout=5).close())
"""


def reports(stdout: str) -> dict[str, dict[str, Any]]:
    return {r["attack"]: r for r in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))}


def events_of(cli: Cli, execution_id: str, kind: str, count: int) -> list[dict[str, Any]]:
    """The data of an execution's events of one type, once at least `count` are projected."""
    deadline = time.monotonic() + 60
    while True:
        query = f"SELECT data FROM events WHERE execution_id = '{execution_id}' AND type = '{kind}' ORDER BY seq"
        rows = sql(cli, query)
        found = [json.loads(r["data"]) if isinstance(r["data"], str) else r["data"] for r in rows]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_only_the_listed_loopback_port_is_reached_and_each_refusal_is_recorded(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    with listener("listed") as listed, listener("unlisted") as unlisted:
        listed_port, unlisted_port = listed.server_address[1], unlisted.server_address[1]
        unlisted_hits: list[str] = []
        unlisted.RequestHandlerClass = type(  # type: ignore[misc]
            "Counting", (_Named,), {"do_GET": lambda self: (unlisted_hits.append(self.path), _Named.do_GET(self))}
        )
        allow = f"127.0.0.1:{listed_port}"
        done = cli(
            "run", "--repo", str(repo), "--network", "allow", "--allow", allow,
            "--", sys.executable, str(script), str(listed_port), str(unlisted_port),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = reports(done.stdout)
    for name in ("listed_direct", "listed_proxy", "listed_connect"):
        assert got[name]["ok"] and got[name]["result"].endswith("listed"), got[name]
    assert not got["unlisted_direct"]["ok"] and "ConnectionRefusedError" in got["unlisted_direct"]["error"]
    for name in ("unlisted_proxy", "unlisted_connect", "other_host_connect"):
        assert got[name]["ok"] and got[name]["result"].startswith("HTTP/1.1 403 "), got[name]
        assert "not on this execution's allow list" in got[name]["result"]
    assert not got["outside_direct"]["ok"], got["outside_direct"]  # no route out of the namespace
    assert unlisted_hits == []  # nothing reached the unlisted listener
    runs = json.loads(cli("ps", "--all", "--json", check=True).stdout)
    execution_id = runs[0]["execution_id"]
    blocked = events_of(cli, execution_id, "network.blocked", 4)
    assert {(b["host"], b["port"], b["how"]) for b in blocked} == {
        ("127.0.0.1", unlisted_port, "direct"),
        ("127.0.0.1", unlisted_port, "proxy"),
        ("127.0.0.1", unlisted_port, "connect"),
        ("example.com", 443, "connect"),
    }
    in_force = {"mode": "bwrap", "network": "allow", "allow": [allow]}
    [started] = events_of(cli, execution_id, "execution.started", 1)
    assert started["sandbox"] == in_force
    status = json.loads(cli("status", execution_id, "--json", check=True).stdout)
    assert status["sandbox"] == in_force
    query = f"SELECT DISTINCT actor FROM events WHERE execution_id = '{execution_id}' AND type = 'network.blocked'"
    actors = sql(cli, query)
    assert all(a["actor"].startswith("spawner") for a in actors)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--network", "allow", "--allow", "foo"], "is not host:port"),
        (["--network", "allow", "--allow", "127.0.0.1:99999"], "from 1 to 65535"),
        (["--network", "allow", "--allow", "::1:80"], "in brackets"),
        (["--allow", "127.0.0.1:80"], "only with --network allow"),
    ],
)
def test_a_bad_allow_entry_is_refused_in_one_line_and_nothing_is_recorded(
    args: list[str], says: str, cli: Cli, repo: Path
) -> None:
    done = cli("run", "--repo", str(repo), *args, "--", "true")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr
    assert json.loads(cli("ps", "--all", "--json", check=True).stdout) == []


def test_a_bad_allow_entry_in_corral_toml_is_refused_in_one_line(cli: Cli, repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('[sandbox]\nnetwork = "allow"\nallow = ["api.example.com"]\n')
    cli.env["CORRAL_CONFIG"] = str(config)
    done = cli("run", "--repo", str(repo), "--", "true")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "sandbox.allow" in done.stderr and "is not host:port" in done.stderr
    del cli.env["CORRAL_CONFIG"]
    assert json.loads(cli("ps", "--all", "--json", check=True).stdout) == []


def test_entries_parse_as_host_and_port() -> None:
    assert netallow.parse_entry("API.Example.com:443") == ("api.example.com", 443)
    assert netallow.parse_entry("[::1]:8080") == ("::1", 8080)
    pairs = netallow.parsed(["localhost:8080"])
    assert netallow.allowed(pairs, "127.0.0.1", 8080) and netallow.allowed(pairs, "[::1]", 8080)
    assert not netallow.allowed(pairs, "127.0.0.1", 8081) and not netallow.allowed(pairs, "example.com", 8080)
    assert netallow.proxy_port(["127.0.0.1:3128"]) == 3129


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude-code", "codex", "gemini", "aider"])
def test_real_cli_under_allow_with_only_the_model_server_listed(
    agent: str, cli: Cli, repo: Path, tmp_path: Path, model_server: ModelServer
) -> None:
    if find_program(PROGRAMS[agent]) is None:
        pytest.skip(f"{PROGRAMS[agent]} is not installed (bash .ci/run installs it under .agents/); not run")
    env, extra = isolated_env(agent, cli.env, tmp_path, model_server)
    run = Cli(cli.home, env)
    server = model_server.url.split("//", 1)[1].rstrip("/")
    done = run(
        "run", "--agent", agent, "--repo", str(repo), "--network", "allow", "--allow", server,
        f"create {FILE_NAME}", "--", *extra, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{agent} failed ({done.returncode}):\n{done.stderr}\n{done.stdout[-3000:]}"
    [row] = sql(run, "SELECT execution_id, worktree FROM executions")
    assert (Path(row["worktree"]) / FILE_NAME).read_text() == FILE_TEXT
    [started] = events_of(run, row["execution_id"], "execution.started", 1)
    assert started["sandbox"] == {"mode": "bwrap", "network": "allow", "allow": [server]}
    assert model_server.requests, "the CLI never reached the model server"
    assert model_server.leaks == [], f"{agent} reached past the allow list: {model_server.leaks}"


WAITING_AGENT = r"""
import os, socket, sys, time
from urllib.parse import urlsplit

listed, unlisted = int(sys.argv[1]), int(sys.argv[2])
proxy = urlsplit(os.environ["HTTPS_PROXY"])
print("waiting", flush=True)
while not os.path.exists("go"):
    time.sleep(0.1)

def ask(host, port, request):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data.decode(errors="replace").split("\r\n")[0]

print("direct:", ask("127.0.0.1", listed, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), flush=True)
get = f"GET http://127.0.0.1:{listed}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
print("proxy:", ask(proxy.hostname, proxy.port, get), flush=True)
connect = f"CONNECT 127.0.0.1:{unlisted} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
print("unlisted:", ask(proxy.hostname, proxy.port, connect), flush=True)
"""


def test_the_shim_serves_the_allow_list_while_the_supervisor_is_down(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """The proxy and the forwards are the shim's: a SIGKILLed `corral up` takes nothing from the
    agent's network, and a restarted one publishes what was refused meanwhile."""
    from tests.test_control import detach, start_up, status, stop_up, wait_state, wait_until

    script = tmp_path / "waiting.py"
    script.write_text(WAITING_AGENT)
    hits: list[str] = []
    with listener("listed") as listed:
        listed.RequestHandlerClass = type(  # type: ignore[misc]
            "Counting", (_Named,), {"do_GET": lambda self: (hits.append(self.path), _Named.do_GET(self))}
        )
        port = listed.server_address[1]
        unlisted = port + 1 if port < 65535 else port - 1
        up = start_up(cli)
        try:
            execution_id = detach(
                cli, repo, "--network", "allow", "--allow", f"127.0.0.1:{port}",
                "--", sys.executable, str(script), str(port), str(unlisted),
            )  # fmt: skip
            wait_until(lambda: "waiting" in cli("logs", execution_id).stdout, 60, "the agent to start")
            worktree = Path(status(cli, execution_id)["worktree"])
            up.kill()  # the supervisor dies; the shim (its own session) keeps the agent and its network
            up.wait()
            (worktree / "go").write_text("")
            wait_until(lambda: len(hits) == 2, 60, "the agent's two requests to the listed port")
            up = start_up(cli)
            wait_state(cli, execution_id, "exited")
            logs = cli("logs", execution_id).stdout
            assert "direct: HTTP/1.0 200 OK" in logs and "proxy: HTTP/1.0 200 OK" in logs, logs
            assert "unlisted: HTTP/1.1 403 Forbidden" in logs, logs
            blocked = events_of(cli, execution_id, "network.blocked", 1)
            assert blocked == [{"host": "127.0.0.1", "port": unlisted, "how": "connect"}]
        finally:
            stop_up(cli, up)
