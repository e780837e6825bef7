"""The transport contract on a real RabbitMQ node, plus what only AMQP has: Celery's
declarations, publisher confirms, delay queues for ETAs, manual acks and redelivery,
Celery's pidbox and event declarations, control messages and reply mailboxes, pika's header
types, reconnection.

Differences from the shared contract (test_transport_memory.py), all AMQP semantics: a tag
belongs to the channel that delivered it (a redelivery has a new one); deliveries report the
AMQP exchange and routing key (``""`` and the queue, as Celery publishes); messages in a
consumer's prefetch buffer stay with it until it fetches or releases them; priorities need a
queue declared with ``max_priority``; the order across several queues is the broker's; a reply
to a mailbox nobody opened is dropped (Celery workers reply without ``mandatory``), a fanout
exchange's subscriber applies its pattern itself, and ``live_nodes()`` is None.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
import uuid

import pika
import pika.exceptions as pex
import pytest

from qctl.exceptions import ImproperlyConfigured, OperationalError
from qctl.transports import ControlMessage, Envelope, by_url
from qctl.transports.amqp import AmqpTransport, Tag
from tests.servers_rabbit import rabbit  # noqa: F401 - the session's RabbitMQ node

pytestmark = pytest.mark.timeout(300)


def env(body: bytes = b"{}", **headers) -> Envelope:
    return Envelope(body=body, headers=headers, properties={"correlation_id": "c1"})


def bodies(deliveries) -> list[bytes]:
    return [d.envelope.body for d in deliveries]


def collect(t, queues, n: int, timeout: float = 5.0) -> list:
    """Fetch until ``n`` deliveries arrived (a batch may come in more than one fetch)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += t.fetch(queues, n - len(got), 0.2)
    return got


@pytest.fixture
def url(rabbit):  # noqa: F811
    return rabbit.url


@pytest.fixture
def make(url):
    """``make(**options)``: a new transport (a new consumer) on the shared node."""
    made = []

    def factory(**options):
        transport = by_url(url, options)
        made.append(transport)
        return transport
    yield factory
    for transport in made:
        transport.close()


@pytest.fixture
def q():
    """A fresh queue name per test: queues are durable and the node is shared."""
    return f"t-{uuid.uuid4().hex[:10]}"


def _raw_params(url: str) -> pika.ConnectionParameters:
    from qctl.transports.amqp import connection_parameters
    return connection_parameters(url)


@pytest.fixture
def rawch(url):
    conn = pika.BlockingConnection(_raw_params(url))
    yield conn.channel()
    if conn.is_open:
        conn.close()


# -- the contract ------------------------------------------------------------------------

def test_by_url_schemes(url):
    assert isinstance(by_url(url), AmqpTransport)
    assert isinstance(by_url(url.replace("amqp://", "pyamqp://")), AmqpTransport)
    assert by_url(url.replace("amqp://", "pyamqp://")).url.startswith("amqp://")


def test_publish_fetch_ack(make, q):
    t = make()
    assert t.supports_delayed_delivery
    t.declare_queue(q, max_priority=10)
    t.publish(q, Envelope(b"hello", {"task": "add", "n": [1, 2]}, {"priority": 3},
                          "application/x-test", "binary"), exchange="ex", routing_key="rk")
    assert t.queue_size(q) == 1
    [d] = t.fetch([q], 10, 0)
    assert d.queue == q and d.error is None and d.raw is None
    assert d.envelope.body == b"hello" and d.envelope.headers == {"task": "add", "n": [1, 2]}
    assert (d.envelope.content_type, d.envelope.content_encoding) == ("application/x-test", "binary")
    assert d.envelope.properties["priority"] == 3 and d.envelope.properties["delivery_mode"] == 2
    assert (d.exchange, d.routing_key) == ("", q)        # as Celery publishes: default exchange
    assert d.redelivered is False and d.delivery_count == 1
    assert t.queue_size(q) == 0                          # delivered: not counted
    assert make().fetch([q], 10, 0) == []                # nor given to another consumer
    t.ack([d.tag])
    t.ack([d.tag, Tag(d.tag.gen, 987654), 987654, None])  # idempotent; foreign tags ignored
    assert t.release_all() == 0
    assert t.fetch([q], 10, 0) == []


def test_fetch_limit_and_fifo(make, q):
    t = make()
    for i in range(5):
        t.publish(q, env(str(i).encode()))
    assert bodies(t.fetch([q], 2, 0)) == [b"0", b"1"]
    assert bodies(collect(t, [q], 3)) == [b"2", b"3", b"4"]
    assert t.fetch([q], 0, 0) == [] and t.fetch([], 5, 0) == []


def test_prefetch_is_held_plus_limit(make, q, rawch):
    t = make()
    for i in range(10):
        t.publish(q, env(str(i).encode()))
    assert len(t.fetch([q], 3, 0)) == 3
    time.sleep(0.2)
    assert rawch.queue_declare(q, passive=True).method.message_count == 7   # not pushed to us
    assert len(t.fetch([q], 2, 0)) == 2
    time.sleep(0.2)
    assert rawch.queue_declare(q, passive=True).method.message_count == 5


def test_priority_order_on_a_priority_queue(make, q):
    t = make()
    t.declare_queue(q, max_priority=10)
    for body, priority in [(b"p0", 0), (b"p5a", 5), (b"p9", 9), (b"p5b", 5), (b"p300", 300)]:
        t.publish(q, env(body), priority=priority)
    assert bodies(collect(t, [q], 5)) == [b"p300", b"p9", b"p5a", b"p5b", b"p0"]


def test_past_eta_is_ready(make, q):
    t = make()
    t.publish(q, env(b"x"), eta=time.time() - 10)
    assert bodies(t.fetch([q], 1, 0)) == [b"x"]


def test_requeue_counts_deliveries(make, q):
    t = make()
    t.publish(q, env(b"x", task="t"))
    [d] = t.fetch([q], 1, 0)
    make().requeue([d.tag])                              # not its delivery: no effect
    t.requeue([d.tag])
    t.requeue([d.tag])                                   # already settled: no effect
    [d2] = collect(t, [q], 1)
    assert d2.envelope.body == b"x" and d2.envelope.headers == {"task": "t"}
    assert d2.redelivered and d2.delivery_count == 2
    t.requeue([d2.tag])
    [d3] = collect(t, [q], 1)
    assert d3.delivery_count == 3
    t.ack([d3.tag])
    assert t.release_all() == 0


def test_quorum_queue_consumes_and_counts(make, q):
    """Quorum queues refuse channel-wide QoS (540 NOT_IMPLEMENTED): per-consumer QoS then,
    also when the queue was declared by someone else."""
    make().declare_queue(q, **{"x-queue-type": "quorum"})
    t = make()
    t.publish(q, env(b"x"))
    [d] = collect(t, [q], 1)
    t.requeue([d.tag])
    [d2] = collect(t, [q], 1)
    assert d2.delivery_count == 2
    t.close()
    [d3] = collect(make(), [q], 1)
    assert d3.redelivered and d3.delivery_count == 3


def test_unacked_messages_return_when_the_consumer_goes(make, q):
    a, b = make(), make()
    a.publish(q, env(b"m"))
    [first] = a.fetch([q], 1, 0)
    assert b.fetch([q], 1, 0) == []
    a.close()                                           # e.g. the worker died
    [again] = collect(b, [q], 1)
    assert again.envelope.body == b"m" and again.redelivered and again.delivery_count == 2
    a.ack([first.tag])                                  # stale tag: ignored, b still holds it
    assert b.release_all() == 1


def test_release_all(make, q):
    a, b = make(), make()
    other = q + "-other"
    for i in range(3):
        a.publish(q, env(str(i).encode()))
    a.publish(other, env(b"o"))
    assert len(collect(a, [q, other], 4)) == 4
    assert a.release_all() == 4
    assert a.release_all() == 0
    got = collect(b, [q, other], 4)
    assert sorted(bodies(got)) == [b"0", b"1", b"2", b"o"]
    assert all(d.redelivered for d in got)


def test_purge(make, q):
    t = make()
    t.publish(q, env(b"leased"))
    t.fetch([q], 1, 0)
    t.publish(q, env(b"ready"))
    t.publish(q, env(b"delayed"), eta=time.time() + 60)
    t.publish(q + "-keep", env())
    assert t.queue_size(q) == 2                         # ready + delayed
    assert t.purge(q) == 2
    assert t.queue_size(q) == 0 and t.queue_size(q + "-keep") == 1
    assert t.release_all() == 1                          # the delivered one survived


def test_dead_letters(make, q):
    t = make()
    t.purge_dead()
    t.publish(q, env(b"bad", task="t1"), priority=7)
    [d] = t.fetch([q], 1, 0)
    t.dead_letter(d.tag, "boom")
    assert t.release_all() == 0 and t.queue_size(q) == 0
    t.dead_letter(None, "after ack", env(b"copy", task="t2"), queue=q + "2")
    t.dead_letter(Tag(0, 1), "not ours", env(b"never"), queue=q)
    letters = t.dead_letters()
    assert [(x.queue, x.reason, x.envelope.body) for x in letters] == [
        (q, "boom", b"bad"), (q + "2", "after ack", b"copy")]
    assert letters[0].envelope.headers == {"task": "t1"}
    assert letters[0].died_at == pytest.approx(time.time(), abs=5)
    assert len(t.dead_letters(limit=1)) == 1
    assert len(t.dead_letters()) == 2                    # browsing leaves them there

    assert t.requeue_dead([letters[0].id]) == 1
    [again] = collect(t, [q], 1)
    assert again.envelope.body == b"bad" and again.delivery_count == 1
    assert again.envelope.headers == {"task": "t1"}
    assert [x.reason for x in t.dead_letters()] == ["after ack"]
    assert t.requeue_dead(None) == 1
    assert t.dead_letters() == []
    assert bodies(collect(t, [q + "2"], 1)) == [b"copy"]

    t.dead_letter(again.tag, "again")
    t.dead_letter(None, "x", env(), queue=q)
    assert t.purge_dead() == 2 and t.dead_letters() == []


def test_requeued_dead_letter_keeps_priority(make, q):
    t = make()
    t.declare_queue(q, max_priority=10)
    t.publish(q, env(b"high"), priority=9)
    [d] = t.fetch([q], 1, 0)
    t.dead_letter(d.tag, "r")
    t.release_all()                  # stop consuming: "low" must wait in the queue
    t.publish(q, env(b"low"))
    t.requeue_dead(None)
    assert bodies(collect(make(), [q], 2)) == [b"high", b"low"]


def cm(body: bytes, routing_key: str = "", **headers) -> ControlMessage:
    return ControlMessage(body, headers, routing_key)


def test_broadcast_each_subscriber_once(make):
    t, other = make(), make()
    ch = f"ctl-{uuid.uuid4().hex[:6]}.pidbox"
    s1, s2 = t.subscribe(ch), other.subscribe(ch)
    t.broadcast(ch, cm(b'"one"'))
    other.broadcast(ch, cm(b'"two"'))
    t.broadcast(ch + "-elsewhere", cm(b'"no"'))
    got = s1.get(1.0) + s1.get(0.2)
    assert [m.body for m in got] == [b'"one"', b'"two"'] and all(isinstance(m, ControlMessage) for m in got)
    assert [m.body for m in s2.get(1.0) + s2.get(0.2)] == [b'"one"', b'"two"']
    assert s1.get(0.05) == [] and s2.get(0.05) == []
    late = t.subscribe(ch)
    assert late.get(0.05) == []
    t.broadcast(ch, cm(b'"three"'))
    assert [m.body for m in s1.get(1.0)] == [m.body for m in s2.get(1.0)] == [m.body for m in late.get(1.0)] \
        == [b'"three"']
    s1.close()
    s1.close()
    assert s1.get(0.05) == []
    t.broadcast(ch, cm(b'"four"'))
    assert [m.body for m in s2.get(1.0)] == [b'"four"']


def test_broadcast_wakes_waiting_subscriber(make):
    t = make()
    sub = t.subscribe("wake.pidbox")
    sender = threading.Timer(0.1, lambda: make().broadcast("wake.pidbox", cm(b'"hi"')))
    sender.start()
    started = time.monotonic()
    assert [m.body for m in sub.get(5.0)] == [b'"hi"']
    assert time.monotonic() - started < 0.9
    sender.join()


def test_pattern_on_a_fanout_exchange_is_applied_by_the_subscriber(make):
    t = make()
    ch = f"ctl-{uuid.uuid4().hex[:6]}.pidbox"
    some, every = t.subscribe(ch, "worker.*"), t.subscribe(ch)
    for key in ("worker.heartbeat", "task.succeeded", "worker.a.b"):
        t.broadcast(ch, cm(b"{}", key))
    assert [m.routing_key for m in some.get(1.0) + some.get(0.2)] == ["worker.heartbeat"]
    assert len(every.get(1.0) + every.get(0.2)) == 3


def test_topic_match():
    from qctl.transports.amqp_pidbox import topic_match
    assert topic_match("#", "") and topic_match("#", "a.b") and topic_match("worker.#", "worker")
    assert topic_match("worker.#", "worker.heartbeat") and not topic_match("worker.#", "task.sent")
    assert topic_match("*.sent", "task.sent") and not topic_match("*.sent", "task.x.sent")
    assert topic_match("a.#.z", "a.z") and topic_match("a.#.z", "a.b.c.z") and not topic_match("a.#.z", "a.b")


def test_mailboxes(make):
    t = make()
    box, other = f"box-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    t.put_reply(box, cm(b'"lost"'))                      # no mailbox yet: dropped, as by Celery
    t.open_mailbox(box)
    t.open_mailbox(box)                                  # idempotent
    t.put_reply(box, cm(b'"r1"', ticket="t1", clock=3))
    make().put_reply(box, cm(b'"r2"', ticket="t1", clock=4))
    t.put_reply(other, cm(b'"x"'))                       # not opened: dropped
    got = t.get_replies(box, 1.0)
    if len(got) < 2:
        got += t.get_replies(box, 1.0)
    assert [m.body for m in got] == [b'"r1"', b'"r2"']
    assert got[0].headers == {"ticket": "t1", "clock": 3} and got[0].routing_key == box
    assert t.get_replies(box, 0.05) == []
    assert t.get_replies(other, 0.2) == []               # opened by reading: empty

    sender = threading.Timer(0.1, lambda: make().put_reply(box, cm(b'"late"')))
    sender.start()
    started = time.monotonic()
    assert [m.body for m in t.get_replies(box, 5.0)] == [b'"late"']
    assert time.monotonic() - started < 0.9
    sender.join()

    t.close_mailbox(box)
    t.close_mailbox(box)                                 # idempotent
    t.close_mailbox("never-opened")
    t.put_reply(box, cm(b'"after close"'))               # dropped, no error
    assert t.get_replies(box, 0.3) == []                 # a new, empty mailbox
    t.close_mailbox(box)
    t.close_mailbox(other)


def test_reply_ttl(make, rawch):
    t = make()
    box = f"box-{uuid.uuid4().hex[:6]}"
    t.open_mailbox(box)
    t.put_reply(box, cm(b'"short"'), ttl=0.2)
    time.sleep(1.5)                # the pump has taken it off the socket by now: it aged in our box
    assert t.get_replies(box, 0.1) == []
    t.put_reply(box, cm(b'"kombu expires"', expires=time.time() - 1))   # a kombu-style header
    assert t.get_replies(box, 0.5) == []
    t.put_reply(box, cm(b'"fine"'), ttl=5)
    assert [m.body for m in t.get_replies(box, 1.0)] == [b'"fine"']
    # While a reply waits in the queue the broker expires it (``expiration``).
    oid = str(uuid.uuid4())
    name = f"{oid}.reply.celery.pidbox"
    rawch.queue_declare(name, exclusive=True, auto_delete=True,
                        arguments={"x-expires": 10000, "x-message-ttl": 300000})
    rawch.queue_bind(name, "reply.celery.pidbox", routing_key=oid)
    t.put_reply(oid, cm(b'"gone"'), ttl=0.05)
    t.put_reply(oid, cm(b'"kept"'), ttl=60)
    time.sleep(0.3)
    method, props, body = rawch.basic_get(name, auto_ack=True)
    assert body == b'"kept"' and props.expiration == "60000"
    assert rawch.basic_get(name, auto_ack=True)[0] is None


def test_mailboxes_read_from_several_threads(make):
    """One connection owns every mailbox; threads waiting on different mailboxes each get
    theirs promptly, and opening a mailbox does not wait for a reader's timeout."""
    t, sender = make(), make()
    boxes = [f"mt-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    for box in boxes:
        t.open_mailbox(box)
    results: dict[str, tuple[list, float]] = {}

    def wait(box):
        started = time.monotonic()
        got = t.get_replies(box, 5.0)
        results[box] = ([m.body for m in got], time.monotonic() - started)
    threads = [threading.Thread(target=wait, args=(box,)) for box in boxes]
    for th in threads:
        th.start()
    time.sleep(0.3)
    started = time.monotonic()
    t.open_mailbox("mt-new-" + uuid.uuid4().hex[:6])    # while the others read the socket
    assert time.monotonic() - started < 0.5
    for i, box in enumerate(boxes):
        sender.put_reply(box, cm(str(i).encode()))
    for th in threads:
        th.join(10)
    for i, box in enumerate(boxes):
        bodies_, waited = results[box]
        assert bodies_ == [str(i).encode()] and waited < 1.5


def test_no_live_node_registry(make):
    t = make()
    t.announce_node("w1@h", 10)
    t.forget_node("w1@h")
    assert t.live_nodes() is None


def test_fetch_wakes_promptly_on_publish(make, q):
    t, publisher = make(), make()
    t.fetch([q], 1, 0)
    sender = threading.Timer(0.2, lambda: publisher.publish(q, env(b"go")))
    sender.start()
    started = time.monotonic()
    got = t.fetch([q], 5, 5.0)
    waited = time.monotonic() - started
    sender.join()
    assert bodies(got) == [b"go"]
    assert waited < 0.7


def test_fetch_timeout_returns_empty(make, q):
    t = make()
    t.declare_queue(q)
    started = time.monotonic()
    assert t.fetch([q], 5, 0.4) == []
    assert 0.35 <= time.monotonic() - started < 2.0


def test_threads_share_one_transport(make, q):
    t = make()
    for i in range(300):
        t.publish(q, env(str(i).encode()))
    seen: list[bytes] = []
    lock = threading.Lock()

    def consume():
        while True:
            got = t.fetch([q], 7, 0.3)
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
    assert t.release_all() == 0


def test_idle_consumer_keeps_its_connection(make, q):
    """With a 1 s heartbeat, a consumer that fetches nothing for 4 s (a full worker window)
    keeps its deliveries: the pump thread answers heartbeats."""
    t = make(heartbeat=1)
    t.publish(q, env(b"x"))
    [d] = t.fetch([q], 1, 0)
    time.sleep(4)
    t.ack([d.tag])
    assert make().fetch([q], 1, 0.5) == [] and t.queue_size(q) == 0


def test_ack_from_another_thread_while_fetching(make, q, rawch):
    t = make()
    t.publish(q, env(b"a"))
    [d] = t.fetch([q], 1, 0)
    blocker = threading.Thread(target=lambda: t.fetch([q], 1, 3.0))
    blocker.start()
    time.sleep(0.2)                                      # the fetcher now owns the connection
    started = time.monotonic()
    t.ack([d.tag])                                       # settled on the fetching thread
    assert time.monotonic() - started < 0.5
    blocker.join()
    assert t.release_all() == 0
    t.close()
    assert rawch.queue_declare(q, passive=True).method.message_count == 0


# -- Celery's layout and message properties ----------------------------------------------

def test_celery_declarations(make, rawch):
    t = make()
    t.declare_queue("celery")
    # What Celery declares must be equivalent: these succeed only if ours matches.
    rawch.exchange_declare("celery", "direct", durable=True, auto_delete=False)
    rawch.queue_declare("celery", durable=True, exclusive=False, auto_delete=False, arguments=None)
    rawch.queue_declare("celery", passive=True)
    rawch.queue_bind("celery", "celery", routing_key="celery")
    # ...and the declaration matters: a priority queue of the same name is refused.
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        rawch.queue_declare("celery", durable=True, arguments={"x-max-priority": 10})
    assert info.value.reply_code == 406
    with pytest.raises(ImproperlyConfigured, match="other arguments"):
        make().declare_queue("celery", max_priority=10)
    t.purge("celery")


def test_task_message_properties_as_celery_sends_them(make, url):
    from qctl.protocol import build_task_message
    t = make()
    t.declare_queue("celery")
    t.purge("celery")
    envelope = build_task_message("proj.add", (2, 3), {}, task_id="a1111111-1111-1111-1111-111111111111",
                                  expires=3600, time_limit=30.0, soft_time_limit=10.5, priority=5)
    t.publish("celery", envelope, priority=5)
    conn = pika.BlockingConnection(_raw_params(url))
    try:
        method, props, body = conn.channel().basic_get("celery", auto_ack=True)
    finally:
        conn.close()
    assert (method.exchange, method.routing_key) == ("", "celery")
    assert props.content_type == "application/json" and props.content_encoding == "utf-8"
    assert props.delivery_mode == 2 and props.priority == 5
    assert props.correlation_id == envelope.properties["correlation_id"]
    assert props.reply_to == envelope.properties["reply_to"]
    assert 3590000 <= int(props.expiration) <= 3600000
    assert props.headers["timelimit"] == [30, 11]        # pika cannot send floats
    assert props.headers["task"] == "proj.add" and props.headers["retries"] == 0
    assert body == envelope.body


def test_float_and_odd_header_values(make, q):
    t = make()
    t.publish(q, env(b"x", timelimit=[20.0, 10.0], f=0.25, whole=3.0, t=(1, 2), nested={"g": 1.5}))
    [d] = t.fetch([q], 1, 0)
    assert d.envelope.headers == {"timelimit": [20, 10], "f": "0.25", "whole": 3, "t": [1, 2],
                                  "nested": {"g": "1.5"}}


def test_foreign_message_without_headers(make, q, rawch):
    t = make()
    t.declare_queue(q)
    rawch.basic_publish("", q, b"\xff\xfe not json")
    [d] = t.fetch([q], 1, 0)
    assert d.envelope.headers == {} and d.envelope.body == b"\xff\xfe not json"
    assert d.error is None


def test_publish_to_a_down_broker_raises_masked(make):
    from tests.servers_rabbit import _free_ports
    [port] = _free_ports(1)
    t = AmqpTransport(f"amqp://guest:s3cret@127.0.0.1:{port}//")
    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        t.publish("q", env())
    text = str(info.value)
    assert "s3cret" not in text and "********" in text and "\n" not in text
    assert time.monotonic() - started < 5
    with pytest.raises(OperationalError):
        t.fetch(["q"], 1, 0.1)
    with pytest.raises(OperationalError):
        t.ping()
    t.close()


def test_app_publish_retries_then_raises(make):
    from qctl import App
    from tests.servers_rabbit import _free_ports
    [port] = _free_ports(1)
    app = App("proj", broker=f"amqp://guest:s3cret@127.0.0.1:{port}//", set_as_current=False,
              task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1,
                                         "interval_step": 0.1, "interval_max": 0.1})
    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        app.send_task("proj.add", (1, 1))
    assert 0.2 <= time.monotonic() - started < 5                 # two waits of 0.1 s
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    app.close()


def test_publish_to_an_unknown_queue_declares_it_like_celery(make, q, rawch):
    make().publish(q, env(b"x"))
    assert rawch.queue_declare(q, passive=True).method.message_count == 1
    rawch.queue_declare(q, durable=True, arguments=None)          # Celery's declaration fits
    rawch.exchange_declare(q, "direct", durable=True)


# -- ETA through the delay queues --------------------------------------------------------

def _delay_queues(rawch_factory, q):
    """{level: (ready, consumers)} of the delay queues of ``q`` that exist."""
    out = {}
    for k in range(32):
        ch = rawch_factory()
        try:
            ok = ch.queue_declare(f"qctl.delayed.{q}.{k}", passive=True).method
            out[k] = (ok.message_count, ok.consumer_count)
        except pex.ChannelClosedByBroker:
            pass
    return out


def test_eta_arrives_at_its_time_not_before(make, q):
    t = make()
    t.declare_queue(q)
    t.fetch([q], 1, 0)                                   # consuming before the publish
    eta = time.time() + 1.5
    make().publish(q, env(b"later"), eta=eta)
    make().publish(q, env(b"now"))
    assert bodies(collect(t, [q], 1)) == [b"now"]
    assert t.queue_size(q) == 1                          # the delayed one counts
    got = []
    while not got:
        got = t.fetch([q], 10, 0.2)
        if not got:
            assert time.time() < eta + 2.0, "ETA message did not arrive"
    arrived = time.time()
    assert bodies(got) == [b"later"]
    assert arrived >= eta - 0.005                        # never early (ms rounding up)
    assert arrived < eta + 1.0
    assert got[0].envelope.headers == {}                 # no x-death / bookkeeping leaks
    assert (got[0].exchange, got[0].routing_key) == ("", q)


def test_long_eta_is_held_by_no_consumer(make, q, url):
    t = make()
    t.declare_queue(q)
    t.publish(q, env(b"tomorrow"), eta=time.time() + 86400)
    assert t.fetch([q], 10, 0.5) == []
    conn = pika.BlockingConnection(_raw_params(url))
    try:
        levels = _delay_queues(conn.channel, q)
    finally:
        conn.close()
    waiting = {k: v for k, v in levels.items() if v[0]}
    assert len(waiting) == 1
    [(k, (ready, consumers))] = waiting.items()
    assert 2 ** k <= 86400 * 1000 < 2 ** (k + 1) and consumers == 0
    assert t.queue_size(q) == 1
    assert t.purge(q) == 1 and t.queue_size(q) == 0


def test_early_celery_eta_goes_back_to_the_delay_queues(make, q, rawch):
    """A Celery client publishes ETA tasks straight to the queue; we never hold them."""
    from datetime import datetime, timedelta, timezone
    t = make()
    t.declare_queue(q)
    eta = datetime.now(timezone.utc) + timedelta(seconds=2)
    rawch.basic_publish("", q, b"[[], {}, {}]", pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=2,
        headers={"task": "proj.add", "id": "x1", "eta": eta.isoformat()}))
    assert t.fetch([q], 5, 0.5) == []                    # diverted, not handed out
    assert t.queue_size(q) == 1
    got = []
    while not got:
        got = t.fetch([q], 5, 0.2)
        assert time.time() < eta.timestamp() + 3
    assert time.time() >= eta.timestamp() - 0.005
    assert got[0].envelope.headers["eta"] == eta.isoformat()


# -- remote control and events as Celery 5.7 declares them --------------------------------

def _redeclare(lock, conn, *calls):
    """Run ``channel.method(*args, **kwargs)`` for each call on a new channel of ``conn``
    (the connection that owns an exclusive queue); returns the reply code of the first
    refusal, or 0."""
    with lock:                          # the pump thread services this connection otherwise
        ch = conn.channel()
        try:
            for method, args, kwargs in calls:
                getattr(ch, method)(*args, **kwargs)
        except pex.ChannelClosedByBroker as exc:
            return exc.reply_code
        ch.close()
    return 0


def test_worker_control_queue_is_celerys(make, rawch):
    t = make()
    node = f"w-{uuid.uuid4().hex[:6]}@h"
    sub = t.subscribe("celery.pidbox", name=f"{node}.celery.pidbox")
    assert sub.queue == f"{node}.celery.pidbox"
    # kombu's declarations: equivalent ones succeed, others are refused (406).
    rawch.exchange_declare("celery.pidbox", "fanout", durable=False, auto_delete=False)
    rawch.exchange_declare("celery.pidbox", "fanout", passive=True)
    celery_queue = ("queue_declare", (f"{node}.celery.pidbox",),
                    dict(durable=False, exclusive=True, auto_delete=True,
                         arguments={"x-expires": 10000, "x-message-ttl": 300000}))
    bind = ("queue_bind", (f"{node}.celery.pidbox", "celery.pidbox"), dict(routing_key=""))
    assert _redeclare(sub.lock, sub.link.conn, celery_queue, bind) == 0
    assert _redeclare(sub.lock, sub.link.conn, ("queue_declare", (f"{node}.celery.pidbox",),
                      dict(durable=False, exclusive=True, auto_delete=True,
                           arguments={"x-expires": 60000, "x-message-ttl": 300000}))) == 406
    with pytest.raises(pex.ChannelClosedByBroker) as info:      # exclusive: another connection
        rawch.connection.channel().queue_declare(f"{node}.celery.pidbox", passive=True)
    assert info.value.reply_code == 405
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        rawch.exchange_declare("celery.pidbox", "fanout", durable=True)
    assert info.value.reply_code == 406
    # A second worker with the same node name cannot take the queue.
    with pytest.raises(OperationalError, match="RESOURCE_LOCKED"):
        make().subscribe("celery.pidbox", name=f"{node}.celery.pidbox")
    sub.get(0.2)
    # Without a name: a server-named exclusive queue.
    anon = t.subscribe("celery.pidbox")
    assert anon.queue.startswith("amq.gen-")
    sub.close()
    anon.close()


def test_control_request_as_celery_sends_it(make, rawch):
    """What a Celery worker's queue receives: raw JSON, Celery's properties, ``expires`` as an
    int pika can send (the worker ignores it)."""
    node = f"w-{uuid.uuid4().hex[:6]}@h"
    name = f"{node}.celery.pidbox"
    rawch.exchange_declare("celery.pidbox", "fanout", durable=False, auto_delete=False)
    rawch.queue_declare(name, durable=False, exclusive=True, auto_delete=True,
                        arguments={"x-expires": 10000, "x-message-ttl": 300000})
    rawch.queue_bind(name, "celery.pidbox", routing_key="")
    body = b'{"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null}'
    expires = time.time() + 1.25
    make().broadcast("celery.pidbox", cm(body, clock=7, expires=expires))
    time.sleep(0.2)
    method, props, got = rawch.basic_get(name, auto_ack=True)
    assert got == body and (method.exchange, method.routing_key) == ("celery.pidbox", "")
    assert (props.content_type, props.content_encoding, props.delivery_mode) == ("application/json", "utf-8", 2)
    assert props.headers == {"clock": 7, "expires": math.ceil(expires)}


def test_request_reply_round_trip(make):
    client, worker = make(), make()
    node, oid, ticket = f"w-{uuid.uuid4().hex[:6]}@h", str(uuid.uuid4()), str(uuid.uuid4())
    queue = worker.subscribe("celery.pidbox", name=f"{node}.celery.pidbox")
    client.open_mailbox(oid)                             # before asking: replies are not mandatory
    request = (b'{"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null, '
               b'"ticket": "' + ticket.encode() + b'", "reply_to": {"exchange": "reply.celery.pidbox", '
               b'"routing_key": "' + oid.encode() + b'"}}')
    client.broadcast("celery.pidbox", cm(request, clock=1, expires=time.time() + 1.0))
    got = [m for m in queue.get(2.0) if m.body == request]
    assert len(got) == 1 and got[0].headers["clock"] == 1 and got[0].routing_key == ""
    assert isinstance(got[0].headers["expires"], int)
    reply = b'{"' + node.encode() + b'": {"ok": "pong"}}'
    worker.put_reply(oid, cm(reply, ticket=ticket, clock=2))
    [answer] = client.get_replies(oid, 2.0)
    assert answer == ControlMessage(reply, {"ticket": ticket, "clock": 2}, oid)
    client.close_mailbox(oid)
    queue.close()


def test_client_mailbox_is_celerys(make, rawch):
    t = make()
    oid = str(uuid.uuid4())
    name = f"{oid}.reply.celery.pidbox"
    t.open_mailbox(oid)
    rawch.exchange_declare("reply.celery.pidbox", "direct", durable=False, auto_delete=False)
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        rawch.connection.channel().exchange_declare("reply.celery.pidbox", "direct", durable=True)
    assert info.value.reply_code == 406
    kombu_queue = ("queue_declare", (name,), dict(durable=False, exclusive=True, auto_delete=True,
                                                  arguments={"x-expires": 10000, "x-message-ttl": 300000}))
    bind = ("queue_bind", (name, "reply.celery.pidbox"), dict(routing_key=oid))
    assert _redeclare(t._mailbox_lock, t._mailbox.conn, kombu_queue, bind) == 0
    assert _redeclare(t._mailbox_lock, t._mailbox.conn, ("queue_declare", (name,),
                      dict(durable=False, exclusive=True, auto_delete=True,
                           arguments={"x-expires": 10000}))) == 406
    with pytest.raises(pex.ChannelClosedByBroker) as info:      # exclusive to the reader
        rawch.connection.channel().queue_declare(name, passive=True)
    assert info.value.reply_code == 405
    t.close_mailbox(oid)
    with pytest.raises(pex.ChannelClosedByBroker) as info:      # deleted
        rawch.connection.channel().queue_declare(name, passive=True)
    assert info.value.reply_code == 404


def test_reply_reaches_a_celery_client_queue(make, rawch):
    """A Celery client's reply queue is exclusive and bound with routing key = its oid."""
    oid = str(uuid.uuid4())
    rawch.exchange_declare("reply.celery.pidbox", "direct", durable=False, auto_delete=False)
    name = f"{oid}.reply.celery.pidbox"
    rawch.queue_declare(name, exclusive=True, auto_delete=True,
                        arguments={"x-expires": 10000, "x-message-ttl": 300000})
    rawch.queue_bind(name, "reply.celery.pidbox", routing_key=oid)
    make().put_reply(oid, cm(b'{"w1@h": {"ok": "pong"}}', ticket="tk", clock=5))
    time.sleep(0.1)
    method, props, body = rawch.basic_get(name, auto_ack=True)
    assert body == b'{"w1@h": {"ok": "pong"}}' and props.content_type == "application/json"
    assert (method.exchange, method.routing_key) == ("reply.celery.pidbox", oid)
    assert props.delivery_mode == 1 and props.content_encoding == "utf-8"
    assert props.headers == {"ticket": "tk", "clock": 5}


def test_events_as_celery_declares_them(make, rawch):
    t = make()
    events = t.subscribe("celeryev")
    assert events.queue.startswith("celeryev.") and uuid.UUID(events.queue[len("celeryev."):])
    rawch.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        rawch.connection.channel().exchange_declare("celeryev", "topic", durable=False)
    assert info.value.reply_code == 406
    receiver_queue = ("queue_declare", (events.queue,), dict(durable=False, exclusive=True, auto_delete=True,
                                                              arguments={"x-message-ttl": 5000, "x-expires": 60000}))
    assert _redeclare(events.lock, events.link.conn, receiver_queue,
                      ("queue_bind", (events.queue, "celeryev"), dict(routing_key="#"))) == 0
    assert _redeclare(events.lock, events.link.conn, ("queue_declare", (events.queue,),
                      dict(durable=False, exclusive=True, auto_delete=True,
                           arguments={"x-message-ttl": 300000, "x-expires": 60000}))) == 406
    # A Celery worker's gossip queue receives our heartbeats as Celery sends them.
    gossip = rawch.queue_declare(f"celeryev.{uuid.uuid4()}", exclusive=True, auto_delete=True,
                                 arguments={"x-message-ttl": 5000, "x-expires": 60000}).method.queue
    rawch.queue_bind(gossip, "celeryev", routing_key="worker.#")
    mark = uuid.uuid4().hex
    beat = b'{"type": "worker-heartbeat", "hostname": "w1@h", "mark": "' + mark.encode() + b'"}'
    t.broadcast("celeryev", cm(beat, "worker.heartbeat", hostname="w1@h"))
    t.broadcast("celeryev", cm(b'[{"type": "task-received"}]', "task.multi", hostname="w1@h"))
    time.sleep(0.2)
    method, props, body = rawch.basic_get(gossip, auto_ack=True)
    assert body == beat and (method.exchange, method.routing_key) == ("celeryev", "worker.heartbeat")
    assert (props.content_type, props.content_encoding, props.delivery_mode) == ("application/json", "utf-8", 1)
    assert props.headers == {"hostname": "w1@h"}
    assert rawch.basic_get(gossip, auto_ack=True)[0] is None          # task.multi: not worker.#
    got = [m for m in events.get(1.0) + events.get(0.3) if m.headers.get("hostname") == "w1@h"]
    assert [m.routing_key for m in got][-2:] == ["worker.heartbeat", "task.multi"]
    events.close()


def test_event_patterns(make):
    exchange = f"ev-{uuid.uuid4().hex[:6]}"
    t = make(event_exchange=exchange)
    every, workers, sent = t.subscribe(exchange), t.subscribe(exchange, "worker.#"), t.subscribe(exchange, "*.sent")
    keys = ["worker.heartbeat", "task.sent", "task.multi", "worker.online", "task.x.sent"]
    for key in keys:
        t.broadcast(exchange, cm(b"{}", key))

    def keys_of(sub):
        return [m.routing_key for m in sub.get(1.0) + sub.get(0.3)]
    assert keys_of(every) == keys
    assert keys_of(workers) == ["worker.heartbeat", "worker.online"]
    assert keys_of(sent) == ["task.sent"]


def test_control_headers_round_trip(make):
    t = make()
    ch = f"ctl-{uuid.uuid4().hex[:6]}.pidbox"
    sub = t.subscribe(ch)
    headers = {"clock": 12, "expires": 1795299644.25, "whole": 3.0, "hostname": "w1@h", "none": None,
               "flag": True, "list": [1, "a"], "big": 2 ** 40, "frac": 0.5, "zero": 0}
    t.broadcast(ch, cm(b"{}", **headers))
    [m] = sub.get(1.0)
    assert m.headers == {"clock": 12, "expires": 1795299645, "whole": 3, "hostname": "w1@h", "none": None,
                         "flag": True, "list": [1, "a"], "big": 2 ** 40, "frac": "0.5", "zero": 0}
    box = f"box-{uuid.uuid4().hex[:6]}"
    t.open_mailbox(box)
    t.put_reply(box, cm(b"{}", ticket="a-b", clock=2 ** 33))
    [r] = t.get_replies(box, 1.0)
    assert r.headers == {"ticket": "a-b", "clock": 2 ** 33}


def test_celery_float_headers_arrive_as_floats(make, rawch, monkeypatch):
    """py-amqp sends ``expires`` as an AMQP double; we read it as a float."""
    import struct
    import pika.data as data
    original = data.encode_value

    def encode_value(pieces, value):
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return original(pieces, value)
    t = make()
    ch = f"ctl-{uuid.uuid4().hex[:6]}.pidbox"
    sub = t.subscribe(ch)
    monkeypatch.setattr(data, "encode_value", encode_value)
    rawch.basic_publish(ch, "", b"{}", pika.BasicProperties(headers={"clock": 1, "expires": 1795299644.6352844}))
    monkeypatch.undo()
    [m] = sub.get(1.0)
    assert m.headers == {"clock": 1, "expires": 1795299644.6352844}


# -- processes and restarts --------------------------------------------------------------

def _child_publish(url: str, q: str, transport: AmqpTransport) -> None:
    transport.publish(q, env(b"from-child"))            # the inherited object: new connection
    transport.close()
    os._exit(0)


def test_fork_uses_its_own_connection(make, q, url):
    t = make()
    t.publish(q, env(b"from-parent"))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_publish, args=(url, q, t))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    t.ping()                                             # the parent's connection is intact
    assert sorted(bodies(collect(t, [q], 2))) == [b"from-child", b"from-parent"]


@pytest.mark.slow
def test_reconnects_after_broker_restart(make, q, rabbit):  # noqa: F811
    t = make()
    t.declare_queue(q)
    for body in (b"held", b"waiting"):
        t.publish(q, env(body))
    [held] = t.fetch([q], 1, 0)
    sub = t.subscribe("restart.pidbox")
    box = f"box-{uuid.uuid4().hex[:6]}"
    t.open_mailbox(box)
    rabbit.stop_node()
    try:
        with pytest.raises(OperationalError):
            t.get_replies(box, 0.1)
        with pytest.raises(OperationalError):
            t.publish(q, env(b"lost"))
        with pytest.raises(OperationalError):
            t.fetch([q], 1, 0.2)
        with pytest.raises(OperationalError):
            sub.get(0.1)
        t.ack([held.tag])                                # the channel is gone: a no-op
    finally:
        rabbit.start_node()
    t.publish(q, env(b"after"))                          # the next call reconnects
    got = collect(t, [q], 3)
    assert sorted(bodies(got)) == [b"after", b"held", b"waiting"]
    assert [d.redelivered for d in got if d.envelope.body == b"held"] == [True]
    t.ack([d.tag for d in got])
    t.broadcast("restart.pidbox", cm(b'"x"'))
    assert [m.body for m in sub.get(1.0)] in ([], [b'"x"'])   # resubscribed (earlier ones lost)
    t.broadcast("restart.pidbox", cm(b'"y"'))
    assert [m.body for m in sub.get(1.0)] == [b'"y"']
    assert t.get_replies(box, 0.1) == []                 # reconnected: the mailbox is declared again
    make().put_reply(box, cm(b'"r"'))
    assert [m.body for m in t.get_replies(box, 2.0)] == [b'"r"']
