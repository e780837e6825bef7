"""The worker side of workflows (``qctl.followups`` and its call sites in ``qctl.trace``).

Two kinds of tests, both on a private ``memory://`` broker and result store:

- the follow-up functions called directly with a request built as the worker builds it,
  then the messages they sent read back from the broker (nothing consumes them);
- chords run by a real worker embedded in this process (threads pool): the header tasks
  are sent as the contract's client sends them (``chord_set_size``, then each task with
  ``group_id``, ``group_index`` and ``chord=<body dict>``), so these tests do not depend on
  the client's ``chord`` class.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from qctl import App, states
from qctl.canvas import Signature
from qctl.exceptions import ChordError
from qctl.followups import (errbacks_of, fail_chord, final_result_ids, on_chord_part_return,
                            send_next_step)
from qctl.protocol import read_headers
from qctl.result import AsyncResult
from qctl.trace import Tracer, build_context
from qctl_worker.worker import Worker
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)
GET = 20


@pytest.fixture
def app():
    url = f"memory://{uuid.uuid4().hex}"
    app = App("flw", broker=url, backend=url, set_as_current=False)
    app.runs = []
    app.lock = threading.Lock()

    def record(kind, task_id, **fields):
        with app.lock:
            app.runs.append({"kind": kind, "id": task_id, **fields})

    @app.task(name="f.add")
    def add(x, y):
        return x + y

    @app.task(name="f.delayed")
    def delayed(value, seconds=0.0):
        time.sleep(seconds)
        return value

    @app.task(name="f.collect", bind=True)
    def collect(self, values):
        record("collect", self.request.id, values=values, group=self.request.group,
               parent_id=self.request.parent_id)
        return values

    @app.task(name="f.fail")
    def fail(*args):
        raise KeyError("missing")

    @app.task(name="f.retry_once", bind=True, max_retries=3)
    def retry_once(self, value):
        record("retry_once", self.request.id, retries=self.request.retries)
        if self.request.retries < 1:
            raise self.retry(countdown=0.05)
        return value

    @app.task(name="f.errback_request")
    def errback_request(request, exc, traceback):
        record("errback_request", request.id, exc=exc, request=request)

    @app.task(name="f.errback_raising")
    def errback_raising(request, exc, traceback):
        record("errback_raising", request.id)
        raise RuntimeError("errback broke")

    @app.task(name="f.errback_id", bind=True)
    def errback_id(self, failed_id):
        record("errback_id", self.request.id, failed_id=failed_id)

    return app


def runs(app, kind):
    with app.lock:
        return [run for run in app.runs if run["kind"] == kind]


@pytest.fixture
def worker(app):
    node = Worker(app, pool="threads", concurrency=4, quiet=True, hostname="flw@%h")
    node.start()
    yield node
    node.stop()


def sent(app, count, timeout=5.0):
    """The next ``count`` task messages on the default queue, decoded (and acknowledged)."""
    found = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        for delivery in app.transport.fetch(["celery"], count - len(found), 0.1):
            message = read_headers(delivery.envelope, ["json"])
            message.decode_body(["json"])
            found.append(message)
            app.transport.ack([delivery.tag])
    assert len(found) == count, f"{len(found)} of {count} messages sent"
    return found


def request_for(headers=None, embed=None, args=(), kwargs=None):
    """A request as the worker builds it from a message's headers and body."""
    base = {"id": str(uuid.uuid4()), "task": "f.add", "root_id": None}
    base.update(headers or {})
    base["root_id"] = base["root_id"] or base["id"]
    return build_context(base, list(args), kwargs or {}, embed or {}, {}, {}, "flw@test")


def sig(name, *args, **options):
    return Signature(name, args, {}, options)


# -- chain steps ----------------------------------------------------------------------------

def test_next_step_gets_the_value_and_the_rest_of_the_chain(app):
    b = sig("f.add", 10, task_id="b-id")
    c = sig("f.add", 100, task_id="c-id")
    request = request_for({"root_id": "root-1"}, {"chain": [dict(c), dict(b)]})
    send_next_step(app, request, 5)
    (message,) = sent(app, 1)
    assert message.id == "b-id" and message.args == [5, 10]
    assert message.headers["parent_id"] == request.id and message.headers["root_id"] == "root-1"
    assert message.embed["chain"] == [dict(c)]
    # That step, run in turn, sends the last one, which carries no chain.
    send_next_step(app, request_for({"id": "b-id", "root_id": "root-1"}, message.embed), 15)
    (last,) = sent(app, 1)
    assert last.id == "c-id" and last.args == [15, 100] and not last.embed["chain"]
    assert last.headers["parent_id"] == "b-id" and last.headers["root_id"] == "root-1"


def test_an_immutable_step_ignores_the_value(app):
    step = Signature("f.add", (1, 2), {}, {"task_id": "imm"}, immutable=True)
    send_next_step(app, request_for(embed={"chain": [dict(step)]}), 99)
    (message,) = sent(app, 1)
    assert message.id == "imm" and message.args == [1, 2]


def test_a_nested_chain_step_is_unrolled_into_the_chain(app):
    inner = {"task": "celery.chain", "args": [], "kwargs": {"tasks": [
        dict(sig("f.add", 1, task_id="i1")), dict(sig("f.add", 2, task_id="i2"))]},
        "options": {}, "subtask_type": "chain", "immutable": False}
    after = sig("f.add", 3, task_id="after")
    send_next_step(app, request_for(embed={"chain": [dict(after), inner]}), 7)
    (message,) = sent(app, 1)
    assert message.id == "i1" and message.args == [7, 1]
    assert [step["options"]["task_id"] for step in message.embed["chain"]] == ["after", "i2"]


def test_a_group_step_is_applied_whole_with_the_value(app):
    from qctl.canvas import group
    step = group(sig("f.add", 1), sig("f.add", 2), app=app)
    send_next_step(app, request_for({"root_id": "root-g"}, {"chain": [dict(step)]}), 10)
    members = sorted(sent(app, 2), key=lambda m: m.headers["group_index"])
    assert [m.args for m in members] == [[10, 1], [10, 2]]
    assert len({m.headers["group"] for m in members}) == 1 and members[0].headers["group"]
    assert all(not m.embed.get("chain") and not m.embed.get("chord") for m in members)


def test_a_chord_step_is_applied_whole_with_the_value(app):
    from qctl.canvas import chord
    body = sig("f.collect", task_id="body-id")
    step = chord([sig("f.add", 1), sig("f.add", 2)], body, app=app)
    send_next_step(app, request_for({"root_id": "root-c"}, {"chain": [dict(step)]}), 10)
    members = sorted(sent(app, 2), key=lambda m: m.headers["group_index"])
    assert [m.args for m in members] == [[10, 1], [10, 2]]
    gid = members[0].headers["group"]
    assert all(m.embed["chord"]["options"]["task_id"] == "body-id" for m in members)
    assert all(m.embed["chord"]["options"]["group_id"] == gid for m in members)


# -- which ids a chord's failure is stored under, and whose errbacks run ---------------------

def test_final_result_ids_of_each_kind_of_body():
    plain = dict(sig("f.collect", task_id="p"))
    chain = {"task": "celery.chain", "kwargs": {"tasks": [dict(sig("f.add", task_id="c1")),
                                                         dict(sig("f.add", task_id="c2"))]},
             "options": {}, "subtask_type": "chain"}
    group = {"task": "celery.group", "kwargs": {"tasks": [plain, chain]}, "options": {},
             "subtask_type": "group"}
    chord = {"task": "celery.chord", "kwargs": {"header": group, "body": chain}, "options": {},
             "subtask_type": "chord"}
    assert final_result_ids(plain) == ["p"]
    assert final_result_ids(chain) == ["c2"]
    assert final_result_ids(group) == ["p", "c2"]
    assert final_result_ids(chord) == ["c2"]
    assert final_result_ids(dict(sig("f.collect"))) == []


def test_errbacks_of_a_chain_body_include_its_steps_without_repeats():
    on_err = dict(sig("f.errback_id"))
    other = dict(sig("f.errback_request"))
    chain = {"task": "celery.chain", "subtask_type": "chain", "options": {"link_error": [on_err]},
             "kwargs": {"tasks": [dict(sig("f.add", link_error=[on_err])),
                                  dict(sig("f.add", link_error=[other]))]}}
    assert errbacks_of(chain) == [on_err, other]
    assert errbacks_of(dict(sig("f.add", link_error=on_err))) == [on_err]


def test_fail_chord_with_a_chain_body_stores_chord_error_under_its_last_task(app):
    chain = {"task": "celery.chain", "args": [], "subtask_type": "chain", "immutable": False,
             "options": {"group_id": "g-1"},
             "kwargs": {"tasks": [dict(sig("f.add", task_id="c1", group_id="g-1")),
                                  dict(sig("f.add", task_id="c2",
                                           link_error=[dict(sig("f.errback_request")),
                                                       dict(sig("f.errback_id"))]))]}}
    header = request_for({"group": "g-1", "root_id": "root-h"})
    fail_chord(app, chain, ChordError("Dependency x raised KeyError('k')"), header)
    meta = app.backend.get_task_meta("c2")
    assert meta["status"] == states.FAILURE
    assert meta["result"] == {"exc_type": "ChordError", "exc_module": "celery.exceptions",
                              "exc_message": ["Dependency x raised KeyError('k')"]}
    assert meta["group_id"] == "g-1" and meta["parent_id"] == header.id
    assert app.backend.get_task_meta("c1")["status"] == states.PENDING
    with pytest.raises(ChordError, match="Dependency x raised"):
        AsyncResult("c2", app=app).get(timeout=GET)
    # The errback taking (request, exc, traceback) ran here, on behalf of the body...
    (inline,) = runs(app, "errback_request")
    assert inline["id"] == "c2" and isinstance(inline["exc"], ChordError)
    assert inline["request"].root_id == "root-h"
    # ... and the other was sent with the body's id.
    (message,) = sent(app, 1)
    assert message.name == "f.errback_id" and message.args == ["c2"]
    assert message.headers["root_id"] == "root-h"


def test_a_body_that_cannot_be_sent_fails_the_chord(app):
    app.conf.task_create_missing_queues = False
    gid = str(uuid.uuid4())
    body = sig("f.collect", task_id="unsendable", group_id=gid, queue="no-such-queue")
    app.backend.chord_set_size(gid, 1)
    request = request_for({"group": gid, "group_index": 0}, {"chord": dict(body)})
    on_chord_part_return(app, request, states.SUCCESS, 1)
    meta = app.backend.get_task_meta("unsendable")
    assert meta["status"] == states.FAILURE and meta["result"]["exc_type"] == "ChordError"
    assert meta["result"]["exc_message"][0].startswith("Callback error: QueueNotFound(")
    # Counted and cleaned up: reporting again does not retry the body.
    assert app.backend.chord_part_return(gid, request.id, 0, states.SUCCESS, 1) is None


def test_a_part_that_does_not_complete_the_chord_sends_nothing(app):
    gid = str(uuid.uuid4())
    body = sig("f.collect", task_id="waiting", group_id=gid)
    app.backend.chord_set_size(gid, 2)
    on_chord_part_return(app, request_for({"group": gid, "group_index": 0}, {"chord": dict(body)}),
                         states.FAILURE, {"exc_type": "KeyError", "exc_message": ["k"],
                                          "exc_module": "builtins"})
    assert app.transport.queue_size("celery") == 0
    assert app.backend.get_task_meta("waiting")["status"] == states.PENDING


# -- the tracer's call sites, as a pool runs them ---------------------------------------------

def header_request(app, name, args, body_id="body-id"):
    gid = str(uuid.uuid4())
    body = sig("f.collect", task_id=body_id, group_id=gid)
    app.backend.chord_set_size(gid, 1)
    request = request_for({"task": name, "group": gid, "group_index": 0}, {"chord": dict(body)},
                          args=args)
    return gid, request


def test_a_header_result_is_stored_before_the_body_is_sent(app):
    gid, request = header_request(app, "f.add", (2, 3))
    outcome = Tracer(app.tasks["f.add"], request).run()
    # Stored here, in the pool, not left to the worker's main process: a client that sees
    # the body's result can already read every header result.
    assert outcome.state == states.SUCCESS and outcome.meta is None
    assert app.backend.get_task_meta(request.id)["result"] == 5
    (body,) = sent(app, 1)
    assert body.id == "body-id" and body.args == [[5]]
    assert body.headers["group"] == gid and body.headers["parent_id"] == request.id
    assert body.headers["root_id"] == request.root_id


def test_a_failed_header_task_is_stored_then_fails_the_chord(app):
    gid, request = header_request(app, "f.fail", ())
    outcome = Tracer(app.tasks["f.fail"], request).run()
    assert outcome.state == states.FAILURE and outcome.meta is None
    assert app.backend.get_task_meta(request.id)["status"] == states.FAILURE
    meta = app.backend.get_task_meta("body-id")
    assert meta["status"] == states.FAILURE
    assert meta["result"]["exc_message"] == [f"Dependency {request.id} raised KeyError('missing')"]
    assert app.transport.queue_size("celery") == 0


def test_a_retrying_header_task_does_not_count(app):
    gid, request = header_request(app, "f.retry_once", ("x",))
    outcome = Tracer(app.tasks["f.retry_once"], request).run()
    assert outcome.state == states.RETRY
    (again,) = sent(app, 1)
    assert again.id == request.id and again.embed["chord"]["options"]["task_id"] == "body-id"
    assert app.backend.get_task_meta("body-id")["status"] == states.PENDING
    # The run after the retry is the one that completes the chord.
    retried = request_for(again.headers, again.embed, again.args)
    assert Tracer(app.tasks["f.retry_once"], retried).run().state == states.SUCCESS
    (body,) = sent(app, 1)
    assert body.id == "body-id" and body.args == [["x"]]


def test_a_next_step_that_cannot_be_sent_fails_the_task_not_its_process(app):
    app.conf.task_create_missing_queues = False
    step = sig("f.add", 1, task_id="unsendable", queue="no-such-queue")
    request = request_for({"task": "f.add"}, {"chain": [dict(step)]}, args=(1, 2))
    outcome = Tracer(app.tasks["f.add"], request).run()
    assert outcome.state == states.FAILURE and outcome.summary.startswith("QueueNotFound(")
    assert app.backend.decode(outcome.meta)["result"]["exc_type"] == "QueueNotFound"


def test_an_errback_that_raises_neither_changes_the_outcome_nor_stops_the_others(app):
    errbacks = [dict(sig("f.errback_raising")), dict(sig("f.errback_id"))]
    request = request_for({"task": "f.fail"}, {"errbacks": errbacks})
    outcome = Tracer(app.tasks["f.fail"], request).run()
    assert outcome.state == states.FAILURE and outcome.summary == "KeyError('missing')"
    assert [run["id"] for run in runs(app, "errback_raising")] == [request.id]
    (message,) = sent(app, 1)
    assert message.name == "f.errback_id" and message.args == [request.id]


# -- chords run by a real worker --------------------------------------------------------------

def send_chord(app, header, body):
    """Send a chord the way the client does; returns (group id, header ids, body id)."""
    gid, body_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = body.clone(task_id=body_id, group_id=gid)
    app.backend.chord_set_size(gid, len(header))
    ids = []
    for index, (name, args, options) in enumerate(header):
        ids.append(app.send_task(name, args, group_id=gid, group_index=index,
                                 chord=dict(body), **options).id)
    return gid, ids, body_id


def test_chord_body_runs_once_with_the_header_results_in_order(app, worker):
    # Later header tasks finish first.
    header = [("f.delayed", (i,), {"kwargs": {"seconds": 0.02 * (6 - i)}}) for i in range(6)]
    gid, ids, body_id = send_chord(app, header, sig("f.collect"))
    assert AsyncResult(body_id, app=app).get(timeout=GET) == list(range(6))
    # Every header result was stored before the body was sent.
    assert [AsyncResult(i, app=app).state for i in ids] == [states.SUCCESS] * 6
    (body,) = runs(app, "collect")
    assert body["id"] == body_id and body["group"] == gid and body["parent_id"] in ids
    meta = app.backend.get_task_meta(body_id)
    assert meta["group_id"] == gid and meta["parent_id"] in ids


def test_a_failed_header_task_fails_the_chord_and_calls_the_body_errbacks(app, worker):
    body = sig("f.collect", link_error=[dict(sig("f.errback_request")), dict(sig("f.errback_id"))])
    header = [("f.add", (1, 1), {}), ("f.fail", (), {}), ("f.add", (2, 2), {})]
    gid, ids, body_id = send_chord(app, header, body)
    result = AsyncResult(body_id, app=app)
    with pytest.raises(ChordError) as info:
        result.get(timeout=GET)
    assert str(info.value) == f"Dependency {ids[1]} raised KeyError('missing')"
    assert app.backend.get_task_meta(body_id)["result"]["exc_module"] == "celery.exceptions"
    (inline,) = runs(app, "errback_request")
    assert inline["id"] == body_id and isinstance(inline["exc"], ChordError)
    (sent_errback,) = wait_for(lambda: runs(app, "errback_id"), 10)
    assert sent_errback["failed_id"] == body_id
    assert runs(app, "collect") == []
    assert AsyncResult(ids[1], app=app).state == states.FAILURE


def test_a_retry_is_not_a_final_part(app, worker):
    header = [("f.retry_once", ("late",), {}), ("f.add", (1, 2), {})]
    gid, ids, body_id = send_chord(app, header, sig("f.collect"))
    assert AsyncResult(body_id, app=app).get(timeout=GET) == ["late", 3]
    assert [run["retries"] for run in runs(app, "retry_once")] == [0, 1]
    assert len(runs(app, "collect")) == 1


def test_a_header_task_revoked_before_it_runs_fails_the_chord(app, worker):
    header = [("f.add", (1, 1), {}), ("f.add", (2, 2), {"expires": -1})]
    gid, ids, body_id = send_chord(app, header, sig("f.collect"))
    with pytest.raises(ChordError) as info:
        AsyncResult(body_id, app=app).get(timeout=GET)
    assert str(info.value) == f"Dependency {ids[1]} raised TaskRevokedError('expired')"
    assert runs(app, "collect") == []
