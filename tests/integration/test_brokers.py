"""The core promises on every broker that crosses processes: sqlite, redis and amqp.

Each test runs once per broker with real worker processes (``python -m qctl -A proj worker``);
the servers are started once per session (``tests/conftest.py``). The memory broker, which
lives inside one process, has its own in-process module (``test_memory_worker.py``).
"""
from __future__ import annotations

import time
import uuid

import pytest

from qctl import states
from qctl.exceptions import TaskRevokedError
from qctl.transports import Envelope
from tests.helpers import pid_alive, wait_for

pytestmark = pytest.mark.timeout(120)

GET = 20.0
LEASE = {"PROJ_VISIBILITY_TIMEOUT": "2"}


def test_results_and_failures_come_back(broker_project):
    """Given a worker, when tasks are sent, then values and exceptions come back."""
    worker = broker_project.start_worker("-c", "2")
    app = broker_project.client()
    results = [app.send_task("proj.add", (i, i)) for i in range(20)]
    assert [r.get(timeout=GET) for r in results] == [2 * i for i in range(20)]
    failed = app.send_task("proj.fail", ("kaboom",))
    with pytest.raises(ValueError, match="kaboom"):
        failed.get(timeout=GET)
    assert failed.state == states.FAILURE and "ValueError" in failed.traceback
    assert worker.alive()


def test_countdown_runs_once_at_or_after_its_time(broker_project):
    broker_project.start_worker("-c", "1")
    app = broker_project.client()
    sent = time.time()
    result = app.send_task("proj.stamp", ("later",), countdown=1.5)
    assert result.get(timeout=GET) == "later"
    (run,) = broker_project.runs("stamp", result.id)
    assert run["time"] >= sent + 1.5 - 0.05


def test_expired_task_is_revoked_not_run(broker_project):
    broker_project.start_worker("-c", "1")
    app = broker_project.client()
    result = app.send_task("proj.stamp", ("never",), expires=-1)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=GET)
    assert broker_project.runs("stamp", result.id) == []


def test_retry_reaches_success(broker_project):
    broker_project.start_worker("-c", "2")
    app = broker_project.client()
    result = app.send_task("proj.retry_explicit", (2,), kwargs={"countdown": 0.2})
    assert result.get(timeout=GET) is not None
    assert len(broker_project.runs("retry_explicit", result.id)) == 3


def test_acks_late_task_runs_again_after_its_worker_is_killed(broker_project):
    """Given an acks_late task running, when the whole worker is killed with SIGKILL, then a
    new worker runs the task again and it succeeds (nothing confirmed is lost)."""
    first = broker_project.start_worker("-c", "1", env=LEASE)
    app = broker_project.client()
    gate = f"late-{uuid.uuid4().hex}"
    result = app.send_task("proj.late_gated", (gate, "done"))
    (run,) = wait_for(lambda: broker_project.runs("late_gated", result.id), GET)
    first.kill()
    wait_for(lambda: not pid_alive(run["pid"]), 10)
    broker_project.open_gate(gate)
    broker_project.start_worker("-c", "1", env=LEASE)
    assert result.get(timeout=GET) == "done"
    assert len(broker_project.runs("late_gated", result.id)) == 2


def test_warm_shutdown_finishes_running_and_returns_prefetched(broker_project):
    first = broker_project.start_worker("-c", "1", "--prefetch-multiplier", "4")
    app = broker_project.client()
    gate = f"warm-{uuid.uuid4().hex}"
    running = app.send_task("proj.gated", (gate, "finished"))
    wait_for(lambda: broker_project.runs("gated", running.id), GET)
    waiting = [app.send_task("proj.stamp", (f"w{i}",)) for i in range(3)]
    for result in waiting:
        first.wait_log(rf"Task proj\.stamp\[{result.id}\] received$")
    first.send_signal(15)
    broker_project.open_gate(gate)
    assert first.wait_exit(20) == 0
    assert running.get(timeout=GET) == "finished"
    broker_project.start_worker("-c", "1")
    assert [r.get(timeout=GET) for r in waiting] == ["w0", "w1", "w2"]
    for result in waiting:
        assert len(broker_project.runs("stamp", result.id)) == 1


def test_bad_messages_go_to_the_dead_letter_queue_and_the_worker_carries_on(broker_project):
    worker = broker_project.start_worker("-c", "1")
    app = broker_project.client()
    unknown = app.send_task("proj.nope", (1,))
    garbage = Envelope(body=b"\xff{not json", headers={"task": "proj.add", "id": str(uuid.uuid4())},
                       properties={"correlation_id": "x", "priority": 0})
    app.transport.publish("celery", garbage, routing_key="celery")
    worker.wait_log(r"proj\.nope", 15)
    assert app.send_task("proj.add", (2, 3)).get(timeout=GET) == 5

    def dead():
        letters = app.transport.dead_letters()
        return letters if len(letters) >= 2 else None
    letters = wait_for(dead, 15, message=lambda: repr(app.transport.dead_letters()))
    reasons = " | ".join(letter.reason for letter in letters)
    assert "unregistered task 'proj.nope'" in reasons
    assert "decode" in reasons
    with pytest.raises(Exception, match="proj.nope"):
        unknown.get(timeout=GET)
    assert worker.alive()


BROKEN = {
    "not json": Envelope(body=b"\xff{not json", headers={"task": "proj.add", "id": "bad-json"}),
    "no headers": Envelope(body=b"[[1, 2], {}, {}]", headers={}),
    "unknown protocol": Envelope(body=b'{"hello": "world"}', headers={"lang": "py"}),
    "wrong shape": Envelope(body=b'{"args": 1}', headers={"task": "proj.add", "id": "bad-shape"}),
    "huge body": Envelope(body=b"[" + b"1," * (2 * 1024 * 1024) + b"]",
                          headers={"task": "proj.add", "id": "bad-huge"}),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_messages_from_other_programs_are_dead_lettered(broker_project, case):
    """Given a message another program pushed in a broken form, the worker dead-letters it
    with a reason, keeps running, and the next good task succeeds."""
    worker = broker_project.start_worker("-c", "1")
    app = broker_project.client()
    envelope = BROKEN[case]
    envelope.properties.setdefault("priority", 0)
    app.transport.publish("celery", envelope, routing_key="celery")
    assert app.send_task("proj.add", (2, 2)).get(timeout=GET) == 4
    letters = wait_for(lambda: app.transport.dead_letters() or None, 15)
    assert len(letters) == 1 and letters[0].reason
    assert worker.alive()


def test_garbage_pushed_straight_into_a_redis_list_is_dead_lettered(tmp_path, redis_urls, _clean_qctl_env):
    """Not even kombu's envelope: raw bytes LPUSHed by another program."""
    import redis
    from tests.conftest import Project
    project = Project(tmp_path / "proj", *redis_urls)
    try:
        worker = project.start_worker("-c", "1")
        client = redis.Redis.from_url(redis_urls[0])
        client.lpush("celery", b"\x00\x01 definitely not a kombu envelope")
        client.close()
        app = project.client()
        assert app.send_task("proj.add", (3, 3)).get(timeout=GET) == 6
        letters = wait_for(lambda: app.transport.dead_letters() or None, 15)
        assert len(letters) == 1 and letters[0].raw and letters[0].reason
        assert worker.alive()
    finally:
        project.close()
