"""Issue 18, the rest: breakers on plain template runs, watchdog retries inside a stage, setup and
teardown scripts per template, webhook triggers. Everything real: nats-server, `corral up`, agents."""

import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from tests.test_control import start_up, stop_up, wait_until
from tests.test_pipelines import run_status, wait_finished, write_config


def sql(cli: Cli, query: str) -> list[dict[str, Any]]:
    return json.loads(cli("sql", query, "--json", check=True).stdout)  # type: ignore[no-any-return]


def breaker_rows(cli: Cli, key: str) -> list[dict[str, Any]]:
    return [r for r in json.loads(cli("breakers", "--json", check=True).stdout) if r["key"] == key]


def event_types(cli: Cli, execution_id: str) -> list[str]:
    rows = sql(cli, f"SELECT type FROM events WHERE execution_id = '{execution_id}' ORDER BY seq")
    return [r["type"] for r in rows]


def test_plain_template_runs_open_its_breaker_hold_new_runs_and_the_escalation_decides(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "fixed"
    write_config(cli, f'[templates.fragile]\ncommand = ["test", "-f", "{flag}"]\nbreaker_failures = 2\n')
    up = start_up(cli)
    try:
        for _ in range(2):
            failed = cli("run", "-t", "fragile", "--repo", str(repo), timeout=120)
            assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stdout + failed.stderr
        rows = wait_until(
            lambda: [r for r in breaker_rows(cli, "template:fragile") if r["state"] == "open" and r.get("approval_id")],
            60,
            "the template's breaker to open with an escalation",
        )
        breaker = rows[0]  # type: ignore[index]
        assert breaker["failures"] == 2
        approval = sql(cli, f"SELECT category, question FROM approvals WHERE approval_id = '{breaker['approval_id']}'")
        assert approval[0]["category"] == "escalation" and "template:fragile" in approval[0]["question"]
        # A new run is held: queued, never claimed, `execution.held` naming the breaker.
        held = cli("run", "-t", "fragile", "--repo", str(repo), "--detach", check=True).stdout.strip()
        wait_until(lambda: "execution.held" in event_types(cli, held), 60, "the run to be held")
        assert "execution.claimed" not in event_types(cli, held)
        assert json.loads(cli("status", held, "--json", check=True).stdout)["state"] in ("requested", "queued")
        # A run of another template is not held.
        write_config(
            cli,
            f'[templates.fragile]\ncommand = ["test", "-f", "{flag}"]\nbreaker_failures = 2\n'
            '[templates.other]\ncommand = ["true"]\n',
        )
        assert cli("run", "-t", "other", "--repo", str(repo), timeout=120).returncode == 0
        assert "execution.claimed" not in event_types(cli, held)
        flag.write_text("fixed\n")
        cli("approve", breaker["approval_id"], check=True)  # released: it runs now, and passes
        done = wait_until(
            lambda: (s := json.loads(cli("status", held, "--json", check=True).stdout))["state"] == "exited" and s,
            90,
            "the held run to be released and end",
        )
        assert done["exit_code"] == 0  # type: ignore[index]
        after = breaker_rows(cli, "template:fragile")[0]
        assert after["state"] == "closed" and after["released"] is True and after["failures"] == 0
        # Open it again; this time a human rejects the escalation: the held run is stopped, not run.
        flag.unlink()
        for _ in range(2):
            assert cli("run", "-t", "fragile", "--repo", str(repo), timeout=120).returncode != 0
        again = wait_until(
            lambda: [
                r
                for r in breaker_rows(cli, "template:fragile")
                if r["state"] == "open" and r.get("approval_id") not in (None, breaker["approval_id"])
            ],
            60,
            "the breaker to open a second time",
        )
        stopped = cli("run", "-t", "fragile", "--repo", str(repo), "--detach", check=True).stdout.strip()
        wait_until(lambda: "execution.held" in event_types(cli, stopped), 60, "the second run to be held")
        flag.write_text("fixed\n")  # it would pass if it ran: it must not run
        cli("reject", again[0]["approval_id"], check=True)  # type: ignore[index]
        end = wait_until(
            lambda: (s := json.loads(cli("status", stopped, "--json", check=True).stdout))["state"] == "exited" and s,
            90,
            "the held run to be stopped",
        )
        assert end["exit_reason"] == "cancelled" and "execution.started" not in event_types(cli, stopped)  # type: ignore[index]
    finally:
        stop_up(cli, up)


def test_a_stage_follows_the_watchdogs_retries_and_ends_with_the_last_attempt(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    flaky = f"test -f {marks}/{{{{key}}}} || {{ touch {marks}/{{{{key}}}}; echo first attempt fails; exit 3; }}"
    write_config(
        cli,
        '[sandbox]\nmode = "off"\n'
        '[watchdog]\nretry_on = ["exit"]\nretry_max_attempts = 1\nretry_backoff = "1s"\n'
        f'[[pipelines.flaky.stages]]\nname = "flaky"\ncommand = ["sh", "-c", "{flaky}"]\n'
        '[[pipelines.flaky.stages]]\nname = "after"\nrun = "echo after {{flaky.exit_code}} {{flaky.execution_id}}"\n'
        '[[pipelines.doomed.stages]]\nname = "doomed"\ncommand = ["sh", "-c", "exit 4"]\n',
    )
    up = start_up(cli)
    try:
        done = cli("pipeline", "run", "flaky", "--repo", str(repo), "--var", "key=a", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = done.stdout.split(":", 1)[0].strip()
        events = sql(
            cli,
            f"SELECT type, data FROM events WHERE execution_id = '{run_id}' AND type = 'stage.finished' ORDER BY seq",
        )
        finished = [json.loads(e["data"]) for e in events]
        assert [(f["stage"], f["outcome"], f["attempts"]) for f in finished] == [
            ("flaky", "passed", 2),
            ("after", "passed", 1),
        ]
        started = sql(
            cli,
            f"SELECT data->>'execution_id' AS id FROM events WHERE execution_id = '{run_id}' "
            "AND type = 'stage.started' ORDER BY seq",
        )[0]["id"]
        retry = finished[0]["execution_id"]
        assert retry != started  # the retry's, not the first attempt's
        first = json.loads(cli("status", started, "--json", check=True).stdout)
        assert first["exit_code"] == 3
        assert sql(cli, f"SELECT retry_of FROM executions WHERE execution_id = '{retry}'") == [{"retry_of": started}]
        assert f"after 0 {retry}" in finished[1]["result"]
        # Every attempt failing: the stage fails once, after the last one.
        doomed = cli("pipeline", "run", "doomed", "--repo", str(repo), timeout=180)
        assert doomed.returncode == 1, doomed.stdout + doomed.stderr
        doomed_id = doomed.stdout.split(":", 1)[0].strip()
        report = run_status(cli, doomed_id)
        assert [(s["stage"], s["outcome"]) for s in report["steps"]] == [("doomed", "failed")]
        last = sql(cli, f"SELECT data FROM events WHERE execution_id = '{doomed_id}' AND type = 'stage.finished'")
        assert json.loads(last[0]["data"])["attempts"] == 2
    finally:
        stop_up(cli, up)


SCRIPTS = """
[templates.prep]
command = ["sh", "-c", "cat prepared.txt; echo agent-ran > ran.txt"]
setup = "echo prepared-by-setup > prepared.txt; echo setting up; echo MODE=$PREP_MODE"
teardown = "cat ran.txt; echo torn-down > teardown.txt"
env = { PREP_MODE = "plain" }

[templates.badprep]
command = ["sh", "-c", "echo the agent must not run > ran.txt"]
setup = "echo installing; echo missing dependency libfoo >&2; exit 7"
teardown = "echo never > teardown.txt"
"""


def test_setup_prepares_the_worktree_the_agent_reads_and_teardown_runs_after_it(cli: Cli, repo: Path) -> None:
    write_config(cli, SCRIPTS)
    up = start_up(cli)
    try:
        ran = cli("run", "-t", "prep", "--repo", str(repo), timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        execution_id = sql(cli, "SELECT execution_id FROM executions WHERE template = 'prep'")[0]["execution_id"]
        kinds = event_types(cli, execution_id)
        assert kinds.index("setup.finished") < kinds.index("execution.started")
        assert kinds.index("teardown.finished") < kinds.index("execution.exited")
        rows = sql(
            cli,
            f"SELECT type, data FROM events WHERE execution_id = '{execution_id}' "
            "AND type IN ('setup.finished', 'teardown.finished', 'output') ORDER BY seq",
        )
        data = {r["type"]: json.loads(r["data"]) for r in rows if r["type"] != "output"}
        output = "".join(json.loads(r["data"])["text"] for r in rows if r["type"] == "output")
        assert data["setup.finished"]["exit_code"] == 0 and "setting up" in data["setup.finished"]["output"]
        assert "MODE=plain" in data["setup.finished"]["output"]  # the agent's environment
        assert data["setup.finished"]["duration_s"] >= 0
        assert "prepared-by-setup" in output  # the agent read what setup made
        assert "agent-ran" in data["teardown.finished"]["output"]  # teardown ran after the agent
        worktree = Path(json.loads(cli("status", execution_id, "--json", check=True).stdout)["worktree"])
        assert (worktree / "teardown.txt").read_text() == "torn-down\n"
        # A failing setup fails the execution with its reason; the agent and teardown never run.
        bad = cli("run", "-t", "badprep", "--repo", str(repo), timeout=120)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        failed_id = sql(cli, "SELECT execution_id FROM executions WHERE template = 'badprep'")[0]["execution_id"]
        status = json.loads(cli("status", failed_id, "--json", check=True).stdout)
        assert status["state"] == "failed"
        assert "setup script exited with code 7: missing dependency libfoo" in status["error"]
        shown = cli("status", failed_id, check=True).stdout
        assert "setup script exited with code 7: missing dependency libfoo" in shown
        kinds = event_types(cli, failed_id)
        assert "setup.finished" in kinds and "execution.started" not in kinds and "teardown.finished" not in kinds
        failed_worktree = Path(status["worktree"]) if status.get("worktree") else None
        if failed_worktree is not None and failed_worktree.exists():
            assert not (failed_worktree / "ran.txt").exists() and not (failed_worktree / "teardown.txt").exists()
    finally:
        stop_up(cli, up)


def test_webhook_fires_its_pipeline_when_signed_and_refuses_every_attack(tmp_path: Path, repo: Path) -> None:
    """POST /api/hooks/{name}: signed (HMAC-SHA256 over '<timestamp>.<body>') or an operator token."""
    import time

    import httpx

    from corral.hooks import signature
    from tests.conftest import cli_environment

    secret = "s3cret-for-the-hook"
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"), CORRAL_HOOK_SECRET=secret)
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    write_config(
        cli,
        '[[pipelines.fix.stages]]\nname = "fix"\ncommand = ["echo", "fixing {{branch_name}} at {{sha}}"]\n'
        f'[hooks.ci-red]\npipeline = "fix"\nrepo = "{repo}"\nsecret_env = "CORRAL_HOOK_SECRET"\n'
        'accept = ["branch_name", "sha"]\n',
    )
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        operator = cli("token", "create", "alice", "--role", "operator", check=True).stdout.strip()
        tap = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()
        body = json.dumps({"branch_name": "main", "sha": "abc123", "ignored": "x", "nested": {"a": 1}}).encode()

        def signed(stamp: str, key: str = secret, payload: bytes = body) -> dict[str, str]:
            return {
                "X-Corral-Timestamp": stamp,
                "X-Corral-Signature": signature(key.encode(), stamp, payload),
                "Content-Type": "application/json",
            }

        now = str(int(time.time()))
        with httpx.Client(base_url=str(url), timeout=60) as http:
            # Attacks: each is refused and records nothing.
            unsigned = http.post("/api/hooks/ci-red", content=body)
            assert unsigned.status_code == 401 and "unsigned" in unsigned.json()["error"], unsigned.text
            wrong = http.post("/api/hooks/ci-red", content=body, headers=signed(now, key="guessed"))
            assert wrong.status_code == 401 and "bad signature" in wrong.json()["error"], wrong.text
            tampered = http.post(
                "/api/hooks/ci-red", content=body.replace(b"main", b"evil"), headers=signed(now)
            )  # a signed request whose body was changed on the way
            assert tampered.status_code == 401, tampered.text
            old = str(int(time.time()) - 3600)  # a captured request replayed an hour later
            replayed = http.post("/api/hooks/ci-red", content=body, headers=signed(old))
            assert replayed.status_code == 401 and "replayed" in replayed.json()["error"], replayed.text
            as_tap = http.post("/api/hooks/ci-red", content=body, headers={"Authorization": f"Bearer {tap}"})
            assert as_tap.status_code == 403, as_tap.text
            forged = http.post("/api/hooks/ci-red", content=body, headers={"Authorization": "Bearer nope"})
            assert forged.status_code == 401, forged.text
            unknown = http.post("/api/hooks/nope", content=body, headers=signed(now))
            assert unknown.status_code == 404, unknown.text
            assert sql(cli, "SELECT count(*) AS n FROM events WHERE type = 'pipeline.requested'") == [{"n": 0}]
            # Signed: the run is requested with the body's accepted values; the same delivery again is not.
            fired = http.post("/api/hooks/ci-red", content=body, headers=signed(now))
            assert fired.status_code == 201, fired.text
            run_id = fired.json()["run_id"]
            again = http.post("/api/hooks/ci-red", content=body, headers=signed(now))
            assert again.status_code == 200 and again.json() == {**fired.json(), "duplicate": True}, again.text
            report = wait_finished(cli, run_id)
            assert report["state"] == "passed" and report["steps"][0]["result"] == "fixing main at abc123\n"
            variables = json.loads(sql(cli, f"SELECT vars FROM pipelines WHERE run_id = '{run_id}'")[0]["vars"])
            assert variables == {"branch_name": "main", "sha": "abc123"}
            # An operator's token works without a signature (no replay key: each call is a run).
            by_token = http.post("/api/hooks/ci-red", content=body, headers={"Authorization": f"Bearer {operator}"})
            assert by_token.status_code == 201 and by_token.json()["run_id"] != run_id, by_token.text
            missing = http.post(
                "/api/hooks/ci-red",
                content=b'{"branch_name": "x"}',
                headers=signed(now, payload=b'{"branch_name": "x"}'),
            )
            assert missing.status_code == 400 and "sha" in missing.json()["error"], missing.text
        assert sql(cli, "SELECT count(*) AS n FROM events WHERE type = 'pipeline.requested'") == [{"n": 2}]
    finally:
        stop_up(cli, up)


def test_a_schedules_breaker_opens_after_three_failed_ticks_holds_its_ticks_and_an_approval_closes_it(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    """A schedule every second whose runs fail: `schedule:patrol` opens at 3 failures in a row (not the
    template's breaker), the ticks due while it is open are one held tick whose run is not requested,
    and approving the escalation closes it: the held tick's run is requested and the next ticks fire."""
    flag = tmp_path / "fixed"
    write_config(
        cli,
        f'[templates.probe]\ncommand = ["test", "-f", "{flag}"]\n'
        f'[schedules.patrol]\nevery = "1s"\ntemplate = "probe"\nrepo = "{repo}"\n',
    )
    up = start_up(cli)
    try:
        rows = wait_until(
            lambda: [r for r in breaker_rows(cli, "schedule:patrol") if r["state"] == "open" and r.get("approval_id")],
            90,
            "the schedule's breaker to open with an escalation",
        )
        breaker = rows[0]  # type: ignore[index]
        assert breaker["failures"] >= 3 and breaker["threshold"] == 3
        approval = sql(cli, f"SELECT category, question FROM approvals WHERE approval_id = '{breaker['approval_id']}'")
        assert approval[0]["category"] == "escalation" and "schedule patrol failed" in approval[0]["question"]
        assert not [r for r in breaker_rows(cli, "template:probe") if r["state"] == "open"]  # counted on the schedule's

        def fired() -> list[dict[str, Any]]:
            return sql(
                cli,
                "SELECT seq, data->>'target_id' AS target, CAST(data->>'held' AS BOOLEAN) AS held "
                "FROM events WHERE type = 'schedule.fired' ORDER BY seq",
            )

        def requested(execution_id: str) -> bool:
            return bool(
                sql(cli, f"SELECT 1 FROM events WHERE execution_id = '{execution_id}' AND type = 'execution.requested'")
            )

        held = wait_until(lambda: [f for f in fired() if f["held"]], 60, "a held tick")[0]  # type: ignore[index]
        listed = {s["name"]: s for s in json.loads(cli("schedules", "--json", check=True).stdout)}
        assert listed["patrol"]["breaker"] == "open" and listed["patrol"]["held"] is True
        # Three more ticks fall due while it is open: they are that one held tick, and nothing runs.
        time.sleep(3)
        after = [f for f in fired() if f["seq"] >= held["seq"]]
        assert after == [held], after  # no tick fired after the held one
        assert not requested(held["target"])
        flag.write_text("fixed\n")
        cli("approve", breaker["approval_id"], check=True)  # closes it: the held tick runs now
        wait_until(lambda: requested(held["target"]), 60, "the held tick's run to be requested")
        done = wait_until(
            lambda: (
                (s := json.loads(cli("status", held["target"], "--json", check=True).stdout))["state"] == "exited" and s
            ),
            90,
            "the held tick's run to end",
        )
        assert done["exit_code"] == 0  # type: ignore[index]
        wait_until(
            lambda: [f for f in fired() if f["seq"] > held["seq"] and not f["held"] and requested(f["target"])],
            60,
            "the next ticks to fire and run",
        )
        after_close = breaker_rows(cli, "schedule:patrol")[0]
        assert after_close["state"] == "closed" and after_close["released"] is True
        assert after_close["decided_by"]
    finally:
        stop_up(cli, up)


def test_webhooks_add_tickets_and_start_template_runs_once_per_delivery(tmp_path: Path, repo: Path) -> None:
    """`[hooks.NAME] ticket = true` adds a ticket its pipeline runs (title, goal from the body); `template`
    starts a run of it with its task rendered from the body. Each signed delivery is recorded once; a bad
    signature, a stale timestamp and a tap token record nothing."""
    import httpx

    from corral.hooks import signature
    from tests.conftest import cli_environment

    secret = "another-hook-secret"
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"), CORRAL_HOOK_SECRET=secret)
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    write_config(
        cli,
        '[[pipelines.triage.stages]]\nname = "look"\n'
        'command = ["echo", "looking at {{title}}: {{goal}} ({{source}})"]\n'
        '[templates.echoer]\ncommand = ["true"]\n'
        f'[hooks.issue]\npipeline = "triage"\nticket = true\nrepo = "{repo}"\nsecret_env = "CORRAL_HOOK_SECRET"\n'
        f'[hooks.lint]\ntemplate = "echoer"\ntask = "lint {{{{branch}}}}"\nrepo = "{repo}"\n'
        'secret_env = "CORRAL_HOOK_SECRET"\n',
    )
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        tap = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()

        def signed(body: bytes, stamp: str, key: str = secret) -> dict[str, str]:
            return {
                "X-Corral-Timestamp": stamp,
                "X-Corral-Signature": signature(key.encode(), stamp, body),
                "Content-Type": "application/json",
            }

        def count(kind: str) -> int:
            return int(sql(cli, f"SELECT count(*) AS n FROM events WHERE type = '{kind}'")[0]["n"])

        issue = json.dumps({"title": "Crash on empty input", "goal": "no crash", "source": "tracker"}).encode()
        lint = json.dumps({"branch": "feature-x"}).encode()
        now = str(int(time.time()))
        with httpx.Client(base_url=str(url), timeout=60) as http:
            for path, body in (("/api/hooks/issue", issue), ("/api/hooks/lint", lint)):
                wrong = http.post(path, content=body, headers=signed(body, now, key="guessed"))
                assert wrong.status_code == 401 and "bad signature" in wrong.json()["error"], wrong.text
                stale = http.post(path, content=body, headers=signed(body, str(int(time.time()) - 3600)))
                assert stale.status_code == 401 and "replayed" in stale.json()["error"], stale.text
                as_tap = http.post(path, content=body, headers={"Authorization": f"Bearer {tap}"})
                assert as_tap.status_code == 403, as_tap.text
            no_goal = json.dumps({"title": "only a title"}).encode()
            refused = http.post("/api/hooks/issue", content=no_goal, headers=signed(no_goal, now))
            assert refused.status_code == 422 and "goal" in refused.json()["error"], refused.text
            assert count("ticket.created") == 0 and count("execution.requested") == 0
            # A signed issue is a ticket; the same delivery again adds none.
            added = http.post("/api/hooks/issue", content=issue, headers=signed(issue, now))
            assert added.status_code == 201, added.text
            ticket_id = added.json()["ticket_id"]
            again = http.post("/api/hooks/issue", content=issue, headers=signed(issue, now))
            assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
            assert again.json()["ticket_id"] == ticket_id
            # A signed lint call is a run of the template, its task from the body; once per delivery.
            started = http.post("/api/hooks/lint", content=lint, headers=signed(lint, now))
            assert started.status_code == 201, started.text
            execution_id = started.json()["execution_id"]
            repeated = http.post("/api/hooks/lint", content=lint, headers=signed(lint, now))
            assert repeated.status_code == 200 and repeated.json()["duplicate"] is True, repeated.text
        done = wait_until(
            lambda: [t for t in json.loads(cli("tickets", "--json", check=True).stdout) if t["state"] == "passed"],
            90,
            "the webhook's ticket to pass",
        )
        assert [t["ticket_id"] for t in done] == [ticket_id]  # type: ignore[union-attr]
        result = sql(cli, f"SELECT result, title FROM tickets WHERE ticket_id = '{ticket_id}'")[0]
        assert result["title"] == "Crash on empty input"
        assert "looking at Crash on empty input: no crash (tracker)" in result["result"]
        ended = wait_until(
            lambda: (
                (s := json.loads(cli("status", execution_id, "--json", check=True).stdout))["state"] == "exited" and s
            ),
            90,
            "the template's run to end",
        )
        assert ended["exit_code"] == 0  # type: ignore[index]
        assert count("ticket.created") == 1
        labelled = sql(
            cli,
            "SELECT execution_id, data->>'requested_by' AS who, data->>'task' AS task FROM events "
            "WHERE type = 'execution.requested' AND data->'labels'->>'hook' = 'lint'",
        )
        assert labelled == [{"execution_id": execution_id, "who": "hook:lint", "task": "lint feature-x"}]
    finally:
        stop_up(cli, up)
