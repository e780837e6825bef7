"""The local result backends: memory:// and sqlite:// (including sharing the broker's file)."""
from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
import uuid

import pytest

from qctl.backends import by_url
from qctl.backends.memory import MemoryBackend
from qctl.backends.sqlite import SqliteBackend
from qctl.exceptions import OperationalError
from qctl.transports import Envelope
from qctl.transports.sqlite import SqliteTransport

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "sqlite"])
def make(request, tmp_path):
    """``make()``: a new backend object on one shared store."""
    if request.param == "memory":
        url = f"memory://results-{uuid.uuid4().hex}"
    else:
        url = f"sqlite:///{tmp_path}/results.db"
    made = []

    def factory():
        backend = by_url(url)
        made.append(backend)
        return backend
    yield factory
    for backend in made:
        backend.close()


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_set_get_overwrite_delete(make):
    b, other = make(), make()
    assert b.get("t1") is None
    b.set("t1", b"started", "STARTED")
    assert other.get("t1") == b"started"
    other.set("t1", b"done", "SUCCESS")
    assert b.get("t1") == b"done"
    b.delete("t1")
    b.delete("t1")
    assert other.get("t1") is None


def test_set_many_and_raw(make):
    b = make()
    b.set_many([("a", b"1", "SUCCESS"), ("b", b"2", "FAILURE"), ("a", b"3", "SUCCESS")])
    b.set_many([])
    assert (b.get("a"), b.get("b")) == (b"3", b"2")
    b.set_raw("group-1", b"meta")
    assert b.get_raw("group-1") == b"meta"


def test_expired_results_are_ignored(make):
    b = make()
    b.expires = 0.1
    b.set("t", b"x", "SUCCESS")
    assert b.get("t") == b"x"
    wait_until(lambda: b.get("t") is None)
    b.expires = None                                 # no expiry at all
    b.set("forever", b"y", "SUCCESS")
    assert b.get("forever") == b"y"


def test_wait_for_change_wakes_on_set(make):
    b, writer = make(), make()
    assert b.get("t") is None
    timer = threading.Timer(0.2, lambda: writer.set("t", b"x", "SUCCESS"))
    timer.start()
    started = time.monotonic()
    b.wait_for_change(["t"], 5.0)
    waited = time.monotonic() - started
    timer.join()
    assert 0.1 < waited < 1.0
    assert b.get("t") == b"x"


def test_wait_for_change_sees_change_made_since_last_get(make):
    b, writer = make(), make()
    assert b.get("t") is None
    th = threading.Thread(target=writer.set, args=("t", b"x", "SUCCESS"))
    th.start()
    th.join()
    started = time.monotonic()
    b.wait_for_change(["t"], 5.0)                    # the change already happened: no wait
    assert time.monotonic() - started < 0.5


def test_wait_for_change_times_out(make):
    b = make()
    b.get("t")
    started = time.monotonic()
    b.wait_for_change(["t"], 0.3)
    assert 0.25 <= time.monotonic() - started < 2.0


def test_memory_backend_shared_per_url():
    url = f"memory://{uuid.uuid4().hex}"
    MemoryBackend(url).set("t", b"x", "SUCCESS")
    assert MemoryBackend(url).get("t") == b"x"
    assert MemoryBackend(url + "x").get("t") is None
    assert isinstance(by_url("memory://"), MemoryBackend)


def test_sqlite_backend_table_and_lazy_cleanup(tmp_path):
    b = SqliteBackend(f"sqlite:///{tmp_path}/r.db")
    b.expires = 0.05
    b.set("old", b"x", "SUCCESS")
    wait_until(lambda: b.get("old") is None)
    conn = sqlite3.connect(str(tmp_path / "r.db"))
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1   # still stored
    b._last_cleanup = 0.0                            # as if a minute had passed
    b.expires = None
    b.set("new", b"y", "SUCCESS")
    assert conn.execute("SELECT task_id, status, expires FROM results").fetchall() == [
        ("new", "SUCCESS", None)]
    conn.close()
    b.close()


def test_sqlite_backend_shares_file_with_broker(tmp_path):
    url = f"sqlite:///{tmp_path}/both.db"
    transport, backend = SqliteTransport(url), SqliteBackend(url)
    transport.publish("q", Envelope(b"m"))
    backend.set("t", b"r", "SUCCESS")
    [d] = transport.fetch(["q"], 1, 0)
    transport.ack([d.tag])
    assert backend.get("t") == b"r" and transport.queue_size("q") == 0
    # A broker commit wakes a result waiter (a spurious wake-up, which is allowed) quickly.
    backend.get("t")
    timer = threading.Timer(0.1, lambda: SqliteBackend(url).set("t2", b"x", "SUCCESS"))
    timer.start()
    started = time.monotonic()
    backend.wait_for_change(["t2"], 5.0)
    assert time.monotonic() - started < 1.0
    timer.join()
    transport.close()
    backend.close()


def test_sqlite_backend_missing_directory(tmp_path):
    b = SqliteBackend(f"sqlite:///{tmp_path}/missing/r.db")
    with pytest.raises(OperationalError, match="missing"):
        b.get("t")
    with pytest.raises(OperationalError):
        b.set("t", b"x", "SUCCESS")


def _child_set(backend, pipe):
    try:
        backend.set("from-child", b"c", "SUCCESS")
        pipe.send(backend.get("from-parent"))
    except BaseException as exc:
        pipe.send(repr(exc))


def test_sqlite_backend_after_fork(tmp_path):
    b = SqliteBackend(f"sqlite:///{tmp_path}/r.db")
    b.set("from-parent", b"p", "SUCCESS")
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child_set, args=(b, theirs))
    child.start()
    assert ours.poll(30) and ours.recv() == b"p"
    child.join(30)
    assert child.exitcode == 0
    assert b.get("from-child") == b"c"
    b.close()
