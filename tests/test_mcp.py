"""`corral mcp` driven as a real subprocess: by the MCP SDK's stdio client, by raw JSON-RPC lines, and by
the real Claude Code against the loopback model server, always against a real `corral up`."""

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult, TextContent

from actors.adapters import find_program
from corral.mcp_server import CONTROL_TOOLS, DECIDE_TOOLS, READ_TOOLS
from tests.conftest import ROOT, Cli, agent_command
from tests.helpers.model_server import ModelServer
from tests.test_adapters import isolated_env
from tests.test_approvals import wait_pending
from tests.test_control import detach, start_up, status, stop_up, wait_state, wait_until

EVERY_TOOL = {*READ_TOOLS, *CONTROL_TOOLS, *DECIDE_TOOLS}


def log_file(path: Path) -> TextIO:
    return path.open("a")


@asynccontextmanager
async def mcp_session(cli: Cli, role: str | None, tmp_path: Path) -> AsyncIterator[ClientSession]:
    """`corral mcp [--role ROLE]` started and spoken to by the SDK's stdio client (its stderr in a file)."""
    args = ["-m", "corral", "mcp", *(["--role", role] if role else [])]
    params = StdioServerParameters(command=sys.executable, args=args, env=cli.env, cwd=str(ROOT))
    with log_file(tmp_path / f"mcp-{role}.stderr") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


def text_of(result: CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


async def ok(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {text_of(result)}"
    return json.loads(text_of(result))


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool} was not refused: {text_of(result)}"
    return text_of(result)


def cli_error(cli: Cli, *args: str) -> str:
    """The one line the CLI prints for a refused command (without its `corral: error: ` prefix)."""
    done = cli(*args)
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    return line.removeprefix("corral: error: ")


def ps_ids(cli: Cli) -> set[str]:
    return {row["execution_id"] for row in json.loads(cli("ps", "--all", "--json", check=True).stdout)}


async def test_a_coordinator_runs_a_command_and_reads_it_back(cli: Cli, repo: Path, tmp_path: Path) -> None:
    up = start_up(cli)
    try:
        async with mcp_session(cli, "coordinator", tmp_path) as session:
            listed = await session.list_tools()
            assert {tool.name for tool in listed.tools} == EVERY_TOOL
            described = {tool.name: tool.description or "" for tool in listed.tools}
            assert "Refused by this server" in described["decide"]  # a coordinator never decides
            assert "Refused" not in described["run"]

            started = await ok(
                session,
                "run",
                repo=str(repo),
                command=[sys.executable, "-c", "print('hello from mcp')"],
                labels={"via": "mcp"},
            )
            execution_id = started["execution_id"]
            ended = await ok(session, "wait", execution_id=execution_id, timeout_s=120)
            assert (ended["state"], ended["exit_code"]) == ("exited", 0)
            assert execution_id in {row["execution_id"] for row in await ok(session, "list", all=True)}
            assert execution_id not in {row["execution_id"] for row in await ok(session, "list")}  # not running
            labelled = await ok(session, "list", all=True, label="via=mcp")
            assert [row["execution_id"] for row in labelled] == [execution_id]
            assert await ok(session, "list", all=True, label="via=mcp' OR '1'='1") == []  # quoted, not SQL
            assert (await ok(session, "status", execution_id=execution_id[:6]))["execution_id"] == execution_id
            lines = await ok(session, "logs", execution_id=execution_id, tail=5)
            assert [line["text"] for line in lines] == ["hello from mcp\n"]
            assert any(hit["execution_id"] == execution_id for hit in await ok(session, "search", query="hello from"))
            recorded = await ok(session, "events", execution_id=execution_id)
            kinds = [event["type"] for event in recorded["events"]]
            assert kinds[0] == "execution.requested" and "execution.exited" in kinds and "output" not in kinds
            assert recorded["last_seq"] == recorded["events"][-1]["seq"] and recorded["more"] is False
            one = await ok(session, "events", execution_id=execution_id, limit=1)
            assert (one["events"], one["more"]) == (recorded["events"][:1], True)
            after = await ok(session, "events", execution_id=execution_id, after_seq=one["last_seq"])
            assert after["events"] == recorded["events"][1:]  # polling from a last_seq misses nothing
            done = await ok(session, "events", execution_id=execution_id, after_seq=recorded["last_seq"])
            assert (done["events"], done["last_seq"]) == ([], recorded["last_seq"])
            exited = await ok(session, "events", execution_id=execution_id, types=["execution.exited"])
            assert [event["data"]["exit_code"] for event in exited["events"]] == [0]
            assert await ok(session, "changes", execution_id=execution_id) == []
            assert (await ok(session, "diff", execution_id=execution_id))["truncated"] is False
            assert await ok(session, "approvals") == []

            # Errors are tool errors carrying the client's one line: the same the CLI prints.
            assert await refused(session, "status", execution_id="zzzzzzzz") == cli_error(cli, "status", "zzzzzzzz")
            before = ps_ids(cli)
            missing = await refused(session, "run", repo=str(tmp_path / "nowhere"), command=["true"])
            assert "nowhere" in missing and "\n" not in missing
            assert "\n" not in await refused(session, "run", repo=str(repo))  # neither command nor agent
            assert ps_ids(cli) == before  # nothing was submitted
        assert execution_id in ps_ids(cli)
    finally:
        stop_up(cli, up)


async def test_roles_refuse_control_and_nothing_changes(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """Attack: a read-only server's agent tries every control tool, a coordinator's agent tries to approve
    the request it is waiting on; both are refused before the bus, and the execution and its approval
    are as they were. Then an operator decides and a coordinator cancels."""
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *agent_command("deploy the site", "--ask-approval", "deploy"))
        approval = wait_pending(cli, execution_id)
        approval_id = approval["approval_id"]
        before = ps_ids(cli)

        async with mcp_session(cli, None, tmp_path) as session:  # the default role: tap
            listed = await session.list_tools()
            refusing = {tool.name for tool in listed.tools if "Refused by this server" in (tool.description or "")}
            assert refusing == {*CONTROL_TOOLS, *DECIDE_TOOLS}
            for tool, arguments in (
                ("cancel", {"execution_id": execution_id}),
                ("input", {"execution_id": execution_id, "text": "quit"}),
                ("decide", {"approval_id": approval_id, "approve": True}),
                ("run", {"repo": str(repo), "command": ["true"]}),
            ):
                message = await refused(session, tool, **arguments)
                assert "role tap" in message and "--role" in message, message
            assert approval_id in {a["approval_id"] for a in await ok(session, "approvals")}  # reading is allowed

        async with mcp_session(cli, "coordinator", tmp_path) as session:
            message = await refused(session, "decide", approval_id=approval_id, approve=True, note="self-approved")
            assert "--role operator" in message
        assert wait_pending(cli, execution_id)["approval_id"] == approval_id  # still pending
        assert status(cli, execution_id)["state"] == "running"
        assert ps_ids(cli) == before

        async with mcp_session(cli, "operator", tmp_path) as session:
            granted = await ok(session, "decide", approval_id=approval_id, approve=True, note="go")
            assert granted["type"] == "approval.granted"
            again = await refused(session, "decide", approval_id=approval_id, approve=False)
            assert "already" in again or "granted" in again, again
        wait_state(cli, execution_id, "exited")

        long_id = detach(cli, repo, *agent_command("wait here", "--read-input"))
        wait_state(cli, long_id, "running")
        async with mcp_session(cli, "coordinator", tmp_path) as session:
            await ok(session, "input", execution_id=long_id, text="hello there")
            wait_until(lambda: "hello there" in cli("logs", long_id).stdout, 60, "the input to be echoed")
            await ok(session, "cancel", execution_id=long_id, reason="done with it", grace_s=5)
        assert status(cli, long_id)["state"] in ("exited", "failed")
    finally:
        stop_up(cli, up)


def rpc(process: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert process.stdin is not None
    process.stdin.write(json.dumps(message).encode() + b"\n")
    process.stdin.flush()


def answer(process: subprocess.Popen[bytes], request_id: int) -> dict[str, Any]:
    """The response to `request_id`; every line before it must be JSON-RPC too (stdout is the wire)."""
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        assert line, "corral mcp closed stdout"
        message = json.loads(line)  # anything but protocol on stdout fails here
        assert message.get("jsonrpc") == "2.0", line
        if message.get("id") == request_id:
            return message  # type: ignore[no-any-return]


def test_stdout_is_the_wire_and_sigterm_stops_the_server(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """No `corral up` runs: the server's client starts a system in-process, whose actors and the command
    it runs print; none of it reaches stdout. SIGTERM with stdin still open ends it, leaving nothing."""
    stderr = open(tmp_path / "mcp.stderr", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "mcp", "--role", "coordinator"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=cli.env,
        cwd=repo,  # a relative repo is the server's directory
    )
    try:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}
        rpc(process, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello})
        assert answer(process, 1)["result"]["serverInfo"]["name"] == "corral"
        rpc(process, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        command = [sys.executable, "-c", "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"]
        call = {"name": "run", "arguments": {"repo": ".", "command": command}}
        rpc(process, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        result = answer(process, 2)["result"]
        assert not result["isError"], result
        execution_id = json.loads(result["content"][0]["text"])["execution_id"]
        wait = {"name": "wait", "arguments": {"execution_id": execution_id, "timeout_s": 120}}
        rpc(process, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": wait})
        ended = json.loads(answer(process, 3)["result"]["content"][0]["text"])
        assert (ended["state"], ended["exit_code"]) == ("exited", 0)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert process.stdout is not None
        leftover = process.stdout.read()
        assert all(json.loads(line)["jsonrpc"] == "2.0" for line in leftover.splitlines()), leftover
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()
    [row] = [
        r for r in json.loads(cli("ps", "--all", "--json", check=True).stdout) if r["execution_id"] == execution_id
    ]
    assert Path(row["repo"]) == repo
    logged = cli("logs", execution_id, check=True)
    assert (logged.stdout, logged.stderr) == ("to stdout\n", "to stderr\n")  # the run's, in its log
    wait_until(lambda: not servers_of(cli), 30, "no corral mcp left")


def servers_of(cli: Cli) -> list[int]:
    """Live `corral mcp` processes of this test's CORRAL_HOME."""
    marker = f"CORRAL_HOME={cli.home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"mcp" in cmdline and b"corral" in cmdline and marker in environ and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_claude_code_starts_a_run_through_the_corral_mcp_server(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """The real Claude Code with `--mcp-config` naming `corral mcp`; the scripted model calls
    `mcp__corral__run`, and the run it starts is in `corral ps`, ran, and printed."""
    claude = find_program("claude")
    if claude is None:
        pytest.skip("claude is not installed (bash .ci/run installs it under .agents/); not run")
    up = start_up(cli)
    try:
        with ModelServer() as model:
            command = [sys.executable, "-c", "print('started by claude')"]
            model.http.state.tool_calls = [
                ("mcp__corral__run", {"repo": str(repo), "command": command, "labels": {"by": "claude"}})
            ]
            env, _ = isolated_env("claude-code", cli.env, tmp_path, model)
            # `claude -p` does not wait for MCP servers by default: on a loaded machine its first request
            # went out while `corral mcp` was still starting (status "pending"), without the tool
            env.update(MCP_CONNECTION_NONBLOCKING="0", MCP_TIMEOUT="120000")
            corral_env = {name: cli.env[name] for name in ("CORRAL_HOME", "CORRAL_NATS_URL")}
            server = {"command": sys.executable, "args": ["-m", "corral", "mcp", "--role", "coordinator"]}
            config = {"mcpServers": {"corral": {**server, "env": corral_env}}}
            done = subprocess.run(
                [
                    claude,
                    "-p",
                    "start a run of the command in the repository",
                    "--mcp-config",
                    json.dumps(config),
                    "--strict-mcp-config",
                    "--allowedTools",
                    "mcp__corral__run",
                    "--output-format",
                    "stream-json",
                    "--verbose",
                ],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"{done.stderr[-2000:]}\n{done.stdout[-3000:]}\n{model.explain()}"
            results = [
                block
                for request in model.requests
                if isinstance(request.body, dict)
                for message in request.body.get("messages") or []
                if isinstance(message.get("content"), list)
                for block in message["content"]
                if isinstance(block, dict) and block.get("type") == "tool_result"
            ]
            assert results, f"Claude Code never called the Corral tool: {model.explain()}\n{done.stdout[-3000:]}"
            result = results[-1]
            assert not result.get("is_error"), result
            content = result["content"]
            text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
            execution_id = json.loads(text)["execution_id"]
            assert model.leaks == []
        assert execution_id in ps_ids(cli)
        wait_state(cli, execution_id, "exited")
        assert cli("logs", execution_id, check=True).stdout == "started by claude\n"
        wait_until(lambda: not servers_of(cli), 30, "Claude Code to stop its corral mcp")
    finally:
        stop_up(cli, up)
