"""The canvas on the client: signatures, partial application, chain/group/chord/chunks/map,
freezing ids, eager ``apply()``, ``|``, dict round trips and GroupResult.

Everything runs in this process on ``memory://`` (a real transport and result store): what
``apply_async`` sends is read back from the broker, results a worker would store are stored
with the backend's own ``store_result``. The message shapes themselves are checked against
Celery's in test_canvas_wire.py.
"""
from __future__ import annotations

import json
import pickle
import uuid

import pytest

from qctl import (App, AsyncResult, EagerResult, GroupResult, Signature, chain, chord, chunks,
                  group, maybe_signature, signature, states)
from qctl.canvas_group import xstarmap
from qctl.exceptions import ChordError, ImproperlyConfigured, TaskRevokedError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app():
    """An app on its own memory broker and result store (memory URLs are process-wide)."""
    name = uuid.uuid4().hex[:12]
    application = App("proj", broker=f"memory://canvas-{name}", backend=f"memory://canvas-results-{name}")

    @application.task(name="proj.add")
    def add(x, y):
        return x + y

    @application.task(name="proj.mul")
    def mul(x, y):
        return x * y

    @application.task(name="proj.double")
    def double(x):
        return x * 2

    @application.task(name="proj.tsum")
    def tsum(values):
        return sum(values)

    @application.task(name="proj.fail")
    def fail(*args):
        raise ValueError("boom")

    @application.task(name="proj.echo")
    def echo(*args, **kwargs):
        return [list(args), kwargs]

    yield application
    application.close()


def tasks(app):
    t = app.tasks
    return t["proj.add"], t["proj.tsum"], t["proj.fail"]


def sent(app, queue="celery"):
    """Every message now deliverable on ``queue``, in publish order, as
    ``(headers, args, kwargs, embed)``."""
    deliveries = app.transport.fetch([queue], 1000, 0.2)
    app.transport.ack([d.tag for d in deliveries])
    out = []
    for d in deliveries:
        args, kwargs, embed = json.loads(d.envelope.body)
        out.append((d.envelope.headers, args, kwargs, embed))
    return out


def store(app, task_id, value, status=states.SUCCESS):
    """Store a result the way a worker does."""
    if isinstance(value, BaseException):
        from qctl.result import exception_to_meta
        value = exception_to_meta(value)
    app.backend.store_result(task_id, {"status": status, "result": value, "traceback": None,
                                       "children": [], "date_done": "2026-01-01T00:00:00+00:00",
                                       "task_id": task_id})


# -- Signature ----------------------------------------------------------------------------


def test_task_s_builds_celerys_dict(app):
    add, _, _ = tasks(app)
    sig = add.s(2, y=3)
    assert dict(sig) == {"task": "proj.add", "args": [2], "kwargs": {"y": 3}, "options": {},
                         "subtask_type": None, "immutable": False}
    assert list(sig) == ["task", "args", "kwargs", "options", "subtask_type", "immutable"]
    assert sig.args == (2,) and sig.kwargs == {"y": 3} and sig.name == "proj.add"
    assert sig.type is add and sig.app is app


def test_signature_forms_agree(app):
    add, _, _ = tasks(app)
    by_task = add.signature((2,), {"y": 3}, countdown=10, queue="q")
    by_name = signature("proj.add", (2,), {"y": 3}, countdown=10, queue="q", app=app)
    by_app = app.signature("proj.add", (2,), {"y": 3}, countdown=10, queue="q")
    assert by_task == by_name == by_app
    assert by_task.options == {"countdown": 10, "queue": "q"}
    assert add.si(1, 2).immutable is True and add.s(1, 2).immutable is False


def test_partial_args_are_prepended_kwargs_merged_options_overridden(app):
    add, _, _ = tasks(app)
    echo = app.tasks["proj.echo"]
    echo.s(2, a=1, b=1).set(queue="q1").apply_async((1,), {"b": 2}, queue="q2")
    ((headers, args, kwargs, _),) = sent(app, "q2")
    assert args == [1, 2] and kwargs == {"a": 1, "b": 2}
    assert sent(app, "q1") == []
    add.s(2).delay(1)
    ((_, args, _, _),) = sent(app)
    assert args == [1, 2]


def test_immutable_signature_keeps_its_arguments_but_takes_options(app):
    echo = app.tasks["proj.echo"]
    sig = echo.si(5, k=1)
    sig.apply_async((1, 2), {"k": 2, "x": 3}, queue="other")
    ((_, args, kwargs, _),) = sent(app, "other")
    assert args == [5] and kwargs == {"k": 1}
    clone = sig.clone((9,), {"x": 1}, countdown=3)
    assert clone.args == (5,) and clone.kwargs == {"k": 1} and clone.options == {"countdown": 3}
    assert sig(7, x=1) == [[5], {"k": 1}]


def test_clone_is_independent_and_partial(app):
    add, _, _ = tasks(app)
    sig = add.s(2).set(link=[add.s(1)])
    clone = sig.clone((1,), queue="q")
    assert clone.args == (1, 2) and clone.options["queue"] == "q"
    clone.options["link"].append(add.s(3))
    clone.options["link"][0]["args"].append(99)
    assert sig.args == (2,) and "queue" not in sig.options
    assert sig.options["link"] == [add.s(1)]
    assert clone.app is app and clone.type is add


def test_set_updates_in_place_and_returns_the_signature(app):
    add, _, _ = tasks(app)
    sig = add.s(1, 1)
    assert sig.set(queue="q", countdown=5) is sig
    assert sig.options == {"queue": "q", "countdown": 5}
    sig.set(immutable=True)
    assert sig.immutable
    replaced = sig.replace(args=(4, 4))
    assert replaced.args == (4, 4) and sig.args == (1, 1)


def test_inline_call_runs_in_process_without_a_message(app):
    add, _, _ = tasks(app)
    assert add.s(2)(3) == 5
    assert add.s(y=10)(1) == 11
    assert sent(app) == []


def test_delay_returns_the_async_result_of_the_sent_message(app):
    add, _, _ = tasks(app)
    result = add.s(1).delay(2)
    ((headers, args, _, _),) = sent(app)
    assert isinstance(result, AsyncResult) and result.id == headers["id"]
    assert args == [2, 1]


def test_freeze_pre_assigns_the_id_apply_async_uses_and_is_idempotent(app):
    add, _, _ = tasks(app)
    sig = add.s(1, 1)
    frozen = sig.freeze()
    assert sig.freeze().id == frozen.id == sig.id
    assert sig.freeze("explicit").id == "explicit"
    result = sig.apply_async()
    ((headers, _, _, _),) = sent(app)
    assert result.id == headers["id"] == "explicit"


def test_signature_of_an_unregistered_task_is_sent_by_name(app):
    result = signature("elsewhere.task", (1,), app=app).delay(2)
    ((headers, args, _, _),) = sent(app)
    assert headers["task"] == "elsewhere.task" and args == [2, 1] and result.id == headers["id"]


def test_link_and_link_error_accept_one_or_a_list(app):
    add, _, fail = tasks(app)
    add.apply_async((1, 1), link=add.s(1), link_error=[fail.s(), add.si(0, 0)])
    ((_, _, _, embed),) = sent(app)
    assert embed["callbacks"] == [dict(add.s(1))]
    assert embed["errbacks"] == [dict(fail.s()), dict(add.si(0, 0))]
    sig = add.s(1, 1)
    sig.link(add.s(2))
    sig.link(add.s(2))  # the same callback is not added twice
    sig.on_error(fail.s())
    sig.delay()
    ((_, _, _, embed),) = sent(app)
    assert embed["callbacks"] == [dict(add.s(2))] and embed["errbacks"] == [dict(fail.s())]


def test_eager_apply_of_a_signature(app):
    add, _, fail = tasks(app)
    result = add.s(2).apply((3,))
    assert isinstance(result, EagerResult) and result.get() == 5
    failed = fail.s().apply()
    assert failed.failed()
    with pytest.raises(ValueError, match="boom"):
        failed.get()
    assert sent(app) == []


# -- dict forms ---------------------------------------------------------------------------


def every_kind(app):
    add, tsum, _ = tasks(app)
    return [add.s(1, 2), add.si(1, 2).set(queue="q"),
            chain(add.s(1, 1), add.s(2)), group(add.s(1, 1), add.s(2, 2)),
            chord([add.s(1, 1), add.s(2, 2)], tsum.s()),
            chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s(), add.s(3)),
            add.chunks([(1, 1), (2, 2), (3, 3)], 2), add.map([1, 2]), add.starmap([(1, 2)])]


def test_json_round_trip_gives_back_the_same_class_and_dict(app):
    for sig in every_kind(app):
        data = json.loads(json.dumps(sig))
        back = maybe_signature(data, app)
        assert type(back) is type(sig), sig
        assert back == json.loads(json.dumps(sig)) and json.loads(json.dumps(back)) == data
        assert signature(data, app=app) == back and type(signature(data, app=app)) is type(sig)


def test_pickle_round_trip(app):
    for sig in every_kind(app):
        back = pickle.loads(pickle.dumps(sig))
        assert type(back) is type(sig) and back == sig


def test_maybe_signature(app):
    add, _, _ = tasks(app)
    sig = add.s(1)
    assert maybe_signature(None) is None
    assert maybe_signature(sig, app) is sig
    plain = maybe_signature(dict(sig), app)
    assert type(plain) is Signature and plain == sig and plain.app is app


def test_a_round_tripped_frozen_chain_keeps_its_ids(app):
    """What a worker does with a chord body: freeze() again returns the final result and
    changes no id already assigned."""
    add, _, _ = tasks(app)
    body = chain(add.s(1), add.s(2), add.s(3))
    last = body.freeze()
    ids = [t.id for t in body.tasks]
    received = maybe_signature(json.loads(json.dumps(body)), app)
    assert received.freeze().id == last.id == ids[-1]
    assert [t.id for t in received.tasks] == ids


# -- chain --------------------------------------------------------------------------------


def test_pipe_builds_chains(app):
    add, tsum, _ = tasks(app)
    a, b, c = add.s(1, 1), add.s(2), add.s(3)
    ab = a | b
    assert isinstance(ab, chain) and ab.tasks == [a, b]
    abc = ab | (c | add.s(4))
    assert isinstance(abc, chain) and abc.tasks == [a, b, c, add.s(4)]  # flattened
    assert (a | chain(b, c)).tasks == [a, b, c]
    with_group = a | group(b, c)
    assert isinstance(with_group, chain) and isinstance(with_group.tasks[-1], group)
    upgraded = group(a, b) | tsum.s()
    assert isinstance(upgraded, chord) and upgraded.body == tsum.s()
    assert upgraded.header.tasks == [a, b]


def test_chord_pipe_sig_runs_after_the_body(app):
    add, tsum, _ = tasks(app)
    combined = chord([add.s(1, 1)], tsum.s()) | add.s(5)
    assert isinstance(combined, chain) and len(combined.tasks) == 1
    (only,) = combined.tasks
    assert isinstance(only, chord) and only.body.tasks == [tsum.s(), add.s(5)]
    assert combined.apply().get() == 7


def test_a_group_in_the_middle_becomes_a_chord_with_the_rest_as_body(app):
    add, tsum, _ = tasks(app)
    a, d, e = add.s(1, 1), tsum.s(), add.s(10)
    wf = chain(a, group(add.s(1), add.s(2)), d, e)
    first, second = wf.tasks
    assert first == a
    assert isinstance(second, chord) and isinstance(second.body, chain)
    assert second.header.tasks == [add.s(1), add.s(2)] and second.body.tasks == [d, e]
    single = chain(a, group(add.s(1), add.s(2)), d)
    assert single.tasks[1].body == d
    after_chord = chain(a, chord([add.s(1)], tsum.s()), e)
    assert after_chord.tasks[1].body.tasks == [tsum.s(), e]


def test_chain_sends_only_the_first_task_and_returns_the_last_result(app):
    add, _, _ = tasks(app)
    result = chain(add.s(1, 1), add.s(10), add.s(100)).apply_async()
    ((headers, args, _, embed),) = sent(app)
    assert args == [1, 1]
    third, second = embed["chain"]
    assert result.id == third["options"]["task_id"]
    assert result.parent.id == second["options"]["task_id"]
    assert result.parent.parent.id == headers["id"] and result.parent.parent.parent is None


def test_chain_get_returns_the_last_value(app):
    add, _, _ = tasks(app)
    result = chain(add.s(1, 1), add.s(10)).apply_async()
    store(app, result.parent.id, 2)
    store(app, result.id, 12)
    assert result.get(timeout=5) == 12


def test_chain_get_raises_the_error_of_a_failed_earlier_step(app):
    """The steps after a failed one never run: waiting on the last must not last forever."""
    add, _, _ = tasks(app)
    result = chain(add.s(1, 1), add.s(10), add.s(100)).apply_async()
    store(app, result.parent.parent.id, ValueError("first failed"), states.FAILURE)
    with pytest.raises(ValueError, match="first failed"):
        result.get(timeout=20)
    revoked = chain(add.s(1, 1), add.s(10)).apply_async()
    store(app, revoked.parent.id, TaskRevokedError("revoked"), states.REVOKED)
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=20)


def test_chain_get_without_follow_parents_times_out(app):
    from qctl.exceptions import TimeoutError as QTimeoutError
    add, _, _ = tasks(app)
    result = chain(add.s(1, 1), add.s(10)).apply_async()
    store(app, result.parent.id, ValueError("x"), states.FAILURE)
    with pytest.raises(QTimeoutError):
        result.get(timeout=0.3, follow_parents=False)


def test_chain_partial_args_go_to_the_first_task_only(app):
    add, _, _ = tasks(app)
    chain(add.s(1), add.s(2)).apply_async((5,))
    ((_, args, _, embed),) = sent(app)
    assert args == [5, 1] and embed["chain"][0]["args"] == [2]
    chain(add.si(1, 1), add.s(2)).apply_async((5,))
    ((_, args, _, _),) = sent(app)
    assert args == [1, 1]


def test_chain_options_task_id_link_and_link_error(app):
    add, _, fail = tasks(app)
    result = chain(add.s(1, 1), add.s(2)).apply_async(task_id="last-id", link=add.s(0),
                                                       link_error=fail.s(), queue="q")
    ((headers, _, _, embed),) = sent(app, "q")
    assert result.id == "last-id"
    (last,) = embed["chain"]
    assert last["options"]["task_id"] == "last-id"
    assert last["options"]["link"] == [dict(add.s(0))] and embed["callbacks"] is None
    assert embed["errbacks"] == [dict(fail.s())] and last["options"]["link_error"] == [dict(fail.s())]


def test_applying_a_chain_does_not_change_it(app):
    add, _, _ = tasks(app)
    wf = chain(add.s(1, 1), add.s(2))
    before = json.loads(json.dumps(wf))
    first = wf.apply_async()
    second = wf.apply_async()
    assert json.loads(json.dumps(wf)) == before and first.id != second.id


def test_chain_of_one_and_empty_chain(app):
    add, _, _ = tasks(app)
    result = chain(add.s(1, 1)).apply_async()
    ((headers, _, _, embed),) = sent(app)
    assert result.id == headers["id"] and embed["chain"] is None
    assert chain().apply_async() is None and sent(app) == []


def test_chain_eager_apply_runs_every_step_and_links_parents(app):
    add, tsum, fail = tasks(app)
    result = chain(add.s(1, 1), add.s(10), add.s(100)).apply()
    assert result.get() == 112 and result.parent.get() == 12 and result.parent.parent.get() == 2
    assert chain(add.s(1), group(add.s(1), add.s(2)), tsum.s()).apply((1,)).get() == 7
    failed = chain(add.s(1, 1), fail.s(), add.s(1)).apply()
    assert failed.failed() and failed.parent.get() == 2
    with pytest.raises(ValueError):
        failed.get()
    assert sent(app) == []


def test_calling_a_chain_sends_it(app):
    add, _, _ = tasks(app)
    result = chain(add.s(1), add.s(2))(3)
    ((_, args, _, _),) = sent(app)
    assert args == [3, 1] and isinstance(result, AsyncResult)


def test_always_eager_runs_canvases_in_process(app):
    add, tsum, _ = tasks(app)
    app.conf.task_always_eager = True
    assert chain(add.s(1, 1), add.s(2)).apply_async().get() == 4
    assert group(add.s(1, 1), add.s(2, 2)).apply_async().get() == [2, 4]
    assert chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async().get() == 6
    assert sent(app) == []


# -- group --------------------------------------------------------------------------------


def test_group_sends_every_member_in_order(app):
    add, _, _ = tasks(app)
    result = group(add.s(i, i) for i in range(4)).apply_async()
    messages = sent(app)
    assert isinstance(result, GroupResult) and len(result) == 4
    assert [h["id"] for h, _, _, _ in messages] == [r.id for r in result.results]
    assert [args for _, args, _, _ in messages] == [[i, i] for i in range(4)]
    assert {h["group"] for h, _, _, _ in messages} == {result.id}
    assert [h["group_index"] for h, _, _, _ in messages] == [0, 1, 2, 3]


def test_group_partial_args_go_to_every_mutable_member(app):
    add, _, _ = tasks(app)
    result = group(add.s(1), add.si(2, 2), add.s(3)).apply_async((10,), task_id="gid")
    assert result.id == "gid"
    assert [args for _, args, _, _ in sent(app)] == [[10, 1], [2, 2], [10, 3]]
    group(add.s(1), add.s(2))(5)
    assert [args for _, args, _, _ in sent(app)] == [[5, 1], [5, 2]]


def test_nested_groups_are_unrolled(app):
    add, _, _ = tasks(app)
    result = group(group(add.s(1, 1), add.s(2, 2)), add.s(3, 3)).apply_async()
    messages = sent(app)
    assert len(result) == 3 and [h["group_index"] for h, _, _, _ in messages] == [0, 1, 2]
    assert {h["group"] for h, _, _, _ in messages} == {result.id}


def test_group_of_chains_gives_each_chain_s_last_task_the_group(app):
    add, _, _ = tasks(app)
    result = group(add.s(1, 1) | add.s(1), add.s(2, 2) | add.s(2)).apply_async()
    messages = sent(app)
    assert [h["group"] for h, _, _, _ in messages] == [None, None]
    for index, ((_, _, _, embed), member) in enumerate(zip(messages, result.results)):
        (last,) = embed["chain"]
        assert last["options"]["group_id"] == result.id
        assert last["options"]["group_index"] == index
        assert last["options"]["task_id"] == member.id


def test_empty_group(app):
    result = group([], app=app).apply_async()
    assert isinstance(result, GroupResult) and len(result) == 0 and result.get() == []
    assert result.ready() and sent(app) == []


def test_group_refuses_link(app):
    add, _, _ = tasks(app)
    with pytest.raises(TypeError, match="chord"):
        group(add.s(1, 1)).apply_async(link=add.s(1))


def test_group_eager_apply(app):
    add, _, fail = tasks(app)
    result = group(add.s(1), add.s(2)).apply((10,))
    assert result.get() == [11, 12]
    mixed = group(add.s(1, 1), fail.s()).apply()
    assert mixed.failed() and not mixed.successful() and mixed.completed_count() == 1
    with pytest.raises(ValueError):
        mixed.get()
    assert sent(app) == []


def test_group_freeze_is_what_apply_async_returns(app):
    add, _, _ = tasks(app)
    g = group(add.s(1, 1), add.s(2, 2))
    frozen = g.freeze()
    assert g.freeze() == frozen
    result = g.apply_async()
    assert result == frozen
    assert [h["id"] for h, _, _, _ in sent(app)] == [r.id for r in frozen.results]


# -- GroupResult --------------------------------------------------------------------------


def test_group_result_state_and_values(app):
    add, _, _ = tasks(app)
    result = group(add.s(1, 1), add.s(2, 2), add.s(3, 3)).apply_async()
    a, b, c = result.results
    assert result.waiting() and not result.ready() and result.completed_count() == 0
    store(app, a.id, 2)
    store(app, b.id, 4)
    assert result.completed_count() == 2 and not result.ready()
    store(app, c.id, 6)
    assert result.ready() and result.successful() and not result.failed()
    assert result.get(timeout=5) == [2, 4, 6] and result.join(timeout=5) == [2, 4, 6]
    assert list(result) == [a, b, c] and result[1] == b and result.children == [a, b, c]


def test_group_result_failure_propagates_or_is_returned(app):
    add, _, _ = tasks(app)
    result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    a, b = result.results
    store(app, a.id, 2)
    store(app, b.id, ValueError("bad"), states.FAILURE)
    assert result.failed() and not result.successful() and result.ready()
    with pytest.raises(ValueError, match="bad"):
        result.get(timeout=5)
    values = result.get(timeout=5, propagate=False)
    assert values[0] == 2 and isinstance(values[1], ValueError)


def test_group_result_get_times_out(app):
    from qctl.exceptions import TimeoutError as QTimeoutError
    add, _, _ = tasks(app)
    result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    with pytest.raises(QTimeoutError):
        result.get(timeout=0.3)


def test_group_result_save_and_restore_in_celery_layout(app):
    add, _, _ = tasks(app)
    result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    result.save()
    raw = json.loads(app.backend.get_raw(f"celery-taskset-meta-{result.id}"))
    assert raw == {"result": [[result.id, None], [[[r.id, None], None] for r in result.results]]}
    restored = GroupResult.restore(result.id, app=app)
    assert restored == result and restored.as_tuple() == result.as_tuple()
    assert GroupResult.restore("never-saved", app=app) is None
    result.delete()
    assert GroupResult.restore(result.id, app=app) is None


def test_group_result_forget_and_revoke(app):
    add, _, _ = tasks(app)
    result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    store(app, result[0].id, 2)
    result.forget()
    assert app.backend.get_task_meta(result[0].id)["status"] == states.PENDING
    pending = group(add.s(3, 3), add.s(4, 4)).apply_async()
    pending.revoke()
    assert [app.backend.get_task_meta(r.id)["status"] for r in pending] == [states.REVOKED] * 2


def test_group_result_as_tuple_rebuilds_parents(app):
    from qctl.canvas import result_from_tuple
    add, tsum, _ = tasks(app)
    result = chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s()).apply_async()
    back = result_from_tuple(json.loads(json.dumps(result.as_tuple())), app)
    assert back.id == result.id and isinstance(back.parent, GroupResult)
    assert back.parent == result.parent and back.parent.parent.id == result.parent.parent.id


# -- chord --------------------------------------------------------------------------------


def test_chord_sets_its_size_before_sending_the_header(app, monkeypatch):
    add, tsum, _ = tasks(app)
    calls = []
    real = app.backend.chord_set_size

    def spy(group_id, size):
        calls.append((group_id, size, len(app.transport.fetch(["celery"], 100, 0))))
        return real(group_id, size)

    monkeypatch.setattr(app.backend, "chord_set_size", spy)
    result = chord([add.s(1, 2), add.s(3, 4), add.s(5, 6)], tsum.s()).apply_async()
    assert calls == [(result.parent.id, 3, 0)]
    messages = sent(app)
    assert len(messages) == 3
    assert [h["id"] for h, _, _, _ in messages] == [r.id for r in result.parent.results]
    for headers, _, _, embed in messages:
        assert headers["group"] == result.parent.id
        assert embed["chord"]["options"]["task_id"] == result.id
        assert embed["chord"]["options"]["group_id"] == result.parent.id


def test_chord_result_is_the_body_s(app):
    add, tsum, _ = tasks(app)
    result = chord([add.s(1, 2), add.s(3, 4)], tsum.s()).apply_async()
    assert isinstance(result, AsyncResult) and isinstance(result.parent, GroupResult)
    store(app, result.id, 10)
    assert result.get(timeout=5) == 10


def test_chord_call_forms(app):
    add, tsum, _ = tasks(app)
    for call in (lambda: chord([add.s(1, 1)])(tsum.s()), lambda: chord([add.s(1, 1)], tsum.s())()):
        result = call()
        ((_, _, _, embed),) = sent(app)
        assert embed["chord"]["task"] == "proj.tsum" and embed["chord"]["options"]["task_id"] == result.id
    with pytest.raises(TypeError, match="body"):
        chord([add.s(1, 1)]).apply_async()


def test_chord_partial_args_go_to_every_header_task(app):
    add, tsum, _ = tasks(app)
    chord([add.s(1), add.si(0, 0), add.s(2)], tsum.s()).apply_async((10,))
    assert [args for _, args, _, _ in sent(app)] == [[10, 1], [0, 0], [10, 2]]


def test_chord_with_an_empty_header_sends_the_body_at_once(app, monkeypatch):
    _, tsum, _ = tasks(app)
    monkeypatch.setattr(app.backend, "chord_set_size",
                        lambda *a: pytest.fail("an empty chord has nothing to count"))
    result = chord([], tsum.s(), app=app).apply_async()
    ((headers, args, _, embed),) = sent(app)
    assert headers["task"] == "proj.tsum" and args == [[]] and headers["id"] == result.id
    assert embed["chord"] is None and len(result.parent) == 0


def test_chord_options_go_to_header_and_body(app):
    add, tsum, fail = tasks(app)
    result = chord([add.s(1, 1)], tsum.s()).apply_async(queue="q", link=add.s(1),
                                                        link_error=fail.s(), task_id="body-id")
    ((_, _, _, embed),) = sent(app, "q")
    assert result.id == "body-id"
    assert embed["callbacks"] is None and embed["errbacks"] is None
    body = embed["chord"]["options"]
    assert body["queue"] == "q" and body["link"] == [dict(add.s(1))]
    assert body["link_error"] == [dict(fail.s())] and body["task_id"] == "body-id"


def test_chord_with_a_chain_body_returns_the_last_body_task(app):
    add, tsum, _ = tasks(app)
    result = chord([add.s(1, 1), add.s(2, 2)], tsum.s() | add.s(1)).apply_async()
    messages = sent(app)
    body = maybe_signature(messages[0][3]["chord"], app)
    assert isinstance(body, chain)
    assert [t.id for t in body.tasks] == [result.parent.id, result.id]
    assert body.freeze().id == result.id  # what a worker failing the chord stores under
    assert isinstance(result.parent.parent, GroupResult)


def test_chord_freeze_is_what_apply_async_returns(app):
    add, tsum, _ = tasks(app)
    c = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    frozen = c.freeze()
    assert c.freeze().id == frozen.id and c.freeze().parent == frozen.parent
    result = c.apply_async()
    assert result.id == frozen.id and result.parent == frozen.parent
    assert [h["id"] for h, _, _, _ in sent(app)] == [r.id for r in frozen.parent.results]


def test_chord_needs_a_backend_that_counts(app):
    add, tsum, _ = tasks(app)
    name = uuid.uuid4().hex[:8]
    other = App("proj", broker=f"memory://canvas-nb-{name}", backend="disabled://")
    with pytest.raises(ImproperlyConfigured, match="chords need a result backend"):
        chord([add.s(1, 1)], tsum.s(), app=other).apply_async()
    assert other.transport.fetch(["celery"], 10, 0) == []


def test_a_chain_holding_a_chord_is_refused_before_sending(app):
    """A worker would only find out after the first step; the client refuses at once."""
    name = uuid.uuid4().hex[:8]
    other = App("proj", broker=f"memory://canvas-nb-{name}", backend="disabled://")
    add, tsum = (lambda *a: other.signature("proj.add", a)), other.signature("proj.tsum")
    workflow = chain(add(1, 1), group(add(1), add(2)), tsum)
    with pytest.raises(ImproperlyConfigured, match="disabled:// cannot"):
        workflow.apply_async()
    assert other.transport.fetch(["celery"], 10, 0) == []
    chain(add(1, 1), group(add(1), add(2))).apply_async()  # no chord: sent
    assert len(other.transport.fetch(["celery"], 10, 0.2)) == 1


def test_chord_eager_runs_header_then_body(app):
    add, tsum, fail = tasks(app)
    result = chord([add.s(1, 2), add.s(3, 4)], tsum.s()).apply()
    assert result.get() == 10 and result.parent.get() == [3, 7]
    assert chord([add.s(1), add.s(2)], tsum.s()).apply((10,)).get() == 23
    assert chord([], tsum.s(), app=app).apply().get() == 0
    broken = chord([add.s(1, 1), fail.s()], tsum.s()).apply()
    assert broken.failed()
    failed_id = broken.parent.results[1].id
    with pytest.raises(ChordError, match=f"Dependency {failed_id} raised ValueError\\('boom'\\)"):
        broken.get()
    assert sent(app) == []


def test_a_chord_in_a_chord_header_reports_to_the_outer_chord(app):
    add, tsum, _ = tasks(app)
    inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    result = chord([inner, add.s(5, 5)], tsum.s()).apply_async()
    outer_gid = result.parent.id
    inner_result, plain = result.parent.results
    messages = sent(app)
    assert len(messages) == 3
    inner_messages = [m for m in messages if m[0]["group"] != outer_gid]
    (outer_message,) = [m for m in messages if m[0]["group"] == outer_gid]
    assert outer_message[0]["group_index"] == 1 and outer_message[0]["id"] == plain.id
    for headers, _, _, embed in inner_messages:
        body = maybe_signature(embed["chord"], app)
        (last,) = body.tasks
        assert last.id == inner_result.id
        assert last.options["group_id"] == outer_gid and last.options["group_index"] == 0
        assert last.options["chord"]["options"]["task_id"] == result.id


# -- chunks, map, starmap -----------------------------------------------------------------


def test_map_and_starmap_are_one_task_routed_like_the_mapped_task(app):
    add, _, _ = tasks(app)
    double = app.tasks["proj.double"]
    app.conf.task_routes = {"proj.double": {"queue": "math"}, "proj.add": {"queue": "math"}}
    result = double.map([1, 2, 3]).apply_async()
    add.starmap([(1, 2), (3, 4)]).delay()
    (m1, m2) = sent(app, "math")
    assert m1[0]["task"] == "celery.map" and m1[0]["id"] == result.id
    assert m1[2] == {"task": dict(double.s()), "it": [1, 2, 3]}
    assert m2[0]["task"] == "celery.starmap" and m2[2]["it"] == [[1, 2], [3, 4]]
    assert double.map([1, 2, 3]).apply().get() == [2, 4, 6]
    assert add.starmap([(1, 2), (3, 4)]).apply().get() == [3, 7]


def test_chunks_split_into_starmap_tasks(app):
    add, _, _ = tasks(app)
    items = [(i, i) for i in range(7)]
    ch = add.chunks(items, 3)
    assert isinstance(ch, chunks)
    g = ch.group()
    assert isinstance(g, group) and [type(t) for t in g.tasks] == [xstarmap] * 3
    assert [len(t.kwargs["it"]) for t in g.tasks] == [3, 3, 1]
    result = ch.apply_async()
    messages = sent(app)
    assert isinstance(result, GroupResult) and len(result) == 3
    assert [h["task"] for h, _, _, _ in messages] == ["celery.starmap"] * 3
    assert [h["group_index"] for h, _, _, _ in messages] == [0, 1, 2]
    assert ch.apply().get() == [[0, 2, 4], [6, 8, 10], [12]]
    with pytest.raises(ValueError):
        add.chunks(items, 0)


def test_builtin_tasks_are_registered_on_finalize(app):
    app.finalize()
    for name in ("celery.map", "celery.starmap", "celery.chunks", "celery.group",
                 "celery.chain", "celery.chord"):
        assert name in app.tasks
    assert not any(name.startswith("celery.") for name in app.tasks.regular())
    add, tsum, _ = tasks(app)
    double = app.tasks["proj.double"]
    assert app.tasks["celery.map"](dict(double.s()), [1, 2]) == [2, 4]
    assert app.tasks["celery.starmap"](dict(add.s()), [[1, 2], [3, 4]]) == [3, 7]
    assert app.tasks["celery.map"](dict(add.s(10)), [1]) == [11]  # partial args kept


def test_builtin_canvas_tasks_apply_what_they_are_given(app):
    app.finalize()
    add, tsum, _ = tasks(app)
    group_tuple = app.tasks["celery.group"]([dict(add.s(1, 1)), dict(add.s(2, 2))], None, "gid-1")
    messages = sent(app)
    assert group_tuple[0] == ["gid-1", None] and [h["group"] for h, _, _, _ in messages] == ["gid-1"] * 2
    app.tasks["celery.chain"](tasks=[dict(add.s(1, 1)), dict(add.s(1))])
    ((_, args, _, embed),) = sent(app)
    assert args == [1, 1] and len(embed["chain"]) == 1
    app.tasks["celery.chord"](dict(group(add.s(1, 1))), dict(tsum.s()))
    ((_, _, _, embed),) = sent(app)
    assert embed["chord"]["task"] == "proj.tsum"
    app.tasks["celery.chunks"](dict(add.s()), [[1, 1], [2, 2]], 1)
    assert [h["task"] for h, _, _, _ in sent(app)] == ["celery.starmap"] * 2

