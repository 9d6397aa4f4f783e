"""Supervision benchmark: N heartbeating toy agents under a real `corral up`.

For each N it measures, over a steady window once every agent runs:
- Corral's own CPU share: the `corral up` process (spawner, watchdog, projector) plus every
  per-execution shim, as a % of one core (nats-server is reported beside it, not in it);
- the baseline, measured in the same run: a bare asyncio supervisor with no Corral code that
  starts the same agents with pipes and only reads and discards their output;
- idle-detection latency: a tenth of the agents go silent; the time from each one's last
  heartbeat to its `execution.stalled` event, minus the idle timeout (target: <= 1 s).

    .venv/bin/python bench/supervise.py [--agents 100,250,500] [--window 20] [--idle 3]

BENCH_PROFILE=FILE records a py-spy profile of `corral up` over the window (needs py-spy on PATH).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.bus import connect_bus
from events.envelope import new_event
from events.ids import new_execution_id
from events.types import ExecutionRequested, Timeouts

TICKS = os.sysconf("SC_CLK_TCK")
# A toy agent in bash: an output line and a heartbeat every second, no fork per beat.
# With SILENT_AFTER=k it stops writing after k beats and just waits (a stalled agent).
AGENT = r"""
exec 3<> <(:)
i=0
while :; do
  i=$((i+1))
  if [ -n "$SILENT_AFTER" ] && [ "$i" -gt "$SILENT_AFTER" ]; then read -t 600 -u 3; continue; fi
  echo "beat $i"
  echo '{"corral":"heartbeat"}' >&2
  read -t 1 -u 3
done
"""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def pids_matching(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("bench\n")
    git = ["git", "-C", str(path), "-c", "user.email=b@example.com", "-c", "user.name=b"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return path


def start_up(env: dict[str, str], home: Path, root: Path) -> subprocess.Popen[bytes]:
    with open(home / "up.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "corral", "up"], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=str(root)
        )


async def sql(bus: Any, text: str) -> list[Any]:
    reply = await bus.nc.request("corral.api.sql", json.dumps({"sql": text}).encode(), timeout=60)
    rows: list[Any] = json.loads(reply.data).get("rows", [])
    return rows


async def measure_corral(n: int, window: float, idle: float, root: Path) -> dict[str, float]:
    home = root / f"home-{n}"
    home.mkdir()
    (home / "corral.toml").write_text(
        f'[spawner]\nmax_running = {n + 10}\n[defaults]\nidle_timeout = "{idle}s"\non_stall = "notify"\n'
    )
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_NATS_URL", None)
    up = start_up(env, home, root)
    try:
        for _ in range(400):
            runtime = home / "runtime.json"
            if runtime.exists() and json.loads(runtime.read_text()).get("ready"):
                break
            await asyncio.sleep(0.05)
        url = json.loads((home / "runtime.json").read_text())["url"]
        bus = await connect_bus(url)
        repo = make_repo(root / f"repo-{n}")
        silent = max(1, n // 10)
        beats_before_silence = int(window) + 30  # goes silent during the measuring window
        started = time.monotonic()
        for i in range(n):
            request = ExecutionRequested(
                command=("bash", "-c", AGENT),
                repo=str(repo),
                env={"SILENT_AFTER": str(beats_before_silence)} if i < silent else {},
                timeouts=Timeouts(idle=idle),
            )
            await bus.publisher.publish(new_event(new_execution_id(), request, actor="bench"))
        # Wait until every agent runs.
        last_report = started
        while (running := len(pids_matching("read -t 1 -u 3"))) < n:
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                states = await sql(bus, "SELECT state, count(*) FROM executions GROUP BY 1 ORDER BY 1")
                print(f"  {n} agents: {running} running after {last_report - started:.0f}s; {states}", flush=True)
            if time.monotonic() - started > 600:
                raise RuntimeError(f"agents did not all start within 600s: {running} of {n}")
            await asyncio.sleep(0.5)
        ramp = time.monotonic() - started
        await asyncio.sleep(3)
        shims = pids_matching(f"actors.shim {home}")
        corral = [up.pid, *shims]
        nats = pids_matching("nats-server")
        nats = [p for p in nats if str(home) in Path(f"/proc/{p}/cmdline").read_text()]
        c0, n0, s0, t0 = cpu_seconds(corral), cpu_seconds(nats), cpu_seconds(shims), time.monotonic()
        if os.environ.get("BENCH_PROFILE"):
            subprocess.Popen(["py-spy", "record", "-p", str(up.pid), "-d", str(int(window)), "-o",
                              os.environ["BENCH_PROFILE"], "-f", "raw"])
        await asyncio.sleep(window)
        c1, n1, s1, t1 = cpu_seconds(corral), cpu_seconds(nats), cpu_seconds(shims), time.monotonic()
        # Stalls: the silent agents stop after beats_before_silence beats; wait for their stalled events.
        deadline = time.monotonic() + beats_before_silence + idle + 60
        latencies: list[float] = []
        while time.monotonic() < deadline:
            reply = await bus.nc.request(
                "corral.api.sql",
                json.dumps(
                    {
                        "sql": "SELECT s.ts, (SELECT max(ts) FROM events a WHERE a.execution_id = s.execution_id "
                        "AND a.type IN ('output', 'heartbeat') AND a.seq < s.seq) AS last_activity "
                        "FROM events s WHERE s.type = 'execution.stalled'",
                        "max_rows": 100000,
                    }
                ).encode(),
                timeout=60,
            )
            rows = json.loads(reply.data)["rows"]
            if len(rows) >= silent:
                from datetime import datetime

                latencies = [
                    (datetime.fromisoformat(ts) - datetime.fromisoformat(last)).total_seconds() - idle
                    for ts, last in rows
                ]
                break
            await asyncio.sleep(1)
        await bus.close()
        return {
            "ramp_s": ramp,
            "corral_cpu": (c1 - c0) / (t1 - t0) * 100,
            "nats_cpu": (n1 - n0) / (t1 - t0) * 100,
            "shims_cpu": (s1 - s0) / (t1 - t0) * 100,
            "shims": len(corral) - 1,
            "stalls": len(latencies),
            "expected_stalls": silent,
            "stall_p50": statistics.median(latencies) if latencies else float("nan"),
            "stall_max": max(latencies) if latencies else float("nan"),
        }
    finally:
        up.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        try:
            up.wait(timeout=120)
            print(f"  corral up stopped {n} agents and itself in {time.monotonic() - stopping:.1f}s", flush=True)
        except subprocess.TimeoutExpired:
            print(f"  corral up did not stop within 120s of SIGTERM with {n} agents; killed", flush=True)
            up.kill()
            up.wait()


async def measure_baseline(n: int, window: float) -> float:
    """A bare supervisor: same agents, pipes read and discarded, no Corral code."""

    async def drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    processes = []
    tasks = []
    for _ in range(n):
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            AGENT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        processes.append(process)
        assert process.stdout is not None
        assert process.stderr is not None
        tasks += [asyncio.create_task(drain(process.stdout)), asyncio.create_task(drain(process.stderr))]
    await asyncio.sleep(3)
    me = [os.getpid()]
    c0, t0 = cpu_seconds(me), time.monotonic()
    await asyncio.sleep(window)
    c1, t1 = cpu_seconds(me), time.monotonic()
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        await process.wait()
    for task in tasks:
        task.cancel()
    return (c1 - c0) / (t1 - t0) * 100


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", default="100,250,500")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of steady state measured")
    parser.add_argument("--idle", type=float, default=3.0, help="idle timeout of every agent")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="corral-supervise-"))
    print(
        f"{'agents':>6} {'ramp':>7} {'corral cpu':>11} {'baseline cpu':>13} {'ratio':>6} {'nats cpu':>9} "
        f"{'stalls':>7} {'stall p50':>10} {'stall max':>10}"
    )
    try:
        for n in (int(x) for x in args.agents.split(",")):
            baseline = await measure_baseline(n, args.window)
            result = await measure_corral(n, args.window, args.idle, root)
            ratio = result["corral_cpu"] / baseline if baseline else float("inf")
            print(
                f"{n:>6} {result['ramp_s']:>6.1f}s {result['corral_cpu']:>10.1f}% {result['shims_cpu']:>7.1f}% "
                f"{baseline:>12.1f}% "
                f"{ratio:>5.1f}x {result['nats_cpu']:>8.1f}% {result['stalls']:>3}/{result['expected_stalls']:<3} "
                f"{result['stall_p50']:>+9.2f}s {result['stall_max']:>+9.2f}s",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
