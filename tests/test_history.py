"""History: the derived tables, search, export, compare, replay, fork and lineage."""

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from events.envelope import new_event
from events.types import (
    ApprovalDenied,
    ApprovalGranted,
    ApprovalRequested,
    CheckpointCreated,
    EventData,
    ExecutionExited,
    ExecutionRequested,
    ExecutionStarted,
    FileStat,
    FileTouched,
    InputDelivered,
    Output,
    ToolCalled,
    ToolResult,
    Usage,
    ValidationFailed,
    ValidationPassed,
    Violation,
)
from projections.appliers import BatchApplier
from projections.database import open_database
from projections.tables import TABLES
from tests.conftest import Cli, agent_command, recording_actor
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _history(execution_id: str, *, checkpoints: int = 2) -> list[tuple[str, EventData, float]]:
    """A synthetic execution touching every history table: (execution id, payload, seconds after T0)."""
    items: list[tuple[str, EventData, float]] = [
        (execution_id, ExecutionRequested(command=("agent", "go"), repo="/r", task="t", fork_checkpoint=None), 0),
        (execution_id, ExecutionStarted(pid=1, pgid=1, host="h", command=("agent",), cwd="/w"), 1),
        (execution_id, Output(stream="stdout", n=1, text="Hello World\n"), 1.5),
        (execution_id, FileTouched(path="a.txt", change="created"), 2),
        (execution_id, InputDelivered(text="yes\n", bytes=4), 2.5),
        (execution_id, Usage(input_tokens=100, output_tokens=20, cost_usd=0.01, model="m"), 3),
        (execution_id, ToolCalled(call_id="c1", name="bash", input_summary="ls", shell_command="ls"), 3.2),
        (execution_id, ToolResult(call_id="c1", name="bash", ok=True, summary="2 files"), 3.3),
        (execution_id, ApprovalRequested(approval_id=f"{execution_id}-a1", question="push?", options=("y", "n")), 3.5),
        (execution_id, ApprovalGranted(approval_id=f"{execution_id}-a1", choice="y", note=None, decided_by="ann"), 3.6),
        (execution_id, ApprovalRequested(approval_id=f"{execution_id}-a2", question="rm -rf?"), 3.7),
        (execution_id, ApprovalDenied(approval_id=f"{execution_id}-a2", note="no", decided_by="bob"), 3.8),
        (execution_id, ApprovalRequested(approval_id=f"{execution_id}-a3", question="later?"), 3.9),
    ]
    parent = "base0"
    for n in range(1, checkpoints + 1):
        files = (FileStat(path="a.txt", added=n, deleted=1), FileStat(path=f"f{n}.bin", added=None, deleted=None))
        commit = f"c{n}{execution_id}"
        items.append(
            (
                execution_id,
                CheckpointCreated(
                    n=n,
                    ref=f"refs/corral/{execution_id}/{n}",
                    commit=commit,
                    tree=f"t{n}",
                    parent=parent,
                    trigger="exit" if n == checkpoints else "interval",
                    files=files,
                    duration_ms=5.0,
                ),
                4 + n,
            )
        )
        parent = commit
        items.append((execution_id, FileTouched(path="a.txt", change="modified"), 4.5 + n))
    items += [
        (execution_id, ValidationPassed(checkpoint=1, policy_version="p1", duration_ms=2.0), 10),
        (
            execution_id,
            ValidationFailed(
                checkpoint=2,
                policy_version="p1",
                violations=(
                    Violation(path="a.txt", rule="r1", severity="critical", message="bad"),
                    Violation(path=None, rule="r2", severity="info", message="meh"),
                ),
                duration_ms=3.0,
            ),
            11,
        ),
        (execution_id, Usage(input_tokens=50, output_tokens=5, cost_usd=0.02), 12),
        (execution_id, ExecutionExited(exit_code=0, duration_s=12.0), 13),
    ]
    return items


def _log(*execution_ids: str) -> list[tuple[int, str, bytes]]:
    histories = [_history(e) for e in execution_ids]
    merged = sorted((t, i, eid, data) for i, h in enumerate(histories) for eid, data, t in h)
    log = []
    for seq, (offset, _, eid, data) in enumerate(merged, start=1):
        event = new_event(eid, data, actor=recording_actor(data.TYPE), ts=T0 + timedelta(seconds=offset))
        log.append((seq, event.subject, event.to_bytes()))
    return log


def _project(tmp: Path, log: list[tuple[int, str, bytes]], cuts: list[int]) -> dict[str, list[Any]]:
    con = open_database(tmp / f"{len(cuts)}-{random.random()}.duckdb")
    applier = BatchApplier(con, tmp_dir=tmp / "t")
    start = 0
    for cut in [*cuts, len(log)]:
        applier.apply(log[start:cut])
        start = cut
    tables = {}
    for table in TABLES:
        columns = [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall() if c[0] != "updated_at"]
        select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in columns)  # TIMESTAMPTZ needs pytz
        tables[table] = con.execute(f"SELECT {select} FROM {table} ORDER BY ALL").fetchall()
    applier.close()
    con.close()
    return tables


def test_history_tables_do_not_depend_on_batching(tmp_path: Path) -> None:
    log = _log("aaaaaaaa", "bbbbbbbb")
    whole = _project(tmp_path, log, [])
    one_by_one = _project(tmp_path, log, list(range(1, len(log))))
    rng = random.Random(7)
    random_cuts = _project(tmp_path, log, sorted(rng.sample(range(1, len(log)), 9)))
    assert whole == one_by_one == random_cuts
    assert len(whole["search"]) == len(log)


def test_history_tables_content(tmp_path: Path) -> None:
    con = open_database(tmp_path / "h.duckdb")
    applier = BatchApplier(con, tmp_dir=tmp_path / "t")
    applier.apply(_log("aaaaaaaa"))

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return con.execute(sql).fetchall()

    assert rows('SELECT n, "commit", tree, parent, trigger, files, added, deleted FROM checkpoints ORDER BY n') == [
        (1, "c1aaaaaaaa", "t1", "base0", "interval", 2, 1, 1),
        (2, "c2aaaaaaaa", "t2", "c1aaaaaaaa", "exit", 2, 2, 1),
    ]
    assert rows("SELECT path, change, added, deleted, checkpoints, touches FROM files_changed ORDER BY path") == [
        ("a.txt", "modified", 3, 2, 2, 3),
        ("f1.bin", None, None, None, 1, 0),
        ("f2.bin", None, None, None, 1, 0),
    ]
    assert rows(
        "SELECT approval_id, status, choice, note, decided_by, question, options FROM approvals ORDER BY 1"
    ) == [
        ("aaaaaaaa-a1", "granted", "y", None, "ann", "push?", ["y", "n"]),
        ("aaaaaaaa-a2", "denied", None, "no", "bob", "rm -rf?", []),
        ("aaaaaaaa-a3", "pending", None, None, None, "later?", []),
    ]
    assert rows("SELECT passed, checkpoint, violations, critical FROM validations ORDER BY seq") == [
        (True, 1, 0, 0),
        (False, 2, 2, 1),
    ]
    assert rows("SELECT offset_s, text, bytes FROM inputs") == [(1.5, "yes\n", 4)]
    assert rows("SELECT sum(input_tokens), sum(output_tokens), round(sum(cost_usd), 4) FROM usage") == [(150, 25, 0.03)]
    assert rows("SELECT name, shell_command, ok, result_summary FROM tool_calls") == [("bash", "ls", True, "2 files")]
    assert rows(
        "SELECT checkpoints, final_checkpoint, final_commit, final_tree, files_changed, input_tokens, "
        "output_tokens, round(cost_usd, 4) FROM executions"
    ) == [(2, 2, "c2aaaaaaaa", "t2", 3, 150, 25, 0.03)]
    assert rows("SELECT type, text FROM search WHERE type = 'output'") == [("output", "hello world\n")]
    applier.close()
    con.close()


# --- through the CLI, against real runs of the example agent -------------------------------------


def _sql(cli: Cli, sql: str) -> list[dict[str, Any]]:
    return json.loads(cli("sql", sql, "--json", check=True).stdout)  # type: ignore[no-any-return]


def _final_tree(cli: Cli, execution_id: str) -> str:
    def tree() -> str | None:
        found = _sql(cli, f"SELECT final_tree FROM executions WHERE execution_id = '{execution_id}'")
        return found[0]["final_tree"] if found else None

    return wait_until(tree, 60, f"the exit checkpoint of {execution_id}")  # type: ignore[return-value]


def _all_tables(cli: Cli) -> dict[str, list[dict[str, Any]]]:
    return {table: _sql(cli, f"SELECT * FROM {table} ORDER BY ALL") for table in TABLES}


def test_replay_fork_compare_tree_rebuild_and_export(cli: Cli, repo: Path, tmp_path: Path) -> None:
    up = start_up(cli)
    try:
        original = detach(cli, repo, "--task", "notes", *agent_command("notes", "--steps", "2", "--read-input"))
        wait_state(cli, original, "running")
        cli("input", original, "hello", check=True)
        cli("input", original, "quit", check=True)
        wait_state(cli, original, "exited")
        original_tree = _final_tree(cli, original)

        # replay: same request and base, the inputs re-sent at their offsets, the same final tree
        replayed = cli("replay", original[:5], "-q", "--speed", "2")
        assert replayed.returncode == 0, replayed.stderr
        assert "input: hello" in replayed.stdout
        (row,) = _sql(cli, f"SELECT execution_id, command, task FROM executions WHERE replay_of = '{original}'")
        replay = row["execution_id"]
        assert row["task"] == "notes"
        assert _final_tree(cli, replay) == original_tree
        assert [
            r["text"] for r in _sql(cli, f"SELECT text FROM inputs WHERE execution_id = '{replay}' ORDER BY seq")
        ] == [
            "hello\n",
            "quit\n",
        ]

        # fork from checkpoint 1 with another command: it starts from that tree, the original is untouched
        refs_before = subprocess.run(
            ["git", "-C", str(repo), "for-each-ref", f"refs/corral/{original}"], capture_output=True, text=True
        ).stdout
        forked = cli(
            "fork",
            original,
            "--at",
            "1",
            "-q",
            "--",
            sys.executable,
            "-c",
            "import pathlib; print(pathlib.Path('inputs.txt').read_text().strip()); "
            "pathlib.Path('fork.txt').write_text('forked\\n')",
        )
        assert forked.returncode == 0, forked.stderr
        assert forked.stdout.strip() == "hello"
        (fork_row,) = _sql(cli, f"SELECT execution_id, fork_checkpoint FROM executions WHERE fork_of = '{original}'")
        fork = fork_row["execution_id"]
        assert fork_row["fork_checkpoint"] == 1
        assert _final_tree(cli, fork) != original_tree
        assert (
            subprocess.run(
                ["git", "-C", str(repo), "for-each-ref", f"refs/corral/{original}"], capture_output=True, text=True
            ).stdout
            == refs_before
        )

        # bad input: unknown checkpoint, a checkpoint of another execution, unknown id; nothing is started
        count = len(_sql(cli, "SELECT execution_id FROM executions"))
        for args, message in (
            (("fork", original, "--at", "9"), "has no checkpoint"),
            (("fork", original, "--at", f"refs/corral/{replay}/1"), f"belongs to {replay}"),
            (("fork", "zzzzzzzz", "--at", "1"), "no execution matches"),
            (("fork", original), "--at CHECKPOINT is required"),
            (("replay", "zzzzzzzz"), "no execution matches"),
            (("replay", original, "--speed", "0"), "--speed"),
            (("compare", original, "zzzzzzzz"), "no execution matches"),
            (("compare", original, replay, original), "named twice"),
            (("compare", *[original] * 11), "2 to 10"),
        ):
            result = cli(*args)
            assert result.returncode == 2, (args, result.stderr)
            assert message in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert len(_sql(cli, "SELECT execution_id FROM executions")) == count

        # compare: identical trees for the replay; a diff stat naming fork.txt for the fork
        same = json.loads(cli("compare", original, replay, "--json", check=True).stdout)
        assert same["tree_diff"]["same_tree"] is True
        assert same["a"]["files_changed"] == same["b"]["files_changed"]
        assert [p["a"]["type"] for p in same["timeline"] if p["a"]][:2] == ["execution.requested", "execution.claimed"]
        assert all(p["a"] and p["b"] for p in same["timeline"] if p["a"] and p["a"]["type"] == "checkpoint.created")
        differ = cli("compare", original, fork, check=True).stdout
        assert "fork.txt" in differ
        assert "timeline (aligned by event type)" in differ

        # compare of three (issue 18): a column each, every final tree against the first's, N timelines
        three = json.loads(cli("compare", original, replay, fork, "--json", check=True).stdout)
        assert [s["execution_id"] for s in three["executions"]] == [original, replay, fork]
        assert [(d["execution_id"], d["same_tree"]) for d in three["tree_diffs"]] == [(replay, True), (fork, False)]
        assert "fork.txt" in three["tree_diffs"][1]["stat"]
        assert all(len(row) == 3 for row in three["timeline"])
        assert [r[0] for r in three["timeline"] if r[0]] == [p["a"] for p in same["timeline"] if p["a"]]
        assert [r[1] for r in three["timeline"] if r[1]] == [p["b"] for p in same["timeline"] if p["b"]]
        text = cli("compare", original[:6], replay, fork, check=True).stdout
        assert "final trees of A and B: identical" in text
        assert "final trees of A and C differ" in text and "fork.txt" in text
        assert "timeline (aligned by event type; columns A B C)" in text
        assert text.splitlines()[0].split() == ["A", "B", "C"]

        # ps --tree: the replay and the fork under the original
        tree = json.loads(cli("ps", "--tree", "--json", check=True).stdout)
        (root,) = [r for r in tree if r["execution_id"] == original]
        assert sorted((c["relation"], c["execution_id"]) for c in root["children"]) == sorted(
            [("replay", replay), ("fork@1", fork)]
        )
        assert original in cli("ps", "--tree", check=True).stdout

        # every table, the new ones included, is rebuilt from the log to identical content
        before = _all_tables(cli)
        assert before["checkpoints"] and before["inputs"] and before["files_changed"]
        cli("projections", "rebuild", check=True)
        assert _all_tables(cli) == before

        # export: one Parquet file per table, the same rows; an existing directory is refused
        out = tmp_path / "export"
        cli("export", "--parquet", str(out), check=True)
        con = duckdb.connect()
        for table, table_rows in before.items():
            if table == "search":
                continue
            count_rows = con.execute(f"SELECT count(*) FROM read_parquet('{out / (table + '.parquet')}')").fetchone()
            assert count_rows == (len(table_rows),), table
        again = cli("export", "--parquet", str(out))
        assert again.returncode == 2 and "already exists" in again.stderr
        recent = tmp_path / "recent"
        cli("export", "--parquet", str(recent), "--since", "1d", check=True)
        assert {p.name for p in recent.iterdir()} == {p.name for p in out.iterdir()}
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        stop_up(cli, up)
