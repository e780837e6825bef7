"""SQLite broker specifics: URLs, files, malformed rows, fork safety, many processes, and how
remote-control messages are stored (also across processes and in files of older versions).

The shared transport contract (also run against sqlite) is in test_transport_memory.py.
"""
from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
import time

import pytest

from qctl.exceptions import ImproperlyConfigured, OperationalError
from qctl.transports import ControlMessage, Envelope, by_url
from qctl.transports.sqlite import SqliteTransport, path_from_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
def transport(url):
    t = SqliteTransport(url)
    yield t
    t.close()


def env(body: bytes = b"{}", **headers) -> Envelope:
    return Envelope(body=body, headers=headers)


def raw(t: SqliteTransport) -> sqlite3.Connection:
    return sqlite3.connect(t.path, isolation_level=None)


def test_by_url_picks_sqlite(url):
    assert isinstance(by_url(url), SqliteTransport)


def test_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert path_from_url("sqlite:///rel/q.db") == str(tmp_path / "rel" / "q.db")
    assert path_from_url("sqlite:////abs/q.db") == "/abs/q.db"
    assert path_from_url("sqlite://") == str(tmp_path / "qctl.sqlite3")
    assert path_from_url("sqlite:///q.db?synchronous=FULL") == str(tmp_path / "q.db")
    with pytest.raises(ImproperlyConfigured):
        path_from_url("sqlite://host/q.db")
    t = SqliteTransport("sqlite://")
    t.publish("q", env())
    assert (tmp_path / "qctl.sqlite3").exists()
    t.close()


def test_pragmas_and_options(url, tmp_path):
    t = SqliteTransport(url)
    conn = t._db.conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1          # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.isolation_level is None
    full = SqliteTransport(url, {"synchronous": "full"})
    assert full._db.conn().execute("PRAGMA synchronous").fetchone()[0] == 2
    from_url = SqliteTransport(url + "?synchronous=FULL")
    assert from_url._db.conn().execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(ImproperlyConfigured):
        SqliteTransport(url, {"synchronous": "FULL; DROP TABLE messages"}).ping()
    for x in (t, full, from_url):
        x.close()


def test_fetch_query_uses_ready_index(transport):
    transport.ping()
    with raw(transport) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM messages INDEXED BY messages_ready WHERE queue = ?"
            " AND lease_owner IS NULL AND visible_at <= ? ORDER BY priority DESC, id LIMIT ?",
            ("q", 0, 1)).fetchall()
    text = " ".join(row[-1] for row in plan)
    assert "messages_ready" in text and "TEMP B-TREE" not in text


def test_one_connection_per_thread(transport):
    mine = transport._db.conn()
    assert transport._db.conn() is mine
    other = []
    th = threading.Thread(target=lambda: other.append(transport._db.conn()))
    th.start()
    th.join()
    assert other[0] is not mine


def test_close_is_idempotent_and_reopens(transport):
    transport.publish("q", env())
    transport.close()
    transport.close()
    assert transport.queue_size("q") == 1


def test_malformed_row_gives_delivery_error(transport):
    transport.ping()
    with raw(transport) as conn:
        conn.execute("INSERT INTO messages (queue, priority, visible_at, headers, properties, body)"
                     " VALUES ('q', 0, 0, 'not json', '{}', X'0102')")
        conn.execute("INSERT INTO messages (queue, priority, visible_at, headers, properties, body)"
                     " VALUES ('q', 0, 0, '{}', '[1, 2]', 'text body')")
    bad_json, not_object = transport.fetch(["q"], 10, 0)
    assert bad_json.envelope is None and bad_json.raw == b"\x01\x02"
    assert "headers" in bad_json.error and "JSON" in bad_json.error
    assert not_object.envelope is None and not_object.raw == b"text body"
    assert "properties" in not_object.error
    transport.dead_letter(bad_json.tag, bad_json.error)
    [letter] = transport.dead_letters()
    assert letter.envelope is None and letter.raw == b"\x01\x02"


def test_headers_stored_as_json_text(transport):
    transport.publish("q", Envelope(b"b", {"task": "t", "args": [1]}, {"reply_to": "r"}))
    with raw(transport) as conn:
        headers, properties, body = conn.execute(
            "SELECT headers, properties, body FROM messages").fetchone()
    assert json.loads(headers) == {"task": "t", "args": [1]}
    assert json.loads(properties) == {"reply_to": "r"}
    assert body == b"b"


def test_idle_fetch_takes_no_write_lock(transport):
    transport.publish("q", env(), eta=time.time() + 60)
    conn = transport._db.conn()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        assert transport.fetch(["q"], 5, 0.6) == []
    finally:
        conn.set_trace_callback(None)
    writes = [s for s in statements if s.startswith(("BEGIN", "UPDATE", "INSERT", "DELETE"))]
    assert len(writes) <= 3, writes                  # the first try, maybe a 1 s re-check
    assert sum(s == "PRAGMA data_version" for s in statements) > 20   # it did poll


def test_delayed_message_wakes_without_commit(transport):
    transport.publish("q", env(b"soon"), eta=time.time() + 0.3)
    started = time.monotonic()
    got = transport.fetch(["q"], 1, 5.0)
    assert [d.envelope.body for d in got] == [b"soon"]
    assert 0.2 <= time.monotonic() - started < 0.8


def test_missing_directory_is_operational_error(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "q.db"
    t = SqliteTransport(f"sqlite:///{path}")
    with pytest.raises(OperationalError) as info:
        t.ping()
    message = str(info.value)
    assert str(path) in message and "does not exist" in message and "\n" not in message
    with pytest.raises(OperationalError):
        t.publish("q", env())
    with pytest.raises(OperationalError):
        t.fetch(["q"], 1, 0)


def test_not_a_database_is_operational_error(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an sqlite file at all" * 100)
    with pytest.raises(OperationalError, match="garbage.db"):
        SqliteTransport(f"sqlite:///{path}").ping()


def test_locked_database_is_retried(transport, monkeypatch):
    transport.ping()
    calls = []
    real = transport._db.conn

    class Flaky:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, params=()):
            if sql.startswith("INSERT") and len(calls) < 2:
                calls.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return self.conn.execute(sql, params)
    monkeypatch.setattr(transport._db, "conn", lambda: Flaky(real()))
    transport.publish("q", env())
    assert len(calls) == 2
    monkeypatch.undo()
    assert transport.queue_size("q") == 1


def _fork_child(transport, parent_conn, parent_id, pipe):
    try:
        child_conn = transport._db.conn()
        transport.publish("child", env(b"from child"))
        [d] = transport.fetch(["child"], 1, 0)
        transport.ack([d.tag])
        pipe.send((child_conn is not parent_conn, transport.consumer_id != parent_id,
                   d.envelope.body))
    except BaseException as exc:  # report instead of dying silently
        pipe.send(repr(exc))


def test_fork_safety(transport):
    transport.publish("q", env(b"before"))
    parent_conn = transport._db.conn()
    parent_id = transport.consumer_id
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_fork_child, args=(transport, parent_conn, parent_id, theirs))
    child.start()
    assert ours.poll(30)
    assert ours.recv() == (True, True, b"from child")
    child.join(30)
    assert child.exitcode == 0
    # The parent's connection and identity are untouched by the child.
    assert transport._db.conn() is parent_conn and transport.consumer_id == parent_id
    [d] = transport.fetch(["q"], 1, 0)
    assert d.envelope.body == b"before"
    transport.ack([d.tag])
    assert transport.queue_size("child") == 0


def _consume_worker(url, out_path, barrier):
    t = SqliteTransport(url)
    got = []
    barrier.wait(30)
    while True:
        batch = t.fetch(["work"], 20, 0.5)
        if not batch:
            if t.queue_size("work") == 0:
                break
            continue
        got.extend(d.envelope.headers["n"] for d in batch)
        t.ack([d.tag for d in batch])
    t.close()
    with open(out_path, "w") as fh:
        fh.write("\n".join(map(str, got)))


def test_four_processes_receive_each_message_exactly_once(url, tmp_path):
    total = 5000
    publisher = SqliteTransport(url)
    for n in range(total):
        publisher.publish("work", env(b"x", n=n), priority=n % 3)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"got-{i}.txt" for i in range(4)]
    procs = [ctx.Process(target=_consume_worker, args=(url, str(out), barrier)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    received = []
    for out in outs:
        text = out.read_text()
        received += [int(x) for x in text.split()] if text else []
    assert len(received) == total
    assert sorted(received) == list(range(total))
    with raw(publisher) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    publisher.close()


# -- remote control: broadcasts, mailboxes, node registry ----------------------------------

def test_control_rows_stored_as_columns(transport):
    transport.broadcast("celeryev", ControlMessage(b'{"type": "worker-heartbeat"}',
                                                   {"hostname": "w1@h", "n": [1]}, "worker.heartbeat"))
    transport.open_mailbox("box")
    transport.put_reply("box", ControlMessage(b'{"ok": "pong"}', {"ticket": "t1"}), ttl=30)
    transport.announce_node("w1@h", 10)
    with raw(transport) as conn:
        exchange, key, headers, body = conn.execute(
            "SELECT exchange, routing_key, headers, body FROM control_broadcasts").fetchone()
        mailbox, reply_headers, expires = conn.execute(
            "SELECT mailbox, headers, expires FROM control_replies").fetchone()
        [(name, node_expires)] = conn.execute("SELECT name, expires FROM nodes").fetchall()
    assert (exchange, key, body) == ("celeryev", "worker.heartbeat", b'{"type": "worker-heartbeat"}')
    assert json.loads(headers) == {"hostname": "w1@h", "n": [1]}
    assert (mailbox, json.loads(reply_headers)) == ("box", {"ticket": "t1"})
    assert expires == pytest.approx(time.time() + 30, abs=5)
    assert name == "w1@h" and node_expires == pytest.approx(time.time() + 10, abs=5)


def test_malformed_control_headers_read_as_empty(transport):
    sub = transport.subscribe("ex")
    transport.open_mailbox("box")
    with raw(transport) as conn:
        conn.execute("INSERT INTO control_broadcasts (exchange, routing_key, headers, body, created)"
                     " VALUES ('ex', 'k', 'not json', X'7B7D', 0), ('ex', 'k', '[1]', NULL, 0)")
        conn.execute("INSERT INTO control_replies (mailbox, headers, body, expires)"
                     " VALUES ('box', '{', 'text', 1e12)")
    assert sub.get(1.0) == [ControlMessage(b"{}", {}, "k"), ControlMessage(b"", {}, "k")]
    assert transport.get_replies("box", 1.0) == [ControlMessage(b"text", {}, "")]


def test_idle_subscription_and_mailbox_take_no_write_lock(transport):
    sub = transport.subscribe("ex", "worker.*")
    transport.open_mailbox("box")
    transport.broadcast("ex", ControlMessage(b"{}", {}, "task.sent"))     # not matching
    conn = transport._db.conn()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        assert sub.get(0.3) == []
        assert transport.get_replies("box", 0.3) == []
    finally:
        conn.set_trace_callback(None)
    writes = [s for s in statements if s.startswith(("BEGIN", "UPDATE", "INSERT", "DELETE"))]
    assert writes == []
    assert sum(s == "PRAGMA data_version" for s in statements) > 20   # it did poll


def test_cleanup_drops_stale_control_rows(transport):
    transport.open_mailbox("fresh")
    transport.announce_node("alive", 60)
    with raw(transport) as conn:
        conn.execute("INSERT INTO control_broadcasts (exchange, routing_key, headers, body, created)"
                     " VALUES ('ex', '', '{}', X'00', ?)", (time.time() - 600,))
        conn.execute("INSERT INTO mailboxes (name, touched) VALUES ('gone', ?)", (time.time() - 2 * 86400,))
        conn.execute("INSERT INTO control_replies (mailbox, headers, body, expires)"
                     " VALUES ('fresh', '{}', X'00', ?)", (time.time() - 1,))
        conn.execute("INSERT INTO nodes (name, expires) VALUES ('dead', ?)", (time.time() - 1,))
    transport._last_cleanup = 0.0
    transport.announce_node("alive", 60)              # heartbeats run the cleanup
    with raw(transport) as conn:
        assert conn.execute("SELECT COUNT(*) FROM control_broadcasts").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM control_replies").fetchone()[0] == 0
        assert conn.execute("SELECT name FROM mailboxes").fetchall() == [("fresh",)]
        assert conn.execute("SELECT name FROM nodes").fetchall() == [("alive",)]


def test_file_of_an_older_version(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.executescript(
            "CREATE TABLE broadcasts (id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT,"
            " payload BLOB, created REAL);"
            "CREATE TABLE replies (id INTEGER PRIMARY KEY AUTOINCREMENT, mailbox TEXT,"
            " payload BLOB, expires REAL);"
            "INSERT INTO broadcasts (channel, payload, created) VALUES ('ctl', X'01', 0);"
            "INSERT INTO replies (mailbox, payload, expires) VALUES ('box', X'02', 1e12);")
    t = SqliteTransport(f"sqlite:///{path}")
    sub = t.subscribe("ctl")
    t.open_mailbox("box")
    t.broadcast("ctl", ControlMessage(b'"new"', {"clock": 1}))
    t.put_reply("box", ControlMessage(b'"reply"'))
    assert sub.get(1.0) == [ControlMessage(b'"new"', {"clock": 1})]
    assert t.get_replies("box", 1.0) == [ControlMessage(b'"reply"')]
    with raw(t) as conn:                              # the old tables are left alone
        assert conn.execute("SELECT COUNT(*) FROM broadcasts").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 1
    t.close()


def _control_child(url, go, pipe):
    try:
        t = SqliteTransport(url)
        go.wait(30)
        t.announce_node("child@host", 30)
        t.broadcast("celeryev", ControlMessage(b'{"type": "worker-online"}', {"pid": 1}, "worker.online"))
        t.broadcast("celeryev", ControlMessage(b"{}", {}, "task.received"))
        t.put_reply("client-box", ControlMessage(b'{"child@host": {"ok": "pong"}}', {"ticket": "t9"}))
        sub = t.subscribe("celery.pidbox")
        pipe.send("subscribed")
        [request] = sub.get(20.0)
        t.put_reply("client-box", ControlMessage(request.body, {"ticket": request.headers["ticket"]}))
        t.forget_node("child@host")
        t.close()
        pipe.send("done")
    except BaseException as exc:  # report instead of dying silently
        pipe.send(repr(exc))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_control_across_processes(url, start_method):
    client = SqliteTransport(url)
    events = client.subscribe("celeryev", "worker.*")
    client.open_mailbox("client-box")
    ctx = multiprocessing.get_context(start_method)
    go = ctx.Event()
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_control_child, args=(url, go, theirs))
    child.start()
    go.set()
    assert events.get(20.0) == [ControlMessage(b'{"type": "worker-online"}', {"pid": 1}, "worker.online")]
    assert client.get_replies("client-box", 20.0) == [
        ControlMessage(b'{"child@host": {"ok": "pong"}}', {"ticket": "t9"})]
    assert client.live_nodes() == {"child@host"}
    assert ours.poll(20) and ours.recv() == "subscribed"
    client.broadcast("celery.pidbox", ControlMessage(b'{"method": "ping"}', {"ticket": "t10"}))
    started = time.monotonic()
    assert client.get_replies("client-box", 20.0) == [ControlMessage(b'{"method": "ping"}', {"ticket": "t10"})]
    assert time.monotonic() - started < 5.0
    assert ours.poll(20) and ours.recv() == "done"
    child.join(30)
    assert child.exitcode == 0
    assert client.live_nodes() == set()
    client.close_mailbox("client-box")
    client.close()
