"""What the projector refuses to take as fact (docs/security.md, "The projector verifies").

The log is append-only, but whoever may publish can publish anything. Before a batch's events
change any table, three checks move the offenders from `events` to `rejected_events`, with the
reason, in the batch's own transaction:

- **an envelope**: JSON without an id, an execution id or a time (a JetStream API answer that a
  request's reply subject sent into `corral.evt.…`, docs/security.md) is not an event.
- **one event id, one fact**: an event whose id is already in `events` (published again after
  NATS's duplicate window, or without a `Nats-Msg-Id`) or repeated within the batch is a
  duplicate; the first one stays.
- **authority**: decisions and verdicts carry the actor that made them; an `approval.*` event not
  recorded by an approver, a `validation.*` not by a validator, a `checkpoint.created` not by a
  checkpointer (the roles allowed to publish these types, events/auth.py) is refused. A decision
  (granted, denied, expired) for an approval that was never requested is refused too.
- **lifecycle**: an `execution.started` or `execution.exited` of an execution that was never
  requested is refused (checked after the batch's states are folded: a request earlier in the
  same batch counts).

The checks are set-based and look at the batch's rows only (plus an id range of `events` whose
row-group statistics prune the rest), so they cost a small share of an apply (bench/ingest.py).
"""

from typing import Final

import duckdb

# Who may record each authority-bearing type: an actor instance is named `<role>-<host>-<pid>`
# (actors/runtime.py instance_name); the CLI's checkpoint requests are carried out as `checkpointer`.
AUTHORITY: Final[dict[str, tuple[str, ...]]] = {
    "approval.requested": ("approver",),
    "approval.granted": ("approver",),
    "approval.denied": ("approver",),
    "approval.expired": ("approver",),
    "validation.passed": ("validator",),
    "validation.failed": ("validator",),
    "checkpoint.created": ("checkpointer",),
    "network.blocked": ("spawner",),  # the shim's proxy refused it; the spawner publishes the spool
    "notification.sent": ("notifier",),
    "notification.failed": ("notifier",),
    "pipeline.started": ("conductor",),
    "stage.started": ("conductor",),
    "stage.finished": ("conductor",),
    "pipeline.finished": ("conductor",),
    "pipeline.held": ("conductor",),
    "breaker.counted": ("conductor",),
    "breaker.opened": ("conductor",),
    "breaker.closed": ("conductor",),
    "ticket.claimed": ("conductor",),
    "ticket.finished": ("conductor",),
    "schedule.fired": ("conductor",),
    "consumer.removed": ("provisioner",),
}
DECISIONS: Final = ("approval.granted", "approval.denied", "approval.expired")
NOT_AN_ENVELOPE: Final = "not a valid event envelope"
LIFECYCLE_NEEDS_REQUEST: Final = ("execution.started", "execution.exited")


def _reject(con: duckdb.DuckDBPyConnection, reasons: list[tuple[int, str]]) -> None:
    """Move these rows of `events` to rejected_events with their reasons."""
    if not reasons:
        return
    con.execute("CREATE OR REPLACE TEMP TABLE _screened (seq UBIGINT, reason VARCHAR)")
    con.executemany("INSERT INTO _screened VALUES (?, ?)", reasons)
    con.execute(
        "INSERT INTO rejected_events SELECT e.seq, 'corral.evt.' || e.execution_id || '.' || e.type, "
        "json_object('id', e.id, 'type', e.type, 'execution_id', e.execution_id, 'actor', e.actor, "
        "'causation_id', e.causation_id, 'data', e.data)::VARCHAR, s.reason "
        "FROM events e JOIN _screened s USING (seq) WHERE e.seq >= (SELECT min(seq) FROM _screened)"
    )
    con.execute(
        "DELETE FROM events WHERE seq >= (SELECT min(seq) FROM _screened) AND seq IN (SELECT seq FROM _screened)"
    )
    con.execute("DROP TABLE _screened")


def screen_batch(
    con: duckdb.DuckDBPyConnection,
    before: int,
    *,
    underived: int | None = None,
    only: str = "",
    claims: bool = True,
    kinds: set[str] | None = None,
) -> set[int]:
    """Duplicates and forged authority among the events above `before`; returns their sequences.

    `underived`: the position from which the derived tables (approvals) are not filled yet.
    `only`: a condition on the rows above `before` that are the batch's (a lane's, projections.batch);
    `claims=False`: the batch holds no event type that needs a role's authority (the output lane).
    `kinds`: filled with the event types of the batch's rows (before any is screened out), which
    the applier uses to skip the statements of the types a batch lacks."""
    since = before if underived is None else min(underived, before)
    reasons: dict[int, str] = {}
    summary = con.execute(
        "SELECT count(*), count(id), count(DISTINCT id), min(id), max(id), "
        "count(*) FILTER (WHERE id IS NULL OR execution_id IS NULL OR ts IS NULL), list(DISTINCT type) "
        "FROM events WHERE seq > ?" + only,
        [before],
    ).fetchone()
    if summary is None or not summary[0]:
        return set()
    _, rows, distinct, low, high, broken, types = summary
    present = {kind for kind in types or () if kind is not None}
    if kinds is not None:
        kinds.update(present)
    if broken:  # JSON that is no envelope (a JetStream answer sent to a `corral.evt.…` reply subject)
        for (seq,) in con.execute(
            "SELECT seq FROM events WHERE seq > ? AND (id IS NULL OR execution_id IS NULL OR ts IS NULL)" + only,
            [before],
        ).fetchall():
            reasons[seq] = NOT_AN_ENVELOPE
    if distinct < rows:  # repeats within the batch: all but the first of each id
        for seq, event_id, first in con.execute(
            f"""SELECT seq, id, first FROM (
                   SELECT seq, id, min(seq) OVER (PARTITION BY id) AS first FROM events WHERE seq > ?{only})
               WHERE seq > first""",
            [before],
        ).fetchall():
            reasons[seq] = f"duplicate: event id {event_id} was applied at seq {first}"
    # Ids applied before: the batch's id range bounds the older rows looked at (row-group statistics).
    for seq, event_id, first in con.execute(
        f"""SELECT b.seq, b.id, o.seq FROM (SELECT seq, id FROM events WHERE seq > $1{only}) b
           JOIN (SELECT min(seq) AS seq, id FROM events
                 WHERE seq <= $1 AND id BETWEEN $2 AND $3 GROUP BY id) o USING (id)""",
        [before, low, high],
    ).fetchall():
        reasons.setdefault(seq, f"duplicate: event id {event_id} was applied at seq {first}")
    if not claims or present.isdisjoint(AUTHORITY):
        _reject(con, sorted(reasons.items()))
        return set(reasons)
    authority = ", ".join(f"'{k}'" for k in AUTHORITY)
    found_claims = con.execute(
        f"SELECT seq, type, actor, data->>'approval_id' FROM events WHERE seq > ? AND type IN ({authority}){only}",
        [before],
    ).fetchall()
    for seq, kind, actor, _ in found_claims:
        roles = AUTHORITY[kind]
        if not any(actor == role or str(actor).startswith(role + "-") for role in roles):
            reasons.setdefault(seq, f"actor {actor!r} may not record {kind} (only {', '.join(roles)})")
    decisions = [(seq, approval_id) for seq, kind, _, approval_id in found_claims if kind in DECISIONS]
    if decisions:
        decided = ", ".join(f"'{k}'" for k in DECISIONS)
        for seq, approval_id in con.execute(
            f"""SELECT d.seq, d.data->>'approval_id' FROM events d
                WHERE d.seq > $1 AND d.type IN ({decided})
                AND NOT EXISTS (SELECT 1 FROM approvals a
                                WHERE a.approval_id = d.data->>'approval_id' AND a.requested_seq IS NOT NULL)
                AND NOT EXISTS (SELECT 1 FROM events r WHERE r.seq > $2 AND r.seq < d.seq
                                AND r.type = 'approval.requested'
                                AND r.data->>'approval_id' = d.data->>'approval_id')""",
            [before, since],
        ).fetchall():
            reasons.setdefault(seq, f"no approval.requested for approval {approval_id}")
    _reject(con, sorted(reasons.items()))
    return set(reasons)


def screen_orphans(con: duckdb.DuckDBPyConnection, before: int) -> set[int]:
    """Starts and exits above `before` of executions never requested (after the states' fold)."""
    kinds = ", ".join(f"'{k}'" for k in LIFECYCLE_NEEDS_REQUEST)
    rows = con.execute(
        f"""SELECT seq, type, execution_id FROM events
            WHERE seq > ? AND type IN ({kinds})
            AND execution_id NOT IN (SELECT execution_id FROM executions)""",
        [before],
    ).fetchall()
    _reject(con, [(seq, f"{kind} of execution {eid}, which was never requested") for seq, kind, eid in rows])
    return {row[0] for row in rows}


def screen_output(con: duckdb.DuckDBPyConnection) -> int:
    """Repeated event ids among the output stream's chunks of the batch in `output_batch`
    (projections/projector.py OutputApplier): every chunk whose id an earlier one of the batch or
    of `output_ids` has is moved to rejected_events as a duplicate. Returns how many were."""
    summary = con.execute("SELECT count(id), count(DISTINCT id), min(id), max(id) FROM output_batch").fetchone()
    if summary is None or not summary[0]:
        return 0
    rows, distinct, low, high = summary
    found = con.execute(
        """SELECT b.seq, b.id, o.seq FROM output_batch b
           JOIN (SELECT min(seq) AS seq, id FROM output_ids WHERE id BETWEEN $1 AND $2 GROUP BY id) o USING (id)""",
        [low, high],
    ).fetchall()
    if distinct < rows:
        found += con.execute(
            """SELECT seq, id, first FROM (
                   SELECT seq, id, min(seq) OVER (PARTITION BY id) AS first FROM output_batch WHERE id IS NOT NULL)
               WHERE seq > first"""
        ).fetchall()
    if not found:
        return 0
    reasons: dict[int, str] = {}
    for seq, event_id, first in sorted(found, key=lambda row: (row[0], row[2])):
        reasons.setdefault(seq, f"duplicate: event id {event_id} was applied at seq {first}")
    con.execute("CREATE OR REPLACE TEMP TABLE _screened (seq UBIGINT, reason VARCHAR)")
    con.executemany("INSERT INTO _screened VALUES (?, ?)", sorted(reasons.items()))
    con.execute(
        "INSERT INTO rejected_events SELECT b.seq, 'corral.evt.' || b.execution_id || '.output', "
        "json_object('id', b.id, 'type', 'output', 'execution_id', b.execution_id, 'ts', b.ts, "
        "'data', json_object('stream', b.stream, 'n', b.n, 'text', b.text))::VARCHAR, s.reason "
        "FROM output_batch b JOIN _screened s USING (seq) ORDER BY b.seq"
    )
    con.execute("DELETE FROM output_batch WHERE seq IN (SELECT seq FROM _screened)")
    con.execute("DROP TABLE _screened")
    return len(reasons)
