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

**Broadcasts and replies, as Celery's pidbox**: ``broadcast(channel)`` publishes to exchange
``channel``, fanout and not durable (``celery.pidbox``), or for ``event_exchange`` (default
``celeryev``) topic and durable with the routing key from the payload's ``type``
(``worker-heartbeat`` -> ``worker.heartbeat``; a list -> ``task.multi``); ``subscribe`` binds an
exclusive auto-delete queue. Replies go to ``reply.<control_exchange>.pidbox`` with routing key =
mailbox; our reader's queue ``<mailbox>.reply.celery.pidbox`` is not exclusive and has
``x-expires``, so a reply we send before its reader comes waits; Celery workers reply without
``mandatory``, so a client must open its mailbox (``get_replies(mailbox, 0)``) before it
broadcasts. After ``os.fork()`` the child opens its own connections, never the parent's.
"""
from __future__ import annotations

import decimal
import itertools
import json
import logging
import math
import os
import ssl
import threading
import time
import weakref
from collections import deque
from datetime import datetime
from typing import Any, Callable, Iterable, NamedTuple, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit
from uuid import uuid4

import pika
import pika.exceptions as pex

from ..exceptions import ImproperlyConfigured, OperationalError
from . import DeadLetter, Delivery, Envelope, Subscription, Transport


def _read_floats_as_floats() -> None:
    """pika 1.4 decodes AMQP float and double field values with ``int()``: a Celery client's
    ``timelimit`` of ``[10, 0.5]`` would arrive as ``[10, 0]`` (no soft limit). Decode them
    as floats; every other field type is left to pika."""
    import struct
    import pika.data as data
    if getattr(data.decode_value, "qctl_floats", False):
        return
    original = data.decode_value

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset:offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return original(encoded, offset)
    decode_value.qctl_floats = True  # type: ignore[attr-defined]
    data.decode_value = decode_value


_read_floats_as_floats()

DEAD_QUEUE = "qctl.dead"
LEVELS = 32
DELAY_EXCHANGE = "qctl.delayed.{}"
DELAY_QUEUE = "qctl.delayed.{}.{}"
DELIVERY_EXCHANGE = "qctl.delayed.delivery"
MAX_DELAY_MS = (1 << LEVELS) - 1
_GRACE = 0.3            # a zero-timeout fetch still waits this long for messages known to be ready
_OP_TIMEOUT = 30.0      # how long a settlement waits for the consumer connection
_PROPERTIES = ("correlation_id", "reply_to", "delivery_mode", "priority", "expiration",
               "message_id", "timestamp", "type", "user_id", "app_id")
_ERRORS = (pex.AMQPError, OSError)
_GENERATIONS = itertools.count(1)
_INHERITED: list[Any] = []   # a forked child's references to the parent's connections: never closed
# pika logs routine events (returned mandatory messages, passive-declare 404s, broker restarts)
# as warnings and errors; what matters reaches the caller as one OperationalError line.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)


class Tag(NamedTuple):
    """A delivery handle: the consumer channel's generation and its delivery tag."""
    gen: int
    n: int

    def __str__(self) -> str:
        return f"{self.gen}.{self.n}"


# -- URLs, errors, headers ----------------------------------------------------------------

def connection_parameters(url: str, options: dict[str, Any] | None = None, heartbeat: int | None = None,
                          name: str = "qctl") -> pika.ConnectionParameters:
    """pika parameters for an AMQP URL (kombu's ``//`` means vhost ``/``). Options and query
    parameters: ``heartbeat`` (s, default 30), ``connect_timeout`` (5),
    ``blocked_connection_timeout`` (60), ``ssl`` (True or {ca_certs, certfile, keyfile, cert_reqs})."""
    options = dict(options or {})
    parts = urlsplit(url)
    options.update(dict(parse_qsl(parts.query)))
    secure = parts.scheme.lower() == "amqps" or bool(options.get("ssl"))
    timeout = float(options.get("connect_timeout", 5.0))
    ssl_options = None
    if secure:
        conf = options["ssl"] if isinstance(options.get("ssl"), dict) else {}
        context = ssl.create_default_context(cafile=conf.get("ca_certs") or conf.get("cafile"))
        if conf.get("certfile"):
            context.load_cert_chain(conf["certfile"], conf.get("keyfile"))
        if conf.get("cert_reqs") in (ssl.CERT_NONE, "CERT_NONE", "none"):
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        ssl_options = pika.SSLOptions(context, parts.hostname or "localhost")
    try:
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"bad port in broker URL: {exc}") from None
    return pika.ConnectionParameters(
        host=parts.hostname or "localhost", port=port or (5671 if secure else 5672),
        virtual_host=unquote(parts.path[1:]) or "/" if len(parts.path) > 1 else "/",
        credentials=pika.PlainCredentials(unquote(parts.username or "guest"),
                                          unquote(parts.password or "guest")),
        heartbeat=int(float(options.get("heartbeat", 30))) if heartbeat is None else heartbeat,
        connection_attempts=1, retry_delay=0, socket_timeout=timeout, stack_timeout=timeout * 2,
        ssl_options=ssl_options,
        blocked_connection_timeout=float(options.get("blocked_connection_timeout", 60.0)),
        client_properties={"connection_name": f"{name} pid {os.getpid()}"})


def describe(url: str, exc: BaseException, what: str) -> str:
    """``amqp: cannot <what> amqp://guest:********@host//: <detail>``, on one line."""
    from ..conf import mask_url
    while type(exc).__module__.startswith("pika"):        # unwrap pika's connection workflow
        inner = getattr(exc, "exceptions", None) or [getattr(exc, "exception", None)] or []
        if not isinstance(inner[-1], BaseException) and exc.args and isinstance(exc.args[0], BaseException):
            inner = [exc.args[0]]
        if not isinstance(inner[-1], BaseException):
            break
        exc = inner[-1]
    if isinstance(exc, (pex.ChannelClosed, pex.ConnectionClosed)):
        detail = f"{exc.reply_code} {exc.reply_text}"
    else:
        detail = str(exc) or type(exc).__name__
        detail = detail if type(exc).__name__ in detail else f"{type(exc).__name__}: {detail}"
    password = unquote(urlsplit(url).password or "")
    if len(password) >= 6:               # belt and braces: pika's texts do not quote it
        detail = detail.replace(password, "********")
    return " ".join(f"amqp: cannot {what} {mask_url(url)}: {detail}".split())


def _to_amqp(value: Any, ceil: bool = False) -> Any:
    if value is None or isinstance(value, (bool, str, bytes, int, decimal.Decimal, datetime)):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and (value.is_integer() or ceil):
            return math.ceil(value)
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _to_amqp(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_amqp(v, ceil) for v in value]
    return str(value)


def amqp_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """Headers pika can send and a Celery worker reads the same (see the module docstring)."""
    return {str(k): _to_amqp(v, ceil=(k == "timelimit")) for k, v in (headers or {}).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _json_type(payload: bytes) -> tuple[str, str]:
    return ("application/json", "utf-8") if payload[:1] in (b"{", b"[") else ("application/octet-stream", "binary")


def basic_properties(envelope: Envelope, priority: int = 0, headers: dict | None = None,
                     expiration: bool = True) -> pika.BasicProperties:
    """Celery's message properties for ``envelope``. No ``user_id``: RabbitMQ checks it
    against the login of whoever publishes, and we publish copies."""
    props = envelope.properties or {}
    extra = {k: props[k] for k in ("correlation_id", "reply_to", "message_id", "type", "app_id")
             if props.get(k) is not None}
    if isinstance(props.get("timestamp"), (int, float)):
        extra["timestamp"] = int(props["timestamp"])
    if expiration and props.get("expiration") is not None:
        extra["expiration"] = str(props["expiration"])
    return pika.BasicProperties(
        content_type=envelope.content_type, content_encoding=envelope.content_encoding,
        headers=amqp_headers(envelope.headers if headers is None else headers),
        delivery_mode=int(props.get("delivery_mode") or 2),
        priority=max(0, min(255, int(priority or props.get("priority") or 0))), **extra)


def _split(props: pika.BasicProperties, body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """(the envelope, our bookkeeping headers taken out of it)."""
    headers, internal = {}, {}
    for key, value in (props.headers or {}).items():
        death = key == "x-death" or key.startswith(("x-first-death-", "x-last-death-"))
        if key.startswith("x-qctl-") or key == "x-delivery-count" or death:
            internal[key] = value
            if death and "x-qctl-eta" not in (props.headers or {}):   # a foreign DLX: keep it
                headers[key] = _plain(value)
        else:
            headers[key] = _plain(value)
    properties = {k: getattr(props, k) for k in _PROPERTIES if getattr(props, k, None) is not None}
    return Envelope(bytes(body), headers, properties, props.content_type or "application/json",
                    props.content_encoding or "utf-8"), internal


def _next_hop(k: int) -> str:
    return DELAY_EXCHANGE.format(k - 1) if k else DELIVERY_EXCHANGE


def _delayable(queue: str) -> bool:
    words = queue.split(".")
    return bool(queue) and len(queue.encode()) <= 190 and "*" not in words and "#" not in words


# -- connections -------------------------------------------------------------------------

class Link:
    """A pika connection and its channel, used by whoever holds ``lock`` (pika is not
    thread-safe, but has no thread affinity)."""

    def __init__(self, conn: pika.BlockingConnection, confirm: bool, lock: Any) -> None:
        self.conn, self.confirm, self.lock = conn, confirm, lock
        self.declared: set[Any] = set()     # non-durable things declared on this connection
        self._ch = self._open()
        self._scratch: Any = None

    def _open(self) -> Any:
        ch = self.conn.channel()
        if self.confirm:
            ch.confirm_delivery()
        return ch

    def alive(self) -> bool:
        return self.conn.is_open and self._ch.is_open

    @property
    def channel_object(self) -> Any:
        """The main channel as it is (perhaps closed), to read why it closed."""
        return self._ch

    def channel(self) -> Any:
        """The main channel, reopened if the broker closed it (after a failed declare)."""
        if not self._ch.is_open:
            self._ch = self._open()
        return self._ch

    def ready_count(self, queue: str) -> int | None:
        """Ready messages in ``queue``, None when it does not exist (checked on a second
        channel, which a 404 closes)."""
        if self._scratch is None or not self._scratch.is_open:
            self._scratch = self.conn.channel()
        try:
            return self._scratch.queue_declare(queue, passive=True).method.message_count
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise

    def service(self) -> None:
        if self.conn.is_open:
            self.conn.process_data_events(0)

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


class _Op:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class _Held:
    __slots__ = ("queue", "envelope", "priority", "count")

    def __init__(self, queue: str, envelope: Envelope, priority: int, count: int) -> None:
        self.queue, self.envelope, self.priority, self.count = queue, envelope, priority, count


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


class AmqpSubscription(Subscription):
    """An exclusive auto-delete queue bound to the channel's exchange, on its own connection."""

    def __init__(self, transport: "AmqpTransport", channel: str) -> None:
        self._transport, self.channel = transport, channel
        self.lock = threading.RLock()
        self._buffer: deque[bytes] = deque()
        self._closed = False
        self._pid = os.getpid()
        self.link: Link | None = None
        with self.lock:
            self._open(None)      # bound before we return: nothing broadcast later is missed

    def _open(self, timeout: float | None) -> None:
        t = self._transport
        link = t._connect(False, self.lock) if timeout is None else t._reconnect(timeout, self.lock)
        try:
            kind, durable, key, ttl = t._shape(self.channel)
            ch = link.channel()
            ch.exchange_declare(self.channel, kind, durable=durable, auto_delete=False)
            queue = ch.queue_declare("", exclusive=True, auto_delete=True,
                                     arguments={"x-message-ttl": ttl}).method.queue
            ch.queue_bind(queue, self.channel, routing_key=key)
            ch.basic_consume(queue, lambda _c, _m, _p, body: self._buffer.append(bytes(body)), auto_ack=True)
        except _ERRORS as exc:
            link.close()
            raise OperationalError(describe(t.url, exc, f"subscribe to {self.channel!r} on")) from None
        self.link = link
        t._subscriptions.add(self)

    def get(self, timeout: float) -> list[bytes]:
        """What was broadcast since the last call; waits up to ``timeout`` for the first."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self.lock:
            if self._closed:
                return []
            if self._pid != os.getpid():          # forked: never touch the parent's socket
                _INHERITED.append(self.link)
                self.link, self._pid = None, os.getpid()
            try:
                if self.link is None or not self.link.alive():
                    self._open(timeout)   # after a broken connection; what was sent meanwhile is lost
                conn = self.link.conn  # type: ignore[union-attr]
                conn.process_data_events(0)
                while not self._buffer and time.monotonic() < deadline:
                    conn.process_data_events(min(deadline - time.monotonic(), 1.0))
                out = list(self._buffer)
                self._buffer.clear()
                return out
            except _ERRORS as exc:
                if self.link is not None:
                    self.link.close()
                self.link = None
                raise OperationalError(describe(self._transport.url, exc, "receive broadcasts from")) from None

    def close(self) -> None:
        """Stop receiving (the queue goes with the connection). Idempotent."""
        with self.lock:
            self._closed = True
            if self.link is not None and self._pid == os.getpid():
                self.link.close()
            self.link = None


class AmqpTransport(Transport):
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
        self._mailbox_lock = threading.RLock()
        self._mailbox: Link | None = None
        self._boxes: dict[str, deque] = {}
        self._subscriptions: weakref.WeakSet = weakref.WeakSet()
        self._pump_stop: threading.Event | None = None
        self._backoff = 0.1

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:   # forked: the parent's sockets are not ours to use or close
            _INHERITED.extend([*self._pubs.values(), self._consumer, self._mailbox])
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
        if self._pump_stop is None:
            self._pump_stop = threading.Event()
            threading.Thread(target=_pump, args=(weakref.ref(self), self._pump_stop),
                             name="qctl-amqp-pump", daemon=True).start()
        return link

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

    def _publish_delayed(self, link: Link, queue: str, props: Any, body: bytes, eta: float) -> None:
        for attempt in (0, 1):
            delay_ms = 0
            while True:   # the delay is taken after declaring (the first time takes ~0.2 s)
                delay_ms = max(0, min(math.ceil((eta - time.time()) * 1000), MAX_DELAY_MS))
                if self._ensure_delay(link, queue, delay_ms):
                    break
            key = ".".join(str(delay_ms >> k & 1) for k in reversed(range(LEVELS))) + "." + queue
            try:
                link.channel().basic_publish(DELAY_EXCHANGE.format(LEVELS - 1), key, body, props, mandatory=True)
                return
            except pex.UnroutableError:  # a delay queue was deleted behind our back
                if attempt:
                    raise
                self._declared.clear()

    def _ensure_delay(self, link: Link, queue: str, delay_ms: int) -> bool:
        """Declare what a delay of ``delay_ms`` needs; True when all was there already."""
        done = self._declared
        missing = [k for k in range(LEVELS) if delay_ms >> k & 1 and ("delay", queue, k) not in done]
        if "delay-chain" in done and ("delay", queue) in done and not missing:
            return True
        if "delay-chain" not in done:
            ch = link.channel()
            ch.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True)
            for k in range(LEVELS):
                ch.exchange_declare(DELAY_EXCHANGE.format(k), "topic", durable=True)
            for k in range(LEVELS):              # bit k is 0: straight on to the next level
                ch.exchange_bind(_next_hop(k), DELAY_EXCHANGE.format(k), routing_key="*." * (LEVELS - 1 - k) + "0.#")
            done.add("delay-chain")
        if ("delay", queue) not in done:
            self._ensure_queue(link, queue)
            link.channel().queue_bind(queue, DELIVERY_EXCHANGE, routing_key="*." * LEVELS + queue)
            done.add(("delay", queue))
        for k in missing:                        # bit k is 1: wait 2**k ms in this queue
            name = DELAY_QUEUE.format(queue, k)
            link.channel().queue_declare(name, durable=True, arguments={
                "x-message-ttl": 1 << k, "x-dead-letter-exchange": _next_hop(k)})
            link.channel().queue_bind(name, DELAY_EXCHANGE.format(k),
                                      routing_key="*." * (LEVELS - 1 - k) + "1." + "*." * k + queue)
            done.add(("delay", queue, k))
        return False

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

    # -- consuming ------------------------------------------------------------------------

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` deliveries, consuming ``queues`` (see the module docstring)."""
        queues = list(dict.fromkeys(queues))
        if not queues or limit <= 0:
            return []
        self._check_pid()
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._consume_lock:
            for attempt in (0, 1):
                try:
                    return self._fetch(queues, limit, timeout, deadline)
                except (pex.ChannelClosedByBroker, pex.ConnectionClosedByBroker) as exc:
                    self._reset_consumer()
                    if attempt or exc.reply_code != 540 or not self._global_qos:
                        raise OperationalError(describe(self.url, exc, "consume from")) from None
                    self._global_qos = False     # a quorum queue: "does not support global qos"
                except _ERRORS as exc:
                    self._reset_consumer()
                    raise OperationalError(describe(self.url, exc, "consume from")) from None
        raise AssertionError("unreachable")

    def _fetch(self, queues: list[str], limit: int, timeout: float, deadline: float) -> list[Delivery]:
        link = self._consumer
        if link is None or not link.alive():
            self._reset_consumer()
            link = self._reconnect(timeout)
            link.lock = self._consume_lock
            link.channel().add_on_cancel_callback(self._on_cancelled)
            self._consumer, self._gen = link, next(_GENERATIONS)
        self._run_ops()
        started = self._consume(link, queues, limit)
        got = self._take(queues, limit)
        if len(got) < limit and timeout < _GRACE:
            # A zero-timeout fetch means "what is ready now". A round trip on the consumer
            # channel lets deliveries the broker already sent arrive first; then wait briefly
            # for what the broker says is ready (or what a new consumer is being sent).
            link.channel().basic_qos(prefetch_count=self._qos or 1, global_qos=self._global_qos)
            self._pump_consumer(link, 0)
            got += self._take(queues, limit - len(got))
            expect = min(limit, len(got) + sum(link.ready_count(q) or 0 for q in queues))
            until = time.monotonic() + _GRACE
            while len(got) < max(expect, int(started)) and time.monotonic() < until:
                self._pump_consumer(link, until - time.monotonic())
                got += self._take(queues, limit - len(got))
        while not got and time.monotonic() < deadline:
            self._pump_consumer(link, min(deadline - time.monotonic(), 1.0))
            got += self._take(queues, limit)
        if got and len(got) < limit:
            self._pump_consumer(link, 0)
            got += self._take(queues, limit - len(got))
        return got

    def _pump_consumer(self, link: Link, seconds: float) -> None:
        link.conn.process_data_events(max(seconds, 0))
        if not link.alive():     # e.g. 406 "delivery acknowledgement timed out" (consumer_timeout)
            reason = getattr(getattr(link.channel_object, "_impl", None), "_closing_reason", None)
            raise reason if isinstance(reason, pex.AMQPError) else pex.ChannelClosed(0, "channel closed")
        self._run_ops()

    def _consume(self, link: Link, queues: list[str], limit: int) -> bool:
        ch = link.channel()
        prefetch = max(1, min(65535, len(self._held) + limit))
        if any(self._queue_args.get(q, {}).get("x-queue-type") == "quorum" for q in queues):
            self._global_qos = False
        # Channel-wide (global) QoS follows the window as it changes. Quorum queues refuse it:
        # then it is per consumer, fixed when the consumers start (RabbitMQ semantics).
        if prefetch != self._qos and (self._global_qos or self._qos is None):
            ch.basic_qos(prefetch_count=prefetch, global_qos=self._global_qos)
            self._qos = prefetch
        for queue in [q for q in self._consuming if q not in queues]:
            ch.basic_cancel(self._consuming.pop(queue))
            for method, _props, _body in self._buffer.pop(queue, ()):
                ch.basic_nack(method.delivery_tag, requeue=True)
        started = False
        for queue in [q for q in queues if q not in self._consuming]:
            if link.ready_count(queue) is None:
                self._with_pub("declare a queue on", lambda pub: self._declare(pub, queue))
            tag = ch.basic_consume(queue, self._on_message, auto_ack=False)
            self._consuming[queue], self._ctag_queue[tag], started = tag, queue, True
        return started

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        queue = self._ctag_queue.get(method.consumer_tag, method.routing_key)
        self._buffer.setdefault(queue, deque()).append((method, props, body))

    def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer (its queue was deleted): consume again next time."""
        queue = self._ctag_queue.pop(frame.method.consumer_tag, None)
        if queue is not None:
            self._consuming.pop(queue, None)

    def _take(self, queues: list[str], limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        for queue in queues:
            buffer = self._buffer.get(queue)
            while buffer and len(out) < limit:
                delivery = self._delivery(queue, *buffer.popleft())
                if delivery is not None:
                    out.append(delivery)
        return out

    def _delivery(self, queue: str, method: Any, props: Any, body: bytes) -> Delivery | None:
        envelope, internal = _split(props, body)
        prior = int(internal.get("x-qctl-deliveries") or 0)
        returned = internal.get("x-delivery-count")           # quorum queues count returns
        count = prior + 1 + (int(returned) if returned is not None else int(bool(method.redelivered)))
        due = self._due(envelope, internal)
        if due is not None and due - time.time() > self.eta_threshold and _delayable(queue):
            try:       # early (over 49 days, or a Celery client's ETA): back into the delay queues
                self.publish(queue, envelope, priority=props.priority or 0, eta=due)
                self._consumer.channel().basic_ack(method.delivery_tag)  # type: ignore[union-attr]
                return None
            except OperationalError:
                pass       # cannot: hand it out, the worker holds it until its ETA
        self._held[method.delivery_tag] = _Held(queue, envelope, props.priority or 0, count)
        delayed = "x-qctl-eta" in internal      # report it as published: default exchange
        return Delivery(tag=Tag(self._gen, method.delivery_tag), queue=queue, envelope=envelope,
                        redelivered=bool(method.redelivered) or prior > 0, delivery_count=count,
                        exchange="" if delayed else method.exchange or "",
                        routing_key=queue if delayed else method.routing_key or "")

    @staticmethod
    def _due(envelope: Envelope, internal: dict[str, Any]) -> float | None:
        """When the message is due: ``x-qctl-eta``, or a task's ``eta`` header with an offset."""
        try:
            if internal.get("x-qctl-eta") is not None:
                return int(internal["x-qctl-eta"]) / 1000.0
            eta = envelope.headers.get("eta")
            if envelope.headers.get("task") and isinstance(eta, str) and ("+" in eta[10:] or eta.endswith("Z")):
                from ..protocol import parse_iso
                return parse_iso(eta).timestamp()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a bad eta is the worker's to report
            pass
        return None

    # -- settling (from any thread) -------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the consumer connection: here when it is free, else on the fetching
        thread, woken up with ``add_callback_threadsafe``."""
        op = _Op(fn)
        with self._ops_lock:
            self._ops.append(op)
        woken, deadline = False, time.monotonic() + _OP_TIMEOUT
        while not op.done.is_set():
            if self._consume_lock.acquire(blocking=False):
                try:
                    self._run_ops()
                finally:
                    self._consume_lock.release()
                continue
            if not woken:
                try:
                    if self._consumer is not None:
                        self._consumer.conn.add_callback_threadsafe(lambda: None)
                except Exception:  # noqa: BLE001 - closed meanwhile: the holder runs it anyway
                    pass
                woken = True
            if not op.done.wait(0.05) and time.monotonic() > deadline:
                raise OperationalError("amqp: the consumer connection stayed busy; cannot settle messages")
        if op.error is not None:
            raise op.error
        return op.result

    def _run_ops(self) -> None:
        """Run pending settlements (the consumer lock is held)."""
        while True:
            with self._ops_lock:
                ops, self._ops = self._ops, []
            if not ops:
                return
            for op in ops:
                try:
                    op.result = op.fn()
                except _ERRORS as exc:
                    op.error = OperationalError(describe(self.url, exc, "settle messages on"))
                    self._reset_consumer()
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    op.error = exc
                finally:
                    op.done.set()

    def _settle(self, tags: Iterable[Any], action: Callable[[Any, int, _Held], Any]) -> None:
        """``action(channel, delivery_tag, held)`` for the tags we still hold, on the consumer."""
        gen = self._gen
        mine = [t for t in tags if isinstance(t, Tag) and t.gen == gen]
        if not mine:
            return

        def run() -> None:
            for tag in mine:
                link = self._consumer
                if link is not None and tag.gen == self._gen and tag.n in self._held:
                    action(link.channel(), tag.n, self._held[tag.n])
                    del self._held[tag.n]
        self._check_pid()
        self._submit(run)

    def ack(self, tags: Iterable[Any]) -> None:
        """Ack the deliveries we still hold; other tags are ignored."""
        self._settle(tags, lambda ch, n, _held: ch.basic_ack(n))

    def requeue(self, tags: Iterable[Any]) -> None:
        """Publish a copy counting this delivery (``x-qctl-deliveries``), then ack."""
        self._settle(tags, self._requeue_one)

    def _requeue_one(self, ch: Any, tag: int, held: _Held) -> None:
        props = basic_properties(held.envelope, held.priority, {**held.envelope.headers,
                                                               "x-qctl-deliveries": held.count})
        try:
            self._with_pub("requeue on", lambda link: self._publish_now(link, held.queue, props, held.envelope.body))
        except OperationalError:
            ch.basic_nack(tag, requeue=True)      # back in the queue all the same, uncounted
            return
        ch.basic_ack(tag)

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Copy into ``qctl.dead`` (confirmed), then ack the original if we hold it."""
        if tag is None:
            if envelope is not None:
                self._store_dead(envelope, queue or "", reason, 0)
            return
        self._settle([tag], lambda ch, n, held: (
            self._store_dead(held.envelope, held.queue, reason, held.priority), ch.basic_ack(n)))

    def _store_dead(self, envelope: Envelope, queue: str, reason: str, priority: int) -> None:
        props = basic_properties(envelope, priority, {
            **envelope.headers, "x-qctl-reason": str(reason), "x-qctl-queue": queue,
            "x-qctl-died-at": int(time.time() * 1000), "x-qctl-dead-id": uuid4().hex}, expiration=False)
        props.delivery_mode = 2

        def run(link: Link) -> None:
            if ("queue", DEAD_QUEUE) not in self._declared:
                link.channel().queue_declare(DEAD_QUEUE, durable=True)
                self._declared.add(("queue", DEAD_QUEUE))
            link.channel().basic_publish("", DEAD_QUEUE, envelope.body, props, mandatory=True)
        self._with_pub("store a dead letter on", run)

    def release_all(self) -> int:
        """Cancel our consumers and give back all that was delivered to us."""
        self._check_pid()
        return int(self._submit(self._release) or 0)

    def _release(self) -> int:
        link = self._consumer
        count = len(self._held) + sum(len(b) for b in self._buffer.values())
        if link is not None and link.alive():
            for tag in list(self._consuming.values()):
                link.channel().basic_cancel(tag)
            if count:
                link.channel().basic_nack(0, multiple=True, requeue=True)
        for table in (self._held, self._buffer, self._consuming, self._ctag_queue):
            table.clear()
        return count

    def _reset_consumer(self) -> None:
        """Drop the consumer connection (closing it: RabbitMQ requeues what it held)."""
        link, self._consumer, self._gen, self._qos = self._consumer, None, 0, None
        for table in (self._held, self._buffer, self._consuming, self._ctag_queue):
            table.clear()
        if link is not None:
            link.close()

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

    # -- queues and dead letters ----------------------------------------------------------

    def _with_delayed(self, queue: str, fn: Callable[[Link, str], int]) -> int:
        """Sum of ``fn(link, name)`` over ``queue`` and its delay queues that exist."""
        def run(link: Link) -> int:
            names = [queue, *(DELAY_QUEUE.format(queue, k) for k in range(LEVELS))]
            return sum(fn(link, name) for name in names if link.ready_count(name) is not None)
        return int(self._with_pub(f"reach {queue!r} on", run))

    def purge(self, queue: str) -> int:
        """Delete the ready and the delayed messages of ``queue`` (not delivered ones)."""
        return self._with_delayed(queue, lambda link, n: link.channel().queue_purge(n).method.message_count)

    def queue_size(self, queue: str) -> int:
        """Ready plus delayed messages of ``queue``."""
        return self._with_delayed(queue, lambda link, n: link.ready_count(n) or 0)

    @staticmethod
    def _browse(link: Link, limit: int | None) -> tuple[Any, list[tuple[Any, Any, bytes]]]:
        """Dead letters taken unacked on a new channel (closing it puts them back in order)."""
        ch = link.conn.channel()
        ch.queue_declare(DEAD_QUEUE, durable=True)
        got = []
        while limit is None or len(got) < limit:
            method, props, body = ch.basic_get(DEAD_QUEUE, auto_ack=False)
            if method is None:
                break
            got.append((method, props, body))
        return ch, got

    @staticmethod
    def _letter(props: Any, body: bytes) -> DeadLetter:
        envelope, internal = _split(props, body)
        return DeadLetter(id=str(internal.get("x-qctl-dead-id") or ""), queue=str(internal.get("x-qctl-queue") or ""),
                          reason=str(internal.get("x-qctl-reason") or ""),
                          died_at=int(internal.get("x-qctl-died-at") or 0) / 1000.0, envelope=envelope)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (browsed: they stay in ``qctl.dead``)."""
        def run(link: Link) -> list[DeadLetter]:
            ch, got = self._browse(link, max(int(limit), 0))
            ch.close()
            return [self._letter(props, body) for _m, props, body in got]
        return self._with_pub("read dead letters on", run)

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Publish the chosen dead letters to their queue (priority kept, count reset)."""
        wanted = None if ids is None else {str(i) for i in ids}

        def run(link: Link) -> int:
            ch, got = self._browse(link, None)
            done = 0
            try:
                for method, props, body in got:
                    letter = self._letter(props, body)
                    if letter.envelope is None or (wanted is not None and letter.id not in wanted):
                        continue
                    self._publish_now(link, letter.queue, basic_properties(
                        letter.envelope, props.priority or 0, expiration=False), letter.envelope.body)
                    ch.basic_ack(method.delivery_tag)
                    done += 1
            finally:
                ch.close()
            return done
        return int(self._with_pub("requeue dead letters on", run))

    def purge_dead(self) -> int:
        def run(link: Link) -> int:
            link.channel().queue_declare(DEAD_QUEUE, durable=True)
            return link.channel().queue_purge(DEAD_QUEUE).method.message_count
        return int(self._with_pub("purge dead letters on", run))

    # -- broadcast channel and reply mailboxes --------------------------------------------

    def _shape(self, channel: str) -> tuple[str, bool, str, int]:
        """(exchange type, durable, binding key, subscriber queue TTL ms), as Celery declares."""
        return ("topic", True, "#", 5000) if channel == self.event_exchange else ("fanout", False, "", 300000)

    def broadcast(self, channel: str, payload: bytes) -> None:
        """Publish to exchange ``channel`` (confirmed; nobody listening is not an error)."""
        kind, durable, _, _ = self._shape(channel)
        key = ""
        if kind == "topic":
            try:
                event = json.loads(payload)
                key = "task.multi" if isinstance(event, list) else str(event.get("type", "")).replace("-", ".")
            except (ValueError, AttributeError):
                pass
        content_type, encoding = _json_type(payload)
        props = pika.BasicProperties(content_type=content_type, content_encoding=encoding, headers={},
                                     delivery_mode=1 if kind == "topic" else 2)

        def run(link: Link) -> None:
            if ("exchange", channel) not in link.declared:
                link.channel().exchange_declare(channel, kind, durable=durable, auto_delete=False)
                link.declared.add(("exchange", channel))
            link.channel().basic_publish(channel, key, payload, props)
        self._with_pub(f"broadcast on {channel!r} on", run)

    def subscribe(self, channel: str) -> Subscription:
        self._check_pid()
        return AmqpSubscription(self, channel)

    def _declare_mailbox(self, ch: Any, mailbox: str) -> int:
        """Declare and bind ``<mailbox>.reply.celery.pidbox``; returns its ready count."""
        ch.exchange_declare(self.reply_exchange, "direct", durable=False, auto_delete=False)
        name = f"{mailbox}.{self.reply_exchange}"
        ok = ch.queue_declare(name, durable=False, auto_delete=False,
                              arguments={"x-expires": 60000, "x-message-ttl": 300000})
        ch.queue_bind(name, self.reply_exchange, routing_key=mailbox)
        return ok.method.message_count

    def put_reply(self, mailbox: str, payload: bytes, ttl: float = 60.0) -> None:
        """Publish to the reply exchange with routing key ``mailbox``; when no queue is bound
        yet, declare the mailbox's queue so that the reply waits for its reader."""
        content_type, encoding = _json_type(payload)
        props = pika.BasicProperties(content_type=content_type, content_encoding=encoding, delivery_mode=1,
                                     expiration=str(max(0, int(ttl * 1000))),
                                     headers={"x-qctl-expires": int((time.time() + ttl) * 1000)})

        def run(link: Link) -> None:
            if ("exchange", self.reply_exchange) not in link.declared:
                link.channel().exchange_declare(self.reply_exchange, "direct", durable=False, auto_delete=False)
                link.declared.add(("exchange", self.reply_exchange))
            try:
                link.channel().basic_publish(self.reply_exchange, mailbox, payload, props, mandatory=True)
            except pex.UnroutableError:
                self._declare_mailbox(link.channel(), mailbox)
                link.channel().basic_publish(self.reply_exchange, mailbox, payload, props, mandatory=True)
        self._with_pub(f"reply to {mailbox!r} on", run)

    def get_replies(self, mailbox: str, timeout: float) -> list[bytes]:
        """Take the replies in ``mailbox`` (its consumer stays open); waits up to ``timeout``."""
        self._check_pid()
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._mailbox_lock:
            try:
                link = self._mailbox
                if link is None or not link.alive():
                    if link is not None:
                        link.close()
                    link = self._mailbox = self._reconnect(timeout)
                    link.lock = self._mailbox_lock
                box = self._boxes.setdefault(mailbox, deque())
                if ("consumer", mailbox) not in link.declared:
                    expect = self._declare_mailbox(link.channel(), mailbox)
                    link.channel().basic_consume(f"{mailbox}.{self.reply_exchange}", auto_ack=True,
                                                 on_message_callback=lambda _c, _m, p, b: box.append((p, bytes(b))))
                    link.declared.add(("consumer", mailbox))
                    until = time.monotonic() + _GRACE          # replies already waiting: get them
                    while len(box) < expect and time.monotonic() < until:
                        link.conn.process_data_events(until - time.monotonic())
                link.conn.process_data_events(0)
                out = self._fresh(box)
                while not out and time.monotonic() < deadline:
                    link.conn.process_data_events(min(deadline - time.monotonic(), 1.0))
                    out = self._fresh(box)
                return out
            except _ERRORS as exc:
                if self._mailbox is not None:
                    self._mailbox.close()
                self._mailbox = None
                raise OperationalError(describe(self.url, exc, "read replies from")) from None

    @staticmethod
    def _fresh(box: deque) -> list[bytes]:
        """Empty ``box``; the payloads whose ``x-qctl-expires`` has not passed."""
        now_ms, out = time.time() * 1000, []
        while box:
            props, body = box.popleft()
            expires = (props.headers or {}).get("x-qctl-expires")
            if expires is None or int(expires) >= now_ms:
                out.append(body)
        return out

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
        with self._mailbox_lock:
            if self._mailbox is not None:
                self._mailbox.close()
            self._mailbox = None
        for sub in list(self._subscriptions):
            sub.close()
