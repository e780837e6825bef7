"""Workflows (signatures, chains, groups, chords, chunks/map/starmap, link/link_error) run by
real worker processes on every broker: sqlite, redis, and amqp with ``rpc://`` results.

The workers are started once per module and broker (two nodes of two pool processes each,
so chord parts complete in different processes) and shared by the tests. Every test tags
what it sends with its own label, so runs of other tests never count. Tasks are those of
``tests/apps/proj.py``; the client registers twins of them under the same names (as a Celery
client that imports its task module) so that ``add.s(...)``, ``add.chunks(...)`` and the
rest build the messages.

``rpc://`` cannot count a chord's parts: chords there must be refused at send time. The chord
tests therefore run, for amqp, on a second project: RabbitMQ as the broker (its own vhost)
and Redis as the result backend.
"""
from __future__ import annotations

import json
import re
import types
import uuid
from typing import Any

import pytest

from qctl import GroupResult, chain, chord, group, signature, states
from qctl.exceptions import ChordError, ImproperlyConfigured
from tests.conftest import Project
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)

GET = 30.0
#: Pool processes per node, nodes per project.
CONCURRENCY = 2
NODES = 2


class Env:
    """A project with its running workers, a client app and the client's task twins."""

    def __init__(self, project: Project) -> None:
        self.project = project
        starting = [project.start_worker("-c", str(CONCURRENCY), "-n", f"canvas{i}@%h",
                                         wait_ready=False) for i in range(1, NODES + 1)]
        for worker in starting:
            worker.wait_ready()
        self.workers = starting
        self.app = project.client()
        self.t = _twin_tasks(self.app)

    def runs(self, kind: str, label: str | None = None) -> list[dict]:
        return [run for run in self.project.runs(kind)
                if label is None or run.get("label") == label]

    def wait_runs(self, kind: str, label: str, count: int = 1) -> list[dict]:
        """The runs of ``kind`` tagged ``label``, once there are ``count`` of them."""
        return wait_for(lambda: (lambda found: found if len(found) >= count else None)(
                            self.runs(kind, label)),
                        GET, message=lambda: f"runs of {kind}/{label}: {self.runs(kind)}"
                                             + self.tails())

    def settle(self) -> None:
        """Make sure the workers have fetched everything published before now: one FIFO
        queue, so tasks sent now (two per pool process) are fetched after those."""
        results = [self.t.add.apply_async((i, 0)) for i in range(2 * CONCURRENCY * NODES)]
        assert [r.get(timeout=GET) for r in results] == list(range(2 * CONCURRENCY * NODES))

    def assert_never_received(self, task_ids: list[str]) -> None:
        """No worker ever received one of ``task_ids`` (call after ``settle``)."""
        for worker in self.workers:
            for task_id in task_ids:
                assert not worker.log_lines(rf"\[{re.escape(task_id)}\] received"), \
                    f"task {task_id} was sent and received\n" + worker.tail()

    def tails(self) -> str:
        return "".join("\n" + w.tail(30) for w in self.workers)


def _twin_tasks(app: Any) -> types.SimpleNamespace:
    """Client-side twins of ``tests/apps/proj.py``'s tasks: same names and parameters; the
    bodies only matter for inline calls."""

    @app.task(name="proj.add")
    def add(x, y):
        return x + y

    @app.task(name="proj.mul")
    def mul(x, y):
        return x * y

    @app.task(name="proj.identity")
    def identity(value, label=None):
        return value

    @app.task(name="proj.step")
    def step(x, y=0, label=None):
        return x + y

    @app.task(name="proj.tsum")
    def tsum(numbers):
        return sum(numbers)

    @app.task(name="proj.xsum")
    def xsum(numbers):
        return sum(sum(p) if isinstance(p, (list, tuple)) else p for p in numbers)

    @app.task(name="proj.delayed")
    def delayed(value, seconds=0.0):
        return value

    @app.task(name="proj.fail_with")
    def fail_with(*args, message="boom"):
        raise ValueError(message)

    @app.task(name="proj.gated")
    def gated(gate, value=None):
        return value

    @app.task(name="proj.errback_request")
    def errback_request(request, exc, traceback, label=None):
        return None

    @app.task(name="proj.errback_id")
    def errback_id(failed_id):
        return failed_id

    return types.SimpleNamespace(add=add, mul=mul, identity=identity, step=step, tsum=tsum,
                                 xsum=xsum, delayed=delayed, fail_with=fail_with, gated=gated,
                                 errback_request=errback_request, errback_id=errback_id)


def _tag() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def env(module_project) -> Env:
    """The module's project on this broker, its two workers and a client."""
    return Env(module_project)


@pytest.fixture(scope="module")
def amqp_counting_env(request, tmp_path_factory, _clean_qctl_env):
    """RabbitMQ broker (vhost ``canvas``, so the rpc project's workers never see these
    tasks) with results, and chord counting, on Redis."""
    from tests.conftest import _purge_rabbit, _rabbit_vhost
    from tests.servers_redis import flushdb, with_db
    rabbit = request.getfixturevalue("rabbit")
    redis_server = request.getfixturevalue("redis_server")
    broker = _rabbit_vhost(rabbit, "canvas")
    _purge_rabbit(broker)
    backend = with_db(redis_server, 12)
    flushdb(backend)
    project = Project(tmp_path_factory.mktemp("proj-amqp-redis"), broker, backend)
    try:
        yield Env(project)
    finally:
        project.close()


@pytest.fixture
def chord_env(request, env) -> Env:
    """Where chords can run on this broker: the module's project, except on amqp, whose
    ``rpc://`` results cannot count: there, RabbitMQ with Redis results."""
    if env.project.backend_url.startswith("rpc://"):
        return request.getfixturevalue("amqp_counting_env")
    return env


# -- signatures ----------------------------------------------------------------------------

def test_signature_call_forms_and_partials(env):
    """s/si/signature/set/clone/delay/apply_async on signatures: extra args are prepended,
    kwargs merged, options override; an immutable signature ignores extra args."""
    t = env.t
    assert t.add.s(2, 2).delay().get(timeout=GET) == 4
    # partial: the call's args go first ("a" + "b")
    assert t.add.s("b").delay("a").get(timeout=GET) == "ab"
    assert t.add.s("b").apply_async(("a",)).get(timeout=GET) == "ab"
    # immutable: extra args are ignored
    assert t.add.si(2, 3).delay(100).get(timeout=GET) == 5
    assert t.add.s(2, 3).set(immutable=True).apply_async((100,)).get(timeout=GET) == 5
    # kwargs merge, and the call's kwargs win
    label = _tag()
    assert t.step.s(1, label=label).delay(10).get(timeout=GET) == 11
    assert t.step.s(y=2, label=label).apply_async((10,), {"y": 5}).get(timeout=GET) == 15
    (first, second) = env.wait_runs("step", label, 2)
    assert {(first["x"], first["y"]), (second["x"], second["y"])} == {(10, 1), (10, 5)}
    # set(): options such as the task id
    task_id = str(uuid.uuid4())
    result = t.add.s(4, 4).set(task_id=task_id).delay()
    assert result.id == task_id and result.get(timeout=GET) == 8
    # clone(): a copy with args prepended; the original is unchanged
    base = t.add.s(1)
    copy = base.clone(args=(10,))
    assert copy.delay().get(timeout=GET) == 11
    assert base.args == (1,) and copy is not base
    # signature(): by name, and from its JSON form (as it travels in messages)
    by_name = signature("proj.add", args=(20, 22), app=env.app)
    assert by_name.delay().get(timeout=GET) == 42
    restored = signature(json.loads(json.dumps(t.mul.s(6, 7))), app=env.app)
    assert restored.delay().get(timeout=GET) == 42
    # inline call: runs here, no message
    assert t.add.s(2, 2)() == 4


def test_freeze_gives_the_result_apply_async_returns(env):
    sig = env.t.add.s(5, 5)
    frozen = sig.freeze()
    result = sig.apply_async()
    assert result.id == frozen.id
    assert frozen.get(timeout=GET) == 10


# -- chains --------------------------------------------------------------------------------

def test_chain_with_pipe_and_parent_walk(env):
    """Each result is prepended to the next step's args; ``res.parent`` walks back to the
    first step, and each step knows its parent and the root."""
    t, label = env.t, _tag()
    res = (t.step.s(1, 1, label=label) | t.step.s(10, label=label)
           | t.step.s(100, label=label)).apply_async()
    assert res.get(timeout=GET) == 112
    second = res.parent
    first = second.parent
    assert second.get(timeout=GET) == 12
    assert first.get(timeout=GET) == 2
    assert first.parent is None
    runs = {run["id"]: run for run in env.wait_runs("step", label, 3)}
    assert set(runs) == {first.id, second.id, res.id}
    assert runs[second.id]["parent_id"] == first.id
    assert runs[res.id]["parent_id"] == second.id
    assert {run["root_id"] for run in runs.values()} == {first.id}
    assert [runs[i]["x"] for i in (first.id, second.id, res.id)] == [1, 2, 12]


def test_chain_function_partial_and_immutable_step(env):
    """``chain(...)``: call args go to the first task only; an ``si`` step ignores the
    previous result."""
    t = env.t
    res = chain(t.add.s(1), t.mul.s(10), t.add.si(7, 7), t.mul.s(3)).apply_async((4,))
    assert res.get(timeout=GET) == 42
    assert res.parent.get(timeout=GET) == 14
    assert res.parent.parent.get(timeout=GET) == 50
    assert chain(t.add.s(2, 2), t.mul.s(2)).delay().get(timeout=GET) == 8


def test_chains_of_chains(env):
    """chain | chain and chain(chain, chain) flatten into one chain of four steps."""
    t = env.t

    def inner_a():
        return t.add.s(1, 1) | t.mul.s(3)                # 6

    def inner_b():
        return chain(t.add.s(4), t.mul.s(2))             # (6 + 4) * 2 = 20

    for combined in (inner_a() | inner_b(), chain(inner_a(), inner_b())):
        res = combined.apply_async()
        assert res.get(timeout=GET) == 20
        assert res.parent.get(timeout=GET) == 10
        assert res.parent.parent.get(timeout=GET) == 6
        assert res.parent.parent.parent.get(timeout=GET) == 2
        assert res.parent.parent.parent.parent is None


def test_failure_in_the_middle_stops_the_chain(env):
    """The failing step's error reaches ``res.get()``; the steps after it never run."""
    t, label = env.t, _tag()
    res = (t.step.s(1, 1, label=label) | t.fail_with.s(message=f"{label}-mid")
           | t.step.s(10, label=label) | t.step.s(100, label=label)).apply_async()
    with pytest.raises(ValueError, match=f"{label}-mid"):
        res.get(timeout=GET)
    failed = res.parent.parent
    with pytest.raises(ValueError, match=f"{label}-mid"):
        failed.get(timeout=GET)
    assert failed.parent.get(timeout=GET) == 2
    env.settle()
    assert [run["id"] for run in env.runs("step", label)] == [failed.parent.id]
    env.assert_never_received([res.parent.id, res.id])
    # the steps that will never run carry the failure themselves (as with Celery's workers)
    for later in (res.parent, res):
        assert later.state == "FAILURE" and isinstance(later.result, ValueError)


# -- groups --------------------------------------------------------------------------------

def test_group_result_in_order(env):
    t = env.t
    res = group(t.delayed.s(i, seconds=0.02 * (8 - i)) for i in range(8)).apply_async()
    assert isinstance(res, GroupResult) and len(res) == 8
    assert res.get(timeout=GET) == list(range(8))
    assert res.ready() and res.successful() and not res.failed() and not res.waiting()
    assert res.completed_count() == 8
    assert res.join(timeout=GET) == list(range(8))
    assert [r.get(timeout=GET) for r in res] == list(range(8))
    assert res[3].get(timeout=GET) == 3
    # partial: the call's args are prepended to every member
    assert group(t.add.s(1), t.add.s(2)).apply_async((10,)).get(timeout=GET) == [11, 12]
    assert group([t.mul.s(2), t.mul.s(3)]).delay(5).get(timeout=GET) == [10, 15]
    # empty group
    assert group([]).apply_async().get(timeout=GET) == []


def test_group_waiting_then_ready(env):
    """``ready()``/``waiting()``/``completed_count()`` follow the members' states."""
    t, gate = env.t, f"group-{_tag()}"
    res = group(t.gated.s(gate, i) for i in range(2)).apply_async()
    try:
        wait_for(lambda: len([r for r in env.project.runs("gated") if r["gate"] == gate]) == 2,
                 GET, message=env.tails)
        assert not res.ready() and res.waiting()
        assert res.completed_count() == 0
    finally:
        env.project.open_gate(gate)
    assert res.get(timeout=GET) == [0, 1]
    assert res.ready() and not res.waiting() and res.completed_count() == 2


def test_group_with_a_failure(env):
    t, label = env.t, _tag()
    res = group(t.add.s(1, 1), t.fail_with.s(message=label), t.add.s(2, 2)).apply_async()
    with pytest.raises(ValueError, match=label):
        res.get(timeout=GET)
    wait_for(res.ready, GET)
    assert res.failed() and not res.successful()
    assert res.completed_count() == 2
    values = res.get(timeout=GET, propagate=False)
    assert values[0] == 2 and values[2] == 4
    assert isinstance(values[1], ValueError) and label in str(values[1])


def test_group_save_and_restore(env):
    t = env.t
    res = group(t.add.s(i, i) for i in range(5)).apply_async()
    res.save()
    restored = GroupResult.restore(res.id, app=env.app)
    assert restored is not None and restored.id == res.id
    assert [r.id for r in restored.results] == [r.id for r in res.results]
    assert restored.get(timeout=GET) == [0, 2, 4, 6, 8]
    assert GroupResult.restore(str(uuid.uuid4()), app=env.app) is None


@pytest.mark.timeout(240)
def test_a_thousand_task_group_comes_back_complete_and_in_order(env):
    t = env.t
    res = group(t.add.s(i, i) for i in range(1000)).apply_async()
    assert len(res) == 1000
    assert res.get(timeout=180) == [2 * i for i in range(1000)]
    assert res.completed_count() == 1000


# -- chords --------------------------------------------------------------------------------

def test_chord_body_gets_the_header_results_in_order(chord_env):
    """Header tasks finish out of order; the body receives their results in header order."""
    t, label = chord_env.t, _tag()
    header = [t.delayed.s(i, seconds=0.03 * (6 - i)) for i in range(6)]
    res = chord(header, t.identity.s(label=label)).apply_async()
    assert res.get(timeout=GET) == list(range(6))
    assert isinstance(res.parent, GroupResult)
    assert res.parent.get(timeout=GET) == list(range(6))
    (body,) = chord_env.wait_runs("identity", label)
    assert body["id"] == res.id and body["value"] == list(range(6))
    assert body["group"] == res.parent.id
    chord_env.settle()
    assert len(chord_env.runs("identity", label)) == 1      # the body runs exactly once


def test_chord_call_forms(chord_env):
    t = chord_env.t
    assert chord([t.add.s(1, 1), t.add.s(2, 2)])(t.tsum.s()).get(timeout=GET) == 6
    assert chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())().get(timeout=GET) == 6
    # partial: the call's args go to every header task
    assert chord([t.add.s(1), t.add.s(2)], t.tsum.s()).apply_async((10,)).get(timeout=GET) == 23
    # a group piped into a signature is a chord
    assert (group(t.add.s(i, i) for i in range(5)) | t.tsum.s()).delay().get(timeout=GET) == 20


def test_chord_header_error_fails_the_chord_and_runs_the_body_errback(chord_env):
    """A header task fails: the chord's result is FAILURE with ChordError naming the failed
    task, the body never runs, and its ``link_error`` errback runs with (request, exc, tb)."""
    t, label = chord_env.t, _tag()
    body = t.identity.s(label=f"{label}-body")
    body.link_error(t.errback_request.s(label=f"{label}-errback"))
    header = [t.add.s(1, 1), t.fail_with.s(message=f"{label}-bad"), t.add.s(2, 2)]
    res = chord(header, body).apply_async()
    with pytest.raises(ChordError) as info:
        res.get(timeout=GET)
    failed_id = res.parent[1].id
    message = str(info.value)
    assert "Dependency" in message and failed_id in message, message
    assert "ValueError" in message and f"{label}-bad" in message, message
    assert res.state == states.FAILURE
    (errback,) = chord_env.wait_runs("errback_request", f"{label}-errback")
    assert errback["exc_type"] == "ChordError" and failed_id in errback["exc"]
    chord_env.settle()
    assert chord_env.runs("identity", f"{label}-body") == []
    chord_env.assert_never_received([res.id])


def test_chord_with_an_empty_header_calls_the_body_with_an_empty_list(chord_env):
    t, label = chord_env.t, _tag()
    res = chord([], t.identity.s(label=label)).apply_async()
    assert res.get(timeout=GET) == []
    (body,) = chord_env.wait_runs("identity", label)
    assert body["value"] == []


def test_chord_with_a_chain_body(chord_env):
    """The chord's result is the body chain's final result."""
    t, label = chord_env.t, _tag()
    res = chord([t.add.s(1, 1), t.add.s(2, 2)],
                t.tsum.s() | t.step.s(100, label=label)).apply_async()
    assert res.get(timeout=GET) == 106
    (last,) = chord_env.wait_runs("step", label)
    assert last["id"] == res.id and last["x"] == 6


def test_chord_refused_on_rpc_results(env):
    """rpc:// cannot count a chord's parts: the chord is refused before anything is sent."""
    if not env.project.backend_url.startswith("rpc://"):
        pytest.skip("only rpc:// results refuse chords")
    t, label = env.t, _tag()
    header = group(t.identity.s(i, label=label) for i in range(3))
    with pytest.raises(ImproperlyConfigured, match=r"rpc://") as info:
        chord(header, t.tsum.s()).apply_async()
    assert "sqlite" in str(info.value) and "redis" in str(info.value)
    with pytest.raises(ImproperlyConfigured):
        (group(t.add.s(1, 1), t.add.s(2, 2)) | t.tsum.s()).delay()
    env.settle()
    assert env.runs("identity", label) == []


def test_chain_with_a_group_in_the_middle_refused_on_rpc_results(env):
    """A group followed by more steps is a chord: with rpc:// results it fails with the same
    ImproperlyConfigured error (when sent, or from ``get()``), and no pool process dies."""
    if not env.project.backend_url.startswith("rpc://"):
        pytest.skip("only rpc:// results refuse chords")
    t = env.t
    workflow = chain(t.add.s(1, 1), group(t.mul.s(2), t.mul.s(3)), t.tsum.s())
    try:
        res = workflow.apply_async()
    except ImproperlyConfigured as exc:
        refused: BaseException = exc
    else:
        with pytest.raises(ImproperlyConfigured) as info:
            res.get(timeout=GET)
        refused = info.value
    assert "rpc://" in str(refused) and "redis" in str(refused)
    env.settle()
    for worker in env.workers:
        assert not worker.log_lines(r"exited prematurely|process running it exited"), \
            worker.tail()


# -- nesting -------------------------------------------------------------------------------

def test_chord_inside_a_chain(chord_env):
    t, label = chord_env.t, _tag()
    workflow = chain(t.add.s(1, 1),                                  # 2
                     chord([t.add.s(1), t.add.s(2)], t.tsum.s()),     # (2+1) + (2+2) = 7
                     t.step.s(100, label=label))                     # 107
    assert workflow.apply_async().get(timeout=GET) == 107
    piped = (t.add.s(1, 1) | chord([t.mul.s(3), t.mul.s(4)], t.tsum.s())
             | t.step.s(1000, label=label))
    assert piped.apply_async().get(timeout=GET) == 1014
    assert sorted(run["x"] for run in chord_env.wait_runs("step", label, 2)) == [7, 14]


def test_chain_with_a_group_in_the_middle(chord_env):
    t, label = chord_env.t, _tag()
    res = chain(t.add.s(1, 1), group(t.mul.s(2), t.mul.s(3)), t.tsum.s(),
                t.step.s(100, label=label)).apply_async()
    assert res.get(timeout=GET) == 110            # 2 -> [4, 6] -> 10 -> 110
    (last,) = chord_env.wait_runs("step", label)
    assert last["id"] == res.id and last["x"] == 10


def test_group_of_chains(env):
    t = env.t
    res = group(chain(t.add.s(1, 1), t.mul.s(10)), t.add.s(2, 2) | t.mul.s(10),
                t.add.s(3, 3) | t.mul.s(10) | t.add.s(1)).apply_async()
    assert res.get(timeout=GET) == [20, 40, 61]


# -- chunks, map, starmap ------------------------------------------------------------------

def test_map_and_starmap_run_in_one_task(env):
    t = env.t
    assert t.tsum.map([[1, 2], [3, 4, 5], []]).delay().get(timeout=GET) == [3, 12, 0]
    assert t.add.starmap([(1, 2), (3, 4), ("a", "b")]).apply_async().get(timeout=GET) == \
        [3, 7, "ab"]


def test_chunks(env):
    t = env.t
    pairs = list(zip(range(10), range(10)))
    expected = [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]
    res = t.add.chunks(pairs, 3).apply_async()
    assert isinstance(res, GroupResult) and len(res) == 4
    assert res.get(timeout=GET) == expected
    assert t.add.chunks(pairs, 3).group().apply_async().get(timeout=GET) == expected


# -- link / link_error ---------------------------------------------------------------------

def test_link_as_one_signature_and_as_a_list(env):
    t, label = env.t, _tag()
    result = t.add.apply_async((2, 2), link=t.identity.s(label=f"{label}-one"))
    assert result.get(timeout=GET) == 4
    (one,) = env.wait_runs("identity", f"{label}-one")
    assert one["value"] == 4 and one["parent_id"] == result.id
    result = t.add.apply_async((3, 3), link=[t.identity.s(label=f"{label}-a"),
                                             t.identity.s(label=f"{label}-b")])
    assert result.get(timeout=GET) == 6
    for name in ("a", "b"):
        (run,) = env.wait_runs("identity", f"{label}-{name}")
        assert run["value"] == 6 and run["parent_id"] == result.id
    sig = t.add.s(5, 5)
    sig.link(t.identity.s(label=f"{label}-sig"))
    assert sig.delay().get(timeout=GET) == 10
    (run,) = env.wait_runs("identity", f"{label}-sig")
    assert run["value"] == 10


def test_link_error_as_one_signature_and_as_a_list(env):
    """Errbacks: one taking (request, exc, traceback) runs in the worker with the failure;
    one taking a single argument is sent with the failed task's id."""
    t, label = env.t, _tag()
    failed = t.fail_with.apply_async(kwargs={"message": f"{label}-one"},
                                     link_error=t.errback_id.s())
    with pytest.raises(ValueError):
        failed.get(timeout=GET)
    wait_for(lambda: [r for r in env.project.runs("errback_id") if r["failed_id"] == failed.id],
             GET, message=env.tails)

    failed = t.fail_with.apply_async(
        kwargs={"message": f"{label}-list"},
        link_error=[t.errback_request.s(label=label), t.errback_id.s()])
    with pytest.raises(ValueError):
        failed.get(timeout=GET)
    (errback,) = env.wait_runs("errback_request", label)
    assert errback["failed_id"] == failed.id
    assert errback["exc_type"] == "ValueError" and errback["exc"] == f"{label}-list"
    assert "ValueError" in errback["traceback"] and "Traceback" in errback["traceback"]
    (by_id,) = wait_for(lambda: [r for r in env.project.runs("errback_id")
                                 if r["failed_id"] == failed.id], GET, message=env.tails)
    assert by_id["parent_id"] == failed.id


def test_link_runs_only_on_success_and_link_error_only_on_failure(env):
    t, label = env.t, _tag()
    ok = t.add.apply_async((1, 1), link_error=t.errback_request.s(label=f"{label}-ok"))
    bad = t.fail_with.apply_async(kwargs={"message": label},
                                  link=t.identity.s(label=f"{label}-bad"))
    assert ok.get(timeout=GET) == 2
    with pytest.raises(ValueError):
        bad.get(timeout=GET)
    env.settle()
    assert env.runs("errback_request", f"{label}-ok") == []
    assert env.runs("identity", f"{label}-bad") == []
