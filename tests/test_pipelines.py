"""Pipelines (issue 18): stages run by the conductor from the log, loops, hooks, SIGKILL, two conductors.

Stages are scripted: the fixture agent (examples/agent.py) as the builder, shell lines as the
reviewer (its verdict a JSON line on stdout) and as the verifier hook. Everything runs for real: a
nats-server, `corral up`, its spawner and conductor; the test reads the run's events back.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from actors.bus import connect_bus
from actors.conductor import Conductor, Held, render, verdict_of
from corral.server import EmbeddedServer
from events.auth import CredentialSet
from events.envelope import new_event
from events.types import ExecutionCrashLoop
from tests.conftest import AGENT, Cli
from tests.test_control import detach, start_up, stop_up, wait_state, wait_until


def build(name: str, sleep: float) -> str:
    """The builder: the fixture agent, its task from --var task=..."""
    return (
        f'[[pipelines.{name}.stages]]\nname = "build"\n'
        f'command = ["{sys.executable}", "{AGENT}", "{{{{task}}}}", "--steps", "2", "--sleep", "{sleep}"]\n'
    )


REVIEW_FIX_VERIFY = """
[[pipelines.ship.stages]]
name = "review"
run = '''if [ -f fixed.txt ]; then echo '{"verdict": "approved"}'; \
else echo '{"verdict": "changes_requested", "comments": "add fixed.txt"}'; fi'''
on_passed = "verify"
on_changes_requested = "fix"

[[pipelines.ship.stages]]
name = "fix"
run = "echo {{review.comments}} > fixed.txt"
on_passed = "review"

[[pipelines.ship.stages]]
name = "verify"
run = "test -f fixed.txt && echo ok: {{changed_files}}"
"""

FAILING_VERIFIER = """
[[pipelines.red.stages]]
name = "echo"
command = ["sh", "-c", "echo 'pwn $(touch pwned) `touch pwned2`; touch pwned3'"]

[[pipelines.red.stages]]
name = "verify"
run = "echo got {{echo.result}}; echo 'FAILED tests/test_x.py::test_y - assert 1 == 2'; exit 1"
"""


def write_config(cli: Cli, text: str) -> None:
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text(text)


def run_status(cli: Cli, run_id: str) -> dict[str, Any]:
    return json.loads(cli("pipeline", "status", run_id, "--json", check=True).stdout)  # type: ignore[no-any-return]


def run_events(cli: Cli, run_id: str) -> list[dict[str, Any]]:
    out = cli(
        "sql", f"SELECT type, data FROM events WHERE execution_id = '{run_id}' ORDER BY seq", "--json", check=True
    ).stdout
    return [{"type": row["type"], "data": json.loads(row["data"])} for row in json.loads(out)]


def wait_finished(cli: Cli, run_id: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_until(  # type: ignore[return-value]
        lambda: (s := run_status(cli, run_id))["state"] in ("passed", "failed", "cancelled") and s,
        timeout,
        f"pipeline run {run_id} to finish",
    )


def test_render_quotes_values_in_a_hook_and_finds_the_last_verdict() -> None:
    values = {"r": "x'; touch /tmp/pwned; echo '", "n": "3"}
    assert render("echo {{r}} {{ n }} {{missing}}", values) == "echo x'; touch /tmp/pwned; echo ' 3 "
    shell = render("echo {{r}}", values, shell=True)
    assert subprocess.run(["sh", "-c", shell], capture_output=True, text=True).stdout == values["r"] + "\n"
    text = 'noise\n{"verdict": "changes_requested", "comments": "a"}\n{"not": 1}\n{"verdict": "approved"}\ntail'
    assert verdict_of(text) == {"verdict": "approved"}
    assert verdict_of("{broken\nnothing") is None


def test_stage_ends_are_handled_before_new_work() -> None:
    """The conductor's fetched triggers: stage ends (and other moves) go first, new tickets and runs after,
    each oldest first; new work waits while its share of the handlers is taken."""
    held = Held()
    for subject in (
        "corral.evt.t1.ticket.created",
        "corral.evt.r1.pipeline.requested",
        "corral.evt.x1.execution.exited",
        "corral.evt.t2.ticket.created",
        "corral.evt.x2.execution.failed",
    ):
        held.put(Msg(_client=None, subject=subject))  # type: ignore[arg-type]
    assert len(held) == 5
    order = []
    for allowed in (False, False, False, True, True, True, True):
        msg, new = held.take(new_allowed=allowed)
        order.append((msg.subject.split(".")[2] if msg else None, new))
    ends, new_work = [("x1", False), ("x2", False)], [("t1", True), ("r1", True), ("t2", True)]
    assert order == [*ends, (None, False), *new_work, (None, False)]


def test_pipeline_loops_once_on_changes_requested_then_passes(cli: Cli, repo: Path) -> None:
    write_config(cli, build("ship", 0.05) + REVIEW_FIX_VERIFY)
    listed = json.loads(cli("pipelines", "--json", check=True).stdout)
    assert [s["name"] for s in listed[0]["stages"]] == ["build", "review", "fix", "verify"]
    up = start_up(cli)
    try:
        done = cli("pipeline", "run", "ship", "--repo", str(repo), "--var", "task=add a feature", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = done.stdout.split(":", 1)[0].strip()
        report = run_status(cli, run_id)
        assert report["state"] == "passed"
        steps = [(s["stage"], s["round"], s["outcome"], s["next"]) for s in report["steps"]]
        assert steps == [
            ("build", 1, "passed", "review"),
            ("review", 1, "changes_requested", "fix"),
            ("fix", 1, "passed", "review"),
            ("review", 2, "passed", "verify"),
            ("verify", 1, "passed", "done"),
        ]
        assert report["steps"][1]["comments"] == "add fixed.txt"
        assert report["steps"][3]["verdict"] == "approved"
        assert "fixed.txt" in report["steps"][4]["result"]  # {{changed_files}} of the run's worktree
        kinds = [e["type"] for e in run_events(cli, run_id)]
        assert kinds == [
            "pipeline.requested",
            "pipeline.started",
            *["stage.started", "stage.finished"] * 5,
            "pipeline.finished",
        ]
        # Every stage ran in the builder's worktree, on its branch; the tables say the same.
        rows = json.loads(
            cli(
                "sql",
                "SELECT s.step, s.stage, x.worktree, x.state FROM stages s JOIN executions x USING (execution_id) "
                f"WHERE s.run_id = '{run_id}' ORDER BY s.step",
                "--json",
                check=True,
            ).stdout
        )
        assert len(rows) == 5 and len({r["worktree"] for r in rows}) == 1
        assert all(r["state"] == "exited" for r in rows)
        table = json.loads(
            cli("sql", f"SELECT state, steps FROM pipelines WHERE run_id = '{run_id}'", "--json", check=True).stdout
        )
        assert table == [{"state": "passed", "steps": 5}]
    finally:
        stop_up(cli, up)


def test_failing_verifier_fails_the_run_with_its_output_and_values_stay_text(cli: Cli, repo: Path) -> None:
    write_config(cli, FAILING_VERIFIER)
    done = cli("pipeline", "run", "red", "--repo", str(repo), timeout=180)  # no `corral up`: the command runs it
    assert done.returncode == 1, done.stdout + done.stderr
    run_id = done.stdout.split(":", 1)[0].strip()
    report = run_status(cli, run_id)
    assert report["state"] == "failed"
    assert "stage verify failed: exit code 1" in report["reason"]
    verify = report["steps"][-1]
    assert verify["outcome"] == "failed" and verify["exit_code"] == 1 and verify["next"] == "fail"
    assert "FAILED tests/test_x.py::test_y - assert 1 == 2" in verify["result"]
    # An earlier stage's output went into the hook's shell line as quoted text, never as code.
    assert "pwn $(touch pwned) `touch pwned2`; touch pwned3" in verify["result"]
    worktree = json.loads(
        cli("sql", f"SELECT worktree FROM executions WHERE execution_id = '{verify['execution_id']}'", "--json").stdout
    )[0]["worktree"]
    assert not any((Path(worktree) / name).exists() for name in ("pwned", "pwned2", "pwned3"))


def test_bad_pipelines_are_refused_in_one_line(cli: Cli, repo: Path) -> None:
    write_config(cli, '[[pipelines.p.stages]]\nname = "a"\nrun = "true"\non_failed = "nowhere"\n')
    bad = cli("pipelines")
    assert bad.returncode != 0 and "pipelines.p.stages[0].on_failed: no stage 'nowhere'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    write_config(cli, '[[pipelines.p.stages]]\nname = "a"\nrun = "echo {{nope}}"\n')
    unknown = cli("pipeline", "run", "p", "--repo", str(repo))
    assert unknown.returncode == 2 or unknown.returncode == 1
    assert "{{nope}}" in unknown.stderr and "--var nope=VALUE" in unknown.stderr
    missing = cli("pipeline", "run", "q", "--repo", str(repo))
    assert missing.returncode != 0 and "no pipeline 'q' (known: p)" in missing.stderr
    assert cli("pipeline", "status", "nothere1").returncode != 0


def test_a_runs_next_stage_queues_as_old_as_its_run(cli: Cli, repo: Path, tmp_path: Path) -> None:
    """With every slot taken, a running pipeline's next stage starts before a run requested after the
    pipeline began: a stage's request queues by its run's age, not behind newer work (issue 18 Speed)."""

    def gated(name: str) -> list[str]:  # a command that ends when the test creates its gate file
        return ["sh", "-c", f"until [ -e {tmp_path / name} ]; do sleep 0.05; done"]

    write_config(
        cli,
        '[spawner]\nmax_running = 2\n[sandbox]\nmode = "off"\n'
        f'[[pipelines.two.stages]]\nname = "first"\ncommand = {json.dumps(gated("first"))}\n'
        '[[pipelines.two.stages]]\nname = "second"\ncommand = ["true"]\n',
    )
    up = start_up(cli)
    try:
        blocker = detach(cli, repo, "--", *gated("blocker"))
        wait_state(cli, blocker, "running")
        run_id = cli("pipeline", "run", "two", "--repo", str(repo), "--detach", check=True).stdout.strip()
        first = wait_until(lambda: run_status(cli, run_id)["steps"], 60, "the first stage")[0]["execution_id"]  # type: ignore[index]
        wait_state(cli, first, "running")  # both slots taken
        # requested after the run began: `urgent` (priority 9) takes the slot the first stage frees;
        # `newer` waits, and the second stage is requested behind it
        urgent = detach(cli, repo, "--priority", "9", "--", *gated("urgent"))
        newer = detach(cli, repo, "--", "true")
        wait_state(cli, urgent, "queued")
        wait_state(cli, newer, "queued")
        (tmp_path / "first").touch()
        wait_state(cli, urgent, "running")
        steps = wait_until(lambda: len(s := run_status(cli, run_id)["steps"]) == 2 and s, 60, "the second stage")
        second = steps[1]["execution_id"]  # type: ignore[index]
        wait_state(cli, second, "queued")
        (tmp_path / "blocker").touch()  # one slot frees: the run's second stage takes it, not `newer`
        assert wait_finished(cli, run_id)["state"] == "passed"
        (tmp_path / "urgent").touch()
        wait_state(cli, newer, "exited")
        claims = json.loads(
            cli(
                "sql",
                "SELECT execution_id FROM events WHERE type = 'execution.claimed' ORDER BY seq",
                "--json",
                check=True,
            ).stdout
        )
        assert [row["execution_id"] for row in claims] == [blocker, first, urgent, second, newer]
    finally:
        stop_up(cli, up)


def test_a_conductor_killed_mid_pipeline_resumes_without_repeating_a_stage(cli: Cli, repo: Path) -> None:
    write_config(cli, build("slow", 1.5) + '[[pipelines.slow.stages]]\nname = "after"\nrun = "echo after"\n')
    up = start_up(cli)
    run_id = cli(
        "pipeline", "run", "slow", "--repo", str(repo), "--var", "task=t", "--detach", check=True
    ).stdout.strip()
    wait_until(lambda: run_status(cli, run_id)["steps"], 60, "the first stage to start")
    os.kill(up.pid, signal.SIGKILL)  # the conductor and the spawner die; NATS (external here) and the agent live
    up.wait()
    up = start_up(cli)
    try:
        report = wait_finished(cli, run_id)
        assert report["state"] == "passed", report
        assert [(s["stage"], s["round"]) for s in report["steps"]] == [("build", 1), ("after", 1)]
        kinds = [e["type"] for e in run_events(cli, run_id)]
        assert kinds.count("stage.started") == 2 and kinds.count("stage.finished") == 2
        assert kinds.count("pipeline.finished") == 1
        builder = report["steps"][0]["execution_id"]
        requested = json.loads(
            cli(
                "sql",
                "SELECT count(*) AS n FROM events WHERE type = 'execution.requested' "
                f"AND data->'labels'->>'pipeline_run' = '{run_id}'",
                "--json",
            ).stdout
        )
        assert requested == [{"n": 2}]
        assert json.loads(cli("status", builder, "--json", check=True).stdout)["exit_code"] == 0
    finally:
        stop_up(cli, up)


async def test_two_conductors_start_every_stage_once(
    cli: Cli, repo: Path, nats_server: EmbeddedServer, credentials: CredentialSet
) -> None:
    """A second conductor in this process moves every run as fast as it can, beside `corral up`'s."""
    stages = "".join(f'[[pipelines.two.stages]]\nname = "s{i}"\nrun = "echo {i}"\n' for i in range(3))
    write_config(cli, stages)
    up = await asyncio.to_thread(start_up, cli)
    bus = await connect_bus(nats_server.url, name="second-conductor", credentials=credentials.get("conductor"))
    rival = Conductor(bus, instance="conductor-rival")
    try:
        await rival.start()
        runs = []
        for _ in range(8):
            done = await asyncio.to_thread(cli, "pipeline", "run", "two", "--repo", str(repo), "--detach")
            assert done.returncode == 0, done.stderr
            runs.append(done.stdout.strip())

        async def race() -> None:
            while True:
                await asyncio.gather(*(rival.advance(r) for r in runs), return_exceptions=True)
                await asyncio.sleep(0.05)

        racing = asyncio.create_task(race())
        try:
            reports = [await asyncio.to_thread(wait_finished, cli, r, 120.0) for r in runs]
        finally:
            racing.cancel()
        assert all(r["state"] == "passed" for r in reports), reports
        rows = json.loads(
            (
                await asyncio.to_thread(
                    cli,
                    "sql",
                    "SELECT execution_id AS run, count(*) FILTER (WHERE type = 'stage.started') AS started, "
                    "count(*) FILTER (WHERE type = 'stage.finished') AS finished, "
                    "count(DISTINCT actor) FILTER (WHERE type LIKE 'stage.%') AS actors "
                    f"FROM events WHERE execution_id IN ({', '.join(repr(r) for r in runs)}) GROUP BY 1",
                    "--json",
                )
            ).stdout
        )
        assert len(rows) == len(runs)
        assert all(r["started"] == 3 and r["finished"] == 3 for r in rows), rows
        assert rival.stages_started + rival.stages_finished > 0  # it did take part
    finally:
        await rival.stop()
        await bus.close()
        await asyncio.to_thread(stop_up, cli, up)


@pytest.fixture(autouse=True)
def _no_config_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)


def test_cancel_a_run_and_forged_stage_events_are_refused(cli: Cli, repo: Path) -> None:
    write_config(
        cli,
        '[[pipelines.long.stages]]\nname = "wait"\nrun = "sleep 60"\n'
        '[[pipelines.long.stages]]\nname = "never"\nrun = "true"\n',
    )
    up = start_up(cli)
    try:
        run_id = cli("pipeline", "run", "long", "--repo", str(repo), "--detach", check=True).stdout.strip()
        wait_until(lambda: run_status(cli, run_id)["steps"], 60, "the first stage to start")
        waiting = run_status(cli, run_id)["steps"][0]["execution_id"]
        # An operator may not record the conductor's events: the server refuses the publish.
        forged = subprocess.run(
            [sys.executable, "-c", _FORGE, run_id],
            env=cli.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "refused" in forged.stdout, forged.stdout + forged.stderr
        assert cli("pipeline", "cancel", run_id, "--reason", "enough").returncode == 0
        report = wait_finished(cli, run_id)
        assert report["state"] == "cancelled" and report["reason"] == "enough"
        assert [s["stage"] for s in report["steps"]] == ["wait"]
        exited = wait_until(
            lambda: (s := json.loads(cli("status", waiting, "--json", check=True).stdout))["state"] == "exited" and s,
            60,
            "the running stage to be cancelled",
        )
        assert exited["exit_reason"] == "cancelled"  # type: ignore[index]
        again = cli("pipeline", "cancel", run_id)
        assert again.returncode != 0 and "is cancelled: nothing to cancel" in again.stderr
    finally:
        stop_up(cli, up)


# Publishes a stage.finished for a run as the operator user (CORRAL_HOME's credentials): refused.
_FORGE = """
import asyncio, sys
from actors.bus import connect_bus
from corral.home import Home
from events.auth import client_credentials
from events.envelope import new_event
from events.types import StageFinished

async def main():
    home = Home.from_env()
    url = __import__("os").environ["CORRAL_NATS_URL"]
    bus = await connect_bus(url, credentials=client_credentials("operator", home.root))
    data = StageFinished(stage="wait", step=1, execution_id="aaaaaaaa", outcome="passed", next="done")
    try:
        await asyncio.wait_for(bus.publisher.publish(new_event(sys.argv[1], data, actor="conductor-forged")), 10)
        print("stored")
    except Exception as exc:
        print("refused", exc)
    await bus.close()

asyncio.run(main())
"""


def test_a_breaker_opens_after_three_failures_holds_runs_and_an_approval_releases_them(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "fixed"
    # A command, not a hook: the sandbox shows an agent the paths of its command line that /tmp hid.
    write_config(cli, '[[pipelines.fragile.stages]]\nname = "check"\ncommand = ["test", "-f", "{{flag}}"]\n')
    up = start_up(cli)
    try:
        for _ in range(3):
            failed = cli("pipeline", "run", "fragile", "--repo", str(repo), "--var", f"flag={flag}", timeout=120)
            assert failed.returncode == 1, failed.stdout + failed.stderr
        rows = wait_until(
            lambda: [
                r
                for r in json.loads(cli("breakers", "--json", check=True).stdout)
                if r["state"] == "open" and r.get("approval_id")
            ],
            60,
            "the breaker to open with an escalation",
        )
        breaker = rows[0]  # type: ignore[index]
        assert breaker["key"] == "stage:fragile/check" and breaker["failures"] == 3
        approval = json.loads(
            cli(
                "sql",
                f"SELECT category, question FROM approvals WHERE approval_id = '{breaker['approval_id']}'",
                "--json",
                check=True,
            ).stdout
        )[0]
        assert approval["category"] == "escalation" and "stage:fragile/check" in approval["question"]
        held = cli(
            "pipeline", "run", "fragile", "--repo", str(repo), "--var", f"flag={flag}", "--detach", check=True
        ).stdout.strip()
        report = wait_until(lambda: (s := run_status(cli, held)).get("held") and s, 60, "the run to be held")
        assert report["state"] in ("requested", "running") and report["steps"] == []  # type: ignore[index]
        assert "circuit breaker stage:fragile/check is open" in cli("pipeline", "status", held, check=True).stdout
        flag.write_text("fixed\n")
        cli("approve", breaker["approval_id"], check=True)
        assert wait_finished(cli, held)["state"] == "passed"  # released: queued, not lost
        after = json.loads(cli("breakers", "--json", check=True).stdout)[0]
        assert after["state"] == "closed" and after["released"] is True and after["failures"] == 0
        # A crash loop (the watchdog gave up retrying) asks a human the same way.
        asyncio.run(_record_crash_loop(cli.env["CORRAL_NATS_URL"], "crashedx"))
        wait_until(
            lambda: (
                json.loads(
                    cli(
                        "sql",
                        "SELECT count(*) AS n FROM approvals WHERE execution_id = 'crashedx' "
                        "AND category = 'escalation' AND question LIKE '%crash loop%'",
                        "--json",
                        check=True,
                    ).stdout
                )
                == [{"n": 1}]
            ),
            60,
            "the crash loop's escalation",
        )
    finally:
        stop_up(cli, up)


async def _record_crash_loop(url: str, execution_id: str) -> None:
    bus = await connect_bus(url)  # as admin: this test's own identity
    try:
        data = ExecutionCrashLoop(failures=3, window_s=600.0)
        await bus.publisher.publish(new_event(execution_id, data, actor="watchdog-test-1"))
    finally:
        await bus.close()


def test_tickets_run_through_their_pipeline_and_record_the_verifier(cli: Cli, repo: Path, tmp_path: Path) -> None:
    write_config(
        cli,
        '[[pipelines.work.stages]]\nname = "do"\ncommand = ["sh", "-c", "echo doing {{title}}: {{goal}}"]\n'
        '[[pipelines.work.stages]]\nname = "verify"\n'
        "run = \"echo checked {{ticket_id}}; test {{goal}} != broken || { echo '1 failed: test_goal'; exit 1; }\"\n"
        '[[pipelines.work.stages]]\nname = "deploy"\nrun = "echo deployed {{ticket_id}}"\n',
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "ok", "goal": "fine"}\n{"title": "", "goal": "x"}\n')
    refused = cli("tickets", "import", str(bad), "--repo", str(repo))
    assert refused.returncode != 0 and f"{bad}:2: title" in refused.stderr and "nothing was added" in refused.stderr
    up = start_up(cli)
    try:
        first = cli(
            "tickets", "add", "--title", "Fix the parser", "--goal", "no crash", "--repo", str(repo), check=True
        ).stdout.strip()
        rows = tmp_path / "tickets.csv"
        rows.write_text(f"title,goal,priority,repo\nsecond,works,5,{repo}\nthird,broken,1,{repo}\n")
        second, third = cli("tickets", "import", str(rows), check=True).stdout.split()

        def tickets() -> dict[str, dict[str, Any]]:
            listed = json.loads(cli("tickets", "--json", check=True).stdout)
            return {t["ticket_id"]: t for t in listed}

        done = wait_until(
            lambda: (
                (t := tickets())
                and all(t.get(i, {}).get("state") in ("passed", "failed") for i in (first, second, third))
                and t
            ),
            90,
            "the tickets to finish",
        )
        assert [done[i]["state"] for i in (first, second, third)] == ["passed", "passed", "failed"]  # type: ignore[index]
        assert done[second]["priority"] == 5  # type: ignore[index]
        assert len(tickets()) == 3  # the refused import added nothing
        failed = json.loads(
            cli("sql", f"SELECT reason, result, run_id FROM tickets WHERE ticket_id = '{third}'", "--json").stdout
        )[0]
        assert "stage verify failed: exit code 1" in failed["reason"]
        assert f"checked {third}" in failed["result"] and "1 failed: test_goal" in failed["result"]
        run = run_status(cli, failed["run_id"])
        assert [s["stage"] for s in run["steps"]] == ["do", "verify"]
        assert "doing third: broken" in run["steps"][0]["result"]
        # each hook stage's result is on the ticket: the verifier's, and the deploy's of a passed one
        hooks = {i: done[i]["hooks"] for i in (first, third)}  # type: ignore[index]
        assert [(h["stage"], h["outcome"], h["exit_code"]) for h in hooks[first]] == [
            ("verify", "passed", 0),
            ("deploy", "passed", 0),
        ]
        assert f"checked {first}" in hooks[first][0]["result"] and f"deployed {first}" in hooks[first][1]["result"]
        assert [(h["stage"], h["exit_code"]) for h in hooks[third]] == [("verify", 1)]
        assert "1 failed: test_goal" in hooks[third][0]["result"]
    finally:
        stop_up(cli, up)


def test_a_schedule_every_second_fires_each_tick_once_across_two_corral_up(
    cli: Cli, repo: Path, tmp_path: Path
) -> None:
    toml = (
        '[templates.tick]\ncommand = ["true"]\n'
        f'[schedules.patrol]\nevery = "1s"\ntemplate = "tick"\nrepo = "{repo}"\n'
        f'[schedules.nightly]\ncron = "0 3 * * *"\ntemplate = "tick"\nrepo = "{repo}"\n'
    )
    write_config(cli, toml)
    other = Cli(
        tmp_path / "other-home",
        {
            **cli.env,
            "CORRAL_HOME": str(tmp_path / "other-home"),
            "CORRAL_NATS_CREDS": str(cli.home / "credentials.json"),
        },
    )
    write_config(other, toml)
    first = start_up(cli)
    second = start_up(other)
    try:
        count = "SELECT count(*) AS n FROM events WHERE type = 'schedule.fired'"
        wait_until(lambda: json.loads(cli("sql", count, "--json", check=True).stdout)[0]["n"] >= 4, 60, "4 ticks")
    finally:
        stop_up(other, second)
        stop_up(cli, first)
    fired = json.loads(
        cli(
            "sql",
            "SELECT data->>'schedule' AS schedule, data->>'tick' AS tick, data->>'target_id' AS target, actor "
            "FROM events WHERE type = 'schedule.fired' ORDER BY seq",
            "--json",
            check=True,
        ).stdout
    )
    ticks = [f["tick"] for f in fired]
    assert len(ticks) == len(set(ticks)) >= 4, fired  # every tick once, whichever conductor took it
    assert {f["schedule"] for f in fired} == {"patrol"}  # the nightly one is not due
    assert ticks == sorted(ticks)
    requested = json.loads(
        cli(
            "sql",
            "SELECT execution_id FROM events WHERE type = 'execution.requested' "
            "AND data->'labels'->>'schedule' = 'patrol'",
            "--json",
            check=True,
        ).stdout
    )
    assert sorted(r["execution_id"] for r in requested) == sorted(f["target"] for f in fired)
    listed = {s["name"]: s for s in json.loads(cli("schedules", "--json", check=True).stdout)}
    assert listed["patrol"]["last_tick"] is not None and listed["nightly"]["last_tick"] is None
    assert listed["nightly"]["next_tick"].endswith("T03:00:00+00:00")


async def test_missed_ticks_follow_catch_up(bus: Any, nats_server: EmbeddedServer, credentials: CredentialSet) -> None:
    """A tick that fell before the conductor started: `none` skips it, `last` fires it once, late."""
    from datetime import UTC, datetime, timedelta

    from actors.conductor import ScheduledJob, schedule_id
    from actors.schedule import Every
    from events.envelope import decode_event
    from events.types import ScheduleFired

    request = {"command": ["true"], "repo": "/nowhere"}
    skip = ScheduledJob("skip", Every(3600.0), "template", request, "none")
    last = ScheduledJob("last", Every(3600.0), "template", request, "last")
    conductor_bus = await connect_bus(nats_server.url, credentials=credentials.get("conductor"))
    try:
        conductor = Conductor(conductor_bus, instance="conductor-ticks", schedules=(skip, last))
        now = datetime.now(UTC)
        assert not await conductor.fire_due(skip, now)  # the hour's tick fell before it started
        assert await conductor.fire_due(last, now)
        assert not await conductor.fire_due(last, now)  # once
        stored = await bus.js.get_last_msg("CORRAL", f"corral.evt.{schedule_id('last')}.schedule.fired")
        fired = decode_event(stored.data).data
        assert isinstance(fired, ScheduleFired) and fired.late and fired.tick == Every(3600.0).previous(now)
        requested = await bus.js.get_last_msg("CORRAL", f"corral.evt.{fired.target_id}.execution.requested")
        assert decode_event(requested.data).data.labels == {"schedule": "last"}  # type: ignore[attr-defined]
        rival = Conductor(conductor_bus, instance="conductor-rival", schedules=(last,))
        assert not await rival.fire_due(last, now + timedelta(seconds=1))  # the same tick, another conductor
        assert await rival.fire_due(last, now + timedelta(hours=1))  # the next one
    finally:
        await conductor_bus.close()


@pytest.mark.parametrize("role", ["operator", "api", "spawner", "notifier", "tap"])
async def test_no_other_role_may_take_or_rewrite_the_conductors_work(
    bus: Any, nats_server: EmbeddedServer, credentials: CredentialSet, role: str
) -> None:
    """Fetch, ack, rewrite, delete the `conductor` durable; record stage, breaker, ticket, schedule events."""
    from tests.test_attacks_bus import attacker

    own = await connect_bus(nats_server.url, credentials=credentials.get("conductor"))
    await Conductor(own, instance="conductor-owner").prepare()  # its durable, as a conductor makes it
    await own.close()
    me = await attacker(nats_server, credentials, role)
    try:
        config = {"name": "conductor", "durable_name": "conductor", "filter_subject": "corral.evt.*.nothing"}
        body = {"stream_name": "CORRAL", "config": {**config, "ack_policy": "explicit"}}
        results = {
            "fetch": await me.attempt("$JS.API.CONSUMER.MSG.NEXT.CORRAL.conductor", {"batch": 1}),
            "rewrite": await me.attempt("$JS.API.CONSUMER.CREATE.CORRAL.conductor", body),
            "delete": await me.attempt("$JS.API.CONSUMER.DELETE.CORRAL.conductor"),
        }
        for kind in ("stage.finished", "breaker.closed", "ticket.finished", "schedule.fired", "pipeline.finished"):
            results[kind] = await me.publish(f"corral.evt.aaaaaaaa.{kind}", b"{}")
        assert results == dict.fromkeys(results, "refused"), results
    finally:
        await me.nc.close()
    durable = (await bus.js.consumer_info("CORRAL", "conductor")).config
    assert "corral.evt.*.stage.finished" not in (durable.filter_subjects or [])  # not a trigger
    assert "corral.evt.*.execution.exited" in (durable.filter_subjects or [])  # unchanged


def test_tickets_over_http(tmp_path: Path, repo: Path) -> None:
    """POST /api/tickets with an operator token runs the ticket; a tap token may list, not add."""
    import httpx

    from tests.conftest import cli_environment

    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(tmp_path / "home", env)
    write_config(cli, '[[pipelines.work.stages]]\nname = "do"\ncommand = ["echo", "{{title}}"]\n')
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        operator = cli("token", "create", "alice", "--role", "operator", check=True).stdout.strip()
        tap = cli("token", "create", "tapper", "--role", "tap", check=True).stdout.strip()
        ticket = {"title": "over http", "goal": "g", "repo": str(repo), "priority": 2}
        with httpx.Client(base_url=str(url), timeout=60) as http:
            refused = http.post("/api/tickets", json=ticket, headers={"Authorization": f"Bearer {tap}"})
            assert refused.status_code == 403, refused.text
            bad = http.post(
                "/api/tickets", json={**ticket, "title": ""}, headers={"Authorization": f"Bearer {operator}"}
            )
            assert bad.status_code == 422 and "\n" not in bad.json()["error"], bad.text
            created = http.post("/api/tickets", json=ticket, headers={"Authorization": f"Bearer {operator}"})
            assert created.status_code == 201, created.text
            ticket_id = created.json()["ticket_id"]

            def finished() -> dict[str, Any] | None:
                listed = http.get("/api/tickets", headers={"Authorization": f"Bearer {tap}"}).json()
                mine = [t for t in listed if t["ticket_id"] == ticket_id and t["state"] == "passed"]
                return mine[0] if mine else None

            done = wait_until(finished, 60, "the ticket to pass")
            assert done["result"] == "over http\n" and done["priority"] == 2  # type: ignore[index]
            assert len(http.get("/api/tickets", headers={"Authorization": f"Bearer {tap}"}).json()) == 1
            # A pipeline run over HTTP: requested, followed, not cancellable once passed.
            as_operator = {"Authorization": f"Bearer {operator}"}
            run = {"repo": str(repo), "vars": {"title": "run over http"}}
            assert (
                http.post("/api/pipelines/work/runs", json=run, headers={"Authorization": f"Bearer {tap}"}).status_code
                == 403
            )
            assert http.post("/api/pipelines/nope/runs", json=run, headers=as_operator).status_code >= 400
            started = http.post("/api/pipelines/work/runs", json=run, headers=as_operator)
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]
            report = wait_until(
                lambda: (
                    (r := http.get(f"/api/pipelines/runs/{run_id}", headers=as_operator).json())["state"] == "passed"
                    and r
                ),
                60,
                "the run to pass",
            )
            assert report["steps"][0]["result"] == "run over http\n"  # type: ignore[index]
            late = http.post(f"/api/pipelines/runs/{run_id}/cancel", headers=as_operator)
            assert late.status_code == 400 and "nothing to cancel" in late.json()["error"], late.text
            assert http.get("/api/pipelines/runs/zzzzzzzz", headers=as_operator).status_code == 404
            assert http.get("/api/pipelines/runs/bad.id", headers=as_operator).status_code == 400
    finally:
        stop_up(cli, up)


AGENT_BY_SLOT = (
    'if [ "$CORRAL_FANOUT_SLOT" = 2 ]; then echo ok > good.txt; '
    "else printf 'a\\nb\\nc\\n' > bad.txt; [ \"$CORRAL_FANOUT_SLOT\" = 3 ] && echo d >> bad.txt; true; fi"
)


def test_fanout_of_three_with_a_judge_picks_the_one_whose_tests_pass(cli: Cli, repo: Path) -> None:
    up = start_up(cli)
    try:
        bad = cli("fanout", "--agents", "command:1", "--repo", str(repo), "--", "true")
        assert bad.returncode != 0 and "a fan-out has 2 to 16" in bad.stderr
        done = cli(
            "fanout", "--agents", "command:3", "--repo", str(repo), "--judge", "test -f good.txt", "--json",
            "--", "sh", "-c", AGENT_BY_SLOT, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        ranking = result["ranking"]
        assert [r["passed"] for r in ranking] == [True, False, False]
        assert [r["lines_changed"] for r in ranking] == [1, 3, 4]  # then the smaller change
        winner = ranking[0]["execution_id"]
        assert json.loads(cli("status", winner, "--json", check=True).stdout)["exit_code"] == 0
        picked = json.loads(cli("pick", winner, "--json", check=True).stdout)
        assert picked["kept"] == winner and sorted(picked["removed"]) == sorted(r["execution_id"] for r in ranking[1:])
        assert Path(ranking[0]["worktree"]).is_dir()
        assert not any(Path(r["worktree"]).exists() for r in ranking[1:])
        outsider = cli("pick", ranking[0]["judge_execution_id"])
        assert outsider.returncode != 0 and "is not part of a fan-out" in outsider.stderr
    finally:
        stop_up(cli, up)


@pytest.mark.slow
def test_real_claude_code_builds_and_real_codex_reviews(
    cli: Cli, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's pipeline with the real CLIs against the loopback model server: builder (Claude Code)
    → reviewer (Codex, its verdict the JSON line of its final answer) → verifier (a hook)."""
    from actors.adapters import find_program
    from tests.helpers import model_server as scripted
    from tests.test_adapters import isolated_env

    for program in ("claude", "codex"):
        if find_program(program) is None:
            pytest.skip(f"{program} is not installed (bash .ci/run installs it under .agents/); not run")
    verdict = '{"verdict": "approved", "comments": "hello.txt is there"}'
    monkeypatch.setattr(scripted, "FINAL_TEXT", f"Reviewed the branch.\n{verdict}")
    with scripted.ModelServer() as server:
        (tmp_path / "claude").mkdir()
        (tmp_path / "codex").mkdir()
        env, _ = isolated_env("claude-code", cli.env, tmp_path / "claude", server)
        codex_env, codex_args = isolated_env("codex", cli.env, tmp_path / "codex", server)
        env.update(CODEX_HOME=codex_env["CODEX_HOME"], SCRIPTED_API_KEY=codex_env["SCRIPTED_API_KEY"])
        run = Cli(cli.home, env)
        write_config(
            run,
            f'[templates.reviewer]\nagent = "codex"\nargs = {json.dumps(codex_args)}\n'
            '[[pipelines.ship.stages]]\nname = "build"\nagent = "claude-code"\ntask = "create hello.txt"\n'
            '[[pipelines.ship.stages]]\nname = "review"\ntemplate = "reviewer"\n'
            'task = "Review branch {{branch}}: {{changed_files}}. End with a JSON verdict line."\n'
            'on_changes_requested = "build"\n'
            '[[pipelines.ship.stages]]\nname = "verify"\nrun = "test -f hello.txt"\n',
        )
        up = start_up(run)
        try:
            done = run("pipeline", "run", "ship", "--repo", str(repo), "--json", timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr
            report = json.loads(done.stdout)
            assert [(s["stage"], s["outcome"]) for s in report["steps"]] == [
                ("build", "passed"),
                ("review", "passed"),
                ("verify", "passed"),
            ]
            review = report["steps"][1]
            assert review["verdict"] == "approved" and review["comments"] == "hello.txt is there"
            agents = json.loads(
                run(
                    "sql",
                    "SELECT s.stage, x.agent FROM stages s JOIN executions x USING (execution_id) ORDER BY s.step",
                    "--json",
                    check=True,
                ).stdout
            )
            assert [a["agent"] for a in agents] == ["claude-code", "codex", "command"]
            assert server.leaks == []
        finally:
            stop_up(run, up)


def test_run_fanout_is_the_same_best_of_n(cli: Cli, repo: Path) -> None:
    """`corral run --fanout command:2 --judge CMD -- ...`: the issue's spelling of `corral fanout`."""
    lonely = cli("run", "--repo", str(repo), "--judge", "true", "--", "true")
    assert lonely.returncode == 2 and lonely.stderr.count("\n") == 1 and "--fanout" in lonely.stderr
    up = start_up(cli)
    try:
        done = cli(
            "run", "--fanout", "command:2", "--repo", str(repo), "--judge", "test -f good.txt",
            "--", "sh", "-c", AGENT_BY_SLOT, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "best: " in done.stdout and "corral pick" in done.stdout
        rows = json.loads(cli("ps", "--all", "--json", check=True).stdout)
        slots = [r for r in rows if r["command"] == ["sh", "-c", AGENT_BY_SLOT]]  # (the judge runs are executions too)
        assert len(slots) == 2
    finally:
        stop_up(cli, up)
