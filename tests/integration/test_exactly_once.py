"""Many worker processes on one SQLite broker: every task runs exactly once (SPEC §3, §10).

Executions are recorded by the task itself, one line per run in a file per process (not in
the broker file), and counted here.
"""
from __future__ import annotations

import sqlite3
import time
from collections import Counter

import pytest

from qctl import states
from tests.helpers import wait_for

# Reads the SQLite broker file; the same promises on redis/amqp: tests/integration/test_brokers.py
pytestmark = [pytest.mark.timeout(150), pytest.mark.sqlite_only]

TASKS = 5000
WORKERS = 4


def count_results(project) -> dict[str, int]:
    conn = sqlite3.connect(str(project.db_path), timeout=30)
    try:
        return dict(conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())
    except sqlite3.OperationalError:      # no results table yet
        return {}
    finally:
        conn.close()


def count_messages(project) -> int:
    conn = sqlite3.connect(str(project.db_path), timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def test_four_workers_run_each_of_5000_tasks_exactly_once(tmp_project, start_worker, client_app):
    app = client_app
    app.transport.ping()                 # create the schema before the workers race for it
    workers = [start_worker("-c", "2", "-P", "prefork", "-n", f"w{i}@%h",
                                        wait_ready=False) for i in range(WORKERS)]
    for worker in workers:
        worker.wait_ready()

    started = time.monotonic()
    results = [app.send_task("proj.record_run", (n,)) for n in range(TASKS)]
    published = time.monotonic() - started

    def done() -> bool:
        counts = count_results(tmp_project)
        return sum(counts.values()) >= TASKS and counts
    counts = wait_for(done, 90, interval=0.25,
                      message=lambda: f"results so far: {count_results(tmp_project)}\n"
                                      + "\n".join(w.tail(5) for w in workers))
    elapsed = time.monotonic() - started
    assert counts == {states.SUCCESS: TASKS}, counts

    for n, result in enumerate(results):
        meta = app.backend.get_task_meta(result.id)
        assert meta["status"] == states.SUCCESS and meta["result"] == n, meta

    runs = Counter(run["id"] for run in tmp_project.runs("run"))
    expected = {r.id for r in results}
    assert set(runs) == expected, (f"{len(expected - set(runs))} never ran, "
                                   f"{len(set(runs) - expected)} unknown ids ran")
    twice = {task_id: n for task_id, n in runs.items() if n != 1}
    assert not twice, f"{len(twice)} tasks ran more than once, e.g. {list(twice.items())[:5]}"

    # every worker took part, and the broker is left empty (all acknowledged)
    per_worker = [w.log().count("succeeded in") for w in workers]
    assert all(per_worker), per_worker
    wait_for(lambda: count_messages(tmp_project) == 0, 10,
             message=lambda: f"{count_messages(tmp_project)} messages left")
    assert app.transport.dead_letters() == []
    for worker in workers:
        assert worker.alive()
        assert not worker.log_lines(r": (ERROR|CRITICAL)/"), worker.tail()
    print(f"\npublished {TASKS} in {published:.1f}s, all done in {elapsed:.1f}s, "
          f"per worker: {per_worker}")
