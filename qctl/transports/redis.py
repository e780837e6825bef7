"""The Redis broker (``redis://[:password@]host:port/db``, ``rediss://`` for TLS), in kombu's layout.

A message is kombu's JSON envelope (``{"body": <base64>, "content-encoding", "content-type",
"headers", "properties": {..., "delivery_info", "priority", "body_encoding", "delivery_tag"}}``)
``LPUSH``-ed onto the queue's list: Celery workers consume what qctl publishes and the other
way round. Keys (in the URL's db, no prefix)::

    <queue>, <queue>\\x06\\x16{3,6,9}      lists (kombu): ready messages by priority band
    _kombu.binding[_permanent].<exch>    sets (kombu 5.7): "<rk>\\x06\\x16\\x06\\x16<queue>"
    unacked, unacked_index               kombu's ack emulation: hash tag -> [envelope, exchange,
                                         rk]; zset tag -> delivery (or last renewal) time
    qctl.leases                          zset tag -> lease deadline (server time)
    qctl.lease_owner, qctl.lease_queue   hashes tag -> consumer id; -> "<seq> <list it came from>"
    qctl.lease_msg                       hash tag -> "k" (kombu JSON) or "r" (other) + the text
    qctl.delivery_count, qctl.seq        hash tag -> times fetched; counter (fetch order, tags)
    qctl.delayed[_msgs].<queue>          zset tag -> ETA; hash tag -> "<band 0-3> <envelope>"
    qctl.dead, qctl.dead_seq             list of JSON dead-letter records; their id counter
    _kombu.binding_deadlines             zset (kombu 5.7) exchange -> binding sweep deadline (ms)
    <oid>.reply.celery.pidbox            list (kombu): control replies for client <oid>
    qctl.nodes                           zset nodename -> expiry (server time): live workers
    qctl.lease.<name>, qctl.state.<name> scheduler leases and their state (``redis_leases``)

Remote control and events, as kombu 5.7 and Celery put them on Redis (``celery-wire.md`` §2.7,
§2.8, §3, §6.1): every message is a kombu envelope (as on a queue; delivery_mode 2 for pidbox
requests, 1 for events and replies). ``broadcast`` PUBLISHes on ``/<db>.<exchange>``, plus
``/<routing key>`` when it has one (kombu's fanout_patterns): ``/0.celery.pidbox``,
``/0.celeryev/worker.heartbeat``. ``subscribe`` PSUBSCRIBEs as kombu, ``/<db>.<exchange>/<pattern
with # as *>`` (``/0.celeryev/*``), plus the pattern without each ``#`` (so the ``#`` subscriber
of ``celery.pidbox`` also has kombu's ``/0.celery.pidbox``), and keeps what the AMQP pattern
matches; with a ``name`` it also leaves kombu's binding ``\\x06\\x16\\x06\\x16<name>`` in
``_kombu.binding.celery.pidbox``. Replies are not PUB/SUB: the client's ``open_mailbox(oid)``
adds ``<oid>\\x06\\x16\\x06\\x16<oid>.reply.celery.pidbox`` to ``_kombu.binding.reply.celery.pidbox``
(and, as kombu 5.7, pushes the exchange's deadline in ``_kombu.binding_deadlines`` an hour out,
so a Celery client's sweep leaves the table alone); a worker (Celery's, or ``put_reply``)
LPUSHes its reply onto the list of every member with routing key ``<oid>``, and the client
BRPOPs ``<oid>.reply.celery.pidbox``. ``control_exchange`` in the options renames ``celery`` in
``reply.celery.pidbox``.

Every qctl publish or give-back also publishes on ``qctl.notify.<db>.<queue>``, which idle
consumers subscribe to, so they wake at once. A message from a producer that does not notify (a
Celery client) is found by the idle re-check (``idle_poll_interval``, 1 s); after one such
message a consumer re-checks every ``poll_interval`` (0.05 s) for a minute.

Priority is kombu's number, as a Celery client sends it: clamped to 0..9, bands 0 (0-2),
3 (3-5), 6 (6-8), 9, and **lower numbers are served first** (the opposite of AMQP). ``fetch``
takes the queues in the order given, each queue's bands in kombu's order, oldest first.

``fetch`` is one Lua script: it pops up to ``limit`` messages and in the same atomic step
records each in kombu's ``unacked``/``unacked_index`` (a Celery worker's restore sweep could
still recover it) and in the lease keys: a fetched message is never only in a worker's memory.
``restore_expired`` (also run by ``fetch`` every second and when the earliest lease runs out)
puts expired leases back with kombu's ``redelivered`` flags inserted into the text (Lua never
re-encodes JSON: its cjson loses number precision and empty arrays).

Options (``broker_transport_options``): ``visibility_timeout`` (lease seconds), ``poll_interval``,
``idle_poll_interval``, ``socket_timeout`` (10), ``socket_connect_timeout`` (5),
``max_connections``, ``delayed_delivery`` (False: ETA messages go on the list as Celery sends
them, so Celery workers on the same queue see them, and a qctl worker that fetches one before
its ETA moves it into ``qctl.delayed.<queue>`` instead of holding it; True: qctl clients
put them in the delayed set directly, for fleets of qctl workers only). Not supported: Redis Cluster,
Sentinel, kombu's ``global_keyprefix``.

The Lua scripts live in ``redis_scripts``, the envelope encoding and band keys in ``redis_envelope``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import uuid4

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..conf import mask_url
from ..exceptions import ImproperlyConfigured, OperationalError
from ..routing import topic_matches
from . import ControlMessage, DeadLetter, Delivery, Envelope, Subscription, Transport
# Re-exported: these names have always been importable from this module.
from .redis_envelope import (  # noqa: F401
    PRIORITY_STEPS, SEP, TRANSPORT_PROPERTIES, band_index, binding_key, decode_control,
    decode_envelope, encode_control, encode_envelope, fanout_topic, is_pidbox, list_key, one_line,
    subscribe_globs)
from .redis_scripts import FETCH, _PRELUDE, _SCRIPTS  # noqa: F401
from .redis_leases import LEASE_SCRIPTS, RedisLeases

_RESTORE_EVERY = 1.0      # seconds between expired-lease sweeps by one fetching object
_BATCH = 1000             # leases restored / renewed per script run (bounds its run time)
_MAX_BLOCK = 5.0          # longest single blocking call; below socket_timeout
_DEFER_AFTER = 0.0     # seconds: ETA messages further away are not handed out (deferred)
_FAST_POLL_FOR = 60.0     # seconds of fast polling after a message came without notification
#: kombu 5.7's binding refresh for queues with x-expires (pidbox, reply and event queues):
#: the exchange's sweep deadline is pushed to now + max(2 x-expires, 1 h), every third of that.
_BINDING_TTL = 3600.0
_CERT_REQS = {"CERT_REQUIRED": "required", "CERT_OPTIONAL": "optional", "CERT_NONE": "none"}
#: Clients a forked child inherited: kept referenced, so garbage collection in the child never
#: touches sockets that belong to the parent.
_INHERITED: list[Any] = []

logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def connect(url: str, options: dict[str, Any]) -> redis.Redis:
    """A client with its own connection pool for ``url``; raises ``ImproperlyConfigured``."""
    parts = urlsplit(url)
    query = [(k, _CERT_REQS.get(v, v) if k == "ssl_cert_reqs" else v)   # Celery: CERT_REQUIRED
             for k, v in parse_qsl(parts.query)]
    url = urlunsplit((parts.scheme.split("+")[0], parts.netloc, parts.path, urlencode(query), ""))
    kwargs: dict[str, Any] = {
        "socket_timeout": float(options.get("socket_timeout") or 10.0),
        "socket_connect_timeout": float(options.get("socket_connect_timeout") or 5.0),
        "socket_keepalive": True,
        # No silent re-sending: a command retried after a lost reply could run twice (a
        # duplicate LPUSH); the caller's publish retry policy decides instead.
        "retry": Retry(NoBackoff(), 0)}
    if options.get("max_connections"):
        kwargs["max_connections"] = int(options["max_connections"])
    try:
        return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, **kwargs))
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"bad redis URL {mask_url(url)!r}: {one_line(exc)}") from exc


class Errors:
    """``with Errors(url, what):`` turns redis-py errors into one-line ``OperationalError``."""

    def __init__(self, url: str, what: str) -> None:
        self.prefix = f"redis {what} {mask_url(url)}"

    def __enter__(self) -> "Errors":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, (redis.RedisError, OSError)):
            raise OperationalError(f"{self.prefix}: {one_line(exc)}") from exc
        return False


# -- PUB/SUB --------------------------------------------------------------------------------

def confirm(pubsub: Any, channels: set[str], kind: str = "subscribe", timeout: float = 5.0) -> None:
    """Read until the server confirmed the subscription to every one of ``channels``."""
    waiting, deadline = set(channels), time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise redis.TimeoutError(f"no {kind} confirmation from the server")
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == kind:
            waiting.discard(_text(message["channel"]))


class RedisSubscription(Subscription):
    """One PUB/SUB connection PSUBSCRIBEd as a kombu consumer of ``exchange`` bound with
    ``pattern`` would be (``subscribe_globs``); ``get`` decodes kombu envelopes. With ``name``,
    the kombu binding ``<rk>\\x06\\x16\\x06\\x16<name>`` is kept in ``_kombu.binding.<exchange>``
    while it is open (what a kombu consumer's queue_bind leaves there; nothing reads it)."""

    def __init__(self, transport: "RedisTransport", exchange: str, pattern: str,
                 name: str | None) -> None:
        self._transport, self._errors = transport, transport._errors
        self.exchange, self.pattern = exchange, pattern
        self.prefix = fanout_topic(transport.db, exchange)
        self.globs = subscribe_globs(transport.db, exchange, pattern)
        self._binding = (f"_kombu.binding.{exchange}",
                         f"{binding_key(exchange, pattern)}{SEP}{SEP}{name}") if name else None
        self._rebind_at = 0.0
        # Overlapping globs deliver one publish once per glob, back to back: the text (with
        # its uuid delivery tag) and the globs it already came through tell the copies apart.
        self._last: tuple[bytes, set[bytes]] = (b"", set())
        self._lock = threading.Lock()
        self._pubsub: Any = None
        with self._errors:
            pubsub = transport._redis().pubsub()
            try:
                pubsub.psubscribe(*self.globs)
                confirm(pubsub, set(self.globs), "psubscribe")
            except BaseException:
                _close_quietly(pubsub)
                raise
        self._pubsub = pubsub
        try:
            self._rebind()
        except BaseException:
            self.close()
            raise

    def _rebind(self) -> None:
        if self._binding is not None and time.monotonic() >= self._rebind_at:
            key, member = self._binding
            self._transport._run("bind", [key, member, self.exchange, int(_BINDING_TTL * 1000)])
            self._rebind_at = time.monotonic() + _BINDING_TTL / 3

    def _decode(self, message: dict[str, Any]) -> ControlMessage | None:
        channel, data, glob = _text(message["channel"]), bytes(message["data"]), message["pattern"]
        last, seen = self._last
        if data == last and glob not in seen:
            seen.add(glob)
            return None                          # the same publish again, through another glob
        self._last = (data, {glob})
        routing_key = channel[len(self.prefix) + 1:] if channel.startswith(self.prefix + "/") else ""
        if self.pattern != "#" and not topic_matches(self.pattern, routing_key):
            return None                          # caught by a glob, not by the AMQP pattern
        try:
            control = decode_control(data)
        except ValueError as exc:
            logger.debug("skipped a message on %s that is not a kombu envelope: %s (%r)",
                         channel, exc, data[:200])
            return None
        if not control.routing_key:
            control.routing_key = routing_key
        return control

    def get(self, timeout: float) -> list[ControlMessage]:
        """Messages broadcast since the last call; waits up to ``timeout`` s for the first.
        What is not a kombu envelope is skipped (logged at debug level)."""
        deadline, got = time.monotonic() + max(timeout, 0.0), []
        with self._lock, self._errors:
            if self._pubsub is not None:
                self._rebind()
            while self._pubsub is not None:
                left = 0.0 if got else deadline - time.monotonic()
                message = self._pubsub.get_message(timeout=max(0.0, min(left, _MAX_BLOCK)))
                if message is None:
                    if got or time.monotonic() >= deadline:
                        break
                elif message["type"] == "pmessage":
                    control = self._decode(message)
                    if control is not None:
                        got.append(control)
        return got

    def close(self) -> None:
        """Stop receiving (and drop the binding). Idempotent."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        _close_quietly(pubsub)
        if pubsub is not None and self._binding is not None:
            key, member = self._binding
            try:
                self._transport._redis().srem(key, member)
            except (redis.RedisError, OSError):
                pass


def _close_quietly(pubsub: Any) -> None:
    try:
        if pubsub is not None:
            pubsub.close()
    except (redis.RedisError, OSError):
        pass


class _Waiter:
    """A thread's wake-up subscription to the notify channels of the queues it fetches from."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.channels: set[str] = set()

    def listen(self, channels: set[str]) -> bool:
        """Be subscribed to exactly ``channels``; True when a new subscription was made."""
        if self.channels - channels:
            self.pubsub.unsubscribe(*(self.channels - channels))
        new = channels - self.channels
        if new:
            self.pubsub.subscribe(*new)
            confirm(self.pubsub, new)
        self.channels = set(channels)
        return bool(new)

    def pause(self) -> None:
        """Unsubscribe while busy, so notifications do not pile up unread."""
        if self.channels:
            self.pubsub.unsubscribe(*self.channels)
            self.channels = set()

    def wait(self, timeout: float) -> bool:
        """True when a notification arrives, False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.pubsub.get_message(timeout=min(left, _MAX_BLOCK))
            if message is not None and message["type"] == "message":
                return True
        return False


# -- the transport --------------------------------------------------------------------------

class RedisTransport(RedisLeases, Transport):
    """kombu's Redis layout with atomic leased fetches, broker-side ETAs and dead letters."""

    supports_delayed_delivery = True

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.poll_interval = float(self.options.get("poll_interval") or 0.05)
        self.idle_poll_interval = max(self.poll_interval,
                                      float(self.options.get("idle_poll_interval") or 1.0))
        # Default off: a Celery peer must see a qctl client's ETA messages on the list; qctl
        # workers move them into the delayed set when they fetch them (_defer_early).
        # Either way nothing is delivered before its ETA (supports_delayed_delivery holds).
        self.publish_delayed = str(self.options.get("delayed_delivery", False)).lower() \
            not in ("false", "0", "no", "off")
        self.reply_exchange = f"reply.{self.options.get('control_exchange') or 'celery'}.pidbox"
        self._errors = Errors(url, "broker")
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self.db = 0
        self._reset(os.getpid())
        self._redis()                       # bad URLs fail here; nothing is sent yet

    def _reset(self, pid: int) -> None:
        self._pid = pid
        self._consumer_id = f"{socket.gethostname()}:{pid}:{uuid4().hex[:8]}"
        self._held: dict[str, None] = {}    # tags leased by this object, in fetch order
        self._local = threading.local()
        self._waiters: weakref.WeakSet[_Waiter] = weakref.WeakSet()   # die with their thread
        self._next_restore = self._fast_poll_until = 0.0
        self._lease_due: float | None = None   # earliest lease deadline seen (server clock)
        self._clock_skew = 0.0                 # server time - local time, from fetch replies

    def _redis(self) -> redis.Redis:
        """The client of this process (a new one, and a new consumer id, after fork)."""
        if os.getpid() != self._pid:
            _INHERITED.append((self._client, list(self._waiters)))
            self._client, self._lock = None, threading.Lock()
            self._reset(os.getpid())
        if self._client is None:
            with self._lock:
                if self._client is None:
                    client = connect(self.url, self.options)
                    self.db = int(client.connection_pool.connection_kwargs.get("db") or 0)
                    self._scripts = {name: (hashlib.sha1(text.encode()).hexdigest(), text)
                                     for name, text in {**_SCRIPTS, **LEASE_SCRIPTS}.items()}
                    self._client = client
        return self._client

    @property
    def consumer_id(self) -> str:  # type: ignore[override]
        """Owner name of our leases; a forked child gets its own."""
        self._redis()
        return self._consumer_id

    def _run(self, name: str, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        """EVALSHA (plain execute_command: redis-py's Script wrapper costs more than the
        round trip); the script is loaded once per server start (NOSCRIPT)."""
        client = self._redis()
        sha, text = self._scripts[name]
        with self._errors:
            try:
                return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                client.execute_command("SCRIPT", "LOAD", text)
                return client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    def _pipeline(self, transaction: bool, fill: Any) -> list[Any]:
        """``fill(pipe)`` then one round trip; OperationalError on failure."""
        client = self._redis()
        with self._errors, client.pipeline(transaction=transaction) as pipe:
            fill(pipe)
            return pipe.execute()

    @property
    def _notify_prefix(self) -> str:
        return f"qctl.notify.{self.db}."

    # -- queues ---------------------------------------------------------------------------

    def declare_queue(self, name: str, **arguments: Any) -> None:
        """Bind ``name`` in kombu's binding table of its exchange (default: the queue name)."""
        exchange = arguments.get("exchange") or name
        member = f"{arguments.get('routing_key') or name}{SEP}{SEP}{name}"
        self._pipeline(True, lambda pipe: (pipe.sadd(f"_kombu.binding.{exchange}", member),
                                           pipe.sadd(f"_kombu.binding_permanent.{exchange}", member)))

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """LPUSH kombu's envelope onto its band list (or into the delayed set) and wake idle
        qctl consumers; returns after Redis replied."""
        tag = str(uuid4())
        text = encode_envelope(envelope, priority, exchange or "", routing_key or queue, tag)
        band, channel = band_index(priority), self._notify_prefix + queue
        # On the list only when the ETA also travels in the headers (a Celery task message),
        # where a Celery worker honours it and a qctl worker defers it when it fetches it.
        if eta is not None and eta > time.time() and (
                self.publish_delayed or not (envelope.headers or {}).get("eta")):
            self._run("publish", [text, channel, tag, repr(float(eta)), band],
                      [f"qctl.delayed.{queue}", f"qctl.delayed_msgs.{queue}"])
        else:
            self._run("publish", [text, channel], [list_key(queue, band)])

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` messages in one script; when idle, wait on the notify channels."""
        queues = list(dict.fromkeys(queues))
        if not queues or limit <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        polled = False      # the last wait ended on the poll timer, not a notification or due time
        while True:
            got, wake = self._lease(queues, limit)
            got = self._defer_early(got)
            if got:
                if polled:  # a producer that does not notify (a Celery client): poll fast a while
                    self._fast_poll_until = time.monotonic() + _FAST_POLL_FOR
                self._pause_waiter()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            poll = self.poll_interval if time.monotonic() < self._fast_poll_until \
                else self.idle_poll_interval
            waiter = self._waiter()
            with self._errors:
                try:
                    if waiter.listen({self._notify_prefix + q for q in queues}):
                        continue        # subscribed now: look again, so no publish is missed
                    polled = not waiter.wait(min(left, poll, wake)) and poll < min(left, wake)
                except BaseException:
                    self._pause_waiter(drop=True)
                    raise

    def _defer_early(self, deliveries: list[Delivery]) -> list[Delivery]:
        """ETA messages not yet due (Celery clients, and qctl ones by default, put them
        straight on the list) move into the broker-side delayed set instead of being handed
        out: a worker never holds them, and the contract (nothing before its ETA) holds."""
        from ..protocol import parse_iso
        now, early = time.time() + self._clock_skew, []
        for delivery in deliveries:
            try:
                eta = parse_iso(delivery.envelope.headers.get("eta")) if delivery.envelope else None
            except Exception:  # noqa: BLE001 - a bad eta is the worker's to report
                eta = None
            if eta is not None and eta.timestamp() > now + _DEFER_AFTER:
                early.append((delivery.tag, repr(eta.timestamp())))
        if not early:
            return deliveries
        self._run("defer", [self.consumer_id, *(x for pair in early for x in pair)])
        deferred = {tag for tag, _ in early}
        with self._lock:
            for tag in deferred:
                self._held.pop(tag, None)
        return [d for d in deliveries if d.tag not in deferred]

    def _lease(self, queues: list[str], limit: int) -> tuple[list[Delivery], float]:
        """One run of the fetch script: (deliveries, seconds until something may be due)."""
        now = time.time()
        restore = now >= self._next_restore or (
            self._lease_due is not None and now + self._clock_skew >= self._lease_due)
        reply = self._run("fetch", [self._notify_prefix, repr(float(self.lease_seconds)), int(limit),
                                    self.consumer_id, "1" if restore else "0", *queues])
        if restore:     # whatever was due has just been given back
            self._next_restore, self._lease_due = now + _RESTORE_EVERY, None
        rows, server_now = reply[0], float(reply[1])
        self._clock_skew = server_now - now
        if rows:
            deliveries = [self._delivery(queues, *row) for row in rows]
            with self._lock:
                self._held.update((d.tag, None) for d in deliveries)
            return deliveries, 0.0
        self._lease_due = float(reply[3]) if reply[3] is not None else None
        due = [float(x) - server_now for x in reply[2:4] if x is not None]
        return [], max(min(due, default=3600.0), 0.0) + 0.001

    @staticmethod
    def _delivery(queues: list[str], tag: bytes, index: int, raw: bytes, count: int,
                  kombu: int) -> Delivery:
        delivery = Delivery(tag=_text(tag), queue=queues[int(index)], envelope=None,
                            delivery_count=int(count), redelivered=int(count) > 1,
                            routing_key=queues[int(index)])
        try:
            if not kombu:
                raise ValueError("not a kombu JSON message (an object with properties and a body)")
            delivery.envelope, delivery.exchange, routing_key, flag = decode_envelope(raw)
        except ValueError as exc:
            delivery.raw, delivery.error = bytes(raw), str(exc)
            return delivery
        delivery.routing_key = routing_key or delivery.queue
        delivery.redelivered = delivery.redelivered or flag
        return delivery

    def _waiter(self) -> _Waiter:
        waiter = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = _Waiter(self._redis())
            with self._lock:
                self._waiters.add(waiter)
        return waiter

    def _pause_waiter(self, drop: bool = False) -> None:
        """Unsubscribe this thread's waiter (busy now); close it when ``drop`` or broken."""
        waiter = getattr(self._local, "waiter", None)
        try:
            if waiter is not None and not drop:
                return waiter.pause()
        except (redis.RedisError, OSError):
            pass
        self._local.waiter = None
        if waiter is not None:
            with self._lock:
                self._waiters.discard(waiter)
            _close_quietly(waiter.pubsub)

    def _settle(self, script: str, tags: Iterable[Any], *args: Any) -> None:
        """Run ``script`` with ``args`` and our tags; they are no longer held by us."""
        tags = [str(tag) for tag in tags if tag is not None]
        if tags:
            self._run(script, [*args, *tags])
            with self._lock:
                for tag in tags:
                    self._held.pop(tag, None)

    def ack(self, tags: Iterable[Any]) -> None:
        """Delete our leased messages: one script run for all tags."""
        self._settle("ack", tags, self.consumer_id)

    def requeue(self, tags: Iterable[Any]) -> None:
        """Our leased messages back where they were (next out, in fetch order), redelivered:
        as on the other qctl brokers (kombu's reject would append them instead)."""
        self._settle("give_back", tags, self._notify_prefix, self.consumer_id)

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Move the leased message to ``qctl.dead`` (or store a copy of ``envelope``)."""
        copy_list, copy = "", b""
        if envelope is not None:
            priority = (envelope.properties or {}).get("priority") or 0
            copy_list = list_key(queue or "", band_index(priority))
            copy = encode_envelope(envelope, priority, "", queue or "", str(uuid4()))
        self._run("dead_letter", [self.consumer_id, "" if tag is None else str(tag), reason,
                                  repr(time.time()), copy_list, copy])
        with self._lock:
            self._held.pop(str(tag), None)

    def renew_leases(self) -> None:
        """Push out the deadline (and kombu's unacked_index time) of every lease we hold."""
        with self._lock:
            tags = list(self._held)
        for start in range(0, len(tags), _BATCH):
            lost = self._run("renew", [self.consumer_id, repr(float(self.lease_seconds)),
                                       *tags[start:start + _BATCH]])
            with self._lock:
                for tag in lost:
                    self._held.pop(_text(tag), None)

    def restore_expired(self) -> int:
        """Expired leases (of any consumer) back to the front of their lists."""
        total = 0
        while True:
            count = int(self._run("restore", [self._notify_prefix]))
            total += count
            if count < _BATCH:
                return total

    def release_all(self) -> int:
        """Everything this object holds back to the front of its list, in fetch order."""
        with self._lock:
            tags, self._held = list(self._held), {}
        if not tags:
            return 0
        return int(self._run("give_back", [self._notify_prefix, self.consumer_id, *tags]))

    def _queue_keys(self, queue: str) -> list[str]:
        return [*(list_key(queue, b) for b in range(4)), f"qctl.delayed.{queue}",
                f"qctl.delayed_msgs.{queue}"]

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; returns how many."""
        keys = self._queue_keys(queue)
        return sum(self._pipeline(True, lambda pipe: (
            [pipe.llen(key) for key in keys[:4]], pipe.zcard(keys[4]), pipe.delete(*keys)))[:5])

    def queue_size(self, queue: str) -> int:
        """LLEN of the list and its bands plus the delayed messages."""
        keys = self._queue_keys(queue)
        return sum(self._pipeline(False, lambda pipe: (
            [pipe.llen(key) for key in keys[:4]], pipe.zcard(keys[4]))))

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters first."""
        if limit <= 0:
            return []
        with self._errors:
            records = self._redis().lrange("qctl.dead", 0, int(limit) - 1)
        letters = []
        for item in records:
            try:
                record = json.loads(item)
                raw = record["envelope"].encode("utf-8") if isinstance(record.get("envelope"), str) \
                    else bytes.fromhex(record.get("raw_hex") or "")
            except (ValueError, TypeError, AttributeError):
                continue      # not a record of ours: leave it alone
            try:
                envelope = decode_envelope(raw)[0] if "envelope" in record else None
            except ValueError:
                envelope = None
            letters.append(DeadLetter(
                id=record.get("id"), queue=record.get("queue") or "", reason=record.get("reason") or "",
                died_at=float(record.get("died_at") or 0.0), envelope=envelope,
                raw=None if envelope is not None else raw))
        return letters

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Dead letters back to the end of their band list, delivery count reset."""
        if ids is None:
            return int(self._run("requeue_dead", [self._notify_prefix, "*"]))
        ids = [str(i) for i in ids]
        return int(self._run("requeue_dead", [self._notify_prefix, "", *ids])) if ids else 0

    def purge_dead(self) -> int:
        """Delete every dead letter."""
        return int(self._pipeline(True, lambda pipe: (pipe.llen("qctl.dead"),
                                                      pipe.delete("qctl.dead")))[0])

    # -- broadcast exchanges, reply mailboxes and the live-node registry ------------------

    def broadcast(self, exchange: str, message: ControlMessage) -> None:
        """``PUBLISH /<db>.<exchange>[/<routing key>] <kombu envelope>``: kombu's fanout over
        PUB/SUB. A pidbox request is persistent (delivery_mode 2), an event is not (1)."""
        routing_key = message.routing_key or ""
        text = encode_control(message, exchange, routing_key, 2 if is_pidbox(exchange) else 1,
                              str(uuid4()))
        client = self._redis()
        with self._errors:
            client.publish(fanout_topic(self.db, exchange, routing_key), text)

    def subscribe(self, exchange: str, pattern: str = "#", name: str | None = None) -> Subscription:
        """PSUBSCRIBE as kombu (``/<db>.celery.pidbox``, ``/<db>.celeryev/*``), confirmed by the
        server before this returns; with ``name``, also kombu's binding of that queue."""
        self._redis()
        return RedisSubscription(self, exchange, pattern, name)

    def _reply_binding(self, mailbox: str) -> tuple[str, str, str]:
        """(binding set, member, reply list) of ``mailbox``, in kombu's pidbox layout."""
        queue = f"{mailbox}.{self.reply_exchange}"
        return f"_kombu.binding.{self.reply_exchange}", f"{mailbox}{SEP}{SEP}{queue}", queue

    def open_mailbox(self, mailbox: str) -> None:
        """Bind ``<mailbox>.reply.celery.pidbox`` to exchange ``reply.celery.pidbox`` with
        routing key ``mailbox`` (kombu 5.7's refresh): without it Celery workers do not reply."""
        key, member, _queue = self._reply_binding(mailbox)
        self._run("bind", [key, member, self.reply_exchange, int(_BINDING_TTL * 1000)])

    def put_reply(self, mailbox: str, message: ControlMessage, ttl: float = 60.0) -> None:
        """Reply as a Celery worker does: LPUSH a kombu envelope onto every queue bound to
        ``reply.celery.pidbox`` with routing key ``mailbox`` (normally one); those lists expire
        ``ttl`` s after the last put. No binding (the client left): dropped."""
        text = encode_control(message, self.reply_exchange, mailbox, 1, str(uuid4()))
        self._run("put_reply", [f"_kombu.binding.{self.reply_exchange}", mailbox, text,
                                max(1, int(ttl * 1000))])

    def get_replies(self, mailbox: str, timeout: float) -> list[ControlMessage]:
        """BRPOP the reply list (and its priority bands, as kombu) up to ``timeout`` s for the
        first reply, then drain the rest without waiting. Undecodable entries are skipped."""
        queue = self._reply_binding(mailbox)[2]
        keys = [list_key(queue, band) for band in range(4)]
        client = self._redis()
        deadline = time.monotonic() + max(timeout, 0.0)
        replies: list[ControlMessage] = []
        with self._errors:
            while True:
                raw: list[bytes] = []
                while True:                 # drain, oldest first, plain list before the bands
                    with client.pipeline(transaction=False) as pipe:
                        for key in keys:
                            pipe.rpop(key, 100)
                        batches = pipe.execute()
                    got = [x for batch in batches if batch for x in batch]
                    if not got:
                        break
                    raw.extend(got)
                replies.extend(filter(None, (self._reply(mailbox, x) for x in raw)))
                left = deadline - time.monotonic()
                if replies or left <= 0:
                    return replies
                # BRPOP 0 would block forever: whole milliseconds, at least one.
                popped = client.brpop(keys, timeout=max(0.001, round(min(left, _MAX_BLOCK), 3)))
                if popped is not None:
                    replies.extend(filter(None, [self._reply(mailbox, popped[1])]))

    @staticmethod
    def _reply(mailbox: str, raw: bytes) -> ControlMessage | None:
        try:
            return decode_control(bytes(raw))
        except ValueError as exc:
            logger.debug("skipped a reply in mailbox %s that is not a kombu envelope: %s (%r)",
                         mailbox, exc, bytes(raw)[:200])
            return None

    def close_mailbox(self, mailbox: str) -> None:
        """Drop the binding (both of kombu's sets) and delete the reply lists. Idempotent."""
        key, member, queue = self._reply_binding(mailbox)
        self._pipeline(True, lambda pipe: (
            pipe.srem(key, member),
            pipe.srem(f"_kombu.binding_permanent.{self.reply_exchange}", member),
            pipe.delete(*(list_key(queue, band) for band in range(4)))))

    def announce_node(self, nodename: str, ttl: float) -> None:
        """``ZADD qctl.nodes <server now + ttl> nodename``; expired entries are dropped."""
        self._run("announce", [nodename, repr(float(ttl))])

    def forget_node(self, nodename: str) -> None:
        """``ZREM qctl.nodes nodename``. Idempotent."""
        self._pipeline(False, lambda pipe: pipe.zrem("qctl.nodes", nodename))

    def live_nodes(self) -> set[str] | None:
        """The members of ``qctl.nodes`` whose expiry is after the server's clock, plus the
        Celery nodes bound to the pidbox exchange (they announce nothing else; a dead one only
        makes a client wait for its timeout, as Celery's own client always does)."""
        live = {_text(name) for name in self._run("live_nodes", [])}
        exchange = f"{self.options.get('control_exchange', 'celery')}.pidbox"
        suffix = f".{exchange}"
        with self._errors:
            members = self._redis().smembers(f"_kombu.binding.{exchange}")
            known = {_text(name) for name in self._redis().zrange("qctl.nodes", 0, -1)}
        for member in members:
            queue = _text(member).rsplit(SEP, 1)[-1]
            node = queue[:-len(suffix)] if queue.endswith(suffix) else None
            if node and node not in known:
                live.add(node)
        return live

    # -- life cycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """PING; ``OperationalError`` when Redis does not answer."""
        client = self._redis()
        with self._errors:
            client.ping()

    def close(self) -> None:
        """Close this process's connections. Idempotent; the object reconnects on next use."""
        if os.getpid() != self._pid:
            self._redis()               # forked: only forget the parent's connections
            return
        with self._lock:
            waiters, self._waiters, client = list(self._waiters), weakref.WeakSet(), self._client
        self._local = threading.local()
        for waiter in waiters:
            _close_quietly(waiter.pubsub)
        if client is not None:
            try:
                client.connection_pool.disconnect()
            except (redis.RedisError, OSError):
                pass
