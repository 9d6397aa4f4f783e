"""Flood benchmark: concurrent output floods, the peak memory of every Corral process, `corral ps` meanwhile.

A real `corral up` (embedded NATS, every actor) runs `--floods` agents at once, each writing
`--mb` MB of output as fast as it can (base64 lines of 100 characters). Meanwhile the benchmark
runs `corral ps --json` (the CLI, a process each time) back to back and samples the resident
memory of every Corral process every 0.1 s: `corral up`, its nats-server, the projector's DuckDB
worker (`projections.worker`) and the shims. Peaks are the kernel's high-water marks (VmHWM) as
last read while each process lived; "after" is the RSS 5 s after every flood is queryable.

Baseline, in the same run: `corral ps --json` on the same system before the floods (idle), so
the latency ratio is ps during the floods / ps idle. Target (issue 20 §5): the DuckDB worker
<= 512 MB peak with the memory returned after, `corral ps` <= 1 s during the floods. Ends with
one JSON line (headline: the worker's peak RSS in MB).

    .venv/bin/python bench/flood.py [--floods 3] [--mb 50] [--config EXTRA_TOML]
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    _cmdline,
    connect_home,
    make_repo,
    nats_server_of,
    pids_matching,
    print_result,
    sql,
    start_up,
    stop_up,
    wait_ready,
)

MARKER = "corral-flood-agent"
# base64 of urandom: 100-character lines, about MB megabytes; the marker names it on `ps`.
AGENT = f"# {MARKER}\nhead -c $((MB * 1000000 * 3 / 4 * 100 / 101)) /dev/urandom | base64 -w 100"
SAMPLE_S = 0.1
TARGET_WORKER_MB = 512
TARGET_PS_S = 1.0


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def shims_of(home: str) -> list[int]:
    """The shims of one CORRAL_HOME: started as `python -m actors.shim RUN_DIR`, or forked from the
    spawner's warm process (actors/shimfork.py, retitled; its working directory is the run's)."""
    found = []
    for pid in pids_matching("actors.shim"):
        try:
            where = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            where = ""
        if home in _cmdline(pid) or where.startswith(home):
            found.append(pid)
    return found


class MemoryWatch:
    """Per group of processes: the peak of each process (VmHWM), and the group's summed RSS."""

    def __init__(self, groups: dict[str, list[int] | str]) -> None:
        self.groups = groups  # a list of pids, or a text to find on command lines (shims come and go)
        self.peak_kb: dict[str, dict[int, int]] = {name: {} for name in groups}
        self.sum_peak_kb: dict[str, int] = dict.fromkeys(groups, 0)

    def pids(self, name: str) -> list[int]:
        spec = self.groups[name]
        return spec if isinstance(spec, list) else shims_of(spec)

    def sample(self) -> None:
        for name in self.groups:
            total = 0
            for pid in self.pids(name):
                rss, hwm = _status_kb(pid)
                if hwm:
                    self.peak_kb[name][pid] = max(self.peak_kb[name].get(pid, 0), hwm)
                total += rss
            self.sum_peak_kb[name] = max(self.sum_peak_kb[name], total)

    def rss_mb(self, name: str) -> float:
        return sum(_status_kb(pid)[0] for pid in self.pids(name)) / 1024

    def peak_mb(self, name: str) -> float:
        """The largest single process of the group (its VmHWM)."""
        return max(self.peak_kb[name].values(), default=0) / 1024

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
        self.sample()


async def ps_once(env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral",
        "ps",
        "--json",
        env=env,
        cwd=str(cwd),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    took = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"corral ps failed ({process.returncode}): {err.decode(errors='replace').strip()}")
    return took


async def ps_loop(env: dict[str, str], cwd: Path, stop: asyncio.Event, times: list[float]) -> None:
    while not stop.is_set():
        times.append(await ps_once(env, cwd))


async def api_ps_loop(
    bus: object, stop: asyncio.Event, times: list[float], trace: list[tuple[float, int, int]], failed: list[float]
) -> None:
    """`corral ps`'s own request without the CLI's start: the same query, after the log's last sequence."""
    from corral.client import PS_OUTPUT_GRACE_S
    from events.subjects import API_POSITION, STREAM

    t0 = time.monotonic()
    while not stop.is_set():
        started = time.perf_counter()
        last = int((await bus.js.stream_info(STREAM)).state.last_seq)  # type: ignore[attr-defined]
        request = {"sql": "SELECT execution_id, state FROM executions", "max_rows": 1000, "min_seq": last}
        request["output_grace_s"] = PS_OUTPUT_GRACE_S  # as corral ps asks
        reply = await bus.nc.request("corral.api.sql", json.dumps(request).encode(), timeout=60)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - started)
        if os.environ.get("FLOOD_TRACE"):  # the same wait with a trivial query: the wait's part
            request["sql"] = "SELECT 1"
            started = time.perf_counter()
            await bus.nc.request("corral.api.sql", json.dumps(request).encode(), timeout=60)  # type: ignore[attr-defined]
            print(
                f"  ps request {times[-1]:.3f}s (SELECT 1 after it {time.perf_counter() - started:.3f}s) "
                f"at t={time.monotonic() - t0:.1f}s",
                flush=True,
            )
        if not json.loads(reply.data).get("ok", True):  # counted (its time is in `times`), reported
            print(f"  ps request failed after {times[-1]:.1f}s: {reply.data[:200]!r}", flush=True)
            failed.append(times[-1])
        position = json.loads((await bus.nc.request(API_POSITION, b"", timeout=5)).data)["position"]  # type: ignore[attr-defined]
        trace.append((time.monotonic() - t0, last, int(position)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def measure(floods: int, mb: int, extra_config: str, root: Path) -> dict[str, object]:
    from events.envelope import new_event
    from events.ids import new_execution_id
    from events.types import ExecutionRequested

    home = root / "home"
    home.mkdir()
    (home / "corral.toml").write_text(
        f"[spawner]\nmax_running = {floods + 4}\n[http]\nenabled = false\n{extra_config}\n"
    )
    up = start_up(home, root)
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_NATS_URL", None)
    try:
        bus = await connect_home(home, await wait_ready(home, up))
        repo = make_repo(root / "repo")
        worker = [pid for pid in pids_matching("projections.worker") if str(home) in _cmdline(pid)]
        groups: dict[str, list[int] | str] = {
            "corral up": [up.pid],
            "nats-server": nats_server_of(home),
            "DuckDB worker": worker,
            "shims": str(home),
        }
        watch = MemoryWatch(groups)
        watch.sample()
        idle_worker_mb = watch.rss_mb("DuckDB worker")
        idle = [await ps_once(env, root) for _ in range(5)]
        stop = asyncio.Event()
        during: list[float] = []
        watching = asyncio.create_task(watch.run(stop))
        started = time.monotonic()
        ids = []
        for _ in range(floods):
            execution_id = new_execution_id()
            ids.append(execution_id)
            request = ExecutionRequested(command=("bash", "-c", AGENT), repo=str(repo), env={"MB": str(mb)})
            await bus.publisher.publish(new_event(execution_id, request, actor="bench"))
        polling = asyncio.create_task(ps_loop(env, root, stop, during))
        api_during: list[float] = []
        trace: list[tuple[float, int, int]] = []
        api_failed: list[float] = []
        api_polling = asyncio.create_task(api_ps_loop(bus, stop, api_during, trace, api_failed))
        listed = ", ".join(f"'{i}'" for i in ids)
        want = floods * mb * 1000000 * 0.97
        stored = 0.0
        failed_queries = 0
        while time.monotonic() - started < 600:
            try:
                rows = await sql(
                    bus,
                    f"SELECT count(*) FILTER (WHERE state IN ('exited', 'failed')), coalesce(sum(output_bytes), 0) "
                    f"FROM executions WHERE execution_id IN ({listed})",
                )
            except RuntimeError as exc:  # e.g. the query stopped at [sql] timeout: counted, asked again
                print(f"  progress query failed after {time.monotonic() - started:.1f}s: {exc}", flush=True)
                failed_queries += 1
                continue
            done, stored = int(rows[0][0]), float(rows[0][1])
            if done == floods and stored >= want:
                break
            await asyncio.sleep(0.5)
        flood_s = time.monotonic() - started
        stop.set()
        await polling
        await api_polling
        await watching
        await asyncio.sleep(5)
        after = {name: watch.rss_mb(name) for name in groups if name != "shims"}
        await bus.close()
    finally:
        stop_up(up, "after the floods")
    return {
        "flood_s": flood_s,
        "stored_mb": stored / 1e6,
        "peak": {name: watch.peak_mb(name) for name in groups},
        "shims_sum_peak": watch.sum_peak_kb["shims"] / 1024,
        "after": after,
        "idle_worker_mb": idle_worker_mb,
        "ps_idle": idle,
        "ps_during": during,
        "failed_queries": failed_queries,
        "api_during": api_during,
        "api_failed": len(api_failed),
        "trace": trace,
    }


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--floods", type=int, default=3, help="agents flooding at once")
    parser.add_argument("--mb", type=int, default=50, help="megabytes of output each")
    parser.add_argument(
        "--config", default="", help="extra corral.toml text, e.g. '[projector]\\nmemory_limit = \"1GB\"'"
    )
    args = parser.parse_args()
    if args.floods < 1 or args.mb < 1:
        parser.error("--floods and --mb must be positive")
    root = Path(tempfile.mkdtemp(prefix="corral-flood-"))
    try:
        result = await measure(args.floods, args.mb, args.config.replace("\\n", "\n"), root)
    except BaseException:
        with contextlib.suppress(OSError):  # what `corral up` said, before its home is removed
            sys.stderr.write((root / "home" / "up.err").read_text()[-4000:])
        raise
    finally:
        for pid in pids_matching(MARKER):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)
    peak: dict[str, float] = result["peak"]  # type: ignore[assignment]
    after: dict[str, float] = result["after"]  # type: ignore[assignment]
    idle: list[float] = result["ps_idle"]  # type: ignore[assignment]
    during: list[float] = result["ps_during"]  # type: ignore[assignment]
    print(
        f"\n{args.floods} floods of {args.mb} MB [{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores]: "
        f"{result['stored_mb']:.0f} MB queryable after {result['flood_s']:.1f} s"
    )
    print(f"{'process':<14} {'peak RSS':>10} {'after':>10}")
    for name in peak:
        shown_after = f"{after[name]:>8.0f}MB" if name in after else f"{'-':>10}"
        extra = f"  (largest shim; all shims together {result['shims_sum_peak']:.0f} MB)" if name == "shims" else ""
        print(f"{name:<14} {peak[name]:>8.0f}MB {shown_after}{extra}")
    ps_max = max(during) if during else float("nan")
    ps_p50 = statistics.median(during) if during else float("nan")
    ps_p99 = _p99(during)
    idle_p50 = statistics.median(idle)
    print(
        f"corral ps --json: idle p50 {idle_p50:.2f} s (baseline); during the floods p50 {ps_p50:.2f} s, "
        f"p99 {ps_p99:.2f} s, max {ps_max:.2f} s over {len(during)} runs"
    )
    api: list[float] = result["api_during"]  # type: ignore[assignment]
    api_max = max(api) if api else float("nan")
    api_p50 = statistics.median(api) if api else float("nan")
    api_p99 = _p99(api)
    print(
        f"ps request alone (no CLI start; after the log's last sequence): p50 {api_p50:.3f} s, "
        f"p99 {api_p99:.3f} s, max {api_max:.3f} s over {len(api)} requests ({result['api_failed']} failed)"
    )
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if os.environ.get("FLOOD_TRACE"):
        for t, last, position in result["trace"]:  # type: ignore[attr-defined]
            print(f"  t={t:6.2f}s last_seq={last} position={position} behind={last - position}")
    worker_peak = peak["DuckDB worker"]
    print_result(
        "flood",
        "worker_peak_mb",
        worker_peak,
        "baseline_worker_idle_mb",
        result["idle_worker_mb"],  # type: ignore[arg-type]
        ratio=ps_max / idle_p50 if idle_p50 else None,
        target=f"DuckDB worker <= {TARGET_WORKER_MB} MB peak, corral ps <= {TARGET_PS_S:g} s during the floods",
        met=worker_peak <= TARGET_WORKER_MB and ps_max <= TARGET_PS_S,
        worker_after_mb=after["DuckDB worker"],
        up_peak_mb=peak["corral up"],
        up_after_mb=after["corral up"],
        nats_peak_mb=peak["nats-server"],
        shim_peak_mb=peak["shims"],
        ps_max_s=ps_max,
        ps_p99_s=ps_p99,
        ps_request_max_s=api_max,
        ps_request_p99_s=api_p99,
        ps_request_p50_s=api_p50,
        ps_requests_failed=result["api_failed"],
        ps_p50_s=ps_p50,
        load_avg=os.getloadavg()[0],
        baseline_ps_idle_s=idle_p50,
        ps_runs=len(during),
        failed_queries=result["failed_queries"],
        flood_s=result["flood_s"],
        floods=args.floods,
        mb=args.mb,
    )


if __name__ == "__main__":
    asyncio.run(main())
