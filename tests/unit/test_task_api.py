"""The task API: declaring, registering, calling (delay/apply_async/apply/__call__), retrying,
handlers, custom states, task loggers, annotations and the publish retry policy.

Everything runs in this process on ``memory://`` (a real transport and backend) or eagerly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from qctl import App, EagerResult, Task, states
from qctl.exceptions import (Ignore, MaxRetriesExceededError, NotRegistered, OperationalError,
                             Reject, Retry)
from qctl.log import get_task_logger
from qctl.protocol import build_task_message, read_headers
from qctl.result import AsyncResult
from qctl.trace import Tracer, backoff_countdown, build_context

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app():
    """An app on its own memory broker and result store (memory URLs are process-wide)."""
    name = uuid.uuid4().hex[:12]
    application = App("proj", broker=f"memory://tasks-{name}", backend=f"memory://results-{name}")
    yield application
    application.close()


def fetch_all(app, queue="celery", timeout=0.2):
    """Every message currently deliverable on ``queue`` (leased, then acknowledged)."""
    deliveries = app.transport.fetch([queue], 100, timeout)
    app.transport.ack([d.tag for d in deliveries])
    return deliveries


def body_of(envelope):
    return json.loads(envelope.body)


@pytest.fixture
def published(app, monkeypatch):
    """Spy on ``transport.publish``: a list of (queue, envelope, priority, eta)."""
    seen = []
    transport = app.transport
    real = transport.publish

    def spy(queue, envelope, **kwargs):
        seen.append((queue, envelope, kwargs.get("priority"), kwargs.get("eta")))
        return real(queue, envelope, **kwargs)

    monkeypatch.setattr(transport, "publish", spy)
    return seen


def run_traced(app, task, args=(), kwargs=None, store=None, **message_options):
    """Run ``task`` the way a worker does: build its message, read it back, trace it."""
    env = build_task_message(task.name, args, kwargs or {}, **message_options)
    msg = read_headers(env, app.conf.accept_content)
    msg.decode_body(app.conf.accept_content)
    request = build_context(msg.headers, msg.args, msg.kwargs, msg.embed,
                            {"exchange": "", "routing_key": "celery"}, env.properties,
                            "w1@testhost")
    stored = []
    tracer = Tracer(task, request, store=store or (lambda tid, meta: stored.append((tid, meta))))
    return tracer.run(), stored, request


# -- declaring ------------------------------------------------------------------------------


def test_bare_decorator_and_default_name(app):
    @app.task
    def add(x, y):
        return x + y

    assert isinstance(add, Task)
    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert add.app is app
    assert add(2, 3) == 5


def test_decorator_with_empty_parentheses(app):
    @app.task()
    def mul(x, y):
        return x * y

    assert mul.name == f"{__name__}.mul"
    assert mul(2, 3) == 6


def test_task_called_with_function_and_options(app):
    """Celery's ``app.task(fun, name=..., bind=...)`` registers an existing function."""
    def existing(self, x):
        return (self.name, x)

    task = app.task(existing, name="proj.existing", bind=True)
    assert app.tasks["proj.existing"] is task
    assert task(1) == ("proj.existing", 1)


def test_main_module_is_replaced_by_app_main(app):
    def fn():
        return 1

    fn.__module__ = "__main__"
    task = app.task(fn)
    assert task.name == "proj.fn"
    assert app.gen_task_name("add", "__main__") == "proj.add"
    assert app.gen_task_name("add", "proj.tasks") == "proj.tasks.add"


def test_name_override(app):
    @app.task(name="custom.name")
    def fn():
        return "x"

    assert fn.name == "custom.name"
    assert app.tasks["custom.name"] is fn


def test_registry_and_not_registered(app):
    @app.task
    def known():
        return None

    assert known.name in app.tasks
    assert "no.such.task" not in app.tasks
    with pytest.raises(NotRegistered):
        app.tasks["no.such.task"]
    with pytest.raises(KeyError):  # NotRegistered is a KeyError, as in Celery
        app.tasks["no.such.task"]
    assert app.tasks.get("no.such.task") is None


def test_every_spec_option_lands_on_the_task(app):
    options = dict(
        serializer="pickle", compression="zlib", max_retries=7, default_retry_delay=11,
        autoretry_for=(IOError,), dont_autoretry_for=(FileNotFoundError,),
        retry_kwargs={"max_retries": 2}, retry_backoff=3, retry_backoff_max=50,
        retry_jitter=False, rate_limit="10/m", time_limit=30, soft_time_limit=20,
        ignore_result=True, store_errors_even_if_ignored=True, acks_late=True,
        reject_on_worker_lost=True, track_started=True, typing=False, queue="fetches",
        priority=6, expires=120, throws=(KeyError,),
    )

    @app.task(bind=True, **options)
    def fetch(self, url):
        return url

    for key, value in options.items():
        assert getattr(fetch, key) == value, key
    assert fetch._bound is True


def test_unset_options_take_the_app_settings(app):
    app.conf.update(task_acks_late=True, task_time_limit=99, task_default_rate_limit="5/s",
                    task_serializer="json", task_track_started=True)

    @app.task
    def plain():
        return None

    assert plain.acks_late is True
    assert plain.time_limit == 99
    assert plain.rate_limit == "5/s"
    assert plain.track_started is True
    assert plain.max_retries == 3
    assert plain.default_retry_delay == 180


def test_class_based_task_with_base_and_handlers(app):
    calls = []

    class Base(Task):
        def on_success(self, retval, task_id, args, kwargs):
            calls.append(("success", self.name, retval))

    @app.task(base=Base)
    def double(x):
        return x * 2

    assert isinstance(double, Base)
    assert double.apply((4,)).get() == 8
    assert calls == [("success", double.name, 8)]


def test_register_class_based_task(app):
    class Multiply(Task):
        name = "proj.multiply"

        def run(self, x, y):
            return x * y

    task = app.register_task(Multiply)
    assert app.tasks["proj.multiply"] is task
    assert task(3, 4) == 12
    assert task.apply((2, 5)).get() == 10
    task.delay(1, 2)
    with pytest.raises(TypeError):
        task.delay(1)


def test_subclassed_class_tasks_check_their_own_signature(app):
    """A subclass with another ``run`` signature must not reuse its parent's cached one."""
    class Parent(Task):
        name = "proj.parent"

        def run(self, x):
            return x

    class Child(Parent):
        name = "proj.child"

        def run(self, x, y):
            return x + y

    parent = app.register_task(Parent)
    child = app.register_task(Child)
    parent.delay(1)           # caches Parent's signature
    child.delay(1, 2)         # must be accepted: Child.run takes two arguments
    with pytest.raises(TypeError):
        child.delay(1)


def test_bind_gives_self(app):
    @app.task(bind=True)
    def me(self, x):
        return (self is me, self.request.id, x)

    is_self, task_id, x = me.apply((5,), task_id="tid-1").get()
    assert is_self and task_id == "tid-1" and x == 5
    assert me(6)[0] is True


# -- calling inline and eagerly -------------------------------------------------------------


def test_call_runs_inline_without_a_message(app):
    @app.task(bind=True)
    def inline(self, x):
        return (x, self.request.called_directly)

    assert inline(1) == (1, True)
    assert fetch_all(app) == []
    assert app.transport.queue_size("celery") == 0


def test_apply_returns_an_eager_result(app):
    @app.task
    def add(x, y):
        return x + y

    result = add.apply((2, 3))
    assert isinstance(result, EagerResult)
    assert result.get() == 5
    assert result.result == 5
    assert result.state == states.SUCCESS == result.status
    assert result.successful() and result.ready() and not result.failed()
    assert fetch_all(app) == []


def test_apply_failure_propagates_on_get(app):
    @app.task
    def boom():
        raise ValueError("boom")

    result = boom.apply()
    assert result.state == states.FAILURE
    assert result.failed() and not result.successful()
    assert isinstance(result.result, ValueError)
    assert result.traceback and "ValueError: boom" in result.traceback
    with pytest.raises(ValueError, match="boom"):
        result.get()
    assert isinstance(result.get(propagate=False), ValueError)
    with pytest.raises(ValueError):
        boom.apply(throw=True)
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError):
        boom.apply()


def test_apply_request_is_eager(app):
    @app.task(bind=True)
    def req(self, x, y=0):
        r = self.request
        return {"id": r.id, "args": list(r.args), "kwargs": r.kwargs, "eager": r.is_eager,
                "direct": r.called_directly, "retries": r.retries}

    got = req.apply((1,), {"y": 2}, task_id="abc").get()
    assert got == {"id": "abc", "args": [1], "kwargs": {"y": 2}, "eager": True, "direct": False,
                   "retries": 0}


def test_task_always_eager(app):
    app.conf.task_always_eager = True

    @app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 2)
    assert isinstance(result, EagerResult)
    assert result.get() == 4
    assert fetch_all(app) == []


def test_async_def_task(app):
    @app.task
    async def add_later(x, y):
        await asyncio.sleep(0.01)
        return x + y

    assert add_later.apply((1, 2)).get() == 3
    assert add_later(2, 3) == 5


def test_async_bound_task_sees_its_request(app):
    @app.task(bind=True)
    async def who(self):
        await asyncio.sleep(0)
        return self.request.id

    assert who.apply(task_id="async-id").get() == "async-id"


# -- typing ---------------------------------------------------------------------------------


def test_typing_checks_arguments_at_call_site(app):
    @app.task
    def add(x, y):
        return x + y

    with pytest.raises(TypeError):
        add.delay(1)
    with pytest.raises(TypeError):
        add.apply_async((1, 2, 3))
    with pytest.raises(TypeError):
        add.apply_async((1,), {"z": 2})
    with pytest.raises(TypeError):
        add.delay(1, 2, x=3)
    assert fetch_all(app) == []  # nothing was sent


def test_typing_for_bound_task_ignores_self(app):
    @app.task(bind=True)
    def bound(self, x):
        return x

    bound.delay(1)
    with pytest.raises(TypeError):
        bound.delay()
    assert len(fetch_all(app)) == 1


def test_typing_false_disables_the_check(app):
    @app.task(typing=False)
    def loose(x, y):
        return x + y

    loose.delay(1)
    deliveries = fetch_all(app)
    assert len(deliveries) == 1
    assert body_of(deliveries[0].envelope)[0] == [1]


# -- sending --------------------------------------------------------------------------------


def test_delay_puts_one_message_in_the_default_queue(app):
    @app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 3)
    assert isinstance(result, AsyncResult)
    deliveries = fetch_all(app)
    assert len(deliveries) == 1
    env = deliveries[0].envelope
    assert deliveries[0].queue == "celery"
    assert env.headers["task"] == add.name
    assert env.headers["id"] == result.id
    assert env.properties["correlation_id"] == result.id
    assert body_of(env) == [[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                          "chord": None}]
    assert result.state == states.PENDING


def test_apply_async_kwargs_and_task_id(app):
    @app.task
    def add(x, y):
        return x + y

    result = add.apply_async((1,), {"y": 2}, task_id="fixed-id")
    assert result.id == "fixed-id"
    (delivery,) = fetch_all(app)
    assert delivery.envelope.headers["id"] == "fixed-id"
    assert body_of(delivery.envelope)[:2] == [[1], {"y": 2}]
    assert delivery.envelope.headers["kwargsrepr"] == "{'y': 2}"


def test_routed_queue(app):
    app.conf.task_routes = {"*.routed": {"queue": "math"}}

    @app.task
    def routed():
        return None

    routed.delay()
    assert fetch_all(app, "celery") == []
    (delivery,) = fetch_all(app, "math")
    assert delivery.envelope.headers["task"] == routed.name


def test_task_queue_option(app):
    @app.task(queue="slow")
    def slow():
        return None

    slow.delay()
    assert len(fetch_all(app, "slow")) == 1
    slow.apply_async(queue="fast")  # the call beats the task's option
    assert len(fetch_all(app, "fast")) == 1
    assert fetch_all(app, "slow") == []


def test_task_default_queue_setting(app):
    app.conf.task_default_queue = "default-q"

    @app.task
    def t():
        return None

    t.delay()
    assert len(fetch_all(app, "default-q")) == 1


def test_send_task_by_name(app):
    result = app.send_task("remote.only", (1, 2), {"k": "v"})
    assert isinstance(result, AsyncResult)
    (delivery,) = fetch_all(app)
    assert delivery.envelope.headers["task"] == "remote.only"
    assert delivery.envelope.headers["id"] == result.id
    assert body_of(delivery.envelope)[:2] == [[1, 2], {"k": "v"}]
    app.send_task("remote.only", queue="elsewhere")
    assert len(fetch_all(app, "elsewhere")) == 1


def test_per_call_priority(app, published):
    @app.task
    def t(n):
        return n

    t.apply_async((1,), priority=1)
    t.apply_async((9,), priority=9)
    deliveries = fetch_all(app)
    assert [body_of(d.envelope)[0] for d in deliveries] == [[9], [1]]  # higher first
    assert [d.envelope.properties["priority"] for d in deliveries] == [9, 1]
    assert [p[2] for p in published] == [1, 9]


def test_task_priority_option(app):
    @app.task(priority=4)
    def t():
        return None

    t.delay()
    (delivery,) = fetch_all(app)
    assert delivery.envelope.properties["priority"] == 4


def test_per_call_countdown(app, published):
    @app.task
    def t():
        return None

    before = datetime.now(timezone.utc)
    t.apply_async(countdown=30)
    assert fetch_all(app, timeout=0.1) == []        # not deliverable yet
    assert app.transport.queue_size("celery") == 1  # but in the broker
    (queue, env, _, eta_ts) = published[0]
    eta = datetime.fromisoformat(env.headers["eta"])
    assert env.headers["eta"].endswith("+00:00")
    assert before + timedelta(seconds=29) < eta < before + timedelta(seconds=32)
    assert eta_ts == pytest.approx(eta.timestamp())


def test_per_call_eta(app, published):
    @app.task
    def t():
        return None

    when = datetime.now(timezone.utc) + timedelta(hours=1)
    t.apply_async(eta=when)
    env = published[0][1]
    assert datetime.fromisoformat(env.headers["eta"]) == when


def test_per_call_expires(app):
    @app.task
    def t():
        return None

    t.apply_async(expires=60)
    (delivery,) = fetch_all(app)
    env = delivery.envelope
    assert 59_000 <= int(env.properties["expiration"]) <= 60_000
    assert datetime.fromisoformat(env.headers["expires"]) > datetime.now(timezone.utc)


def test_task_expires_option(app):
    @app.task(expires=120)
    def t():
        return None

    t.delay()
    (delivery,) = fetch_all(app)
    assert 119_000 <= int(delivery.envelope.properties["expiration"]) <= 120_000


def test_per_call_headers_and_shadow(app):
    @app.task
    def t():
        return None

    t.apply_async(headers={"x_custom": "hello"}, shadow="alias-name")
    (delivery,) = fetch_all(app)
    h = delivery.envelope.headers
    assert h["x_custom"] == "hello"
    assert h["shadow"] == "alias-name"
    assert h["task"] == t.name


def test_time_limits_serializer_compression_ignore_result_reach_the_message(app):
    app.conf.accept_content = ["json", "pickle"]

    @app.task(time_limit=30, soft_time_limit=20, serializer="pickle", compression="zlib",
              ignore_result=True)
    def t(x):
        return x

    t.delay(1)
    (delivery,) = fetch_all(app)
    env = delivery.envelope
    assert env.headers["timelimit"] == [30, 20]
    assert env.headers["ignore_result"] is True
    assert env.headers["compression"] == "application/x-gzip"
    assert env.content_type == "application/x-python-serialize"
    msg = read_headers(env, ["pickle"])
    msg.decode_body(["pickle"])
    assert msg.args == [1]


def test_link_and_link_error_travel_in_the_body(app):
    @app.task
    def add(x, y):
        return x + y

    @app.task
    def log_result(value):
        return value

    add.apply_async((2, 3), link=log_result.s(), link_error=log_result.si("failed"))
    (delivery,) = fetch_all(app)
    embed = body_of(delivery.envelope)[2]
    assert embed["callbacks"] == [{"task": log_result.name, "args": [], "kwargs": {},
                                   "options": {}, "subtask_type": None, "immutable": False}]
    assert embed["errbacks"][0]["args"] == ["failed"]
    assert embed["errbacks"][0]["immutable"] is True


def test_messages_sent_from_inside_a_task_carry_parent_and_root(app):
    @app.task
    def child():
        return None

    @app.task(bind=True)
    def parent(self):
        child.delay()
        return self.request.id

    parent.apply(task_id="parent-1")
    (delivery,) = fetch_all(app)
    h = delivery.envelope.headers
    assert h["parent_id"] == "parent-1"
    assert h["root_id"] == "parent-1"
    assert h["id"] != "parent-1"


# -- retry ----------------------------------------------------------------------------------


def test_retry_under_apply_reruns_and_counts(app):
    seen = []

    @app.task(bind=True, max_retries=5, default_retry_delay=0)
    def flaky(self, x):
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return x * 10

    result = flaky.apply((4,))
    assert result.get() == 40
    assert result.state == states.SUCCESS
    assert seen == [0, 1, 2]


def test_retry_max_retries_reraises_the_original_exception(app):
    seen = []

    @app.task(bind=True, max_retries=2, default_retry_delay=0)
    def always(self):
        seen.append(self.request.retries)
        raise self.retry(exc=ValueError("original"))

    result = always.apply()
    assert seen == [0, 1, 2]
    assert result.state == states.FAILURE
    with pytest.raises(ValueError, match="original"):
        result.get()


def test_retry_max_retries_without_exc_raises_max_retries_exceeded(app):
    @app.task(bind=True, max_retries=1, default_retry_delay=0)
    def always(self):
        raise self.retry()

    result = always.apply()
    assert result.state == states.FAILURE
    with pytest.raises(MaxRetriesExceededError):
        result.get()


def test_retry_max_retries_per_call(app):
    seen = []

    @app.task(bind=True, max_retries=10, default_retry_delay=0)
    def t(self):
        seen.append(self.request.retries)
        raise self.retry(max_retries=1, exc=KeyError("k"))

    with pytest.raises(KeyError):
        t.apply().get()
    assert seen == [0, 1]


def test_retry_when_called_directly_raises(app):
    @app.task(bind=True)
    def t(self):
        raise self.retry(exc=ValueError("direct"))

    with pytest.raises(ValueError, match="direct"):
        t()


def test_retry_from_a_worker_republishes_the_same_id(app, published):
    @app.task(bind=True, max_retries=3)
    def again(self, x):
        raise self.retry(countdown=5, exc=IOError("later"))

    before = datetime.now(timezone.utc)
    outcome, stored, request = run_traced(app, again, (1,), task_id="r-1", root_id="root-0")
    assert outcome.state == states.RETRY
    assert outcome.retry_when == 5
    (tid, meta), = stored
    assert tid == "r-1" and meta["status"] == states.RETRY and meta["date_done"] is None
    assert meta["result"]["exc_type"] in ("OSError", "IOError")
    assert app.transport.queue_size("celery") == 1
    ((queue, env, _, eta_ts),) = published  # the delayed message itself
    assert queue == "celery" and eta_ts is not None
    h = env.headers
    assert h["id"] == "r-1"
    assert h["retries"] == 1
    assert h["parent_id"] == "r-1"
    assert h["root_id"] == "root-0"
    assert datetime.fromisoformat(h["eta"]) >= before + timedelta(seconds=4)
    assert body_of(env)[0] == [1]


def test_retry_after_max_retries_from_a_worker_fails(app):
    @app.task(bind=True, max_retries=2)
    def again(self):
        raise self.retry(exc=ValueError("enough"))

    outcome, stored, _ = run_traced(app, again, retries=2)
    assert outcome.state == states.FAILURE
    assert stored[0][1]["result"] == {"exc_type": "ValueError", "exc_message": ["enough"],
                                      "exc_module": "builtins"}
    assert app.transport.queue_size("celery") == 0


# -- autoretry and back-off ----------------------------------------------------------------


def test_backoff_countdown_without_jitter():
    assert [backoff_countdown(1, n, 600, False) for n in range(5)] == [1, 2, 4, 8, 16]
    assert [backoff_countdown(3, n, 600, False) for n in range(3)] == [3, 6, 12]
    assert backoff_countdown(1, 20, 600, False) == 600
    assert backoff_countdown(2, 4, 10, False) == 10


def test_backoff_countdown_with_full_jitter(monkeypatch):
    rng = random.Random(42)
    monkeypatch.setattr(random, "randrange", rng.randrange)
    values = [backoff_countdown(1, 5, 600, True) for _ in range(200)]
    assert all(0 <= v <= 32 for v in values)
    assert len(set(values)) > 5
    calls = []
    monkeypatch.setattr(random, "randrange", lambda n: calls.append(n) or n - 1)
    assert backoff_countdown(1, 3, 5, True) == 5
    assert calls == [6]  # randrange(countdown + 1): the cap applies before the jitter


def test_autoretry_under_apply(app):
    seen = []

    @app.task(bind=True, autoretry_for=(KeyError,), max_retries=2, default_retry_delay=0)
    def auto(self):
        seen.append(self.request.retries)
        raise KeyError("missing")

    result = auto.apply()
    assert seen == [0, 1, 2]
    assert result.state == states.FAILURE
    with pytest.raises(KeyError):
        result.get()


def test_autoretry_only_for_listed_exceptions(app):
    seen = []

    @app.task(bind=True, autoretry_for=(KeyError,), dont_autoretry_for=(), max_retries=3)
    def other(self):
        seen.append(self.request.retries)
        raise ValueError("not listed")

    assert other.apply().state == states.FAILURE
    assert seen == [0]


def test_dont_autoretry_for(app):
    seen = []

    @app.task(bind=True, autoretry_for=(OSError,), dont_autoretry_for=(FileNotFoundError,),
              max_retries=3, default_retry_delay=0)
    def t(self):
        seen.append(self.request.retries)
        raise FileNotFoundError("nope")

    assert t.apply().state == states.FAILURE
    assert seen == [0]


def test_autoretry_retry_kwargs(app):
    seen = []

    @app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 1},
              default_retry_delay=0)
    def t(self):
        seen.append(self.request.retries)
        raise KeyError("k")

    assert t.apply().state == states.FAILURE
    assert seen == [0, 1]


@pytest.mark.parametrize("retries,expected", [(0, 3), (1, 6), (2, 12), (3, 20), (6, 20)])
def test_autoretry_backoff_countdown_from_a_worker(app, published, retries, expected):
    @app.task(autoretry_for=(IOError,), retry_backoff=3, retry_backoff_max=20,
              retry_jitter=False, max_retries=10)
    def t():
        raise IOError("flaky")

    outcome, _, _ = run_traced(app, t, retries=retries)
    assert outcome.state == states.RETRY
    assert outcome.retry_when == expected
    ((_, env, _, _),) = published
    assert env.headers["retries"] == retries + 1


def test_autoretry_backoff_true_means_factor_one(app):
    @app.task(autoretry_for=(IOError,), retry_backoff=True, retry_jitter=False)
    def t():
        raise IOError("flaky")

    outcome, _, _ = run_traced(app, t, retries=2)
    assert outcome.retry_when == 4


def test_autoretry_backoff_jitter_stays_below_the_cap(app, monkeypatch):
    calls = []
    monkeypatch.setattr(random, "randrange", lambda n: calls.append(n) or 0)

    @app.task(autoretry_for=(IOError,), retry_backoff=2, retry_backoff_max=100,
              retry_jitter=True, max_retries=10)
    def t():
        raise IOError("flaky")

    outcome, _, _ = run_traced(app, t, retries=3)
    assert calls == [17]
    assert outcome.retry_when == 0


# -- Ignore, Reject and outcomes through the Tracer -----------------------------------------


def test_tracer_success_stores_celery_meta(app):
    @app.task
    def add(x, y):
        return x + y

    outcome, stored, _ = run_traced(app, add, (2, 3), task_id="s-1")
    assert outcome.state == states.SUCCESS
    (tid, meta), = stored
    assert tid == "s-1"
    assert meta["status"] == "SUCCESS" and meta["result"] == 5
    assert meta["traceback"] is None and meta["children"] == []
    assert datetime.fromisoformat(meta["date_done"]).utcoffset() == timedelta(0)
    assert list(meta)[-1] == "task_id" and meta["task_id"] == "s-1"


def test_tracer_failure_stores_celery_exception_meta(app):
    @app.task
    def boom():
        raise ValueError("boom")

    outcome, stored, _ = run_traced(app, boom, task_id="f-1")
    assert outcome.state == states.FAILURE
    meta = stored[0][1]
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["boom"],
                              "exc_module": "builtins"}
    assert "ValueError: boom" in meta["traceback"]


def test_tracer_without_store_returns_the_encoded_meta(app):
    @app.task
    def add(x, y):
        return x + y

    env = build_task_message(add.name, [1, 2], {}, task_id="enc-1")
    msg = read_headers(env, None)
    msg.decode_body(None)
    request = build_context(msg.headers, msg.args, msg.kwargs, msg.embed, {}, env.properties, "w")
    outcome = Tracer(add, request).run()
    assert outcome.state == states.SUCCESS
    meta = json.loads(outcome.meta)
    assert meta["status"] == "SUCCESS" and meta["result"] == 3 and meta["task_id"] == "enc-1"
    assert AsyncResult("enc-1", app=app).state == states.PENDING  # the caller stores it


def test_unserializable_return_value_is_a_failure(app):
    @app.task
    def bad():
        return {1, 2}

    env = build_task_message(bad.name, [], {})
    msg = read_headers(env, None)
    msg.decode_body(None)
    request = build_context(msg.headers, msg.args, msg.kwargs, msg.embed, {}, env.properties, "w")
    outcome = Tracer(bad, request).run()
    assert outcome.state == states.FAILURE
    meta = json.loads(outcome.meta)
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "TypeError"


def test_ignore_stores_nothing(app):
    @app.task
    def skip():
        raise Ignore()

    outcome, stored, _ = run_traced(app, skip)
    assert outcome.state == states.IGNORED
    assert stored == []


@pytest.mark.parametrize("requeue", [True, False])
def test_reject_outcome(app, requeue):
    @app.task
    def no():
        raise Reject("bad input", requeue=requeue)

    outcome, stored, _ = run_traced(app, no)
    assert outcome.state == states.REJECTED
    assert outcome.requeue is requeue
    assert stored == []


def test_ignore_and_reject_under_apply(app):
    @app.task
    def skip():
        raise Ignore()

    @app.task
    def no():
        raise Reject(requeue=False)

    assert skip.apply().state == states.IGNORED
    assert no.apply().state == states.REJECTED


def test_throws_marks_expected_failures(app):
    @app.task(throws=(KeyError,))
    def t():
        raise KeyError("expected")

    outcome, _, _ = run_traced(app, t)
    assert outcome.state == states.FAILURE and outcome.expected is True


def test_ignore_result_stores_nothing_unless_errors_even_if_ignored(app):
    @app.task(ignore_result=True)
    def quiet():
        return 1

    @app.task(ignore_result=True, store_errors_even_if_ignored=True)
    def loud_errors():
        raise ValueError("x")

    assert run_traced(app, quiet)[1] == []
    assert run_traced(app, loud_errors)[1][0][1]["status"] == states.FAILURE


# -- handlers -------------------------------------------------------------------------------


class Recording(Task):
    calls: list = []

    def on_success(self, retval, task_id, args, kwargs):
        self.calls.append(("on_success", retval, task_id, args, kwargs))

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        self.calls.append(("on_failure", exc, task_id, args, kwargs, einfo))

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        self.calls.append(("on_retry", exc, task_id, args, kwargs, einfo))

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        self.calls.append(("after_return", status, retval, task_id, args, kwargs, einfo))


def test_on_success_and_after_return(app):
    calls = []

    @app.task(base=Recording, calls=calls)
    def add(x, y=0):
        return x + y

    add.apply((1,), {"y": 2}, task_id="h-1")
    assert calls == [
        ("on_success", 3, "h-1", (1,), {"y": 2}),
        ("after_return", states.SUCCESS, 3, "h-1", (1,), {"y": 2}, None),
    ]


def test_on_failure_and_after_return(app):
    calls = []

    @app.task(base=Recording, calls=calls)
    def boom(x):
        raise ValueError("bad")

    boom.apply((1,), task_id="h-2")
    (name, exc, task_id, args, kwargs, einfo), after = calls
    assert name == "on_failure" and isinstance(exc, ValueError)
    assert (task_id, args, kwargs) == ("h-2", (1,), {})
    assert einfo.exception is exc and einfo.type is ValueError
    assert "ValueError: bad" in einfo.traceback
    assert after[0] == "after_return" and after[1] == states.FAILURE
    assert after[2] is exc and after[3] == "h-2" and after[6] is einfo


def test_on_retry_from_a_worker(app):
    calls = []

    @app.task(base=Recording, calls=calls, bind=True)
    def again(self, x):
        raise self.retry(exc=KeyError("k"), countdown=60)

    outcome, _, _ = run_traced(app, again, (7,), task_id="h-3")
    assert outcome.state == states.RETRY
    on_retry = [c for c in calls if c[0] == "on_retry"]
    assert len(on_retry) == 1
    _, exc, task_id, args, kwargs, einfo = on_retry[0]
    assert isinstance(exc, KeyError) and task_id == "h-3" and args == (7,) and kwargs == {}
    assert einfo.exception is exc
    assert not [c for c in calls if c[0] in ("on_success", "on_failure")]


def test_eager_retries_that_run_out_call_on_retry_per_retry_and_on_failure_once(app):
    """Under apply(), a task that retries twice and then fails has been retried twice and
    has failed once, as in a worker (and in Celery): on_retry x2, on_failure x1."""
    calls = []

    @app.task(base=Recording, calls=calls, bind=True, max_retries=2, default_retry_delay=0)
    def always(self):
        raise self.retry(exc=ValueError("x"))

    assert always.apply().state == states.FAILURE
    names = [c[0] for c in calls]
    assert names.count("on_failure") == 1, names
    assert names.count("on_retry") == 2, names


def test_eager_autoretry_that_runs_out_calls_on_failure_once(app):
    calls = []

    @app.task(base=Recording, calls=calls, autoretry_for=(KeyError,), max_retries=2,
              default_retry_delay=0)
    def auto():
        raise KeyError("k")

    assert auto.apply().state == states.FAILURE
    names = [c[0] for c in calls]
    assert names.count("on_failure") == 1, names
    assert names.count("on_retry") == 2, names


def test_eager_retry_that_succeeds_calls_on_retry_then_on_success(app):
    calls = []

    @app.task(base=Recording, calls=calls, bind=True, max_retries=5, default_retry_delay=0)
    def flaky(self):
        if self.request.retries < 2:
            raise self.retry(exc=IOError("again"))
        return "ok"

    assert flaky.apply().get() == "ok"
    names = [c[0] for c in calls]
    assert names.count("on_retry") == 2
    assert names.count("on_success") == 1
    assert "on_failure" not in names


def test_handlers_from_a_worker(app):
    calls = []

    @app.task(base=Recording, calls=calls)
    def add(x, y):
        return x + y

    run_traced(app, add, (1, 2), task_id="h-4")
    assert calls[0] == ("on_success", 3, "h-4", (1, 2), {})
    assert calls[1][:2] == ("after_return", states.SUCCESS)


# -- update_state and custom states ---------------------------------------------------------


def test_update_state_custom_state(app):
    @app.task(bind=True)
    def progress(self, total):
        self.update_state(state="PROGRESS", meta={"current": 1, "total": total})
        return self.request.id

    task_id = progress.apply((10,)).get()
    result = AsyncResult(task_id, app=app)
    assert result.state == "PROGRESS"
    assert result.info == {"current": 1, "total": 10}
    assert not result.ready()
    assert app.AsyncResult(task_id).status == "PROGRESS"


def test_update_state_for_another_task(app):
    @app.task(bind=True)
    def reporter(self, other):
        self.update_state(task_id=other, state="PROGRESS", meta={"done": 50})

    reporter("someone-else")
    assert AsyncResult("someone-else", app=app).state == "PROGRESS"
    assert AsyncResult("someone-else", app=app).info == {"done": 50}


# -- task logger ----------------------------------------------------------------------------


def test_task_logger_records_carry_task_name_and_id(app, caplog):
    logger = get_task_logger(__name__)

    @app.task
    def chatty():
        logger.warning("inside the task")

    caplog.set_level(logging.INFO)
    chatty.apply(task_id="log-1")
    logger.warning("outside any task")
    inside = [r for r in caplog.records if r.getMessage() == "inside the task"]
    outside = [r for r in caplog.records if r.getMessage() == "outside any task"]
    assert len(inside) == 1 and len(outside) == 1
    assert inside[0].task_name == chatty.name
    assert inside[0].task_id == "log-1"
    assert outside[0].task_name == "???" and outside[0].task_id == "???"
    assert logger.name.startswith("qctl.task")
    assert get_task_logger(__name__) is logger


def test_task_logger_in_a_worker_trace(app, caplog):
    logger = get_task_logger("proj.tasks")

    @app.task
    def chatty():
        logger.warning("traced")

    caplog.set_level(logging.INFO)
    run_traced(app, chatty, task_id="log-2")
    (record,) = [r for r in caplog.records if r.getMessage() == "traced"]
    assert (record.task_name, record.task_id) == (chatty.name, "log-2")


# -- annotations ----------------------------------------------------------------------------


def test_task_annotations_dict(app):
    app.conf.task_annotations = {f"{__name__}.annotated": {"rate_limit": "10/s",
                                                           "max_retries": 9}}

    @app.task
    def annotated():
        return None

    @app.task
    def other():
        return None

    assert annotated.rate_limit == "10/s" and annotated.max_retries == 9
    assert other.rate_limit is None and other.max_retries == 3


def test_task_annotations_wildcard_and_list(app):
    app.conf.task_annotations = [{"*": {"acks_late": True}},
                                 {f"{__name__}.special": {"time_limit": 5}}]

    @app.task
    def special():
        return None

    assert special.acks_late is True
    assert special.time_limit == 5


def test_task_annotations_callable(app):
    def annotate(task):
        if task.name.endswith(".slow"):
            return {"rate_limit": "1/m", "soft_time_limit": 3}
        return None

    app.conf.task_annotations = annotate

    @app.task
    def slow():
        return None

    @app.task
    def fast():
        return None

    assert slow.rate_limit == "1/m" and slow.soft_time_limit == 3
    assert fast.rate_limit is None


def test_annotations_override_decorator_options(app):
    app.conf.task_annotations = {"*": {"max_retries": 1}}

    @app.task(max_retries=8)
    def t():
        return None

    assert t.max_retries == 1


# -- publish retry policy -------------------------------------------------------------------


@pytest.fixture
def broken_app(tmp_path):
    """An app whose broker cannot take messages: a sqlite file in a missing directory."""
    url = f"sqlite:///{tmp_path}/does-not-exist/sub/broker.db"
    application = App("proj", broker=url, backend=f"memory://broken-{uuid.uuid4().hex}",
                      set_as_current=False)
    yield application
    application.close()


def count_publishes(application, monkeypatch):
    calls = []
    transport = application.transport
    real = transport.publish

    def counting(*args, **kwargs):
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(transport, "publish", counting)
    return calls


def test_publish_retry_policy_then_operational_error(broken_app, monkeypatch):
    broken_app.conf.task_publish_retry_policy = {"max_retries": 2, "interval_start": 0,
                                                 "interval_step": 0.05, "interval_max": 0.05}

    @broken_app.task
    def t():
        return None

    calls = count_publishes(broken_app, monkeypatch)
    with pytest.raises(OperationalError):
        t.delay()
    assert len(calls) == 3  # one try and two retries


def test_publish_retry_intervals(broken_app, monkeypatch):
    broken_app.conf.task_publish_retry_policy = {"max_retries": 3, "interval_start": 0.1,
                                                 "interval_step": 0.1, "interval_max": 0.15}

    @broken_app.task
    def t():
        return None

    calls = count_publishes(broken_app, monkeypatch)
    with pytest.raises(OperationalError):
        t.delay()
    assert len(calls) == 4
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.09
    assert gaps[1] >= 0.14 and gaps[2] >= 0.14
    assert max(gaps) < 1.0


def test_publish_retry_disabled(broken_app, monkeypatch):
    @broken_app.task
    def t():
        return None

    calls = count_publishes(broken_app, monkeypatch)
    with pytest.raises(OperationalError):
        t.apply_async(retry=False)
    assert len(calls) == 1
    broken_app.conf.task_publish_retry = False
    with pytest.raises(OperationalError):
        broken_app.send_task("x.y")
    assert len(calls) == 2


def test_publish_retry_policy_per_call(broken_app, monkeypatch):
    @broken_app.task
    def t():
        return None

    calls = count_publishes(broken_app, monkeypatch)
    with pytest.raises(OperationalError):
        t.apply_async(retry_policy={"max_retries": 1, "interval_start": 0})
    assert len(calls) == 2


def test_broken_broker_error_is_a_clean_operational_error(broken_app):
    @broken_app.task
    def t():
        return None

    broken_app.conf.task_publish_retry_policy = {"max_retries": 0}
    with pytest.raises(OperationalError) as info:
        t.delay()
    assert "does-not-exist" in str(info.value)
