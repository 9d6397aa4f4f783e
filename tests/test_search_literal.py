"""`required_literal`: the prefilter `corral search --regex` puts before RE2 must never drop a match.

Random patterns built from the pieces the reading knows (literals, escapes, classes, groups,
every quantifier) against random texts: whenever the regular expression matches a text, the
literal it names is in that text. Python's `re` stands in for RE2 (same meaning for these pieces).
"""

import asyncio
import random
import re
from pathlib import Path
from typing import Any

from corral.history import required_literal, search

PIECES = [
    "a",
    "b",
    "c",
    "ab",
    "abc",
    r"\.",
    ".",
    r"\w",
    r"\d",
    "[ab]",
    "[^a]",
    "[]a]",
    "(ab)",
    "(a|bc)",
    "(abc)?",
    "a*",
    "b?",
    "c+",
    "a{1,2}",
    "b{2}",
    "c+?",
    "^",
    "$",
    r"\+",
    "x",
    "xyz",
]


def test_every_match_contains_the_literal() -> None:
    rng = random.Random(20)
    checked = 0
    for _ in range(3000):
        pattern = "".join(rng.choices(PIECES, k=rng.randint(2, 7)))
        literal = required_literal(pattern)
        if literal is None:
            continue
        compiled = re.compile(pattern)
        for _ in range(40):
            text = "".join(rng.choices("abcxyz.+1 ", k=rng.randint(0, 14)))
            text = text + pattern.replace("\\", "") if rng.random() < 0.3 else text
            if compiled.search(text):
                assert literal in text, (pattern, literal, text)
                checked += 1
    assert checked > 500  # the property was exercised, not vacuous


def test_known_patterns() -> None:
    assert required_literal(r"Zero\w+Error") == "Error"
    assert required_literal(r"\d+ tests passed") == " tests passed"
    assert required_literal(r"abcd?ef") == "abc"  # "d" is optional: not in the run
    assert required_literal(r"(abcdef)?xyz") == "xyz"  # an optional group gives nothing
    assert required_literal(r"foo\.bar") == "foo.bar"
    for unsure in (r"abc|def", r"(?i)abcdef", r"\x41bcdef", r"[[:alpha:]]bcdef", r"\pLabcd", "ab"):
        assert required_literal(unsure) is None


def test_regex_search_finds_what_a_full_scan_finds(tmp_path: Path) -> None:
    """The regex path (literal prefilter, seq bound, candidates from the `search` table) against
    the plain full scans of `output` and of every other event's payload, on a projected file."""
    from events.envelope import new_event
    from events.ids import new_execution_id
    from events.types import ApprovalRequested, EventData, ExecutionExited, ExecutionRequested, Output
    from projections.appliers import BatchApplier
    from projections.database import open_database
    from projections.query import run_query

    rng = random.Random(7)
    log: list[tuple[int, str, bytes]] = []
    for _ in range(12):
        eid = new_execution_id()
        task = rng.choice(["Fix Error in parser", "error budget", "tests passed", "Zero Error"])
        datas: list[EventData] = [ExecutionRequested(command=("agent",), repo="/r", task=task)]
        datas += [
            Output(stream="stdout", n=n, text=rng.choice(["ZeroDivisionError\n", "ok Error x\n", "step tests\n"]))
            for n in range(1, rng.randint(2, 30))
        ]
        # an approval among the output: its question can be newer than some output hits
        question = rng.choice(["ZeroDivisionError again?", "ok Error x: go on?", "tests passed?"])
        datas.insert(rng.randrange(1, len(datas) + 1), ApprovalRequested(approval_id=f"a{len(log)}", question=question))
        datas.append(ExecutionExited(exit_code=rng.choice([0, 1]), duration_s=1.0))
        if len(log) > 100:  # and one approval certainly between two output hits
            datas[1:1] = [Output(stream="stdout", n=0, text="ZeroDivisionError\n")] * 2
            datas.insert(2, ApprovalRequested(approval_id="between", question="ZeroDivisionError?"))
        for data in datas:
            actor = "approver-h-1" if isinstance(data, ApprovalRequested) else "test"  # screened otherwise
            event = new_event(eid, data, actor=actor)
            log.append((len(log) + 1, event.subject, event.to_bytes()))
    con = open_database(tmp_path / "c.duckdb")
    applier = BatchApplier(con, tmp_dir=tmp_path / "t")
    applier.apply(log)
    applier.close()

    async def fetch(sql: str) -> list[dict[str, Any]]:
        result = run_query(con, sql)
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def reference(pattern: str, event_type: str | None, limit: int) -> list[int]:
        quoted = "'" + pattern.replace("'", "''") + "'"
        kind = f"AND type = '{event_type}'" if event_type else ""
        sql = (
            f"SELECT seq FROM (SELECT seq, 'output' AS type, text FROM output UNION ALL "
            f"SELECT seq, type, CAST(data AS VARCHAR) FROM events WHERE type <> 'output') "
            f"WHERE regexp_matches(text, {quoted}) {kind} ORDER BY seq DESC LIMIT {limit}"
        )
        return [int(r[0]) for r in con.execute(sql).fetchall()]

    checked = 0
    for pattern in (r"Zero\w+Error", r"Error in \w+", r"error budget", r"tests passed", r"exit_code.:1", r"Fix Err"):
        for event_type in (None, "execution.requested", "approval.requested", "output"):
            for limit in (1, 3, 10, 1000):
                hits = asyncio.run(
                    search(
                        fetch, pattern, regex=True, execution_id=None, event_type=event_type, since=None, limit=limit
                    )
                )
                assert [int(h["seq"]) for h in hits] == reference(pattern, event_type, limit), (pattern, limit)
                checked += bool(hits)
    con.close()
    assert checked > 40
