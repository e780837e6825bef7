"""qctl <-> Celery 5.7 on Redis (broker and result backend on both sides).

Every test runs real processes: qctl workers (``python -m qctl -A proj worker``, the app in
``tests/apps/proj.py``), Celery workers and Celery clients from the cached Celery venv
(``capp.py``, the same task names). Runs are recorded by the tasks themselves
(``runs-<pid>.jsonl``); Celery's records carry ``"side": "celery"``.
"""
from __future__ import annotations

import json
import time

import pytest

from qctl import states
from qctl.exceptions import TaskRevokedError
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

GET = 30.0          # seconds a client waits for one result
QCTL_ONE = ("-c", "1", "--prefetch-multiplier", "1")




def side(run: dict) -> str:
    return run.get("side") or "qctl"


def runs_of(project, kind: str, count: int, timeout: float = GET) -> list[dict]:
    """Wait until ``count`` runs of ``kind`` were recorded; returns them by time."""
    return wait_for(lambda: (lambda found: found if len(found) >= count else None)(
                        project.runs(kind)),
                    timeout, message=lambda: f"runs so far: {project.runs()}"
                                             + project._worker_tails())


# -- 1, 2: plain tasks -----------------------------------------------------------------------

def test_celery_client_task_runs_on_qctl_worker(redis_project):
    """A Celery client's ``add.delay(2, 2)`` runs on a qctl worker; Celery's ``.get()`` is 4."""
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        r = capp.add.delay(2, 2)
        emit(outcome(r))
    """)
    assert out["state"] == "SUCCESS", out
    assert out["value"] == 4


def test_qctl_client_task_runs_on_celery_worker(redis_project):
    """A qctl client's task runs on a Celery worker; qctl's ``AsyncResult.get()`` reads it."""
    redis_project.start_celery_worker()
    app = redis_project.client()
    results = [app.send_task("proj.add", (i, i)) for i in range(5)]
    assert [r.get(timeout=GET) for r in results] == [0, 2, 4, 6, 8]
    product = app.send_task("proj.mul", (6, 7), kwargs={})
    assert product.get(timeout=GET) == 42
    assert product.state == states.SUCCESS
    assert product.date_done is not None


# -- 3: options and outcomes crossing over -------------------------------------------------------

PRIORITIES = [9, 5, 0, 7, 1]
#: Celery's Redis semantics: bands 0-2 | 3-5 | 6-8 | 9, lowest band first, FIFO in a band.
EXPECTED_ORDER = ["p0", "p1", "p5", "p7", "p9"]


def test_priority_from_celery_client_on_qctl_worker(redis_project):
    """Published while no worker runs; a qctl worker (-c 1, prefetch 1) runs them in
    Celery's Redis priority order (lower number first)."""
    ids = redis_project.celery_client(f"""
        ids = [capp.prio.apply_async((f"p{{p}}",), priority=p).id for p in {PRIORITIES!r}]
        emit(ids)
    """)
    assert len(ids) == len(PRIORITIES)
    redis_project.start_worker(*QCTL_ONE)
    runs = runs_of(redis_project, "prio", len(PRIORITIES))
    assert [r["label"] for r in runs] == EXPECTED_ORDER
    assert all(side(r) == "qctl" for r in runs)


def test_priority_from_qctl_client_on_celery_worker(redis_project):
    """qctl's ``priority=`` lands in the band lists a Celery worker (-c 1, prefetch 1) reads
    in order."""
    app = redis_project.client()
    for p in PRIORITIES:
        app.send_task("proj.prio", (f"p{p}",), priority=p)
    redis_project.start_celery_worker("--prefetch-multiplier", "1")
    runs = runs_of(redis_project, "prio", len(PRIORITIES))
    assert [r["label"] for r in runs] == EXPECTED_ORDER
    assert all(side(r) == "celery" for r in runs)


def test_countdown_from_celery_client_on_qctl_worker(redis_project):
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        sent = time.time()
        r = capp.stamp.apply_async(("later",), countdown=2)
        emit({"sent": sent, **outcome(r)})
    """)
    assert out["state"] == "SUCCESS" and out["value"] == "later", out
    (run,) = redis_project.runs("stamp")
    assert side(run) == "qctl"
    assert run["time"] >= out["sent"] + 2 - 0.05, (run, out)


def _countdown_on_celery_worker(redis_project, **client_settings):
    redis_project.start_celery_worker()
    app = redis_project.client(**client_settings)
    sent = time.time()
    result = app.send_task("proj.stamp", ("later",), countdown=2)
    try:
        value = result.get(timeout=15)
    except Exception as exc:  # noqa: BLE001 - explain where the message is
        import redis
        client = redis.Redis.from_url(redis_project.broker_url)
        where = {key.decode(errors="replace"): client.type(key).decode()
                 for key in client.keys("*") if not key.startswith(b"celery-task-meta")}
        pytest.fail(f"the Celery worker never ran a qctl countdown task ({exc!r}); broker keys: "
                    f"{where}" + redis_project._worker_tails(), pytrace=False)
    assert value == "later"
    (run,) = redis_project.runs("stamp")
    assert side(run) == "celery"
    assert run["time"] >= sent + 2 - 0.05, (run, sent)


def test_countdown_from_qctl_client_on_celery_worker(redis_project):
    """With qctl's default settings: the ETA task must reach a Celery-only fleet."""
    _countdown_on_celery_worker(redis_project)


def test_countdown_from_qctl_client_on_celery_worker_without_delayed_delivery(redis_project):
    """``broker_transport_options={'delayed_delivery': False}``: published as Celery does."""
    _countdown_on_celery_worker(redis_project,
                                broker_transport_options={"delayed_delivery": False})


def test_expired_celery_task_is_revoked_by_qctl_worker(redis_project):
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        r = capp.stamp.apply_async(("never",), expires=-5)
        emit(outcome(r))
    """)
    assert out["state"] == "REVOKED", out
    assert out["exc_type"] == "TaskRevokedError" and out["exc_module"] == "celery.exceptions", out
    assert out["message"] == "expired", out
    assert redis_project.runs("stamp") == []


def test_expired_qctl_task_is_revoked_by_celery_worker(redis_project):
    redis_project.start_celery_worker()
    app = redis_project.client()
    result = app.send_task("proj.stamp", ("never",), expires=-5)
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=GET)
    assert result.state == states.REVOKED
    assert redis_project.runs("stamp") == []


def test_retry_from_celery_client_on_qctl_worker(redis_project):
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        r = capp.retry_explicit.apply_async((2,), {"countdown": 0.2})
        emit(outcome(r))
    """)
    assert out["state"] == "SUCCESS" and out["value"] == 2, out
    runs = redis_project.runs("retry_explicit")
    assert [r["retries"] for r in runs] == [0, 1, 2]
    assert {r["id"] for r in runs} == {out["id"]}
    assert all(side(r) == "qctl" for r in runs)


def test_retry_from_qctl_client_on_celery_worker(redis_project):
    redis_project.start_celery_worker()
    app = redis_project.client()
    result = app.send_task("proj.retry_explicit", (2,), kwargs={"countdown": 0.2})
    assert result.get(timeout=GET) == 2
    runs = redis_project.runs("retry_explicit")
    assert [r["retries"] for r in runs] == [0, 1, 2]
    assert {r["id"] for r in runs} == {result.id}
    assert all(side(r) == "celery" for r in runs)


def test_link_declared_by_celery_client(redis_project):
    """Celery declares ``link=record_run.s()`` routed to queue ``other``: a qctl worker (-Q
    celery) runs ``add`` and sends the callback, a Celery worker (-Q other) runs it with the
    result; and a callback left on the default queue runs on the qctl worker."""
    redis_project.start_worker(*QCTL_ONE, "-Q", "celery")
    redis_project.start_celery_worker("-Q", "other")
    out = redis_project.celery_client("""
        crossed = capp.add.apply_async((2, 3), link=capp.record_run.s().set(queue="other"))
        same = capp.add.apply_async((10, 20), link=capp.record_run.s())
        emit({"crossed": outcome(crossed), "same": outcome(same)})
    """)
    assert out["crossed"]["value"] == 5 and out["same"]["value"] == 30, out
    runs = runs_of(redis_project, "run", 2)
    by_side = {side(r): r for r in runs}
    assert set(by_side) == {"celery", "qctl"}, runs
    assert by_side["celery"]["n"] == 5
    assert by_side["celery"]["parent_id"] == out["crossed"]["id"]
    assert by_side["celery"]["root_id"] == out["crossed"]["id"]
    callback = redis_project.client().AsyncResult(by_side["qctl"]["id"])
    assert callback.get(timeout=GET) == 30
    assert redis_project.log_problems() == []


def test_link_declared_by_qctl_client(redis_project):
    """qctl declares ``link=record_run`` routed to ``other``: a Celery worker (-Q celery)
    runs ``add`` and sends the callback, a qctl worker (-Q other) runs it; and a callback on
    the default queue runs on the Celery worker."""
    redis_project.start_celery_worker("-Q", "celery")
    redis_project.start_worker(*QCTL_ONE, "-Q", "other")
    app = redis_project.client()
    crossed = app.send_task("proj.add", (2, 3),
                            link=app.signature("proj.record_run").set(queue="other"))
    same = app.send_task("proj.add", (10, 20), link=app.signature("proj.record_run"))
    assert crossed.get(timeout=GET) == 5 and same.get(timeout=GET) == 30
    runs = runs_of(redis_project, "run", 2)
    by_side = {side(r): r for r in runs}
    assert set(by_side) == {"celery", "qctl"}, runs
    assert by_side["celery"]["n"] == 30
    assert by_side["celery"]["parent_id"] == same.id
    assert app.AsyncResult(by_side["qctl"]["id"]).get(timeout=GET) == 5
    assert redis_project.log_problems() == []


def test_link_callback_listed_as_child_by_qctl_worker(redis_project):
    """A Celery client reads ``.children`` of a task a qctl worker ran with a link."""
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        r = capp.add.apply_async((2, 3), link=capp.record_run.s())
        emit({**outcome(r), "children": [c.id for c in (r.children or [])]})
    """)
    assert out["value"] == 5, out
    (callback,) = runs_of(redis_project, "run", 1)
    assert out["children"] == [callback["id"]], out


def test_link_callback_listed_as_child_by_celery_worker(redis_project):
    """A qctl client reads ``.children`` of a task a Celery worker ran with a link."""
    redis_project.start_celery_worker()
    app = redis_project.client()
    result = app.send_task("proj.add", (2, 3), link=app.signature("proj.record_run"))
    assert result.get(timeout=GET) == 5
    (callback,) = runs_of(redis_project, "run", 1)
    assert [child.id for child in result.children] == [callback["id"]]
    assert app.AsyncResult(callback["id"]).get(timeout=GET) == 5


def test_link_error_declared_by_celery_client(redis_project):
    """Celery declares ``link_error=record_run.s()`` routed to ``other``: the qctl worker that
    ran the failing task sends it (old-style: the failed task's id) to the Celery worker."""
    redis_project.start_worker(*QCTL_ONE, "-Q", "celery")
    redis_project.start_celery_worker("-Q", "other")
    out = redis_project.celery_client("""
        r = capp.fail.apply_async(("kaboom",), link_error=capp.record_run.s().set(queue="other"))
        emit(outcome(r))
    """)
    assert out["state"] == "FAILURE", out
    (errback,) = runs_of(redis_project, "run", 1)
    assert side(errback) == "celery"
    assert errback["n"] == out["id"]


def test_link_error_declared_by_qctl_client(redis_project):
    """qctl declares ``link_error`` routed to ``other``: the Celery worker that ran the
    failing task sends it to the qctl worker, which runs it with the failed task's id."""
    redis_project.start_celery_worker("-Q", "celery")
    redis_project.start_worker(*QCTL_ONE, "-Q", "other")
    app = redis_project.client()
    result = app.send_task("proj.fail", ("kaboom",),
                           link_error=app.signature("proj.record_run").set(queue="other"))
    with pytest.raises(ValueError):
        result.get(timeout=GET)
    (errback,) = runs_of(redis_project, "run", 1)
    assert side(errback) == "qctl"
    assert app.AsyncResult(errback["id"]).get(timeout=GET) == result.id


def test_failure_on_qctl_worker_read_by_celery_client(redis_project):
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        emit(outcome(capp.fail.delay("kaboom")))
    """)
    assert out["state"] == "FAILURE", out
    assert (out["exc_type"], out["exc_module"]) == ("ValueError", "builtins"), out
    assert out["message"] == "kaboom" and out["exc_args"] == ["'kaboom'"], out
    assert "ValueError" in (out["traceback"] or ""), out


def test_failure_on_celery_worker_read_by_qctl_client(redis_project):
    redis_project.start_celery_worker()
    app = redis_project.client()
    result = app.send_task("proj.fail", ("kaboom",))
    with pytest.raises(ValueError) as info:
        result.get(timeout=GET)
    assert type(info.value) is ValueError and info.value.args == ("kaboom",)
    assert result.state == states.FAILURE
    assert "ValueError: kaboom" in (result.traceback or "")


def test_results_are_readable_from_either_side(redis_project):
    """A result a qctl worker stored is read by Celery and vice versa, by task id."""
    redis_project.start_worker(*QCTL_ONE)
    app = redis_project.client()
    by_qctl = app.send_task("proj.add", (1, 1))
    assert by_qctl.get(timeout=GET) == 2
    out = redis_project.celery_client(f"""
        emit(outcome(app.AsyncResult({by_qctl.id!r})))
    """)
    assert (out["state"], out["value"]) == ("SUCCESS", 2), out
    raw = app.backend.get(by_qctl.id)
    meta = json.loads(raw)
    assert list(meta)[-1] == "task_id" and meta["status"] == "SUCCESS" and meta["result"] == 2


def test_time_limits_from_celery_client_on_qctl_worker(redis_project):
    """``timelimit`` is ``[hard, soft]``: a fractional soft limit set by a Celery client
    interrupts the task on a qctl worker."""
    redis_project.start_worker(*QCTL_ONE)
    out = redis_project.celery_client("""
        started = time.time()
        r = app.send_task("proj.catch_soft", (5,), soft_time_limit=0.5, time_limit=10)
        emit({"elapsed": time.time() - started, **outcome(r)})
    """)
    assert (out["state"], out.get("value")) == ("SUCCESS", "soft"), out
    assert out["elapsed"] < 4, out


def test_time_limits_from_qctl_client_on_celery_worker(redis_project):
    """The same from a qctl client on a Celery prefork worker (solo has no time limits)."""
    redis_project.start_celery_worker(pool="prefork", concurrency=1)
    app = redis_project.client()
    started = time.time()
    result = app.send_task("proj.catch_soft", (5,), soft_time_limit=0.5, time_limit=10)
    assert result.get(timeout=GET) == "soft"
    assert time.time() - started < 4
    (run,) = redis_project.runs("soft")
    assert run["timelimit"] == [10, 0.5]


# -- the bytes on the wire ----------------------------------------------------------------------

CELERY_ID = "11111111-1111-1111-1111-111111111111"
QCTL_ID = "22222222-2222-2222-2222-222222222222"


def _published(redis_project) -> dict[str, dict]:
    """The same two calls made by a Celery client and by a qctl client, read back from the
    broker's lists (no worker runs): {"celery"|"qctl": {"full"|"eta": envelope}}."""
    redis_project.celery_client(f"""
        capp.add.apply_async((2, 3), task_id={CELERY_ID!r}, expires=3600, priority=5,
                             link=capp.record_run.s(), link_error=capp.prio.s("x"),
                             time_limit=30, soft_time_limit=20, headers={{"x_custom": "hello"}},
                             shadow="sh")
        capp.add.apply_async((4, 5), task_id={CELERY_ID[:-1] + "2"!r}, countdown=60)
    """)
    app = redis_project.client(broker_transport_options={"delayed_delivery": False})
    app.send_task("proj.add", (2, 3), task_id=QCTL_ID, expires=3600, priority=5,
                  link=app.signature("proj.record_run"),
                  link_error=app.signature("proj.prio", ("x",)), time_limit=30,
                  soft_time_limit=20, headers={"x_custom": "hello"}, shadow="sh")
    app.send_task("proj.add", (4, 5), task_id=QCTL_ID[:-1] + "3", countdown=60)
    import redis
    client = redis.Redis.from_url(redis_project.broker_url)
    try:
        raws = client.lrange("celery", 0, -1) + client.lrange("celery\x06\x163", 0, -1)
    finally:
        client.close()
    found: dict[str, dict] = {"celery": {}, "qctl": {}}
    for raw in raws:
        message = json.loads(raw)
        task_id = message["headers"]["id"]
        who = "celery" if task_id.startswith("1") else "qctl"
        found[who]["full" if task_id in (CELERY_ID, QCTL_ID) else "eta"] = message
    assert all(len(v) == 2 for v in found.values()), found
    return found


def _normalized(message: dict) -> dict:
    """The envelope with what differs between any two sends (ids, times, pids, uuids)
    replaced by placeholders, and the body decoded."""
    import base64
    import re as _re
    from datetime import datetime
    text = json.dumps(message)
    for task_id in (CELERY_ID, CELERY_ID[:-1] + "2", QCTL_ID, QCTL_ID[:-1] + "3"):
        text = text.replace(task_id, "<id>")
    out = json.loads(text)
    headers, props = out["headers"], out["properties"]
    for key in ("eta", "expires"):
        if headers.get(key):
            value = datetime.fromisoformat(headers[key])
            assert value.utcoffset() is not None and headers[key].endswith("+00:00"), headers[key]
            headers[key] = "<iso+00:00>"
    assert _re.fullmatch(r"gen\d+@\S+", headers["origin"]), headers["origin"]
    headers["origin"] = "<origin>"
    for key in ("reply_to", "delivery_tag"):
        assert _re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                             props[key]), props[key]
        props[key] = "<uuid>"
    if "expiration" in props:
        assert abs(int(props["expiration"]) - 3600000) < 10000, props["expiration"]
        props["expiration"] = "<ms>"
    out["body"] = json.loads(base64.b64decode(out["body"]))
    return {"order": {"top": list(out), "headers": list(headers), "properties": list(props)},
            **out}


def test_task_envelope_matches_celery_layout(redis_project):
    """qctl's task message on Redis equals Celery's: the same keys in the same order, the same
    header and property values and body, up to ids, times and uuids (``delivery_info``'s
    exchange is checked on its own below)."""
    found = _published(redis_project)
    for kind in ("full", "eta"):
        celery, qctl = (_normalized(found[who][kind]) for who in ("celery", "qctl"))
        for message in (celery, qctl):
            message["properties"]["delivery_info"].pop("exchange")
        assert qctl == celery, kind


def test_task_envelope_delivery_info_matches_celery(redis_project):
    found = _published(redis_project)
    assert found["qctl"]["full"]["properties"]["delivery_info"] == \
        found["celery"]["full"]["properties"]["delivery_info"]


# -- 4: both kinds of workers on one queue ----------------------------------------------------------

def test_celery_and_qctl_workers_share_a_queue(redis_project):
    """200 tasks (100 from each kind of client) on the ``celery`` queue consumed by a Celery
    prefork worker and a qctl worker at once: all succeed, each runs once, both took some."""
    redis_project.start_worker("-c", "1")
    redis_project.start_celery_worker(pool="prefork", concurrency=1)   # its mingle meets qctl
    app = redis_project.client()
    celery_ids = redis_project.celery_client("""
        emit([capp.sleep.delay(0.01).id for _ in range(100)])
    """)
    qctl_ids = [app.send_task("proj.sleep", (0.01,)).id for _ in range(100)]
    ids = celery_ids + qctl_ids
    assert len(set(ids)) == 200
    values = [app.AsyncResult(i).get(timeout=60) for i in ids]
    assert values == [0.01] * 200
    out = redis_project.celery_client(f"""
        ids = {ids!r}
        emit([o.get("value") for o in outcomes([app.AsyncResult(i) for i in ids], timeout=30)])
    """)
    assert out == [0.01] * 200
    time.sleep(1.0)                         # a duplicate would show up by now
    runs = redis_project.runs("sleep")
    ran = [r["id"] for r in runs]
    assert sorted(ran) == sorted(ids), "each task must run exactly once"
    counts = {"celery": 0, "qctl": 0}
    for run in runs:
        counts[side(run)] += 1
    assert counts["celery"] > 0 and counts["qctl"] > 0, counts
    for worker in redis_project.workers:
        assert worker.alive(), worker.tail()
    assert redis_project.log_problems() == []
