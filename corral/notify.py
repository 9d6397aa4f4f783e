"""`corral notify test` and `corral notify list`: the [[notify]] targets of corral.toml.

`test` sends a sample notification (an approval request, marked as a test) from this process to
every target, once, with no retry, and prints one line per target: `ok`, or `error` with what to
do next; exit 1 if any failed. It needs no running system: it checks what `corral up` would do
from this host (the URL, the network path, the webhook secret in this environment). Nothing is
recorded in the log. See docs/notifications.md.
"""

import argparse
import asyncio
import os
import sys
from typing import Any

from corral import render
from corral.config import ConfigError, NotifyTarget, load_config
from corral.home import Home


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral notify` to `sub`; return {command name: handler(home, args)}."""
    notify = sub.add_parser("notify", help="notifications ([[notify]] in corral.toml): test, list")
    actions = notify.add_subparsers(dest="notify_cmd", metavar="ACTION", required=True)
    test = actions.add_parser("test", help="send a sample notification to every target; one line each")
    test.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="the targets: name, kind, host, events, filters, signing")
    listing.add_argument("--json", action="store_true")
    return {"notify": cmd_notify}


def _targets(home: Home) -> tuple[NotifyTarget, ...]:
    config = load_config(home)
    if not config.notify:
        where = config.label if config.source else f"no corral.toml (looked at {', '.join(map(str, config.searched))})"
        raise ConfigError(f"no [[notify]] entries in {where}; add one (docs/notifications.md)")
    return config.notify


def advice(status_code: int | None, error: str, target: NotifyTarget) -> str:
    """What to do about a failed test, by what went wrong."""
    if status_code is None:
        if "secret_env" in error:
            return f"export {target.secret_env} where `corral up` runs (and here, to test)"
        if "no answer" in error:
            return "the receiver took longer than 10s: check it, or a proxy between"
        return "check the url and that the receiver runs and is reachable from this host"
    if status_code in (401, 403):
        return "the receiver refused: check the URL's token" + _slack(target, "or make a new Slack webhook")
    if status_code in (404, 410):
        return "no such endpoint: check the url" + _slack(target, "the Slack webhook may be revoked")
    if status_code >= 500:
        return "the receiver failed: its own logs say why; the notifier retries such answers"
    return "the receiver rejected the message: check the kind matches the receiver"


async def _test(targets: tuple[NotifyTarget, ...]) -> list[dict[str, Any]]:
    import httpx

    from actors.notifier import post, sample_notification

    note = sample_notification()
    async with httpx.AsyncClient(follow_redirects=False) as client:
        attempts = await asyncio.gather(*(post(client, t.for_actor(), note) for t in targets))
    rows = []
    for target, attempt in zip(targets, attempts, strict=True):
        row: dict[str, Any] = {
            "target": target.name,
            "kind": target.kind,
            "host": target.host,
            "ok": attempt.ok,
            "status_code": attempt.status_code,
            "duration_ms": attempt.duration_ms,
            "error": attempt.error,
            "next": None if attempt.ok else advice(attempt.status_code, attempt.error or "", target),
        }
        rows.append(row)
    return rows


def _slack(target: NotifyTarget, text: str) -> str:
    return f" ({text})" if target.kind == "slack" else ""


def _listing(target: NotifyTarget) -> dict[str, Any]:
    return {
        "name": target.name,
        "kind": target.kind,
        "host": target.host,
        "events": list(target.events),
        "labels": target.labels,
        "templates": list(target.templates),
        "secret_env": target.secret_env,
        "signed": bool(target.secret_env and os.environ.get(target.secret_env)),
        "on_success": target.on_success,
        "link_base": target.link_base,
    }


def _signing(target: NotifyTarget) -> str | None:
    if not target.secret_env:
        return None
    return "yes" if os.environ.get(target.secret_env) else f"no: {target.secret_env} unset here"


async def cmd_notify(home: Home, args: Any) -> int:
    targets = _targets(home)
    if args.notify_cmd == "list":
        if args.json:
            render.print_json([_listing(t) for t in targets])
            return 0
        rows = [
            [
                t.name,
                t.kind,
                t.host,
                ", ".join(t.events),
                " ".join([*(f"{k}={v}" for k, v in t.labels.items()), *t.templates]) or None,
                _signing(t),
            ]
            for t in targets
        ]
        print(render.table(["name", "kind", "host", "events", "filters", "signed"], rows))
        return 0
    results = await _test(targets)
    if args.json:
        render.print_json(results)
    else:
        for r in results:
            if r["ok"]:
                print(f"ok     {r['target']}: {r['host']} answered {r['status_code']} in {r['duration_ms']:.0f}ms")
            else:
                print(f"error  {r['target']}: {r['error']}; {r['next']}")
    failed = sum(not r["ok"] for r in results)
    if failed:
        sys.stderr.write(f"corral: {failed} of {len(results)} notification targets failed\n")
    return 1 if failed else 0
