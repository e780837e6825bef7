"""Results as a client sees them: AsyncResult, EagerResult, GroupResult on the memory backend.

Metas are written in Celery's shape (celery-wire.md §4.2) straight into the backend, so these
tests read exactly what a worker (qctl's or Celery's) would have stored.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import qctl.exceptions as qexc
from qctl import App, EagerResult, GroupResult, states
from qctl.result import AsyncResult, exception_to_meta, meta_to_exception

pytestmark = pytest.mark.timeout(30)

DONE = "2026-11-21T22:20:34.544151+00:00"


@pytest.fixture
def app():
    name = uuid.uuid4().hex[:12]
    application = App("proj", broker=f"memory://res-broker-{name}",
                      backend=f"memory://res-backend-{name}")
    yield application
    application.close()


def store(app, task_id, status, result=None, traceback=None, children=None,
          date_done=DONE, **extra):
    meta = {"status": status, "result": result, "traceback": traceback,
            "children": children or [], "date_done": date_done, **extra, "task_id": task_id}
    app.backend.store_result(task_id, meta)
    return meta


def new_id() -> str:
    return str(uuid.uuid4())


# -- AsyncResult ----------------------------------------------------------------------------


def test_unknown_id_is_pending(app):
    r = AsyncResult(new_id(), app=app)
    assert r.state == states.PENDING == r.status
    assert r.result is None and r.info is None
    assert r.traceback is None and r.date_done is None
    assert not r.ready() and not r.successful() and not r.failed()
    assert r.children == []


def test_success_members(app):
    tid = new_id()
    store(app, tid, states.SUCCESS, 9)
    r = AsyncResult(tid, app=app)
    assert r.id == tid == r.task_id == str(r)
    assert r.state == states.SUCCESS == r.status
    assert r.result == 9 == r.info
    assert r.traceback is None
    assert r.date_done == datetime(2026, 11, 21, 22, 20, 34, 544151, tzinfo=timezone.utc)
    assert r.ready() and r.successful() and not r.failed()
    assert r.get() == 9 == r.get(timeout=1) == r.wait(timeout=1)


def test_equality_and_hash(app):
    tid = new_id()
    a, b = AsyncResult(tid, app=app), AsyncResult(tid, app=app)
    assert a == b and a == tid and hash(a) == hash(b)
    assert a != AsyncResult(new_id(), app=app)


def test_app_asyncresult_and_task_asyncresult(app):
    @app.task
    def add(x, y):
        return x + y

    tid = new_id()
    store(app, tid, states.SUCCESS, 3)
    assert app.AsyncResult(tid).get() == 3
    r = add.AsyncResult(tid)
    assert r.task_name == add.name and r.get() == 3


def test_default_app_is_the_current_one(app):
    tid = new_id()
    store(app, tid, states.SUCCESS, "current")
    assert AsyncResult(tid).get() == "current"


def test_failure_members(app):
    tid = new_id()
    tb = 'Traceback (most recent call last):\n  ...\nValueError: boom\n'
    store(app, tid, states.FAILURE,
          {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}, tb)
    r = AsyncResult(tid, app=app)
    assert r.state == states.FAILURE
    assert r.failed() and r.ready() and not r.successful()
    assert isinstance(r.result, ValueError) and r.result.args == ("boom",)
    assert isinstance(r.info, ValueError)
    assert r.traceback == tb
    with pytest.raises(ValueError, match="boom"):
        r.get()
    exc = r.get(propagate=False)
    assert isinstance(exc, ValueError) and exc.args == ("boom",)


def test_revoked_raises_task_revoked_error(app):
    tid = new_id()
    store(app, tid, states.REVOKED, {"exc_type": "TaskRevokedError", "exc_message": ["expired"],
                                     "exc_module": "celery.exceptions"})
    r = AsyncResult(tid, app=app)
    assert r.ready() and not r.successful()
    with pytest.raises(qexc.TaskRevokedError):
        r.get()
    assert isinstance(r.get(propagate=False), qexc.TaskRevokedError)


def test_retry_state_is_not_ready(app):
    tid = new_id()
    store(app, tid, states.RETRY, {"exc_type": "OSError", "exc_message": ["later"],
                                   "exc_module": "builtins"}, "tb", date_done=None)
    r = AsyncResult(tid, app=app)
    assert r.state == states.RETRY and not r.ready()
    assert isinstance(r.result, OSError)
    assert r.date_done is None
    with pytest.raises(qexc.TimeoutError):
        r.get(timeout=0.2, interval=0.05)


def test_get_timeout_raises_qctl_timeout_error(app):
    r = AsyncResult(new_id(), app=app)
    started = time.monotonic()
    with pytest.raises(qexc.TimeoutError):
        r.get(timeout=0.3, interval=0.05)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3
    with pytest.raises(qexc.TimeoutError):
        r.wait(timeout=0.1, interval=0.05)


def test_get_waits_for_a_result_stored_later(app):
    tid = new_id()
    timer = threading.Timer(0.2, store, (app, tid, states.SUCCESS, "late"))
    timer.start()
    try:
        assert AsyncResult(tid, app=app).get(timeout=5, interval=0.05) == "late"
    finally:
        timer.cancel()


def test_memory_backend_wakes_get_without_waiting_out_the_interval(app):
    tid = new_id()
    timer = threading.Timer(0.2, store, (app, tid, states.SUCCESS, "prompt"))
    started = time.monotonic()
    timer.start()
    try:
        assert AsyncResult(tid, app=app).get(timeout=10, interval=5) == "prompt"
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.5


def test_get_on_message_sees_state_changes(app):
    tid = new_id()
    seen = []

    def worker():
        for status, result in [(states.STARTED, None), ("PROGRESS", {"pct": 50}),
                               (states.SUCCESS, 42)]:
            time.sleep(0.15)
            store(app, tid, status, result, date_done=DONE if status == states.SUCCESS else None)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        value = AsyncResult(tid, app=app).get(timeout=10, interval=0.05,
                                               on_message=lambda meta: seen.append(meta))
    finally:
        thread.join()
    assert value == 42
    statuses = [m["status"] for m in seen if m["status"] != states.PENDING]
    assert statuses == [states.STARTED, "PROGRESS", states.SUCCESS]
    progress = [m for m in seen if m["status"] == "PROGRESS"][0]
    assert progress["result"] == {"pct": 50} and progress["task_id"] == tid


def test_forget(app):
    tid = new_id()
    store(app, tid, states.SUCCESS, 1)
    r = AsyncResult(tid, app=app)
    assert r.get() == 1
    r.forget()
    assert r.state == states.PENDING
    assert AsyncResult(tid, app=app).state == states.PENDING
    r.forget()  # idempotent


def test_parent(app):
    first = AsyncResult(new_id(), app=app)
    second = AsyncResult(new_id(), app=app, parent=first)
    assert second.parent is first
    assert first.parent is None
    assert second.as_tuple() == [[second.id, [[first.id, None], None]], None]


def test_children(app):
    tid, child, gid, g1, g2 = (new_id() for _ in range(5))
    store(app, tid, states.SUCCESS, 5, children=[
        [[child, None], None],
        [[gid, None], [[[g1, None], None], [[g2, None], None]]],
    ])
    store(app, child, states.SUCCESS, "child")
    kids = AsyncResult(tid, app=app).children
    assert len(kids) == 2
    assert isinstance(kids[0], AsyncResult) and kids[0].id == child
    assert kids[0].get() == "child"
    assert isinstance(kids[1], GroupResult) and kids[1].id == gid
    assert [r.id for r in kids[1].results] == [g1, g2]


def test_custom_state_is_not_ready(app):
    tid = new_id()
    store(app, tid, "PROGRESS", {"current": 3}, date_done=None)
    r = AsyncResult(tid, app=app)
    assert r.state == "PROGRESS"
    assert r.info == {"current": 3}
    assert not r.ready()


def test_result_read_again_while_not_ready(app):
    """Unready metas are not cached: a later read sees the new state."""
    tid = new_id()
    r = AsyncResult(tid, app=app)
    assert r.state == states.PENDING
    store(app, tid, states.STARTED, None, date_done=None)
    assert r.state == states.STARTED
    store(app, tid, states.SUCCESS, 7)
    assert r.state == states.SUCCESS and r.result == 7


def test_results_written_by_celery_are_read(app):
    tid = "f0000000-0000-0000-0000-000000000001"
    raw = (b'{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["boom"], '
           b'"exc_module": "builtins"}, "traceback": "Traceback ...", "children": [], '
           b'"date_done": "2026-11-21T22:23:09.220546+00:00", "task_id": "' + tid.encode() + b'"}')
    app.backend.set(tid, raw, "FAILURE")
    with pytest.raises(ValueError, match="boom"):
        AsyncResult(tid, app=app).get()


# -- rebuilding exceptions ------------------------------------------------------------------


def test_builtin_exceptions():
    exc = meta_to_exception({"exc_type": "KeyError", "exc_message": ["k"],
                             "exc_module": "builtins"})
    assert type(exc) is KeyError and exc.args == ("k",)
    exc = meta_to_exception({"exc_type": "ZeroDivisionError", "exc_message": [],
                             "exc_module": "builtins"})
    assert type(exc) is ZeroDivisionError


@pytest.mark.parametrize("name", ["TaskRevokedError", "NotRegistered", "Retry",
                                  "MaxRetriesExceededError", "TimeLimitExceeded",
                                  "SoftTimeLimitExceeded", "WorkerLostError", "Reject", "Ignore"])
def test_celery_exceptions_map_to_qctl(name):
    exc = meta_to_exception({"exc_type": name, "exc_message": ["x"],
                             "exc_module": "celery.exceptions"})
    assert type(exc) is getattr(qexc, name)


def test_not_registered_from_celery():
    exc = meta_to_exception({"exc_type": "NotRegistered", "exc_message": ["proj.nope"],
                             "exc_module": "celery.exceptions"})
    assert isinstance(exc, qexc.NotRegistered) and exc.args == ("proj.nope",)


def test_billiard_exceptions_map_to_qctl():
    exc = meta_to_exception({"exc_type": "WorkerLostError", "exc_message": ["died"],
                             "exc_module": "billiard.exceptions"})
    assert type(exc) is qexc.WorkerLostError


def test_celery_exception_qctl_lacks_becomes_synthetic():
    exc = meta_to_exception({"exc_type": "SecurityError", "exc_message": ["nope"],
                             "exc_module": "celery.exceptions"})
    assert isinstance(exc, Exception)
    assert type(exc).__name__ == "SecurityError"
    assert exc.args == ("nope",)


def test_unknown_module_gives_a_synthetic_class():
    exc = meta_to_exception({"exc_type": "PaymentDeclined", "exc_message": ["card", 42],
                             "exc_module": "shop.nonexistent.errors"})
    assert isinstance(exc, Exception)
    assert type(exc).__name__ == "PaymentDeclined"
    assert type(exc).__module__ == "shop.nonexistent.errors"
    assert exc.args == ("card", 42)


def test_unknown_type_in_a_known_module_gives_a_synthetic_class():
    exc = meta_to_exception({"exc_type": "NoSuchError", "exc_message": ["m"],
                             "exc_module": "builtins"})
    assert type(exc).__name__ == "NoSuchError" and isinstance(exc, Exception)


class Outer:
    class InnerError(Exception):
        pass


def test_qualified_names_are_followed():
    exc = meta_to_exception({"exc_type": "Outer.InnerError", "exc_message": ["deep"],
                             "exc_module": __name__})
    assert type(exc) is Outer.InnerError
    meta = exception_to_meta(Outer.InnerError("deep"))
    assert meta == {"exc_type": "Outer.InnerError", "exc_message": ["deep"],
                    "exc_module": __name__}


@pytest.mark.parametrize("module,name", [("os", "system"), ("subprocess", "Popen"),
                                         ("builtins", "eval"), ("builtins", "exec"),
                                         ("builtins", "open"), ("os", "remove")])
def test_non_exception_types_are_never_called(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payloads = {
        ("os", "system"): [f"touch {marker}"],
        ("subprocess", "Popen"): [["touch", str(marker)]],
        ("builtins", "eval"): [f"open({str(marker)!r}, 'w')"],
        ("builtins", "exec"): [f"open({str(marker)!r}, 'w')"],
        ("builtins", "open"): [str(marker), "w"],
        ("os", "remove"): [str(marker)],
    }
    if (module, name) == ("os", "remove"):
        marker.write_text("keep me")
    exc = meta_to_exception({"exc_type": name, "exc_message": payloads[(module, name)],
                             "exc_module": module})
    time.sleep(0.05)  # a Popen would have had time to run
    assert isinstance(exc, BaseException)
    assert type(exc).__name__ == name
    if (module, name) == ("os", "remove"):
        assert marker.read_text() == "keep me"
    else:
        assert not marker.exists()


def test_rebuilding_does_not_import_modules(tmp_path, monkeypatch):
    """Like Celery (which only looks in ``sys.modules``), a result naming a module that is not
    loaded must not make the client import it: importing runs that module's code."""
    marker = tmp_path / "imported"
    name = f"qctl_test_side_effect_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "class BoomError(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        exc = meta_to_exception({"exc_type": "BoomError", "exc_message": ["x"],
                                 "exc_module": name})
        assert isinstance(exc, Exception) and type(exc).__name__ == "BoomError"
        assert not marker.exists()
        assert name not in sys.modules
    finally:
        sys.modules.pop(name, None)


def test_exc_message_may_be_a_plain_string():
    exc = meta_to_exception({"exc_type": "ValueError", "exc_message": "old style",
                             "exc_module": "builtins"})
    assert type(exc) is ValueError and exc.args == ("old style",)


def test_exception_to_meta_shapes():
    assert exception_to_meta(ValueError("boom")) == {
        "exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    # qctl's own exceptions are written under Celery's module name
    assert exception_to_meta(qexc.TaskRevokedError("expired")) == {
        "exc_type": "TaskRevokedError", "exc_message": ["expired"],
        "exc_module": "celery.exceptions"}
    # unserializable arguments become their reprs
    meta = exception_to_meta(ValueError({1, 2}))
    assert meta["exc_message"] == [repr({1, 2})]


def test_exception_round_trip():
    for original in (KeyError("k"), qexc.TimeLimitExceeded(30), OSError(2, "missing")):
        rebuilt = meta_to_exception(exception_to_meta(original))
        assert type(rebuilt) is type(original)
        assert rebuilt.args == original.args


# -- EagerResult ----------------------------------------------------------------------------


def test_eager_result_success(app):
    r = EagerResult("e-1", 5, states.SUCCESS, app=app)
    assert r.id == "e-1"
    assert r.get() == 5 and r.result == 5 and r.info == 5
    assert r.state == states.SUCCESS and r.ready() and r.successful() and not r.failed()
    assert r.traceback is None


def test_eager_result_failure(app):
    exc = KeyError("k")
    r = EagerResult("e-2", exc, states.FAILURE, "tb text", app=app)
    assert r.failed() and r.ready() and r.traceback == "tb text"
    with pytest.raises(KeyError):
        r.get()
    assert r.get(propagate=False) is exc
    assert r.result is exc


def test_eager_result_stores_nothing(app):
    r = EagerResult("e-3", 1, states.SUCCESS, app=app)
    r.forget()
    assert AsyncResult("e-3", app=app).state == states.PENDING


# -- GroupResult ----------------------------------------------------------------------------


def test_group_result_join(app):
    ids = [new_id() for _ in range(3)]
    group = GroupResult(new_id(), [AsyncResult(i, app=app) for i in ids], app=app)
    assert len(group) == 3 and [r.id for r in group] == ids
    assert group[1].id == ids[1]
    assert not group.ready() and group.waiting() and group.completed_count() == 0
    for n, tid in enumerate(ids):
        store(app, tid, states.SUCCESS, n * 10)
    assert group.ready() and group.successful() and not group.failed()
    assert group.completed_count() == 3
    assert group.join(timeout=1) == [0, 10, 20]
    assert group.get(timeout=1) == [0, 10, 20]


def test_group_result_join_waits_and_times_out(app):
    a, b = new_id(), new_id()
    group = GroupResult(new_id(), [AsyncResult(a, app=app), AsyncResult(b, app=app)], app=app)
    store(app, a, states.SUCCESS, 1)
    with pytest.raises(qexc.TimeoutError):
        group.join(timeout=0.3, interval=0.05)
    threading.Timer(0.2, store, (app, b, states.SUCCESS, 2)).start()
    assert group.join(timeout=5, interval=0.05) == [1, 2]


def test_group_result_join_propagates(app):
    a, b = new_id(), new_id()
    group = GroupResult(new_id(), [AsyncResult(a, app=app), AsyncResult(b, app=app)], app=app)
    store(app, a, states.SUCCESS, 1)
    store(app, b, states.FAILURE, {"exc_type": "ValueError", "exc_message": ["bad"],
                                   "exc_module": "builtins"})
    assert group.failed() and not group.successful() and group.completed_count() == 1
    with pytest.raises(ValueError):
        group.join(timeout=1)
    values = group.join(timeout=1, propagate=False)
    assert values[0] == 1 and isinstance(values[1], ValueError)


def test_group_result_save_and_restore(app):
    gid = new_id()
    ids = [new_id(), new_id()]
    group = GroupResult(gid, [AsyncResult(i, app=app) for i in ids], app=app)
    assert group.save() is group
    restored = GroupResult.restore(gid, app=app)
    assert isinstance(restored, GroupResult)
    assert restored.id == gid
    assert [r.id for r in restored.results] == ids
    store(app, ids[0], states.SUCCESS, "a")
    store(app, ids[1], states.SUCCESS, "b")
    assert restored.join(timeout=1) == ["a", "b"]
    assert GroupResult.restore(gid).id == gid  # the current app by default


def test_group_save_uses_celerys_taskset_key_and_shape(app):
    gid, a, b = new_id(), new_id(), new_id()
    GroupResult(gid, [AsyncResult(a, app=app), AsyncResult(b, app=app)], app=app).save()
    raw = app.backend.get_raw(f"celery-taskset-meta-{gid}")
    assert raw is not None
    assert app.backend.decode(raw) == {"result": [[gid, None], [[[a, None], None],
                                                               [[b, None], None]]]}


def test_group_restore_unknown_and_delete(app):
    assert GroupResult.restore(new_id(), app=app) is None
    gid = new_id()
    group = GroupResult(gid, [AsyncResult(new_id(), app=app)], app=app).save()
    group.delete()
    assert GroupResult.restore(gid, app=app) is None


def test_group_forget(app):
    a = new_id()
    store(app, a, states.SUCCESS, 1)
    group = GroupResult(new_id(), [AsyncResult(a, app=app)], app=app)
    group.forget()
    assert AsyncResult(a, app=app).state == states.PENDING


def test_result_expires_applies_in_memory_backend(app):
    app.conf.result_expires = timedelta(seconds=0.2)
    app.close()  # backends pick the setting up when created
    tid = new_id()
    store(app, tid, states.SUCCESS, 1)
    assert AsyncResult(tid, app=app).state == states.SUCCESS
    time.sleep(0.3)
    assert AsyncResult(tid, app=app).state == states.PENDING
