"""Broadcasts and reply mailboxes on RabbitMQ, as Celery's pidbox: ``AmqpSubscription`` (a
subscriber's exclusive queue on its own connection) and ``Pidbox``, the part of
``AmqpTransport`` that broadcasts, subscribes and passes replies. ``qctl.transports.amqp``'s
docstring describes the exchanges and queues."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import pika
import pika.exceptions as pex

from ..exceptions import OperationalError
from . import Subscription
from .amqp_conn import _ERRORS, _GRACE, _INHERITED, Link, _json_type, describe

if TYPE_CHECKING:
    from .amqp import AmqpTransport


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


class Pidbox:
    """Mixed into ``AmqpTransport``: uses its connections (``_connect``, ``_reconnect``,
    ``_with_pub``), its mailbox connection and its set of subscriptions."""

    url: str
    reply_exchange: str
    event_exchange: str
    _mailbox: Link | None
    _mailbox_lock: Any
    _boxes: dict[str, deque]
    _check_pid: Callable[[], None]
    _reconnect: Callable[..., Link]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]

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
