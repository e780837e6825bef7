"""The transport contract, run against memory:// and sqlite:// (memory is the reference).

SQLite-only behaviour (files, processes, malformed rows) is in test_transport_sqlite.py.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from qctl.transports import ControlMessage, Delivery, Envelope, by_url
from qctl.transports.memory import MemoryTransport

pytestmark = pytest.mark.timeout(60)


def env(body: bytes = b"{}", **headers) -> Envelope:
    return Envelope(body=body, headers=headers, properties={"correlation_id": "c1"})


def wait_until(predicate, timeout: float = 5.0, step: float = 0.01):
    """Poll ``predicate`` until truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)


@pytest.fixture(params=["memory", "sqlite"])
def make(request, tmp_path):
    """``make(**options)``: a new transport (a new consumer) on one shared broker."""
    if request.param == "memory":
        url = f"memory://contract-{uuid.uuid4().hex}"
    else:
        url = f"sqlite:///{tmp_path}/broker.db"
    made = []

    def factory(**options):
        transport = by_url(url, options)
        made.append(transport)
        return transport
    yield factory
    for transport in made:
        transport.close()


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [d.envelope.body for d in deliveries]


def ctl(body: bytes = b"{}", routing_key: str = "", **headers) -> ControlMessage:
    return ControlMessage(body=body, headers=headers, routing_key=routing_key)


def payloads(messages: list[ControlMessage]) -> list[bytes]:
    assert all(isinstance(m, ControlMessage) for m in messages), messages
    return [m.body for m in messages]


def keys(messages: list[ControlMessage]) -> list[str]:
    return [m.routing_key for m in messages]


def test_publish_fetch_ack(make):
    t = make()
    assert t.supports_delayed_delivery
    t.declare_queue("q")
    t.publish("q", Envelope(b"hello", {"task": "add", "n": [1, 2]}, {"priority": 3},
                            "application/x-test", "binary"),
              exchange="ex", routing_key="rk")
    assert t.queue_size("q") == 1
    [d] = t.fetch(["q"], 10, 0)
    assert d.queue == "q" and d.error is None and d.raw is None
    assert d.envelope == Envelope(b"hello", {"task": "add", "n": [1, 2]}, {"priority": 3},
                                  "application/x-test", "binary")
    assert (d.exchange, d.routing_key) == ("ex", "rk")
    assert d.redelivered is False and d.delivery_count == 1
    assert t.queue_size("q") == 0                    # leased: not counted
    assert make().fetch(["q"], 10, 0) == []          # nor given to another consumer
    t.ack([d.tag])
    t.ack([d.tag, 987654])                           # idempotent
    assert t.release_all() == 0                      # really gone
    assert t.fetch(["q"], 10, 0) == []


def test_fetch_limit_and_fifo(make):
    t = make()
    for i in range(5):
        t.publish("q", env(str(i).encode()))
    assert bodies(t.fetch(["q"], 2, 0)) == [b"0", b"1"]
    assert bodies(t.fetch(["q"], 10, 0)) == [b"2", b"3", b"4"]
    assert t.fetch(["q"], 0, 0) == [] and t.fetch([], 5, 0) == []


def test_priority_order(make):
    t = make()
    for body, priority in [(b"p0", 0), (b"p5a", 5), (b"p9", 9), (b"p5b", 5), (b"p300", 300)]:
        t.publish("q", env(body), priority=priority)
    assert bodies(t.fetch(["q"], 10, 0)) == [b"p300", b"p9", b"p5a", b"p5b", b"p0"]


def test_queue_order_comes_before_priority(make):
    t = make()
    t.publish("a", env(b"a-high"), priority=9)
    t.publish("b", env(b"b-low"), priority=0)
    t.publish("b", env(b"b-mid"), priority=4)
    t.publish("c", env(b"c"))
    assert bodies(t.fetch(["b", "a"], 2, 0)) == [b"b-mid", b"b-low"]
    assert bodies(t.fetch(["b", "a", "b"], 5, 0)) == [b"a-high"]
    assert t.queue_size("c") == 1


def test_eta_invisible_until_due(make):
    t = make()
    eta = time.time() + 0.4
    t.publish("q", env(b"later"), eta=eta)
    t.publish("q", env(b"now"))
    assert bodies(t.fetch(["q"], 10, 0)) == [b"now"]
    assert t.fetch(["q"], 10, 0) == []
    assert t.queue_size("q") == 1                    # delayed still counts
    got = t.fetch(["q"], 10, 5.0)                     # must wake by itself at the ETA
    assert bodies(got) == [b"later"]
    assert time.time() >= eta - 0.01
    assert time.time() < eta + 1.0


def test_past_eta_is_ready(make):
    t = make()
    t.publish("q", env(b"x"), eta=time.time() - 10)
    assert bodies(t.fetch(["q"], 1, 0)) == [b"x"]


def test_lease_expiry_redelivers_to_other_consumer(make):
    a, b = make(visibility_timeout=0.3), make(visibility_timeout=0.3)
    assert a.consumer_id != b.consumer_id
    a.publish("q", env(b"m"))
    [first] = a.fetch(["q"], 1, 0)
    assert b.fetch(["q"], 1, 0) == []
    started = time.monotonic()
    [again] = b.fetch(["q"], 1, 5.0)                  # wakes at the expiry by itself
    assert time.monotonic() - started < 2.0
    assert again.tag == first.tag and again.envelope.body == b"m"
    assert again.redelivered is True and again.delivery_count == 2
    a.ack([first.tag])                               # a's lease is gone: must not delete b's
    assert b.release_all() == 1


def test_restore_expired(make):
    a = make(visibility_timeout=0.2)
    a.publish("q", env())
    a.fetch(["q"], 1, 0)
    assert a.restore_expired() == 0
    assert wait_until(lambda: a.restore_expired()) == 1
    assert a.queue_size("q") == 1
    [d] = make().fetch(["q"], 1, 0)
    assert d.redelivered and d.delivery_count == 2


def test_renew_leases_keeps_message(make):
    a, b = make(visibility_timeout=0.3), make(visibility_timeout=0.3)
    a.publish("q", env())
    a.fetch(["q"], 1, 0)
    until = time.monotonic() + 0.8
    while time.monotonic() < until:
        a.renew_leases()
        assert b.fetch(["q"], 1, 0) == []
        time.sleep(0.05)
    assert a.release_all() == 1


def test_requeue_marks_redelivered(make):
    t = make()
    t.publish("q", env(b"x"))
    [d] = t.fetch(["q"], 1, 0)
    make().requeue([d.tag])                          # not its lease: no effect
    assert t.fetch(["q"], 1, 0) == []
    t.requeue([d.tag])
    [d2] = make().fetch(["q"], 1, 0)
    assert d2.tag == d.tag and d2.redelivered and d2.delivery_count == 2


def test_release_all(make):
    a, b = make(), make()
    for i in range(3):
        a.publish("q", env(str(i).encode()))
    a.publish("other", env(b"o"))
    assert len(a.fetch(["q", "other"], 10, 0)) == 4
    assert a.release_all() == 4
    assert a.release_all() == 0
    got = b.fetch(["q", "other"], 10, 0)
    assert bodies(got) == [b"0", b"1", b"2", b"o"]
    assert all(d.redelivered for d in got)


def test_purge(make):
    t = make()
    t.publish("q", env(b"leased"))
    t.fetch(["q"], 1, 0)
    t.publish("q", env(b"ready"))
    t.publish("q", env(b"delayed"), eta=time.time() + 60)
    t.publish("keep", env())
    assert t.purge("q") == 2
    assert t.queue_size("q") == 0 and t.queue_size("keep") == 1
    assert t.release_all() == 1                      # the leased one survived


def test_dead_letters(make):
    t = make()
    t.publish("q", env(b"bad", task="t1"), priority=7)
    [d] = t.fetch(["q"], 1, 0)
    t.dead_letter(d.tag, "boom")
    assert t.release_all() == 0 and t.queue_size("q") == 0
    t.dead_letter(None, "after ack", env(b"copy", task="t2"), queue="q2")
    letters = t.dead_letters()
    assert [(x.queue, x.reason, x.envelope.body) for x in letters] == [
        ("q", "boom", b"bad"), ("q2", "after ack", b"copy")]
    assert letters[0].envelope.headers == {"task": "t1"}
    assert letters[0].died_at == pytest.approx(time.time(), abs=5)
    assert len(t.dead_letters(limit=1)) == 1

    assert t.requeue_dead([letters[0].id]) == 1
    [again] = t.fetch(["q"], 1, 0)
    assert again.envelope.body == b"bad" and again.delivery_count == 1
    assert [x.reason for x in t.dead_letters()] == ["after ack"]
    assert t.requeue_dead(None) == 1
    assert t.dead_letters() == []
    assert bodies(t.fetch(["q2"], 1, 0)) == [b"copy"]

    t.dead_letter(again.tag, "again")
    t.dead_letter(None, "x", env(), queue="q")
    assert t.purge_dead() == 2 and t.dead_letters() == []


def test_requeued_dead_letter_keeps_priority(make):
    t = make()
    t.publish("q", env(b"high"), priority=9)
    [d] = t.fetch(["q"], 1, 0)
    t.dead_letter(d.tag, "r")
    t.publish("q", env(b"low"))
    t.requeue_dead(None)
    assert bodies(t.fetch(["q"], 2, 0)) == [b"high", b"low"]


def test_broadcast_each_subscriber_once(make):
    t, other = make(), make()
    s1, s2 = t.subscribe("ctl"), other.subscribe("ctl")
    t.broadcast("ctl", ctl(b'"one"'))
    other.broadcast("ctl", ctl(b'"two"'))
    t.broadcast("elsewhere", ctl(b'"no"'))
    assert payloads(s1.get(1.0)) == [b'"one"', b'"two"']
    assert payloads(s2.get(1.0)) == [b'"one"', b'"two"']
    assert s1.get(0.05) == [] and s2.get(0.05) == []
    late = t.subscribe("ctl")
    assert late.get(0.05) == []
    t.broadcast("ctl", ctl(b'"three"'))
    assert payloads(s1.get(1.0)) == payloads(s2.get(1.0)) == payloads(late.get(1.0)) == [b'"three"']
    s1.close()
    s1.close()
    t.broadcast("ctl", ctl(b'"four"'))
    assert payloads(s2.get(1.0)) == [b'"four"']
    assert s1.get(0.05) == []


def test_broadcast_without_subscribers_is_dropped(make):
    t = make()
    t.broadcast("nobody-listens", ctl(b'"lost"'))
    sub = t.subscribe("nobody-listens")
    assert sub.get(0.05) == []


def test_broadcast_wakes_waiting_subscriber(make):
    t = make()
    sub = t.subscribe("ctl")
    sender = threading.Timer(0.1, lambda: make().broadcast("ctl", ctl(b'"hi"')))
    sender.start()
    started = time.monotonic()
    assert payloads(sub.get(5.0)) == [b'"hi"']
    assert time.monotonic() - started < 0.9
    sender.join()


def test_broadcast_headers_and_routing_key_round_trip(make):
    t = make()
    a, b = make().subscribe("celery.pidbox"), t.subscribe("celery.pidbox")
    headers = {"clock": 7, "expires": 1712345678.25, "ticket": "t-1", "nested": {"a": [1, "x", None]}}
    sent = ControlMessage(b'{"method": "ping", "arguments": {}}', headers, "pidbox.ping")
    t.broadcast("celery.pidbox", sent)
    headers["clock"] = 8                              # the sender's later changes do not leak
    [got_a], [got_b] = a.get(1.0), b.get(1.0)
    expected = ControlMessage(b'{"method": "ping", "arguments": {}}',
                              {"clock": 7, "expires": 1712345678.25, "ticket": "t-1",
                               "nested": {"a": [1, "x", None]}}, "pidbox.ping")
    assert got_a == got_b == expected
    got_a.headers["nested"]["a"].append(2)            # nor one subscriber's to another
    assert got_b == expected
    t.broadcast("celery.pidbox", ControlMessage(b"{}"))
    [bare] = a.get(1.0)
    assert (bare.headers, bare.routing_key) == ({}, "")


def test_broadcast_topic_patterns(make):
    t = make()
    every, default = t.subscribe("celeryev", "#"), make().subscribe("celeryev")
    workers = make().subscribe("celeryev", "worker.*", name="w1@host.celeryev")
    exact = t.subscribe("celeryev", "task.succeeded")
    tasks = t.subscribe("celeryev", "task.#")
    sent = ["worker.heartbeat", "worker.online.late", "task.succeeded", "task.failed", "task",
            "workers.heartbeat", ""]
    for key in sent:
        t.broadcast("celeryev", ctl(b"{}", routing_key=key))
    t.broadcast("other", ctl(b"{}", routing_key="worker.heartbeat"))
    assert keys(every.get(1.0)) == keys(default.get(1.0)) == sent
    assert keys(workers.get(1.0)) == ["worker.heartbeat"]
    assert keys(exact.get(1.0)) == ["task.succeeded"]
    assert keys(tasks.get(1.0)) == ["task.succeeded", "task.failed", "task"]
    assert workers.get(0.05) == exact.get(0.05) == []

    # A waiting subscriber skips what does not match and keeps waiting for what does.
    def send():
        t.broadcast("celeryev", ctl(b"{}", routing_key="task.received"))
        time.sleep(0.1)
        make().broadcast("celeryev", ctl(b"{}", routing_key="worker.offline"))
    sender = threading.Timer(0.05, send)
    sender.start()
    assert keys(workers.get(5.0)) == ["worker.offline"]
    sender.join()


def test_mailboxes(make):
    t = make()
    t.open_mailbox("box")
    t.open_mailbox("box")                             # idempotent
    t.open_mailbox("other")
    t.put_reply("box", ctl(b'"r1"', ticket="tk", clock=3))
    make().put_reply("box", ctl(b'"r2"'))
    t.put_reply("other", ctl(b'"x"'))
    t.put_reply("never-opened", ctl(b'"lost"'))       # nobody asked: dropped
    got = t.get_replies("box", 1.0)
    assert payloads(got) == [b'"r1"', b'"r2"']
    assert got[0].headers == {"ticket": "tk", "clock": 3}
    assert t.get_replies("box", 0.05) == []
    t.put_reply("box", ctl(b'"short"'), ttl=0.05)
    time.sleep(0.1)
    assert t.get_replies("box", 0.05) == []
    assert payloads(t.get_replies("other", 0)) == [b'"x"']
    t.open_mailbox("never-opened")
    assert t.get_replies("never-opened", 0.05) == []

    sender = threading.Timer(0.1, lambda: make().put_reply("box", ctl(b'"late"')))
    sender.start()
    started = time.monotonic()
    assert payloads(t.get_replies("box", 5.0)) == [b'"late"']
    assert time.monotonic() - started < 0.9
    sender.join()


def test_close_mailbox_deletes_it(make):
    t, worker = make(), make()
    t.open_mailbox("box")
    worker.put_reply("box", ctl(b'"unread"'))
    t.close_mailbox("box")
    t.close_mailbox("box")                            # idempotent
    t.close_mailbox("never-opened")
    worker.put_reply("box", ctl(b'"too late"'))        # its client left: dropped
    t.open_mailbox("box")
    assert t.get_replies("box", 0.05) == []
    worker.put_reply("box", ctl(b'"again"'))
    assert payloads(t.get_replies("box", 1.0)) == [b'"again"']


def test_reply_arrives_within_milliseconds(make):
    client, worker = make(), make()
    client.open_mailbox("fast")
    latencies = []
    for n in range(5):
        sent_at = []

        def send():
            sent_at.append(time.monotonic())
            worker.put_reply("fast", ctl(str(n).encode()))
        sender = threading.Timer(0.03, send)
        sender.start()
        assert payloads(client.get_replies("fast", 5.0)) == [str(n).encode()]
        latencies.append(time.monotonic() - sent_at[0])
        sender.join()
    latencies.sort()
    assert latencies[2] < 0.02, latencies             # a few ms, not a polling second
    assert latencies[-1] < 0.25, latencies


def test_node_registry(make):
    a, b = make(), make()
    assert a.live_nodes() == set()
    a.announce_node("w1@host", 30)
    b.announce_node("w2@host", 0.2)
    assert a.live_nodes() == b.live_nodes() == {"w1@host", "w2@host"}
    wait_until(lambda: a.live_nodes() == {"w1@host"}, timeout=3)
    b.announce_node("w2@host", 30)                    # announced again: alive again
    assert a.live_nodes() == {"w1@host", "w2@host"}
    a.forget_node("w1@host")
    a.forget_node("w1@host")                          # idempotent
    b.forget_node("never-announced")
    assert b.live_nodes() == {"w2@host"}
    b.announce_node("w3@host", 0)                     # no time to live: not alive
    assert a.live_nodes() == {"w2@host"}


def test_fetch_wakes_promptly_on_publish(make):
    t = make()
    publisher = make()
    t.fetch(["q"], 1, 0)
    sender = threading.Timer(0.2, lambda: publisher.publish("q", env(b"go")))
    sender.start()
    started = time.monotonic()
    got = t.fetch(["q"], 5, 5.0)
    waited = time.monotonic() - started
    sender.join()
    assert bodies(got) == [b"go"]
    assert waited < 0.7                              # not the 1 s safety re-check


def test_fetch_timeout_returns_empty(make):
    t = make()
    started = time.monotonic()
    assert t.fetch(["q"], 5, 0.2) == []
    assert 0.15 <= time.monotonic() - started < 2.0


def test_threads_share_one_transport(make):
    t = make()
    for i in range(300):
        t.publish("q", env(str(i).encode()))
    seen: list[bytes] = []
    lock = threading.Lock()

    def consume():
        while True:
            got = t.fetch(["q"], 7, 0.1)
            if not got:
                return
            with lock:
                seen.extend(bodies(got))
            t.ack([d.tag for d in got])
    threads = [threading.Thread(target=consume) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(seen) == sorted(str(i).encode() for i in range(300))


# -- memory only ------------------------------------------------------------------------

def test_memory_same_url_shares_state_other_url_does_not():
    url = f"memory://share-{uuid.uuid4().hex}"
    MemoryTransport(url).publish("q", env(b"x"))
    assert MemoryTransport(url + "/").queue_size("q") == 1
    assert MemoryTransport(url + "-other").queue_size("q") == 0
    assert bodies(by_url(url).fetch(["q"], 1, 0)) == [b"x"]


def test_memory_envelope_is_copied():
    t = MemoryTransport(f"memory://{uuid.uuid4().hex}")
    original = env(b"x", nested={"a": 1})
    t.publish("q", original)
    original.headers["nested"]["a"] = 2
    [d] = t.fetch(["q"], 1, 0)
    assert d.envelope.headers == {"nested": {"a": 1}}
    d.envelope.headers["nested"]["a"] = 3
    t.requeue([d.tag])
    assert t.fetch(["q"], 1, 0)[0].envelope.headers == {"nested": {"a": 1}}
