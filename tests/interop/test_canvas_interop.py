"""Workflows sent by a Celery 5.7 client run on qctl workers (Redis broker and results).

The Celery client (the cached venv's python, ``capp.py``) builds chains and groups of the test
app's task names; only qctl workers run, so every step and the follow-up messages between
steps are theirs. The Celery side then reads the results with its own ``get()``,
``parent`` walk and ``GroupResult``. Chords spanning both kinds of worker are not promised
(SPEC §9), so none is tested here.
"""
from __future__ import annotations

import uuid

import pytest

from qctl import GroupResult
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

GET = 30.0
QCTL_TWO = ("-c", "2")


def side(run: dict) -> str:
    return run.get("side") or "qctl"


def step_runs(project, label: str, count: int) -> list[dict]:
    """The ``proj.step`` runs tagged ``label``, once there are ``count`` of them."""
    return wait_for(lambda: (lambda found: found if len(found) >= count else None)(
                        [r for r in project.runs("step") if r.get("label") == label]),
                    GET, message=lambda: f"runs so far: {project.runs()}"
                                         + project._worker_tails())


def test_chain_from_celery_client_runs_on_qctl_workers(redis_project):
    """``chain(step(1, 1), step(10), step(100))`` from Celery: the qctl workers run each step
    with the previous result and send the next one; Celery reads the last result, and walks
    ``parent`` back to the first."""
    redis_project.start_worker(*QCTL_TWO)
    label = uuid.uuid4().hex[:12]
    out = redis_project.celery_client(f"""
        from celery import chain
        steps = [app.signature("proj.step", (1, 1), {{"label": {label!r}}}),
                 app.signature("proj.step", (10,), {{"label": {label!r}}}),
                 app.signature("proj.step", (100,), {{"label": {label!r}}})]
        r = chain(*steps).apply_async()
        last = outcome(r)
        emit({{"last": last, "middle": outcome(r.parent), "first": outcome(r.parent.parent),
               "first_parent": r.parent.parent.parent and r.parent.parent.parent.id}})
    """)
    assert out["last"]["state"] == "SUCCESS" and out["last"]["value"] == 112, out
    assert out["middle"]["value"] == 12 and out["first"]["value"] == 2, out
    assert out["first_parent"] is None, out
    first, middle, last = (out[k]["id"] for k in ("first", "middle", "last"))
    runs = {run["id"]: run for run in step_runs(redis_project, label, 3)}
    assert set(runs) == {first, middle, last}
    assert all(side(run) == "qctl" for run in runs.values()), runs
    assert [runs[i]["x"] for i in (first, middle, last)] == [1, 2, 12]
    assert runs[middle]["parent_id"] == first and runs[last]["parent_id"] == middle
    assert {run["root_id"] for run in runs.values()} == {first}
    # the qctl client reads the same results
    app = redis_project.client()
    assert app.AsyncResult(last).get(timeout=GET) == 112
    assert redis_project.log_problems() == []


def test_failing_chain_from_celery_client_stops_on_qctl_workers(redis_project):
    """A step fails on a qctl worker: the Celery client's ``get()`` on the chain raises the
    step's error, and the steps after it never run."""
    redis_project.start_worker(*QCTL_TWO)
    label = uuid.uuid4().hex[:12]
    out = redis_project.celery_client(f"""
        from celery import chain
        r = chain(app.signature("proj.step", (1, 1), {{"label": {label!r}}}),
                  app.signature("proj.fail_with", (), {{"message": "kaboom"}}),
                  app.signature("proj.step", (10,), {{"label": {label!r}}})).apply_async()
        emit({{"last": outcome(r), "failed": outcome(r.parent)}})
    """)
    assert (out["last"]["exc_type"], out["last"]["message"]) == ("ValueError", "kaboom"), out
    assert out["failed"]["state"] == "FAILURE", out
    # the next step was never sent: a task sent afterwards on the same queue comes back first
    app = redis_project.client()
    assert app.send_task("proj.step", (0, 0), {"label": f"{label}-after"}).get(timeout=GET) == 0
    assert [r["x"] for r in step_runs(redis_project, label, 1)] == [1]
    assert not any(worker.log_lines(rf"\[{out['last']['id']}\] received")
                   for worker in redis_project.workers)
    assert redis_project.log_problems() == []


def test_group_from_celery_client_runs_on_qctl_workers(redis_project):
    """``group(add(i, i) ...)`` from Celery: run by qctl workers, Celery's ``GroupResult``
    collects the values in order; the group Celery saved is restored by a qctl client."""
    redis_project.start_worker(*QCTL_TWO)
    out = redis_project.celery_client("""
        from celery import group
        g = group(app.signature("proj.add", (i, i)) for i in range(20)).apply_async()
        g.save()
        values = g.get(timeout=30)
        emit({"id": g.id, "ids": [r.id for r in g.results], "values": values,
              "ready": g.ready(), "successful": g.successful(),
              "completed": g.completed_count()})
    """)
    assert out["values"] == [2 * i for i in range(20)], out
    assert out["ready"] and out["successful"] and out["completed"] == 20, out
    app = redis_project.client()
    restored = GroupResult.restore(out["id"], app=app)
    assert restored is not None
    assert [r.id for r in restored.results] == out["ids"]
    assert restored.get(timeout=GET) == out["values"]
    assert redis_project.log_problems() == []
