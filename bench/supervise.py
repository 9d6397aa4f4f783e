"""Supervision benchmark: N heartbeating toy agents under a real `corral up`.

For each N it measures, over a steady window once every agent runs:
- Corral's own CPU share: the `corral up` process (spawner, watchdog, projector) plus every
  per-execution shim, as a % of one core (nats-server is reported beside it, not in it), with
  the shims' part and the part of `corral up`'s main thread (its asyncio loop: spawner, watchdog,
  publisher; the rest of `corral up` is mostly the projector's DuckDB work in other threads);
- the baseline, measured in the same run: a bare asyncio supervisor with no Corral code that
  starts the same agents with pipes and only reads and discards their output;
- idle-detection latency: a tenth of the agents go silent; the time from each one's last
  heartbeat to its `execution.stalled` event, minus the idle timeout (target: <= 1 s). The
  beating agents' stalls are counted apart: real (the agent was silent for the idle timeout at
  some point, on the shim's clock: its start or first lines slower than that in the burst of
  starts; reported) and false (no such silence: the target allows none).

    .venv/bin/python bench/supervise.py [--agents 100,250,500] [--window 20] [--idle 3]
    .venv/bin/python bench/supervise.py --shims-only [--agents 100] [--window 20]

--shims-only runs N shims alone (no NATS, no `corral up`), each with the same toy agent and a
quiet watch on its socket as a spawner with inotify keeps, and prints their CPU from
/proc/<pid>/schedstat (nanoseconds on a CPU, not clock ticks): the cost of a shim per agent.

BENCH_KEEP=1 keeps the run's homes (DuckDB file, logs) and prints where.
BENCH_PROFILE=FILE records a cProfile of `corral up`'s main thread over the window, in FILE.<N>
(cProfile slows the profiled process down: don't read the CPU figures of a profiled run).
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    connect_home,
    cpu_seconds,
    main_thread_share,
    make_repo,
    nats_server_of,
    pids_matching,
    print_result,
    sql,
    start_up,
    stop_up,
    thread_cpu,
    wait_ready,
    write_config,
)
from events.envelope import new_event
from events.ids import new_execution_id
from events.types import ExecutionRequested, Timeouts

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


async def start_agents(bus: Any, n: int, repo: Path, idle: float, *, silent: int, silent_after: int) -> set[str]:
    """Request n toy agents; the first `silent` go quiet after `silent_after` beats; return their ids."""
    quiet = set()
    for i in range(n):
        request = ExecutionRequested(
            command=("bash", "-c", AGENT),
            repo=str(repo),
            env={"SILENT_AFTER": str(silent_after)} if i < silent else {},
            timeouts=Timeouts(idle=idle),
        )
        execution_id = new_execution_id()
        if i < silent:
            quiet.add(execution_id)
        await bus.publisher.publish(new_event(execution_id, request, actor="bench"))
    return quiet


async def wait_running(bus: Any, n: int, marker: str, started: float, *, timeout_s: float = 600) -> float:
    """Wait until n agents whose command line holds `marker` run; print progress; return the seconds
    since `started` (monotonic: when the first request was published)."""
    last_report = time.monotonic()
    while (running := len(pids_matching(marker))) < n:
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            states = await sql(bus, "SELECT state, count(*) FROM executions GROUP BY 1 ORDER BY 1")
            print(f"  {n} agents: {running} running after {last_report - started:.0f}s; {states}", flush=True)
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"agents did not all start within {timeout_s:.0f}s: {running} of {n}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def real_and_false(bus: Any, execution_ids: list[str], idle: float) -> tuple[int, int]:
    """Of these executions' stalls: how many came after a silence of at least `idle` (real) and
    how many without one (false). The silence is measured on the shim's clock: between the start,
    each output or heartbeat, and the stall."""
    ids = ", ".join(f"'{execution_id}'" for execution_id in execution_ids)  # (ids made by Corral)
    rows = await sql(
        bus,
        "SELECT execution_id, type, ts FROM events WHERE execution_id IN (" + ids + ") AND type IN "
        "('execution.started', 'output', 'heartbeat', 'execution.stalled') ORDER BY execution_id, ts",
        max_rows=1_000_000,
    )
    real = false = 0
    by_execution: dict[str, list[tuple[str, datetime]]] = {}
    for execution_id, kind, ts in rows:
        by_execution.setdefault(execution_id, []).append((kind, datetime.fromisoformat(ts)))
    for events in by_execution.values():
        previous: datetime | None = None
        longest = 0.0
        for kind, at in events:  # (on the shim's clock: by ts, not by the log's order)
            if previous is not None:
                longest = max(longest, (at - previous).total_seconds())
            if kind == "execution.stalled":
                if longest >= idle:
                    real += 1
                else:
                    false += 1
                break
            previous = at
    return real, false


async def measure_corral(n: int, window: float, idle: float, root: Path) -> dict[str, Any]:
    home = root / f"home-{n}"
    write_config(home, n + 10, idle=idle)
    profile = os.environ.get("BENCH_PROFILE")
    up = start_up(home, root, profile=f"{profile}.{n}" if profile else None)
    try:
        bus = await connect_home(home, await wait_ready(home, up))
        repo = make_repo(root / f"repo-{n}")
        silent = max(1, n // 10)
        beats_before_silence = int(window) + 30  # goes silent during the measuring window
        first_request = time.monotonic()
        quiet = await start_agents(bus, n, repo, idle, silent=silent, silent_after=beats_before_silence)
        ramp = await wait_running(bus, n, "read -t 1 -u 3", first_request)
        await asyncio.sleep(3)
        shims = pids_matching(f"actors.shim {home}")
        corral = [up.pid, *shims]
        nats = nats_server_of(home)
        threads0 = thread_cpu(up.pid)
        c0, n0, s0, t0 = cpu_seconds(corral), cpu_seconds(nats), cpu_seconds(shims), time.monotonic()
        if profile:
            up.send_signal(signal.SIGUSR1)
        await asyncio.sleep(window)
        if profile:
            up.send_signal(signal.SIGUSR2)
        c1, n1, s1, t1 = cpu_seconds(corral), cpu_seconds(nats), cpu_seconds(shims), time.monotonic()
        threads1 = thread_cpu(up.pid)
        main_thread = main_thread_share(up.pid, threads0, threads1)
        by_name: dict[str, float] = {}
        for tid, (name, seconds) in threads1.items():
            if tid != up.pid:
                by_name[name] = by_name.get(name, 0.0) + seconds - threads0.get(tid, (name, 0.0))[1]
        other_threads = ", ".join(
            f"{name} {seconds / (t1 - t0) * 100:.1f}%"
            for name, seconds in sorted(by_name.items(), key=lambda item: -item[1])[:3]
            if seconds > 0
        )
        # Stalls: the silent agents stop after beats_before_silence beats; wait for their stalled events.
        deadline = time.monotonic() + beats_before_silence + idle + 60
        latencies: list[float] = []
        real = false = 0
        while time.monotonic() < deadline:
            rows = await sql(
                bus,
                # (an agent that stalled before its first line or beat: measured from its start)
                "SELECT s.execution_id, s.ts, (SELECT max(ts) FROM events a WHERE a.execution_id = s.execution_id "
                "AND a.type IN ('output', 'heartbeat') AND a.seq < s.seq), (SELECT min(ts) FROM events b "
                "WHERE b.execution_id = s.execution_id AND b.type = 'execution.started') "
                "FROM events s WHERE s.type = 'execution.stalled'",
                max_rows=100000,
            )
            if sum(row[0] in quiet for row in rows) >= silent:
                latencies = [
                    (datetime.fromisoformat(ts) - datetime.fromisoformat(last or started)).total_seconds() - idle
                    for execution_id, ts, last, started in rows
                    if execution_id in quiet
                ]
                # A beating agent's stall is real when it was silent for the idle timeout at some
                # point before the stall (in practice its start, or its first lines, slower than the
                # idle timeout in the burst's load), false otherwise (none may happen). A line that
                # came just after the timeout may be logged before the stall that the watchdog
                # decided without it: the silence, not the order of the log, says which.
                beating = [row[0] for row in rows if row[0] not in quiet]
                real, false = await real_and_false(bus, beating, idle) if beating else (0, 0)
                break
            await asyncio.sleep(1)
        await bus.close()
        return {
            "ramp_s": ramp,
            "corral_cpu": (c1 - c0) / (t1 - t0) * 100,
            "nats_cpu": (n1 - n0) / (t1 - t0) * 100,
            "shims_cpu": (s1 - s0) / (t1 - t0) * 100,
            "loop_cpu": main_thread / (t1 - t0) * 100,
            "other_threads": other_threads,
            "shims": len(corral) - 1,
            "stalls": len(latencies),
            "expected_stalls": silent,
            "early_stalls": real,  # (the JSON keys of earlier runs: real stalls of beating agents, false ones)
            "false_stalls": false,
            "stall_p50": statistics.median(latencies) if latencies else float("nan"),
            "stall_max": max(latencies) if latencies else float("nan"),
        }
    finally:
        stop_up(up, f"{n} agents and itself")


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


def schedstat_seconds(pids: list[int]) -> float:
    """CPU seconds the processes' threads ran so far, from the scheduler's own clock (ns)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


async def measure_shims(n: int, window: float, root: Path) -> None:
    """N shims alone, each running the toy agent, watched quietly: their CPU per agent."""
    from actors.shim import socket_address
    from actors.spawner import start_shim

    env = {"PATH": os.environ["PATH"], "HOME": str(root)}
    shims: list[subprocess.Popen[bytes]] = []
    watches: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    try:
        for i in range(n):
            run_dir, cwd = root / f"shims-{n}" / f"run-{i}", root / f"shims-{n}" / f"work-{i}"
            run_dir.mkdir(parents=True)
            cwd.mkdir()
            spec = {"execution_id": f"bench{i}", "request_id": "-", "command": ["bash", "-c", AGENT]}
            spec.update(agent="command", cwd=str(cwd), env=env)
            (run_dir / "spec.json").write_text(json.dumps(spec))
            shims.append(start_shim(run_dir))  # as the spawner starts one
        for i in range(n):
            address = socket_address(root / f"shims-{n}" / f"run-{i}")
            for _ in range(1000):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                    break
                except OSError:
                    sock.close()
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"shim {i} did not listen")
            sock.sendall(b'{"op":"watch","quiet":true}\n')
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), lambda s=sock: s.recv(4096))
            watches.append(sock)
        await asyncio.sleep(3)
        pids = [shim.pid for shim in shims]
        c0, t0 = schedstat_seconds(pids), time.monotonic()
        await asyncio.sleep(window)
        c1, t1 = schedstat_seconds(pids), time.monotonic()
        share = (c1 - c0) / (t1 - t0)
        print(f"{n:>6} shims: {share * 100:5.1f}% of one core, {share / n * 1000:.3f} ms of CPU a second per shim")
    finally:
        for sock in watches:
            loop.remove_reader(sock.fileno())
            sock.close()
        for shim in shims:
            shim.terminate()  # the shim stops its agent (SIGTERM to the tree) and exits
        for shim in shims:
            try:
                shim.wait(timeout=30)
            except subprocess.TimeoutExpired:
                shim.kill()
                shim.wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", default="100,250,500")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of steady state measured")
    parser.add_argument("--idle", type=float, default=3.0, help="idle timeout of every agent")
    parser.add_argument("--shims-only", action="store_true", help="measure the shims alone (no NATS, no corral up)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="corral-supervise-"))
    if args.shims_only:
        try:
            for n in (int(x) for x in args.agents.split(",")):
                await measure_shims(n, args.window, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    print(
        f"{'agents':>6} {'ramp':>7} {'corral cpu':>11} {'shims':>7} {'up loop':>8} {'baseline cpu':>13} "
        f"{'ratio':>6} {'nats cpu':>9} "
        f"{'stalls':>7} {'stall p50':>10} {'stall max':>10}"
    )
    last: tuple[int, dict[str, Any], float] | None = None
    try:
        for n in (int(x) for x in args.agents.split(",")):
            baseline = await measure_baseline(n, args.window)
            result = await measure_corral(n, args.window, args.idle, root)
            ratio = result["corral_cpu"] / baseline if baseline else float("inf")
            print(
                f"{n:>6} {result['ramp_s']:>6.1f}s {result['corral_cpu']:>10.1f}% {result['shims_cpu']:>6.1f}% "
                f"{result['loop_cpu']:>7.1f}% "
                f"{baseline:>12.1f}% "
                f"{ratio:>5.1f}x {result['nats_cpu']:>8.1f}% {result['stalls']:>3}/{result['expected_stalls']:<3} "
                f"{result['stall_p50']:>+9.2f}s {result['stall_max']:>+9.2f}s",
                flush=True,
            )
            print(f"         corral up's other threads: {result['other_threads'] or 'none'}", flush=True)
            print(
                f"         stalls of beating agents: {result['early_stalls']} real (silent for the idle timeout: "
                f"a start or first lines slower than it in the burst), {result['false_stalls']} false",
                flush=True,
            )
            last = (n, result, baseline)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"  kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if last is not None:
        n, result, baseline = last
        stalls_ok = (
            result["stalls"] == result["expected_stalls"] and result["stall_max"] <= 1.0 and not result["false_stalls"]
        )
        print_result(
            "supervise",
            "cpu_pct",
            result["corral_cpu"],
            "baseline_cpu_pct",
            baseline,
            ratio=result["corral_cpu"] / baseline if baseline else None,
            target="< 30 % of one core at 500 agents; every stall reported within the idle timeout + 1 s",
            met=(result["corral_cpu"] < 30 if n >= 500 else None) if stalls_ok else False,
            agents=n,
            shims_cpu_pct=result["shims_cpu"],
            loop_cpu_pct=result["loop_cpu"],
            nats_cpu_pct=result["nats_cpu"],
            stalls=result["stalls"],
            expected_stalls=result["expected_stalls"],
            early_stalls=result["early_stalls"],
            false_stalls=result["false_stalls"],
            stall_max_s=result["stall_max"],
        )


if __name__ == "__main__":
    asyncio.run(main())
