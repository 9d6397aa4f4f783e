"""Attacks on the log's meaning: forged and repeated events, and a rebuild from a trimmed log.

The projector is the only reader that turns events into facts; these tests publish what a
hostile (or broken) publisher could, with Corral's most powerful credential (admin) where a real
system is involved, and check that nothing false or doubled reaches the tables
(projections/verify.py), and that a rebuild never silently drops history (projections/rebuild.py).
Real DuckDB files, a real nats-server with Corral's users, real `corral up`.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import duckdb
from nats.js.api import StreamConfig

from actors.bus import connect_bus
from events.auth import read_credentials
from events.envelope import new_event
from events.subjects import OUTPUT_STREAM, STREAM
from events.types import (
    ApprovalGranted,
    ApprovalRequested,
    ExecutionExited,
    ExecutionRequested,
    ExecutionStarted,
    Output,
    ValidationPassed,
)
from projections.appliers import BatchApplier, OutputApplier
from projections.batch import Gathered
from projections.database import open_database
from projections.derived import OUTPUT_SEQ_BASE
from tests.conftest import Cli, agent_command, recording_actor
from tests.test_control import start_up, stop_up, wait_until

# --- the applier, on a real DuckDB file ----------------------------------------------------------


def _applier(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, BatchApplier]:
    con = open_database(tmp_path / "t.duckdb")
    return con, BatchApplier(con, tmp_dir=tmp_path / "tmp")


def _message(seq: int, execution_id: str, data: Any, actor: str | None = None) -> tuple[int, str, bytes]:
    event = new_event(execution_id, data, actor=actor or recording_actor(data.TYPE, "spawner-h-1"))
    return (seq, event.subject, event.to_bytes())


def _rejected(con: duckdb.DuckDBPyConnection) -> list[tuple[int, str]]:
    return [
        (int(r[0]), str(r[1])) for r in con.execute("SELECT seq, error FROM rejected_events ORDER BY seq").fetchall()
    ]


def test_an_event_id_is_one_fact_whatever_its_stream_sequence(tmp_path: Path) -> None:
    con, applier = _applier(tmp_path)
    requested = _message(1, "dup00001", ExecutionRequested(command=("x",), repo="/r"))
    output = _message(2, "dup00001", Output(stream="stdout", n=1, text="hello\n"))
    # the same bytes again within one batch, and in later batches (after any duplicate window)
    applier.apply([requested, output, (3, output[1], output[2])])
    applier.apply([(4, requested[1], requested[2]), (5, output[1], output[2])])
    # the same id with other content (a forger keeping the id) is a repeat too
    altered = output[2].replace(b"hello", b"forged")
    applier.apply([(6, output[1], altered)])

    assert con.execute("SELECT count(*) FROM events").fetchone() == (2,)
    assert con.execute("SELECT text FROM output").fetchall() == [("hello\n",)]
    assert con.execute("SELECT output_chunks FROM executions").fetchone() == (1,)
    rejected = _rejected(con)
    assert [seq for seq, _ in rejected] == [3, 4, 5, 6]
    assert all(reason.startswith("duplicate: event id ") for _, reason in rejected)
    assert "was applied at seq 2" in rejected[0][1] and "was applied at seq 1" in rejected[1][1]


def test_forged_authority_and_orphan_lifecycle_events_are_not_facts(tmp_path: Path) -> None:
    con, applier = _applier(tmp_path)
    eid = "frg00001"
    batch = [
        _message(1, eid, ExecutionRequested(command=("x",), repo="/r")),
        _message(2, eid, ApprovalRequested(approval_id="ap-real", question="ship?")),
        # a grant by someone who is not the approver
        _message(
            3, eid, ApprovalGranted(approval_id="ap-real", choice=None, note=None, decided_by="mallory"), actor="cli"
        ),
        # a grant of an approval nobody asked for, recorded under the approver's name
        _message(4, eid, ApprovalGranted(approval_id="ap-none", choice=None, note=None, decided_by="mallory")),
        # a verdict not by the validator
        _message(5, eid, ValidationPassed(checkpoint=1, policy_version="v", duration_ms=1.0), actor="spawner-h-1"),
        # the exit of an execution that was never requested
        _message(6, "ghost001", ExecutionExited(exit_code=0, duration_s=1.0)),
        _message(7, "ghost001", ExecutionStarted(pid=1, pgid=1, host="h", command=("x",), cwd="/")),
    ]
    applier.apply(batch[:4])
    applier.apply(batch[4:])  # the grant's check finds the request in the approvals table too
    applier.apply(
        [_message(8, eid, ApprovalGranted(approval_id="ap-real", choice=None, note=None, decided_by="ann"))]
    )  # the real one

    reasons = dict(_rejected(con))
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "actor 'cli' may not record approval.granted (only approver)" in reasons[3]
    assert reasons[4] == "no approval.requested for approval ap-none"
    assert "may not record validation.passed" in reasons[5]
    assert "never requested" in reasons[6] and "never requested" in reasons[7]
    assert con.execute("SELECT approval_id, status, decided_by FROM approvals ORDER BY 1").fetchall() == [
        ("ap-real", "granted", "ann")
    ]
    assert con.execute("SELECT count(*) FROM executions WHERE execution_id = 'ghost001'").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM validations").fetchone() == (0,)


def test_a_rebuild_of_the_same_log_screens_the_same_way(tmp_path: Path) -> None:
    """A bulk load (derive=False, as `corral projections rebuild` does) finds a request made in an
    earlier batch even though the approvals table is filled only at the end."""
    con, applier = _applier(tmp_path)
    eid = "blk00001"
    log = [
        _message(1, eid, ExecutionRequested(command=("x",), repo="/r")),
        _message(2, eid, ApprovalRequested(approval_id="ap-1", question="ok?")),
        _message(3, eid, ApprovalGranted(approval_id="ap-1", choice=None, note=None, decided_by="ann")),
        _message(4, eid, ApprovalGranted(approval_id="ap-2", choice=None, note=None, decided_by="eve")),
    ]
    applier.apply(log[:2], derive=False)
    applier.apply(log[2:], derive=False)
    applier.derive()
    assert [seq for seq, _ in _rejected(con)] == [4]
    assert con.execute("SELECT approval_id, status FROM approvals").fetchall() == [("ap-1", "granted")]


def test_a_jetstream_answer_stored_under_an_event_subject_is_no_event(tmp_path: Path) -> None:
    """What a request with the reply subject `corral.evt.<id>.cancel.requested` appends to the log
    (JetStream answers it there, docs/security.md): JSON, but no envelope; rejected, no row."""
    con, applier = _applier(tmp_path)
    answer = b'{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"config":{"name":"CORRAL"}}'
    requested = _message(2, "jsa00001", ExecutionRequested(command=("x",), repo="/r"))
    applier.apply([(1, "corral.evt.jsa00001.cancel.requested", answer), requested])
    assert con.execute("SELECT seq, type FROM events").fetchall() == [(2, "execution.requested")]
    assert _rejected(con) == [(1, "not a valid event envelope")]


def test_an_output_event_id_is_one_chunk_in_the_output_stream(tmp_path: Path) -> None:
    """CORRAL_OUTPUT (log retention): the same output event again (after the duplicate window,
    without or with another header: another stream sequence) is projected once, the repeat rejected."""
    con, core = _applier(tmp_path)
    output = OutputApplier(con, tmp_dir=tmp_path / "tmp")
    eid = "odup0001"
    core.apply([_message(1, eid, ExecutionRequested(command=("x",), repo="/r"))])
    one = _message(1, eid, Output(stream="stdout", n=1, text="one\n"))
    two = _message(2, eid, Output(stream="stdout", n=2, text="two\n"))
    output.apply_gathered(_gathered([one, two, (3, one[1], one[2])]))  # a repeat within the batch
    output.apply_gathered(_gathered([(4, two[1], two[2]), (5, one[1], one[2].replace(b"one", b"forged"))]))
    output.apply_gathered(_gathered([_message(6, eid, Output(stream="stdout", n=3, text="three\n"))]))

    assert con.execute("SELECT text FROM output ORDER BY seq").fetchall() == [("one\n",), ("two\n",), ("three\n",)]
    assert con.execute("SELECT output_chunks, output_bytes FROM executions").fetchone() == (3, 14)
    assert con.execute("SELECT count(*) FROM search WHERE type = 'output'").fetchone() == (3,)
    rejected = _rejected(con)
    assert [seq - OUTPUT_SEQ_BASE for seq, _ in rejected] == [3, 4, 5]
    assert rejected[0][1] == f"duplicate: event id {_id(one)} was applied at seq {OUTPUT_SEQ_BASE + 1}"
    assert rejected[1][1] == f"duplicate: event id {_id(two)} was applied at seq {OUTPUT_SEQ_BASE + 2}"
    assert rejected[2][1].startswith(f"duplicate: event id {_id(one)} ")
    assert output.position == 6


def _id(message: tuple[int, str, bytes]) -> str:
    return str(json.loads(message[2])["id"])


def _gathered(messages: list[tuple[int, str, bytes]]) -> Gathered:
    gathered = Gathered()
    for seq, subject, payload in messages:
        gathered.add(seq, subject.encode(), payload)
    return gathered


# --- a real system, attacked with the admin credential ------------------------------------------


def _sql(cli: Cli, query: str) -> list[dict[str, Any]]:
    return json.loads(cli("sql", query, "--json", check=True).stdout)  # type: ignore[no-any-return]


async def _publish_as_admin(cli: Cli, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
    runtime = json.loads((cli.home / "runtime.json").read_text())
    admin = read_credentials(cli.home / "credentials.json").get("admin")
    bus = await connect_bus(runtime["url"], credentials=admin)
    try:
        for subject, payload, headers in messages:
            await bus.js.publish(subject, payload, headers=headers)
    finally:
        await bus.close()


async def _trim_as_admin(cli: Cli, keep: int) -> None:
    runtime = json.loads((cli.home / "runtime.json").read_text())
    admin = read_credentials(cli.home / "credentials.json").get("admin")
    bus = await connect_bus(runtime["url"], credentials=admin)
    try:
        info = await bus.js.stream_info(STREAM)
        config: StreamConfig = info.config
        config.max_msgs = keep
        await bus.js.update_stream(config)
    finally:
        await bus.close()


def test_forged_and_repeated_events_published_as_admin_are_rejected(embedded_cli: Cli, repo: Path) -> None:
    cli = embedded_cli
    up = start_up(cli)
    try:
        real = cli("run", "--repo", str(repo), "-q", *agent_command("one", "--steps", "1"), check=True)
        assert real.returncode == 0
        [requested] = _sql(cli, "SELECT id, execution_id, type FROM events WHERE type = 'execution.requested'")
        stored = _sql(cli, f"SELECT * FROM events WHERE id = '{requested['id']}'")[0]
        envelope = {k: stored[k] for k in ("id", "type", "execution_id", "ts", "actor", "causation_id")}
        envelope |= {"correlation_id": stored["correlation_id"], "v": stored["v"], "data": json.loads(stored["data"])}
        subject = f"corral.evt.{requested['execution_id']}.execution.requested"
        grant = ApprovalGranted(approval_id="ap-forged", choice=None, note=None, decided_by="mallory")
        forged = new_event(requested["execution_id"], grant, actor="approver-h-1")
        asyncio.run(
            _publish_as_admin(
                cli,
                [
                    (subject, json.dumps(envelope).encode(), None),  # no Nats-Msg-Id
                    (subject, json.dumps(envelope).encode(), {"Nats-Msg-Id": "another-header"}),
                    (forged.subject, forged.to_bytes(), None),
                ],
            )
        )

        def rejected() -> list[dict[str, Any]]:
            rows = _sql(cli, "SELECT seq, error FROM rejected_events ORDER BY seq")
            return rows if len(rows) >= 3 else []

        reasons = [row["error"] for row in wait_until(rejected, 60, "the three rejections")]  # type: ignore[union-attr]
        assert sum(r.startswith(f"duplicate: event id {requested['id']}") for r in reasons) == 2
        assert "no approval.requested for approval ap-forged" in reasons
        assert _sql(cli, f"SELECT count(*) AS n FROM events WHERE id = '{requested['id']}'") == [{"n": 1}]
        approvals = json.loads(cli("approvals", "--all", "--json", check=True).stdout)
        assert not [a for a in approvals if a["approval_id"] == "ap-forged"]
        assert _sql(cli, "SELECT count(*) AS n FROM executions") == [{"n": 1}]
    finally:
        stop_up(cli, up)


def test_rebuild_from_a_trimmed_log_refuses_unless_forced(embedded_cli: Cli, repo: Path) -> None:
    cli = embedded_cli
    up = start_up(cli)
    try:
        for name in ("one", "two", "three"):
            cli("run", "--repo", str(repo), "-q", *agent_command(name, "--steps", "2"), check=True)
        before = _sql(cli, "SELECT (SELECT count(*) FROM executions) AS executions, (SELECT count(*) FROM events) AS n")
        asyncio.run(_trim_as_admin(cli, 5))  # what an admin (or a bad [retention]) can do to the log

        refused = cli("projections", "rebuild")
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert "refused: the rebuilt tables would lose" in last and "executions" in last, refused.stderr
        assert "starts at sequence" in last and "--force" in last
        assert _sql(cli, "SELECT (SELECT count(*) FROM executions) AS executions, "
                         "(SELECT count(*) FROM events) AS n") == before  # fmt: skip

        forced = cli("projections", "rebuild", "--force")
        assert forced.returncode == 0, forced.stderr
        assert "rebuilt" in forced.stderr
        # the five messages left: facts, or rejected with a reason (a start or exit whose request
        # was trimmed away is no fact)
        kept = _sql(cli, "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM rejected_events) AS n")
        assert kept == [{"n": 5}]
    finally:
        stop_up(cli, up)


def test_repeated_output_events_in_the_output_stream_are_rejected(embedded_cli: Cli, repo: Path) -> None:
    """With [retention] on, output events live in CORRAL_OUTPUT: one published again there (no
    header, another header) as admin is projected once and counted as a duplicate."""
    cli = embedded_cli
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text("[retention]\noutput_max_msgs = 1000\n")
    up = start_up(cli)
    try:
        cli("run", "--repo", str(repo), "-q", *agent_command("one", "--steps", "2"), check=True)
        before = _sql(cli, "SELECT seq, execution_id, text FROM output ORDER BY seq")
        assert before and all(row["seq"] > OUTPUT_SEQ_BASE for row in before)
        chunks = _sql(cli, "SELECT output_chunks FROM executions")
        first = before[0]

        async def repeat() -> None:
            runtime = json.loads((cli.home / "runtime.json").read_text())
            admin = read_credentials(cli.home / "credentials.json").get("admin")
            bus = await connect_bus(runtime["url"], credentials=admin)
            try:
                stored = await bus.js.get_msg(OUTPUT_STREAM, first["seq"] - OUTPUT_SEQ_BASE)
                assert stored.subject is not None and stored.data is not None
                await bus.js.publish(stored.subject, stored.data)  # no Nats-Msg-Id
                await bus.js.publish(stored.subject, stored.data, headers={"Nats-Msg-Id": "another-header"})
            finally:
                await bus.close()

        asyncio.run(repeat())

        def rejected() -> list[dict[str, Any]]:
            rows = _sql(cli, "SELECT seq, error FROM rejected_events ORDER BY seq")
            return rows if len(rows) >= 2 else []

        reasons = [row["error"] for row in wait_until(rejected, 60, "the two rejections")]  # type: ignore[union-attr]
        assert reasons == [f"duplicate: event id {reasons[0].split()[3]} was applied at seq {first['seq']}"] * 2
        assert _sql(cli, "SELECT seq, execution_id, text FROM output ORDER BY seq") == before
        assert _sql(cli, "SELECT output_chunks FROM executions") == chunks
    finally:
        stop_up(cli, up)
