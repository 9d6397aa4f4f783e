"""Log retention (docs/retention.md): output events in a bounded stream, the core log append-only.

Everything runs against a real nats-server with Corral's users (tests/conftest.py), the real
`corral` CLI and examples/agent.py. Streams are inspected through JetStream's stream info.
"""

import asyncio
import json
import sys
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.js.errors import APIError

from actors.bus import Bus
from corral.server import EmbeddedServer
from events.stream import OutputRetention, core_subjects, ensure_output_retention
from events.subjects import (
    ALL_EVENTS,
    OUTPUT_EVENTS,
    OUTPUT_STREAM,
    RETIRED_OUTPUT,
    STREAM,
    ack_stream,
    events_of_type,
    subjects_overlap,
)
from events.types import ExecutionExited, ExecutionStarted, Heartbeat, Output
from replay.history import follow
from tests.conftest import AGENT, Cli
from tests.test_control import start_up, stop_up

pytestmark = pytest.mark.slow

RETENTION_50 = "[retention]\noutput_max_msgs = 50\n"


def configure(cli: Cli, toml: str) -> None:
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text(toml)


def agent(*args: str) -> list[str]:
    return ["--", sys.executable, str(AGENT), *args]


def expected_stdout(steps: int, lines: int = 1, task: str = "say hello") -> str:
    """What examples/agent.py prints on stdout for these options."""
    out = [f"agent: task {task!r} ({steps} steps)"]
    for step in range(1, steps + 1):
        target = Path("agent-output") / f"step-{step}.txt"
        out += [f"step {step}/{steps}: wrote {target} [{line}]" for line in range(lines)]
    out.append(f"agent: done, {steps} files written")
    return "\n".join(out) + "\n"


def executions(cli: Cli) -> list[str]:
    """Every execution id, newest first."""
    return [row["execution_id"] for row in json.loads(cli("ps", "--all", "--json", check=True).stdout)]


async def stream_counts(bus: Bus, stream: str, subject: str | None = None) -> dict[str, int]:
    info = await bus.js.stream_info(stream, subjects_filter=subject or ">")
    return dict(info.state.subjects or {})


async def messages(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


# --- pure parts ----------------------------------------------------------------------------------


def test_subjects_overlap() -> None:
    assert subjects_overlap("corral.evt.abc.>", OUTPUT_EVENTS)
    assert subjects_overlap(ALL_EVENTS, OUTPUT_EVENTS)
    assert subjects_overlap("corral.evt.*.output", OUTPUT_EVENTS)
    assert subjects_overlap("corral.evt.abc.output", OUTPUT_EVENTS)
    assert not subjects_overlap("corral.evt.*.execution.>", OUTPUT_EVENTS)
    assert not subjects_overlap("corral.evt.abc.execution.exited", OUTPUT_EVENTS)
    assert not subjects_overlap("corral.evt.*.approval.>", OUTPUT_EVENTS)
    assert not subjects_overlap("corral.evt.abc", OUTPUT_EVENTS)


def test_core_subjects_cover_every_type_but_output() -> None:
    from events.types import EVENT_TYPES

    subjects = core_subjects()
    assert events_of_type("output") not in subjects
    assert len(subjects) == len(EVENT_TYPES) - 1
    assert not any(subjects_overlap(s, OUTPUT_EVENTS) for s in subjects)  # the two streams never overlap


def test_bad_retention_value_is_one_line_and_exit_2(cli: Cli, tmp_path: Path) -> None:
    for toml, key in (
        ('[retention]\noutput_max_age = "soon"\n', "retention.output_max_age"),
        ('[retention]\noutput_max_bytes = "10K"\n', "retention.output_max_bytes"),
        ("[retention]\noutput_max_msgs = 0\n", "retention.output_max_msgs"),
        ("[retention]\noutput_max_mesgs = 5\n", "retention.output_max_mesgs"),
    ):
        configure(cli, toml)
        result = cli("ps")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and key in result.stderr, result.stderr
    assert not (cli.home / "runtime.json").exists()


async def test_bad_retention_value_changes_no_stream(cli: Cli, bus: Bus) -> None:
    configure(cli, '[retention]\noutput_max_age = "soon"\n')
    result = await asyncio.to_thread(cli, "ps")
    assert result.returncode == 2
    assert (await bus.js.stream_info(STREAM)).config.subjects == [ALL_EVENTS]
    with pytest.raises(Exception, match="not found"):
        await bus.js.stream_info(OUTPUT_STREAM)


# --- the streams ---------------------------------------------------------------------------------


def _output(execution_id: str, n: int) -> Output:
    return Output(stream="stdout", n=n, text=f"{execution_id} line {n}\n")


async def test_streams_on_bounded_off_and_api_deletes_refused(bus: Bus) -> None:
    js = bus.js
    # retention off: everything in CORRAL
    await bus.emit("old00001", ExecutionStarted(pid=1, pgid=1, host="h", command=("x",), cwd="/"), actor="t")
    for n in range(5):
        ack = await bus.emit("old00001", _output("old00001", n), actor="t")
        assert ack.stream == STREAM

    assert await ensure_output_retention(js, OutputRetention(max_msgs=50))
    core = (await js.stream_info(STREAM)).config
    assert sorted(core.subjects or []) == core_subjects()
    assert core.deny_delete and core.deny_purge
    out = (await js.stream_info(OUTPUT_STREAM)).config
    assert out.subjects == [OUTPUT_EVENTS] and out.max_msgs == 50 and out.deny_delete and out.deny_purge
    assert out.num_replicas == core.num_replicas and out.duplicate_window == core.duplicate_window

    core_before = await messages(bus, STREAM)
    for n in range(120):  # the publisher takes acks from either stream
        ack = await bus.emit("new00001", _output("new00001", n), actor="t")
        assert ack.stream == OUTPUT_STREAM
    for _ in range(3):
        ack = await bus.emit("new00001", Heartbeat(), actor="t")
        assert ack.stream == STREAM
    ack = await bus.emit("new00001", ExecutionExited(exit_code=0, duration_s=1.0), actor="t")
    assert ack.stream == STREAM
    assert await messages(bus, OUTPUT_STREAM) == 50  # bounded: the oldest went
    assert await messages(bus, STREAM) == core_before + 4  # every lifecycle event, no output
    assert (await stream_counts(bus, STREAM, "corral.evt.old00001.output")) == {"corral.evt.old00001.output": 5}

    # the API may not delete or purge either stream, whoever asks (here: admin)
    for stream in (OUTPUT_STREAM, STREAM):
        with pytest.raises(APIError) as refused:
            await js.purge_stream(stream)
        assert refused.value.err_code == 10110  # stream purge not permitted
        with pytest.raises(APIError) as refused:
            await js.delete_msg(stream, int((await js.stream_info(stream)).state.last_seq))
        assert refused.value.err_code == 10057  # message delete not permitted

    # changing a limit changes the stream, and nothing else; the same limits change nothing
    assert await ensure_output_retention(js, OutputRetention(max_msgs=20, max_age_s=3600.0))
    out = (await js.stream_info(OUTPUT_STREAM)).config
    assert out.max_msgs == 20 and out.max_age == 3600.0 and out.subjects == [OUTPUT_EVENTS]
    assert await messages(bus, OUTPUT_STREAM) == 20
    assert await ensure_output_retention(js, OutputRetention(max_msgs=20, max_age_s=3600.0))

    # off again: CORRAL takes every subject back; CORRAL_OUTPUT keeps what it holds and gets nothing new
    assert not await ensure_output_retention(js, OutputRetention())
    assert (await js.stream_info(STREAM)).config.subjects == [ALL_EVENTS]
    assert (await js.stream_info(OUTPUT_STREAM)).config.subjects == [RETIRED_OUTPUT]
    ack = await bus.emit("new00002", _output("new00002", 0), actor="t")
    assert ack.stream == STREAM
    assert await messages(bus, OUTPUT_STREAM) == 20

    # and every reader still sees all of it: old output in CORRAL, the retained tail in CORRAL_OUTPUT
    seen: list[tuple[str, str]] = []

    async def collect(seq: int, msg: Msg) -> bool:
        seen.append((ack_stream(msg.reply), json.loads(msg.data)["data"].get("text", msg.subject)))
        return False

    await follow(js, "corral.evt.*.output", collect, stop_when_caught_up=True)
    texts = [text for _, text in seen]
    assert texts == [
        *(f"old00001 line {n}\n" for n in range(5)),
        *(f"new00001 line {n}\n" for n in range(100, 120)),
        "new00002 line 0\n",
    ]
    assert {stream for stream, _ in seen} == {STREAM, OUTPUT_STREAM}


async def test_follow_merges_both_streams_by_time_and_drains_output_at_the_stop(bus: Bus) -> None:
    js = bus.js
    await ensure_output_retention(js, OutputRetention(max_msgs=1000))
    started = ExecutionStarted(pid=1, pgid=1, host="h", command=("x",), cwd="/")
    await bus.emit("mix00001", started, actor="t")
    for n in range(3):
        await bus.emit("mix00001", _output("mix00001", n), actor="t")
        await bus.emit("mix00001", Heartbeat(note=str(n)), actor="t")
    await bus.emit("mix00001", ExecutionExited(exit_code=0, duration_s=1.0), actor="t")
    for n in range(3, 6):  # stored after the exit, before any reader handles it
        await bus.emit("mix00001", _output("mix00001", n), actor="t")

    kinds: list[str] = []

    async def until_exit(seq: int, msg: Msg) -> bool:
        kind = msg.subject.split(".", 3)[3]
        data = json.loads(msg.data)["data"]
        kinds.append(f"output {data['n']}" if kind == "output" else kind)
        return kind == "execution.exited"

    await asyncio.wait_for(follow(js, "corral.evt.mix00001.>", until_exit), 30)
    assert kinds == [
        "execution.started",
        *(item for n in range(3) for item in (f"output {n}", "heartbeat")),
        "execution.exited",
        *(f"output {n}" for n in range(3, 6)),  # drained: stored before the follow stopped
    ]

    # a follow that starts at a CORRAL sequence reads output from the time that event was stored
    last = int((await js.stream_info(STREAM)).state.last_seq)
    tail: list[str] = []

    async def collect(seq: int, msg: Msg) -> bool:
        tail.append(msg.subject.split(".", 3)[3])
        return False

    await follow(js, "corral.evt.mix00001.>", collect, start_seq=last, stop_when_caught_up=True)
    assert tail == ["execution.exited", "output", "output", "output"]


async def test_follow_reads_ahead_a_bounded_amount_and_loses_nothing(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    import replay.history

    monkeypatch.setattr(replay.history, "MAX_BUFFERED", 4)  # each consumer waits for the handler early
    await ensure_output_retention(bus.js, OutputRetention(max_msgs=1000))
    for n in range(60):
        await bus.emit("slow0001", _output("slow0001", n), actor="t")
        if n % 3 == 0:
            await bus.emit("slow0001", Heartbeat(note=str(n)), actor="t")
    seen: list[str] = []

    async def slow(seq: int, msg: Msg) -> bool:
        data = json.loads(msg.data)["data"]
        seen.append(f"o{data['n']}" if "text" in data else f"h{data['note']}")
        await asyncio.sleep(0.002)
        return False

    await asyncio.wait_for(follow(bus.js, "corral.evt.slow0001.>", slow, stop_when_caught_up=True), 60)
    assert seen == [item for n in range(60) for item in ((f"o{n}", f"h{n}") if n % 3 == 0 else (f"o{n}",))]


# --- the CLI against a real system ----------------------------------------------------------------


async def test_run_prints_everything_and_the_output_stream_stays_bounded(cli: Cli, repo: Path, bus: Bus) -> None:
    configure(cli, RETENTION_50)
    # 70 steps with 60 ms between them: about 70 output chunks (output is coalesced per 50 ms)
    big = await asyncio.to_thread(cli, "run", "--repo", str(repo), "-q", *agent("--steps", "70", "--sleep", "0.06"))
    assert big.returncode == 0, big.stderr
    assert big.stdout == expected_stdout(70)  # printed live, all of it, whatever the stream keeps
    small = await asyncio.to_thread(
        cli, "run", "--repo", str(repo), "-q", *agent("--steps", "3", "--lines", "4", "--exit", "3")
    )
    assert small.returncode == 3, small.stderr  # the agent's exit code
    assert small.stdout == expected_stdout(3, 4)
    assert "agent: exiting with 3" in small.stderr

    small_id, big_id = executions(cli)
    assert await messages(bus, OUTPUT_STREAM) <= 50
    core = await stream_counts(bus, STREAM)
    for execution_id in (big_id, small_id):
        for kind in ("execution.requested", "execution.claimed", "workspace.created", "execution.started"):
            assert core.get(f"corral.evt.{execution_id}.{kind}") == 1, (execution_id, kind, core)
        assert core.get(f"corral.evt.{execution_id}.execution.exited") == 1
        assert f"corral.evt.{execution_id}.output" not in core  # output is not in the core log

    # the fresh, small run is whole in the log; the big one only as its newest chunks
    logs = await asyncio.to_thread(cli, "logs", small_id, check=True)
    assert logs.stdout == expected_stdout(3, 4)
    old = await asyncio.to_thread(cli, "logs", big_id, check=True)
    assert old.stdout and expected_stdout(70).endswith(old.stdout) and old.stdout != expected_stdout(70)


def test_logs_follow_and_tap_with_up_running(cli: Cli, repo: Path, nats_server: EmbeddedServer) -> None:
    """`corral up` with retention; `logs -f` and `tap` as the `tap` user read both streams."""
    configure(cli, RETENTION_50)
    up = start_up(cli)
    try:
        execution_id = cli(
            "run", "--repo", str(repo), "--detach", *agent("--steps", "25", "--lines", "2", "--sleep", "0.04"),
            check=True,
        ).stdout.strip()  # fmt: skip
        follower = cli.popen("logs", "-f", execution_id)  # attached while it runs
        out, err = follower.communicate(timeout=120)
        assert follower.returncode == 0, err
        assert out == expected_stdout(25, 2)  # ends after the exit, nothing missing, nothing twice
        again = cli("logs", "-f", execution_id, check=True)  # attached after the end
        assert again.stdout == expected_stdout(25, 2)

        events = [json.loads(line) for line in _tap_all(cli, execution_id)]
        kinds = [e["type"] for e in events]
        assert kinds[0] == "execution.requested" and "execution.exited" in kinds
        outputs = [e for e in events if e["type"] == "output"]
        assert "".join(e["data"]["text"] for e in outputs if e["data"]["stream"] == "stdout") == expected_stdout(25, 2)
        assert all(e["stream"] == OUTPUT_STREAM for e in outputs)
        assert not any("stream" in e for e in events if e["type"] != "output")
        assert [e["data"]["n"] for e in outputs] == sorted(e["data"]["n"] for e in outputs)
        # merged by the time each was stored: the exit (sent once its output was stored) after all output
        assert kinds.index("execution.exited") > max(i for i, kind in enumerate(kinds) if kind == "output")
    finally:
        stop_up(cli, up)
    log = (nats_server.log_file or Path()).read_text()
    assert "Violation" not in log, log[-2000:]


def _tap_all(cli: Cli, execution_id: str) -> list[str]:
    """Every event of one execution from `corral tap --since all`, read until they stop coming."""
    tap = cli.popen("tap", execution_id, "--since", "all")
    lines: list[str] = []
    try:
        assert tap.stdout is not None
        for line in tap.stdout:
            lines.append(line)
            if '"execution.exited"' in line:
                break
    finally:
        tap.terminate()
        tap.wait(timeout=30)
    return lines


async def test_watchdog_counts_output_in_the_output_stream_as_activity(cli: Cli, repo: Path, bus: Bus) -> None:
    configure(cli, RETENTION_50)
    busy = await asyncio.to_thread(
        cli, "run", "--repo", str(repo), "-q", "--idle-timeout", "2s", *agent("--steps", "12", "--sleep", "0.3")
    )
    assert busy.returncode == 0, busy.stderr
    silent = await asyncio.to_thread(
        cli, "run", "--repo", str(repo), "-q", "--idle-timeout", "2s", *agent("--steps", "1", "--sleep", "4")
    )
    assert silent.returncode == 0, silent.stderr
    stalled = await stream_counts(bus, STREAM, events_of_type("execution.stalled"))
    ids = executions(cli)
    silent_id, busy_id = ids[0], ids[1]  # newest first
    assert f"corral.evt.{silent_id}.execution.stalled" in stalled  # the watchdog watches (the control)
    assert f"corral.evt.{busy_id}.execution.stalled" not in stalled, stalled  # output only, never idle


async def test_switching_retention_on_and_off_keeps_old_output_readable(cli: Cli, repo: Path, bus: Bus) -> None:
    before = await asyncio.to_thread(cli, "run", "--repo", str(repo), "-q", *agent("x", "--steps", "4"))
    assert before.returncode == 0, before.stderr
    configure(cli, RETENTION_50)
    during = await asyncio.to_thread(cli, "run", "--repo", str(repo), "-q", *agent("--steps", "5"))
    assert during.returncode == 0, during.stderr
    configure(cli, "")
    after = await asyncio.to_thread(cli, "run", "--repo", str(repo), "-q", *agent("--steps", "6"))
    assert after.returncode == 0, after.stderr
    after_id, during_id, before_id = executions(cli)

    assert (await bus.js.stream_info(STREAM)).config.subjects == [ALL_EVENTS]
    assert (await bus.js.stream_info(OUTPUT_STREAM)).config.subjects == [RETIRED_OUTPUT]
    assert f"corral.evt.{before_id}.output" in await stream_counts(bus, STREAM)
    assert f"corral.evt.{during_id}.output" in await stream_counts(bus, OUTPUT_STREAM)
    assert f"corral.evt.{after_id}.output" in await stream_counts(bus, STREAM)
    for execution_id, text in ((before_id, before.stdout), (during_id, during.stdout), (after_id, after.stdout)):
        logs = await asyncio.to_thread(cli, "logs", execution_id, check=True)
        assert logs.stdout == text and text, execution_id


# --- the DuckDB side: the lead's projector consumes CORRAL_OUTPUT (expected to fail until it lands) ---


def test_retention_projection_output_rows_match_printed_chunks(cli: Cli, repo: Path) -> None:
    configure(cli, RETENTION_50)
    run = cli("run", "--repo", str(repo), "-q", *agent("--steps", "8", "--lines", "2", "--sleep", "0.06"))
    assert run.returncode == 0, run.stderr
    (execution_id,) = executions(cli)
    rows = json.loads(
        cli(
            "sql",
            f"SELECT stream, text FROM output WHERE execution_id = '{execution_id}' ORDER BY n",
            "--json",
            check=True,
        ).stdout
    )
    assert "".join(r["text"] for r in rows if r["stream"] == "stdout") == run.stdout
    events = json.loads(
        cli("sql", f"SELECT count(*) AS n FROM events WHERE execution_id = '{execution_id}' AND type = 'output'",
            "--json", check=True).stdout
    )  # fmt: skip
    assert events == [{"n": 0}]  # the events table mirrors the core log, which holds no output now
    hits = json.loads(cli("search", "wrote agent-output/step-8.txt", "--json", check=True).stdout)
    assert hits, "search works from DuckDB"


def test_retention_projection_keeps_rows_after_nats_expired_them(cli: Cli, repo: Path) -> None:
    configure(cli, "[retention]\noutput_max_msgs = 5\n")
    run = cli("run", "--repo", str(repo), "-q", *agent("--steps", "20", "--sleep", "0.06"))
    assert run.returncode == 0, run.stderr
    (execution_id,) = executions(cli)
    rows = json.loads(
        cli("sql", f"SELECT text FROM output WHERE execution_id = '{execution_id}' AND stream = 'stdout' ORDER BY n",
            "--json", check=True).stdout
    )  # fmt: skip
    assert "".join(r["text"] for r in rows) == run.stdout  # DuckDB keeps what NATS no longer has
    logs = cli("logs", execution_id, check=True).stdout
    assert logs != run.stdout and run.stdout.endswith(logs)


def test_retention_projection_counters_and_rebuild_match(cli: Cli, repo: Path) -> None:
    """Output from CORRAL_OUTPUT moves the executions' counters (even when a chunk is projected
    before its execution's request), and a rebuild reads both streams into identical tables."""
    from tests.test_projections import _tables

    configure(cli, "[retention]\noutput_max_age = \"30d\"\n")
    first = cli("run", "--repo", str(repo), "-q", *agent("--steps", "3", "--lines", "40"))
    assert first.returncode == 0, first.stderr
    second = cli("run", "--repo", str(repo), "-q", *agent("--steps", "4", "--heartbeat"))
    assert second.returncode == 0, second.stderr
    before = _tables(cli)
    assert not [e for e in before["events"] if e["type"] == "output"]
    output = before["output"]
    assert output and all(row["seq"] > 1 << 40 for row in output)  # CORRAL_OUTPUT's sequences, offset
    for execution in before["executions"]:
        mine = [row for row in output if row["execution_id"] == execution["execution_id"]]
        assert execution["output_chunks"] == len(mine) > 0
        assert execution["output_bytes"] == sum(len(row["text"].encode()) for row in mine)
    assert [row for row in before["search"] if row["type"] == "output"]
    result = cli("projections", "rebuild", check=True)
    assert f"rebuilt {len(before['events']) + len(output)} events" in result.stderr
    assert _tables(cli) == before
