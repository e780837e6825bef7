"""The consuming side of ``AmqpTransport``: ``Tag`` (a delivery handle) and ``Consumer``, which
fetches on one consumer connection with manual acks and the prefetch window, and settles
(``ack``/``requeue``/``dead_letter``/``release_all``) from any thread by running the work on
that connection. ``qctl.transports.amqp``'s docstring describes the guarantees."""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import pika.exceptions as pex

from ..exceptions import OperationalError
from . import Delivery, Envelope
from .amqp_conn import _ERRORS, _GRACE, Link, _split, basic_properties, describe
from .amqp_delay import _delayable

_OP_TIMEOUT = 30.0      # how long a settlement waits for the consumer connection
_GENERATIONS = itertools.count(1)


class Tag(NamedTuple):
    """A delivery handle: the consumer channel's generation and its delivery tag."""
    gen: int
    n: int

    def __str__(self) -> str:
        return f"{self.gen}.{self.n}"


class _Op:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class _Held:
    __slots__ = ("queue", "envelope", "priority", "count")

    def __init__(self, queue: str, envelope: Envelope, priority: int, count: int) -> None:
        self.queue, self.envelope, self.priority, self.count = queue, envelope, priority, count


class Consumer:
    """Mixed into ``AmqpTransport``, which sets up the state used here in ``_reset``."""

    url: str
    eta_threshold: float
    _consume_lock: Any
    _consumer: Link | None
    _gen: int
    _consuming: dict[str, str]
    _ctag_queue: dict[str, str]
    _buffer: dict[str, deque]
    _held: dict[int, _Held]
    _qos: int | None
    _global_qos: bool
    _ops: list[_Op]
    _ops_lock: Any
    _queue_args: dict[str, dict[str, Any]]
    _check_pid: Callable[[], None]
    _reconnect: Callable[..., Link]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]
    _declare: Callable[..., None]
    _publish_now: Callable[[Link, str, Any, bytes], None]
    _store_dead: Callable[[Envelope, str, str, int], None]
    publish: Callable[..., None]

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` deliveries, consuming ``queues`` (see ``qctl.transports.amqp``)."""
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

