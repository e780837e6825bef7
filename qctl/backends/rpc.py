"""``rpc://``: results travel as messages to the client's own reply queue (Celery's rpc backend).

The client's queue is named by ``qctl.protocol.process_oid()``, the value every task message it
sends carries as ``reply_to``. It is declared as Celery declares it: durable, auto-delete,
``x-expires`` = ``result_expires`` (ms). The worker publishes each state change of a task (the
encoded meta) to the default exchange with routing key = the request's ``reply_to`` and
``correlation_id`` = task id, ``delivery_mode`` 1 (2 with ``result_persistent``), headers
``{}``; a message for a client that is gone is unroutable and dropped, as Celery drops it.

Results are not stored anywhere else (``persistent = False``): the client keeps the metas it
received in memory by task id (the newest; a ready state is never replaced by a later
non-ready one), and only the process that sent a task sees its result. Group metas
(``set_raw``) stay in this process too; chords are not supported (as in Celery).

Wiring (see ``store_for`` and ``remember_reply_to``):

* the client calls ``on_task_call(task_id)`` before publishing a task, so that the reply queue
  exists (and is consumed) before any worker answers;
* the worker knows ``reply_to`` from the request: ``store_for(task_id, data, state, reply_to)``
  sends directly; or ``remember_reply_to(task_id, reply_to)`` at delivery, after which plain
  ``set``/``set_many`` (e.g. from the result-settling thread) find the route. Inside a task
  (``update_state``), ``set`` uses the running request's ``reply_to``.

The consumer connection runs without heartbeats: a client may not read for a long time, and a
connection closed for missed heartbeats would take the auto-delete queue (and the results in
it) with it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

from .. import states
from ..exceptions import ImproperlyConfigured, OperationalError
from . import ResultBackend

logger = logging.getLogger("qctl.backends.rpc")
_ROUTES_MAX = 100_000     # remembered reply_to routes (worker side)
_RESULTS_MAX = 100_000    # received metas kept (client side); oldest dropped first
CHORDS_NEED_COUNTING = ("chords need a result backend that can count: sqlite, redis or "
                        "memory — rpc:// cannot")


class RpcBackend(ResultBackend):
    """Results as messages to ``reply_to``; see the module docstring."""

    persistent = False

    def __init__(self, url: str = "rpc://", app: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(url, app, options)
        conf = getattr(app, "conf", None)
        broker = self.options.get("broker_url") or getattr(conf, "effective_broker_url", None)
        if not broker or broker.split("://", 1)[0].lower() not in ("amqp", "amqps", "pyamqp"):
            raise ImproperlyConfigured("the rpc:// result backend needs an amqp:// broker "
                                       f"(broker is {broker.split('://', 1)[0] + '://' if broker else 'not set'})")
        self.broker_url = broker
        self.transport_options = dict(self.options.get("transport_options")
                                      or getattr(conf, "broker_transport_options", None) or {})
        self.result_persistent = bool(getattr(conf, "result_persistent", False))
        self._lock = threading.RLock()
        self._routes: OrderedDict[str, str] = OrderedDict()
        self._routes_lock = threading.Lock()
        self._results: OrderedDict[str, tuple[bytes, str | None]] = OrderedDict()
        self._raw: dict[str, bytes] = {}
        self._own_transport: Any = None
        self._link: Any = None
        self._queue: str | None = None
        self._pid = os.getpid()
        self._warned = False

    # -- connections ----------------------------------------------------------------------

    def _transport(self) -> Any:
        """The app's broker connection when it is AMQP on the same URL, else our own."""
        from ..transports.amqp import AmqpTransport
        app_transport = getattr(self.app, "transport", None) if self.app is not None else None
        if isinstance(app_transport, AmqpTransport) and app_transport.url.split("?")[0] == \
                self.broker_url.replace("pyamqp://", "amqp://", 1).split("?")[0]:
            return app_transport
        if self._own_transport is None:
            self._own_transport = AmqpTransport(self.broker_url, self.transport_options)
        return self._own_transport

    @property
    def oid(self) -> str:
        """This process's reply queue name (the ``reply_to`` of the tasks it sends)."""
        from ..protocol import process_oid
        return process_oid()

    def _consumer(self) -> Any:
        """Our reply queue, declared and consumed (reconnecting when needed); lock held."""
        from ..transports.amqp import Link, describe
        import pika
        if os.getpid() != self._pid:     # forked: the parent's sockets are not ours to close
            self._pid, self._link, self._own_transport = os.getpid(), None, None
            self._results.clear()
        queue = self.oid
        link = self._link
        if link is not None and link.alive() and self._queue == queue:
            return link
        if link is not None:
            link.close()
        self._link = conn = None
        try:
            conn = pika.BlockingConnection(self._params())
            link = Link(conn, False, self._lock)
            args = {"x-expires": int(float(self.expires) * 1000)} if self.expires else None
            ch = link.channel()
            ch.queue_declare(queue, durable=True, auto_delete=True, arguments=args)
            ch.basic_consume(queue, self._on_message, auto_ack=True)
        except Exception as exc:  # noqa: BLE001 - pika errors, OSError
            if conn is not None and conn.is_open:
                conn.close()
            raise OperationalError(describe(self.broker_url, exc, "consume results from")) from None
        self._link, self._queue = link, queue
        return link

    def _params(self) -> Any:
        from ..transports.amqp import connection_parameters
        return connection_parameters(self.broker_url.replace("pyamqp://", "amqp://", 1),
                                     self.transport_options, heartbeat=0, name="qctl rpc results")

    def _on_message(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        data = bytes(body)
        task_id, state = props.correlation_id, None
        try:
            meta = self.decode(data)
            state = meta.get("status")
            task_id = task_id or meta.get("task_id")
        except Exception:  # noqa: BLE001 - kept as received; get() callers decode and report
            pass
        if not task_id:
            return
        old = self._results.get(task_id)
        if old is not None and old[1] in states.READY_STATES and state not in states.READY_STATES:
            return          # a late STARTED/RETRY must not hide the final result
        self._results[task_id] = (data, state)
        self._results.move_to_end(task_id)
        while len(self._results) > _RESULTS_MAX:
            self._results.popitem(last=False)

    def _drain(self, seconds: float) -> None:
        link = self._consumer()
        try:
            link.conn.process_data_events(max(seconds, 0.0))
        except Exception as exc:  # noqa: BLE001
            from ..transports.amqp import describe
            link.close()
            self._link = None
            raise OperationalError(describe(self.broker_url, exc, "consume results from")) from None

    # -- client side ----------------------------------------------------------------------

    def on_task_call(self, task_id: str | None = None) -> None:
        """Declare (and consume) our reply queue before a task is sent, so that no result
        arrives before the queue exists."""
        with self._lock:
            self._consumer()

    def get(self, task_id: str) -> bytes | None:
        """The newest meta received for ``task_id`` (None when nothing arrived yet)."""
        with self._lock:
            self._drain(0)
            entry = self._results.get(task_id)
        return entry[0] if entry else None

    def wait_for_change(self, task_ids: list[str], timeout: float) -> None:
        """Consume until a message for one of ``task_ids`` arrived or ``timeout`` passed."""
        deadline = time.monotonic() + max(timeout, 0.0)
        wanted = set(task_ids)
        with self._lock:
            seen = {t: self._results.get(t) for t in wanted}
            while True:
                left = deadline - time.monotonic()
                self._drain(min(max(left, 0.0), 1.0))
                if any(self._results.get(t) is not seen[t] for t in wanted) or left <= 0:
                    return

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._results.pop(task_id, None)
        self._raw.pop(task_id, None)

    def set_raw(self, key: str, data: bytes) -> None:
        """Group metas are kept in this process only (rpc has no shared store)."""
        self._raw[key] = bytes(data)

    def get_raw(self, key: str) -> bytes | None:
        return self._raw.get(key)

    # -- chords: nothing shared to count in ----------------------------------------------

    def chord_set_size(self, group_id: str, size: int) -> None:
        raise ImproperlyConfigured(CHORDS_NEED_COUNTING)

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        raise ImproperlyConfigured(CHORDS_NEED_COUNTING)

    def chord_cleanup(self, group_id: str) -> None:
        raise ImproperlyConfigured(CHORDS_NEED_COUNTING)

    # -- worker side ----------------------------------------------------------------------

    def remember_reply_to(self, task_id: str, reply_to: str | None) -> None:
        """Note where ``task_id``'s results go (call when the task message is received)."""
        if not reply_to:
            return
        with self._routes_lock:
            self._routes[task_id] = reply_to
            self._routes.move_to_end(task_id)
            while len(self._routes) > _ROUTES_MAX:
                self._routes.popitem(last=False)

    def _route(self, task_id: str, state: str) -> str | None:
        with self._routes_lock:
            reply_to = (self._routes.pop(task_id, None) if state in states.READY_STATES
                        else self._routes.get(task_id))
        if reply_to:
            return reply_to
        from ..app import _running_request
        request = _running_request()
        if request is not None and request.id == task_id:
            return request.reply_to
        return None

    def store_for(self, task_id: str, data: bytes, state: str, reply_to: str | None,
                  correlation_id: str | None = None) -> bool:
        """Send ``data`` to the client queue ``reply_to``. Returns False when there is no
        route or the client is gone (the message was unroutable), like Celery, which then
        drops the result."""
        if not reply_to:
            return False
        import pika
        from ..serialization import content_type_of
        props = pika.BasicProperties(
            content_type=content_type_of(self.serializer), content_encoding="utf-8", headers={},
            delivery_mode=2 if self.result_persistent else 1, priority=0,
            correlation_id=correlation_id or task_id)
        return self._transport().publish_raw("", reply_to, bytes(data), props, mandatory=True)

    def set(self, task_id: str, data: bytes, state: str) -> None:
        """Send to the remembered (or the running request's) ``reply_to``; no route: dropped
        (as Celery does for a message without ``reply_to``), with one warning per process."""
        if state == "":          # a group meta from set_raw's default path
            self._raw[task_id] = bytes(data)
            return
        reply_to = self._route(task_id, state)
        if reply_to is None and not self._warned:
            self._warned = True
            logger.warning("rpc:// result of %s dropped: no reply_to known for it (results reach "
                           "only clients whose task messages carry reply_to)", task_id)
        self.store_for(task_id, data, state, reply_to)

    def set_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        for task_id, data, state in items:
            self.set(task_id, data, state)

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close our connections (the reply queue auto-deletes). Idempotent."""
        if os.getpid() != self._pid:
            self._pid, self._link, self._own_transport = os.getpid(), None, None
            return
        with self._lock:
            if self._link is not None:
                self._link.close()
            self._link = None
            self._queue = None
        if self._own_transport is not None:
            self._own_transport.close()
            self._own_transport = None
