"""An in-process broker (``memory://``) for tests and single-process use.

Transport objects created with the same URL in one process share their queues, broadcast
exchanges, reply mailboxes, live-node registry, and scheduler leases and state. Nothing
crosses process boundaries; a forked child sees a frozen copy and must not rely on it.
"""
from __future__ import annotations

import copy
import itertools
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Iterable, Sequence
from uuid import uuid4

from ..routing import topic_matches
from . import (ControlMessage, DeadLetter, Delivery, Envelope, Subscription, Transport,
               check_lease_ttl, state_from_text, state_text)


class _Message:
    __slots__ = ("id", "queue", "priority", "visible_at", "owner", "lease_until",
                 "delivery_count", "redelivered", "envelope", "exchange", "routing_key")

    def __init__(self, id: int, queue: str, priority: int, visible_at: float, envelope: Envelope,
                 exchange: str, routing_key: str) -> None:
        self.id, self.queue, self.priority, self.visible_at = id, queue, priority, visible_at
        self.envelope, self.exchange, self.routing_key = envelope, exchange, routing_key
        self.owner: str | None = None
        self.lease_until = 0.0
        self.delivery_count = 0
        self.redelivered = False


class _Broker:
    """The state shared by all transports of one URL; every field is guarded by ``cond``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.messages: dict[int, _Message] = {}             # id order == publish order
        self.dead: dict[int, tuple[DeadLetter, int]] = {}   # id -> (letter, priority)
        self.subscribers: dict[str, set[MemorySubscription]] = {}   # exchange -> subscribers
        self.mailboxes: dict[str, list[tuple[float, ControlMessage]]] = {}  # open ones only
        self.nodes: dict[str, float] = {}                    # nodename -> expires (wall time)
        self.leases: dict[str, tuple[str, float]] = {}       # name -> (owner, expires: monotonic)
        self.states: dict[str, str] = {}                     # name -> JSON text


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker(url: str) -> _Broker:
    key = url.rstrip("/")
    with _BROKERS_LOCK:
        return _BROKERS.setdefault(key, _Broker())


def _copy(envelope: Envelope) -> Envelope:
    # A private copy each way, as if it had been serialized: callers may mutate theirs.
    return Envelope(bytes(envelope.body), copy.deepcopy(envelope.headers),
                    copy.deepcopy(envelope.properties), envelope.content_type,
                    envelope.content_encoding)


def _copy_control(message: ControlMessage) -> ControlMessage:
    return ControlMessage(bytes(message.body), copy.deepcopy(dict(message.headers or {})),
                          message.routing_key or "")


class MemorySubscription(Subscription):
    """A per-subscriber buffer that ``broadcast`` appends matching messages to."""

    def __init__(self, broker: _Broker, exchange: str, pattern: str) -> None:
        self._broker = broker
        self.exchange, self.pattern = exchange, pattern
        self.pending: deque[ControlMessage] = deque()
        self.closed = False

    def matches(self, routing_key: str) -> bool:
        return self.pattern == "#" or topic_matches(self.pattern, routing_key)

    def get(self, timeout: float) -> list[ControlMessage]:
        """Messages broadcast since the last call; waits up to ``timeout`` s for the first."""
        with self._broker.cond:
            self._broker.cond.wait_for(lambda: self.pending or self.closed, max(timeout, 0.0))
            got = list(self.pending)
            self.pending.clear()
            return got

    def close(self) -> None:
        """Stop receiving (and wake a waiting ``get``). Idempotent."""
        with self._broker.cond:
            self.closed = True
            self.pending.clear()
            self._broker.subscribers.get(self.exchange, set()).discard(self)
            self._broker.cond.notify_all()


class MemoryTransport(Transport):
    """The transport contract over Python dicts and a ``threading.Condition``."""

    supports_delayed_delivery = True

    def __init__(self, url: str = "memory://", options: dict[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._broker = _broker(url)
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"

    # -- queues ---------------------------------------------------------------------------

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """Append a copy of ``envelope`` and wake the waiters."""
        b = self._broker
        with b.cond:
            msg = _Message(next(b.ids), queue, max(0, min(255, int(priority or 0))),
                           time.time() if eta is None else float(eta), _copy(envelope),
                           exchange or "", routing_key or "")
            b.messages[msg.id] = msg
            b.cond.notify_all()

    def _restore(self, now: float, queues: Sequence[str] | None = None) -> int:
        count = 0
        for msg in self._broker.messages.values():
            if msg.owner is not None and msg.lease_until <= now and (
                    queues is None or msg.queue in queues):
                msg.owner, msg.redelivered = None, True
                count += 1
        return count

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` ready messages, waiting on the condition until ``timeout``."""
        queues = list(dict.fromkeys(queues))
        if not queues or limit <= 0:
            return []
        rank = {q: n for n, q in enumerate(queues)}
        b = self._broker
        deadline = time.monotonic() + max(timeout, 0.0)
        with b.cond:
            while True:
                now = time.time()
                self._restore(now, rank)
                mine = [m for m in b.messages.values() if m.queue in rank]
                ready = sorted((m for m in mine if m.owner is None and m.visible_at <= now),
                               key=lambda m: (rank[m.queue], -m.priority, m.id))[:limit]
                if ready:
                    for m in ready:
                        m.owner, m.lease_until = self.consumer_id, now + self.lease_seconds
                        m.delivery_count += 1
                    return [Delivery(tag=m.id, queue=m.queue, envelope=_copy(m.envelope),
                                     redelivered=m.redelivered, delivery_count=m.delivery_count,
                                     exchange=m.exchange, routing_key=m.routing_key)
                            for m in ready]
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                # Wake for the next delayed message or lease expiry too, not only publishes.
                due = [m.visible_at if m.owner is None else m.lease_until for m in mine]
                if due:
                    left = min(left, max(min(due) - now, 0.001))
                b.cond.wait(left)

    def _mine(self, tags: Iterable[Any], unowned_ok: bool = False) -> list[_Message]:
        found = []
        for tag in tags:
            msg = self._broker.messages.get(tag)
            if msg is not None and (msg.owner == self.consumer_id or
                                    (unowned_ok and msg.owner is None)):
                found.append(msg)
        return found

    def ack(self, tags: Iterable[Any]) -> None:
        """Forget our leased messages (also ones whose lease lapsed but nobody re-took)."""
        with self._broker.cond:
            for msg in self._mine(tags, unowned_ok=True):
                del self._broker.messages[msg.id]

    def requeue(self, tags: Iterable[Any]) -> None:
        """Give our leased messages back, deliverable now, marked redelivered."""
        b = self._broker
        with b.cond:
            for msg in self._mine(tags):
                msg.owner, msg.visible_at, msg.redelivered = None, time.time(), True
            b.cond.notify_all()

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Move our leased message (or a copy of ``envelope``) to the dead letters."""
        b = self._broker
        with b.cond:
            if tag is not None:
                found = self._mine([tag], unowned_ok=True)
                if found:
                    msg = b.messages.pop(found[0].id)
                    self._bury(msg.queue, reason, msg.envelope, msg.priority)
                    return
                if tag in b.messages:
                    return      # another consumer holds it now; it is theirs to settle
            if envelope is not None:
                self._bury(queue or "", reason, _copy(envelope),
                           int(envelope.properties.get("priority") or 0))

    def _bury(self, queue: str, reason: str, envelope: Envelope, priority: int) -> None:
        letter = DeadLetter(next(self._broker.ids), queue, reason, time.time(), envelope)
        self._broker.dead[letter.id] = (letter, priority)

    def renew_leases(self) -> None:
        """Push out the lease of every message we hold."""
        with self._broker.cond:
            until = time.time() + self.lease_seconds
            for msg in self._broker.messages.values():
                if msg.owner == self.consumer_id:
                    msg.lease_until = until

    def restore_expired(self) -> int:
        """Expired leases back to ready."""
        with self._broker.cond:
            count = self._restore(time.time())
            self._broker.cond.notify_all()
            return count

    def release_all(self) -> int:
        """Everything we hold back to ready, marked redelivered."""
        b = self._broker
        with b.cond:
            mine = [m for m in b.messages.values() if m.owner == self.consumer_id]
            for msg in mine:
                msg.owner, msg.redelivered = None, True
            b.cond.notify_all()
            return len(mine)

    def purge(self, queue: str) -> int:
        """Delete the unleased messages of ``queue``."""
        b = self._broker
        with b.cond:
            gone = [m.id for m in b.messages.values() if m.queue == queue and m.owner is None]
            for tag in gone:
                del b.messages[tag]
            return len(gone)

    def queue_size(self, queue: str) -> int:
        """Ready plus delayed (unleased) messages of ``queue``."""
        with self._broker.cond:
            return sum(1 for m in self._broker.messages.values()
                       if m.queue == queue and m.owner is None)

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters first."""
        with self._broker.cond:
            letters = list(self._broker.dead.values())[:limit]
            return [DeadLetter(d.id, d.queue, d.reason, d.died_at, _copy(d.envelope))
                    for d, _ in letters]

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Dead letters back into their queues, visible now."""
        b = self._broker
        with b.cond:
            chosen = list(b.dead) if ids is None else [i for i in ids if i in b.dead]
            for dead_id in chosen:
                letter, priority = b.dead.pop(dead_id)
                msg = _Message(next(b.ids), letter.queue, priority, time.time(),
                               letter.envelope, "", letter.queue)
                b.messages[msg.id] = msg
            b.cond.notify_all()
            return len(chosen)

    def purge_dead(self) -> int:
        """Delete every dead letter."""
        with self._broker.cond:
            count = len(self._broker.dead)
            self._broker.dead.clear()
            return count

    # -- broadcast exchanges, reply mailboxes and the live-node registry ------------------

    def broadcast(self, exchange: str, message: ControlMessage) -> None:
        """Append a copy of ``message`` to every current subscriber whose pattern matches."""
        b = self._broker
        key = message.routing_key or ""
        with b.cond:
            for sub in b.subscribers.get(exchange, ()):
                if sub.matches(key):
                    sub.pending.append(_copy_control(message))
            b.cond.notify_all()

    def subscribe(self, exchange: str, pattern: str = "#", name: str | None = None) -> Subscription:
        """A buffer that receives what is broadcast from now on (``name`` is not needed here)."""
        b = self._broker
        sub = MemorySubscription(b, exchange, pattern)
        with b.cond:
            b.subscribers.setdefault(exchange, set()).add(sub)
        return sub

    def open_mailbox(self, mailbox: str) -> None:
        """Create ``mailbox``; replies to it are kept from now on. Idempotent."""
        with self._broker.cond:
            self._broker.mailboxes.setdefault(mailbox, [])

    def put_reply(self, mailbox: str, message: ControlMessage, ttl: float = 60.0) -> None:
        """Leave a copy of ``message`` until ``ttl`` s from now; dropped unless ``mailbox`` is open."""
        b = self._broker
        with b.cond:
            box = b.mailboxes.get(mailbox)
            if box is None:
                return
            box.append((time.time() + ttl, _copy_control(message)))
            b.cond.notify_all()

    def get_replies(self, mailbox: str, timeout: float) -> list[ControlMessage]:
        """Take the unexpired replies, waiting up to ``timeout`` s for the first."""
        b = self._broker

        def live() -> list[tuple[float, ControlMessage]]:
            box = b.mailboxes.get(mailbox)
            if not box:
                return []
            now = time.time()
            box[:] = [r for r in box if r[0] >= now]
            return box

        with b.cond:
            b.cond.wait_for(live, max(timeout, 0.0))
            box = live()
            taken = [message for _, message in box]
            box.clear()
            return taken

    def close_mailbox(self, mailbox: str) -> None:
        """Delete ``mailbox`` and its unread replies. Idempotent."""
        with self._broker.cond:
            self._broker.mailboxes.pop(mailbox, None)

    def announce_node(self, nodename: str, ttl: float) -> None:
        """``nodename`` is alive until ``ttl`` s from now."""
        with self._broker.cond:
            self._broker.nodes[nodename] = time.time() + ttl

    def forget_node(self, nodename: str) -> None:
        """Drop ``nodename`` from the registry. Idempotent."""
        with self._broker.cond:
            self._broker.nodes.pop(nodename, None)

    def live_nodes(self) -> set[str] | None:
        """The announced nodes whose ttl has not run out."""
        with self._broker.cond:
            now = time.time()
            nodes = self._broker.nodes
            for gone in [n for n, expires in nodes.items() if expires <= now]:
                del nodes[gone]
            return set(nodes)

    # -- leader leases and fenced state -----------------------------------------------------

    def _holder(self, name: str) -> str | None:
        held = self._broker.leases.get(name)
        if held is not None and held[1] > time.monotonic():
            return held[0]
        return None

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lease when free, expired or ours; expiry on the monotonic clock."""
        ttl = check_lease_ttl(ttl)
        with self._broker.cond:
            holder = self._holder(name)
            if holder is not None and holder != owner:
                return False
            self._broker.leases[name] = (owner, time.monotonic() + ttl)
            return True

    def release_lease(self, name: str, owner: str) -> None:
        """Drop the lease if ``owner`` holds it."""
        with self._broker.cond:
            if self._holder(name) == owner:
                del self._broker.leases[name]

    def lease_holder(self, name: str) -> str | None:
        """The owner of the unexpired lease ``name``."""
        with self._broker.cond:
            return self._holder(name)

    def load_state(self, name: str) -> dict | None:
        """A fresh copy of the stored state."""
        with self._broker.cond:
            text = self._broker.states.get(name)
        return state_from_text(text)

    def save_state(self, name: str, owner: str, state: dict) -> bool:
        """Store a copy (as JSON text, as the other brokers do) under the same lock that
        guards the lease."""
        text = state_text(state)
        with self._broker.cond:
            if self._holder(name) != owner:
                return False
            self._broker.states[name] = text
            return True
