"""Human approvals: approvals, approve, reject.

`corral approvals` reads every `approval.*` event from the log (no projection needed) and lists
pending approvals first. `corral approve` / `corral reject` send the decision to the approvers on
`corral.api.approval.decide.<NATS user>` (the approver records `approval.decision.submitted` with
that authenticated user as `decided_by`) and wait for the answer: `approval.granted` /
`approval.denied` caused by that submission, or `control.rejected` saying who decided first.
See docs/approvals.md and docs/security.md.
"""

import argparse
from datetime import datetime
from typing import Any

from corral import render
from corral.home import Home


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add this module's subcommands to `sub`; return {command name: handler(home, args)}."""
    listing = sub.add_parser("approvals", help="list approvals: pending first (id, execution, category, question, age)")
    listing.add_argument("--all", action="store_true", help="include decided and expired approvals")
    listing.add_argument("--json", action="store_true")
    approve = sub.add_parser("approve", help="grant a pending approval (the first decision wins)")
    approve.add_argument("approval_id", metavar="AP_ID")
    approve.add_argument("--choice", help="one of the approval's options")
    approve.add_argument("--note", help="a note for the agent and the record")
    approve.add_argument(
        "--raise-budget",
        type=float,
        metavar="USD",
        help="a budget approval: continue until the execution's cost reaches USD (default: no limit)",
    )
    approve.add_argument("--json", action="store_true", help="print the confirming event")
    reject = sub.add_parser("reject", help="deny a pending approval (the first decision wins)")
    reject.add_argument("approval_id", metavar="AP_ID")
    reject.add_argument("--note", help="a note for the agent and the record")
    reject.add_argument("--json", action="store_true", help="print the confirming event")
    return {"approvals": cmd_approvals, "approve": cmd_approve, "reject": cmd_reject}


def _age(ts: datetime, now: datetime) -> float:
    return max(0.0, (now - ts).total_seconds())


async def cmd_approvals(home: Home, args: Any) -> int:
    from corral.client import Client

    async with Client.connect(home, actors=()) as client:
        listed = await client.approvals(all=args.all)
    if args.json:
        render.print_json(listed)
        return 0
    if not listed:
        print("no pending approvals" if not args.all else "no approvals")
        return 0
    rows = []
    for a in listed:
        question = a["question"] if len(a["question"]) <= 70 else a["question"][:67] + "..."
        state = a["state"] if a["state"] == "pending" else f"{a['state']} ({a['decided_by'] or '-'})"
        rows.append(
            [
                a["approval_id"],
                a["execution_id"],
                state,
                a["category"],
                a["source"],
                render.human_duration(a["age_s"]),
                question,
            ]
        )
    print(render.table(["id", "execution", "state", "category", "source", "age", "question"], rows))
    return 0


async def _decide(home: Home, args: Any, approve: bool) -> int:
    from corral.client import Client

    choice = getattr(args, "choice", None)
    async with Client.connect(home, actors=("approver",)) as client:
        answer = await client.decide(
            args.approval_id,
            approve=approve,
            choice=choice,
            note=args.note,
            raise_budget=getattr(args, "raise_budget", None),
        )
    approval_id, execution_id = answer["data"]["approval_id"], answer["execution_id"]
    if args.json:
        render.print_json(answer)
    else:
        if choice:  # the answer is the option picked, whatever its wording ("no" is not "approved")
            print(f"{approval_id}: answered {choice!r}; execution {execution_id}")
        else:
            verb = "approved" if answer["type"] == "approval.granted" else "rejected"
            print(f"{approval_id}: {verb}; execution {execution_id}")
    return 0


async def cmd_approve(home: Home, args: Any) -> int:
    return await _decide(home, args, True)


async def cmd_reject(home: Home, args: Any) -> int:
    return await _decide(home, args, False)
