"""actors/shimfork.py: shims forked from a warm process run like `python -m actors.shim`, outlive the
server, and the server dies with the process that started it."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from actors.shim import SPOOL, socket_address
from actors.shimfork import ForkedShim, ShimStarter
from events.ids import new_ulid


def spec_dir(root: Path, name: str, script: str) -> Path:
    run_dir = root / name
    cwd = root / f"{name}-worktree"
    run_dir.mkdir()
    cwd.mkdir()
    spec = {
        "execution_id": name,
        "request_id": new_ulid(),
        "command": ["bash", "-c", script],
        "agent": "command",
        "cwd": str(cwd),
        "env": {"PATH": os.environ["PATH"], "HOME": str(root)},
    }
    (run_dir / "spec.json").write_bytes(orjson.dumps(spec))
    (run_dir / SPOOL).touch()
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run_dir / SPOOL).read_bytes().splitlines()]


def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_forked_shim_runs_its_agent_and_outlives_the_server(tmp_path: Path) -> None:
    starter = ShimStarter(tmp_path)
    starter.open()
    try:
        first = asyncio.run(starter.start(spec_dir(tmp_path, "forkone1", "echo hello from the agent; exit 3")))
        assert isinstance(first, ForkedShim)
        assert first.wait(60) == 0 and first.poll() == 0
        kinds = [r["type"] for r in records(tmp_path / "forkone1")]
        assert kinds[0] == "execution.started" and kinds[-1] == "execution.exited"
        exited = records(tmp_path / "forkone1")[-1]["data"]
        assert exited["exit_code"] == 3
        assert any("hello from the agent" in r["data"].get("text", "") for r in records(tmp_path / "forkone1"))
        # A long agent: its shim is in a session of its own and lives on when the server stops.
        second = asyncio.run(starter.start(spec_dir(tmp_path, "forktwo2", "sleep 2; echo done")))
        assert isinstance(second, ForkedShim) and os.getsid(second.pid) == second.pid
        # found as `python -m actors.shim RUN_DIR` would be (tests and benches look for that line)
        cmdline = Path(f"/proc/{second.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f"-m actors.shim {tmp_path / 'forktwo2'}" in cmdline, cmdline
        assert starter.server is not None
        server = starter.server
    finally:
        starter.close()
    assert server.poll() is not None
    assert second.poll() is None  # the shim outlived the server
    second.wait(60)
    assert records(tmp_path / "forktwo2")[-1]["type"] == "execution.exited"
    assert asyncio.run(starter.start(tmp_path)) is None  # stopped: the spawner falls back to Popen


def test_the_server_dies_with_its_parent_and_refuses_what_is_not_a_run_directory(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from actors.shimfork import ShimStarter; "
        "s = ShimStarter(Path(sys.argv[1])); s.open(); print(s.server.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    wait_until(lambda: (tmp_path / "shimfork.sock").exists())
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmp_path / "shimfork.sock"))
        sock.sendall(b"/nonexistent/dir\n")
        assert sock.recv(100) == b"refused\n"
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state in ("Z", "X")

    wait_until(gone, 30)


def test_a_forked_shim_listens_before_its_pid_is_known(tmp_path: Path) -> None:
    """The fork server's child binds the shim's control socket before it answers: the spawner's
    watch connects at its first try. A quiet watch gets its answer and one byte when the agent's
    end is spooled (with the answer, if the end came first), then the end of the stream."""
    starter = ShimStarter(tmp_path)
    starter.open()
    try:
        for name in ("listen01", "listen02", "listen03"):
            run_dir = spec_dir(tmp_path, name, "exit 0")
            shim = asyncio.run(starter.start(run_dir))
            assert isinstance(shim, ForkedShim)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(socket_address(run_dir))  # at once: no ECONNREFUSED, no retry
            sock.sendall(b'{"op":"watch","quiet":true}\n')
            sock.settimeout(30)
            got = b""
            while chunk := sock.recv(100):
                got += chunk
            sock.close()
            assert got == b"\n\n", got
            assert shim.wait(60) == 0
    finally:
        starter.close()


def test_a_teardown_scripts_exit_status_is_its_own(tmp_path: Path) -> None:
    """The shim waits for its children on pidfds in its loop; its orphan reaper (SIGCHLD) must not
    take the teardown script's exit status first (it would be recorded as 255)."""
    starter = ShimStarter(tmp_path)
    starter.open()
    try:
        shims = []
        for n in range(12):
            run_dir = spec_dir(tmp_path, f"tear{n:04d}", "(sleep 0.1 &); exit 0")
            spec = orjson.loads((run_dir / "spec.json").read_bytes())
            (run_dir / "spec.json").write_bytes(orjson.dumps({**spec, "teardown": "exit 5"}))
            shim = asyncio.run(starter.start(run_dir))
            assert isinstance(shim, ForkedShim)
            shims.append((shim, run_dir))
        for shim, run_dir in shims:
            assert shim.wait(60) == 0
            finished = [r["data"] for r in records(run_dir) if r["type"] == "teardown.finished"]
            assert [f["exit_code"] for f in finished] == [5], finished
    finally:
        starter.close()
