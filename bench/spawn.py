"""Spawn benchmark: request -> agent running, p50/p95 over N spawns, with and without containment.

Each configuration runs under its own real `corral up` (embedded NATS), all at once, their spawns
taken in turn (so each sees the same load of the moment):
- none: no cgroup (`CORRAL_CGROUP=off`: per-process limits) and no sandbox (the baseline);
- cgroups: the execution's cgroup (actors/limits.py: v1 memory, cpu, pids, freezer groups, or v2),
  no sandbox;
- cgroups+sandbox: both (only where this Corral has the sandbox, actors/sandbox.py, and bwrap works).

One spawn at a time: a request is published, and the agent (`sh -c 'date +%s.%N'`) prints the
time it starts running; request -> running is that time minus the time just before the publish
(one clock, one host); the next spawn waits until this execution's end is recorded and its system
has settled (`settled`). The first spawns of each configuration warm up and are not counted.
The cgroup configurations run with a memory and a CPU limit too, so every limit is written.

    .venv/bin/python bench/spawn.py [--n 200] [--warmup 5]

Prints a table, the overhead over the baseline (target: <= 20 ms p50 for cgroups + sandbox),
and ends with one JSON line.

    .venv/bin/python bench/spawn.py --burst 500

A burst instead (issue 20 §2): N requests published at once to one `corral up` with the
defaults (cgroups and the sandbox where the machine has them, `max_running` = N), timed until
every agent has started (its `execution.started` seen on the bus, as a subscriber sees it: no
SQL polling, which would make the projector apply at once and load what is timed); beside it,
in the same run, the baseline: N times `git worktree add` and
`subprocess.Popen` of the same agent, one after the other. Target: all N running within 10 s.
It prints when each stage was reached (claimed, workspace made, started, exited: p50, p90, last)
and the CPU each process of the system used meanwhile, beside the baseline's.

    .venv/bin/python bench/spawn.py --burst 500 [--hold 60] [--profile OUT.prof]

--hold S: the agents stay S seconds (by default they exit at once, so exits and exit checkpoints
run beside the later spawns); --profile: `corral up` under cProfile from the publish until all run.
"""

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import connect_home, make_repo, print_result, sql, start_up, stop_up, wait_ready, write_config
from events.envelope import new_event
from events.ids import new_execution_id
from events.subjects import event_subject
from events.types import ExecutionRequested, Limits

AGENT = ("sh", "-c", "date +%s.%N")


def sandbox_usable() -> bool:
    """This Corral has the sandbox (actors/sandbox.py) and bwrap works here."""
    try:
        from actors import sandbox
    except ImportError:
        return False
    return "sandbox" in ExecutionRequested.model_fields and sandbox.probe() is None


def request(repo: Path, *, cgroups: bool, sandboxed: bool) -> ExecutionRequested:
    fields: dict[str, Any] = {"command": AGENT, "repo": str(repo)}
    if cgroups:
        fields["limits"] = Limits(memory_bytes=512 << 20, cpus=1.0, pids_max=256)
    if "sandbox" in ExecutionRequested.model_fields:
        fields["sandbox"] = {"mode": "on" if sandboxed else "off"}
    return ExecutionRequested(**fields)


async def started_at(bus: Any, execution_id: str, timeout_s: float = 60.0) -> tuple[float, str | None]:
    """(the agent's own start time, the limits and sandbox its execution.started names) once it printed it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await sql(
            bus,
            f"SELECT type, data->>'text', concat_ws(', ', data->>'limits', 'sandbox ' || (data->'sandbox'->>'mode')), "
            f"data->>'error' FROM events "
            f"WHERE execution_id = '{execution_id}' AND type IN ('output', 'execution.started', 'execution.failed')",
        )
        output = [text for kind, text, _, _ in rows if kind == "output"]
        failed = [error for kind, _, _, error in rows if kind == "execution.failed"]
        if failed:
            raise RuntimeError(f"{execution_id} failed: {failed[0]}")
        started = [limit for kind, _, limit, _ in rows if kind == "execution.started"]
        if output and started:  # (the projector may show the output a moment before the start)
            return float(output[0].split()[0]), started[0]
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{execution_id} did not start within {timeout_s:.0f}s")


SPAWN_STAGES = ("execution.claimed", "workspace.created", "execution.started")


async def settled(bus: Any, execution_id: str, timeout_s: float = 30.0) -> None:
    """Wait until an execution's end is recorded and its system is quiet again: its exit checkpoint,
    the validation and the projection of its end run after the agent, and would otherwise fall on
    the next configuration's spawn (each spawn then waited behind the previous system's exit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await sql(
            bus, f"SELECT count(*) FROM events WHERE execution_id = '{execution_id}' AND type = 'execution.exited'"
        )
        if rows and int(rows[0][0]):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(SETTLE_S)


SETTLE_S = 0.1  # after an exit is queryable: its checkpoint and validation are done by then here


@dataclass
class Configuration:
    """One configuration's own `corral up`, and what its spawns measured."""

    label: str
    cgroups: bool
    sandboxed: bool
    up: Any = None
    bus: Any = None
    repo: Path | None = None
    latencies: list[float] = field(default_factory=list)
    seen: set[str | None] = field(default_factory=set)
    # ms from the publish to each stage's event (its own clock: the emitter's timestamp), per spawn
    stages: dict[str, list[float]] = field(default_factory=dict)

    async def start(self, root: Path) -> None:
        home = root / f"home-{self.label.replace('+', '-')}"
        write_config(home, 4)
        saved = os.environ.get("CORRAL_CGROUP")
        if not self.cgroups:
            os.environ["CORRAL_CGROUP"] = "off"  # inherited by `corral up`, its spawner and shims
        try:
            self.up = start_up(home, root)
        finally:
            if saved is None:
                os.environ.pop("CORRAL_CGROUP", None)
            else:
                os.environ["CORRAL_CGROUP"] = saved
        self.bus = await connect_home(home, await wait_ready(home, self.up))
        self.repo = make_repo(root / f"repo-{self.label.replace('+', '-')}")

    async def spawn(self, *, counted: bool) -> None:
        assert self.repo is not None
        execution_id = new_execution_id()
        requested = request(self.repo, cgroups=self.cgroups, sandboxed=self.sandboxed)
        event = new_event(execution_id, requested, actor="bench")
        before = time.time()
        await self.bus.publisher.publish(event)
        running, in_force = await started_at(self.bus, execution_id)
        if counted:
            self.latencies.append((running - before) * 1000)
            self.seen.add(in_force)
            types = ", ".join(f"'{kind}'" for kind in SPAWN_STAGES)
            rows = await sql(
                self.bus,
                f"SELECT type, min(epoch(ts)) FROM events WHERE execution_id = '{execution_id}' "
                f"AND type IN ({types}) GROUP BY type",
            )
            for kind, ts in rows:
                self.stages.setdefault(kind, []).append((float(ts) - before) * 1000)
        await settled(self.bus, execution_id)

    async def stop(self) -> None:
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self.up is not None:
            stop_up(self.up, self.label)

    def result(self) -> dict[str, Any]:
        cuts = statistics.quantiles(self.latencies, n=20)
        return {
            "label": self.label,
            "n": len(self.latencies),
            "p50_ms": statistics.median(self.latencies),
            "p95_ms": cuts[18],
            "limits": sorted(str(x) for x in self.seen),
            "stages_p50_ms": {
                kind: statistics.median(self.stages[kind]) for kind in SPAWN_STAGES if self.stages.get(kind)
            },
        }


def held(hold_s: float) -> tuple[str, ...]:
    """The agent of a burst: it prints its start, then stays `hold_s` seconds (0: it exits at once,
    so the exits and exit checkpoints of the first agents run beside the later spawns)."""
    return AGENT if not hold_s else ("sh", "-c", f"date +%s.%N; exec sleep {hold_s:g}")


def baseline_burst(root: Path, n: int, agent: tuple[str, ...] = AGENT) -> float:
    """Seconds for n times `git worktree add` + `subprocess.Popen` of the agent, one after the other."""
    repo = make_repo(root / "repo-baseline")
    started = time.perf_counter()
    agents = []
    for i in range(n):
        path = root / "baseline-worktrees" / f"w{i}"
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "-q", "-b", f"b{i}", str(path)], check=True, capture_output=True
        )
        agents.append(subprocess.Popen(agent, cwd=path, stdout=subprocess.DEVNULL))
    elapsed = time.perf_counter() - started
    for agent in agents:
        if agent.poll() is None and agent.args is not AGENT:
            agent.terminate()  # (a held agent: its hold is not part of the figure)
        agent.wait()
    return elapsed


def _cpu_of(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (utime, stime, cutime, cstime)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def system_processes(home: Path, up_pid: int) -> dict[str, int]:
    """The processes of one system: `corral up` (its git commands are its waited-for children), the
    shim fork server (the shims, their agents), nats-server and the projector's DuckDB worker."""
    found = {"corral up (+ its git)": up_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(home) not in line:
            continue
        if "actors.shimfork" in line:
            found["shim fork server (+ shims, agents)"] = int(entry.name)
        elif "nats-server" in line:
            found["nats-server"] = int(entry.name)
        elif "projections.worker" in line:
            found["projector worker"] = int(entry.name)
    return found


BURST_STAGES = ("execution.claimed", "workspace.created", "execution.started", "execution.exited")


async def burst_stages(bus: Any, ids: str, before_wall: float) -> list[tuple[str, int, float, float, float]]:
    """When each stage was reached, seconds after the burst was published: (type, count, p50, p90, last)."""
    types = ", ".join(f"'{kind}'" for kind in BURST_STAGES)
    rows = await sql(
        bus,
        f"SELECT type, count(*), quantile_cont(epoch(ts), 0.5), quantile_cont(epoch(ts), 0.9), max(epoch(ts)) "
        f"FROM events WHERE execution_id IN ({ids}) AND type IN ({types}) GROUP BY type",
    )
    found = {kind: (int(count), p50, p90, last) for kind, count, p50, p90, last in rows}
    return [
        (kind, found[kind][0], *(float(t) - before_wall for t in found[kind][1:]))
        for kind in BURST_STAGES
        if kind in found
    ]


async def burst(n: int, profile: str | None = None, hold_s: float = 0.0) -> None:
    """Publish n requests at once; seconds until every agent has started, beside the baseline.

    With `profile`, `corral up` runs under cProfile from the publish until all run (bench/common.py)."""
    root = Path(tempfile.mkdtemp(prefix="corral-spawn-burst-"))
    home = root / "home"
    write_config(home, n)
    up = start_up(home, root, profile=profile)
    try:
        bus = await connect_home(home, await wait_ready(home, up))
        repo = make_repo(root / "repo")
        for _ in range(3):  # warm up (agents that end at once: no slot kept): what the others reuse
            ids = [new_execution_id()]
            await bus.publisher.publish(
                new_event(ids[0], ExecutionRequested(command=AGENT, repo=str(repo)), actor="bench")
            )
            await started_at(bus, ids[0])
        events = [
            new_event(new_execution_id(), ExecutionRequested(command=held(hold_s), repo=str(repo)), actor="bench")
            for _ in range(n)
        ]
        processes = system_processes(home, up.pid)
        cpu_before = {name: _cpu_of(pid) for name, pid in processes.items()}
        # The agents' starts are counted as the system tells its subscribers (execution.started on
        # the bus), not by asking its SQL API every 100 ms: each such query makes the projector apply
        # at once (bench/common.sql), so the bench's own polling was load on the system it timed.
        wanted = {event.execution_id for event in events}
        started: dict[str, float] = {}
        in_force: str | None = None
        all_started = asyncio.get_running_loop().create_future()

        async def on_started(msg: Any) -> None:
            nonlocal in_force
            event = orjson.loads(msg.data)
            if event["execution_id"] in wanted and event["execution_id"] not in started:
                started[event["execution_id"]] = time.perf_counter()
                in_force = orjson.dumps(event["data"].get("sandbox")).decode()
                if len(started) == n and not all_started.done():
                    all_started.set_result(None)

        watch = await bus.nc.subscribe(
            event_subject("*", "execution.started"), cb=on_started, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await bus.nc.flush()
        if profile:
            up.send_signal(signal.SIGUSR1)
        before_wall = time.time()
        before = time.perf_counter()
        await asyncio.gather(*(bus.publisher.publish(event) for event in events))
        published = time.perf_counter() - before
        ids = ", ".join(f"'{event.execution_id}'" for event in events)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_started, 600)
        await watch.unsubscribe()
        running = len(started)
        all_running = (max(started.values()) if running == n else time.perf_counter()) - before
        if profile:
            up.send_signal(signal.SIGUSR2)
        await asyncio.sleep(2.0)  # (the last exits recorded and projected)
        cpu = {name: _cpu_of(pid) - cpu_before[name] for name, pid in processes.items()}
        stages = await burst_stages(bus, ids, before_wall)
        load = os.getloadavg()
        await bus.close()
    finally:
        stop_up(up, "burst")
    children = os.times()
    baseline = baseline_burst(root, n, held(hold_s))
    after = os.times()
    baseline_cpu = after.children_user + after.children_system - children.children_user - children.children_system
    shutil.rmtree(root, ignore_errors=True)
    print(f"burst of {n}: published in {published:.2f}s, {running}/{n} running after {all_running:.2f}s ({in_force})")
    print(f"baseline: {n} x (git worktree add + Popen), one after the other: {baseline:.2f}s")
    print(f"load average at the end of the burst: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"CPU seconds from the publish until all ran + 2 s (baseline: {baseline_cpu:.1f} s for its git and agents):")
    for name, seconds in cpu.items():
        print(f"  {name:<36} {seconds:>7.1f}")
    print(f"{'stage (s after publish)':<24} {'count':>6} {'p50':>7} {'p90':>7} {'last':>7}")
    for kind, count, p50, p90, last in stages:
        print(f"{kind:<24} {count:>6} {p50:>7.2f} {p90:>7.2f} {last:>7.2f}")
    met = running == n and all_running <= 10.0
    print(f"target: all {n} running within 10 s: {'met' if met else 'MISSED'}")
    print_result(
        "spawn_burst",
        "all_running_s",
        all_running,
        "baseline_s",
        baseline,
        ratio=all_running / baseline if baseline else None,
        target=f"{n} requests all running within 10 s",
        met=met,
        agents=n,
        hold_s=hold_s,
        running=running,
        published_s=published,
        load_average=load[0],
        cpu_s=cpu,
        baseline_cpu_s=baseline_cpu,
        stages={
            kind: {"count": count, "p50_s": p50, "p90_s": p90, "last_s": last} for kind, count, p50, p90, last in stages
        },
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="spawns measured per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="spawns first made and not counted")
    parser.add_argument("--burst", type=int, default=0, help="instead: N requests at once, until all run")
    parser.add_argument("--hold", type=float, default=0.0, help="with --burst: each agent stays this many seconds")
    parser.add_argument("--profile", help="with --burst: cProfile `corral up` during the burst into this file")
    args = parser.parse_args()
    if args.burst:
        await burst(args.burst, args.profile, args.hold)
        return
    from actors.limits import PER_PROCESS, describe_limits

    configs = [("none", False, False)]
    if describe_limits() != PER_PROCESS:
        configs.append(("cgroups", True, False))
    else:
        print("no usable cgroups on this machine: only the baseline is measured", flush=True)
    if sandbox_usable():
        configs.append(("cgroups+sandbox", describe_limits() != PER_PROCESS, True))
    else:
        print("no sandbox in this Corral (actors/sandbox.py) or bwrap does not work here: not measured", flush=True)
    root = Path(tempfile.mkdtemp(prefix="corral-spawn-"))
    systems = [Configuration(label, cgroups, sandboxed) for label, cgroups, sandboxed in configs]
    try:
        for system in systems:
            await system.start(root)
        # Round robin, one spawn at a time: every configuration under the same load of the moment.
        for i in range(args.warmup + args.n):
            for system in systems:
                await system.spawn(counted=i >= args.warmup)
    finally:
        for system in systems:
            await system.stop()
        shutil.rmtree(root, ignore_errors=True)
    results = [system.result() for system in systems]
    base = results[0]
    print(
        f"{'configuration':<16} {'spawns':>6} {'p50':>9} {'p95':>9} {'p50 vs none':>12} {'overhead p50':>13}  in force"
    )
    for result in results:
        ratio = result["p50_ms"] / base["p50_ms"] if base["p50_ms"] else float("inf")
        result["ratio_p50"] = ratio
        result["overhead_p50_ms"] = result["p50_ms"] - base["p50_ms"]
        print(
            f"{result['label']:<16} {result['n']:>6} {result['p50_ms']:>7.1f}ms {result['p95_ms']:>7.1f}ms "
            f"{ratio:>11.2f}x {result['overhead_p50_ms']:>+11.1f}ms  {', '.join(result['limits'])}",
            flush=True,
        )
    print("where the time goes (ms after the publish, p50; the agent's own start is the p50 above):")
    print(f"{'configuration':<16} " + " ".join(f"{kind:>18}" for kind in SPAWN_STAGES))
    for result in results:
        marks = result["stages_p50_ms"]
        print(
            f"{result['label']:<16} " + " ".join(f"{marks.get(kind, float('nan')):>16.1f}ms" for kind in SPAWN_STAGES)
        )
    contained = results[-1]
    if len(results) > 1:
        verdict = "met" if contained["overhead_p50_ms"] <= 20 else "MISSED"
        print(f"target: {contained['label']} overhead <= 20 ms p50: {verdict} ({contained['overhead_p50_ms']:+.1f} ms)")
    print_result(
        "spawn",
        "p50_ms",
        contained["p50_ms"],
        "baseline_p50_ms",
        base["p50_ms"],
        ratio=contained["ratio_p50"],
        target="cgroups + sandbox overhead <= 20 ms p50",
        met=contained["overhead_p50_ms"] <= 20 if len(results) > 1 else None,
        configuration=contained["label"],
        overhead_p50_ms=contained["overhead_p50_ms"],
        results=results,
    )
    with contextlib.suppress(Exception):
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
