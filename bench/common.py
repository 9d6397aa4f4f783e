"""Helpers shared by the benchmarks that run agents under a real `corral up`.

CPU is read from /proc (utime + stime of a process, or of each of its threads), so a figure is
what the kernel charged, not what Python thinks it spent. `corral up` can be started under
cProfile that records only between two signals (SIGUSR1 starts, SIGUSR2 stops and writes), so a
profile covers the steady window and not the start-up:

    .venv/bin/python bench/common.py profile-up OUT.prof   # runs `corral up` (cwd, env as usual)
"""

import asyncio
import cProfile
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: Path) -> float:
    try:
        raw = path.read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far; gone processes count 0."""
    return sum(_stat_cpu(Path(f"/proc/{pid}/stat")) for pid in pids)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of a process: tid -> (thread name, seconds)."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads
    for tid in tids:
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        threads[int(tid)] = (name, _stat_cpu(task / "stat"))
    return threads


def main_thread_share(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> float:
    """CPU seconds the main thread (the asyncio loop) used between two `thread_cpu` samples."""
    return after.get(pid, ("", 0.0))[1] - before.get(pid, ("", 0.0))[1]


def pids_matching(text: str) -> list[int]:
    """Pids whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def nats_server_of(home: Path) -> list[int]:
    """The embedded nats-server of one CORRAL_HOME (its store path is on its command line)."""
    return [pid for pid in pids_matching("nats-server") if str(home) in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def make_repo(path: Path) -> Path:
    """A git repository with one commit, for the agents' worktrees."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("bench\n")
    git = ["git", "-C", str(path), "-c", "user.email=b@example.com", "-c", "user.name=b"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return path


def write_config(home: Path, max_running: int, *, idle: float | None = None) -> None:
    text = f"[spawner]\nmax_running = {max_running}\n"
    if idle is not None:
        text += f'[defaults]\nidle_timeout = "{idle}s"\non_stall = "notify"\n'
    home.mkdir(parents=True, exist_ok=True)
    (home / "corral.toml").write_text(text)


def start_up(home: Path, cwd: Path, *, profile: str | None = None) -> subprocess.Popen[bytes]:
    """Start `corral up` on CORRAL_HOME=home with its embedded NATS; optionally under the profiler."""
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_NATS_URL", None)
    command = [sys.executable, "-m", "corral", "up"]
    if profile:
        command = [sys.executable, str(Path(__file__).resolve()), "profile-up", profile]
    with open(home / "up.err", "wb") as err:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=str(cwd))


async def wait_ready(home: Path, up: subprocess.Popen[bytes], timeout_s: float = 60.0) -> str:
    """Wait until `corral up` published its address; return the NATS URL."""
    deadline = time.monotonic() + timeout_s
    runtime = home / "runtime.json"
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"corral up exited with {up.returncode}; see {home / 'up.err'}")
        if runtime.exists():
            data = json.loads(runtime.read_text() or "{}")
            if data.get("ready"):
                return str(data["url"])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"corral up was not ready within {timeout_s:.0f}s; see {home / 'up.err'}")


def stop_up(up: subprocess.Popen[bytes], label: str) -> None:
    """SIGTERM `corral up` and wait for it (it stops its agents first); kill it after 120 s."""
    up.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    try:
        up.wait(timeout=120)
        print(f"  corral up stopped {label} in {time.monotonic() - stopping:.1f}s", flush=True)
    except subprocess.TimeoutExpired:
        print(f"  corral up did not stop within 120s of SIGTERM ({label}); killed", flush=True)
        up.kill()
        up.wait()


async def connect_home(home: Path, url: str) -> Any:
    """A bus to the system of one CORRAL_HOME, as its operator (with the home's credentials, if any)."""
    from actors.bus import connect_bus

    try:
        from events.auth import client_credentials
    except ImportError:  # a Corral without NATS authorization
        return await connect_bus(url)
    return await connect_bus(url, credentials=client_credentials("operator", home))


async def sql(bus: Any, text: str, *, max_rows: int = 10000) -> list[Any]:
    """Run SQL through the running system's API (note: it makes the projector apply at once)."""
    reply = await bus.nc.request("corral.api.sql", json.dumps({"sql": text, "max_rows": max_rows}).encode(), timeout=60)
    answer = json.loads(reply.data)
    if not answer.get("ok", True):
        raise RuntimeError(f"sql failed: {answer.get('error')}")
    rows: list[Any] = answer.get("rows", [])
    return rows


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 100 else 1) if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def print_result(
    bench: str,
    figure: str,
    value: float | None,
    baseline: str,
    baseline_value: float | None,
    *,
    ratio: float | None,
    target: str,
    met: bool | None,
    **extra: Any,
) -> None:
    """A benchmark's last stdout line, after its human table: one JSON object a machine reads.

    `figure` names the headline figure (its key in the object), `baseline` the same figure of
    the baseline measured in the same run; `ratio` is as the bench's table prints it (its
    docstring says which way is better); `target` says the goal in words and `met` whether this
    run reached it (None: no target, or not judged at this size). bench/all.py reads these lines.
    """
    line = {
        "bench": bench,
        "figure": figure,
        figure: value,
        baseline: baseline_value,
        "ratio": ratio,
        "target": target,
        "met": met,
        **extra,
    }
    print(json.dumps(_rounded(line)), flush=True)


def profile_up(out: str) -> int:
    """Run `corral up` in this process; SIGUSR1 starts cProfile, SIGUSR2 stops it and writes `out`."""
    from corral.cli import main

    profiler = cProfile.Profile()

    def start(_sig: int, _frame: Any) -> None:
        profiler.enable()

    def stop(_sig: int, _frame: Any) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(["up"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "profile-up":
        sys.exit(profile_up(sys.argv[2]))
    sys.stderr.write("usage: bench/common.py profile-up OUT.prof\n")
    sys.exit(2)


# --- the raw baselines' DuckDB side (bench/ingest.py, bench/load.py) --------------------------------

RAW_EVENTS_DDL = (
    "CREATE TABLE events (seq UBIGINT, id VARCHAR, type VARCHAR, execution_id VARCHAR, "
    "ts TIMESTAMPTZ, actor VARCHAR, data JSON)"
)


def raw_events_table(seqs: list[int], payloads: list[bytes]) -> Any:
    """Event envelopes as a pyarrow table of the events columns (orjson, no Corral code)."""
    import orjson
    import pyarrow as pa

    docs = [orjson.loads(p) for p in payloads]
    return pa.table(
        {
            "seq": seqs,
            "id": [d["id"] for d in docs],
            "type": [d["type"] for d in docs],
            "execution_id": [d["execution_id"] for d in docs],
            "ts": [d["ts"] for d in docs],
            "actor": [d["actor"] for d in docs],
            "data": [orjson.dumps(d["data"]).decode() for d in docs],
        }
    )


def insert_raw_events(con: Any, arrow: Any) -> None:
    """One transaction inserting a raw_events_table into DuckDB's events table (Arrow scan)."""
    con.execute("BEGIN")
    con.execute("INSERT INTO events SELECT seq, id, type, execution_id, ts::TIMESTAMPTZ, actor, data FROM arrow")
    con.execute("COMMIT")
