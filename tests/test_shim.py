"""The per-agent shim's cheap paths: one wake-up per line, coalescing, quiet watches, spool
notification through inotify, control-line parsing and event ids (issue 3: supervision cost).

Shims here are real `python -m actors.shim` processes running real (bash) agents; the spawner
tests run a real Spawner against a real nats-server.
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

import actors.spawner as spawner_module
from actors.bus import Bus
from actors.output import OutputCoalescer
from actors.shim import SPOOL, SpoolWatch, request, socket_address
from actors.spawner import Spawner
from events.envelope import new_event
from events.ids import _CROCKFORD, new_execution_id, new_ulid
from events.subjects import event_subject
from events.types import ExecutionRequested
from replay.history import follow
from tests.conftest import ROOT

# A bash agent that writes without forking: `read -t` on a descriptor that never has data sleeps.
SLEEPER = "exec 3<> <(:)\n"


def start_shim(tmp_path: Path, script: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A real shim for a bash agent running `script`; returns it and its run directory."""
    run_dir = tmp_path / "run"
    cwd = tmp_path / "worktree"
    run_dir.mkdir()
    cwd.mkdir()
    spec = {
        "execution_id": "shimtest",
        "request_id": new_ulid(),
        "command": ["bash", "-c", SLEEPER + script],
        "agent": "command",
        "cwd": str(cwd),
        "env": {"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    }
    (run_dir / "spec.json").write_bytes(orjson.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(run_dir / "shim.log", "ab") as log:
        shim = subprocess.Popen(
            [sys.executable, "-m", "actors.shim", str(run_dir)],
            cwd=run_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    return shim, run_dir


def spool_records(run_dir: Path) -> list[dict]:
    path = run_dir / SPOOL
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def voluntary_switches(pid: int) -> int:
    """How often the shim's main thread went to sleep (each sleep ends in one wake-up)."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    match = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, flags=re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def finish(shim: subprocess.Popen[bytes]) -> None:
    try:
        shim.wait(timeout=30)
    except subprocess.TimeoutExpired:
        shim.kill()
        shim.wait()
        raise


def test_shim_wakes_once_per_line_of_an_agent_that_writes_now_and_then(tmp_path: Path) -> None:
    """A line is recorded from the read that brought it: no flush timer per line (the old shim
    slept twice per line: for the pipe, then for a 50 ms timer)."""
    lines = 24
    shim, run_dir = start_shim(
        tmp_path, f"for i in $(seq 1 {lines}); do echo line $i; read -t 0.15 -u 3; done; read -t 0.5 -u 3\n"
    )
    try:

        def outputs() -> int:
            return sum(1 for r in spool_records(run_dir) if r["type"] == "output")

        wait_for(lambda: outputs() >= 3, 30, "the first lines")
        first, before = outputs(), voluntary_switches(shim.pid)
        wait_for(lambda: outputs() >= lines - 1, 30, "the last lines")
        last, after = outputs(), voluntary_switches(shim.pid)
    finally:
        finish(shim)
    assert last > first
    per_line = (after - before) / (last - first)
    assert per_line < 1.5, f"the shim slept {per_line:.2f} times per line"
    texts = [r["data"]["text"] for r in spool_records(run_dir) if r["type"] == "output"]
    assert "".join(texts) == "".join(f"line {i}\n" for i in range(1, lines + 1))


def test_shim_still_gathers_a_chatty_agents_lines_into_chunks(tmp_path: Path) -> None:
    lines = 200
    shim, run_dir = start_shim(tmp_path, f"for i in $(seq 1 {lines}); do echo line $i; read -t 0.005 -u 3; done\n")
    finish(shim)
    records = spool_records(run_dir)
    chunks = [r["data"]["text"] for r in records if r["type"] == "output"]
    assert "".join(chunks) == "".join(f"line {i}\n" for i in range(1, lines + 1)), "every line once, in order"
    assert all(chunk.endswith("\n") for chunk in chunks), "chunks are cut at line ends"
    # ~1 s of writing at a chunk per 50 ms at most; one chunk per write would be 200.
    assert len(chunks) <= lines // 3, f"{len(chunks)} chunks for {lines} lines"
    assert [r["data"]["n"] for r in records if r["type"] == "output"] == list(range(1, len(chunks) + 1))
    assert records[-1]["type"] == "execution.exited"


def test_shim_records_control_lines_and_repeats_of_them(tmp_path: Path) -> None:
    script = (
        'echo \'{"corral":"heartbeat"}\' >&2\n'
        'echo \'{"corral":"heartbeat"}\' >&2\n'
        "read -t 0.05 -u 3\n"
        'echo \'{"corral":"heartbeat","note":"half","progress":0.5}\' >&2\n'
        'echo \'{"corral":"heartbeat"}\' >&2\n'
        'echo \'{"corral":"heartbeat","colour":"red"}\' >&2\n'
        "printf 'prompt ' >&2; read -t 0.05 -u 3; echo '{\"corral\":\"heartbeat\"}' >&2\n"
        "echo '{\"corral\": broken' >&2\n"
        "echo done\n"
    )
    shim, run_dir = start_shim(tmp_path, script)
    finish(shim)
    records = spool_records(run_dir)
    beats = [r["data"] for r in records if r["type"] == "heartbeat"]
    assert beats == [
        {"source": "agent"},
        {"source": "agent"},
        {"source": "agent", "note": "half", "progress": 0.5},
        {"source": "agent"},
    ]
    errors = [r["data"]["error"] for r in records if r["type"] == "protocol.error"]
    assert len(errors) == 2
    assert "colour" in errors[0] and errors[1].startswith("not JSON")
    stderr = "".join(r["data"]["text"] for r in records if r["type"] == "output" and r["data"]["stream"] == "stderr")
    assert stderr == 'prompt {"corral":"heartbeat"}\n', "a control line must start a line"
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids) and ids == sorted(ids), "ids are unique and in spool order"


def test_coalescer_fast_path_keeps_the_line_rules() -> None:
    heartbeat = b'{"corral":"heartbeat"}\n'
    coalescer = OutputCoalescer(parse_control=True)
    first = coalescer.feed(heartbeat)
    second = coalescer.feed(heartbeat)
    assert first[0] == second[0] == [] and first[1][0].kind == second[1][0].kind == "heartbeat"
    assert coalescer.pending_bytes == 0 and not coalescer.flushable
    assert coalescer.feed(b"partial ")[1] == []
    assert not coalescer.flushable, "a partial line alone is not ready"
    _, controls = coalescer.feed(heartbeat)
    assert controls == [] and coalescer.flushable
    assert coalescer.flush() == 'partial {"corral":"heartbeat"}\n'
    _, controls = coalescer.feed(b'{"corral":"approval_needed","question":"ok?"}\n' + heartbeat)
    assert [c.kind for c in controls] == ["approval_needed", "heartbeat"]
    assert controls[0].fields == {"question": "ok?"}
    assert coalescer.feed(b'{"corral": nope}\n')[1][0].error is not None


def _watch(run_dir: Path, op: bytes) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_address(run_dir))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    sock.sendall(op)
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    got = b""
    sock.settimeout(60)
    while chunk := sock.recv(65536):
        got += chunk
    sock.close()
    return got


def test_quiet_watch_gets_no_byte_per_append_and_a_plain_one_does(tmp_path: Path) -> None:
    """A spawner that watches spools with inotify asks for a quiet watch; an older spawner's plain
    watch still gets a byte per spool append (the protocol stays compatible both ways)."""
    shim, run_dir = start_shim(tmp_path, "read -t 1 -u 3\nfor i in 1 2 3 4 5; do echo $i; read -t 0.1 -u 3; done\n")
    quiet = _watch(run_dir, b'{"op":"watch","quiet":true}\n')
    plain = _watch(run_dir, b'{"op":"watch"}\n')
    quiet_got, plain_got = _read_to_end(quiet), _read_to_end(plain)
    finish(shim)
    appended = len(spool_records(run_dir))
    assert quiet_got == b"\n\n", "a quiet watch sees its answer, one byte at the agent's end, then the end"
    assert plain_got.count(b"\n") >= appended - 1  # (the first record may precede the connection)


def test_spool_watch_reports_appends_by_another_process(tmp_path: Path) -> None:
    watch = SpoolWatch.open()
    assert watch is not None, "inotify is available on Linux"
    try:
        spools = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
        for spool in spools:
            spool.touch()
        wds = [watch.add(spool) for spool in spools]
        assert None not in wds and wds[0] != wds[1]
        assert watch.read() == set()
        subprocess.run(["sh", "-c", f"echo x >> {spools[1]}; echo y >> {spools[1]}"], check=True)
        assert watch.read() == {wds[1]}
        assert watch.read() == set(), "read once"
        assert wds[0] is not None
        watch.remove(wds[0])
        with open(spools[0], "ab") as spool:
            spool.write(b"z\n")
        assert wds[0] not in (watch.read() or set())
    finally:
        watch.close()


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "bytes"])
async def test_spawner_publishes_a_running_agents_output_as_it_comes(
    bus: Bus, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    """Output is published while the agent runs, without the pump's periodic full read: through
    inotify, or through the watch bytes of a plain watch where inotify is not available."""
    monkeypatch.setattr(spawner_module, "SAVE_OFFSET_EVERY_S", 3600.0)  # no safety-net read
    if not inotify:
        monkeypatch.setattr(SpoolWatch, "open", classmethod(lambda cls: None))
    spawner = Spawner(bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run", instance="spawner-t")
    execution_id = new_execution_id()
    seen: list[str] = []
    await spawner.start()
    try:
        assert (spawner._spool_watch is not None) is inotify
        script = 'read line; echo "got $line"; echo \'{"corral":"heartbeat"}\' >&2; read more; echo bye'
        request = ExecutionRequested(command=("bash", "-c", script), repo=str(repo))
        await bus.publisher.publish(new_event(execution_id, request, actor="test"))

        async def started(seq: int, msg) -> bool:
            return msg.subject == event_subject(execution_id, "execution.started")

        await asyncio.wait_for(follow(bus.js, event_subject(execution_id, ">"), started), 60)
        run_dir = tmp_path / "run" / execution_id
        reply = await request_input(run_dir, "hello")
        assert reply["ok"], reply

        async def output(seq: int, msg) -> bool:
            data = orjson.loads(msg.data)
            seen.append(data["type"])
            return data["type"] == "output" and data["data"]["text"] == "got hello\n"

        # The agent now waits for more input: only a spool watch can bring this line out.
        await asyncio.wait_for(follow(bus.js, event_subject(execution_id, ">"), output), 30)
        assert "output" in seen
        reply = await request_input(run_dir, "end")
        assert reply["ok"], reply

        async def exited(seq: int, msg) -> bool:
            return msg.subject == event_subject(execution_id, "execution.exited")

        await asyncio.wait_for(follow(bus.js, event_subject(execution_id, ">"), exited), 30)
    finally:
        await spawner.stop()


async def test_an_agents_end_is_published_without_the_pumps_gather(
    bus: Bus, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump gathers appends for PUMP_GATHER_S after a wake-up; an agent's end does not wait for
    it (its acknowledgement frees a slot): the shim's byte on the quiet watch, or the watch's end,
    starts the pass at once. With a 60 s gather, the end is stored well before it."""
    monkeypatch.setattr(spawner_module, "PUMP_GATHER_S", 60.0)
    monkeypatch.setattr(spawner_module, "SAVE_OFFSET_EVERY_S", 3600.0)
    spawner = Spawner(bus, worktrees=tmp_path / "wt", run_root=tmp_path / "run", instance="spawner-t")
    await spawner.start()
    try:
        assert spawner._spool_watch is not None
        for script in ("true", "sleep 1"):  # (ends before the watch connects, and after)
            execution_id = new_execution_id()
            request = ExecutionRequested(command=("sh", "-c", script), repo=str(repo))
            await bus.publisher.publish(new_event(execution_id, request, actor="test"))

            async def exited(seq: int, msg, execution_id: str = execution_id) -> bool:
                return msg.subject == event_subject(execution_id, "execution.exited")

            await asyncio.wait_for(follow(bus.js, event_subject(execution_id, ">"), exited), 30)
    finally:
        await spawner.stop()


async def request_input(run_dir: Path, text: str) -> dict:
    return await request(run_dir, {"op": "input", "text": text + "\n"})


def _reference_ulid(ms: int, random80: int) -> str:
    value = (ms << 80) | random80
    return "".join(_CROCKFORD[(value >> (5 * (25 - i))) & 31] for i in range(26))


def test_ulids_are_valid_monotonic_and_unique_per_process() -> None:
    now_ms = int(time.time() * 1000)
    ids = [new_ulid(now_ms) for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "ids of one millisecond sort in creation order"
    for ulid in (ids[0], ids[-1], new_ulid()):
        assert len(ulid) == 26 and set(ulid) <= set(_CROCKFORD) and ulid[0] <= "7"
        value = 0
        for char in ulid:
            value = value * 32 + _CROCKFORD.index(char)
        assert _reference_ulid(value >> 80, value & ((1 << 80) - 1)) == ulid
    assert all(ulid[:10] == _reference_ulid(now_ms, 0)[:10] for ulid in ids), "the time part is the millisecond"
    assert new_ulid(1000) < new_ulid(2000)
    assert new_ulid(0).startswith("0000000000")
    assert new_ulid(2**48 - 1)[:10] == "7ZZZZZZZZZ"


def test_forked_processes_draw_their_own_ulid_sequence() -> None:
    """The random part is a per-process seed plus a counter: a forked child must not continue its
    parent's sequence (two processes would publish the same event ids)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        os.write(write_end, ",".join(new_ulid(5000) for _ in range(3)).encode())
        os._exit(0)
    os.close(write_end)
    parent = [new_ulid(5000) for _ in range(3)]
    with os.fdopen(read_end, "rb") as reader:
        child = reader.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(child) == 3
    assert not set(child) & set(parent)
    assert child[0][10:20] != parent[0][10:20], "the child's random part starts elsewhere"


TREE_SCRIPT = r"""
import ctypes, os, subprocess, sys, threading, time
from actors import shim

ctypes.CDLL(None, use_errno=True).prctl(shim.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
# the agent: a child, a grandchild in a session of its own, and an orphan (its parent exits)
agent = subprocess.Popen(
    ["sh", "-c", "sleep 60 & setsid sleep 61 & (sleep 62 &) ; exec sleep 63"], start_new_session=True
)
# a child started from another thread (still alive): listed in that thread's children, not the main one's
started: list[subprocess.Popen[bytes]] = []
finish = threading.Event()
worker = threading.Thread(target=lambda: (started.append(subprocess.Popen(["sleep", "64"])), finish.wait()))
worker.start()
while not started:
    time.sleep(0.01)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    tree = shim.process_tree(os.getpid(), agent.pid)
    others = [pid for pid in tree if pid not in (agent.pid, started[0].pid)]
    if len(tree) == 5 and any(shim._read_stat(pid)[1] == os.getpid() for pid in others):
        break  # the orphan is re-parented to this subreaper
    time.sleep(0.02)
scanned = shim._scan_tree(os.getpid(), agent.pid)
print(sorted(tree) == sorted(scanned), len(tree), started[0].pid in tree, flush=True)
finish.set()
worker.join()
# an orphan that ends is reaped; the agent, ended too, is left to whoever waits for it
orphans = [pid for pid in tree if shim._read_stat(pid)[1] == os.getpid() and pid not in (agent.pid, started[0].pid)]
os.kill(orphans[0], 9)
os.kill(agent.pid, 9)
time.sleep(0.3)
shim.reap_orphans(agent.pid)
print(shim._read_stat(orphans[0]) is None, shim._read_stat(agent.pid)[0], agent.wait(), flush=True)
shim.signal_pids(shim.process_tree(os.getpid(), None), 9)
started[0].wait()
"""


def test_process_tree_finds_orphans_and_children_of_other_threads(tmp_path: Path) -> None:
    """The tree is found through /proc's children lists (not a read of every process): the same
    processes as the full scan, an orphan re-parented to the shim (a subreaper) and a child started
    from another thread of it included; reap_orphans collects an ended orphan, never the agent."""
    script = tmp_path / "tree.py"
    script.write_text(TREE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True 5 True", "True Z -9"]
