"""Chord counting in the result backends (memory, sqlite, redis): exactly one caller -- the one
whose part completes the header -- gets every part in header order; duplicates count once;
races between threads and between processes; values round trip; cleanup. rpc:// and a
disabled backend refuse chords with a clear error."""
from __future__ import annotations

import datetime
import multiprocessing
import sqlite3
import threading
import uuid

import pytest

from qctl import states
from qctl.backends import ResultBackend, by_url
from qctl.backends.redis import chord_keys
from qctl.backends.rpc import RpcBackend
from qctl.exceptions import ImproperlyConfigured, TaskRevokedError
from qctl.result import exception_to_meta, meta_to_exception
from tests.servers_redis import redis_server, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)

COUNTING = ["memory", "sqlite", "redis"]


@pytest.fixture(params=COUNTING)
def url(request, tmp_path):
    """A result-backend URL on a fresh store, one per counting backend."""
    if request.param == "memory":
        return f"memory://chords-{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/results.db"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def make(url):
    """``make()``: a new backend object on the shared store of ``url``."""
    made = []

    def factory():
        backend = by_url(url)
        made.append(backend)
        return backend
    yield factory
    for backend in made:
        backend.close()


def gid() -> str:
    return str(uuid.uuid4())


def test_only_the_completing_part_gets_all_parts_in_header_order(make):
    b, other = make(), make()
    group_id = gid()
    b.chord_set_size(group_id, 3)
    assert b.chord_part_return(group_id, "t2", 2, states.SUCCESS, 12) is None
    assert other.chord_part_return(group_id, "t0", 0, states.SUCCESS, 10) is None
    parts = b.chord_part_return(group_id, "t1", 1, states.SUCCESS, 11)
    assert parts == [("t0", states.SUCCESS, 10), ("t1", states.SUCCESS, 11),
                     ("t2", states.SUCCESS, 12)]


def test_a_duplicate_part_counts_once(make):
    b, other = make(), make()
    group_id = gid()
    b.chord_set_size(group_id, 2)
    assert b.chord_part_return(group_id, "t0", 0, states.SUCCESS, "first") is None
    # Reported again (a redelivered message), even with another value: not counted again.
    assert other.chord_part_return(group_id, "t0", 0, states.SUCCESS, "again") is None
    parts = other.chord_part_return(group_id, "t1", 1, states.FAILURE, exception_to_meta(KeyError("k")))
    assert [p[0] for p in parts] == ["t0", "t1"]
    assert parts[0][2] == "first"
    # After completion nobody else is handed the parts, not even the completing task again.
    assert b.chord_part_return(group_id, "t1", 1, states.SUCCESS, 1) is None
    assert b.chord_part_return(group_id, "t9", 9, states.SUCCESS, 1) is None


def test_values_and_exception_metas_round_trip(make):
    b = make()
    group_id = gid()
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    values = [
        (states.SUCCESS, {"nested": [1, 2.5, None, True], "text": "grüße"}),
        (states.SUCCESS, when),
        (states.SUCCESS, None),
        (states.FAILURE, exception_to_meta(ValueError("boom", 3))),
        (states.REVOKED, exception_to_meta(TaskRevokedError("revoked"))),
    ]
    b.chord_set_size(group_id, len(values))
    answers = [b.chord_part_return(group_id, f"t{i}", i, state, value)
               for i, (state, value) in enumerate(values)]
    assert answers[:-1] == [None] * (len(values) - 1)
    parts = answers[-1]
    assert [(state, value) for _, state, value in parts] == values
    failure = meta_to_exception(parts[3][2])
    assert type(failure) is ValueError and failure.args == ("boom", 3)
    revoked = meta_to_exception(parts[4][2])
    assert type(revoked) is TaskRevokedError and revoked.args == ("revoked",)


def test_parts_of_unknown_or_finished_chords_are_ignored_until_applied_again(make):
    b = make()
    never_sized = gid()
    assert b.chord_part_return(never_sized, "t0", 0, states.SUCCESS, 1) is None
    group_id = gid()
    b.chord_set_size(group_id, 1)
    assert b.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1) == [("t0", states.SUCCESS, 1)]
    b.chord_cleanup(group_id)
    b.chord_cleanup(group_id)  # idempotent
    assert b.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1) is None
    assert b.chord_part_return(group_id, "late", 1, states.SUCCESS, 1) is None
    # The same (frozen) chord applied once more counts from zero.
    b.chord_set_size(group_id, 2)
    assert b.chord_part_return(group_id, "t0", 0, states.SUCCESS, "a") is None
    assert b.chord_part_return(group_id, "t1", 1, states.SUCCESS, "b") == [
        ("t0", states.SUCCESS, "a"), ("t1", states.SUCCESS, "b")]


def test_chords_are_counted_apart(make):
    b = make()
    first, second = gid(), gid()
    b.chord_set_size(first, 2)
    b.chord_set_size(second, 1)
    assert b.chord_part_return(first, "a0", 0, states.SUCCESS, 1) is None
    assert b.chord_part_return(second, "b0", 0, states.SUCCESS, 2) == [("b0", states.SUCCESS, 2)]
    assert b.chord_part_return(first, "a1", 1, states.SUCCESS, 3) == [
        ("a0", states.SUCCESS, 1), ("a1", states.SUCCESS, 3)]


@pytest.mark.timeout(90)
def test_threads_racing_one_winner(make):
    size, rounds = 12, 5
    backends = [make() for _ in range(size)]
    for _ in range(rounds):
        group_id = gid()
        backends[0].chord_set_size(group_id, size)
        barrier = threading.Barrier(size)
        answers: list = [None] * size
        errors: list = []

        def report(i: int) -> None:
            try:
                barrier.wait(10)
                answers[i] = backends[i].chord_part_return(group_id, f"t{i}", i, states.SUCCESS, i * i)
                # A second report right away, as if the message came twice.
                assert backends[i].chord_part_return(group_id, f"t{i}", i, states.SUCCESS, -1) is None
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=report, args=(i,)) for i in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        winners = [a for a in answers if a is not None]
        assert len(winners) == 1
        assert winners[0] == [(f"t{i}", states.SUCCESS, i * i) for i in range(size)]


def _report_from_child(url: str, group_id: str, ids: list[int], barrier, answers) -> None:
    backend = by_url(url)
    try:
        barrier.wait(20)
        got = [backend.chord_part_return(group_id, f"t{i}", i, states.SUCCESS, f"v{i}") for i in ids]
        got += [backend.chord_part_return(group_id, f"t{i}", i, states.SUCCESS, "dup") for i in ids]
        answers.put([g for g in got if g is not None])
    finally:
        backend.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("url", ["sqlite", "redis"], indirect=True)
def test_processes_racing_one_winner(url, make):
    processes, per_process, rounds = 4, 3, 3
    size = processes * per_process
    ctx = multiprocessing.get_context("fork")
    b = make()
    for _ in range(rounds):
        group_id = gid()
        b.chord_set_size(group_id, size)
        barrier, answers = ctx.Barrier(processes), ctx.Queue()
        children = [ctx.Process(target=_report_from_child,
                                args=(url, group_id, list(range(p, size, processes)), barrier, answers))
                    for p in range(processes)]
        for child in children:
            child.start()
        got = [answers.get(timeout=60) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        winners = [w for per_child in got for w in per_child]
        assert len(winners) == 1
        assert winners[0] == [(f"t{i}", states.SUCCESS, f"v{i}") for i in range(size)]


# -- what each store keeps ----------------------------------------------------------------

@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_sqlite_parts_are_rows_and_cleanup_deletes_them(url, make):
    b = make()
    group_id = gid()
    b.chord_set_size(group_id, 2)
    b.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1)
    b.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1)
    db = sqlite3.connect(url[len("sqlite:///"):])
    try:
        count = "SELECT COUNT(*) FROM chord_parts WHERE group_id = ?"
        assert db.execute(count, (group_id,)).fetchone()[0] == 1
        assert b.chord_part_return(group_id, "t1", 1, states.SUCCESS, 2) is not None
        b.chord_cleanup(group_id)
        assert db.execute(count, (group_id,)).fetchone()[0] == 0
    finally:
        db.close()


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_redis_uses_celery_chord_keys(url, make):
    import redis
    b = make()
    client = redis.Redis.from_url(url)
    try:
        group_id = gid()
        j, t, s, d, c = chord_keys(group_id)
        assert s == f"celery-taskset-meta-{group_id}.s"
        client.set(c, "done")       # left by an earlier application: applying clears it
        b.chord_set_size(group_id, 2)
        assert client.get(s) == b"2" and 0 < client.ttl(s) <= 86400 and not client.exists(c)
        assert b.chord_part_return(group_id, "t1", 1, states.SUCCESS, 5) is None
        (member, score), = client.zrange(j, 0, -1, withscores=True)
        assert score == 1 and b.decode(member) == [1, "t1", states.SUCCESS, 5]
        assert client.smembers(d) == {b"t1:1"}
        client.incr(t)              # Celery's add_to_chord: one more header task is coming
        assert b.chord_part_return(group_id, "t0", 0, states.SUCCESS, 4) is None
        parts = b.chord_part_return(group_id, "t2", 2, states.SUCCESS, 6)
        assert [p[2] for p in parts] == [4, 5, 6]
        assert client.exists(c)     # claimed: nobody else completes it
        b.chord_cleanup(group_id)
        assert not client.exists(j, t, s, d)
        assert client.get(c) == b"done" and 0 < client.ttl(c) <= 300
    finally:
        client.close()


@pytest.mark.parametrize("url", ["memory"], indirect=True)
def test_memory_counts_across_backend_objects_of_one_url_only(url, make):
    b, same = make(), make()
    elsewhere = by_url(f"memory://chords-{uuid.uuid4().hex}")
    group_id = gid()
    b.chord_set_size(group_id, 1)
    assert elsewhere.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1) is None
    assert same.chord_part_return(group_id, "t0", 0, states.SUCCESS, 1) == [("t0", states.SUCCESS, 1)]


# -- backends that cannot count -----------------------------------------------------------

def test_rpc_refuses_chords():
    backend = RpcBackend("rpc://", options={"broker_url": "amqp://guest:guest@127.0.0.1:1//"})
    for call in (lambda: backend.chord_set_size("g", 2),
                 lambda: backend.chord_part_return("g", "t", 0, states.SUCCESS, 1),
                 lambda: backend.chord_cleanup("g")):
        with pytest.raises(ImproperlyConfigured) as info:
            call()
        assert str(info.value) == ("chords need a result backend that can count: sqlite, redis "
                                   "or memory — rpc:// cannot")


def test_disabled_backend_refuses_chords():
    with pytest.raises(ImproperlyConfigured, match="chords need a result backend that can count"):
        by_url("disabled://").chord_set_size("g", 1)


def test_base_class_leaves_chords_to_subclasses():
    backend = ResultBackend("custom://")
    for call in (lambda: backend.chord_set_size("g", 2),
                 lambda: backend.chord_part_return("g", "t", 0, states.SUCCESS, 1),
                 lambda: backend.chord_cleanup("g")):
        with pytest.raises(NotImplementedError):
            call()
