"""Run every benchmark in sequence, then print one summary table and one JSON line.

Each bench runs as its own process (`.venv/bin/python bench/NAME.py`), its human table passing
through as it comes; its result is its last stdout line that is a JSON object with a "bench" key
(bench/common.py `print_result`: the headline figure, the baseline's in the same run, the ratio,
the target and whether this run met it). A bench that fails, times out or prints no such line is
in the table as an error, and the others still run.

    .venv/bin/python bench/all.py [--quick] [--only ingest,search] [--skip load] [--timeout S]

--quick runs the sizes of QUICK (a few minutes in all on 2 cores): enough to see that every
bench works and roughly where it stands, not figures to compare with full runs (start-up weighs
more; `met` says whether this run reached the target, at whatever size). Without --quick every
bench runs at its own defaults (an hour or more). The exit status is 1 when a bench failed.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NOT_BENCHES = {"all", "common", "__init__"}
# The order they run in (cheap and CPU-bound first, the ones running many agents last); a bench
# added to bench/ and not named here runs after them.
ORDER = [
    "validate",
    "checkpoint",
    "verify",
    "ingest",
    "rebuild",
    "search",
    "disk_quota",
    "startup",
    "spawn",
    "notify",
    "api",
    "console",
    "pipeline",
    "supervise",
    "flood",
    "load",
]
QUICK: dict[str, list[str]] = {
    "validate": ["--runs", "30"],
    "checkpoint": ["--files", "200", "--rounds", "10"],
    "verify": ["--events", "30000", "--rounds", "1"],
    "ingest": ["--events", "30000"],
    "rebuild": ["--events", "30000"],
    "search": ["--rows", "100000", "--repeat", "3"],
    "disk_quota": ["--files", "50", "--rounds", "3"],
    "startup": ["--runs", "3"],
    "spawn": ["--n", "10", "--warmup", "2"],
    "notify": ["--events", "60", "--rate", "20"],
    "api": ["--clients", "10", "--rate", "200", "--seconds", "3", "--history", "1000"],
    "console": ["--history", "1000", "--events", "200", "--rate", "100", "--loads", "2"],
    "pipeline": ["--tickets", "20"],
    "supervise": ["--agents", "20", "--window", "5"],
    "flood": ["--floods", "2", "--mb", "5"],
    "load": ["--agents", "20", "--duration", "5"],
}
# Benches whose JSON line predates print_result: where their headline figures are.
HEADLINES = {"notify": ("corral_p99_ms", "baseline_p99_ms", "ratio_p99")}


def benches() -> list[str]:
    found = {p.stem for p in HERE.glob("*.py")} - NOT_BENCHES
    return [name for name in ORDER if name in found] + sorted(found - set(ORDER))


def run(name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one bench, passing its output through; its result line, or an error."""
    command = [sys.executable, str(HERE / f"{name}.py"), *args]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    result: dict[str, Any] | None = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent) as process:
        # past the time allowed: SIGTERM (the benches clean up in their `finally`s), SIGKILL 120 s later
        timers = [threading.Timer(timeout_s, process.terminate), threading.Timer(timeout_s + 120, process.kill)]
        for timer in timers:
            timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                result = _result(line) or result
            process.wait()
        finally:
            for timer in timers:
                timer.cancel()
    seconds = time.monotonic() - started
    if seconds >= timeout_s:
        return {"bench": name, "error": f"timed out after {timeout_s:.0f}s", "seconds": seconds}
    seconds = time.monotonic() - started
    if result is None:
        return {"bench": name, "error": f"no result line (exit {process.returncode})", "seconds": seconds}
    return {**result, "exit": process.returncode, "seconds": seconds}


def _result(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and "bench" in parsed else None


def headline(result: dict[str, Any]) -> tuple[str, Any, Any, Any, Any]:
    """(figure name, value, baseline value, ratio, target) of one result line."""
    if "figure" in result:
        figure = result["figure"]
        keys = list(result)  # print_result writes the baseline's key right after the figure's
        after = keys[keys.index(figure) + 1] if figure in keys and keys.index(figure) + 1 < len(keys) else ""
        baseline = after if after not in ("ratio", "target", "met") else ""
        return figure, result.get(figure), result.get(baseline), result.get("ratio"), result.get("target")
    figure, baseline, ratio = HEADLINES.get(result["bench"], ("", "", "ratio"))
    target = result.get("target") or next((f"{k} {v}" for k, v in result.items() if k.startswith("target")), None)
    return figure, result.get(figure), result.get(baseline), result.get(ratio), target


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes, not an hour")
    parser.add_argument("--only", default="", help="comma-separated benches to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benches not to run")
    parser.add_argument("--timeout", type=float, help="seconds per bench (default 600 with --quick, else 3600)")
    args = parser.parse_args()
    names = benches()
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    unknown = (only | skip) - set(names)
    if unknown:
        parser.error(f"no such bench: {', '.join(sorted(unknown))} (there are: {', '.join(names)})")
    names = [n for n in names if (not only or n in only) and n not in skip]
    timeout_s = args.timeout or (600.0 if args.quick else 3600.0)
    results = [run(name, QUICK.get(name, []) if args.quick else [], timeout_s) for name in names]

    print(f"\nsummary ({'--quick sizes' if args.quick else 'full sizes'}, {len(results)} benches)")
    header = f"{'bench':<11} {'figure':<18} {'corral':>10} {'baseline':>10} {'ratio':>7} {'met':>5} {'s':>5}  target"
    print(header)
    print("-" * len(header))
    for result in results:
        if "error" in result:
            print(f"{result['bench']:<11} ERROR: {result['error']} ({result['seconds']:.0f}s)")
            continue
        figure, value, baseline, ratio, target = headline(result)
        met = {True: "yes", False: "NO", None: "-"}.get(result.get("met"), "?")
        print(
            f"{result['bench']:<11} {figure:<18} {cell(value):>10} {cell(baseline):>10} {cell(ratio):>7} "
            f"{met:>5} {result['seconds']:>5.0f}  {cell(target)}"
        )
    errors = [r["bench"] for r in results if "error" in r]
    summary = {
        "bench": "all",
        "quick": args.quick,
        "met": sum(r.get("met") is True for r in results),
        "missed": [r["bench"] for r in results if r.get("met") is False],
        "errors": errors,
        "results": [{k: v for k, v in r.items() if k != "queries"} for r in results],
    }
    print(json.dumps(summary), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
