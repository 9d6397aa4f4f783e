"""A small deterministic agent: reads its task from argv, edits files, prints progress, sleeps a little.

Usage: python examples/agent.py [TASK] [--steps N] [--sleep S] [--exit CODE] [--heartbeat]
                                [--read-input] [--grandchild] [--ignore-term]
                                [--ask-approval CATEGORY] [--exit-for-approval]
Same task and options give the same file edits every time, so replays can be compared.
--read-input echoes stdin lines (and appends them to inputs.txt) until a `quit` line or EOF;
--grandchild starts a sleeping process in its own session; --ignore-term ignores SIGTERM.
--ask-approval asks for an approval (docs/approvals.md) and waits on stdin for the decision
(exit 3 when refused); --exit-for-approval exits 90 unless CORRAL_APPROVAL_ID is set.
"""

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", nargs="?", default="say hello")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.1)
    parser.add_argument("--exit", type=int, default=0, dest="exit_code")
    parser.add_argument("--heartbeat", action="store_true", help="write heartbeat control lines")
    parser.add_argument("--lines", type=int, default=1, help="output lines per step")
    parser.add_argument("--read-input", action="store_true", help="echo stdin lines until `quit` or EOF")
    parser.add_argument("--grandchild", action="store_true", help="start a sleeper in its own session")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--ask-approval", metavar="CATEGORY", help="ask for an approval and wait for the decision")
    parser.add_argument("--exit-for-approval", action="store_true", help="exit 90 unless CORRAL_APPROVAL_ID is set")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(f"agent: grandchild pid {child.pid}", flush=True)

    if args.exit_for_approval:
        if not os.environ.get("CORRAL_APPROVAL_ID"):
            print("agent: needs an approval, exiting 90", flush=True)
            return 90
        print(f"agent: approved by {os.environ['CORRAL_APPROVAL_ID']} ({os.environ.get('CORRAL_APPROVAL_CHOICE')})")
    if args.ask_approval:
        question = {"question": f"may I {args.task}?", "options": ["yes", "no"], "category": args.ask_approval}
        sys.stderr.write(json.dumps({"corral": "approval_needed", **question}) + "\n")
        sys.stderr.flush()
        approval_id = None
        for line in sys.stdin:
            message = json.loads(line) if line.startswith("{") else {}
            if message.get("corral") == "approval_registered":
                approval_id = message["approval_id"]
                print(f"agent: waiting for {approval_id}", flush=True)
            elif message.get("corral") == "approval_decision" and message.get("approval_id") == approval_id:
                verdict = "approved" if message["approved"] else "expired" if message.get("expired") else "rejected"
                print(f"agent: {approval_id} {verdict} choice={message.get('choice')}", flush=True)
                if not message["approved"]:
                    return 3
                break
    slug = hashlib.sha256(args.task.encode()).hexdigest()[:8]
    work = Path("agent-output")
    work.mkdir(exist_ok=True)
    print(f"agent: task {args.task!r} ({args.steps} steps)", flush=True)
    for step in range(1, args.steps + 1):
        target = work / f"step-{step}.txt"
        target.write_text(f"task: {args.task}\nstep: {step}\nslug: {slug}\n")
        for line in range(args.lines):
            print(f"step {step}/{args.steps}: wrote {target} [{line}]", flush=True)
        if args.heartbeat:
            sys.stderr.write(json.dumps({"corral": "heartbeat", "progress": step / args.steps}) + "\n")
            sys.stderr.flush()
        time.sleep(args.sleep)
    if args.read_input:
        for line in sys.stdin:
            text = line.rstrip("\n")
            if text == "quit":
                break
            with Path("inputs.txt").open("a") as log:
                log.write(text + "\n")
            print(f"input: {text}", flush=True)
    notes = Path("NOTES.md")
    notes.write_text(f"# Notes\n\nDone: {args.task}\n")
    print(f"agent: done, {args.steps} files written", flush=True)
    if args.exit_code:
        print(f"agent: exiting with {args.exit_code}", file=sys.stderr, flush=True)
    return args.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
