"""A query survives the projector's DuckDB worker dying under it (DuckDB invalidates its file when a
checkpoint fails under memory pressure; the projector then starts a new worker): `corral sql` is
answered by the new one instead of failing with "the projector's DuckDB worker is gone"."""

import json
import os
import signal
from pathlib import Path

from tests.conftest import Cli, processes_mentioning
from tests.test_control import start_up, stop_up, wait_until

# A query of a few seconds in the DuckDB worker, run twice (killed, then whole: the test raises its
# [sql] timeout). 150M rows took 0.37 s on a fast day: the worker was killed after it had answered.
ROWS = 1_000_000_000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_query_in_flight_is_answered_by_the_replaced_worker(cli: Cli) -> None:
    (cli.home / "corral.toml").write_text('[sql]\ntimeout = "120s"\n')
    up = start_up(cli)
    try:
        workers = wait_until(
            lambda: processes_mentioning(f"projections.worker_process {up.pid} "), 30, "the projector's DuckDB worker"
        )
        (worker,) = workers  # type: ignore[misc]
        idle = cpu_seconds(worker)
        query = cli.popen("sql", f"SELECT sum(i % 7) AS s FROM range({ROWS}) t(i)", "--json")
        # the query runs once the worker spends CPU (idle, it spends none); then the worker dies
        wait_until(lambda: cpu_seconds(worker) - idle > 0.3, 60, "the query to run in the worker")
        os.kill(worker, signal.SIGKILL)
        out, err = query.communicate(timeout=120)
        assert query.returncode == 0, err
        assert json.loads(out) == [{"s": 21 * (ROWS // 7) + sum(range(ROWS % 7))}]
        replaced = processes_mentioning(f"projections.worker_process {up.pid} ")
        assert replaced and worker not in replaced  # a new worker answered
    finally:
        stop_up(cli, up)
