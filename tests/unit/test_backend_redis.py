"""The Redis result backend against a real ``redis-server``: Celery's keys, SETEX + PUBLISH in
one transaction, waiting on PUB/SUB, results Celery wrote, outages."""
from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import time
import uuid

import pytest
import redis

from qctl import states
from qctl.backends import by_url
from qctl.backends.redis import RedisBackend
from qctl.exceptions import OperationalError
from tests.servers_redis import redis_server, redis_url, start_redis, stop_redis  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make(redis_url):
    """``make()``: a new backend object on one freshly emptied db."""
    made = []

    def factory():
        backend = by_url(redis_url)
        made.append(backend)
        return backend
    yield factory
    for backend in made:
        backend.close()


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def success(task_id: str, result=4) -> dict:
    return {"status": states.SUCCESS, "result": result, "traceback": None, "children": [],
            "date_done": "2026-01-01T00:00:00+00:00", "task_id": task_id}


# -- the primitives (as for memory:// and sqlite://) --------------------------------------

def test_by_url_picks_redis(redis_url):
    assert isinstance(by_url(redis_url), RedisBackend)
    assert isinstance(by_url("rediss://localhost:6380/1"), RedisBackend)


def test_set_get_overwrite_delete(make, r):
    b, other = make(), make()
    assert b.get("t1") is None
    b.set("t1", b"started", "STARTED")
    assert other.get("t1") == b"started"
    other.set("t1", b"done", "SUCCESS")
    assert b.get("t1") == b"done" and r.get("celery-task-meta-t1") == b"done"
    b.delete("t1")
    b.delete("t1")
    assert other.get("t1") is None and not r.exists("celery-task-meta-t1")


def test_set_many_and_group_keys(make, r):
    b = make()
    b.set_many([("a", b"1", "SUCCESS"), ("b", b"2", "FAILURE"), ("a", b"3", "SUCCESS")])
    b.set_many([])
    assert (b.get("a"), b.get("b")) == (b"3", b"2")
    b.set_raw("celery-taskset-meta-g1", b"meta")
    assert b.get_raw("celery-taskset-meta-g1") == b"meta"
    assert r.get("celery-taskset-meta-g1") == b"meta" and r.ttl("celery-taskset-meta-g1") > 86000
    b.delete("celery-taskset-meta-g1")
    assert not r.exists("celery-taskset-meta-g1")


def test_expiry_like_celery(make, r):
    b = make()
    assert b.expires == 86400
    b.set("day", b"x", "SUCCESS")
    assert 86390 < r.ttl("celery-task-meta-day") <= 86400
    b.expires = 0.1
    b.set("short", b"x", "SUCCESS")
    assert b.get("short") == b"x"
    wait_until(lambda: b.get("short") is None)
    b.expires = None                                 # no expiry at all: plain SET
    b.set("forever", b"y", "SUCCESS")
    assert r.ttl("celery-task-meta-forever") == -1


def test_meta_round_trip_and_pending(make):
    b = make()
    b.store_result("t", success("t", {"a": [1, 2]}))
    assert b.get_task_meta("t")["result"] == {"a": [1, 2]}
    assert b.get_task_meta("nope")["status"] == states.PENDING


# -- Celery's write pattern ----------------------------------------------------------------

def _monitor(url: str, lines: list[str], started: threading.Event, stop: threading.Event) -> None:
    host, port = url.split("//", 1)[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=0.2) as sock:
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            buffer += data
            *done, buffer = buffer.split(b"\r\n")
            for line in done:
                if line == b"+OK":
                    started.set()
                else:
                    lines.append(line.decode("utf-8", "replace"))


def test_setex_and_publish_in_one_transaction(make, r, redis_url):
    b = make()
    task_id = str(uuid.uuid4())
    key = f"celery-task-meta-{task_id}"
    subscriber = r.pubsub()
    subscriber.subscribe(key)                         # as a waiting Celery client does
    assert subscriber.get_message(timeout=2)["type"] == "subscribe"
    lines: list[str] = []
    started, stop = threading.Event(), threading.Event()
    monitor = threading.Thread(target=_monitor, args=(redis_url, lines, started, stop))
    monitor.start()
    assert started.wait(5)
    data = b.encode(success(task_id))
    b.set(task_id, data, states.SUCCESS)
    message = subscriber.get_message(timeout=2)
    assert message["type"] == "message" and message["channel"] == key.encode()
    assert message["data"] == data and r.get(key) == data
    wait_until(lambda: any('"EXEC"' in line for line in lines))
    stop.set()
    monitor.join(5)
    commands = [line.split("] ", 1)[1].split(" ")[0].strip('"') for line in lines if "] " in line]
    start = commands.index("MULTI")
    assert commands[start:start + 4] == ["MULTI", "SETEX", "PUBLISH", "EXEC"]
    setex = next(line for line in lines if '"SETEX"' in line)
    assert f'"SETEX" "{key}" "86400"' in setex
    subscriber.close()


def test_reads_what_celery_wrote(make, r):
    celery_meta = ('{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["boom"],'
                   ' "exc_module": "builtins"}, "traceback": "Traceback ...\\nValueError: boom\\n",'
                   ' "children": [], "date_done": "2026-11-21T22:23:09.220546+00:00",'
                   ' "task_id": "f0000000-0000-0000-0000-000000000001"}')
    r.set("celery-task-meta-f0000000-0000-0000-0000-000000000001", celery_meta, ex=86400)
    meta = make().get_task_meta("f0000000-0000-0000-0000-000000000001")
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "ValueError"
    assert json.loads(celery_meta) == meta


# -- waiting -------------------------------------------------------------------------------

def test_wait_for_change_wakes_on_set(make):
    b, writer = make(), make()
    assert b.get("t") is None
    timer = threading.Timer(0.2, lambda: writer.set("t", b"x", "SUCCESS"))
    timer.start()
    started = time.monotonic()
    b.wait_for_change(["t"], 5.0)
    waited = time.monotonic() - started
    timer.join()
    assert 0.15 < waited < 0.5
    assert b.get("t") == b"x"


def test_wait_for_change_sees_change_made_since_last_get(make):
    b, writer = make(), make()
    assert b.get("t") is None
    writer.set("t", b"x", "SUCCESS")
    started = time.monotonic()
    b.wait_for_change(["t"], 5.0)                    # stored before the subscription: no wait
    assert time.monotonic() - started < 0.5


def test_wait_for_change_times_out_and_ignores_other_tasks(make):
    b, writer = make(), make()
    b.get("t")
    timer = threading.Timer(0.05, lambda: writer.set("other", b"x", "SUCCESS"))
    timer.start()
    started = time.monotonic()
    b.wait_for_change(["t"], 0.3)
    assert 0.25 <= time.monotonic() - started < 2.0
    timer.join()


def test_waiting_client_gets_the_result_within_milliseconds(make):
    b, writer = make(), make()
    task_id = str(uuid.uuid4())
    stored = []

    def store():
        stored.append(time.monotonic())
        writer.store_result(task_id, success(task_id, 9))
    b.get(task_id)
    timer = threading.Timer(0.2, store)
    timer.start()
    meta = b.wait_for(task_id, timeout=5, interval=0.5)
    returned = time.monotonic()
    timer.join()
    assert meta["result"] == 9
    assert returned - stored[0] < 0.05                # not the polling interval


def test_wait_for_many_in_threads(make):
    b, writer = make(), make()
    ids = [str(uuid.uuid4()) for _ in range(8)]
    results = {}

    def wait(task_id):
        results[task_id] = b.wait_for(task_id, timeout=10)["result"]
    threads = [threading.Thread(target=wait, args=(i,)) for i in ids]
    for th in threads:
        th.start()
    time.sleep(0.1)
    writer.set_many([(i, writer.encode(success(i, n)), "SUCCESS") for n, i in enumerate(ids)])
    for th in threads:
        th.join(10)
    assert results == {i: n for n, i in enumerate(ids)}


# -- processes and outages -----------------------------------------------------------------

def _child_set(backend, pipe):
    try:
        backend.set("from-child", b"c", "SUCCESS")
        pipe.send(backend.get("from-parent"))
    except BaseException as exc:
        pipe.send(repr(exc))


def test_after_fork(make):
    b = make()
    b.set("from-parent", b"p", "SUCCESS")
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child_set, args=(b, theirs))
    child.start()
    assert ours.poll(30) and ours.recv() == b"p"
    child.join(30)
    assert child.exitcode == 0 and b.get("from-child") == b"c"


def test_operational_error_while_down(tmp_path):
    url, server = start_redis(tmp_path, password="hush-hush")
    b = RedisBackend(url.replace("/0", "/1"))
    port = url.rsplit(":", 1)[1].split("/")[0]
    try:
        b.set("t", b"x", "SUCCESS")
        stop_redis(server)
        for call in (lambda: b.set("t", b"y", "SUCCESS"), lambda: b.get("t"),
                     lambda: b.wait_for_change(["t"], 0.5)):
            with pytest.raises(OperationalError) as info:
                call()
            text = str(info.value)
            assert "hush-hush" not in text and "\n" not in text and port in text
        _, server = start_redis(tmp_path, port=int(port), password="hush-hush")
        b.set("t", b"z", "SUCCESS")
        assert b.get("t") == b"z"
    finally:
        b.close()
        stop_redis(server)
