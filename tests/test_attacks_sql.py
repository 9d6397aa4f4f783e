"""`corral sql` is a read-only sandbox (docs/security.md, "The query sandbox"): every attack is
tried through the CLI and through the NATS subject corral.api.sql as the read-only `tap` user,
against a running `corral up`, and must be refused with nothing changed."""

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from nats.errors import Error as NatsError

from actors.bus import Bus
from corral.server import EmbeddedServer
from events.auth import CredentialSet
from events.envelope import new_event
from events.subjects import API_EXPORT, API_SQL, STREAM
from events.types import ExecutionRequested
from projections.batch import Gathered
from projections.errors import QueryError, QueryRefused, QueryTimeout
from projections.worker import ApplyWorker, RemoteApplier
from tests.conftest import Cli, agent_command
from tests.test_control import detach, start_up, stop_up
from tests.test_security import as_role

SLOW = "SELECT sum(range) AS s FROM range(1000000000000)"  # hours of work: only a timeout ends it


@dataclass
class Sandbox:
    cli: Cli
    tap: Bus
    repo: Path
    execution_id: str
    passwords: list[str]

    async def sql(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.cli, "sql", *args)

    async def ask(self, sql: str, *, max_rows: int = 100) -> dict[str, Any]:
        """The raw API as `tap`; the reply's bytes are checked for passwords as well."""
        reply = await self.tap.nc.request(API_SQL, orjson.dumps({"sql": sql, "max_rows": max_rows}), timeout=90)
        self.assert_no_password(reply.data.decode(errors="replace"))
        answer: dict[str, Any] = orjson.loads(reply.data)
        return answer

    async def rows(self, sql: str) -> list[dict[str, Any]]:
        done = await self.sql(sql, "--json")
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def assert_no_password(self, text: str) -> None:
        for password in self.passwords:
            assert password not in text

    async def assert_unchanged(self) -> None:
        """The execution's rows and every table are still there."""
        counted = await self.rows(
            f"SELECT (SELECT count(*) FROM executions WHERE execution_id = '{self.execution_id}') AS executions, "
            f"(SELECT count(*) FROM events WHERE execution_id = '{self.execution_id}') AS events"
        )
        assert counted == [{"executions": 1, "events": 1}]
        tables = {r["name"] for r in await self.rows("SELECT table_name AS name FROM duckdb_tables()")}
        assert {"events", "executions"} <= tables


@pytest.fixture
async def sandbox(
    cli: Cli, repo: Path, nats_server: EmbeddedServer, credentials: CredentialSet, request: pytest.FixtureRequest
) -> AsyncIterator[Sandbox]:
    """`corral up` with only the projector (an execution requested, never run), and `tap` connected."""
    timeout = getattr(request, "param", "3s")
    (cli.home / "corral.toml").write_text(f'[sql]\ntimeout = "{timeout}"\n')
    up = await asyncio.to_thread(start_up, cli, "--actors", "projector")
    tap = await as_role(nats_server, credentials, "tap")
    try:
        execution_id = await asyncio.to_thread(detach, cli, repo, *agent_command("--steps", "1"))
        passwords = list(json.loads((cli.home / "credentials.json").read_text())["users"].values())
        assert passwords
        box = Sandbox(cli, tap, repo, execution_id, passwords)
        await box.assert_unchanged()
        yield box
    finally:
        await tap.close()
        await asyncio.to_thread(stop_up, cli, up)


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1, stderr
    return stderr


# --- reading and writing files --------------------------------------------------------------------


async def test_files_outside_the_projections_cannot_be_read(sandbox: Sandbox) -> None:
    creds = sandbox.cli.home / "credentials.json"
    assert any(p in creds.read_text() for p in sandbox.passwords)
    for sql in (
        f"SELECT content FROM read_text('{creds}')",
        f"SELECT * FROM read_blob('{creds}')",
        f"SELECT * FROM read_json('{creds}')",
        f"SELECT * FROM read_csv('{creds}', header = false, sep = '|')",
        f"SELECT * FROM '{creds}'",
        f"SELECT * FROM glob('{sandbox.cli.home}/*')",
        "SELECT * FROM read_text('/etc/passwd')",
        f"SELECT * FROM read_text('{sandbox.cli.home / 'tmp'}/../credentials.json')",
    ):
        done = await sandbox.sql(sql)
        assert done.returncode == 2, (sql, done.stdout, done.stderr)
        assert "disabled by configuration" in one_line(done.stderr), done.stderr
        sandbox.assert_no_password(done.stdout + done.stderr)
        answer = await sandbox.ask(sql)
        assert answer["ok"] is False and answer["kind"] == "sql", answer
        assert "disabled by configuration" in answer["error"]
    await sandbox.assert_unchanged()


async def test_files_cannot_be_written_or_attached(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "written"
    attacks = {
        f"COPY executions TO '{target}.csv'": "COPY",
        f"COPY (SELECT * FROM events) TO '{target}.parquet' (FORMAT parquet)": "COPY",
        f"EXPORT DATABASE '{target}-export'": "EXPORT",
        f"ATTACH '{target}.duckdb' AS evil": "ATTACH",
        f"ATTACH '{target}.duckdb' AS evil; CREATE TABLE evil.t AS SELECT * FROM executions": "exactly one",
    }
    for sql, said in attacks.items():
        done = await sandbox.sql(sql)
        assert done.returncode == 2, (sql, done.stderr)
        assert said in one_line(done.stderr) and "refused" in done.stderr, done.stderr
        answer = await sandbox.ask(sql)
        assert answer == {"ok": False, "error": answer["error"], "kind": "refused"}, answer
    assert not list(tmp_path.glob("written*"))
    await sandbox.assert_unchanged()


# --- changing the projections ---------------------------------------------------------------------


async def test_nothing_is_deleted_dropped_or_escapes_the_rollback(sandbox: Sandbox) -> None:
    for sql in (
        "COMMIT; DELETE FROM executions; BEGIN",
        "ROLLBACK; DROP TABLE events; BEGIN TRANSACTION",
        "SELECT 1; DELETE FROM executions",
        "DELETE FROM executions",
        "DROP TABLE events",
        "UPDATE executions SET state = 'exited'",
        "INSERT INTO events SELECT * FROM events",
        "CREATE TABLE stolen AS SELECT * FROM executions",
        "CREATE OR REPLACE VIEW executions AS SELECT 1",
        "ALTER TABLE events RENAME TO gone",
        "TRUNCATE events",
        "COMMIT",
        "CHECKPOINT",
        "DETACH corral",
        "USE memory",
        "EXPLAIN ANALYZE DELETE FROM executions",
    ):
        done = await sandbox.sql(sql)
        assert done.returncode == 2, (sql, done.stdout, done.stderr)
        assert "refused" in one_line(done.stderr) and "SUCCESS" not in done.stdout, done.stderr
        answer = await sandbox.ask(sql)
        assert answer["ok"] is False and answer["kind"] == "refused", (sql, answer)
    await sandbox.assert_unchanged()
    explained = await sandbox.rows("EXPLAIN SELECT count(*) FROM executions")  # a query may be explained
    assert explained and "explain_value" in explained[0]


async def test_settings_extensions_and_pragmas_are_refused(sandbox: Sandbox) -> None:
    for sql in (
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "RESET enable_external_access",
        "SET threads = 1",
        "INSTALL httpfs",
        "LOAD httpfs",
        "FORCE INSTALL httpfs",
        "PRAGMA enable_profiling",
        "CALL pragma_version()",
        "PREPARE p AS SELECT 1",
        "CREATE SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')",
        "VACUUM",
    ):
        done = await sandbox.sql(sql)
        assert done.returncode == 2, (sql, done.stdout, done.stderr)
        assert "refused" in one_line(done.stderr), done.stderr
        answer = await sandbox.ask(sql)
        assert answer["ok"] is False and answer["kind"] == "refused", (sql, answer)
    settings = await sandbox.rows(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', 'lock_configuration') "
        "ORDER BY name"
    )
    assert settings == [
        {"name": "enable_external_access", "value": "false"},
        {"name": "lock_configuration", "value": "true"},
    ]
    remote = await sandbox.sql("SELECT * FROM 'https://example.com/x.csv'")  # no httpfs, no network
    assert remote.returncode == 2 and "disabled by configuration" in remote.stderr, remote.stderr


# --- time and size ------------------------------------------------------------------------------


async def test_a_long_query_is_stopped_and_the_answer_is_bounded(sandbox: Sandbox) -> None:
    done = await sandbox.sql(SLOW)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "timed out" in one_line(done.stderr) and "[sql] timeout" in done.stderr, done.stderr
    answer = await sandbox.ask(SLOW)
    assert answer["ok"] is False and answer["kind"] == "timeout", answer
    await sandbox.assert_unchanged()

    wide = "SELECT repeat('x', 100000) AS x FROM range(200)"  # 20 MB, more than one NATS message holds
    cut = await sandbox.sql(wide, "--json")
    assert cut.returncode == 0, cut.stderr
    assert "size limit" in one_line(cut.stderr), cut.stderr
    assert 0 < len(json.loads(cut.stdout)) < 200
    answer = await sandbox.ask(wide, max_rows=1000)
    assert answer["ok"] and answer["truncated"] and answer["cut"] == "bytes" and 0 < len(answer["rows"]) < 200
    many = await sandbox.ask("SELECT range FROM range(50)", max_rows=10)
    assert many["truncated"] and many["cut"] == "rows" and len(many["rows"]) == 10
    listed = await sandbox.sql("SELECT range FROM range(50)", "--max-rows", "10", "--json")
    assert len(json.loads(listed.stdout)) == 10 and "showing the first 10 rows" in listed.stderr


# --- every type answers -------------------------------------------------------------------------


TYPED = """
SELECT 170141183460469231731687303715884105727::HUGEINT AS huge,
       340282366920938463463374607431768211455::UHUGEINT AS uhuge,
       12::HUGEINT AS small_huge,
       1.50::DECIMAL(38, 10) AS dec,
       INTERVAL 1 MONTH + INTERVAL 3 DAY + INTERVAL 5 SECOND AS iv,
       '\\x00ab'::BLOB AS blob,
       '5a06060a-6021-4838-8a10-1ffc4e56caf7'::UUID AS id,
       [1, 2, NULL] AS list,
       {'a': 1, 'b': [170141183460469231731687303715884105727::HUGEINT], 'c': 2.5::DECIMAL(4, 2)} AS struct,
       MAP {1: 'one', 2: 'two'} AS map,
       DATE '2026-01-02' AS day,
       TIME '12:00:01.5' AS clock,
       TIMETZ '12:00:00+02' AS clock_tz,
       TIMESTAMP '2026-01-02 03:04:05' AS ts,
       TIMESTAMPTZ '2026-01-02 03:04:05+02' AS tstz,
       [TIMESTAMPTZ '2026-01-02 03:04:05+02'] AS tstz_list,
       [INTERVAL 2 DAY] AS iv_list,
       ['\\x01'::BLOB] AS blob_list,
       'nan'::DOUBLE AS nan,
       '101'::BIT AS bits,
       'a'::ENUM('a', 'b') AS enum,
       [1, 2]::INTEGER[2] AS array,
       union_value(k := 1) AS u,
       DATE 'infinity' AS forever,
       '{"a": 1}'::JSON AS doc,
       NULL AS nothing
"""

EXPECTED = {
    "huge": "170141183460469231731687303715884105727",
    "uhuge": "340282366920938463463374607431768211455",
    "small_huge": 12,
    "dec": "1.5000000000",
    "iv": "1 month 3 days 00:00:05",
    "blob": "\\x00ab",
    "id": "5a06060a-6021-4838-8a10-1ffc4e56caf7",
    "list": [1, 2, None],
    "struct": {"a": 1, "b": ["170141183460469231731687303715884105727"], "c": "2.50"},
    "map": {"1": "one", "2": "two"},
    "day": "2026-01-02",
    "clock": "12:00:01.500000",
    "clock_tz": "12:00:00+02:00",
    "ts": "2026-01-02T03:04:05",
    "tstz": "2026-01-02T01:04:05",
    "tstz_list": ["2026-01-02T01:04:05+00:00"],
    "iv_list": ["2 days, 0:00:00"],
    "blob_list": ["\\x01"],
    "nan": "nan",
    "bits": "101",
    "enum": "a",
    "array": [1, 2],
    "u": 1,
    "forever": "9999-12-31",
    "doc": '{"a": 1}',
    "nothing": None,
}


async def test_every_type_is_answered(sandbox: Sandbox) -> None:
    rows = await sandbox.rows(TYPED)
    assert rows == [EXPECTED]
    answer = await sandbox.ask(TYPED)
    assert answer["ok"], answer
    assert dict(zip(answer["columns"], answer["rows"][0], strict=True)) == EXPECTED
    assert answer["types"][:2] == ["HUGEINT", "UHUGEINT"]


# --- a slow query holds nothing up --------------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["30s"], indirect=True)
async def test_a_slow_query_holds_up_neither_applies_nor_other_queries(sandbox: Sandbox) -> None:
    slow = asyncio.create_task(sandbox.ask(SLOW))
    await asyncio.sleep(0)  # the slow request is sent before anything below
    later = await asyncio.to_thread(detach, sandbox.cli, sandbox.repo, *agent_command("--steps", "2"))
    ps = await asyncio.to_thread(sandbox.cli, "ps", "--json")  # waits for the projector to apply `later`
    assert ps.returncode == 0, ps.stderr
    assert later in {row["execution_id"] for row in json.loads(ps.stdout)}
    assert not slow.done(), "the new execution must be listed while the slow query still runs"
    quick = await sandbox.ask(f"SELECT state FROM executions WHERE execution_id = '{later}'")
    assert quick["ok"] and len(quick["rows"]) == 1, quick
    assert not slow.done(), "a second query must be answered before the slow one"
    answer = await slow
    assert answer["ok"] is False and answer["kind"] == "timeout", answer
    await sandbox.assert_unchanged()


# --- the worker itself: a swap of the live file (a rebuild) under running queries ----------------


def test_queries_survive_the_swap_of_the_live_file(tmp_path: Path) -> None:
    """Releasing the live file interrupts its queries instead of waiting hours for them; a query
    sent while no file is open waits for the next one; the sandbox holds on the reopened file."""
    worker = ApplyWorker(tmp_path / "corral.duckdb", tmp_dir=tmp_path / "t")
    worker.open()
    try:
        core = RemoteApplier(worker, STREAM)
        gathered = Gathered()
        event = new_event("swap0001", ExecutionRequested(command=("agent",), repo="/tmp/r"), actor="cli")
        gathered.add(1, event.subject.encode(), event.to_bytes())
        assert core.apply_gathered(gathered) == 1  # read_json of the batch directory works, sandboxed
        slow = worker.submit_query(SLOW, max_rows=10, timeout_s=5.0)
        worker.release()  # returns although the slow query would run for hours
        waiting = worker.submit_query("SELECT execution_id FROM executions", max_rows=10, timeout_s=60.0)
        assert not waiting.done()  # no file open: it waits for one
        worker.open()
        assert waiting.result()["rows"] == [["swap0001"]]
        with pytest.raises(QueryTimeout, match=r"\[sql\] timeout"):
            slow.result()  # run again on the reopened file, until its time was up
        (tmp_path / "secret.txt").write_text("s3cret")
        for outside in (tmp_path / "secret.txt", tmp_path / "t" / ".." / "secret.txt", Path.cwd() / ".tmp" / "x"):
            with pytest.raises(QueryError, match="disabled by configuration"):
                worker.query(f"SELECT * FROM read_text('{outside}')", max_rows=10)
        with pytest.raises(QueryRefused):
            worker.query(f"ATTACH '{tmp_path / 'x.duckdb'}' AS x", max_rows=10)
    finally:
        worker.close()
    assert not (tmp_path / "x.duckdb").exists()


async def test_export_is_for_operators_and_writes_only_a_query(
    sandbox: Sandbox, nats_server: EmbeddedServer, credentials: CredentialSet, tmp_path: Path
) -> None:
    """`corral export` asks on corral.api.projections.export: `tap` may not; an operator gets the
    rows of one SELECT in a Parquet file, and nothing else."""
    target = tmp_path / "out.parquet"
    request = orjson.dumps({"sql": "SELECT * FROM executions", "path": str(target)})
    with pytest.raises(NatsError):  # the server refuses tap's publish: no answer comes
        await sandbox.tap.nc.request(API_EXPORT, request, timeout=5)
    assert not target.exists()
    operator = await as_role(nats_server, credentials, "operator")
    try:
        for sql in ("DELETE FROM executions", "SELECT 1; DROP TABLE events", "EXPLAIN SELECT 1"):
            reply = await operator.nc.request(API_EXPORT, orjson.dumps({"sql": sql, "path": str(target)}), timeout=60)
            assert orjson.loads(reply.data)["kind"] == "refused", reply.data
        assert not target.exists()
        reply = await operator.nc.request(API_EXPORT, request, timeout=60)
        assert orjson.loads(reply.data)["rows"] == [[1]]
    finally:
        await operator.close()
    con = duckdb.connect()
    assert con.execute(f"SELECT execution_id FROM '{target}'").fetchall() == [(sandbox.execution_id,)]
    con.close()
    assert not list((sandbox.cli.home / "tmp").glob("export-*"))  # moved, not copied
    await sandbox.assert_unchanged()
