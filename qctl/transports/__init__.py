"""The broker interface every transport implements, and ``by_url()`` to pick one.

A transport moves *envelopes* (headers, properties, body bytes) between named queues. It knows
nothing about tasks: building and reading task messages is ``qctl.protocol``'s job, and
deciding which queue a task goes to is ``qctl.routing``'s. Client libraries (redis, pika) are
imported only by the module of the transport that needs them, and that module is imported
only when a URL asks for it.

Every method may be called from several threads of one process at once; implementations make
that safe (one connection per thread, or a lock). After ``os.fork()`` a transport object must
not be used by the child: create a new one (``App`` does this for you).
"""
from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..exceptions import ImproperlyConfigured

#: How long a fetched, unacknowledged message stays leased to its consumer before another
#: consumer may take it back. Live consumers renew their leases much more often than this
#: (``renew_leases``), so it bounds only how long a dead worker's messages stay invisible.
DEFAULT_LEASE_SECONDS = 30.0


@dataclass
class Envelope:
    """One message as the broker stores it. ``body`` is already serialized (and compressed)."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    content_encoding: str = "utf-8"


@dataclass
class Delivery:
    """A message leased to this consumer by ``fetch``.

    ``tag`` is the transport's handle for ``ack``/``requeue``/``dead_letter``. When the stored
    message could not even be split into headers and body, ``envelope`` is ``None``,
    ``raw`` holds what was stored and ``error`` says what is wrong: the consumer dead-letters it.
    """

    tag: Any
    queue: str
    envelope: Envelope | None
    redelivered: bool = False
    delivery_count: int = 1
    raw: bytes | None = None
    error: str | None = None
    exchange: str = ""
    routing_key: str = ""


@dataclass
class DeadLetter:
    """A message the workers gave up on, with the reason."""

    id: Any
    queue: str
    reason: str
    died_at: float
    envelope: Envelope | None
    raw: bytes | None = None


@dataclass
class ControlMessage:
    """A remote-control request or reply, or an event: a JSON ``body`` with ``headers``.

    Requests carry headers ``clock`` and ``expires``, replies ``ticket`` and ``clock`` (Celery's
    pidbox). ``routing_key`` matters for events (``worker.heartbeat``, ``task.succeeded``…)."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""


class Subscription:
    """A subscriber's view of a broadcast exchange: each subscriber receives every message
    broadcast after it subscribed (and matching its pattern), once."""

    def get(self, timeout: float) -> list[ControlMessage]:
        """Messages broadcast since the last call; waits up to ``timeout`` s for the first."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        raise NotImplementedError


class Transport:
    """The broker contract. Implementations are in this package, one module per scheme."""

    #: True when ``publish(eta=...)`` keeps the message invisible in the broker until then, so
    #: a worker never has to hold it. When False, the worker holds ETA messages itself.
    supports_delayed_delivery: bool = False

    #: Name of this consumer: the owner of the leases it takes. Unique per transport object.
    consumer_id: str

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})

    # -- queues ---------------------------------------------------------------------------

    def declare_queue(self, name: str, **arguments: Any) -> None:
        """Make sure queue ``name`` exists. Idempotent; a no-op where queues need no declaring."""

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """Store ``envelope`` in ``queue``; return only once the broker has it (committed,
        acknowledged). ``priority`` 0..255, higher first (the AMQP convention; the Redis
        transport maps it onto kombu's inverted lists). ``eta`` is a UNIX time before which
        the message must not be delivered. Raises ``OperationalError`` when the broker cannot
        take it; never drops it silently."""
        raise NotImplementedError

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` deliverable messages from ``queues`` (earlier queues first,
        then higher priority, then oldest) to this consumer, atomically: a fetched message is
        always either still in the broker under our lease or in the returned list. Waits up to
        ``timeout`` s when none is ready; returns ``[]`` then. Each lease lasts
        ``lease_seconds`` unless renewed."""
        raise NotImplementedError

    def ack(self, tags: Iterable[Any]) -> None:
        """Delete these leased messages for good. Idempotent for tags already gone."""
        raise NotImplementedError

    def ack_and_store(self, tags: Sequence[Any], backend: Any,
                      results: Sequence[tuple[str, bytes, str]]) -> None:
        """Store ``results`` (``backend.set_many``), then ack ``tags``. A transport that shares
        its store with the backend may do both in one transaction; never acks first."""
        if results:
            backend.set_many(results)
        if tags:
            self.ack(tags)

    def requeue(self, tags: Iterable[Any]) -> None:
        """Give these leased messages back, deliverable now, marked redelivered."""
        raise NotImplementedError

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Move a leased message into the dead-letter store with ``reason``. When the message
        was already acknowledged (``tag`` is None), ``envelope`` and ``queue`` describe it and
        a copy is stored."""
        raise NotImplementedError

    def renew_leases(self) -> None:
        """Extend the leases of every message this consumer holds. Called by the worker's
        heartbeat well within ``lease_seconds``."""

    def restore_expired(self) -> int:
        """Make messages whose lease ran out deliverable again (their consumer died). Returns
        how many. Safe to call from any consumer at any time."""
        return 0

    def release_all(self) -> int:
        """Give back every message this consumer still holds (warm shutdown). Returns how many."""
        return 0

    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue``; returns how many."""
        raise NotImplementedError

    def queue_size(self, queue: str) -> int:
        """Number of messages in ``queue`` that are ready or delayed (not leased)."""
        raise NotImplementedError

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters first."""
        raise NotImplementedError

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Put dead letters back on their queue (all when ``ids`` is None); returns how many."""
        raise NotImplementedError

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many."""
        raise NotImplementedError

    # -- broadcast exchanges and reply mailboxes (remote control, events) ------------------
    #
    # Names are Celery's so that Celery peers interoperate: control requests go to the fanout
    # exchange ``celery.pidbox`` (``<control_exchange>.pidbox``), events to ``celeryev`` with
    # routing keys such as ``worker.heartbeat``; a client's replies come back to its mailbox,
    # Celery's queue ``<mailbox>.reply.celery.pidbox`` behind exchange ``reply.celery.pidbox``.
    # On Redis and AMQP the messages are encoded exactly as kombu does (§3, §6 of the wire notes).

    def broadcast(self, exchange: str, message: ControlMessage) -> None:
        """Deliver ``message`` to every current subscriber of ``exchange`` whose pattern
        matches ``message.routing_key``. Fire and forget: no subscriber, no error."""
        raise NotImplementedError

    def subscribe(self, exchange: str, pattern: str = "#", name: str | None = None) -> Subscription:
        """Start receiving what is broadcast on ``exchange`` from now on. ``pattern`` is an
        AMQP topic pattern on the routing key (``#`` all, ``worker.*``); ``name`` names this
        subscriber's queue where the broker has one (AMQP: ``<node>.celery.pidbox``)."""
        raise NotImplementedError

    def open_mailbox(self, mailbox: str) -> None:
        """Create ``mailbox`` (and, on Redis, its binding) before asking anything, so that
        replies sent at once are kept. Idempotent."""

    def put_reply(self, mailbox: str, message: ControlMessage, ttl: float = 60.0) -> None:
        """Leave a reply in ``mailbox`` for its one reader; unread replies expire after ``ttl``.
        A mailbox that does not exist (its client left) drops it silently."""
        raise NotImplementedError

    def get_replies(self, mailbox: str, timeout: float) -> list[ControlMessage]:
        """Take what waits in ``mailbox``; waits up to ``timeout`` s for the first reply."""
        raise NotImplementedError

    def close_mailbox(self, mailbox: str) -> None:
        """Delete ``mailbox`` and what is left in it. Idempotent."""

    def announce_node(self, nodename: str, ttl: float) -> None:
        """Record that worker ``nodename`` is alive for the next ``ttl`` s (its heartbeat)."""

    def forget_node(self, nodename: str) -> None:
        """``nodename`` stopped (clean shutdown). Idempotent."""

    def live_nodes(self) -> set[str] | None:
        """The nodes announced and not expired, or None when this broker cannot tell (the
        control client then waits for its timeout, as Celery always does)."""
        return None

    # -- leader leases and fenced state (the periodic-task scheduler) ----------------------
    #
    # Several schedulers may run against one broker; only the holder of a named lease sends.
    # The holder writes its state (what it is about to send) with ``save_state`` before it
    # sends, and the write is refused once the lease is lost, so a new holder never repeats
    # what an old one sent. Owners are names chosen by the caller (host, pid and a random
    # part), compared exactly; each owner uses one transport object (on AMQP a lease belongs
    # to the connection of the object that took it).

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``owner`` for ``ttl`` seconds. True when
        ``owner`` holds it afterwards; False when another live owner holds it. Never blocks
        longer than a broker round trip (plus a connect the first time). A lease whose holder
        did not renew within its ttl is free. Renewing extends from now. ``ttl`` must be > 0."""
        raise NotImplementedError

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (a clean stop: a standby takes over at
        once). Does nothing when ``owner`` does not hold it."""
        raise NotImplementedError

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: nobody): for logs and listings, not for decisions
        (it may change right after the answer)."""
        raise NotImplementedError

    def load_state(self, name: str) -> dict | None:
        """The JSON-able dict last stored by ``save_state`` under ``name``, or None."""
        raise NotImplementedError

    def save_state(self, name: str, owner: str, state: dict) -> bool:
        """Store ``state`` (a JSON-able dict) under ``name`` only if ``owner`` holds the lease
        ``name`` right now, checked atomically with the write where the broker allows: a
        holder that lost its lease must not overwrite the new holder's state. False when not
        stored because the lease is not held. Durable when it returns True (committed,
        acknowledged by the broker). Raises ``OperationalError`` when the broker cannot be
        reached, ``TypeError``/``ValueError`` when ``state`` is not a JSON-able dict."""
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Raise ``OperationalError`` unless the broker answers."""

    def close(self) -> None:
        """Release connections. Idempotent."""

    @property
    def lease_seconds(self) -> float:
        value = self.options.get("visibility_timeout", self.options.get("lease_seconds"))
        return float(value) if value else DEFAULT_LEASE_SECONDS


_SCHEMES = {
    "memory": "qctl.transports.memory:MemoryTransport",
    "sqlite": "qctl.transports.sqlite:SqliteTransport",
    "redis": "qctl.transports.redis:RedisTransport",
    "rediss": "qctl.transports.redis:RedisTransport",
    "amqp": "qctl.transports.amqp:AmqpTransport",
    "amqps": "qctl.transports.amqp:AmqpTransport",
    "pyamqp": "qctl.transports.amqp:AmqpTransport",
}


def scheme_of(url: str) -> str:
    if "://" not in url:
        raise ImproperlyConfigured(f"not a broker URL: {_masked(url)!r} (expected e.g. sqlite:///qctl.sqlite3)")
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def load_class(table: dict[str, str], url: str, what: str) -> type:
    scheme = scheme_of(url)
    if scheme not in table:
        known = ", ".join(sorted(table))
        raise ImproperlyConfigured(f"unknown {what} scheme {scheme!r} in {_masked(url)!r} (known: {known})")
    module_name, _, attr = table[scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImproperlyConfigured(f"the {scheme}:// {what} is not available: {exc}") from exc
    return getattr(module, attr)


def _masked(url: str) -> str:
    from ..conf import mask_url
    return mask_url(url)


def by_url(url: str, options: dict[str, Any] | None = None) -> Transport:
    """A new transport for ``url`` (its module imported only now)."""
    return load_class(_SCHEMES, url, "broker")(url, options)


def now() -> float:
    return time.time()


def check_lease_ttl(ttl: float) -> float:
    """``ttl`` as a float; ``ValueError`` unless it is a positive number of seconds."""
    value = float(ttl)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
    return value


def state_text(state: dict) -> str:
    """``state`` as the JSON text transports store; ``TypeError`` unless it is a JSON-able dict."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, not {type(state).__name__}")
    return json.dumps(state, sort_keys=True, allow_nan=False)


def state_from_text(text: str | bytes | None) -> dict | None:
    """A stored state back as a dict; None for nothing stored or text that is not a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        value = None
    if not isinstance(value, dict):
        # A scheduler that cannot start is worse than one starting without its history.
        logging.getLogger(__name__).warning(
            "stored scheduler state is not a JSON object; ignored: %.200r", text)
        return None
    return value
