"""HTML of the console's pages: plain strings, every value escaped here (no template engine needed).

The pages carry no inline script (the Content-Security-Policy forbids it): data the script needs
rides in data- attributes and in <script type="application/json"> blocks, which browsers never run.
"""

import json
import re
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

STATES = ("requested", "queued", "claimed", "running", "paused", "exited", "failed")
AGENTS = ("command", "claude-code", "codex", "gemini", "aider")


def e(value: Any) -> str:
    """Escape for HTML text and quoted attributes."""
    return escape("" if value is None else str(value), quote=True)


def data_json(element_id: str, value: Any) -> str:
    text = json.dumps(value, default=str).replace("<", "\\u003c")
    return f'<script type="application/json" id="{e(element_id)}">{text}</script>'


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">'


def layout(
    title: str,
    main: str,
    *,
    page: str,
    who: Any = None,
    message: str | None = None,
    error: bool = False,
    approvals: int = 0,
) -> str:
    nav = ""
    body_attrs = f'data-page="{e(page)}"'
    if who is not None:
        body_attrs += f' data-csrf="{e(who.session.csrf)}" data-role="{e(who.token.role)}" data-approvals="{approvals}"'
        links = [
            ("/", "Fleet", "fleet"),
            ("/approvals", "Approvals", "approvals"),
            ("/new", "Start a run", "new"),
            ("/search", "Search", "search"),
            ("/compare", "Compare", "compare"),
            ("/health", "Health", "health"),
        ]
        items = "".join(
            f'<a href="{href}"{" aria-current=page" if key == page else ""}>{label}'
            + (f' <span class="count" id="nav-approvals">{approvals or ""}</span>' if key == "approvals" else "")
            + "</a>"
            for href, label, key in links
        )
        nav = (
            f'<nav>{items}</nav><div class="who"><span title="token">{e(who.token.name)} '
            f"<small>({e(who.token.role)})</small></span>"
            '<button type="button" id="notify" hidden>Notify me</button>'
            f'<form method="post" action="/logout">{csrf_field(who.session.csrf)}'
            '<button type="submit" id="sign-out">Sign out</button></form></div>'
        )
    flash = f'<div id="flash" role="status" class="{"error" if error else "ok"}"{"" if message else " hidden"}>'
    flash += f"{e(message)}</div>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · Corral</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script></head>'
        f'<body {body_attrs}><header><a class="brand" href="/">Corral</a>{nav}</header>'
        f"{flash}<main>{main}</main></body></html>"
    )


# --- small pieces ------------------------------------------------------------------------------


def ts_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def when(value: Any) -> str:
    """A time the script renders as an age (`3m ago`), with the UTC time as its title."""
    text = ts_text(value)
    if not text:
        return ""
    return f'<time datetime="{e(text)}" title="{e(text)}" class="age">{e(text[:19].replace("T", " "))}</time>'


def seconds(value: Any) -> str:
    if value is None:
        return ""
    s = float(value)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def money(value: Any) -> str:
    return f"${float(value):.4f}" if value else ""


def state_badge(state: Any, element_id: str | None = None) -> str:
    attr = f' id="{e(element_id)}"' if element_id else ""
    return f'<span class="state s-{e(state)}"{attr}>{e(state)}</span>'


def short(text: Any, n: int = 80) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= n else value[: n - 1] + "…"


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain(text: Any) -> str:
    return ANSI.sub("", "" if text is None else str(text))


def table(headers: list[str], rows: list[list[str]], *, cls: str = "", empty: str = "nothing") -> str:
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td data-label="{e(h)}">{c}</td>' for h, c in zip(headers, row, strict=False)) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def link_x(execution_id: Any) -> str:
    return f'<a class="xid" href="/x/{e(execution_id)}">{e(execution_id)}</a>'


def field_input(name: str, label: str, value: Any = "", *, kind: str = "text", extra: str = "") -> str:
    return f'<label>{e(label)} <input type="{kind}" name="{e(name)}" value="{e(value)}" {extra}></label>'


def select(name: str, label: str, options: list[tuple[str, str]], value: Any = "") -> str:
    opts = "".join(
        f'<option value="{e(v)}"{" selected" if str(v) == str(value or "") else ""}>{e(t)}</option>' for v, t in options
    )
    return f'<label>{e(label)} <select name="{e(name)}">{opts}</select></label>'


def action_form(action: str, csrf: str, inner: str, *, cls: str = "act", confirm: str | None = None) -> str:
    attrs = f' data-confirm="{e(confirm)}"' if confirm else ""
    return f'<form method="post" action="{e(action)}" class="{cls}" data-async{attrs}>{csrf_field(csrf)}{inner}</form>'


# --- sign in -----------------------------------------------------------------------------------


def login_page(nonce: str, next_path: str, message: str | None = None, *, error: bool = True) -> str:
    main = (
        '<section class="login"><h1>Sign in</h1>'
        '<form method="post" action="/login">'
        f'<input type="hidden" name="csrf" value="{e(nonce)}"><input type="hidden" name="next" value="{e(next_path)}">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" required autofocus '
        'placeholder="corral_…"></label><button type="submit">Sign in</button></form>'
        "<p>Make one with <code>corral token create NAME --role operator</code> (or <code>--role tap</code> "
        "to look without touching).</p></section>"
    )
    return layout("Sign in", main, page="login", message=message, error=error)


# --- fleet -------------------------------------------------------------------------------------


def fleet_row(row: dict[str, Any]) -> str:
    labels = row.get("labels") or {}
    label_text = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    need = row.get("needs") or ""
    text = " ".join(
        str(x)
        for x in (row["execution_id"], row.get("task") or "", " ".join(row.get("command") or []), row.get("repo"))
    )
    progress = row.get("progress")
    progress_cell = f"{float(progress) * 100:.0f}%" if progress not in (None, "") else ""
    duration = row.get("duration_s")
    started = ts_text(row.get("started_at"))
    attrs = {
        "id": f"x-{row['execution_id']}",
        "data-id": row["execution_id"],
        "data-state": row.get("state"),
        "data-agent": row.get("agent") or "",
        "data-repo": row.get("repo") or "",
        "data-labels": json.dumps(labels),
        "data-text": text.lower(),
        "data-started": started if row.get("state") in ("running", "paused") else "",
        "data-approvals": str(row.get("approvals_pending") or 0),
        "data-cost": str(row.get("cost_usd") or 0),
        "class": "need" if need else "",
    }
    attr_text = " ".join(f'{k}="{e(v)}"' for k, v in attrs.items())
    task = row.get("task") or " ".join(row.get("command") or [])
    return (
        f"<tr {attr_text}>"
        f'<td data-label="id">{link_x(row["execution_id"])}<div class="task">{e(short(task, 90))}</div></td>'
        f'<td data-label="state" class="c-state">{state_badge(row.get("state"))}</td>'
        f'<td data-label="needs" class="c-need">{e(need)}</td>'
        f'<td data-label="agent">{e(row.get("agent"))}</td>'
        f'<td data-label="repo" title="{e(row.get("repo"))}">{e(str(row.get("repo") or "").rsplit("/", 1)[-1])}</td>'
        f'<td data-label="labels" class="c-labels">{e(label_text)}</td>'
        f'<td data-label="age">{when(row.get("requested_at"))}</td>'
        f'<td data-label="duration" class="c-duration">{seconds(duration)}</td>'
        f'<td data-label="progress" class="c-progress">{progress_cell}</td>'
        f'<td data-label="cost" class="c-cost">{money(row.get("cost_usd"))}</td>'
        f'<td data-label="last output" class="c-last"><code>{e(short(plain(row.get("last_line")), 120))}</code></td>'
        "</tr>"
    )


def fleet_page(
    who: Any,
    rows: list[dict[str, Any]],
    counts: dict[str, int],
    filters: dict[str, str],
    *,
    active: dict[str, str],
    limit: int,
    total: int,
    approvals: int,
    message: str | None,
) -> str:
    base = {k: v for k, v in filters.items() if v and k != "state"}
    count_links = "".join(
        f'<a href="/?{e(urlencode({**base, "state": s}))}" class="cnt s-{s}'
        f'{" on" if filters.get("state") == s else ""}">{s} <b data-count="{s}">{counts.get(s, 0)}</b></a>'
        for s in STATES
    )
    count_links = f'<a href="/?{e(urlencode(base))}" class="cnt">all <b data-count="all">{total}</b></a>' + count_links
    form = (
        '<form method="get" action="/" class="filters">'
        + select("state", "state", [("", "any")] + [(s, s) for s in STATES], filters.get("state"))
        + select("agent", "agent", [("", "any")] + [(a, a) for a in AGENTS], filters.get("agent"))
        + field_input("label", "label", filters.get("label"), extra='placeholder="team=web"')
        + field_input("repo", "repo", filters.get("repo"))
        + field_input("q", "text", filters.get("q"), kind="search")
        + '<button type="submit">Filter</button> <a href="/">clear</a></form>'
    )
    headers = [
        "run",
        "state",
        "needs you",
        "agent",
        "repo",
        "labels",
        "age",
        "duration",
        "progress",
        "cost",
        "last output",
    ]
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(fleet_row(r) for r in rows)
    more = ""
    if len(rows) >= limit:
        more = f'<p><a href="/?{e(urlencode({**filters, "limit": limit * 4}))}">show more</a></p>'
    main = (
        f'<h1>Fleet</h1><div class="counts">{count_links}</div>{form}'
        f'<div class="scroll"><table id="fleet" class="fleet"><thead><tr>{head}</tr></thead>'
        f'<tbody id="fleet-rows">{body}</tbody></table></div>'
        f'<p class="empty" id="fleet-empty"{" hidden" if rows else ""}>no executions match</p>{more}'
        + data_json("filters", filters)
        + data_json("active", active)
    )
    return layout("Fleet", main, page="fleet", who=who, message=message, approvals=approvals)


# --- one execution ------------------------------------------------------------------------------


def status_list(status: dict[str, Any]) -> str:
    limits = status.get("limits") or {}
    budget = status.get("max_cost_usd") or (limits.get("max_cost_usd") if isinstance(limits, dict) else None)
    items = [
        ("state", state_badge(status.get("state"), "x-state")),
        ("needs you", f'<span id="x-need">{e(status.get("needs_you") or "")}</span>'),
        ("reason", e(status.get("reason") or status.get("error") or "")),
        ("agent", e(status.get("agent") or "")),
        ("requested", when(status.get("requested_at"))),
        ("started", when(status.get("started_at"))),
        (
            "elapsed",
            f'<span id="x-elapsed" data-started="{e(ts_text(status.get("started_at")))}" '
            f'data-ended="{e(ts_text(status.get("ended_at")))}">{seconds(status.get("elapsed_s"))}</span>',
        ),
        ("hard timeout", seconds(status.get("timeout_s"))),
        (
            "time left",
            f'<span id="x-left" data-deadline="{e(ts_text(status.get("hard_deadline")))}">'
            f"{seconds(status.get('hard_remaining_s'))}</span>"
            if status.get("hard_deadline") and status.get("state") in ("running", "paused")
            else "",
        ),
        ("idle timeout", seconds(status.get("idle_timeout_s"))),
        (
            "exit",
            e("" if status.get("exit_code") is None else f"{status.get('exit_code')} ({status.get('exit_reason')})"),
        ),
        (
            "tokens",
            e(f"{status.get('input_tokens') or 0} in / {status.get('output_tokens') or 0} out")
            if status.get("input_tokens") is not None
            else "",
        ),
        (
            "cost",
            f'<span id="x-cost">{money(status.get("cost_usd")) or "$0"}</span>'
            + (f" of ${float(budget):.2f}" if budget else ""),
        ),
        ("worktree", f"<code>{e(status.get('worktree') or '')}</code>"),
        ("command", f"<code>{e(' '.join(status.get('command') or []))}</code>"),
    ]
    return '<dl class="status">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items if v) + "</dl>"


def controls(execution_id: str, csrf: str) -> str:
    base = f"/x/{execution_id}"
    return (
        '<section class="controls"><h2>Control</h2>'
        + action_form(
            f"{base}/input",
            csrf,
            '<input name="text" placeholder="a line for the agent\'s stdin" aria-label="input" required>'
            '<button type="submit" name="go" value="input">Send input</button>',
        )
        + '<div class="buttons">'
        + action_form(f"{base}/pause", csrf, '<button type="submit" name="go" value="pause">Pause</button>')
        + action_form(f"{base}/resume", csrf, '<button type="submit" name="go" value="resume">Resume</button>')
        + action_form(
            f"{base}/cancel",
            csrf,
            '<button type="submit" name="go" value="cancel" class="danger">Cancel</button>',
            confirm="Cancel this execution?",
        )
        + action_form(
            f"{base}/extend",
            csrf,
            '<input name="seconds" type="number" min="1" value="600" aria-label="seconds" class="narrow">'
            '<button type="submit" name="go" value="extend">Extend (s)</button>',
        )
        + "</div></section>"
    )


def lineage(execution_id: str, links: list[dict[str, Any]]) -> str:
    rows = []
    for link in links:
        rows.append(f"<li>{e(link['relation'])}: {link_x(link['execution_id'])} {state_badge(link.get('state'))}</li>")
    if not rows:
        return ""
    return f'<section><h2>Lineage</h2><ul class="lineage">{"".join(rows)}</ul></section>'


def execution_page(
    who: Any, status: dict[str, Any], links: list[dict[str, Any]], *, approvals: int, message: str | None
) -> str:
    execution_id = str(status["execution_id"])
    task = status.get("task")
    main = (
        f'<h1>{e(execution_id)} <a class="sub" href="/x/{e(execution_id)}/changes">changes &amp; review</a></h1>'
        + (f'<p class="task">{e(task)}</p>' if task else "")
        + f'<div class="xgrid" id="execution" data-id="{e(execution_id)}"><div>{status_list(status)}'
        + controls(execution_id, who.session.csrf)
        + lineage(execution_id, links)
        + "</div>"
        + '<div><section><h2>Output <label class="inline"><input type="checkbox" id="follow" checked> follow</label>'
        '</h2><pre id="output" class="term" tabindex="0"></pre>'
        '<button type="button" id="to-end" hidden>↓ new output</button></section>'
        '<section><h2>Timeline <input id="timeline-filter" type="search" placeholder="filter: approval, checkpoint…" '
        'aria-label="filter the timeline"></h2><ol id="timeline" class="timeline"></ol></section></div></div>'
    )
    return layout(execution_id, main, page="execution", who=who, message=message, approvals=approvals)


# --- changes and review -------------------------------------------------------------------------


def split_diff(text: str) -> list[tuple[str, str]]:
    """(path, its part of the unified diff) per file."""
    parts: list[tuple[str, str]] = []
    current: list[str] = []
    path = ""
    for line in text.splitlines():
        if line.startswith("diff --git "):
            if current:
                parts.append((path, "\n".join(current)))
            current = [line]
            match = re.match(r"diff --git a/(.*) b/(.*)$", line)
            path = match.group(2) if match else line[11:]
        else:
            current.append(line)
    if current:
        parts.append((path, "\n".join(current)))
    return parts


HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


def diff_rows(path: str, text: str) -> list[tuple[str, int | None, int | None, str]]:
    """(kind, old line, new line, text) for every line of one file's diff."""
    rows: list[tuple[str, int | None, int | None, str]] = []
    old = new = 0
    in_hunk = False
    for line in text.splitlines():
        match = HUNK.match(line)
        if match:
            old, new = int(match.group(1)), int(match.group(2))
            rows.append(("hunk", None, None, line))
            in_hunk = True
        elif not in_hunk:
            continue
        elif line.startswith("+"):
            rows.append(("add", None, new, line[1:]))
            new += 1
        elif line.startswith("-"):
            rows.append(("del", old, None, line[1:]))
            old += 1
        elif line.startswith("\\"):
            rows.append(("meta", None, None, line))
        else:
            rows.append(("ctx", old, new, line[1:]))
            old += 1
            new += 1
    return rows


def unified_table(path: str, rows: list[tuple[str, int | None, int | None, str]]) -> str:
    out = []
    for kind, old, new, text in rows:
        if kind in ("hunk", "meta"):
            out.append(f'<tr class="{kind}"><td colspan="3">{e(text)}</td></tr>')
            continue
        line = new if new is not None else old
        side = "new" if new is not None else "old"
        mark = {"add": "+", "del": "-", "ctx": " "}[kind]
        out.append(
            f'<tr class="{kind}" data-path="{e(path)}" data-line="{line}" data-side="{side}">'
            f'<td class="ln">{"" if old is None else old}</td><td class="ln">{"" if new is None else new}</td>'
            f"<td class=code>{mark}{e(text)}</td></tr>"
        )
    return f'<table class="diff unified">{"".join(out)}</table>'


def split_table(path: str, rows: list[tuple[str, int | None, int | None, str]]) -> str:
    """Side by side: runs of deletions paired with the additions that follow them."""
    out = []
    i = 0
    while i < len(rows):
        kind, old, new, text = rows[i]
        if kind in ("hunk", "meta"):
            out.append(f'<tr class="{kind}"><td colspan="4">{e(text)}</td></tr>')
            i += 1
            continue
        if kind == "ctx":
            out.append(
                f'<tr class="ctx" data-path="{e(path)}" data-line="{new}" data-side="new"><td class="ln">{old}</td>'
                f'<td class="code">{e(text)}</td><td class="ln">{new}</td><td class="code">{e(text)}</td></tr>'
            )
            i += 1
            continue
        dels, adds = [], []
        while i < len(rows) and rows[i][0] == "del":
            dels.append(rows[i])
            i += 1
        while i < len(rows) and rows[i][0] == "add":
            adds.append(rows[i])
            i += 1
        for k in range(max(len(dels), len(adds))):
            left = dels[k] if k < len(dels) else None
            right = adds[k] if k < len(adds) else None
            line = right[2] if right else left[1] if left else None
            side = "new" if right else "old"
            out.append(
                f'<tr class="pair" data-path="{e(path)}" data-line="{line}" data-side="{side}">'
                f'<td class="ln">{left[1] if left else ""}</td><td class="code{" del" if left else ""}">'
                f"{e(left[3]) if left else ''}</td>"
                f'<td class="ln">{right[2] if right else ""}</td><td class="code{" add" if right else ""}">'
                f"{e(right[3]) if right else ''}</td></tr>"
            )
    return f'<table class="diff split">{"".join(out)}</table>'


def changes_page(
    who: Any,
    execution_id: str,
    state: str,
    checkpoints: list[dict[str, Any]],
    files: list[dict[str, Any]],
    diff_text: str,
    *,
    from_cp: str | None,
    to_cp: str | None,
    view: str,
    error: str | None,
    approvals: int,
    message: str | None,
) -> str:
    csrf = who.session.csrf
    base = f"/x/{execution_id}"
    cp_options = [("0", "0 · base")] + [
        (str(cp["n"]), f"{cp['n']} · {cp.get('trigger', '')} · {ts_text(cp.get('ts'))[:19]}") for cp in checkpoints
    ]
    cp_rows = [
        [
            e(cp["n"]),
            when(cp.get("ts")),
            e(cp.get("trigger")),
            f"<code>{e(str(cp.get('commit') or '')[:12])}</code>",
            e(cp.get("files")),
            f'<span class="plus">+{e(cp.get("added", 0))}</span> <span class="minus">-{e(cp.get("deleted", 0))}</span>',
        ]
        for cp in checkpoints
    ]
    pick = (
        f'<form method="get" action="{base}/changes" class="filters">'
        + select("from", "from", cp_options, from_cp or "0")
        + select("to", "to", [("", "now (worktree)"), *cp_options[1:]], to_cp or "")
        + select("view", "view", [("unified", "unified"), ("split", "side by side")], view)
        + '<button type="submit">Show diff</button></form>'
    )
    restore_to = from_cp or "0"
    file_rows = [
        [
            e(f.get("status")),
            f'<a href="#f-{e(f["path"])}">{e(f["path"])}</a>',
            f'<span class="plus">+{e(f.get("added"))}</span>',
            f'<span class="minus">-{e(f.get("deleted"))}</span>',
        ]
        for f in files
    ]
    parts = []
    for path, text in split_diff(diff_text):
        rows = diff_rows(path, text)
        body = split_table(path, rows) if view == "split" else unified_table(path, rows)
        rollback = action_form(
            f"{base}/rollback",
            csrf,
            f'<input type="hidden" name="path" value="{e(path)}">'
            f'<input type="hidden" name="to" value="{e(restore_to)}">'
            '<button type="submit" class="danger" name="go" value="rollback-file">'
            f"Roll back to checkpoint {e(restore_to)}</button>",
            confirm=f"Restore {path} as it was at checkpoint {restore_to}?",
        )
        parts.append(
            f'<section class="file" id="f-{e(path)}" data-path="{e(path)}"><h3><code>{e(path)}</code>{rollback}</h3>'
            f'<div class="scroll">{body}</div></section>'
        )
    review = (
        '<section class="review" id="review"><h2>Review</h2>'
        "<p>Click a line of the diff to comment on it. The comments go to the agent as one input message while it "
        "runs, or start a follow-up (<code>--resume</code>) of a finished agent CLI.</p>"
        '<ol id="comments"></ol>'
        + action_form(
            f"{base}/review",
            csrf,
            '<input type="hidden" name="comments" id="comments-json" value="[]">'
            '<textarea name="summary" rows="2" placeholder="an overall note (optional)" aria-label="overall note">'
            "</textarea>"
            '<button type="submit" id="send-comments" name="go" value="review">Send comments to the agent</button>',
        )
        + "</section>"
    )
    acts = (
        '<section class="controls"><h2>Commit, pull request, roll back</h2>'
        + action_form(
            f"{base}/commit",
            csrf,
            '<input name="message" placeholder="commit message" aria-label="commit message" required>'
            '<button type="submit" name="go" value="commit">Commit the worktree</button>',
        )
        + action_form(
            f"{base}/pr",
            csrf,
            '<input name="title" placeholder="pull request title" aria-label="pull request title" required>'
            '<button type="submit" name="go" value="pr">Push and open a pull request</button>',
        )
        + action_form(
            f"{base}/rollback",
            csrf,
            select("to", "roll everything back to", cp_options, restore_to)
            + '<button type="submit" class="danger" name="go" value="rollback-all">Roll back all files</button>',
            confirm="Roll back every file?",
        )
        + "</section>"
    )
    main = (
        f'<h1><a href="{base}">{e(execution_id)}</a> · changes {state_badge(state)}</h1>'
        + (f'<p class="error">{e(error)}</p>' if error else "")
        + "<section><h2>Checkpoints</h2>"
        + table(["n", "time", "trigger", "commit", "files", "+/-"], cp_rows, empty="no checkpoint yet")
        + "</section>"
        + pick
        + "<section><h2>Files changed</h2>"
        + table(["", "path", "+", "-"], file_rows, empty="no changes")
        + "</section>"
        + f'<div id="diffs" data-id="{e(execution_id)}">{"".join(parts)}</div>'
        + review
        + acts
    )
    return layout(f"{execution_id} changes", main, page="changes", who=who, message=message, approvals=approvals)


# --- approvals ----------------------------------------------------------------------------------


def approval_card(a: dict[str, Any], csrf: str) -> str:
    aid = str(a["approval_id"])
    head = (
        f'<h3>{e(a.get("question") or aid)}</h3><p class="meta"><code>{e(aid)}</code> · {e(a.get("category"))} · '
        f"{link_x(a.get('execution_id'))} · asked {when(a.get('requested_at'))}"
        + (f" · expires {when(a.get('expires_at'))}" if a.get("expires_at") else "")
        + "</p>"
    )
    context = a.get("context") or a.get("command") or a.get("detail") or a.get("diff")
    if context:
        head += f"<pre>{e(context if isinstance(context, str) else json.dumps(context, indent=1))}</pre>"
    if a.get("state") != "pending":
        who = f"{a.get('state')} by {a.get('decided_by') or '?'}" + (f" ({a.get('choice')})" if a.get("choice") else "")
        decided = f"<p><b>{e(who)}</b> {when(a.get('decided_at'))}</p>"
        return f'<article class="approval decided" id="ap-{e(aid)}">{head}{decided}</article>'
    options = a.get("options") or ["yes"]
    choices = "".join(
        f'<button type="submit" name="choice" value="{e(o)}" class="approve">Approve: {e(o)}</button>' for o in options
    )
    budget = (
        '<input name="raise_budget" type="number" step="0.01" min="0" placeholder="raise budget to $" '
        'aria-label="raise budget (USD)" class="narrow">'
        if "budget" in (a.get("category"), a.get("source"))
        else ""
    )
    form = action_form(
        f"/approvals/{aid}/decide",
        csrf,
        '<input type="hidden" name="decision" value="approve">'
        '<input name="note" placeholder="note (optional)" aria-label="note">' + budget + choices,
        cls="act decide",
    )
    reject = action_form(
        f"/approvals/{aid}/decide",
        csrf,
        '<input type="hidden" name="decision" value="reject"><input name="note" placeholder="why not (optional)" '
        'aria-label="reason"><button type="submit" class="danger">Reject</button>',
        cls="act decide",
    )
    return f'<article class="approval pending" id="ap-{e(aid)}" data-id="{e(aid)}">{head}{form}{reject}</article>'


def inbox(approvals: list[dict[str, Any]], csrf: str) -> str:
    pending = [a for a in approvals if a.get("state") == "pending"]
    decided = [a for a in approvals if a.get("state") != "pending"][:30]
    return (
        f'<h2>Pending <span class="count">{len(pending)}</span></h2>'
        + ("".join(approval_card(a, csrf) for a in pending) or '<p class="empty">nothing waits for you</p>')
        + "<h2>Decided</h2>"
        + ("".join(approval_card(a, csrf) for a in decided) or '<p class="empty">none yet</p>')
    )


def approvals_page(who: Any, approvals: list[dict[str, Any]], *, message: str | None) -> str:
    pending = sum(1 for a in approvals if a.get("state") == "pending")
    main = f'<h1>Approvals</h1><div id="inbox">{inbox(approvals, who.session.csrf)}</div>'
    return layout("Approvals", main, page="approvals", who=who, message=message, approvals=pending)


# --- history, health, start ---------------------------------------------------------------------


def search_page(
    who: Any, params: dict[str, str], hits: list[dict[str, Any]], error: str | None, *, approvals: int
) -> str:
    form = (
        '<form method="get" action="/search" class="filters">'
        + field_input("q", "text", params.get("q"), kind="search", extra="required")
        + '<label class="inline"><input type="checkbox" name="regex" value="true"'
        + (" checked" if params.get("regex") else "")
        + "> regex</label>"
        + field_input("execution_id", "execution", params.get("execution_id"))
        + field_input("type", "event type", params.get("type"), extra='placeholder="output, tool.called…"')
        + field_input("since", "since", params.get("since"), extra='placeholder="1h"')
        + '<button type="submit">Search</button></form>'
    )
    rows = [
        [
            link_x(h.get("execution_id")),
            when(h.get("ts")),
            e(h.get("type")),
            f"<code>{e(short(plain(h.get('text')), 300))}</code>",
        ]
        for h in hits
    ]
    result = (
        f'<p class="error">{e(error)}</p>'
        if error
        else (table(["run", "time", "type", "text"], rows, empty="no hits") if params.get("q") else "")
    )
    return layout("Search", f"<h1>Search</h1>{form}{result}", page="search", who=who, approvals=approvals)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return "<br>".join(e(", ".join(f"{k}={v}" for k, v in item.items())) for item in value[:20])
        return e(", ".join(str(v) for v in value))
    if isinstance(value, dict):
        return e(", ".join(f"{k}={v}" for k, v in value.items()))
    return e(value)


def compare_page(who: Any, a: str, b: str, result: dict[str, Any] | None, error: str | None, *, approvals: int) -> str:
    form = (
        '<form method="get" action="/compare" class="filters">'
        + field_input("a", "A", a, extra="required")
        + field_input("b", "B", b, extra="required")
        + '<button type="submit">Compare</button></form>'
    )
    body = ""
    if error:
        body = f'<p class="error">{e(error)}</p>'
    elif result:
        left, right = result["a"], result["b"]
        keys = [k for k in left if k not in ("timeline",)]
        rows = [[e(k), _cell(left.get(k)), _cell(right.get(k))] for k in keys]
        tree = result.get("tree_diff") or {}
        timeline = [
            [
                e((p.get("a") or {}).get("type", "")),
                e((p.get("b") or {}).get("type", "")),
                e(" / ".join(str((p.get(s) or {}).get("count", "")) for s in ("a", "b"))),
            ]
            for p in result.get("timeline", [])[:300]
        ]
        body = (
            table(["", link_x(left["execution_id"]), link_x(right["execution_id"])], rows, cls="compare")
            + "<h2>Tree diff</h2>"
            + f"<pre>{e(tree.get('stat') or tree.get('error') or ('same tree' if tree.get('same_tree') else ''))}"
            + "</pre>"
            + "<h2>Timeline</h2>"
            + table(["A", "B", "count"], timeline, empty="no events")
        )
    return layout("Compare", f"<h1>Compare</h1>{form}{body}", page="compare", who=who, approvals=approvals)


def health_page(who: Any, health: dict[str, Any], *, approvals: int) -> str:
    rows = [
        [
            e(r.get("actor")),
            e(r.get("instance")),
            f'<span class="state s-{"running" if r.get("alive") else "failed"}">{e(r.get("state"))}</span>',
            e(r.get("host")),
            e(r.get("last_seen_s")),
            e(r.get("lag")),
        ]
        for r in health.get("actors", [])
    ]
    down = health.get("down") or []
    main = (
        "<h1>Health</h1>"
        + (
            f'<p class="error">no live instance of: {e(", ".join(down))}</p>'
            if down
            else '<p class="ok">every actor is alive</p>'
        )
        + table(["actor", "instance", "state", "host", "last seen (s)", "lag"], rows, empty="no actor has reported")
        + f"<p>log last sequence: {e(health.get('log_last_seq'))}</p>"
    )
    return layout("Health", main, page="health", who=who, approvals=approvals)


def new_page(who: Any, templates: list[dict[str, Any]], *, approvals: int, values: dict[str, str] | None = None) -> str:
    values = values or {}
    names = [("", "none")] + [(str(t.get("name")), str(t.get("name"))) for t in templates]
    form = action_form(
        "/new",
        who.session.csrf,
        field_input("repo", "repository (a path on the Corral host)", values.get("repo", ""), extra="required")
        + field_input("base", "base", values.get("base", "HEAD"))
        + select(
            "agent", "agent", [("", "a command")] + [(a, a) for a in AGENTS if a != "command"], values.get("agent")
        )
        + field_input("command", "command (shell words)", values.get("command", ""), extra='placeholder="make test"')
        + '<label>task <textarea name="task" rows="4" placeholder="what the agent should do"></textarea></label>'
        + select("template", "template", names, values.get("template"))
        + field_input("labels", "labels", values.get("labels", ""), extra='placeholder="team=web ticket=42"')
        + field_input("timeout", "hard timeout", values.get("timeout", ""), extra='placeholder="30m"')
        + field_input("max_cost", "budget (USD)", values.get("max_cost", ""))
        + '<button type="submit" name="go" value="start">Start</button>',
        cls="stack",
    )
    return layout("Start a run", f"<h1>Start a run</h1>{form}", page="new", who=who, approvals=approvals)


def problem_page(who: Any, message: str) -> str:
    main = f'<h1>Refused</h1><p class="error">{e(message)}</p><p><a href="/">back to the fleet</a></p>'
    return layout("Refused", main, page="problem", who=who)
