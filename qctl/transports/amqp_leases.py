"""Scheduler leases and fenced state on RabbitMQ (``qctl.transports.amqp``), which has no
key-value store: queues play both parts.

**A lease is an exclusive queue**, ``qctl.lease.<name>``: only one connection can declare it
(another's declare fails with 405 RESOURCE_LOCKED, which closes only that channel), and the
broker deletes it when that connection closes. Each transport object opens one connection per
lease name, apart from its publishing and consuming ones, with heartbeats every
``lease_heartbeat`` seconds (option or URL query parameter, default 10). So the lease is freed

- at once when the holder releases it or stops (the queue is deleted, then the connection
  closed) and as soon as the broker sees the TCP connection close when the holder is killed;
- after about two heartbeat intervals when the holder's host freezes or is cut off;
- within a second after ``ttl`` when the holder's process lives on but stopped renewing: the
  broker knows nothing of the ttl, so the transport's pump thread (which also keeps the
  heartbeats going) closes the lapsed lease's connection.

A standby keeps its connection and retries the declare on a new channel at each
``acquire_lease``: a few round trips, and a RESOURCE_LOCKED channel error in the broker's log
each time (RabbitMQ offers no quieter test). Renewing is a local check that the connection is
still open after reading what the broker sent.

**The holder's name.** Other connections cannot see who declared an exclusive queue, so the
new holder also writes its owner name into ``qctl.holder.<name>``. ``lease_holder`` answers
None when the lease queue does not exist, else that record (``"unknown"`` until the first one
is written; for a moment after a takeover, the previous holder's name).

**State** is the newest message of the durable queue ``qctl.state.<name>`` (``x-max-length``
1, ``x-overflow`` drop-head: each new message pushes the older one out). ``save_state``
publishes the JSON as a persistent message with an increasing ``x-qctl-seq`` header, with a
publisher confirm, *on the lease connection*: while that connection is open nobody else holds
the lease, and once it closed nothing more is published through it — that is the fence. When
the connection breaks during the publish the answer is False, though the broker may have
stored the state: the caller then does not send, which may skip one run but never repeats
one. ``load_state`` takes every message without acknowledging it on a channel it then closes,
which puts them back, and returns the one with the highest ``x-qctl-seq`` (two messages exist
only for a moment). While one reader holds the message another sees the queue empty: it
retries a few times before answering None.

Threads: each lease's connection has a lock that the calls and the pump thread take in turn.
After ``os.fork()`` the child opens its own connections: the parent's leases stay the parent's.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import pika
import pika.exceptions as pex

from ..exceptions import OperationalError
from . import check_lease_ttl, state_from_text, state_text
from .amqp_conn import _ERRORS, Link, connection_parameters, describe

UNKNOWN_HOLDER = "unknown"
_RECORD_ARGS = {"x-max-length": 1, "x-overflow": "drop-head"}
_SEQ = "x-qctl-seq"
_MAX_RECORDS = 100          # messages read per look; normally there is one
_EMPTY_RETRIES = (0.02, 0.05, 0.1)   # seconds between looks at a state queue found empty


def lease_queue(name: str) -> str:
    return f"qctl.lease.{name}"


def holder_queue(name: str) -> str:
    return f"qctl.holder.{name}"


def state_queue(name: str) -> str:
    return f"qctl.state.{name}"


class _Lease:
    """One lease name's connection. ``owner`` is set while this object holds the lease, until
    the monotonic time ``expires`` unless renewed; ``lock`` guards all of it."""

    __slots__ = ("lock", "link", "owner", "expires")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.link: Link | None = None
        self.owner: str | None = None
        self.expires = 0.0


def _close_channel(ch: Any) -> None:
    try:
        if ch is not None and ch.is_open:
            ch.close()
    except Exception:  # noqa: BLE001 - the connection may be gone too
        pass


def _read_records(ch: Any, queue: str) -> tuple[bool, int, bytes | None]:
    """(queue exists, highest seq, its body) of the messages now ready in ``queue``, taken
    without acknowledgement: closing ``ch`` puts them back."""
    try:
        ch.queue_declare(queue, passive=True)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False, 0, None
        raise
    best_seq, best = 0, None
    for _ in range(_MAX_RECORDS):
        method, props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        try:
            seq = int((props.headers or {}).get(_SEQ) or 0)
        except (TypeError, ValueError):
            seq = 0
        if best is None or seq >= best_seq:
            best_seq, best = seq, bytes(body)
    return True, best_seq, best


class AmqpLeases:
    """Mixed into ``AmqpTransport``: uses its URL and options, its publishing connection
    (``_with_pub``) for reads and its pump thread (``_start_pump``); owns the lease connections."""

    url: str
    options: dict[str, Any]
    _check_pid: Callable[[], None]
    _start_pump: Callable[[], None]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]

    def _reset_leases(self) -> None:
        """No leases (at start and in a forked child)."""
        self._leases: dict[str, _Lease] = {}
        self._leases_lock = threading.Lock()
        self._state_seq: dict[str, int] = {}      # name -> highest state seq seen or written

    def _lease_links(self) -> list[Link]:
        return [lease.link for lease in list(self._leases.values()) if lease.link is not None]

    def _lease(self, name: str) -> _Lease:
        with self._leases_lock:
            lease = self._leases.get(name)
            if lease is None:
                lease = self._leases[name] = _Lease()
            return lease

    def _lease_connect(self, lease: _Lease) -> Link:
        options = {**self.options, **dict(parse_qsl(urlsplit(self.url).query))}
        heartbeat = max(1, int(float(options.get("lease_heartbeat", 10))))
        conn = None
        try:
            conn = pika.BlockingConnection(connection_parameters(
                self.url, self.options, heartbeat=heartbeat, name="qctl lease"))
            link = Link(conn, True, lease.lock)
        except _ERRORS as exc:
            if conn is not None and conn.is_open:
                conn.close()
            raise OperationalError(describe(self.url, exc, "connect to")) from None
        self._start_pump()
        return link

    @staticmethod
    def _holds(lease: _Lease) -> bool:
        """True while ``lease`` is held through a connection that is still open (after
        reading what the broker sent it: a close, heartbeats). Called with its lock."""
        link = lease.link
        if lease.owner is None or link is None:
            return False
        try:
            link.service()
        except _ERRORS:
            pass
        return link.conn.is_open

    @staticmethod
    def _drop(lease: _Lease, name: str) -> None:
        """Give up whatever ``lease`` holds and close its connection. Called with its lock."""
        link, held = lease.link, lease.owner is not None
        lease.link, lease.owner = None, None
        if link is None:
            return
        if held:
            try:        # deleted before the close returns: a standby may take it at once
                if link.conn.is_open:
                    link.channel().queue_delete(lease_queue(name))
            except _ERRORS:
                pass
        link.close()

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Renew when this object holds it for ``owner`` through an open connection, else
        declare the exclusive queue (405: someone else has it)."""
        ttl = check_lease_ttl(ttl)
        self._check_pid()
        lease = self._lease(name)
        with lease.lock:
            if self._holds(lease):
                if lease.owner != owner:
                    if time.monotonic() < lease.expires:
                        return False
                    self._drop(lease, name)     # lapsed: free for anyone, ``owner`` included
                else:
                    lease.expires = time.monotonic() + ttl
                    return True
            elif lease.owner is not None:
                self._drop(lease, name)         # the connection broke: the broker freed it
            try:
                if lease.link is None or not lease.link.conn.is_open:
                    if lease.link is not None:
                        lease.link.close()
                    lease.link = None
                    lease.link = self._lease_connect(lease)
                lease.link.channel().queue_declare(lease_queue(name), durable=False,
                                                   exclusive=True, auto_delete=False)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == 405:
                    return False
                raise OperationalError(describe(self.url, exc, "take a lease on")) from None
            except _ERRORS as exc:
                self._drop(lease, name)
                raise OperationalError(describe(self.url, exc, "take a lease on")) from None
            lease.owner, lease.expires = owner, time.monotonic() + ttl
            try:
                self._put_record(lease.link, holder_queue(name), owner.encode("utf-8"),
                                 time.time_ns() // 1000, persistent=False)
            except (*_ERRORS, OperationalError) as exc:
                self._drop(lease, name)
                if isinstance(exc, OperationalError):
                    raise
                raise OperationalError(describe(self.url, exc, "take a lease on")) from None
            return True

    def release_lease(self, name: str, owner: str) -> None:
        """Delete the lease queue and close its connection if ``owner`` holds it here."""
        self._check_pid()
        lease = self._leases.get(name)
        if lease is None:
            return
        with lease.lock:
            if lease.owner == owner:
                self._drop(lease, name)

    def lease_holder(self, name: str) -> str | None:
        """Our owner when this object holds it; else None when the lease queue does not
        exist, or the name in ``qctl.holder.<name>`` (``"unknown"`` when there is none)."""
        self._check_pid()
        lease = self._leases.get(name)
        if lease is not None:
            with lease.lock:
                if self._holds(lease) and time.monotonic() < lease.expires:
                    return lease.owner

        def look(link: Link) -> str | None:
            ch = link.conn.channel()
            try:
                try:
                    ch.queue_declare(lease_queue(name), passive=True)
                except pex.ChannelClosedByBroker as exc:
                    if exc.reply_code == 404:
                        return None
                    if exc.reply_code != 405:      # 405: exclusive to another connection
                        raise
                    ch = link.conn.channel()
                _, _, body = _read_records(ch, holder_queue(name))
                return body.decode("utf-8", "replace") if body else UNKNOWN_HOLDER
            finally:
                _close_channel(ch)
        return self._with_pub("look up a lease on", look)

    def _latest_state(self, link: Link, name: str) -> tuple[int, bytes | None]:
        """(seq, body) of the newest state, looking again for a moment when the queue
        exists but seems empty (another reader holds the message)."""
        for pause in (*_EMPTY_RETRIES, None):
            ch = link.conn.channel()
            try:
                exists, seq, body = _read_records(ch, state_queue(name))
            finally:
                _close_channel(ch)
            if body is not None or not exists or pause is None:
                break
            time.sleep(pause)
        if seq:
            self._state_seq[name] = max(self._state_seq.get(name, 0), seq)
        return seq, body

    def load_state(self, name: str) -> dict | None:
        """The newest message of ``qctl.state.<name>``, left in the queue."""
        _, body = self._with_pub("read state on", lambda link: self._latest_state(link, name))
        return state_from_text(body)

    def save_state(self, name: str, owner: str, state: dict) -> bool:
        """A confirmed persistent publish on the lease connection, while it is open and the
        lease has not lapsed."""
        body = state_text(state).encode("utf-8")
        self._check_pid()
        lease = self._leases.get(name)
        if lease is None:
            return False
        with lease.lock:
            if lease.owner != owner or not self._holds(lease) or time.monotonic() >= lease.expires:
                return False
            link = lease.link
            assert link is not None
            try:
                if name not in self._state_seq:
                    self._latest_state(link, name)
                seq = max(self._state_seq.get(name, 0) + 1, time.time_ns() // 1000)
                self._put_record(link, state_queue(name), body, seq, persistent=True)
            except _ERRORS as exc:
                if not link.conn.is_open:
                    self._drop(lease, name)     # the lease went with the connection
                    return False
                raise OperationalError(describe(self.url, exc, "save state on")) from None
            self._state_seq[name] = seq
            return True

    def _put_record(self, link: Link, queue: str, body: bytes, seq: int, persistent: bool) -> None:
        """Confirmed publish of the newest record of ``queue`` (declared on first use)."""
        props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                     delivery_mode=2 if persistent else 1, headers={_SEQ: seq})
        for attempt in (0, 1):
            if queue not in link.declared:
                try:
                    link.channel().queue_declare(queue, durable=True, arguments=dict(_RECORD_ARGS))
                except pex.ChannelClosedByBroker as exc:
                    if exc.reply_code == 406:
                        raise OperationalError(
                            f"amqp: queue {queue!r} exists with other arguments ({exc.reply_text});"
                            " delete it to let qctl declare it") from None
                    raise
                link.declared.add(queue)
            try:
                link.channel().basic_publish("", queue, body, props, mandatory=True)
                return
            except pex.UnroutableError:
                if attempt:
                    raise
                link.declared.discard(queue)    # deleted behind our back: declare it again

    def _service_leases(self) -> None:
        """From the pump thread: heartbeats for idle lease connections, and closing the ones
        whose holder did not renew within its ttl."""
        for name, lease in list(self._leases.items()):
            if lease.link is None or not lease.lock.acquire(blocking=False):
                continue
            try:
                if lease.owner is not None and time.monotonic() >= lease.expires:
                    self._drop(lease, name)
                elif lease.link is not None:
                    lease.link.service()
            except Exception:  # noqa: BLE001 - its owner notices on next use
                pass
            finally:
                lease.lock.release()

    def _close_leases(self) -> None:
        """Give up every lease and close the lease connections."""
        with self._leases_lock:
            leases, self._leases = dict(self._leases), {}
        for name, lease in leases.items():
            if lease.lock.acquire(timeout=5):
                try:
                    self._drop(lease, name)
                finally:
                    lease.lock.release()
