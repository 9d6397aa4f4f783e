"""`corral wrap` and the Python heartbeat emitter, with real processes."""

import io
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.heartbeat import Heartbeater, format_heartbeat, heartbeat
from actors.output import CONTROL_PREFIX, OutputCoalescer, parse_control_line
from events.types import Heartbeat

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUSY_1S = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"  # 1 s of CPU


def wrap_cmd(*tool: str, interval: float = 0.2) -> list[str]:
    return [PY, "-m", "corral", "wrap", "--interval", str(interval), "--", *tool]


def run_wrap(*tool: str, interval: float = 0.2, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(wrap_cmd(*tool, interval=interval), cwd=ROOT, capture_output=True, timeout=60, **kw)  # type: ignore[call-overload, no-any-return]


def split_stderr(data: bytes) -> tuple[list[bytes], list[dict[str, object]]]:
    """The tool's stderr lines, and the wrapper's heartbeats (checked to parse as heartbeats)."""
    lines, beats = [], []
    for line in data.splitlines(keepends=True):
        if line.startswith(CONTROL_PREFIX):
            control = parse_control_line(line)
            assert control.error is None, control
            assert control.kind == "heartbeat"
            assert line.endswith(b"\n")
            beats.append(control.fields)
        else:
            lines.append(line)
    return lines, beats


def test_busy_tool_gets_wrapper_heartbeats() -> None:
    result = run_wrap(PY, "-c", BUSY_1S)
    assert result.returncode == 0, result.stderr
    lines, beats = split_stderr(result.stderr)
    assert lines == []
    assert len(beats) >= 1
    for fields in beats:
        assert fields["source"] == "wrapper"
        assert isinstance(fields["note"], str)
        assert str(fields["note"]).startswith("cpu ")
        Heartbeat(**fields)  # what the supervisor records: the fields fit the event type


def test_busy_grandchild_counts_as_progress() -> None:
    # The tool itself only waits; the CPU is spent by its child.
    tool = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BUSY_1S!r}])\n"
    result = run_wrap(PY, "-c", tool)
    assert result.returncode == 0, result.stderr
    _, beats = split_stderr(result.stderr)
    # The child's second of CPU is reported (all but what falls after the last tick); the
    # waiting tool alone uses a few hundredths of a second.
    reported = sum(float(str(b["note"]).split()[1].rstrip("s,")) for b in beats)
    assert reported >= 0.5, beats


@pytest.mark.skipif(shutil.which("sleep") is None, reason="no sleep(1) binary")
def test_sleeping_tool_gets_no_heartbeats() -> None:
    # sleep(1) uses well under a clock tick of CPU and writes nothing: it looks hung
    result = run_wrap("sleep", "1.5", interval=0.1)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


def test_python_tool_idle_after_startup_gets_no_more_heartbeats() -> None:
    # The interpreter's start-up CPU and the "ready" line are progress; the sleep after is not.
    tool = "import sys, time\nsys.stderr.write('ready\\n'); sys.stderr.flush()\ntime.sleep(2)\n"
    result = run_wrap(PY, "-c", tool, interval=0.1)
    assert result.returncode == 0, result.stderr
    data = result.stderr
    assert b"ready\n" in data
    _, beats_after = split_stderr(data[data.index(b"ready\n") + len(b"ready\n") :])
    # ~20 ticks while sleeping: a heartbeat on each would be a bug; the tick that saw the line
    # (and one straddling the tool's last instructions) may beat.
    assert len(beats_after) <= 2, beats_after


def test_stderr_output_counts_as_progress() -> None:
    tool = (
        "import sys, time\n"
        "for i in range(8):\n"
        "    sys.stderr.write(f'line {i}\\n'); sys.stderr.flush(); time.sleep(0.25)\n"
    )
    result = run_wrap(PY, "-c", tool, interval=0.1)
    assert result.returncode == 0, result.stderr
    lines, beats = split_stderr(result.stderr)
    assert lines == [f"line {i}\n".encode() for i in range(8)]
    assert any("output" in str(b["note"]) for b in beats)


def test_tool_stderr_lines_are_never_split_by_heartbeats() -> None:
    # Busy, with every line written in two halves: heartbeats are due all the time, partial
    # lines are seen all the time; every line must come out whole and in order.
    tool = (
        "import sys, time\n"
        "for i in range(300):\n"
        "    line = f'{i:04d} ' + 'x' * 200 + '\\n'\n"
        "    sys.stderr.write(line[:100]); sys.stderr.flush()\n"
        "    t = time.monotonic()\n"
        "    while time.monotonic() - t < 0.004: pass\n"
        "    sys.stderr.write(line[100:]); sys.stderr.flush()\n"
    )
    result = run_wrap(PY, "-c", tool, interval=0.02)
    assert result.returncode == 0, result.stderr
    lines, beats = split_stderr(result.stderr)
    assert lines == [(f"{i:04d} " + "x" * 200 + "\n").encode() for i in range(300)]
    assert len(beats) >= 1  # heartbeats were interleaved, whole, between lines


def test_partial_line_prompt_is_passed_on() -> None:
    tool = "import sys\nsys.stderr.write('Name? '); sys.stderr.flush()\nprint('hello', sys.stdin.readline().strip())\n"
    proc = subprocess.Popen(
        wrap_cmd(PY, "-c", tool), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while b"Name? " not in seen and time.monotonic() < deadline:
                if sel.select(1.0):
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        break
                    seen += chunk
        assert b"Name? " in seen, "the prompt (a line without newline) never came through"
        proc.stdin.write(b"bob\n")
        proc.stdin.close()
        assert proc.stdout.read() == b"hello bob\n"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_stdin_and_stdout_pass_through() -> None:
    tool = "import sys\nsys.stdout.write(sys.stdin.read().upper())\n"
    result = run_wrap(PY, "-c", tool, input=b"hello\nworld\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO\nWORLD\n"


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_code_passes_through(code: int) -> None:
    result = run_wrap(PY, "-c", f"raise SystemExit({code})")
    assert result.returncode == code, result.stderr


def test_tool_killed_by_signal_gives_128_plus_signal() -> None:
    result = run_wrap(PY, "-c", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.returncode == 128 + signal.SIGKILL


def _start_and_wait_ready(tool: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(wrap_cmd(PY, "-c", tool), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # the tool is up: the wrapper's handlers are in place
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded_to_the_tool(sig: signal.Signals) -> None:
    tool = (
        "import signal, sys, time\n"
        "def on(n, f):\n"
        "    print('got', n, flush=True); sys.exit(3)\n"
        f"signal.signal({int(sig)}, on)\n"
        "print('ready', flush=True)\n"
        # Short sleeps: CPython runs a Python handler only between bytecodes or when a sleep is
        # interrupted, so a signal landing just before a long sleep starts waits for its end.
        "for _ in range(600): time.sleep(0.1)\n"
    )
    proc = _start_and_wait_ready(tool)
    try:
        proc.send_signal(sig)  # to the wrapper only, not to its process group
        out, _ = proc.communicate(timeout=30)
        assert out == f"got {int(sig)}\n".encode()
        assert proc.returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_forwarded_sigterm_kills_tool_and_wrapper_exits_143() -> None:
    proc = _start_and_wait_ready("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM  # not -15: the wrapper itself was not killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_missing_tool_exits_127_with_one_error_line() -> None:
    result = run_wrap("corral-no-such-tool-xyz", "--flag")
    assert result.returncode == 127
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("corral: error: ")
    assert "corral-no-such-tool-xyz" in lines[0]


@pytest.mark.parametrize("rest", [[], ["--"]])
def test_no_command_is_a_usage_error(rest: list[str]) -> None:
    result = subprocess.run([PY, "-m", "corral", "wrap", *rest], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("corral: error: ")


def test_light_entry_point_behaves_the_same() -> None:
    result = subprocess.run(
        [PY, "-m", "corral.wrap", "--interval", "0.2", "--", PY, "-c", BUSY_1S + "raise SystemExit(4)\n"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 4
    _, beats = split_stderr(result.stderr)
    assert len(beats) >= 1


def test_wrapper_heartbeats_become_heartbeat_controls() -> None:
    # The supervisor's side: the wrapper's stderr through the same coalescer the spawner uses.
    result = run_wrap(PY, "-c", "import sys\nsys.stderr.write('before\\n'); sys.stderr.flush()\n" + BUSY_1S)
    coalescer = OutputCoalescer(parse_control=True)
    chunks, controls = coalescer.feed(result.stderr)
    last, more = coalescer.finish()
    text = "".join(chunks) + (last or "")
    assert text == "before\n"
    controls += more
    assert controls
    assert all(c.kind == "heartbeat" and c.error is None for c in controls)
    assert all(Heartbeat(**c.fields).source == "wrapper" for c in controls)


# the Python emitter


def test_heartbeat_line_format() -> None:
    out = io.StringIO()
    heartbeat("cloning\nthe repo", 0.25, stream=out)
    heartbeat(stream=out)
    heartbeat(source="wrapper", stream=out)
    lines = out.getvalue().encode().splitlines(keepends=True)
    assert len(lines) == 3
    parsed = [parse_control_line(line) for line in lines]
    assert [p.kind for p in parsed] == ["heartbeat"] * 3
    assert parsed[0].fields == {"note": "cloning\nthe repo", "progress": 0.25}
    assert parsed[1].fields == {}
    assert parsed[2].fields == {"source": "wrapper"}
    for p in parsed:
        Heartbeat(**p.fields)


@pytest.mark.parametrize(("kwargs"), [{"progress": float("nan")}, {"source": "someone"}])
def test_heartbeat_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        format_heartbeat(**kwargs)  # type: ignore[arg-type]


def test_heartbeats_from_threads_never_split_lines_on_real_stderr() -> None:
    # A process writing long stderr lines from several threads while a Heartbeater beats fast.
    agent = (
        "import sys, threading, time\n"
        "from actors.heartbeat import Heartbeater, heartbeat\n"
        "def talk(k):\n"
        "    for i in range(200):\n"
        "        sys.stderr.write(f'{k}-{i:03d} ' + 'y' * 300 + '\\n')\n"
        "    heartbeat(f'thread {k} done', progress=1.0)\n"
        "with Heartbeater(interval=0.001, note='working') as beat:\n"
        "    threads = [threading.Thread(target=talk, args=(k,)) for k in range(4)]\n"
        "    [t.start() for t in threads]; [t.join() for t in threads]\n"
        "    beat.update(progress=0.5)\n"
        "    time.sleep(0.05)\n"
    )
    result = subprocess.run([PY, "-c", agent], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines, beats = split_stderr(result.stderr)
    expected = sorted(f"{k}-{i:03d} ".encode() + b"y" * 300 + b"\n" for k in range(4) for i in range(200))
    assert sorted(lines) == expected
    assert {"note": "working"} in beats
    assert sum(1 for b in beats if str(b.get("note", "")).startswith("thread ")) == 4


def test_heartbeater_stops() -> None:
    out = io.StringIO()
    beat = Heartbeater(interval=0.01, note="n", stream=out).start()
    time.sleep(0.1)
    beat.stop()
    written = out.getvalue()
    assert written.count("\n") >= 1
    time.sleep(0.05)
    assert out.getvalue() == written  # nothing after stop()


def test_heartbeater_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        Heartbeater(interval=0)
