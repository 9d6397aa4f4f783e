"""History tables derived from each applied batch with set-based SQL (no Python per event).

Every statement reads only the `events` rows of the batch (`seq > $1`), and folds them into
its table so that the result does not depend on how the log was cut into batches: rows are
inserted once per event, and per-key tables (files_changed, approvals) merge a batch's rows
with aggregates that are associative (sums, counts, latest by seq). The live projector and
`corral projections rebuild` therefore write identical tables. docs/tables.md documents them.
"""

from collections.abc import Collection
from typing import Final

import duckdb

from events.types import STOP_TYPES

# Columns added to the executions table, maintained here (the state columns come from evolve).
EXECUTION_HISTORY_COLUMNS: Final = {
    "fork_checkpoint": "INTEGER",
    "checkpoints": "UINTEGER DEFAULT 0",
    "final_checkpoint": "INTEGER",
    "final_commit": "VARCHAR",
    "final_tree": "VARCHAR",
    "files_changed": "UINTEGER DEFAULT 0",
    "input_tokens": "UBIGINT DEFAULT 0",
    "output_tokens": "UBIGINT DEFAULT 0",
    "cost_usd": "DOUBLE DEFAULT 0",
    # the last stop asked of it (a pause, a cancel, a limit, a resume, a timeout: STOP_TYPES) and
    # whether its agent CLI could not reach its model (agent.result failure "network"): what a
    # listing says why it stopped with (corral/attention.py), kept here so a listing scans no events
    "last_stop_type": "VARCHAR",
    "last_stop_data": "JSON",
    "last_stop_actor": "VARCHAR",
    "network_unreachable": "BOOLEAN DEFAULT false",
}
_STOP_LIST = ", ".join(f"'{kind}'" for kind in STOP_TYPES)

DERIVED_DDL: Final = [
    """CREATE TABLE IF NOT EXISTS search (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, type VARCHAR,
        text VARCHAR USING COMPRESSION 'uncompressed')""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, n INTEGER, ref VARCHAR, "commit" VARCHAR,
        tree VARCHAR, parent VARCHAR, trigger VARCHAR, files UINTEGER, added UBIGINT, deleted UBIGINT,
        duration_ms DOUBLE, file_stats JSON)""",
    """CREATE TABLE IF NOT EXISTS files_changed (
        execution_id VARCHAR, path VARCHAR, change VARCHAR, added UBIGINT, deleted UBIGINT,
        checkpoints UINTEGER, touches UINTEGER, first_seq UBIGINT, last_seq UBIGINT, last_ts TIMESTAMPTZ,
        PRIMARY KEY (execution_id, path))""",
    """CREATE TABLE IF NOT EXISTS approvals (
        approval_id VARCHAR PRIMARY KEY, execution_id VARCHAR, question VARCHAR, options VARCHAR[],
        category VARCHAR, requested_at TIMESTAMPTZ, expires_at TIMESTAMPTZ, status VARCHAR,
        choice VARCHAR, note VARCHAR, decided_by VARCHAR, decided_at TIMESTAMPTZ,
        requested_seq UBIGINT, decided_seq UBIGINT)""",
    """CREATE TABLE IF NOT EXISTS validations (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, passed BOOLEAN, checkpoint INTEGER,
        policy_version VARCHAR, violations UINTEGER, critical UINTEGER, duration_ms DOUBLE, details JSON)""",
    """CREATE TABLE IF NOT EXISTS inputs (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, offset_s DOUBLE, text VARCHAR, bytes UBIGINT)""",
    """CREATE TABLE IF NOT EXISTS usage (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, model VARCHAR, input_tokens UBIGINT,
        output_tokens UBIGINT, cache_read_tokens UBIGINT, cache_write_tokens UBIGINT, cost_usd DOUBLE,
        estimated BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS tool_calls (
        seq UBIGINT, execution_id VARCHAR, ts TIMESTAMPTZ, call_id VARCHAR, name VARCHAR,
        input_summary VARCHAR, shell_command VARCHAR, ok BOOLEAN, result_summary VARCHAR, result_seq UBIGINT)""",
    # pipeline runs and their steps (actors/conductor.py, docs/orchestration.md)
    """CREATE TABLE IF NOT EXISTS pipelines (
        run_id VARCHAR PRIMARY KEY, pipeline VARCHAR, repo VARCHAR, base VARCHAR, vars JSON, stages VARCHAR[],
        max_rounds INTEGER, requested_by VARCHAR, requested_at TIMESTAMPTZ, state VARCHAR, conductor VARCHAR,
        started_at TIMESTAMPTZ, steps INTEGER, reason VARCHAR, finished_at TIMESTAMPTZ, requested_seq UBIGINT,
        updated_seq UBIGINT)""",
    """CREATE TABLE IF NOT EXISTS stages (
        run_id VARCHAR, step INTEGER, stage VARCHAR, round INTEGER, kind VARCHAR, execution_id VARCHAR,
        worktree VARCHAR, started_at TIMESTAMPTZ, outcome VARCHAR, exit_code INTEGER, verdict VARCHAR,
        comments VARCHAR, result VARCHAR, error VARCHAR, next VARCHAR, finished_at TIMESTAMPTZ,
        started_seq UBIGINT, finished_seq UBIGINT, PRIMARY KEY (run_id, step))""",
    """CREATE TABLE IF NOT EXISTS tickets (
        ticket_id VARCHAR PRIMARY KEY, title VARCHAR, goal VARCHAR, repo VARCHAR, pipeline VARCHAR,
        priority INTEGER, requested_by VARCHAR, created_at TIMESTAMPTZ, state VARCHAR, run_id VARCHAR,
        conductor VARCHAR, claimed_at TIMESTAMPTZ, reason VARCHAR, result VARCHAR, finished_at TIMESTAMPTZ,
        created_seq UBIGINT, updated_seq UBIGINT)""",
]

DERIVED_TABLES: Final = (
    "search",
    "checkpoints",
    "files_changed",
    "approvals",
    "validations",
    "inputs",
    "usage",
    "tool_calls",
    "pipelines",
    "stages",
    "tickets",
)

# Output rows projected from the output stream (CORRAL_OUTPUT, docs/retention.md) carry this plus
# that stream's sequence as `seq`, so they never share a number with a core-log row.
OUTPUT_SEQ_BASE: Final = 1 << 40

# The statements of one batch, in order; each takes $1 = the position before the batch.
BATCH_SQL: Final = [
    # search: lowercased text of every event (output text, or the payload of other events),
    # stored uncompressed: a substring scan then reads plain bytes (about 2x faster than over
    # FSST-compressed text, for about the size of the output text again on disk)
    # (the batch's output rows are in `output` already: their text is not taken from JSON again;
    # rows at or above 2^40 are the output stream's, added by projections.projector.OutputApplier)
    # (two statements: the output lane and the other lane of the core log are applied apart)
    f"""INSERT INTO search SELECT seq, execution_id, ts, 'output', lower(text) FROM output
         WHERE seq > $1 AND seq < {OUTPUT_SEQ_BASE} ORDER BY seq""",
    """INSERT INTO search SELECT seq, execution_id, ts, type, lower(CAST(data AS VARCHAR)) FROM events
         WHERE seq > $1 AND type <> 'output' ORDER BY seq""",
    """INSERT INTO checkpoints SELECT seq, execution_id, ts, CAST(data->>'n' AS INTEGER), data->>'ref',
        data->>'commit', data->>'tree', data->>'parent', data->>'trigger',
        CAST(json_array_length(data->'files') AS UINTEGER),
        (SELECT sum(CAST(f->>'added' AS UBIGINT)) FROM unnest(CAST(data->'files' AS JSON[])) AS u(f)),
        (SELECT sum(CAST(f->>'deleted' AS UBIGINT)) FROM unnest(CAST(data->'files' AS JSON[])) AS u(f)),
        CAST(data->>'duration_ms' AS DOUBLE), data->'files'
       FROM events WHERE seq > $1 AND type = 'checkpoint.created' ORDER BY seq""",
    # files_changed: lines added/deleted summed over checkpoints (each is a diff against the
    # previous one), the latest file.touched change; merged per (execution, path).
    """INSERT INTO files_changed
       SELECT execution_id, path,
        arg_max(change, seq) FILTER (WHERE change IS NOT NULL),
        sum(added), sum(deleted),
        count(*) FILTER (WHERE source = 'checkpoint'), count(*) FILTER (WHERE source = 'touch'),
        min(seq), max(seq), max(ts)
       FROM (
        SELECT seq, execution_id, ts, data->>'path' AS path, data->>'change' AS change,
               NULL::UBIGINT AS added, NULL::UBIGINT AS deleted, 'touch' AS source
        FROM events WHERE seq > $1 AND type = 'file.touched'
        UNION ALL
        SELECT seq, execution_id, ts, f->>'path', NULL, CAST(f->>'added' AS UBIGINT),
               CAST(f->>'deleted' AS UBIGINT), 'checkpoint'
        FROM events, unnest(CAST(data->'files' AS JSON[])) AS u(f)
        WHERE seq > $1 AND type = 'checkpoint.created'
       ) GROUP BY execution_id, path
       ON CONFLICT (execution_id, path) DO UPDATE SET
        change = CASE WHEN excluded.change IS NULL THEN files_changed.change ELSE excluded.change END,
        added = CASE WHEN files_changed.added IS NULL THEN excluded.added
                     WHEN excluded.added IS NULL THEN files_changed.added
                     ELSE files_changed.added + excluded.added END,
        deleted = CASE WHEN files_changed.deleted IS NULL THEN excluded.deleted
                       WHEN excluded.deleted IS NULL THEN files_changed.deleted
                       ELSE files_changed.deleted + excluded.deleted END,
        checkpoints = files_changed.checkpoints + excluded.checkpoints,
        touches = files_changed.touches + excluded.touches,
        last_seq = excluded.last_seq, last_ts = excluded.last_ts""",
    # approvals: the request fills the question; the latest decision sets the status.
    """INSERT INTO approvals (approval_id, execution_id, question, options, category, requested_at,
                              expires_at, status, requested_seq)
       SELECT data->>'approval_id', arg_min(execution_id, seq), arg_min(data->>'question', seq),
        arg_min(CAST(data->'options' AS VARCHAR[]), seq), arg_min(data->>'category', seq), min(ts),
        arg_min(CAST(data->>'expires_at' AS TIMESTAMPTZ), seq), 'pending', min(seq)
       FROM events WHERE seq > $1 AND type = 'approval.requested' GROUP BY 1
       ON CONFLICT (approval_id) DO UPDATE SET
        question = excluded.question, options = excluded.options, category = excluded.category,
        requested_at = excluded.requested_at, expires_at = excluded.expires_at,
        requested_seq = excluded.requested_seq
       WHERE approvals.requested_seq IS NULL""",
    """INSERT INTO approvals (approval_id, execution_id, status, choice, note, decided_by, decided_at, decided_seq)
       SELECT data->>'approval_id', arg_max(execution_id, seq),
        arg_max(replace(type, 'approval.', ''), seq), arg_max(data->>'choice', seq),
        arg_max(data->>'note', seq), arg_max(data->>'decided_by', seq), max(ts), max(seq)
       FROM events WHERE seq > $1 AND type IN ('approval.granted', 'approval.denied', 'approval.expired')
       GROUP BY 1
       ON CONFLICT (approval_id) DO UPDATE SET
        status = excluded.status, choice = excluded.choice, note = excluded.note,
        decided_by = excluded.decided_by, decided_at = excluded.decided_at, decided_seq = excluded.decided_seq""",
    """INSERT INTO validations SELECT seq, execution_id, ts, type = 'validation.passed',
        CAST(data->>'checkpoint' AS INTEGER), data->>'policy_version',
        CAST(coalesce(json_array_length(data->'violations'), 0) AS UINTEGER),
        CAST(coalesce(len(list_filter(CAST(data->'violations' AS JSON[]), lambda v: v->>'severity' = 'critical')), 0)
             AS UINTEGER),
        CAST(data->>'duration_ms' AS DOUBLE), data->'violations'
       FROM events WHERE seq > $1 AND type IN ('validation.passed', 'validation.failed') ORDER BY seq""",
    """INSERT INTO inputs SELECT e.seq, e.execution_id, e.ts,
        epoch(e.ts) - epoch(x.started_at), e.data->>'text', CAST(e.data->>'bytes' AS UBIGINT)
       FROM events e LEFT JOIN executions x USING (execution_id)
       WHERE e.seq > $1 AND e.type = 'input.delivered' ORDER BY e.seq""",
    """INSERT INTO usage SELECT seq, execution_id, ts, data->>'model',
        CAST(coalesce(data->>'input_tokens', '0') AS UBIGINT), CAST(coalesce(data->>'output_tokens', '0') AS UBIGINT),
        CAST(coalesce(data->>'cache_read_tokens', '0') AS UBIGINT),
        CAST(coalesce(data->>'cache_write_tokens', '0') AS UBIGINT),
        CASE WHEN json_type(data->'cost_usd') = 'NULL' THEN NULL  -- unknown: no price for the model
             ELSE CAST(coalesce(data->>'cost_usd', '0') AS DOUBLE) END,
        coalesce(CAST(data->>'estimated' AS BOOLEAN), false)
       FROM events WHERE seq > $1 AND type = 'usage' ORDER BY seq""",
    """INSERT INTO tool_calls SELECT seq, execution_id, ts, data->>'call_id', data->>'name',
        data->>'input_summary', data->>'shell_command', NULL, NULL, NULL
       FROM events WHERE seq > $1 AND type = 'tool.called' ORDER BY seq""",
    """UPDATE tool_calls SET ok = r.ok, result_summary = r.summary, result_seq = r.seq
       FROM (SELECT execution_id, data->>'call_id' AS call_id, arg_min(CAST(data->>'ok' AS BOOLEAN), seq) AS ok,
                    arg_min(data->>'summary', seq) AS summary, min(seq) AS seq
             FROM events WHERE seq > $1 AND type = 'tool.result' AND data->>'call_id' IS NOT NULL
             GROUP BY ALL) AS r
       WHERE tool_calls.execution_id = r.execution_id AND tool_calls.call_id = r.call_id
         AND tool_calls.result_seq IS NULL""",
    # pipelines: the request fills the row; started and finished (later in the log) move its state.
    """INSERT INTO pipelines (run_id, pipeline, repo, base, vars, stages, max_rounds, requested_by, requested_at,
                              state, requested_seq, updated_seq)
       SELECT execution_id, arg_min(data->>'pipeline', seq), arg_min(data->>'repo', seq),
        arg_min(data->>'base', seq), arg_min(data->'vars', seq),
        arg_min(CAST(json_extract_string(data->'stages', '$[*].name') AS VARCHAR[]), seq),
        arg_min(CAST(data->>'max_rounds' AS INTEGER), seq), arg_min(data->>'requested_by', seq), min(ts),
        'requested', min(seq), min(seq)
       FROM events WHERE seq > $1 AND type = 'pipeline.requested' GROUP BY execution_id
       ON CONFLICT (run_id) DO NOTHING""",
    """UPDATE pipelines SET conductor = s.conductor, started_at = s.ts,
        state = CASE WHEN pipelines.finished_at IS NULL THEN 'running' ELSE pipelines.state END,
        updated_seq = greatest(pipelines.updated_seq, s.seq)
       FROM (SELECT execution_id, arg_min(data->>'conductor', seq) AS conductor, min(ts) AS ts, min(seq) AS seq
             FROM events WHERE seq > $1 AND type = 'pipeline.started' GROUP BY execution_id) AS s
       WHERE pipelines.run_id = s.execution_id AND pipelines.started_at IS NULL""",
    """UPDATE pipelines SET state = f.outcome, reason = f.reason, steps = f.steps, finished_at = f.ts,
        updated_seq = greatest(pipelines.updated_seq, f.seq)
       FROM (SELECT execution_id, arg_min(data->>'outcome', seq) AS outcome, arg_min(data->>'reason', seq) AS reason,
                    arg_min(CAST(data->>'steps' AS INTEGER), seq) AS steps, min(ts) AS ts, min(seq) AS seq
             FROM events WHERE seq > $1 AND type = 'pipeline.finished' GROUP BY execution_id) AS f
       WHERE pipelines.run_id = f.execution_id AND pipelines.finished_at IS NULL""",
    """INSERT INTO stages (run_id, step, stage, round, kind, execution_id, worktree, started_at, started_seq)
       SELECT execution_id, CAST(data->>'step' AS INTEGER), data->>'stage', CAST(data->>'round' AS INTEGER),
        data->>'kind', data->>'execution_id', data->>'worktree', ts, seq
       FROM events WHERE seq > $1 AND type = 'stage.started' ORDER BY seq
       ON CONFLICT (run_id, step) DO NOTHING""",
    """UPDATE stages SET outcome = f.outcome, exit_code = f.exit_code, verdict = f.verdict, comments = f.comments,
        result = f.result, error = f.error, next = f.next, finished_at = f.ts, finished_seq = f.seq
       FROM (SELECT execution_id AS run_id, CAST(data->>'step' AS INTEGER) AS step, data->>'outcome' AS outcome,
                    CAST(data->>'exit_code' AS INTEGER) AS exit_code, data->>'verdict' AS verdict,
                    data->>'comments' AS comments, data->>'result' AS result, data->>'error' AS error,
                    data->>'next' AS next, ts, seq
             FROM events WHERE seq > $1 AND type = 'stage.finished') AS f
       WHERE stages.run_id = f.run_id AND stages.step = f.step AND stages.finished_seq IS NULL""",
    """UPDATE pipelines SET updated_seq = greatest(pipelines.updated_seq, s.seq),
        steps = CASE WHEN pipelines.finished_at IS NULL THEN s.steps ELSE pipelines.steps END
       FROM (SELECT run_id, max(step) AS steps, max(greatest(started_seq, coalesce(finished_seq, 0))) AS seq
             FROM stages WHERE started_seq > $1 OR finished_seq > $1 GROUP BY run_id) AS s
       WHERE pipelines.run_id = s.run_id""",
    # tickets: created ready; claimed (its run requested) and finished later in the log.
    """INSERT INTO tickets (ticket_id, title, goal, repo, pipeline, priority, requested_by, created_at, state,
                            created_seq, updated_seq)
       SELECT execution_id, arg_min(data->>'title', seq), arg_min(data->>'goal', seq), arg_min(data->>'repo', seq),
        arg_min(data->>'pipeline', seq), arg_min(CAST(data->>'priority' AS INTEGER), seq),
        arg_min(data->>'requested_by', seq), min(ts), 'ready', min(seq), min(seq)
       FROM events WHERE seq > $1 AND type = 'ticket.created' GROUP BY execution_id
       ON CONFLICT (ticket_id) DO NOTHING""",
    """UPDATE tickets SET run_id = c.run_id, conductor = c.conductor, claimed_at = c.ts,
        state = CASE WHEN tickets.finished_at IS NULL THEN 'claimed' ELSE tickets.state END,
        updated_seq = greatest(tickets.updated_seq, c.seq)
       FROM (SELECT execution_id, arg_min(data->>'run_id', seq) AS run_id,
                    arg_min(data->>'conductor', seq) AS conductor, min(ts) AS ts, min(seq) AS seq
             FROM events WHERE seq > $1 AND type = 'ticket.claimed' GROUP BY execution_id) AS c
       WHERE tickets.ticket_id = c.execution_id AND tickets.claimed_at IS NULL""",
    """UPDATE tickets SET state = f.outcome, reason = f.reason, result = f.result, finished_at = f.ts,
        updated_seq = greatest(tickets.updated_seq, f.seq)
       FROM (SELECT execution_id, arg_min(data->>'outcome', seq) AS outcome, arg_min(data->>'reason', seq) AS reason,
                    arg_min(data->>'result', seq) AS result, min(ts) AS ts, min(seq) AS seq
             FROM events WHERE seq > $1 AND type = 'ticket.finished' GROUP BY execution_id) AS f
       WHERE tickets.ticket_id = f.execution_id AND tickets.finished_at IS NULL""",
    # executions: the history aggregates of the executions this batch touched
    """UPDATE executions SET fork_checkpoint = CAST(e.data->>'fork_checkpoint' AS INTEGER)
       FROM events e WHERE e.seq > $1 AND e.type = 'execution.requested'
         AND e.data->>'fork_checkpoint' IS NOT NULL AND executions.execution_id = e.execution_id""",
    """UPDATE executions SET checkpoints = executions.checkpoints + c.count,
        final_checkpoint = CASE WHEN executions.final_checkpoint IS NULL OR c.n >= executions.final_checkpoint
                                THEN c.n ELSE executions.final_checkpoint END,
        final_commit = CASE WHEN executions.final_checkpoint IS NULL OR c.n >= executions.final_checkpoint
                            THEN c."commit" ELSE executions.final_commit END,
        final_tree = CASE WHEN executions.final_checkpoint IS NULL OR c.n >= executions.final_checkpoint
                          THEN c.tree ELSE executions.final_tree END
       FROM (SELECT execution_id, count(*) AS count, max(n) AS n, arg_max("commit", n) AS "commit",
                    arg_max(tree, n) AS tree
             FROM checkpoints WHERE seq > $1 GROUP BY execution_id) AS c
       WHERE executions.execution_id = c.execution_id""",
    """UPDATE executions SET files_changed = f.files
       FROM (SELECT execution_id, CAST(count(*) AS UINTEGER) AS files FROM files_changed
             WHERE execution_id IN (SELECT execution_id FROM events WHERE seq > $1
                                    AND type IN ('file.touched', 'checkpoint.created'))
             GROUP BY execution_id) AS f
       WHERE executions.execution_id = f.execution_id""",
    """UPDATE executions SET input_tokens = executions.input_tokens + u.input_tokens,
        output_tokens = executions.output_tokens + u.output_tokens,
        cost_usd = executions.cost_usd + coalesce(u.cost_usd, 0)
       FROM (SELECT execution_id, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                    sum(cost_usd) AS cost_usd FROM usage WHERE seq > $1 GROUP BY execution_id) AS u
       WHERE executions.execution_id = u.execution_id""",
    f"""UPDATE executions SET last_stop_type = m.type, last_stop_data = m.data, last_stop_actor = m.actor
       FROM (SELECT execution_id, arg_max(type, seq) AS type, arg_max(data, seq) AS data, arg_max(actor, seq) AS actor
             FROM events WHERE seq > $1 AND type IN ({_STOP_LIST}) GROUP BY execution_id) AS m
       WHERE executions.execution_id = m.execution_id""",
    """UPDATE executions SET network_unreachable = true
       WHERE execution_id IN (SELECT execution_id FROM events WHERE seq > $1 AND type = 'agent.result'
                              AND data->>'failure' = 'network')""",
]

# Which event types each statement needs; a batch without any of them skips it.
_NEEDS: Final[list[tuple[str, ...] | None]] = [
    ("output",),
    None,  # any type but output
    ("checkpoint.created",),
    ("file.touched", "checkpoint.created"),
    ("approval.requested",),
    ("approval.granted", "approval.denied", "approval.expired"),
    ("validation.passed", "validation.failed"),
    ("input.delivered",),
    ("usage",),
    ("tool.called",),
    ("tool.result",),
    ("pipeline.requested",),
    ("pipeline.started",),
    ("pipeline.finished",),
    ("stage.started",),
    ("stage.finished",),
    ("stage.started", "stage.finished"),
    ("ticket.created",),
    ("ticket.claimed",),
    ("ticket.finished",),
    ("execution.requested",),
    ("checkpoint.created",),
    ("file.touched", "checkpoint.created"),
    ("usage",),
    STOP_TYPES,
    ("agent.result",),
]


def apply_derived(
    con: duckdb.DuckDBPyConnection, before: int, *, only: str = "", present: Collection[str] | None = None
) -> None:
    """Fold the events above `before` (this batch, already inserted) into the history tables.

    `only`: a condition on the rows above `before` that are the batch's (a lane's, projections.batch).
    `present`: the event types among those rows (a superset will do), when the caller knows them."""
    if present is None:
        present = {
            row[0] for row in con.execute(f"SELECT DISTINCT type FROM events WHERE seq > $1{only}", [before]).fetchall()
        }
    present = set(present)
    for statement, needs in zip(BATCH_SQL, _NEEDS, strict=True):
        if present.intersection(needs) if needs is not None else bool(present - {"output"}):
            con.execute(statement, [before])
