"""Scheduler leases and fenced state on every broker: one holder at a time, takeover after the
holder's ttl, release or death, and state that only the current holder can write.

memory, SQLite (a temporary file), the session's Redis server and RabbitMQ node; processes
are real (a child holds the lease and is SIGKILLed)."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from qctl.transports import by_url
from tests.helpers import wait_for
from tests.servers_redis import redis_url  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)

KINDS = ["memory", "sqlite", "redis", "amqp"]
SERVER_KINDS = ["sqlite", "redis", "amqp"]     # brokers other processes can share


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def url(kind, request, tmp_path):
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/broker.sqlite3"
    if kind == "redis":
        return request.getfixturevalue("redis_url")
    return request.getfixturevalue("rabbit").url


@pytest.fixture
def make(url):
    """``make()``: a new transport on the test's broker (another scheduler, as it were)."""
    made = []

    def factory():
        transport = by_url(url)
        made.append(transport)
        return transport
    yield factory
    for transport in made:
        transport.close()


@pytest.fixture
def name(kind, url):
    """A fresh lease name: RabbitMQ's state queues are durable and the node is shared."""
    name = f"beat-{uuid.uuid4().hex[:10]}"
    yield name
    if kind == "amqp":
        import pika
        from qctl.transports.amqp_conn import connection_parameters
        conn = pika.BlockingConnection(connection_parameters(url))
        try:
            for queue_name in (f"qctl.state.{name}", f"qctl.holder.{name}"):
                conn.channel().queue_delete(queue_name)
        finally:
            conn.close()


# -- one holder at a time -------------------------------------------------------------------

def test_only_one_owner_holds_the_lease(make, name):
    a, b = make(), make()
    assert a.lease_holder(name) is None and b.lease_holder(name) is None
    assert a.acquire_lease(name, "A", 30) is True
    assert b.acquire_lease(name, "B", 30) is False
    assert a.acquire_lease(name, "B", 30) is False        # another owner, even on the same object
    assert a.acquire_lease(name, "A", 30) is True         # renewal
    assert a.lease_holder(name) == "A" and b.lease_holder(name) == "A"
    assert b.acquire_lease(f"{name}-other", "B", 30) is True   # names are independent
    b.release_lease(f"{name}-other", "B")


def test_racing_contenders_exactly_one_wins(make, name):
    contenders = [make() for _ in range(4)]
    barrier = threading.Barrier(len(contenders))
    won: dict[int, bool] = {}

    def contend(n: int) -> None:
        barrier.wait(10)
        won[n] = contenders[n].acquire_lease(name, f"owner-{n}", 30)
    threads = [threading.Thread(target=contend, args=(n,)) for n in range(len(contenders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == len(contenders)
    winners = [n for n, ok in won.items() if ok]
    assert len(winners) == 1
    assert contenders[0].lease_holder(name) == f"owner-{winners[0]}"


def test_renewal_keeps_the_lease_past_its_ttl(make, name):
    a, b = make(), make()
    ttl = 0.6
    assert a.acquire_lease(name, "A", ttl)
    until = time.monotonic() + 3 * ttl
    while time.monotonic() < until:
        time.sleep(ttl / 4)                 # renewing well within the ttl is the holder's job
        assert a.acquire_lease(name, "A", ttl) is True
        assert b.acquire_lease(name, "B", ttl) is False
    assert b.lease_holder(name) == "A"


def test_lapsed_lease_goes_to_another_and_fences_the_former_holder(make, name):
    a, b = make(), make()
    assert a.acquire_lease(name, "A", 0.5)
    assert a.save_state(name, "A", {"last": 1})
    # A stops renewing (its process lives on): the lease is free after its ttl.
    assert wait_for(lambda: b.acquire_lease(name, "B", 30), timeout=10)
    assert a.lease_holder(name) == "B"
    assert a.save_state(name, "A", {"last": 99}) is False   # must not overwrite B's state
    assert b.load_state(name) == {"last": 1}
    assert b.save_state(name, "B", {"last": 2}) is True
    assert a.acquire_lease(name, "A", 30) is False
    assert a.load_state(name) == {"last": 2}


def test_release_lets_another_take_it_at_once(make, name):
    a, b = make(), make()
    assert a.acquire_lease(name, "A", 60)
    b.release_lease(name, "B")                  # not B's: nothing happens
    a.release_lease(name, "nobody")
    assert b.acquire_lease(name, "B", 60) is False
    a.release_lease(name, "A")
    assert a.lease_holder(name) is None
    assert b.acquire_lease(name, "B", 60) is True   # no waiting for the ttl
    assert a.save_state(name, "A", {"x": 1}) is False
    a.release_lease(name, "A")                  # idempotent, and B keeps it
    assert a.lease_holder(name) == "B"


# -- fenced state ---------------------------------------------------------------------------

def test_only_the_holder_saves_state_and_load_returns_the_latest(make, name):
    a, b = make(), make()
    assert a.load_state(name) is None
    assert a.save_state(name, "A", {"n": 0}) is False       # nobody holds the lease
    assert a.load_state(name) is None
    assert a.acquire_lease(name, "A", 30)
    state = {"entries": {"tick": {"last_run_at": "2026-01-01T00:00:00+00:00", "total": 3}},
             "when": 1767225600.5, "names": ["a", "b"], "none": None}
    assert a.save_state(name, "A", state) is True
    assert b.save_state(name, "B", {"n": -1}) is False
    assert b.load_state(name) == state
    assert b.load_state(name) == state                        # reading leaves it in place
    for n in range(1, 4):
        assert a.save_state(name, "A", {"n": n}) is True
    assert b.load_state(name) == {"n": 3}
    assert a.load_state(name) == {"n": 3}


def test_state_must_be_a_json_object_and_ttl_positive(make, name):
    a = make()
    assert a.acquire_lease(name, "A", 30)
    with pytest.raises(TypeError):
        a.save_state(name, "A", ["not", "a", "dict"])     # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.save_state(name, "A", {"when": object()})
    for ttl in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            a.acquire_lease(name, "A", ttl)
    assert a.load_state(name) is None


def test_state_survives_new_transport_objects(make, url, name):
    a = make()
    assert a.acquire_lease(name, "A", 30)
    assert a.save_state(name, "A", {"sent": ["t1", "t2"]})
    a.release_lease(name, "A")
    a.close()
    fresh = by_url(url)
    try:
        assert fresh.load_state(name) == {"sent": ["t1", "t2"]}
        assert fresh.lease_holder(name) is None
    finally:
        fresh.close()


# -- holders in other processes -------------------------------------------------------------

CHILD = r"""
import sys, time
from qctl.transports import by_url
url, name, owner, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t = by_url(url)
while not t.acquire_lease(name, owner, ttl):
    time.sleep(0.05)
assert t.save_state(name, owner, {"by": owner})
print("held", flush=True)
while True:
    if not t.acquire_lease(name, owner, ttl):
        print("lost", flush=True)
    time.sleep(ttl / 5)
"""


def _start_holder(url: str, name: str, owner: str, ttl: float,
                  cwd: str) -> tuple[subprocess.Popen, queue.Queue]:
    """A child process that takes the lease, saves ``{"by": owner}``, prints ``held`` and
    renews until killed; its output lines arrive in the queue (None at its end)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, name, owner, str(ttl)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:            # type: ignore[union-attr]
            lines.put(line.strip())
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.timeout(90)
def test_holder_in_another_process_then_killed(make, name, tmp_path, url):
    """The child holds the lease (renewing); the parent cannot take it nor write the state
    but reads the child's. SIGKILL the child: the parent takes over within a few seconds."""
    ttl = 1.0
    proc, lines = _start_holder(url, name, "child", ttl, str(tmp_path))
    try:
        first = lines.get(timeout=30)
        assert first == "held", f"child said {first!r}"
        parent = make()
        assert parent.lease_holder(name) == "child"
        assert parent.load_state(name) == {"by": "child"}
        until = time.monotonic() + 2 * ttl
        while time.monotonic() < until:     # longer than the ttl: the child's renewals count
            assert parent.acquire_lease(name, "parent", ttl) is False
            assert parent.save_state(name, "parent", {"by": "parent"}) is False
            time.sleep(0.1)
        assert lines.empty(), f"child said {lines.get_nowait()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: parent.acquire_lease(name, "parent", 30), timeout=10,
                 message="the killed holder's lease was never freed")
        assert parent.lease_holder(name) == "parent"
        assert parent.load_state(name) == {"by": "child"}
        assert parent.save_state(name, "parent", {"by": "parent"}) is True
        assert make().load_state(name) == {"by": "parent"}
    finally:
        _stop(proc)


# -- broker specifics -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["amqp"])
def test_amqp_closed_holder_frees_the_lease(make, name):
    """RabbitMQ deletes the exclusive lease queue with its connection: no ttl to wait for."""
    a, b = make(), make()
    assert a.acquire_lease(name, "A", 3600)
    assert a.save_state(name, "A", {"v": 1})
    assert b.acquire_lease(name, "B", 3600) is False
    a.close()
    wait_for(lambda: b.acquire_lease(name, "B", 3600), timeout=5)
    assert b.load_state(name) == {"v": 1}
    assert a.acquire_lease(name, "A", 3600) is False        # a closed object reconnects


@pytest.mark.parametrize("kind", ["amqp"])
@pytest.mark.timeout(90)
def test_amqp_frozen_holder_loses_the_lease_by_heartbeat(make, name, tmp_path, url):
    """A stopped (frozen) holder keeps its TCP connection open but sends no heartbeats: the
    broker closes it after about two heartbeat intervals and the standby takes over."""
    sep = "&" if "?" in url else "?"
    proc, lines = _start_holder(f"{url}{sep}lease_heartbeat=1", name, "frozen", 3600, str(tmp_path))
    try:
        assert lines.get(timeout=30) == "held"
        standby = make()
        assert standby.acquire_lease(name, "standby", 30) is False
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: standby.acquire_lease(name, "standby", 30), timeout=30,
                 message="the frozen holder's lease was never freed")
        assert standby.load_state(name) == {"by": "frozen"}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.parametrize("kind", ["amqp"])
def test_amqp_reader_holding_the_state_does_not_hide_a_newer_save(make, url, name):
    """A reader holds the state message (unacknowledged) while the holder saves a newer one;
    when the reader lets go the older one goes back: loads still return the newer."""
    import pika
    from qctl.transports.amqp_conn import connection_parameters
    a = make()
    assert a.acquire_lease(name, "A", 30)
    assert a.save_state(name, "A", {"v": 1})
    conn = pika.BlockingConnection(connection_parameters(url))
    try:
        ch = conn.channel()
        method, _, body = ch.basic_get(f"qctl.state.{name}", auto_ack=False)
        assert method is not None and b'"v": 1' in body
        assert a.save_state(name, "A", {"v": 2})            # while the old one is held
        ch.close()
    finally:
        conn.close()
    assert make().load_state(name) == {"v": 2}
    assert a.save_state(name, "A", {"v": 3})
    assert make().load_state(name) == {"v": 3}


@pytest.mark.parametrize("kind", ["amqp"])
def test_amqp_state_records_highest_seq_wins_and_stays(url, name):
    """Whatever order several state messages are in (a holder that died between two steps),
    the reader takes the highest ``x-qctl-seq`` and leaves all of them in the queue."""
    import pika
    from qctl.transports.amqp_conn import connection_parameters
    from qctl.transports.amqp_leases import _read_records
    scratch = f"qctl.state.{name}"        # removed by the ``name`` fixture
    conn = pika.BlockingConnection(connection_parameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare(scratch, durable=True)
        for seq in (5, 9, 7):
            ch.basic_publish("", scratch, f'{{"seq": {seq}}}'.encode(),
                             pika.BasicProperties(headers={"x-qctl-seq": seq}))
        reader = conn.channel()
        assert _read_records(reader, scratch) == (True, 9, b'{"seq": 9}')
        reader.close()
        assert ch.queue_declare(scratch, passive=True).method.message_count == 3
        assert _read_records(conn.channel(), f"{scratch}-missing") == (False, 0, None)
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["sqlite"])
def test_sqlite_file_without_lease_tables_gets_them(make, url, name, tmp_path):
    """A broker file made by an older version (no lease tables) works once reopened."""
    import sqlite3
    make().ping()
    db = sqlite3.connect(tmp_path / "broker.sqlite3")
    db.execute("DROP TABLE qctl_leases")
    db.execute("DROP TABLE qctl_state")
    db.commit()
    db.close()
    later = make()
    assert later.acquire_lease(name, "A", 30)
    assert later.save_state(name, "A", {"ok": True})
    assert make().load_state(name) == {"ok": True}
