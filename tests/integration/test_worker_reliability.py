"""What happens to messages when a worker dies or stops (SPEC §4 signals, §10).

Brokers leases are short here (``visibility_timeout`` 2 s through ``PROJ_VISIBILITY_TIMEOUT``,
which the test app puts in ``broker_transport_options``) so a killed worker's messages come
back quickly.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import uuid

import pytest

from qctl import states
from tests.helpers import pid_alive, wait_for

# Reads the SQLite broker file; the same promises on redis/amqp: tests/integration/test_brokers.py
pytestmark = [pytest.mark.timeout(120), pytest.mark.sqlite_only]

GET = 20
LEASE = {"PROJ_VISIBILITY_TIMEOUT": "2"}


def broker_rows(project) -> list[dict]:
    """The rows of the broker's messages table (task id, queue, lease owner)."""
    conn = sqlite3.connect(str(project.db_path), timeout=30)
    try:
        rows = conn.execute("SELECT id, queue, lease_owner, headers FROM messages").fetchall()
    finally:
        conn.close()
    out = []
    for tag, queue, owner, headers in rows:
        try:
            task_id = json.loads(headers).get("id")
        except (TypeError, ValueError, AttributeError):
            task_id = None
        out.append({"tag": tag, "queue": queue, "lease_owner": owner, "id": task_id})
    return out


def test_acks_late_task_runs_again_after_the_worker_is_killed(tmp_project, start_worker, client_app):
    app = client_app
    first = start_worker("-c", "1", env=LEASE)
    gate = f"late-{uuid.uuid4().hex}"
    result = app.send_task("proj.late_gated", (gate, "done"))
    (run,) = wait_for(lambda: tmp_project.runs("late_gated", result.id), GET)
    # acks_late: while it runs, the message is still in the broker, leased
    assert [r["id"] for r in broker_rows(tmp_project) if r["lease_owner"]] == [result.id]

    first.kill()                                     # kill -9 the main process
    wait_for(lambda: not pid_alive(run["pid"]), 10,
             message="the pool child outlived its killed parent")
    assert result.state == states.PENDING
    tmp_project.open_gate(gate)                      # the re-run will not block

    second = start_worker("-c", "1", env=LEASE)
    assert result.get(timeout=GET) == "done"
    runs = tmp_project.runs("late_gated", result.id)
    assert len(runs) == 2, runs
    assert runs[1]["pid"] != run["pid"]
    assert result.id in second.log()
    # the second run acknowledged it: nothing is left in the broker
    wait_for(lambda: broker_rows(tmp_project) == [], 10,
             message=lambda: repr(broker_rows(tmp_project)))


def test_early_ack_running_task_is_lost_prefetched_ones_are_not(tmp_project, start_worker, client_app):
    """Without acks_late the running task's message is acknowledged when it starts, so a
    crash loses that task (SPEC §10: only the tasks running at the crash are lost); messages
    the worker had prefetched but not started come back and run once."""
    app = client_app
    first = start_worker("-c", "1", "--prefetch-multiplier", "4", env=LEASE)
    gate = f"early-{uuid.uuid4().hex}"
    running = app.send_task("proj.gated", (gate, "never"))
    (run,) = wait_for(lambda: tmp_project.runs("gated", running.id), GET)
    waiting = [app.send_task("proj.stamp", (f"prefetched{i}",)) for i in range(3)]
    for result in waiting:
        first.wait_log(rf"Task proj\.stamp\[{result.id}\] received$")
    # the running task's message is gone from the broker (acknowledged early); the
    # prefetched ones are still there, leased to the worker
    wait_for(lambda: running.id not in [r["id"] for r in broker_rows(tmp_project)], 10,
             message=lambda: repr(broker_rows(tmp_project)))
    leased = {r["id"] for r in broker_rows(tmp_project) if r["lease_owner"]}
    assert leased == {r.id for r in waiting}

    first.kill()
    wait_for(lambda: not pid_alive(run["pid"]), 10)
    tmp_project.open_gate(gate)

    second = start_worker("-c", "1", env=LEASE)
    assert [r.get(timeout=GET) for r in waiting] == [f"prefetched{i}" for i in range(3)]
    for result in waiting:
        assert len(tmp_project.runs("stamp", result.id)) == 1
    assert app.send_task("proj.add", (1, 1)).get(timeout=GET) == 2
    wait_for(lambda: broker_rows(tmp_project) == [], 10,
             message=lambda: repr(broker_rows(tmp_project)))
    # the task that was running is lost: it ran once and has no result
    assert len(tmp_project.runs("gated", running.id)) == 1
    assert running.id not in second.log()
    assert running.state == states.PENDING


def test_warm_shutdown_finishes_running_task_and_returns_prefetched(tmp_project, start_worker, client_app):
    app = client_app
    first = start_worker("-c", "1", "--prefetch-multiplier", "4")
    gate = f"warm-{uuid.uuid4().hex}"
    running = app.send_task("proj.gated", (gate, "finished"))
    wait_for(lambda: tmp_project.runs("gated", running.id), GET)
    waiting = [app.send_task("proj.stamp", (f"w{i}",)) for i in range(3)]
    for result in waiting:
        first.wait_log(rf"Task proj\.stamp\[{result.id}\] received$")

    first.send_signal(signal.SIGTERM)
    first.wait_log(r"Warm shutdown")
    # the prefetched, not started messages are given back (unleased) before the running
    # task ends
    back = {r.id for r in waiting}
    wait_for(lambda: {r["id"] for r in broker_rows(tmp_project) if not r["lease_owner"]} == back,
             10, message=lambda: f"{broker_rows(tmp_project)}\n{first.tail()}")
    # it waits for the running task: still alive, the task not finished
    assert first.alive()
    assert not tmp_project.runs("gated-end", running.id)
    assert running.state == states.PENDING
    tmp_project.open_gate(gate)
    code = first.wait_exit(15)
    assert code == 0, first.tail()
    assert running.get(timeout=1) == "finished"
    # the prefetched messages went back to the queue without running
    for result in waiting:
        assert tmp_project.runs("stamp", result.id) == []
    assert app.transport.queue_size("celery") == 3

    start_worker("-c", "2")
    assert [r.get(timeout=GET) for r in waiting] == ["w0", "w1", "w2"]
    for result in waiting:
        assert len(tmp_project.runs("stamp", result.id)) == 1
    assert len(tmp_project.runs("gated", running.id)) == 1


def test_warm_shutdown_of_an_idle_worker_exits_zero(start_worker, client_app):
    node = start_worker("-c", "2")
    app = client_app
    assert app.send_task("proj.add", (1, 2)).get(timeout=GET) == 3
    assert node.stop() == 0
    assert "Warm shutdown" in node.log()


def test_cold_shutdown_gives_acks_late_message_back_at_once(tmp_project, start_worker, client_app):
    """QUIT: stop now; the unacknowledged message of the running task goes back to the queue
    (released, not left to a lease expiry: the lease here is the default 30 s)."""
    app = client_app
    first = start_worker("-c", "1")
    gate = f"cold-{uuid.uuid4().hex}"
    result = app.send_task("proj.late_gated", (gate, "again"))
    (run,) = wait_for(lambda: tmp_project.runs("late_gated", result.id), GET)
    first.send_signal(signal.SIGQUIT)
    assert first.wait_exit(15) is not None, first.tail()
    wait_for(lambda: not pid_alive(run["pid"]), 10)
    rows = broker_rows(tmp_project)
    assert [(r["id"], r["lease_owner"]) for r in rows] == [(result.id, None)], rows
    tmp_project.open_gate(gate)
    start_worker("-c", "1")
    assert result.get(timeout=GET) == "again"
    assert len(tmp_project.runs("late_gated", result.id)) == 2


def test_countdown_longer_than_the_lease_runs_once(tmp_project, start_worker, client_app):
    """SPEC §10: an ETA task runs once however far its ETA is, whatever the visibility timeout."""
    app = client_app
    start_worker("-c", "2", env={"PROJ_VISIBILITY_TIMEOUT": "1"})
    results = [app.send_task("proj.stamp", (i,), countdown=3) for i in range(3)]
    late = app.send_task("proj.late_gated", ("open", "late"), countdown=3)
    tmp_project.open_gate("open")
    assert [r.get(timeout=GET) for r in results] == [0, 1, 2]
    assert late.get(timeout=GET) == "late"
    assert app.send_task("proj.add", (1, 1)).get(timeout=GET) == 2
    wait_for(lambda: broker_rows(tmp_project) == [], 10)
    for r in results:
        assert len(tmp_project.runs("stamp", r.id)) == 1
    assert len(tmp_project.runs("late_gated", late.id)) == 1
