"""Remote control and events on RabbitMQ, declared exactly as Celery 5.7 declares them (kombu's
``pidbox`` and ``celery.events``), so that Celery clients, workers and Flower share them with us:
``AmqpSubscription`` (a subscriber's queue on its own connection) and ``Pidbox``, the part of
``AmqpTransport`` that broadcasts, subscribes and passes replies.

=====================================  ==================================================================
control exchange ``celery.pidbox``     fanout, durable=False, auto_delete=False (every exchange but the
                                       event exchange is shaped so)
  requests                             raw JSON body, content_type application/json, content_encoding
                                       utf-8, delivery_mode 2, headers = the message's, routing key ''
  ``<node>.celery.pidbox``             ``subscribe(..., name=)``: durable=False, auto_delete=True,
                                       exclusive=True, ``x-expires`` 10000, ``x-message-ttl`` 300000,
                                       bound with ''; without ``name`` the same, server-named
event exchange ``celeryev``            topic, durable=True, auto_delete=False (option ``event_exchange``)
  events                               delivery_mode 1, routing key and headers the message's
  ``celeryev.<uuid4>``                 a subscriber: exclusive, auto_delete, ``x-message-ttl`` 5000,
                                       ``x-expires`` 60000, bound with the subscriber's pattern
reply exchange ``reply.celery.pidbox`` direct, durable=False, auto_delete=False
  ``<oid>.reply.celery.pidbox``        ``open_mailbox(oid)``: durable=False, auto_delete=True,
                                       exclusive=True, ``x-expires`` 10000, ``x-message-ttl`` 300000,
                                       bound with ``<oid>``
  replies                              delivery_mode 1, headers the message's (``ticket``, ``clock``),
                                       ``expiration`` = ttl; not ``mandatory``: no mailbox, no reply
=====================================  ==================================================================

**Mailboxes.** An exclusive queue belongs to the connection that declared it, so every mailbox of
a transport lives on one reader connection (``_mailbox``, lock ``_mailbox_lock``), each on its
own channel (a failed declare closes only that channel) and consumed from the moment it is
opened: replies a Celery worker sends at once are kept (it publishes without ``mandatory``), and
``auto_delete`` never fires before ``close_mailbox``. pika allows one thread at a time on a
connection: one ``get_replies`` caller reads the socket for everybody while the others wait on
``_mailbox_cond``, woken by the consumer callbacks that fill their boxes; ``open_mailbox`` and
``close_mailbox`` interrupt a reading thread with ``add_callback_threadsafe``. When the reader
connection breaks, the next call reconnects and declares the open mailboxes again (replies sent
meanwhile are lost, as they are for a Celery client). A reply's ``ttl`` is enforced by the broker
while it waits in the queue (``expiration``) and by the reader from its arrival on our
connection; a kombu-style ``expires`` header (epoch seconds) is honoured as well.

**Headers.** pika cannot send floats: the request header ``expires`` (a float epoch) is rounded
up to whole seconds (Celery workers ignore it, kombu clients compare it numerically), other
values as ``amqp_conn.amqp_headers``. Received doubles are read as floats (``amqp_conn``).

**No live-node registry.** AMQP 0-9-1 cannot list queues, and a browsable "last value" queue
read with ``basic_get`` + requeue hides its messages from a second reader browsing at the same
moment (they are unacked on the first reader's channel): a control client would then stop
collecting before every node replied. ``live_nodes()`` therefore returns None and the control
client waits for its timeout, as Celery always does; ``announce_node``/``forget_node`` do nothing.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable
from uuid import uuid4

import pika
import pika.exceptions as pex

from ..exceptions import OperationalError
from . import ControlMessage, Subscription
from .amqp_conn import _ERRORS, _INHERITED, Link, _plain, amqp_headers, describe

if TYPE_CHECKING:
    from .amqp import AmqpTransport

#: Celery's ``control_queue_expires`` (10 s) and ``control_queue_ttl`` (300 s): worker queues
#: and, with kombu's ``reply_queue_expires`` (10 s), the clients' reply queues.
CONTROL_QUEUE_ARGS = {"x-expires": 10000, "x-message-ttl": 300000}
REPLY_QUEUE_ARGS = {"x-expires": 10000, "x-message-ttl": 300000}
#: Celery's ``event_queue_expires`` (60 s) and ``event_queue_ttl`` (5 s).
EVENT_QUEUE_ARGS = {"x-expires": 60000, "x-message-ttl": 5000}
EVENT_QUEUE_PREFIX = "celeryev"      # Celery's event_queue_prefix


def control_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """Headers pika can send: ``expires`` rounded up to an int, the rest as ``amqp_headers``."""
    fixed = {k: math.ceil(v) if k == "expires" and isinstance(v, float) and math.isfinite(v) else v
             for k, v in (headers or {}).items()}
    return amqp_headers(fixed)


def _received(method: Any, props: pika.BasicProperties, body: bytes) -> ControlMessage:
    headers = {str(k): _plain(v) for k, v in (props.headers or {}).items()}
    return ControlMessage(bytes(body), headers, method.routing_key or "")


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` is one word, ``#`` zero or more."""
    want, have = pattern.split("."), key.split(".")

    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "#":
            return match(i + 1, j) or (j < len(have) and match(i, j + 1))
        return j < len(have) and want[i] in ("*", have[j]) and match(i + 1, j + 1)
    return pattern == "#" or match(0, 0)


class AmqpSubscription(Subscription):
    """A subscriber's exclusive queue bound to ``exchange``, on its own connection."""

    def __init__(self, transport: "AmqpTransport", exchange: str, pattern: str = "#",
                 name: str | None = None) -> None:
        self._transport, self.exchange, self.pattern, self.name = transport, exchange, pattern, name
        self.lock = threading.RLock()
        self._buffer: deque[ControlMessage] = deque()
        self._closed = False
        self._pid = os.getpid()
        self.link: Link | None = None
        self.queue: str | None = None
        # A fanout exchange ignores binding keys: the pattern is applied here instead.
        self._filter = None if pattern == "#" or transport._is_events(exchange) else pattern
        with self.lock:
            self._open(None)      # bound before we return: nothing broadcast later is missed

    def _open(self, timeout: float | None) -> None:
        t = self._transport
        link = t._connect(False, self.lock) if timeout is None else t._reconnect(timeout, self.lock)
        try:
            ch = link.channel()
            self.queue = t._declare_subscriber(ch, self.exchange, self.pattern, self.name)
            ch.basic_consume(self.queue, self._on_message, auto_ack=True)
        except _ERRORS as exc:
            link.close()
            raise OperationalError(describe(t.url, exc, f"subscribe to {self.exchange!r} on")) from None
        self.link = link
        t._subscriptions.add(self)

    def _on_message(self, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        message = _received(method, props, body)
        if self._filter is None or topic_match(self._filter, message.routing_key):
            self._buffer.append(message)

    def get(self, timeout: float) -> list[ControlMessage]:
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
                    if self.link is not None:
                        self.link.close()
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


def _noop() -> None:
    pass


class Pidbox:
    """Mixed into ``AmqpTransport``: uses its connections (``_connect``, ``_reconnect``,
    ``_with_pub``) and its set of subscriptions; owns the mailbox connection."""

    url: str
    reply_exchange: str
    event_exchange: str
    _subscriptions: Any
    _check_pid: Callable[[], None]
    _connect: Callable[..., Link]
    _reconnect: Callable[..., Link]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]

    def _reset_pidbox(self) -> None:
        """Fresh mailbox state (at start and in a forked child)."""
        self._mailbox_lock = threading.RLock()        # whoever uses the mailbox connection
        self._mailbox: Link | None = None
        self._mailbox_cond = threading.Condition()    # guards the boxes and the two fields below
        self._mailbox_reading = False                 # a get_replies caller is reading the socket
        self._mailbox_waiting = 0                     # callers waiting to declare or delete
        self._boxes: dict[str, deque] = {}            # open mailbox -> [(expires at, message)]
        self._box_channels: dict[str, tuple[Link, Any]] = {}

    # -- broadcasts -----------------------------------------------------------------------

    def _is_events(self, exchange: str) -> bool:
        return exchange == self.event_exchange

    def _declare_exchange(self, ch: Any, exchange: str) -> None:
        if self._is_events(exchange):
            ch.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
        else:
            ch.exchange_declare(exchange, "fanout", durable=False, auto_delete=False)

    def _declare_subscriber(self, ch: Any, exchange: str, pattern: str, name: str | None) -> str:
        """Declare and bind a subscriber's queue as Celery does; returns its name."""
        self._declare_exchange(ch, exchange)
        if self._is_events(exchange):
            queue, arguments, key = name or f"{EVENT_QUEUE_PREFIX}.{uuid4()}", EVENT_QUEUE_ARGS, pattern
        else:
            queue, arguments, key = name or "", CONTROL_QUEUE_ARGS, ""
        queue = ch.queue_declare(queue, durable=False, exclusive=True, auto_delete=True,
                                 arguments=dict(arguments)).method.queue
        ch.queue_bind(queue, exchange, routing_key=key)
        return queue

    def broadcast(self, exchange: str, message: ControlMessage) -> None:
        """Publish to ``exchange`` (confirmed; nobody listening is not an error)."""
        events = self._is_events(exchange)
        props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                     delivery_mode=1 if events else 2,
                                     headers=control_headers(message.headers))

        def run(link: Link) -> None:
            if ("exchange", exchange) not in link.declared:
                self._declare_exchange(link.channel(), exchange)
                link.declared.add(("exchange", exchange))
            link.channel().basic_publish(exchange, message.routing_key or "", message.body, props)
        self._with_pub(f"broadcast on {exchange!r} on", run)

    def subscribe(self, exchange: str, pattern: str = "#", name: str | None = None) -> Subscription:
        self._check_pid()
        return AmqpSubscription(self, exchange, pattern, name)  # type: ignore[arg-type]

    # -- replies --------------------------------------------------------------------------

    def put_reply(self, mailbox: str, message: ControlMessage, ttl: float = 60.0) -> None:
        """Publish to the reply exchange with routing key ``mailbox``, as a Celery worker does;
        dropped by the broker when that mailbox is not open."""
        props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                     delivery_mode=1, headers=control_headers(message.headers),
                                     expiration=str(max(0, math.ceil(ttl * 1000))))

        def run(link: Link) -> None:
            if ("exchange", self.reply_exchange) not in link.declared:
                link.channel().exchange_declare(self.reply_exchange, "direct", durable=False, auto_delete=False)
                link.declared.add(("exchange", self.reply_exchange))
            link.channel().basic_publish(self.reply_exchange, mailbox, message.body, props)
        self._with_pub(f"reply to {mailbox!r} on", run)

    def open_mailbox(self, mailbox: str) -> None:
        """Declare ``<mailbox>.reply.celery.pidbox`` on the reader connection and consume it."""
        self._check_pid()
        with self._mailbox_cond:
            if mailbox in self._boxes:
                return
            self._boxes[mailbox] = deque()
        try:
            self._mailbox_op(f"open mailbox {mailbox!r} on", lambda link: None, 5.0)
        except BaseException:
            with self._mailbox_cond:
                self._boxes.pop(mailbox, None)
            raise

    def close_mailbox(self, mailbox: str) -> None:
        """Delete the mailbox's queue and what is left in it. Idempotent; never raises (the
        queue is exclusive: a broken connection took it along)."""
        self._check_pid()
        with self._mailbox_cond:
            self._boxes.pop(mailbox, None)
            entry = self._box_channels.pop(mailbox, None)
        if entry is None:
            return

        def run(link: Link | None) -> None:
            box_link, ch = entry
            if box_link is link and ch.is_open:
                ch.queue_delete(f"{mailbox}.{self.reply_exchange}")
                ch.close()
        try:
            self._mailbox_op(f"close mailbox {mailbox!r} on", run, 5.0, connect=False)
        except OperationalError:
            pass

    def get_replies(self, mailbox: str, timeout: float) -> list[ControlMessage]:
        """Take the replies in ``mailbox`` (opened if needed); waits up to ``timeout``."""
        self._check_pid()
        deadline = time.monotonic() + max(timeout, 0.0)
        box = self._boxes.get(mailbox)
        if box is None:
            self.open_mailbox(mailbox)
            box = self._boxes.get(mailbox, deque())
        cond, polled = self._mailbox_cond, False
        while True:
            with cond:
                out = self._fresh(box)
                left = deadline - time.monotonic()
                if out or (polled and left <= 0):
                    return out
                if self._mailbox_reading or self._mailbox_waiting:   # someone else reads for us
                    if left <= 0:
                        return out
                    cond.wait(left)
                    continue
                self._mailbox_reading = True
            try:
                self._mailbox_op("read replies from",
                                 lambda link: link.conn.process_data_events(max(0.0, min(left, 1.0))),
                                 max(left, 0.0), wake=False)
                polled = True
            finally:
                with cond:
                    self._mailbox_reading = False
                    cond.notify_all()

    def _mailbox_op(self, what: str, fn: Callable[[Link], Any], timeout: float,
                    connect: bool = True, wake: bool = True) -> Any:
        """``fn(link)`` on the reader connection, (re)connected and with every open mailbox
        declared unless ``connect`` is False (then ``fn(None)`` when there is no connection).
        ``wake``: interrupt a thread reading the socket and keep readers off until done."""
        cond = self._mailbox_cond
        if wake:
            with cond:
                self._mailbox_waiting += 1
                link, reading = self._mailbox, self._mailbox_reading
            if reading and link is not None:
                try:
                    link.conn.add_callback_threadsafe(_noop)     # its process_data_events returns
                except Exception:  # noqa: BLE001 - a closed connection: nobody to wake
                    pass
        try:
            with self._mailbox_lock:
                try:
                    if connect:
                        link = self._mailbox_link(timeout)
                    else:
                        link = self._mailbox if self._mailbox is not None and self._mailbox.conn.is_open else None
                    return fn(link)  # type: ignore[arg-type]
                except _ERRORS as exc:
                    if not isinstance(exc, pex.ChannelClosed):   # one mailbox's channel: the rest is fine
                        if self._mailbox is not None:
                            self._mailbox.close()
                        self._mailbox = None
                    raise OperationalError(describe(self.url, exc, what)) from None
        finally:
            if wake:
                with cond:
                    self._mailbox_waiting -= 1
                    cond.notify_all()

    def _mailbox_link(self, timeout: float) -> Link:
        """The reader connection, with a consuming channel for every open mailbox."""
        link = self._mailbox
        if link is None or not link.conn.is_open:
            if link is not None:
                link.close()
            self._mailbox = None
            link = self._mailbox = self._reconnect(timeout, self._mailbox_lock)
        with self._mailbox_cond:
            todo = [(m, box) for m, box in self._boxes.items()
                    if m not in self._box_channels or self._box_channels[m][0] is not link
                    or not self._box_channels[m][1].is_open]
        for mailbox, box in todo:
            ch = link.conn.channel()
            try:
                self._declare_mailbox(ch, mailbox, box)
            except pex.ChannelClosed:
                with self._mailbox_cond:
                    self._boxes.pop(mailbox, None)       # e.g. RESOURCE_LOCKED: not ours to read
                raise
            with self._mailbox_cond:
                if mailbox in self._boxes:
                    self._box_channels[mailbox] = (link, ch)
                    continue
            ch.close()                                   # closed meanwhile
        return link

    def _declare_mailbox(self, ch: Any, mailbox: str, box: deque) -> None:
        ch.exchange_declare(self.reply_exchange, "direct", durable=False, auto_delete=False)
        name = f"{mailbox}.{self.reply_exchange}"
        ch.queue_declare(name, durable=False, exclusive=True, auto_delete=True,
                         arguments=dict(REPLY_QUEUE_ARGS))
        ch.queue_bind(name, self.reply_exchange, routing_key=mailbox)
        ch.basic_consume(name, functools.partial(self._on_reply, box), auto_ack=True)

    def _on_reply(self, box: deque, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        """Consumer callback (on whichever thread services the connection): file the reply."""
        message = _received(method, props, body)
        expires = math.inf
        try:
            if props.expiration is not None:
                expires = time.time() + int(props.expiration) / 1000
        except ValueError:
            pass
        header = message.headers.get("expires")
        if isinstance(header, (int, float)) and not isinstance(header, bool) and header:
            expires = min(expires, float(header))        # kombu: "if expires and time() > expires"
        with self._mailbox_cond:
            box.append((expires, message))
            self._mailbox_cond.notify_all()

    @staticmethod
    def _fresh(box: deque) -> list[ControlMessage]:
        """Empty ``box``; the replies that have not expired."""
        now, out = time.time(), []
        while box:
            expires, message = box.popleft()
            if now <= expires:
                out.append(message)
        return out

    def _close_mailboxes(self) -> None:
        """Close the reader connection (its exclusive queues go with it) and forget the boxes."""
        with self._mailbox_cond:
            self._boxes.clear()
            self._box_channels.clear()
            self._mailbox_waiting += 1
            link, reading = self._mailbox, self._mailbox_reading
        try:
            if reading and link is not None:
                try:
                    link.conn.add_callback_threadsafe(_noop)
                except Exception:  # noqa: BLE001
                    pass
            if self._mailbox_lock.acquire(timeout=5):
                try:
                    if self._mailbox is not None:
                        self._mailbox.close()
                    self._mailbox = None
                finally:
                    self._mailbox_lock.release()
        finally:
            with self._mailbox_cond:
                self._mailbox_waiting -= 1
                self._mailbox_cond.notify_all()

    # -- live nodes -----------------------------------------------------------------------

    def announce_node(self, nodename: str, ttl: float) -> None:
        """Nothing: RabbitMQ has no registry we could list (module docstring)."""

    def forget_node(self, nodename: str) -> None:
        """Nothing (see ``announce_node``)."""

    def live_nodes(self) -> set[str] | None:
        """None: the control client waits for its timeout on AMQP, as Celery does."""
        return None
