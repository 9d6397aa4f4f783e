"""Notification latency: `approval.requested` published → the webhook received, under a real `corral up`.

Starts `corral up` (embedded NATS) on a temporary CORRAL_HOME whose corral.toml has one signed
`[[notify]]` webhook pointing at an http.server in this process, then publishes N
`approval.requested` events (as the `admin` NATS user, at --rate per second) and times, for each,
publish → the POST arriving at the receiver (matched by `X-Corral-Delivery`, the event id).

Baseline in the same run: a plain nats-py subscriber (core NATS, this process) on the same subject
receiving the same events: what any consumer of the bus pays. The ratio is Corral's p99 over
the baseline's. Target: p99 <= 1 s. Ends with one JSON line.

    .venv/bin/python bench/notify.py [--events 300] [--rate 20]
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import start_up, stop_up, wait_ready


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # many notifications at once: the default backlog (5) resets connections


class Receiver:
    """The webhook endpoint: records when each delivery id arrived (perf_counter)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                now = time.perf_counter()
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.arrived.setdefault(self.headers.get("X-Corral-Delivery") or "", now)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def measure(home: Path, url: str, receiver: Receiver, events: int, rate: float) -> dict[str, Any]:
    from actors.bus import connect_bus
    from events.auth import ensure_credentials
    from events.envelope import new_event
    from events.types import ApprovalRequested

    admin = ensure_credentials(home).get("admin")
    bus = await connect_bus(url, name="bench-notify", credentials=admin)
    baseline_arrived: dict[str, float] = {}

    async def on_msg(msg: Any) -> None:
        now = time.perf_counter()
        baseline_arrived.setdefault(json.loads(msg.data)["id"], now)

    sub = await bus.nc.subscribe("corral.evt.*.approval.requested", cb=on_msg)
    await bus.nc.flush()
    published: dict[str, float] = {}
    try:
        # Warm-up: the notifier's consumer exists and its HTTP connection is open.
        warm = new_event("benchwarm", ApprovalRequested(approval_id="AP-WARM00", question="?"), actor="approver-b-1")
        await bus.publisher.publish(warm)
        deadline = time.monotonic() + 30
        while warm.id not in receiver.arrived:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm-up notification never arrived; see {home / 'up.err'}")
            await asyncio.sleep(0.05)
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(events):
            event = new_event(
                f"bench{i % 50:03d}",
                ApprovalRequested(approval_id=f"AP-{i:06d}", question=f"may the agent do thing {i}?"),
                actor="approver-bench-1",
            )
            published[event.id] = time.perf_counter()
            await bus.publisher.publish(event)
            await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the receiver is another thread: polled
            if all(e in receiver.arrived for e in published):
                break
            await asyncio.sleep(0.1)
    finally:
        await sub.unsubscribe()
        await bus.close()
    corral = [(receiver.arrived[e] - t) * 1000 for e, t in published.items() if e in receiver.arrived]
    baseline = [(baseline_arrived[e] - t) * 1000 for e, t in published.items() if e in baseline_arrived]
    return {"corral": corral, "baseline": baseline, "missing": events - len(corral)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="events published per second")
    args = parser.parse_args()
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "corral.toml").write_text(
            f'[[notify]]\nname = "bench"\nkind = "webhook"\nurl = "{receiver.url}"\nsecret_env = "BENCH_HOOK_SECRET"\n'
        )
        os.environ["BENCH_HOOK_SECRET"] = "bench-secret"
        up = start_up(home, Path(tmp))
        try:
            url = asyncio.run(wait_ready(home, up))
            result = asyncio.run(measure(home, url, receiver, args.events, args.rate))
        finally:
            stop_up(up, "(notify bench)")
            receiver.close()
    corral, baseline = result["corral"], result["baseline"]
    if not corral or not baseline:
        print(json.dumps({"bench": "notify", "error": "nothing received", "missing": result["missing"]}))
        return 1
    figures = {
        "corral_p50_ms": round(statistics.median(corral), 2),
        "corral_p99_ms": round(pct(corral, 0.99), 2),
        "baseline_p50_ms": round(statistics.median(baseline), 2),
        "baseline_p99_ms": round(pct(baseline, 0.99), 2),
    }
    ratio = figures["corral_p99_ms"] / max(figures["baseline_p99_ms"], 0.001)
    print(f"notify: {args.events} approval.requested at {args.rate:g}/s, signed webhook on 127.0.0.1")
    print(f"{'path':<34} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'corral: publish -> webhook POST':<34} {figures['corral_p50_ms']:8.2f} {figures['corral_p99_ms']:8.2f}")
    print(
        f"{'baseline: publish -> nats-py sub':<34} {figures['baseline_p50_ms']:8.2f} {figures['baseline_p99_ms']:8.2f}"
    )
    met = figures["corral_p99_ms"] <= 1000 and result["missing"] == 0
    print(f"ratio (p99) {ratio:.1f}x; missing {result['missing']}; target p99 <= 1 s: {'met' if met else 'NOT met'}")
    print(
        json.dumps(
            {
                "bench": "notify",
                "events": args.events,
                "rate": args.rate,
                **figures,
                "ratio_p99": round(ratio, 2),
                "missing": result["missing"],
                "target_p99_ms": 1000,
                "met": met,
            }
        )
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
