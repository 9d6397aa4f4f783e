"""Load benchmark: N agents writing output and heartbeats, Corral beside a raw stack in the same run.

Each toy agent (bash, no fork per line) writes `--lines` output lines per second, spread over
the second, and one heartbeat a second. For each N:

- Corral: a real `corral up` (embedded NATS, every actor) runs the N agents; measured over
  `--duration` seconds of steady state: events stored per second (the stream's last sequence),
  projector lag, and Corral's CPU as a % of one core split by process kind: `corral up`'s main
  thread (asyncio loop: spawner, watchdog, publisher...), its other threads (the projector's
  DuckDB work), the shims; nats-server beside it, not in it.
- Raw stack: the same N agents started by a plain asyncio process with pipes (no Corral code):
  every stdout line is published as an `output` envelope and every heartbeat line as a
  `heartbeat` envelope, with a pipelined JetStream publisher (msg id, up to 8,192 in flight),
  into a stream of its own nats-server; a plain pull consumer reads them back into DuckDB
  through Arrow, one transaction per second (the projector's linger) or per 2,000 events.

Projector lag is sampled, not traced: every 0.25 s the benchmark reads the stream's last
sequence and the consumer's applied position (Corral: `corral.api.projections.position`; raw:
its own reply subject). The lag of a sample is the time until a later sample shows the
position at or past that sample's last sequence (resolution 0.25 s); p50/p99 over the window.

Lag is also traced per output line (issue 20 §1): each agent line carries the time it was
written ($EPOCHREALTIME); a plain JetStream subscriber in this process records when each output
event reaches it (the floor: what writing, spooling, publishing, storing and delivering cost
before any projector), and the applied position is polled every 20 ms: a line's lag is the
first poll at or past its event's sequence minus its write time. The JSON line's headline is
Corral's traced p99 (target 0.25 s), beside the raw stack's.

    .venv/bin/python bench/load.py [--agents 100,250,500] [--duration 20] [--lines 2]
    .venv/bin/python bench/load.py --agents 100 --lines 100   # 10k lines/s from 100 agents
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nats.js.api import DeliverPolicy

from bench.common import (
    RAW_EVENTS_DDL,
    _cmdline,
    connect_home,
    cpu_seconds,
    insert_raw_events,
    main_thread_share,
    make_repo,
    nats_server_of,
    pids_matching,
    print_result,
    raw_events_table,
    start_up,
    stop_up,
    thread_cpu,
    wait_ready,
    write_config,
)

SAMPLE_S = 0.25
TRACE_POLL_S = 0.02
WRITTEN = re.compile(rb"at (\d+\.\d+):")
RAW_STREAM = "RAWLOAD"
RAW_POSITION = "rawload.position"
MARKER = "corral-load-agent"
# A toy agent: LINES lines a second, spread over the second, and a heartbeat a second. The
# marker comment lets the benchmark count running agents on their command lines.
AGENT = r"""# corral-load-agent
exec 3<> <(:)
i=0
pause=$(printf '0.%03d' $((1000 / LINES)))
while :; do
  for ((k = 0; k < LINES; k++)); do
    i=$((i+1))
    echo "step $i at $EPOCHREALTIME: edited src/module_$((i % 97)).py (+3 -1)"
    read -t "$pause" -u 3
  done
  echo '{"corral":"heartbeat"}' >&2
done
"""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LagSampler:
    """Samples (time, stream last seq, applied position); turns them into lag figures."""

    def __init__(self, last_seq: Callable[[], Awaitable[int]], position: Callable[[], Awaitable[int]]) -> None:
        self.last_seq = last_seq
        self.position = position
        self.samples: list[tuple[float, int, int]] = []

    async def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), await self.last_seq(), await self.position()))
            await asyncio.sleep(SAMPLE_S)

    def lags(self) -> list[float]:
        found = []
        for i, (t, last, _) in enumerate(self.samples):
            for t2, _, position in self.samples[i:]:
                if position >= last:
                    found.append(t2 - t)
                    break
        return found

    def rate(self) -> float:
        if len(self.samples) < 2:
            return float("nan")
        (t0, s0, _), (t1, s1, _) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0)


class Tracer:
    """Lag traced per output line: written by the agent (its $EPOCHREALTIME in the line) ->
    delivered to a plain JetStream subscriber in this process (the floor: what storing and
    delivering costs before any projector) -> applied (the first poll, every TRACE_POLL_S, of the
    consumer's position at or past the event's sequence). Wall clock throughout (one host)."""

    def __init__(self, position: Callable[[], Awaitable[int]]) -> None:
        self.position = position
        self.seen: list[tuple[int, float, float]] = []  # (seq, written, received)
        self.polls: list[tuple[float, int]] = []
        self.recording = False

    async def on_msg(self, msg: Any) -> None:
        if not self.recording:
            return
        received = time.time()
        found = WRITTEN.search(msg.data)  # the chunk's first line: its earliest
        if found:
            self.seen.append((msg.metadata.sequence.stream, float(found.group(1)), received))

    async def run(self, seconds: float) -> None:
        self.recording = True
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(Exception):
                self.polls.append((time.time(), await self.position()))
            await asyncio.sleep(TRACE_POLL_S)
        self.recording = False
        # and until every line seen is applied (10 s at most)
        last = max((seq for seq, _, _ in self.seen), default=0)
        end = time.monotonic() + 10
        while time.monotonic() < end and (not self.polls or self.polls[-1][1] < last):
            with contextlib.suppress(Exception):
                self.polls.append((time.time(), await self.position()))
            await asyncio.sleep(TRACE_POLL_S)

    def figures(self) -> dict[str, float]:
        floor, lag = [], []
        i = 0
        for seq, written, received in sorted(self.seen):
            while i < len(self.polls) and self.polls[i][1] < seq:
                i += 1
            floor.append(received - written)
            if i < len(self.polls):
                lag.append(self.polls[i][0] - written)
        return {
            "traced": float(len(lag)),
            "floor_p50": percentile(floor, 0.5),
            "floor_p99": percentile(floor, 0.99),
            "trace_p50": percentile(lag, 0.5),
            "trace_p99": percentile(lag, 0.99),
        }


# --- Corral ----------------------------------------------------------------------------------------


async def measure_corral(n: int, duration: float, lines: int, root: Path) -> dict[str, float]:
    from events.envelope import new_event
    from events.ids import new_execution_id
    from events.subjects import API_POSITION, STREAM
    from events.types import ExecutionRequested

    home = root / f"corral-{n}"
    write_config(home, n + 10)
    up = start_up(home, root)
    try:
        bus = await connect_home(home, await wait_ready(home, up))
        repo = make_repo(root / f"repo-{n}")
        for _ in range(n):
            request = ExecutionRequested(command=("bash", "-c", AGENT), repo=str(repo), env={"LINES": str(lines)})
            await bus.publisher.publish(new_event(new_execution_id(), request, actor="bench"))
        ramp = await wait_agents(n, MARKER, f"corral {n}")
        await asyncio.sleep(3)

        async def last_seq() -> int:
            info = await bus.js.stream_info(STREAM)
            return int(info.state.last_seq)

        async def position() -> int:
            reply = await bus.nc.request(API_POSITION, b"", timeout=5)
            return int(json.loads(reply.data)["position"])

        shims = pids_matching(f"actors.shim {home}")
        nats = nats_server_of(home)
        worker = [pid for pid in pids_matching("projections.worker") if str(home) in _cmdline(pid)]
        groups = {"up": [up.pid], "shims": shims, "nats": nats, "worker": worker}
        tracer = Tracer(position)
        sub = await bus.js.subscribe(
            "corral.evt.*.output",
            stream=STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            cb=tracer.on_msg,
        )
        figures, shares = await steady_window(groups, up.pid, last_seq, position, duration, ramp, tracer)
        await sub.unsubscribe()
        await bus.close()
        return {
            **figures,
            "cpu": shares["up"] + shares["shims"] + shares["worker"],
            "cpu_threads": shares["up"] - shares["main"],
            "cpu_shims": shares["shims"],
            "cpu_worker": shares["worker"],  # the projector's DuckDB worker process
        }
    finally:
        stop_up(up, f"{n} agents and itself")


class CpuWindow:
    """CPU % of one core of groups of processes between its creation and `finish()`."""

    def __init__(self, groups: dict[str, list[int]], *, main_pid: int | None = None) -> None:
        self.groups = groups
        self.main_pid = main_pid
        self.threads = thread_cpu(main_pid) if main_pid else {}
        self.start = {name: cpu_seconds(pids) for name, pids in groups.items()}
        self.t0 = time.monotonic()

    def finish(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        shares = {name: (cpu_seconds(pids) - self.start[name]) / elapsed * 100 for name, pids in self.groups.items()}
        if self.main_pid:
            shares["main"] = main_thread_share(self.main_pid, self.threads, thread_cpu(self.main_pid)) / elapsed * 100
        return shares


async def wait_agents(n: int, marker: str, label: str, *, timeout_s: float = 600) -> float:
    started = last_report = time.monotonic()
    while (running := len(pids_matching(marker))) < n:
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            print(f"  {label}: {running}/{n} agents running after {last_report - started:.0f}s", flush=True)
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{label}: only {running} of {n} agents started within {timeout_s:.0f}s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


# --- the raw stack -----------------------------------------------------------------------------------


async def raw_child(url: str, n: int, lines: int, db: Path) -> None:
    """The raw stack (run as its own process): agents, pipes, pipelined publish, pull consumer -> DuckDB."""
    import duckdb
    import nats
    import orjson
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=["raw.evt.>"], duplicate_window=120))
    in_flight = asyncio.Semaphore(8192)
    inbox = nc.new_inbox()

    async def on_ack(_msg: Any) -> None:
        in_flight.release()

    await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=-1)
    counter = 0

    async def publish(execution_id: str, kind: str, data: dict[str, Any]) -> None:
        nonlocal counter
        counter += 1
        event_id = f"{os.getpid()}-{counter}"
        payload = orjson.dumps(
            {
                "id": event_id,
                "type": kind,
                "execution_id": execution_id,
                "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "actor": "raw",
                "data": data,
            }
        )
        await in_flight.acquire()
        await nc.publish(
            f"raw.evt.{execution_id}.{kind}", payload, reply=f"{inbox}.{counter}", headers={"Nats-Msg-Id": event_id}
        )

    async def agent(index: int) -> None:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            AGENT,
            env={**os.environ, "LINES": str(lines)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        execution_id = f"raw{index}"
        assert process.stdout is not None
        assert process.stderr is not None

        async def out() -> None:
            n_chunk = 0
            assert process.stdout is not None
            while line := await process.stdout.readline():
                n_chunk += 1
                await publish(execution_id, "output", {"stream": "stdout", "n": n_chunk, "text": line.decode()})

        async def err() -> None:
            assert process.stderr is not None
            while line := await process.stderr.readline():
                if line.startswith(b'{"corral"'):
                    await publish(execution_id, "heartbeat", {"source": "agent"})

        await asyncio.gather(out(), err())

    con = duckdb.connect(str(db))
    con.execute(RAW_EVENTS_DDL)
    position = 0

    async def on_position(msg: Any) -> None:
        await msg.respond(str(position).encode())

    await nc.subscribe(RAW_POSITION, cb=on_position)
    await js.add_consumer(RAW_STREAM, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.ALL))
    sub = await js.pull_subscribe_bind("raw", stream=RAW_STREAM)
    agents = [asyncio.create_task(agent(i)) for i in range(n)]
    last_apply = time.monotonic()
    buffer: list[Any] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        with contextlib.suppress(Exception):
            buffer += await sub.fetch(2000, timeout=0.25)
        if not buffer or (len(buffer) < 2000 and time.monotonic() - last_apply < 1.0):
            continue
        msgs, buffer = buffer, []
        table = raw_events_table([m.metadata.sequence.stream for m in msgs], [m.data for m in msgs])
        await asyncio.to_thread(insert_raw_events, con, table)
        await msgs[-1].ack()
        position = msgs[-1].metadata.sequence.stream
        last_apply = time.monotonic()
    for task in agents:
        task.cancel()
    for pid in pids_matching(MARKER):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    con.close()
    await nc.close()


async def measure_raw(n: int, duration: float, lines: int, root: Path) -> dict[str, float]:
    import nats

    from corral.server import EmbeddedServer

    work = root / f"raw-{n}"
    work.mkdir()
    server = EmbeddedServer(work / "nats", log_file=work / "nats.log").start()
    child = None
    try:
        with (work / "child.err").open("wb") as err:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                str(Path(__file__).resolve()),
                "raw-child",
                server.url,
                str(n),
                str(lines),
                str(work / "raw.duckdb"),
                stderr=err,
            )
        ramp = await wait_agents(n, MARKER, f"raw {n}")
        await asyncio.sleep(3)
        nc = await nats.connect(server.url)
        js = nc.jetstream()

        async def last_seq() -> int:
            info = await js.stream_info(RAW_STREAM)
            return int(info.state.last_seq)

        async def position() -> int:
            return int((await nc.request(RAW_POSITION, b"", timeout=5)).data)

        assert server.process is not None
        groups = {"raw": [child.pid], "nats": [server.process.pid]}
        tracer = Tracer(position)
        sub = await js.subscribe(
            "raw.evt.*.output",
            stream=RAW_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            cb=tracer.on_msg,
        )
        figures, shares = await steady_window(groups, child.pid, last_seq, position, duration, ramp, tracer)
        await sub.unsubscribe()
        await nc.close()
        return {**figures, "cpu": shares["raw"]}
    finally:
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), 30)
            except TimeoutError:
                child.kill()
                await child.wait()
        for pid in pids_matching(MARKER):  # whatever the child could not stop
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        server.stop()


async def steady_window(
    groups: dict[str, list[int]],
    main_pid: int,
    last_seq: Callable[[], Awaitable[int]],
    position: Callable[[], Awaitable[int]],
    duration: float,
    ramp: float,
    tracer: Tracer,
) -> tuple[dict[str, float], dict[str, float]]:
    """Sample lag and CPU over the steady window: (the figures both stacks report, CPU shares by group)."""
    cpu = CpuWindow(groups, main_pid=main_pid)
    sampler = LagSampler(last_seq, position)
    tracing = asyncio.create_task(tracer.run(duration))
    await sampler.run(duration)
    shares = cpu.finish()
    await tracing
    lags = sampler.lags()
    figures = {
        "ramp_s": ramp,
        "events_s": sampler.rate(),
        "lag_p50": percentile(lags, 0.5),
        "lag_p99": percentile(lags, 0.99),
        "cpu_loop": shares["main"],
        "cpu_nats": shares["nats"],
        **tracer.figures(),
    }
    return figures, shares


def row(label: str, r: dict[str, float]) -> str:
    split = f"loop {r['cpu_loop']:.1f} / threads {r.get('cpu_threads', r['cpu'] - r['cpu_loop']):.1f}" + (
        f" / shims {r['cpu_shims']:.1f} / DuckDB worker {r['cpu_worker']:.1f}" if "cpu_shims" in r else ""
    )
    return (
        f"{label:<8} {r['events_s']:>9,.0f} {r['lag_p50']:>8.2f}s {r['lag_p99']:>8.2f}s "
        f"{r['trace_p50']:>8.3f}s {r['trace_p99']:>8.3f}s {r['floor_p50']:>8.3f}s {r['floor_p99']:>8.3f}s "
        f"{r['cpu']:>7.1f}%  ({split})  nats {r['cpu_nats']:.1f}%  ramp {r['ramp_s']:.0f}s  "
        f"{r['traced']:.0f} lines traced"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", default="100,250,500", help="comma-separated agent counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of steady state measured")
    parser.add_argument(
        "--lines",
        type=int,
        default=2,
        help="output lines per agent per second (1-100); the 10k events/s case: --agents 500 --lines 20, "
        "or on a 2-core machine --agents 100 --lines 100 (the same rate from fewer bash processes)",
    )
    args = parser.parse_args()
    try:
        counts = [int(x) for x in args.agents.split(",")]
    except ValueError:
        parser.error(f"--agents must be comma-separated numbers, not {args.agents!r}")
    if not 1 <= args.lines <= 100 or any(c < 1 for c in counts) or args.duration <= 0:
        parser.error("--lines must be 1-100, every --agents count and --duration positive")
    root = Path(tempfile.mkdtemp(prefix="corral-load-"))
    results = []
    try:
        for n in counts:
            print(f"{n} agents, {args.lines} lines + 1 heartbeat per second each: raw stack...", flush=True)
            raw = await measure_raw(n, args.duration, args.lines, root)
            print(f"{n} agents: corral...", flush=True)
            corral = await measure_corral(n, args.duration, args.lines, root)
            results.append((n, raw, corral))
            print(
                f"{'':<8} {'events/s':>9} {'lag p50':>9} {'lag p99':>9} {'traced':>9} {'p99':>9} "
                f"{'floor':>9} {'p99':>9} {'cpu':>8}",
                flush=True,
            )
            print(row("raw", raw), flush=True)
            print(row("corral", corral), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nsummary [{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, {args.lines} lines/s + 1 heartbeat/s]")
    print(
        f"{'agents':>6} {'events/s raw':>13} {'corral':>8} {'lag p50/p99 raw':>17} {'corral':>13} "
        f"{'traced p50/p99 raw':>19} {'corral':>13} {'floor p50/p99':>14} "
        f"{'cpu raw':>8} {'corral':>8} {'cpu ratio':>10}"
    )
    for n, raw, corral in results:
        ratio = corral["cpu"] / raw["cpu"] if raw["cpu"] else float("inf")
        print(
            f"{n:>6} {raw['events_s']:>13,.0f} {corral['events_s']:>8,.0f} "
            f"{raw['lag_p50']:>8.2f}/{raw['lag_p99']:<7.2f}s {corral['lag_p50']:>5.2f}/{corral['lag_p99']:<6.2f}s "
            f"{raw['trace_p50']:>9.3f}/{raw['trace_p99']:<8.3f}s "
            f"{corral['trace_p50']:>5.3f}/{corral['trace_p99']:<6.3f}s "
            f"{corral['floor_p50']:>6.3f}/{corral['floor_p99']:<6.3f}s "
            f"{raw['cpu']:>7.1f}% {corral['cpu']:>7.1f}% {ratio:>9.1f}x"
        )
    print(
        "traced: each output line from the agent's write ($EPOCHREALTIME in the line) to queryable (a poll of "
        f"the applied position every {TRACE_POLL_S * 1000:.0f} ms); floor: written -> delivered to a plain "
        "JetStream subscriber (Corral's chain without the projector)"
    )
    if results:
        n, raw, corral = results[-1]
        print_result(
            "load",
            "trace_p99_s",
            corral["trace_p99"],
            "baseline_trace_p99_s",
            raw["trace_p99"],
            ratio=corral["trace_p99"] / raw["trace_p99"] if raw["trace_p99"] else None,
            target="line written -> queryable p99 <= 0.25 s",
            met=corral["trace_p99"] <= 0.25,
            agents=n,
            lines_per_s=args.lines,
            trace_p50_s=corral["trace_p50"],
            floor_p50_s=corral["floor_p50"],
            floor_p99_s=corral["floor_p99"],
            baseline_floor_p99_s=raw["floor_p99"],
            lag_p99_s=corral["lag_p99"],
            lag_p50_s=corral["lag_p50"],
            baseline_lag_p50_s=raw["lag_p50"],
            events_per_s=corral["events_s"],
            baseline_events_per_s=raw["events_s"],
            cpu_pct=corral["cpu"],
            baseline_cpu_pct=raw["cpu"],
        )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "raw-child":
        asyncio.run(raw_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])))
    else:
        asyncio.run(main())
