"""Canvas messages on the wire, compared with what Celery 5 sends (captured on Redis; see
the Celery wire reference, §1.3 and §1.6).

- chain: the first message carries the other steps *reversed*, each with ``options.task_id``
  (and ``reply_to``) pre-assigned;
- group: every member has ``group`` = the group id, ``group_index`` = its position and
  ``root_id`` = its own id;
- chord: every header task also carries the body as ``embed.chord`` with options
  ``task_id``, ``reply_to``, ``group_id``;
- the dict forms of chain/group/chord/chunks/map/starmap are Celery's.

Bodies are compared both decoded and as raw JSON text: key order and spacing are Celery's.
"""
from __future__ import annotations

import json
import uuid

import pytest

from qctl import App, chain, chord, group, maybe_signature
from qctl.canvas_group import chunks, xmap, xstarmap
from qctl.protocol import process_oid

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app():
    name = uuid.uuid4().hex[:12]
    application = App("proj", broker=f"memory://wire-{name}", backend=f"memory://wire-results-{name}")

    @application.task(name="proj.add")
    def add(x, y):
        return x + y

    @application.task(name="proj.log_result")
    def log_result(value):
        return value

    yield application
    application.close()


def deliveries(app, queue="celery"):
    got = app.transport.fetch([queue], 1000, 0.2)
    app.transport.ack([d.tag for d in got])
    return [d.envelope for d in got]


def sig_dict(task, args=(), options=None, kwargs=None, subtask_type=None, immutable=False):
    return {"task": task, "args": list(args), "kwargs": kwargs or {}, "options": options or {},
            "subtask_type": subtask_type, "immutable": immutable}


def as_celery_json(value):
    """JSON text the way kombu writes it (", " and ": " separators, keys in order)."""
    return json.dumps(value)


def test_chain_message_matches_celery(app):
    add = app.tasks["proj.add"]
    result = chain(add.s(1, 1), add.s(10), add.s(100)).apply_async()
    (envelope,) = deliveries(app)
    headers = envelope.headers
    first_id = result.parent.parent.id
    assert headers["task"] == "proj.add" and headers["id"] == first_id
    assert headers["root_id"] == first_id and headers["parent_id"] is None
    assert headers["group"] is None and headers["group_index"] is None
    oid = envelope.properties["reply_to"]
    assert oid == process_oid()
    expected_chain = [sig_dict("proj.add", [100], {"task_id": result.id, "reply_to": oid}),
                      sig_dict("proj.add", [10], {"task_id": result.parent.id, "reply_to": oid})]
    expected = [[1, 1], {}, {"callbacks": None, "errbacks": None, "chain": expected_chain,
                             "chord": None}]
    assert json.loads(envelope.body) == expected
    assert envelope.body.decode() == as_celery_json(expected)


def test_chain_steps_applied_by_a_worker_keep_their_ids(app):
    """The worker pops the next step and applies it with the rest: the message it sends has
    the id the client already returned, and the remaining chain."""
    add = app.tasks["proj.add"]
    result = chain(add.s(1, 1), add.s(10), add.s(100)).apply_async()
    (envelope,) = deliveries(app)
    remaining = json.loads(envelope.body)[2]["chain"]
    step = maybe_signature(remaining.pop(), app)
    step.apply_async((2,), chain=remaining, parent_id=envelope.headers["id"],
                     root_id=envelope.headers["root_id"])
    (second,) = deliveries(app)
    assert second.headers["id"] == result.parent.id
    assert second.headers["parent_id"] == second.headers["root_id"] == result.parent.parent.id
    body = json.loads(second.body)
    assert body[0] == [2, 10] and [s["options"]["task_id"] for s in body[2]["chain"]] == [result.id]


def test_group_messages_match_celery(app):
    add = app.tasks["proj.add"]
    gid = "99999999-0000-0000-0000-000000000001"
    result = group(add.s(1, 1), add.s(2, 2)).apply_async(task_id=gid)
    envelopes = deliveries(app)
    assert result.id == gid and len(envelopes) == 2
    for index, (envelope, member) in enumerate(zip(envelopes, result.results)):
        headers = envelope.headers
        assert headers["group"] == gid and headers["group_index"] == index
        assert headers["id"] == member.id and headers["root_id"] == member.id
        assert headers["parent_id"] is None
        expected = [[index + 1, index + 1], {}, {"callbacks": None, "errbacks": None,
                                                 "chain": None, "chord": None}]
        assert envelope.body.decode() == as_celery_json(expected)


def test_chord_header_messages_match_celery(app):
    add, log_result = app.tasks["proj.add"], app.tasks["proj.log_result"]
    result = chord([add.s(1, 2), add.s(3, 4)], log_result.s()).apply_async()
    gid = result.parent.id
    envelopes = deliveries(app)
    assert len(envelopes) == 2
    oid = process_oid()
    embed_chord = sig_dict("proj.log_result", [], {"task_id": result.id, "reply_to": oid,
                                                   "group_id": gid})
    for index, envelope in enumerate(envelopes):
        headers = envelope.headers
        assert headers["group"] == gid and headers["group_index"] == index
        assert headers["root_id"] == headers["id"] == result.parent.results[index].id
        args = [[1, 2], [3, 4]][index]
        expected = [args, {}, {"callbacks": None, "errbacks": None, "chain": None,
                               "chord": embed_chord}]
        assert envelope.body.decode() == as_celery_json(expected)
        assert list(json.loads(envelope.body)[2]["chord"]["options"]) == ["task_id", "reply_to", "group_id"]


def test_links_on_the_wire(app):
    add, log_result = app.tasks["proj.add"], app.tasks["proj.log_result"]
    add.apply_async((2, 3), link=log_result.s(), link_error=[add.s(0)])
    (envelope,) = deliveries(app)
    expected = [[2, 3], {}, {"callbacks": [sig_dict("proj.log_result")],
                             "errbacks": [sig_dict("proj.add", [0])],
                             "chain": None, "chord": None}]
    assert envelope.body.decode() == as_celery_json(expected)


def test_celery_dict_forms(app):
    add, log_result = app.tasks["proj.add"], app.tasks["proj.log_result"]
    a, b = sig_dict("proj.add", [1, 1]), sig_dict("proj.add", [2])
    assert chain(add.s(1, 1), add.s(2)) == sig_dict("celery.chain", kwargs={"tasks": [a, b]},
                                                     subtask_type="chain")
    assert group(add.s(1, 1), add.s(2)) == sig_dict("celery.group", kwargs={"tasks": [a, b]},
                                                     subtask_type="group")
    header = sig_dict("celery.group", kwargs={"tasks": [a]}, subtask_type="group")
    assert chord([add.s(1, 1)], log_result.s()) == sig_dict(
        "celery.chord", kwargs={"kwargs": {}, "header": header, "body": sig_dict("proj.log_result")},
        subtask_type="chord")
    # Celery 5.7 leaves subtask_type null for these three.
    assert add.chunks([(1, 1)], 5) == sig_dict(
        "celery.chunks", kwargs={"task": sig_dict("proj.add"), "it": [(1, 1)], "n": 5},
        immutable=True)
    assert add.map([1]) == sig_dict("celery.map", kwargs={"task": sig_dict("proj.add"), "it": [1]},
                                    immutable=True)
    assert add.starmap([(1, 2)]) == sig_dict(
        "celery.starmap", kwargs={"task": sig_dict("proj.add"), "it": [(1, 2)]}, immutable=True)
    assert json.dumps(add.map([1])) == (
        '{"task": "celery.map", "args": [], "kwargs": {"task": {"task": "proj.add", "args": [], '
        '"kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}, "it": [1]}, '
        '"options": {}, "subtask_type": null, "immutable": true}')


def test_reads_canvases_in_celerys_form(app):
    """Celery keeps a chord's header as a plain list of signatures; both forms are read."""
    celery_chord = sig_dict("celery.chord", kwargs={
        "kwargs": {}, "header": [sig_dict("proj.add", [1, 1]), sig_dict("proj.add", [2, 2])],
        "body": sig_dict("proj.log_result")}, subtask_type="chord")
    sig = maybe_signature(json.loads(json.dumps(celery_chord)), app)
    assert isinstance(sig, chord) and isinstance(sig.header, group) and len(sig.header.tasks) == 2
    result = sig.apply_async()
    envelopes = deliveries(app)
    assert [e.headers["group"] for e in envelopes] == [result.parent.id] * 2
    task = sig_dict("proj.add")
    celery_forms = {
        chunks: sig_dict("celery.chunks", kwargs={"task": task, "it": [[1, 1]], "n": 5}, immutable=True),
        xmap: sig_dict("celery.map", kwargs={"task": task, "it": [1]}, immutable=True),
        xstarmap: sig_dict("celery.starmap", kwargs={"task": task, "it": [[1, 2]]}, immutable=True)}
    for cls, data in celery_forms.items():
        assert type(maybe_signature(data, app)) is cls and maybe_signature(data, app) == data


def test_a_group_in_a_chain_travels_as_a_chord_step(app):
    add, log_result = app.tasks["proj.add"], app.tasks["proj.log_result"]
    result = chain(add.s(1, 1), group(add.s(1), add.s(2)), log_result.s(), add.s(5)).apply_async()
    (envelope,) = deliveries(app)
    (step,) = json.loads(envelope.body)[2]["chain"]
    assert step["task"] == "celery.chord" and step["subtask_type"] == "chord"
    header, body = step["kwargs"]["header"], step["kwargs"]["body"]
    assert header["task"] == "celery.group" and header["subtask_type"] == "group"
    assert body["subtask_type"] == "chain"
    header_result = result.parent.parent
    assert header["options"]["task_id"] == header_result.id
    members = header["kwargs"]["tasks"]
    assert [m["options"]["task_id"] for m in members] == [r.id for r in header_result.results]
    assert [m["options"]["group_index"] for m in members] == [0, 1]
    assert {m["options"]["group_id"] for m in members} == {header_result.id}
    assert all(m["options"]["chord"] == body for m in members)
    assert [t["options"]["task_id"] for t in body["kwargs"]["tasks"]] == [result.parent.id, result.id]
    assert header_result.parent.id == envelope.headers["id"]


def test_a_chord_step_applied_by_a_worker_sends_the_promised_ids(app):
    """The worker applies the popped chord step with the previous value: the header goes out
    under the group id and task ids the client already returned."""
    add, log_result = app.tasks["proj.add"], app.tasks["proj.log_result"]
    result = chain(add.s(1, 1), group(add.s(1), add.s(2)), log_result.s()).apply_async()
    (envelope,) = deliveries(app)
    step = maybe_signature(json.loads(envelope.body)[2]["chain"].pop(), app)
    step.apply_async((2,), parent_id=envelope.headers["id"], root_id=envelope.headers["root_id"])
    header_result = result.parent
    sent = deliveries(app)
    assert [e.headers["id"] for e in sent] == [r.id for r in header_result.results]
    assert [e.headers["group"] for e in sent] == [header_result.id] * 2
    assert [json.loads(e.body)[0] for e in sent] == [[2, 1], [2, 2]]
    assert all(e.headers["root_id"] == envelope.headers["id"] for e in sent)
    assert all(json.loads(e.body)[2]["chord"]["options"]["task_id"] == result.id for e in sent)


def test_map_message(app):
    add = app.tasks["proj.add"]
    add.starmap([(1, 2)]).apply_async()
    (envelope,) = deliveries(app)
    assert envelope.headers["task"] == "celery.starmap"
    expected = [[], {"task": sig_dict("proj.add"), "it": [[1, 2]]},
                {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert envelope.body.decode() == as_celery_json(expected)


#: The ``chain`` list of Celery 5.7's first message for
#: ``chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s(), add.s(3))`` (captured, ids
#: renamed): Celery upgrades the group and the next step to a chord, keeps the last step in
#: the chain, and stores the header's group id as the chord's own task_id.
CELERY_CHAIN_WITH_A_CHORD = [
    {"task": "proj.add", "args": [3], "kwargs": {},
     "options": {"task_id": "last-id", "reply_to": "oid"}, "subtask_type": None, "immutable": False},
    {"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": {
        "task": "celery.group", "args": [], "kwargs": {"tasks": [
            {"task": "proj.add", "args": [1], "kwargs": {},
             "options": {"task_id": "member-0", "reply_to": "oid", "group_index": 0},
             "subtask_type": None, "immutable": False},
            {"task": "proj.add", "args": [2], "kwargs": {},
             "options": {"task_id": "member-1", "reply_to": "oid", "group_index": 1},
             "subtask_type": None, "immutable": False}]},
        "options": {"task_id": "group-id", "root_id": None, "parent_id": None},
        "subtask_type": "group", "immutable": False},
        "body": {"task": "proj.log_result", "args": [], "kwargs": {},
                 "options": {"task_id": "body-id", "reply_to": "oid"},
                 "subtask_type": None, "immutable": False}},
     "options": {"task_id": "group-id"}, "subtask_type": "chord", "immutable": False}]


def test_a_chord_step_in_celerys_form_keeps_celerys_ids(app):
    """Applied with the steps left (``chain=``), as a Celery worker applies it: the header
    goes out under Celery's ids and the body carries the remaining step."""
    remaining = json.loads(json.dumps(CELERY_CHAIN_WITH_A_CHORD))
    step = maybe_signature(remaining.pop(), app)
    result = step.apply_async((2,), chain=remaining, parent_id="first-id", root_id="first-id")
    sent = deliveries(app)
    assert [e.headers["id"] for e in sent] == ["member-0", "member-1"]
    assert [e.headers["group"] for e in sent] == ["group-id"] * 2
    assert [e.headers["group_index"] for e in sent] == [0, 1]
    assert [json.loads(e.body)[0] for e in sent] == [[2, 1], [2, 2]]
    body = maybe_signature(json.loads(sent[0].body)[2]["chord"], app)
    assert isinstance(body, chain)
    assert [(t.name, t.id) for t in body.tasks] == [("proj.log_result", "body-id"), ("proj.add", "last-id")]
    assert result.id == "last-id" and result.parent.id == "body-id"
    assert result.parent.parent.id == "group-id"
