"""Agents and oversized input (docs/security.md): real `corral up`, real agents, real signals.

- a request over the submit limit is refused with one line, nothing published; one published by
  another client (over the CLI's limit, under the stream's) still runs to its end;
- an output line larger than a spool window is recorded whole (in chunks) and the execution ends;
  an oversized control line is one protocol error;
- `corral input` of 1 MiB reaches the agent whole; one byte more is refused, naming the limit;
- a SIGTERM-ignoring agent paused for an approval and rejected writes nothing more;
- a run's (`--policy FILE`) and a template's approval keys apply.
"""

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from actors.bus import connect_bus
from actors.shim import MAX_INPUT_BYTES
from corral.commands import MAX_REQUEST_BYTES
from corral.server import EmbeddedServer
from events.envelope import new_event
from events.ids import new_execution_id, new_ulid
from events.types import ExecutionClaimed, ExecutionRequested
from tests.conftest import Cli, agent_command
from tests.test_approvals import wait_pending
from tests.test_control import detach, events, start_up, stop_up, wait_state, wait_until

PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\n"


def configure(cli: Cli, tmp_path: Path, text: str) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(text)
    cli.env["CORRAL_CONFIG"] = str(config)


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    """A tiny agent: `--` python FILE."""
    path = tmp_path / name
    path.write_text(body)
    return ["--", sys.executable, str(path)]


def data_of(event: dict[str, Any]) -> dict[str, Any]:
    data = event["data"]
    parsed: dict[str, Any] = json.loads(data) if isinstance(data, str) else data
    return parsed


def test_request_over_the_limit_is_refused_with_one_line(cli: Cli, repo: Path, tmp_path: Path) -> None:
    words = ", ".join(f'"{"x" * 100_000}"' for _ in range(20))  # a 2 MB command, as in the issue
    configure(cli, tmp_path, f'[templates.big]\ncommand = ["true", {words}]\n')
    refused = cli("run", "--repo", str(repo), "-t", "big")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"at most {MAX_REQUEST_BYTES} bytes" in refused.stderr and "nothing was started" in refused.stderr
    assert json.loads(cli("ps", "--all", "--json", check=True).stdout) == []


def test_request_published_past_the_cli_limit_still_ends(cli: Cli, repo: Path, nats_server: EmbeddedServer) -> None:
    """A client that skips the CLI's check: the 1.5 MB `execution.started` line is published whole."""
    up = start_up(cli)
    try:
        filler = tuple("y" * 100_000 for _ in range(15))  # under the kernel's argument limits
        request = ExecutionRequested(command=("sh", "-c", "echo started fine", "sh", *filler), repo=str(repo))
        execution_id = new_execution_id()

        async def publish() -> None:
            bus = await connect_bus(nats_server.url)
            try:
                await bus.publisher.publish(new_event(execution_id, request, actor="test"))
            finally:
                await bus.close()

        asyncio.run(publish())
        wait_until(lambda: cli("status", execution_id).returncode == 0, 60, "the request to be projected")
        final = wait_state(cli, execution_id, "exited", "failed")
        assert final["state"] == "exited" and final["exit_code"] == 0, final
        started = [data_of(e) for e in events(cli, execution_id) if e["type"] == "execution.started"]
        assert len(started) == 1 and list(started[0]["command"][4:]) == list(filler)
        assert "started fine" in cli("logs", execution_id, check=True).stdout
    finally:
        stop_up(cli, up)


def test_spool_line_over_the_event_limit_is_a_protocol_error(
    cli: Cli, repo: Path, tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    """A spool left by a shim (of another version) with a 5 MB line: the spawner that adopts it
    records a protocol error for that line and publishes the lines after it."""
    execution_id = new_execution_id()
    request = new_event(execution_id, ExecutionRequested(command=("true",), repo=str(repo)), actor="test")

    async def publish() -> None:
        bus = await connect_bus(nats_server.url)
        try:
            await bus.publisher.publish(request)
            claimed = ExecutionClaimed(spawner="gone", host="here")
            await bus.publisher.publish(new_event(execution_id, claimed, actor="test", causation_id=request.id))
        finally:
            await bus.close()

    asyncio.run(publish())
    run_dir = cli.home / "run" / execution_id
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps({"execution_id": execution_id, "request_id": request.id}))
    now = time.time()

    def record(kind: str, data: dict[str, Any]) -> str:
        return json.dumps({"id": new_ulid(), "ts": now, "type": kind, "data": data}) + "\n"

    started = {"pid": 1, "pgid": 1, "host": "h", "command": ["true"], "cwd": str(repo)}
    (run_dir / "spool.jsonl").write_text(
        record("execution.started", started)
        + record("output", {"stream": "stdout", "n": 1, "text": "z" * 5_000_000})
        + record("output", {"stream": "stdout", "n": 2, "text": "after the long line\n"})
        + record("execution.exited", {"exit_code": 0, "signal": None, "duration_s": 0.1, "reason": "exited"})
    )
    up = start_up(cli)
    try:
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        errors = [data_of(e) for e in events(cli, execution_id) if e["type"] == "protocol.error"]
        assert len(errors) == 1 and "longer than the largest event" in errors[0]["error"], errors
        assert errors[0]["line"].startswith('{"id": "') and len(errors[0]["line"]) <= 2000
        assert cli("logs", execution_id, check=True).stdout == "after the long line\n"
    finally:
        stop_up(cli, up)


def test_long_output_line_is_recorded_whole_and_the_run_returns(cli: Cli, repo: Path, tmp_path: Path) -> None:
    line = "".join(str(i % 10) for i in range(1_500_000))
    control = json.dumps({"corral": "heartbeat", "note": "n" * 200_000})
    command = script(
        tmp_path,
        "long.py",
        "import sys\n"
        f"sys.stderr.write({control!r} + '\\n'); sys.stderr.flush()\n"
        f"sys.stdout.write({line!r} + '\\n'); sys.stdout.flush()\n"
        "print('after the long line', flush=True)\n",
    )
    up = start_up(cli)
    try:
        run = cli("run", "--repo", str(repo), "-q", *command, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == line + "\nafter the long line\n"
        execution_id = json.loads(cli("ps", "--all", "--json", check=True).stdout)[0]["execution_id"]
        assert wait_state(cli, execution_id, "exited")["exit_code"] == 0
        recorded = [e for e in events(cli, execution_id) if e["type"] == "output"]
        texts = [data_of(e)["text"] for e in recorded if data_of(e)["stream"] == "stdout"]
        assert len(texts) > 1 and "".join(texts) == line + "\nafter the long line\n"
        errors = [data_of(e) for e in events(cli, execution_id) if e["type"] == "protocol.error"]
        assert len(errors) == 1 and "longer than 65536 bytes" in errors[0]["error"], errors
        assert errors[0]["line"].startswith('{"corral": "heartbeat"') and len(errors[0]["line"]) <= 2000
        assert "n" * 1000 not in cli("logs", execution_id, "--stream", "stderr", check=True).stdout
    finally:
        stop_up(cli, up)


def test_input_of_one_mib_is_delivered_whole_and_one_byte_more_is_refused(cli: Cli, repo: Path, tmp_path: Path) -> None:
    command = script(  # it writes what it read in its worktree: the sandbox lets it write nowhere else
        tmp_path,
        "reader.py",
        "import sys\n"
        f"data = sys.stdin.buffer.read({MAX_INPUT_BYTES})\n"
        "open('received.bin', 'wb').write(data)\n"
        "print(f'got {len(data)} bytes', flush=True)\n",
    )
    text = "".join(f"line {i:07d} of the input\n" for i in range(MAX_INPUT_BYTES // 26 + 1))[:MAX_INPUT_BYTES]
    exact = tmp_path / "exact.txt"
    exact.write_text(text)
    over = tmp_path / "over.txt"
    over.write_text(text + "!")
    up = start_up(cli)
    try:
        execution_id = detach(cli, repo, *command)
        wait_state(cli, execution_id, "running")
        refused = cli("input", execution_id, "--file", str(over))
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"{MAX_INPUT_BYTES + 1} bytes" in refused.stderr and f"at most {MAX_INPUT_BYTES} bytes" in refused.stderr

        sent = cli("input", execution_id, "--file", str(exact))
        assert sent.returncode == 0, sent.stderr
        assert f"delivered {MAX_INPUT_BYTES} bytes" in sent.stdout
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_code"] == 0
        assert (cli.home / "worktrees" / execution_id / "received.bin").read_bytes() == text.encode()
        delivered = [data_of(e) for e in events(cli, execution_id) if e["type"] == "input.delivered"]
        assert [d["bytes"] for d in delivered] == [MAX_INPUT_BYTES] and delivered[0]["text"] == text
        assert sum(e["type"] == "input.requested" for e in events(cli, execution_id)) == 1
    finally:
        stop_up(cli, up)


def test_rejected_agent_paused_for_an_approval_runs_no_further(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """The validator pauses an agent that wrote a private key; `corral reject` kills it where it stands."""
    configure(cli, tmp_path, '[checkpoints]\nafter_files = 1\ninterval = "1s"\n')
    ticks = tmp_path / "ticks.txt"
    command = script(
        tmp_path,
        "stubborn.py",
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open('id_rsa', 'w').write({PRIVATE_KEY!r})\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        f"    with open({str(ticks)!r}, 'a') as f:\n"
        "        f.write(f'tick {n}\\n')\n"
        "    time.sleep(0.05)\n",
    )
    up = start_up(cli)
    try:
        # Unsandboxed: its ticks go to tmp_path, outside its worktree (in the worktree, each tick
        # would be a checkpoint under after_files = 1, and change what is measured here).
        execution_id = detach(cli, repo, "--sandbox", "off", *command)
        approval = wait_pending(cli, execution_id)
        assert approval["source"] == "validator"
        wait_state(cli, execution_id, "paused")  # every process of the tree is stopped (checked in /proc)
        at_pause = ticks.read_text()
        assert at_pause.startswith("tick 1\n")

        cli("reject", approval["approval_id"], check=True)
        final = wait_state(cli, execution_id, "exited")
        assert final["exit_reason"] == "cancelled" and final["signal"] == 9, final
        assert ticks.read_text() == at_pause  # not one more tick after the decision
        kinds = [e["type"] for e in events(cli, execution_id)]
        assert "execution.resumed" not in kinds[kinds.index("execution.paused") :]
        cancels = [data_of(e) for e in events(cli, execution_id) if e["type"] == "cancel.requested"]
        assert cancels and all(c["grace_s"] == 0.0 and c["requested_by"] == "approver" for c in cancels), cancels
    finally:
        stop_up(cli, up)


def test_ordinary_cancel_takes_cancel_grace(cli: Cli, repo: Path, tmp_path: Path) -> None:
    configure(cli, tmp_path, '[defaults]\ncancel_grace = "1s"\n[templates.quick]\ncancel_grace = "2s"\n')
    up = start_up(cli)
    try:
        plain = detach(cli, repo, *agent_command("--ignore-term", "--read-input", "--steps", "1", "--sleep", "0"))
        quick = detach(
            cli, repo, "-t", "quick", *agent_command("--ignore-term", "--read-input", "--steps", "1", "--sleep", "0")
        )
        for execution_id, grace in ((plain, 1.0), (quick, 2.0)):
            wait_state(cli, execution_id, "running")
            spec = json.loads((cli.home / "run" / execution_id / "spec.json").read_text())
            assert spec["cancel_grace_s"] == grace  # the shim's grace after a hard timeout
            done = cli("cancel", execution_id, "--json", check=True)
            assert json.loads(done.stdout)["data"]["signal"] == 9  # SIGTERM ignored: killed after the grace
            cancels = [data_of(e) for e in events(cli, execution_id) if e["type"] == "cancel.requested"]
            assert [c["grace_s"] for c in cancels] == [grace]
    finally:
        stop_up(cli, up)


def test_run_and_template_approval_keys_apply(cli: Cli, repo: Path, tmp_path: Path) -> None:
    configure(cli, tmp_path, '[templates.strict.policy]\non_reject = "cancel"\n')
    run_policy = tmp_path / "run-policy.toml"
    run_policy.write_text('approval_timeout = "2s"\non_expire = "cancel"\n')
    up = start_up(cli)
    try:
        timed = detach(
            cli, repo, "--policy", str(run_policy), *agent_command("wait", "--ask-approval", "deploy", "--steps", "1")
        )
        strict = detach(cli, repo, "-t", "strict", *agent_command("push", "--ask-approval", "merge", "--steps", "1"))
        approval = wait_pending(cli, strict)
        cli("reject", approval["approval_id"], check=True)
        wait_state(cli, strict, "exited")  # told no, it may exit 3 itself before the kill lands

        def cancels_of(execution_id: str) -> list[dict[str, Any]]:
            return [data_of(e) for e in events(cli, execution_id) if e["type"] == "cancel.requested"]

        # on_reject = "cancel" of the template ([policy]'s default is "continue": no cancel at all)
        cancels: list[dict[str, Any]] = wait_until(lambda: cancels_of(strict), 30, "the template's on_reject")  # type: ignore[assignment]
        assert [(c["requested_by"], c["grace_s"]) for c in cancels] == [("approver", 0.0)], cancels
        assert "denied" in cancels[0]["reason"]

        # approval_timeout = "2s" of the run ([policy]'s default is 1 h)
        wait_until(
            lambda: any(e["type"] == "approval.expired" for e in events(cli, timed)), 60, "the run's 2 s approval"
        )
        wait_state(cli, timed, "exited")
        cancels = wait_until(lambda: cancels_of(timed), 30, "the run's on_expire")  # type: ignore[assignment]
        assert len(cancels) == 1 and "expired" in cancels[0]["reason"], cancels
    finally:
        stop_up(cli, up)
