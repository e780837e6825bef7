"""qctl <-> Celery 5.7 on RabbitMQ (``amqp://``, the session's private node).

Results travel through ``rpc://`` (each client's reply queue, Celery's ``thread_oid``) or
through a Redis result backend shared by both sides; every test that moves results runs with
both. Before each test every queue and exchange the apps declare is deleted, so each side
meets exactly the declarations the test made.
"""
from __future__ import annotations

import time

import pytest

from qctl import states

from .conftest import amqp_queue_declared

pytestmark = pytest.mark.timeout(240)

GET = 30.0
QCTL_ONE = ("-c", "1", "--prefetch-multiplier", "1")
ALL_QUEUES = "celery,other,third"


@pytest.mark.parametrize("backend", ["rpc", "redis"])
def test_celery_client_task_runs_on_qctl_worker(amqp_project, backend):
    """Celery's ``add.delay(2, 2)`` runs on a qctl worker; the Celery client reads 4 (and a
    failure with its type and message) through ``backend``."""
    project = amqp_project(backend)
    project.start_worker(*QCTL_ONE)
    out = project.celery_client("""
        first = outcome(capp.add.delay(2, 2), timeout=20)
        if first["state"] != "SUCCESS":
            emit({"first": first})
            raise SystemExit(0)
        many = outcomes([capp.mul.delay(i, 3) for i in range(5)], timeout=20)
        failed = outcome(capp.fail.delay("kaboom"), timeout=20)
        emit({"first": first, "many": many, "failed": failed})
    """)
    assert (out["first"]["state"], out["first"].get("value")) == ("SUCCESS", 4), \
        f"{out}{project._worker_tails()}"
    assert [o.get("value") for o in out["many"]] == [0, 3, 6, 9, 12], out
    failed = out["failed"]
    assert failed["state"] == "FAILURE", failed
    assert (failed["exc_type"], failed["exc_module"], failed["message"]) == \
        ("ValueError", "builtins", "kaboom"), failed
    assert project.log_problems() == []


@pytest.mark.parametrize("backend", ["rpc", "redis"])
def test_qctl_client_task_runs_on_celery_worker(amqp_project, backend):
    """A qctl client's task runs on a Celery worker; qctl reads the result through
    ``backend``."""
    project = amqp_project(backend)
    project.start_celery_worker()
    app = project.client()
    result = app.send_task("proj.add", (2, 2))
    assert result.get(timeout=GET) == 4
    results = [app.send_task("proj.mul", (i, 3)) for i in range(5)]
    assert [r.get(timeout=GET) for r in results] == [0, 3, 6, 9, 12]
    failed = app.send_task("proj.fail", ("kaboom",))
    with pytest.raises(ValueError, match="^kaboom$"):
        failed.get(timeout=GET)
    assert failed.state == states.FAILURE
    assert project.log_problems() == []


def test_celery_worker_starts_on_queues_qctl_declared(amqp_project):
    """qctl (worker and client) declares first; a Celery worker then declares the same
    queues, exchanges, pidbox and event exchanges without PRECONDITION_FAILED and works."""
    project = amqp_project("redis")
    qctl_worker = project.start_worker(*QCTL_ONE)
    app = project.client()
    assert app.send_task("proj.add", (1, 2)).get(timeout=GET) == 3
    assert app.send_task("proj.other_add", (1, 2)).get(timeout=GET) == 3
    assert amqp_queue_declared(project.broker_url, "celery")
    assert amqp_queue_declared(project.broker_url, "other")
    celery_worker = project.start_celery_worker("-Q", ALL_QUEUES)
    assert project.log_problems() == []
    qctl_worker.stop()                      # from now on only the Celery worker consumes
    out = project.celery_client("""
        emit(outcome(capp.add.delay(2, 3)))
    """)
    assert (out["state"], out.get("value")) == ("SUCCESS", 5), out
    assert app.send_task("proj.mul", (6, 7)).get(timeout=GET) == 42
    assert celery_worker.alive(), celery_worker.tail()
    assert len(celery_worker.log_lines(r"Task proj\.(add|mul)\[.*\] succeeded")) == 2
    assert project.log_problems() == []


def test_qctl_worker_starts_on_queues_celery_declared(amqp_project):
    """Celery (worker and client) declares first; a qctl worker and client then declare the
    same names without PRECONDITION_FAILED and work."""
    project = amqp_project("redis")
    celery_worker = project.start_celery_worker("-Q", ALL_QUEUES)
    out = project.celery_client("""
        emit(outcome(capp.add.delay(1, 2)))
    """)
    assert out.get("value") == 3, out
    qctl_worker = project.start_worker(*QCTL_ONE)
    assert project.log_problems() == []
    celery_worker.stop()                    # from now on only the qctl worker consumes
    app = project.client()
    assert app.send_task("proj.add", (2, 3)).get(timeout=GET) == 5
    assert app.send_task("proj.other_add", (2, 3)).get(timeout=GET) == 5
    out = project.celery_client("""
        emit(outcome(capp.mul.delay(6, 7)))
    """)
    assert (out["state"], out.get("value")) == ("SUCCESS", 42), out
    assert qctl_worker.alive(), qctl_worker.tail()
    assert len(qctl_worker.log_lines(r"Task proj\.(add|other_add|mul)\[.*\] succeeded")) == 3
    assert project.log_problems() == []


def test_celery_and_qctl_workers_share_a_queue_on_rabbitmq(amqp_project):
    """Both kinds of workers consume ``celery`` at once (Celery's mingle meets the qctl
    worker): 60 tasks from both kinds of clients all succeed, each runs once."""
    project = amqp_project("redis")
    project.start_worker("-c", "1")
    project.start_celery_worker(pool="prefork", concurrency=1)
    app = project.client()
    celery_ids = project.celery_client("""
        emit([capp.sleep.delay(0.02).id for _ in range(30)])
    """)
    qctl_ids = [app.send_task("proj.sleep", (0.02,)).id for _ in range(30)]
    ids = celery_ids + qctl_ids
    assert [app.AsyncResult(i).get(timeout=60) for i in ids] == [0.02] * 60
    runs = project.runs("sleep")
    assert sorted(r["id"] for r in runs) == sorted(ids)
    sides = {r.get("side") or "qctl" for r in runs}
    assert sides == {"celery", "qctl"}, runs
    assert project.log_problems() == []


def test_countdown_from_celery_client_on_qctl_worker_on_rabbitmq(amqp_project):
    """Celery publishes the ETA task straight to ``celery``; the qctl worker runs it not
    before its time."""
    project = amqp_project("redis")
    project.start_worker(*QCTL_ONE)
    out = project.celery_client("""
        sent = time.time()
        emit({"sent": sent, **outcome(capp.stamp.apply_async(("later",), countdown=2))})
    """)
    assert (out["state"], out.get("value")) == ("SUCCESS", "later"), out
    (run,) = project.runs("stamp")
    assert "side" not in run and run["time"] >= out["sent"] + 2 - 0.05, (run, out)
    assert project.log_problems() == []


def test_countdown_from_qctl_client_on_celery_worker_on_rabbitmq(amqp_project):
    """qctl's delay queues hand the ETA task to a Celery-only fleet, not before its time."""
    project = amqp_project("redis")
    project.start_celery_worker()
    app = project.client()
    sent = time.time()
    result = app.send_task("proj.stamp", ("later",), countdown=2)
    assert result.get(timeout=GET) == "later"
    (run,) = project.runs("stamp")
    assert run.get("side") == "celery" and run["time"] >= sent + 2 - 0.05, (run, sent)
    assert project.log_problems() == []


def test_time_limits_from_celery_client_on_qctl_worker_on_rabbitmq(amqp_project):
    """Celery sends ``timelimit`` ``[10, 0.5]`` as AMQP doubles: the qctl worker must still
    interrupt the task after about half a second."""
    project = amqp_project("redis")
    project.start_worker(*QCTL_ONE)
    out = project.celery_client("""
        started = time.time()
        r = app.send_task("proj.catch_soft", (5,), soft_time_limit=0.5, time_limit=10)
        emit({"elapsed": time.time() - started, **outcome(r)})
    """)
    assert (out["state"], out.get("value")) == ("SUCCESS", "soft"), \
        f"{out}{project._worker_tails()}"
    assert out["elapsed"] < 4, out


def test_time_limits_from_qctl_client_on_celery_worker_on_rabbitmq(amqp_project):
    """qctl cannot send AMQP doubles (pika): a fractional soft limit reaches a Celery prefork
    worker rounded up to whole seconds, never shortened, and still interrupts the task."""
    project = amqp_project("redis")
    project.start_celery_worker(pool="prefork", concurrency=1)
    app = project.client()
    result = app.send_task("proj.catch_soft", (5,), soft_time_limit=0.5, time_limit=10)
    assert result.get(timeout=GET) == "soft"
    (run,) = project.runs("soft")
    assert run["timelimit"][0] == 10 and 0.5 <= run["timelimit"][1] <= 1, run
