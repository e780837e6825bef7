"""The ``rpc://`` result backend on a real RabbitMQ node: results as messages to the client's
reply queue, laid out as Celery's rpc backend sends and declares them."""
from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest

from qctl import App, states
from qctl.backends import by_url
from qctl.backends.rpc import RpcBackend
from qctl.exceptions import ImproperlyConfigured, TimeoutError
from qctl.transports.amqp import connection_parameters
from tests.servers_rabbit import rabbit  # noqa: F401 - the session's RabbitMQ node

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def app(rabbit):  # noqa: F811
    app = App("proj", broker=rabbit.url, backend="rpc://", set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def worker_backend(app):
    """A second backend object, as a worker process would have."""
    backend = RpcBackend("rpc://", app)
    yield backend
    backend.close()


@pytest.fixture
def rawch(rabbit):  # noqa: F811
    conn = pika.BlockingConnection(connection_parameters(rabbit.url))
    yield conn.channel()
    if conn.is_open:
        conn.close()


def meta(task_id: str, status: str = states.SUCCESS, result=42) -> dict:
    return {"status": status, "result": result, "traceback": None, "children": [],
            "date_done": "2026-01-01T00:00:00+00:00" if status in states.READY_STATES else None,
            "task_id": task_id}


def test_needs_an_amqp_broker(rabbit):  # noqa: F811
    assert isinstance(by_url("rpc://", App("p", broker=rabbit.url, set_as_current=False)), RpcBackend)
    with pytest.raises(ImproperlyConfigured, match="amqp"):
        by_url("rpc://", App("p", broker="sqlite:///x.db", set_as_current=False))
    assert RpcBackend.persistent is False


def test_result_round_trip(app, worker_backend):
    client = app.backend
    assert isinstance(client, RpcBackend)
    task_id = str(uuid.uuid4())
    client.on_task_call(task_id)                       # the queue exists before the worker answers
    assert client.get_task_meta(task_id)["status"] == states.PENDING
    assert worker_backend.store_for(task_id, client.encode(meta(task_id, states.STARTED, None)),
                                    states.STARTED, client.oid)
    assert worker_backend.store_for(task_id, client.encode(meta(task_id)), states.SUCCESS, client.oid)
    got = client.wait_for(task_id, timeout=5)
    assert got["status"] == states.SUCCESS and got["result"] == 42
    client.forget(task_id)
    assert client.get_task_meta(task_id)["status"] == states.PENDING


def test_wire_format_is_celerys(app, worker_backend, rawch):
    rawch.queue_declare("cap.rpc", exclusive=True)
    task_id = "a2222222-2222-2222-2222-222222222222"
    data = worker_backend.encode(meta(task_id))
    assert worker_backend.store_for(task_id, data, states.SUCCESS, "cap.rpc")
    method, props, body = rawch.basic_get("cap.rpc", auto_ack=True)
    assert (method.exchange, method.routing_key) == ("", "cap.rpc")
    assert props.content_type == "application/json" and props.content_encoding == "utf-8"
    assert props.headers == {} and props.delivery_mode == 1 and props.priority == 0
    assert props.correlation_id == task_id and body == data


def test_reply_queue_declared_as_celery_does(app, rawch):
    client = app.backend
    client.on_task_call()
    expires = int(app.conf.result_expires.total_seconds() * 1000)
    rawch.queue_declare(client.oid, durable=True, auto_delete=True, arguments={"x-expires": expires})
    from qctl.protocol import build_task_message
    assert build_task_message("proj.add", (1, 2)).properties["reply_to"] == client.oid


def test_reads_what_a_celery_worker_sends(app, rawch):
    """Each state change is its own message; a late non-ready one never hides the result."""
    client = app.backend
    client.on_task_call()
    task_id = str(uuid.uuid4())
    for status in (states.STARTED, states.SUCCESS, states.STARTED):
        rawch.basic_publish("", client.oid, client.encode(meta(task_id, status)), pika.BasicProperties(
            content_type="application/json", content_encoding="utf-8", headers={}, delivery_mode=1,
            correlation_id=task_id))
    assert client.wait_for(task_id, timeout=5)["status"] == states.SUCCESS
    time.sleep(0.1)
    assert client.get_task_meta(task_id)["status"] == states.SUCCESS


def test_wait_wakes_promptly(app, worker_backend):
    client = app.backend
    client.on_task_call()
    task_id = str(uuid.uuid4())
    sender = threading.Timer(0.2, lambda: worker_backend.store_for(
        task_id, client.encode(meta(task_id)), states.SUCCESS, client.oid))
    sender.start()
    started = time.monotonic()
    assert client.wait_for(task_id, timeout=5, interval=2.0)["result"] == 42
    assert time.monotonic() - started < 1.0
    sender.join()
    with pytest.raises(TimeoutError):
        client.wait_for(str(uuid.uuid4()), timeout=0.3)


def test_routes_for_plain_set(app, worker_backend):
    client = app.backend
    client.on_task_call()
    task_id, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    worker_backend.remember_reply_to(task_id, client.oid)
    worker_backend.set_many([(task_id, client.encode(meta(task_id)), states.SUCCESS),
                             (unknown, client.encode(meta(unknown)), states.SUCCESS)])  # no route
    assert client.wait_for(task_id, timeout=5)["status"] == states.SUCCESS
    assert client.get(unknown) is None
    # the route is forgotten once the task is ready; a client that is gone is not an error
    assert worker_backend.store_for(task_id, b"{}", states.SUCCESS, f"gone-{uuid.uuid4()}") is False


def test_end_to_end_with_a_simulated_worker(app, worker_backend):
    """send_task -> (worker reads reply_to from the message) -> AsyncResult.get()."""
    from qctl.protocol import read_headers
    queue = f"rpc-{uuid.uuid4().hex[:8]}"
    app.backend.on_task_call()                          # what App.send_task is to call for rpc
    result = app.send_task("proj.add", (2, 2), queue=queue)
    transport = app.transport
    deliveries: list = []
    deadline = time.monotonic() + 5
    while not deliveries and time.monotonic() < deadline:
        deliveries = transport.fetch([queue], 1, 0.2)
    [d] = deliveries
    message = read_headers(d.envelope, ["application/json"])
    worker_backend.remember_reply_to(message.id, d.envelope.properties["reply_to"])
    worker_backend.set(message.id, worker_backend.encode(meta(message.id, result=4)), states.SUCCESS)
    transport.ack([d.tag])
    assert result.get(timeout=5) == 4
