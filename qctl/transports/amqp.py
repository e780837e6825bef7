"""RabbitMQ broker through pika: ``amqp://user:pass@host:port/vhost``, ``amqps://``, ``pyamqp://``.

**Celery's layout.** ``declare_queue(name)`` declares a durable direct exchange ``name``, a
durable queue ``name`` without arguments unless asked (``max_priority=N``; Celery fails with
PRECONDITION_FAILED on a queue declared differently) and the binding. Tasks go to the default
exchange, routing key = queue, with Celery's properties; a queue nobody declared is declared so
when a ``mandatory`` publish comes back unroutable. Header values: pika sends no floats and
truncates received doubles, so integral floats become ints (``timelimit`` ``[30.0, 10.0]`` ->
``[30, 10]``, which Celery reads the same), ``timelimit`` fractions are rounded up (a limit is
never shortened) and other fractional floats become ``repr`` strings; tuples become lists.

**Publishing**: one confirm-mode connection per thread; ``publish`` returns once the broker
confirmed, else raises ``OperationalError`` (one line, password masked) after replacing a dead
connection once. Back-off is the caller's (``App`` retry policy, worker fetch loop); readers
that reconnect sleep a growing back-off (0.1-2 s) before raising, so loops do not spin.

**Consuming**: one consumer connection, manual acks, channel-wide ``basic_qos`` = deliveries
handed out and unsettled + ``limit`` (the worker's window; per consumer and fixed at start on
quorum queues, which refuse global QoS). ``Tag(generation, delivery_tag)``:
tags from before a reconnect are ignored (RabbitMQ requeued those). ``ack``/``requeue``/
``dead_letter`` from other threads run on the fetching thread (woken by
``add_callback_threadsafe``) or directly when the connection is free; a pump thread services
idle connections every second (heartbeats: a worker with a full window is not dropped). No
leases: a closed channel's messages go back, ``renew_leases``/``restore_expired`` do nothing,
``release_all`` cancels the consumers and nacks all. ``requeue`` publishes a copy with
``x-qctl-deliveries`` and acks, so ``delivery_count`` keeps counting on classic queues. The
prefetch buffer belongs to this consumer until fetched or released; across several queues the
order is the broker's.

**ETA in delay queues, never held by a consumer** (``consumer_timeout`` closes channels holding
a message over 30 min). Per-message TTL only expires at a queue's head, so each delay queue has
one fixed TTL: a delay of ``d`` ms (< 2**32) is written in binary into the routing key
``b31.….b0.<queue>`` and published to topic exchange ``qctl.delayed.31``; exchange
``qctl.delayed.k`` routes bit k = 1 to queue ``qctl.delayed.<queue>.k`` (TTL 2**k ms,
dead-lettering to exchange k-1) and bit k = 0 straight to exchange k-1; exchange
``qctl.delayed.delivery`` finally routes ``*×32.<queue>`` to the queue. The message waits
exactly ``d`` ms rounded up (never early; 10-50 ms late measured), in at most 32 hops inside
RabbitMQ; ``queue_size``/``purge`` include it. It carries ``x-qctl-eta`` (ms) and no
``expiration`` meanwhile (the worker still checks ``expires``). A message fetched over
``eta_threshold`` s (default 1) early goes back into the delay queues: delays beyond 49 days,
and ETA tasks Celery clients publish straight to the queue. Queue names over 190 bytes or
with a ``*``/``#`` word cannot be routed so: their ETA messages go direct, the worker holds them.

**Dead letters**: copies in durable queue ``qctl.dead`` (headers ``x-qctl-reason``,
``x-qctl-queue``, ``x-qctl-died-at`` ms, ``x-qctl-dead-id``), confirmed before the original is
acked; ``dead_letters`` browses with ``basic_get`` on a channel it closes, which puts them back
in order (a concurrent reader sees fewer meanwhile).

**Remote control and events, as Celery's pidbox**: ``qctl.transports.amqp_pidbox`` declares
Celery's exchanges and queues exactly (fanout ``celery.pidbox``, topic ``celeryev``, direct
``reply.celery.pidbox``, exclusive ``<node>.celery.pidbox``, ``celeryev.<uuid>`` and
``<oid>.reply.celery.pidbox``) and explains why ``live_nodes()`` is None on RabbitMQ. A client
opens its mailbox (``open_mailbox``) before it asks: Celery workers reply without ``mandatory``.
After ``os.fork()`` the child opens its own connections, never the parent's.

**Scheduler leases and state**: exclusive queues ``qctl.lease.<name>`` on connections of their
own, state in durable queues ``qctl.state.<name>``; ``qctl.transports.amqp_leases`` explains.
"""
from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable
from uuid import uuid4

import pika
import pika.exceptions as pex

from ..exceptions import ImproperlyConfigured, OperationalError
from . import Envelope, Transport
from .amqp_conn import (  # noqa: F401 - re-exported: qctl.backends.rpc and the tests import them from here
    _ERRORS, _INHERITED, Link, amqp_headers, basic_properties, connection_parameters, describe)
from .amqp_consume import Consumer, Tag, _Held, _Op  # noqa: F401 - re-exported
from .amqp_dead import DEAD_QUEUE, DeadLetters  # noqa: F401 - re-exported
from .amqp_delay import (  # noqa: F401 - re-exported
    DELAY_EXCHANGE, DELAY_QUEUE, DELIVERY_EXCHANGE, LEVELS, MAX_DELAY_MS, DelayQueues, _delayable)
from .amqp_leases import AmqpLeases
from .amqp_pidbox import AmqpSubscription, Pidbox  # noqa: F401 - re-exported


def _pump(ref: Any, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        transport = ref()
        if transport is None:
            return
        try:
            transport._service_idle()
        except Exception:  # noqa: BLE001 - never let the pump die; owners see real errors
            pass
        del transport


class AmqpTransport(Consumer, DelayQueues, DeadLetters, Pidbox, AmqpLeases, Transport):
    """RabbitMQ through pika; the module docstring has the layout and the guarantees."""

    supports_delayed_delivery = True

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        if url.lower().startswith("pyamqp"):
            url = "amqp" + url[len("pyamqp"):]
        super().__init__(url, options)
        connection_parameters(url, self.options)          # a bad URL fails here, not later
        self.reply_exchange = f"reply.{self.options.get('control_exchange', 'celery')}.pidbox"
        self.event_exchange = str(self.options.get("event_exchange", "celeryev"))
        self.eta_threshold = float(self.options.get("eta_threshold", 1.0))
        self.consumer_id = f"amqp-{uuid4().hex[:12]}"
        self._queue_args: dict[str, dict[str, Any]] = {}
        self._declared: set[Any] = set()   # durable things this process declared (kept across restarts)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._pubs: dict[int, Link] = {}           # thread ident -> publishing connection
        self._pubs_lock = threading.Lock()
        self._consume_lock = threading.RLock()
        self._consumer: Link | None = None
        self._gen = 0
        self._consuming: dict[str, str] = {}       # queue -> consumer tag
        self._ctag_queue: dict[str, str] = {}
        self._buffer: dict[str, deque] = {}        # queue -> delivered to us, not handed out
        self._held: dict[int, _Held] = {}          # delivery tag -> handed out, not settled
        self._qos: int | None = None
        self._global_qos = True
        self._ops: list[_Op] = []
        self._ops_lock = threading.Lock()
        self._reset_pidbox()
        self._reset_leases()
        self._subscriptions: weakref.WeakSet = weakref.WeakSet()
        self._pump_stop: threading.Event | None = None
        self._backoff = 0.1

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:   # forked: the parent's sockets are not ours to use or close
            _INHERITED.extend([*self._pubs.values(), self._consumer, self._mailbox,
                               *self._lease_links()])
            self._reset()

    def _connect(self, confirm: bool, lock: Any = None) -> Link:
        conn = None
        try:
            conn = pika.BlockingConnection(connection_parameters(self.url, self.options))
            link = Link(conn, confirm, lock if lock is not None else threading.RLock())
        except _ERRORS as exc:
            if conn is not None and conn.is_open:
                conn.close()
            raise OperationalError(describe(self.url, exc, "connect to")) from None
        self._start_pump()
        return link

    def _start_pump(self) -> None:
        if self._pump_stop is None:
            self._pump_stop = threading.Event()
            threading.Thread(target=_pump, args=(weakref.ref(self), self._pump_stop),
                             name="qctl-amqp-pump", daemon=True).start()

    def _reconnect(self, timeout: float, lock: Any = None) -> Link:
        """Connect for a reader; on failure sleep a growing back-off first, so that a caller
        looping on us does not spin while the broker is down."""
        try:
            link = self._connect(False, lock)
        except OperationalError:
            time.sleep(min(self._backoff, max(timeout, 0.05)))
            self._backoff = min(self._backoff * 2, 2.0)
            raise
        self._backoff = 0.1
        return link

    @staticmethod
    def _close_link(link: Link | None) -> None:
        if link is not None and link.lock.acquire(timeout=5):   # the pump may be using it
            try:
                link.close()
            finally:
                link.lock.release()

    def _service_idle(self) -> None:
        """From the pump thread: heartbeats and settlements of connections nobody is using."""
        if os.getpid() != self._pid:
            return
        if self._consume_lock.acquire(blocking=False):
            try:
                if self._consumer is not None:
                    self._consumer.service()
                self._run_ops()
            except Exception:  # noqa: BLE001 - the next fetch reports it
                pass
            finally:
                self._consume_lock.release()
        with self._pubs_lock:
            links = [*self._pubs.values(), self._mailbox, *[s.link for s in list(self._subscriptions)]]
        for link in links:
            if link is not None and link.lock.acquire(blocking=False):
                try:
                    link.service()
                except Exception:  # noqa: BLE001 - its owner notices on next use
                    pass
                finally:
                    link.lock.release()
        self._service_leases()

    # -- publishing -----------------------------------------------------------------------

    def _pub(self) -> Link:
        ident = threading.get_ident()
        link = self._pubs.get(ident)
        if link is not None and link.alive():
            return link
        link = self._connect(True)
        with self._pubs_lock:
            alive = {t.ident for t in threading.enumerate()}
            stale = [self._pubs.pop(i) for i in list(self._pubs) if i not in alive or i == ident]
            self._pubs[ident] = link
        for old in stale:                                 # its thread is gone, or it broke
            self._close_link(old)
        return link

    def _with_pub(self, what: str, fn: Callable[[Link], Any]) -> Any:
        """``fn(link)`` on this thread's confirm-mode connection; once more on a new connection
        when the old one turns out dead (e.g. after a broker restart)."""
        self._check_pid()
        for attempt in (0, 1):
            link = self._pub()
            try:
                with link.lock:
                    return fn(link)
            except pex.UnroutableError as exc:
                raise OperationalError(describe(self.url, exc, f"{what} (unroutable)")) from None
            except pex.NackError as exc:
                raise OperationalError(describe(self.url, exc, f"{what} (refused)")) from None
            except pex.ChannelClosedByBroker as exc:
                if attempt or exc.reply_code != 404:
                    raise OperationalError(describe(self.url, exc, what)) from None
                self._declared.clear()          # e.g. the broker lost its data: declare again
                link.declared.clear()
            except _ERRORS as exc:
                if attempt or (link.conn.is_open and not isinstance(exc, OSError)):
                    raise OperationalError(describe(self.url, exc, what)) from None
                self._close_link(link)
        raise AssertionError("unreachable")

    def declare_queue(self, name: str, **arguments: Any) -> None:
        """Celery's declaration (see the module docstring). ``max_priority=N``, ``arguments={}``
        or ``x-…`` keywords add queue arguments; a queue that exists with other arguments
        raises ``ImproperlyConfigured``."""
        args: dict[str, Any] = dict(arguments.pop("arguments", None) or {})
        max_priority = arguments.pop("max_priority", None) or self.options.get("max_priority")
        if max_priority:
            args["x-max-priority"] = int(max_priority)
        args.update({k: v for k, v in arguments.items() if k.startswith("x-")})
        self._queue_args[name] = args
        self._with_pub("declare a queue on", lambda link: self._declare(link, name, strict=True))

    def _declare(self, link: Link, name: str, strict: bool = False) -> None:
        try:
            link.channel().queue_declare(name, durable=True, arguments=self._queue_args.get(name) or None)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != 406 or strict:
                raise ImproperlyConfigured(f"queue {name!r} exists on the broker with other arguments "
                                           f"({exc.reply_text}); declare it the same way everywhere") \
                    if exc.reply_code == 406 else exc
        if not name.startswith("amq."):
            try:       # Celery's exchange and binding; a foreign exchange of that name is left alone
                link.channel().exchange_declare(name, "direct", durable=True)
                link.channel().queue_bind(name, name, routing_key=name)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
        self._declared.add(("queue", name))

    def _ensure_queue(self, link: Link, name: str) -> None:
        if ("queue", name) not in self._declared:
            if link.ready_count(name) is None:
                self._declare(link, name)
            self._declared.add(("queue", name))

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """Confirmed publish to the default exchange with routing key ``queue`` (as Celery), or
        into the delay queues when ``eta`` is in the future."""
        if eta is not None and eta - time.time() > 0.0005 and _delayable(queue):
            props = basic_properties(envelope, priority, expiration=False,
                                     headers={**envelope.headers, "x-qctl-eta": math.ceil(eta * 1000)})
            self._with_pub(f"publish to {queue!r} on",
                           lambda link: self._publish_delayed(link, queue, props, envelope.body, eta))
        else:
            props = basic_properties(envelope, priority)
            self._with_pub(f"publish to {queue!r} on",
                           lambda link: self._publish_now(link, queue, props, envelope.body))

    def _publish_now(self, link: Link, queue: str, props: Any, body: bytes) -> None:
        try:
            link.channel().basic_publish("", queue, body, props, mandatory=True)
        except pex.UnroutableError:      # nobody declared the queue yet: do it, as Celery would
            self._declare(link, queue)
            link.channel().basic_publish("", queue, body, props, mandatory=True)

    def publish_raw(self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties,
                    mandatory: bool = True) -> bool:
        """Confirmed publish of a ready-made message; False when it was unroutable."""
        def run(link: Link) -> bool:
            try:
                link.channel().basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
            except pex.UnroutableError:
                return False
            return True
        return bool(self._with_pub(f"publish to {routing_key!r} on", run))

    # -- queues ---------------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        """Delete the ready and the delayed messages of ``queue`` (not delivered ones)."""
        return self._with_delayed(queue, lambda link, n: link.channel().queue_purge(n).method.message_count)

    def queue_size(self, queue: str) -> int:
        """Ready plus delayed messages of ``queue``."""
        return self._with_delayed(queue, lambda link, n: link.ready_count(n) or 0)

    # -- life cycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Raise ``OperationalError`` unless the broker answers."""
        self._with_pub("reach", lambda link: link.service())

    def close(self) -> None:
        """Close this process's connections (RabbitMQ requeues what the consumer held).
        Idempotent; the object reconnects when used again."""
        if os.getpid() != self._pid:
            self._check_pid()
            return
        if self._pump_stop is not None:
            self._pump_stop.set()
            self._pump_stop = None
        if self._consume_lock.acquire(timeout=5):
            try:
                self._reset_consumer()
            finally:
                self._consume_lock.release()
        with self._pubs_lock:
            pubs, self._pubs = list(self._pubs.values()), {}
        for link in pubs:
            self._close_link(link)
        self._close_mailboxes()
        self._close_leases()
        for sub in list(self._subscriptions):
            sub.close()
