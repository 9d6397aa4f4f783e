"""Start-up benchmark: `corral run` of a 0.1 s agent with no system running, beside the bare work.

Each `corral run` starts the embedded system (nats-server, every actor, the projector's DuckDB
worker), runs the agent in a worktree, prints its summary and stops everything: the wall time
of the whole command, and the CPU its process tree used (children waited for, from
getrusage). The baseline, in the same run and alternating with it: what the run does without
Corral, `git worktree add` + the same agent as a subprocess + `git worktree remove`.

    .venv/bin/python bench/startup.py [--runs 10] [--writes] [--compare /path/to/other/checkout] [--phases 3]

--writes: the agent also writes a file, so the run makes an exit checkpoint and its summary
waits for the checkpoint's validation (without it, nothing changed: no checkpoint to wait for).

--compare also runs `corral run` from another checkout of Corral (its code first on PYTHONPATH,
same interpreter and packages), alternating with this one: a before/after in the same run on
a shared machine. Each tree has its own CORRAL_HOME, warmed by one run not counted. Target:
p50 <= 1.5 s. Ends with one JSON line.

--phases N: after the timed runs, N more of each configuration through bench/startup_phases.py
(the CLI with a timestamp at each phase), and a table of each phase's median duration: where the
wall time goes (imports, server start, actors, worktree, shim, agent, summary, stop).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import make_repo, print_result

AGENT = ["sh", "-c", "sleep 0.1; echo done"]
WRITING_AGENT = ["sh", "-c", "sleep 0.1; echo change > CHANGED.txt; echo done"]


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every child it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "done" not in done.stdout:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def corral_run(tree: Path | None, home: Path, repo: Path, root: Path, agent: list[str]) -> tuple[float, float]:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_NATS_URL", None)
    # as an installed corral runs: with Python's bytecode cache (pip compiles what it installs; a
    # shell with PYTHONDONTWRITEBYTECODE=1 made every run compile Corral's modules again, ~0.15 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return timed([sys.executable, "-m", "corral", "run", "--repo", str(repo), "-q", "--", *agent], env, root)


# (label, from mark, to mark): None is the launch of the command. Marks: bench/startup_phases.py.
PHASES = (
    ("interpreter start", None, "interpreter ready"),
    ("imports", "interpreter ready", "imported"),
    ("arguments, request checked, lock", "imported", "server start begin"),
    ("nats-server start (ready)", "server start begin", "server start end"),
    ("streams provisioned", "provision begin", "provision end"),
    ("actors connect and start", "actors start begin", "actors start end"),
    ("request -> claimed", "actors start end", "execution.claimed"),
    ("claimed -> worktree made", "execution.claimed", "workspace.created"),
    ("worktree -> agent started (shim)", "workspace.created", "execution.started"),
    ("agent runs (0.1 s)", "execution.started", "execution.exited"),
    ("exit -> summary (projector catch-up, queries)", "execution.exited", "summary end"),
    ("stop: actors", "shutdown begin", "projector stop begin"),
    ("stop: projector", "projector stop begin", "projector stop end"),
    ("  of which its worker's close", "projector worker close begin", "projector worker close end"),
    ("stop: nats-server", "server stop begin", "server stop end"),
    ("stopped -> process exit", "shutdown end", "exit"),
    ("(beside them) projector start", "projector start begin", "projector start end"),
    ("total, launch -> exit", None, "exit"),
)
PHASE_SCRIPT = Path(__file__).resolve().parent / "startup_phases.py"


def traced_run(tree: Path | None, home: Path, repo: Path, root: Path, agent: list[str]) -> dict[str, float]:
    """One `corral run` through bench/startup_phases.py: {mark: seconds since the launch}."""
    env = {**os.environ, "CORRAL_HOME": str(home)}
    env.pop("CORRAL_NATS_URL", None)
    # as an installed corral runs: with Python's bytecode cache (pip compiles what it installs; a
    # shell with PYTHONDONTWRITEBYTECODE=1 made every run compile Corral's modules again, ~0.15 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, str(PHASE_SCRIPT), "run", "--repo", str(repo), "-q", "--", *agent]
    env["CORRAL_T0"] = repr(time.time())
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"traced run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    line = next(line for line in done.stderr.splitlines() if line.startswith("PHASES "))
    marks: dict[str, float] = json.loads(line.removeprefix("PHASES "))
    return marks


def phase_table(traces: dict[str, list[dict[str, float]]]) -> None:
    names = list(traces)
    print(f"phases, median of {len(next(iter(traces.values())))} traced runs each (ms):")
    print(f"{'phase':<46}" + "".join(f"{name[:14]:>15}" for name in names))
    for label, start, end in PHASES:
        cells = []
        for name in names:
            spans = [
                (marks[end] - (marks[start] if start else 0.0)) * 1000
                for marks in traces[name]
                if end in marks and (start is None or start in marks)
            ]
            cells.append(f"{statistics.median(spans):15.0f}" if spans else f"{'-':>15}")
        print(f"{label:<46}" + "".join(cells))


def bare_run(repo: Path, root: Path, n: int, agent: list[str]) -> tuple[float, float]:
    """git worktree add, the agent, git worktree remove: the work without Corral."""
    path = root / f"bare-{n}"
    script = (
        f"git -C {repo} worktree add -q -b bare/{n} {path} HEAD && "
        f"(cd {path} && {' '.join(agent[:2])} '{agent[2]}') && "
        f"git -C {repo} worktree remove --force {path}"
    )
    return timed(["sh", "-c", script], dict(os.environ), root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="runs counted per configuration")
    parser.add_argument("--compare", type=Path, help="another checkout of Corral to run alternately")
    parser.add_argument(
        "--writes", action="store_true", help="the agent writes a file: an exit checkpoint, validated, is waited for"
    )
    parser.add_argument("--phases", type=int, default=0, metavar="N", help="N traced runs each: a table of phases")
    args = parser.parse_args()
    agent = WRITING_AGENT if args.writes else AGENT
    if args.compare is not None and not (args.compare / "corral" / "__init__.py").is_file():
        parser.error(f"--compare {args.compare}: not a checkout of Corral (no corral/__init__.py)")
    root = Path(tempfile.mkdtemp(prefix="corral-startup-"))
    configs: dict[str, Path | None] = {"corral": None}
    if args.compare is not None:
        configs[f"compare ({args.compare.name})"] = args.compare.resolve()
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in [*configs, "bare"]}
    try:
        repo = make_repo(root / "repo")
        for i in range(args.runs + 1):  # the first of each warms its home and the page cache
            for name, tree in configs.items():
                result = corral_run(tree, root / f"home-{list(configs).index(name)}", repo, root, agent)
                if i:
                    figures[name].append(result)
            result = bare_run(repo, root, i, agent)
            if i:
                figures["bare"].append(result)
            print(f"  {i}/{args.runs}", file=sys.stderr, flush=True)
        traces: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
        for _ in range(args.phases):
            for name, tree in configs.items():
                traces[name].append(traced_run(tree, root / f"home-{list(configs).index(name)}", repo, root, agent))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"`corral run` of `{' '.join(agent)}`, no system running: {args.runs} runs each, alternating")
    print(f"{'':<24} {'wall p50':>9} {'wall max':>9} {'cpu p50':>8}")
    p50 = {name: statistics.median(w for w, _ in runs) for name, runs in figures.items()}
    for name, runs in figures.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"{name:<24} {p50[name]:8.2f}s {max(walls):8.2f}s {statistics.median(cpus):7.2f}s")
    print(f"target: corral p50 <= 1.5 s: {'met' if p50['corral'] <= 1.5 else 'NOT met'}")
    if args.phases:
        phase_table(traces)
    print_result(
        "startup",
        "wall_p50_s",
        p50["corral"],
        "baseline_wall_p50_s",
        p50["bare"],
        ratio=p50["corral"] / p50["bare"],
        target="corral run p50 <= 1.5 s",
        met=p50["corral"] <= 1.5,
        cpu_p50_s=statistics.median(c for _, c in figures["corral"]),
        baseline_cpu_p50_s=statistics.median(c for _, c in figures["bare"]),
        runs=args.runs,
        agent_writes=args.writes,
        compare_wall_p50_s=next((p50[name] for name in configs if name != "corral"), None),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
