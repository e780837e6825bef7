"""The embedded default broker: every queue in one SQLite file (``sqlite:///qctl.sqlite3``).

URLs: ``sqlite:///rel/path.db`` (relative to the working directory), ``sqlite:////abs/path.db``,
or ``sqlite://`` alone for ``qctl.sqlite3`` in the working directory. Query parameters
(``?synchronous=FULL``) are defaults for the options. Options: ``synchronous`` (default
NORMAL), ``busy_timeout`` (ms, default 30000), ``poll_interval`` (s, default 0.002),
``visibility_timeout`` (lease seconds).

Schema (created ``IF NOT EXISTS`` on first connect)::

    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, priority INTEGER NOT NULL,
        visible_at REAL NOT NULL, lease_owner TEXT NULL, lease_until REAL NULL,
        delivery_count INTEGER NOT NULL DEFAULT 0, redelivered INTEGER NOT NULL DEFAULT 0,
        exchange TEXT, routing_key TEXT, headers TEXT, properties TEXT,
        content_type TEXT, content_encoding TEXT, body BLOB, created REAL);
    -- fetch: walk the queue's unleased rows in delivery order, skipping delayed ones in the index
    CREATE INDEX messages_ready ON messages (queue, priority DESC, id, visible_at)
        WHERE lease_owner IS NULL;
    -- idle waiting: earliest visible_at of a queue in O(log n); also queue_size
    CREATE INDEX messages_due ON messages (queue, visible_at) WHERE lease_owner IS NULL;
    -- ack/renew/release/restore: only the (few) leased rows
    CREATE INDEX messages_leased ON messages (lease_owner, lease_until)
        WHERE lease_owner IS NOT NULL;
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, reason TEXT, died_at REAL,
        headers TEXT, properties TEXT, content_type TEXT, content_encoding TEXT, body BLOB,
        exchange TEXT, routing_key TEXT, priority INTEGER NOT NULL DEFAULT 0);
    -- broadcasts: each subscriber reads the rows above its cursor (the top id when it
    -- subscribed) whose routing key matches its topic pattern; rows are deleted after 60 s
    CREATE TABLE control_broadcasts (id INTEGER PRIMARY KEY AUTOINCREMENT, exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL DEFAULT '', headers TEXT, body BLOB, created REAL);
    CREATE INDEX control_broadcasts_exchange ON control_broadcasts (exchange, id);
    -- open reply mailboxes (replies to others are dropped); forgotten after a day unused
    CREATE TABLE mailboxes (name TEXT PRIMARY KEY, touched REAL);
    CREATE TABLE control_replies (id INTEGER PRIMARY KEY AUTOINCREMENT, mailbox TEXT NOT NULL,
        routing_key TEXT NOT NULL DEFAULT '', headers TEXT, body BLOB, expires REAL);
    CREATE INDEX control_replies_mailbox ON control_replies (mailbox, id);
    CREATE TABLE nodes (name TEXT PRIMARY KEY, expires REAL);   -- the live-node registry
    -- scheduler leases and their fenced state: see qctl.transports.sqlite_leases
    CREATE TABLE qctl_leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
    CREATE TABLE qctl_state (name TEXT PRIMARY KEY, data TEXT NOT NULL, updated_at REAL NOT NULL);

``headers`` columns hold JSON objects. Files of older versions also have tables ``broadcasts``
and ``replies`` (bytes only): no longer used, and left for older processes still on the file.

Idle consumers never take the write lock: they poll ``PRAGMA data_version`` (a shared-memory
read in WAL mode that changes when another connection commits) and run the leasing
transaction only when something changed or a delayed message / lease expiry is due.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qsl
from uuid import uuid4

from ..exceptions import ImproperlyConfigured, OperationalError
from ..routing import topic_matches
from . import ControlMessage, DeadLetter, Delivery, Envelope, Subscription, Transport
from .sqlite_leases import LEASE_SCHEMA, SqliteLeases

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, priority INTEGER NOT NULL,
    visible_at REAL NOT NULL, lease_owner TEXT NULL, lease_until REAL NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0, redelivered INTEGER NOT NULL DEFAULT 0,
    exchange TEXT, routing_key TEXT, headers TEXT, properties TEXT,
    content_type TEXT, content_encoding TEXT, body BLOB, created REAL);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, id, visible_at)
    WHERE lease_owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_due ON messages (queue, visible_at) WHERE lease_owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_leased ON messages (lease_owner, lease_until)
    WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, reason TEXT, died_at REAL,
    headers TEXT, properties TEXT, content_type TEXT, content_encoding TEXT, body BLOB,
    exchange TEXT, routing_key TEXT, priority INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS control_broadcasts (id INTEGER PRIMARY KEY AUTOINCREMENT, exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL DEFAULT '', headers TEXT, body BLOB, created REAL);
CREATE INDEX IF NOT EXISTS control_broadcasts_exchange ON control_broadcasts (exchange, id);
CREATE TABLE IF NOT EXISTS mailboxes (name TEXT PRIMARY KEY, touched REAL);
CREATE TABLE IF NOT EXISTS control_replies (id INTEGER PRIMARY KEY AUTOINCREMENT, mailbox TEXT NOT NULL,
    routing_key TEXT NOT NULL DEFAULT '', headers TEXT, body BLOB, expires REAL);
CREATE INDEX IF NOT EXISTS control_replies_mailbox ON control_replies (mailbox, id);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, expires REAL);
""" + LEASE_SCHEMA

DEFAULT_FILE = "qctl.sqlite3"
_SYNCHRONOUS = {"OFF", "NORMAL", "FULL", "EXTRA", "0", "1", "2", "3"}
_CHUNK = 500            # ids per IN (...) list; far below SQLITE_MAX_VARIABLE_NUMBER
_LOCK_RETRIES = 5
_BROADCAST_POLL = 0.02  # seconds between looks for new broadcasts
_IDLE_RECHECK = 1.0     # seconds between cheap re-checks while idle (clock jumps, missed wakes)
_BROADCAST_KEEP = 60.0  # seconds a broadcast row stays for subscribers that have not read it
_MAILBOX_IDLE = 86400.0 # an open mailbox neither re-opened nor read for this long is forgotten
_MESSAGE_COLUMNS = ("id, queue, redelivered, delivery_count, exchange, routing_key, headers, "
                    "properties, content_type, content_encoding, body")

# Connections a forked child inherited from its parent. They are kept referenced forever so
# that garbage collection never closes them in the child: closing SQLite handles that were
# opened in another process can corrupt that process's locks.
_INHERITED: list[sqlite3.Connection] = []
#: One write lock per file and process: threads of one process take turns in Python rather
#: than in SQLite's busy handler, which sleeps whole milliseconds between attempts.
_WRITE_LOCKS: dict[tuple[int, str], threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str) -> threading.Lock:
    key = (os.getpid(), path)
    lock = _WRITE_LOCKS.get(key)
    if lock is None:
        with _WRITE_LOCKS_GUARD:
            lock = _WRITE_LOCKS.setdefault(key, threading.Lock())
    return lock


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The absolute database path of a ``sqlite://`` URL and its query parameters."""
    if "://" not in url:
        raise ImproperlyConfigured(f"not a sqlite URL: {url!r}")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    params = dict(parse_qsl(query))
    if rest in ("", "/"):
        path = DEFAULT_FILE
    elif rest.startswith("/"):
        path = rest[1:]          # sqlite:///rel -> rel ; sqlite:////abs -> /abs
    else:
        raise ImproperlyConfigured(
            f"bad sqlite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db")
    if path == ":memory:":
        raise ImproperlyConfigured("sqlite :memory: cannot be shared between connections; use memory://")
    return os.path.abspath(path), params


def path_from_url(url: str) -> str:
    """The absolute database file named by a ``sqlite://`` URL."""
    return split_url(url)[0]


def _is_locked(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (5, 6) or "locked" in str(exc) or "busy" in str(exc)


def describe(path: str, exc: BaseException, what: str) -> str:
    """A one-line message for a failed SQLite operation, naming the file."""
    detail = str(exc) or type(exc).__name__
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        detail += f" (directory {folder} does not exist)"
    elif os.path.isdir(path):
        detail += " (it is a directory)"
    return f"sqlite {what} {path}: {detail}"


def connect(path: str, options: dict[str, Any]) -> sqlite3.Connection:
    """A new autocommit connection to ``path`` with WAL, busy timeout and synchronous set."""
    sync = str(options.get("synchronous", "NORMAL")).upper()
    if sync not in _SYNCHRONOUS:
        raise ImproperlyConfigured(f"bad sqlite synchronous option {sync!r} (OFF, NORMAL, FULL, EXTRA)")
    busy_ms = int(options.get("busy_timeout", 30000))
    conn = sqlite3.connect(path, timeout=busy_ms / 1000.0, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute(f"PRAGMA synchronous={sync}")
    except BaseException:
        conn.close()
        raise
    return conn


class Database:
    """Connections to one SQLite file: one per thread and per process, opened on first use."""

    def __init__(self, path: str, options: dict[str, Any], schema: str, what: str = "broker") -> None:
        self.path = path
        self._lock_key = os.path.abspath(path)
        self.options = options
        self.schema = schema
        self.what = what
        self.poll_interval = float(options.get("poll_interval", 0.002))
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0          # bumped by close(): threads then reopen lazily
        self._schema_pid = 0

    def _after_fork(self) -> None:
        # The parent's connections (and possibly its held lock) must not be touched here.
        _INHERITED.extend(self._conns)
        self._conns = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one in a new thread or after fork or close)."""
        pid = os.getpid()
        if pid != self._pid:
            self._after_fork()
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == pid and local.generation == self._generation:
            return conn
        conn = self._retrying(self._open)
        local.conn, local.pid, local.generation = conn, pid, self._generation
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.path, self.options)
        try:
            if self._schema_pid != os.getpid():
                conn.executescript("BEGIN IMMEDIATE;" + self.schema + "COMMIT;")
                self._schema_pid = os.getpid()
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            conn.close()
            raise
        with self._lock:
            self._conns.append(conn)
        return conn

    def _retrying(self, fn: Callable[..., Any], *args: Any) -> Any:
        for attempt in range(_LOCK_RETRIES):
            try:
                return fn(*args)
            except sqlite3.OperationalError as exc:
                if _is_locked(exc) and attempt < _LOCK_RETRIES - 1:
                    time.sleep(0.01 * (attempt + 1))
                    continue
                raise OperationalError(describe(self.path, exc, self.what)) from exc
            except (sqlite3.DatabaseError, sqlite3.ProgrammingError) as exc:
                raise OperationalError(describe(self.path, exc, self.what)) from exc
        raise AssertionError("unreachable")

    def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` outside an explicit transaction (reads, single statements)."""
        return self._retrying(lambda: fn(self.conn(), *args))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One autocommit statement (atomic on its own)."""
        def attempt() -> sqlite3.Cursor:
            conn = self.conn()
            with write_lock(self._lock_key):
                return conn.execute(sql, params)
        return self._retrying(attempt)

    def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in one ``BEGIN IMMEDIATE`` transaction and commit it."""
        def attempt() -> Any:
            conn = self.conn()
            with write_lock(self._lock_key):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn, *args)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
            return result
        return self._retrying(attempt)

    def data_version(self) -> int:
        """Changes whenever another connection commits to the file."""
        return self.read(lambda c: c.execute("PRAGMA data_version").fetchone()[0])

    def wait_change(self, version: int, deadline: float, wake_at: float | None = None,
                    interval: float | None = None) -> bool:
        """Poll until ``data_version`` differs from ``version`` (True), the monotonic
        ``deadline`` passes or the wall time ``wake_at`` comes (False)."""
        conn = self.conn()
        while True:
            left = deadline - time.monotonic()
            if wake_at is not None:
                left = min(left, wake_at - time.time())
            if left <= 0:
                return False
            time.sleep(min(interval or self.poll_interval, left))
            try:
                if conn.execute("PRAGMA data_version").fetchone()[0] != version:
                    return True
            except sqlite3.Error:
                return True     # let the caller's next real query report (or retry) the problem

    def poll(self, fn: Callable[[], list], timeout: float, interval: float | None = None) -> list:
        """``fn()`` until it returns something (or ``timeout`` s pass), polling ``data_version``
        in between: an idle waiter takes no lock and wakes within ``poll_interval`` of a commit."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            version = self.data_version()       # before ``fn``: no commit slips between
            got = fn()
            if got or not self.wait_change(version, deadline, interval=interval):
                return got

    def close(self) -> None:
        """Close the connections this process opened. Idempotent."""
        if os.getpid() != self._pid:
            self._after_fork()
            return
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def decode_envelope(headers: Any, properties: Any, content_type: Any, content_encoding: Any,
                    body: Any) -> tuple[Envelope | None, bytes | None, str | None]:
    """(envelope, None, None) for a sound stored message, else (None, raw body, reason)."""
    raw = _as_bytes(body)
    parsed = []
    for name, text in (("headers", headers), ("properties", properties)):
        if text is None:
            parsed.append({})
            continue
        try:
            value = json.loads(text)
        except (ValueError, TypeError) as exc:
            return None, raw, f"stored {name} are not valid JSON: {exc}"
        if not isinstance(value, dict):
            return None, raw, f"stored {name} are not a JSON object but {type(value).__name__}"
        parsed.append(value)
    return Envelope(raw, parsed[0], parsed[1], content_type or "application/json",
                    content_encoding or "utf-8"), None, None


def decode_control(routing_key: Any, headers: Any, body: Any) -> ControlMessage:
    """A stored broadcast or reply; headers that are not a JSON object are read as ``{}``."""
    try:
        parsed = json.loads(headers) if headers else {}
    except (ValueError, TypeError):
        parsed = {}
    return ControlMessage(_as_bytes(body), parsed if isinstance(parsed, dict) else {}, routing_key or "")


def _control_row(message: ControlMessage) -> tuple[str, str, Any]:
    return (message.routing_key or "", json.dumps(message.headers or {}),
            sqlite3.Binary(_as_bytes(message.body)))


class SqliteSubscription(Subscription):
    """Reads ``control_broadcasts`` rows of one exchange above its cursor matching its pattern."""

    def __init__(self, transport: "SqliteTransport", exchange: str, pattern: str) -> None:
        self._db = transport._db
        self.exchange, self.pattern = exchange, pattern
        self._closed = False
        self._cursor = self._db.read(lambda c: c.execute(
            "SELECT COALESCE(MAX(id), 0) FROM control_broadcasts").fetchone()[0])

    def _read(self) -> list[ControlMessage]:
        if self._closed:
            return []
        rows = self._db.read(lambda c: c.execute(
            "SELECT id, routing_key, headers, body FROM control_broadcasts"
            " WHERE exchange = ? AND id > ? ORDER BY id", (self.exchange, self._cursor)).fetchall())
        if rows:
            self._cursor = rows[-1][0]
        every = self.pattern == "#"
        return [decode_control(*row[1:]) for row in rows if every or topic_matches(self.pattern, row[1])]

    def get(self, timeout: float) -> list[ControlMessage]:
        """Messages broadcast since the last call; waits up to ``timeout`` s for the first."""
        # Broadcasts (control requests, events) may wait a few more milliseconds than tasks:
        # in a busy node every task's commit wakes this poll, so it looks less often.
        return self._db.poll(self._read, 0.0 if self._closed else timeout,
                             interval=_BROADCAST_POLL)

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        self._closed = True


class SqliteTransport(SqliteLeases, Transport):
    """Queues, leases, dead letters, broadcasts and reply mailboxes in one SQLite file."""

    supports_delayed_delivery = True

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        path, params = split_url(url)
        super().__init__(url, {**params, **(options or {})})
        self.path = path
        self._db = Database(path, self.options, SCHEMA, "broker")
        self._pid = os.getpid()
        self._consumer_id = self._new_consumer_id()
        self._last_cleanup = 0.0

    @staticmethod
    def _new_consumer_id() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"

    @property
    def consumer_id(self) -> str:  # type: ignore[override]
        """Owner name of our leases; a forked child gets its own."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._consumer_id = self._new_consumer_id()
        return self._consumer_id

    # -- queues ---------------------------------------------------------------------------

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """One committed INSERT."""
        now = time.time()
        row = (queue, max(0, min(255, int(priority or 0))), now if eta is None else float(eta),
               exchange or "", routing_key or "", json.dumps(envelope.headers),
               json.dumps(envelope.properties), envelope.content_type, envelope.content_encoding,
               sqlite3.Binary(_as_bytes(envelope.body)), now)
        self._db.execute(
            "INSERT INTO messages (queue, priority, visible_at, exchange, routing_key, headers,"
            " properties, content_type, content_encoding, body, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` messages; idle waits poll ``data_version`` only."""
        queues = list(dict.fromkeys(queues))
        if not queues or limit <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            version = self._db.data_version()      # taken first: later commits are noticed
            got = self._db.write(self._lease, queues, limit, self.consumer_id)
            if got:
                return got
            while True:
                due = self._db.read(self._next_due, queues)
                if due is not None and due <= time.time():
                    break                          # something is deliverable: lease it
                if time.monotonic() >= deadline:
                    return []
                wake = time.time() + _IDLE_RECHECK
                if due is not None:
                    wake = min(wake, due)
                self._db.wait_change(version, deadline, wake)
                version = self._db.data_version()
            if time.monotonic() >= deadline:
                return []

    def _lease(self, conn: sqlite3.Connection, queues: list[str], limit: int,
               owner: str) -> list[Delivery]:
        now = time.time()
        conn.execute(f"UPDATE messages SET lease_owner = NULL, lease_until = NULL, redelivered = 1"
                     f" WHERE lease_owner IS NOT NULL AND lease_until <= ? AND queue IN"
                     f" ({_marks(len(queues))})", (now, *queues))
        ids: list[int] = []
        for queue in queues:
            ids += [row[0] for row in conn.execute(
                # Without INDEXED BY the planner may pick messages_due and sort the backlog.
                "SELECT id FROM messages INDEXED BY messages_ready WHERE queue = ?"
                " AND lease_owner IS NULL AND visible_at <= ? ORDER BY priority DESC, id LIMIT ?",
                (queue, now, limit - len(ids)))]
            if len(ids) >= limit:
                break
        if not ids:
            return []
        rows = conn.execute(
            f"UPDATE messages SET lease_owner = ?, lease_until = ?,"
            f" delivery_count = delivery_count + 1 WHERE id IN ({_marks(len(ids))})"
            f" RETURNING {_MESSAGE_COLUMNS}", (owner, now + self.lease_seconds, *ids)).fetchall()
        order = {tag: n for n, tag in enumerate(ids)}   # RETURNING order is unspecified
        rows.sort(key=lambda row: order[row[0]])
        return [self._delivery(row) for row in rows]

    @staticmethod
    def _delivery(row: tuple) -> Delivery:
        tag, queue, redelivered, count, exchange, routing_key = row[:6]
        envelope, raw, error = decode_envelope(*row[6:11])
        return Delivery(tag=tag, queue=queue, envelope=envelope, redelivered=bool(redelivered),
                        delivery_count=count, raw=raw, error=error, exchange=exchange or "",
                        routing_key=routing_key or "")

    @staticmethod
    def _next_due(conn: sqlite3.Connection, queues: list[str]) -> float | None:
        """Wall time at which something in ``queues`` may become deliverable (None: never)."""
        times = [conn.execute("SELECT MIN(visible_at) FROM messages"
                              " WHERE queue = ? AND lease_owner IS NULL", (q,)).fetchone()[0]
                 for q in queues]
        times.append(conn.execute(
            f"SELECT MIN(lease_until) FROM messages WHERE lease_owner IS NOT NULL"
            f" AND queue IN ({_marks(len(queues))})", queues).fetchone()[0])
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def _by_tags(self, sql: str, tags: Iterable[Any], *params: Any) -> int:
        """Run ``sql`` (ending in ``id IN (%s)``) for all tags in one transaction."""
        ids = [int(tag) for tag in tags if tag is not None]
        if not ids:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(sql % _marks(len(chunk)), (*params, *chunk)).rowcount
                       for chunk in _chunks(ids))
        return self._db.write(run)

    def ack(self, tags: Iterable[Any]) -> None:
        """Delete our leased messages (also ones whose lease lapsed but nobody re-took)."""
        self._by_tags("DELETE FROM messages WHERE (lease_owner = ? OR lease_owner IS NULL)"
                      " AND id IN (%s)", tags, self.consumer_id)

    def ack_and_store(self, tags: Sequence[Any], backend: Any,
                      results: Sequence[tuple[str, bytes, str]]) -> None:
        """With the result table in this same file (the default), one transaction for both."""
        from ..backends.sqlite import SqliteBackend
        same_file = isinstance(backend, SqliteBackend) and \
            os.path.abspath(backend.path) == os.path.abspath(self.path)
        if not (same_file and results and tags):
            return super().ack_and_store(tags, backend, results)
        rows = backend.rows(results)
        backend.ensure_schema()
        ids = [int(tag) for tag in tags if tag is not None]

        def run(conn: sqlite3.Connection) -> None:
            backend.insert_rows(conn, rows)
            for chunk in _chunks(ids):
                conn.execute("DELETE FROM messages WHERE (lease_owner = ? OR lease_owner IS NULL)"
                             f" AND id IN ({_marks(len(chunk))})", (self.consumer_id, *chunk))
        self._db.write(run)

    def requeue(self, tags: Iterable[Any]) -> None:
        """Give our leased messages back, deliverable now, marked redelivered."""
        self._by_tags("UPDATE messages SET lease_owner = NULL, lease_until = NULL, visible_at = ?,"
                      " redelivered = 1 WHERE lease_owner = ? AND id IN (%s)",
                      tags, time.time(), self.consumer_id)

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Move the leased row into ``dead_letters`` (or store a copy of ``envelope``)."""
        owner, now = self.consumer_id, time.time()

        def move(conn: sqlite3.Connection) -> None:
            if tag is not None:
                moved = conn.execute(
                    "INSERT INTO dead_letters (queue, reason, died_at, headers, properties,"
                    " content_type, content_encoding, body, exchange, routing_key, priority)"
                    " SELECT queue, ?, ?, headers, properties, content_type, content_encoding,"
                    " body, exchange, routing_key, priority FROM messages"
                    " WHERE id = ? AND (lease_owner = ? OR lease_owner IS NULL)",
                    (reason, now, int(tag), owner)).rowcount
                if moved:
                    conn.execute("DELETE FROM messages WHERE id = ?", (int(tag),))
                    return
                if conn.execute("SELECT 1 FROM messages WHERE id = ?", (int(tag),)).fetchone():
                    return      # another consumer holds it now; it is theirs to settle
            if envelope is None:
                return
            conn.execute(
                "INSERT INTO dead_letters (queue, reason, died_at, headers, properties,"
                " content_type, content_encoding, body, exchange, routing_key, priority)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (queue or "", reason, now, json.dumps(envelope.headers),
                 json.dumps(envelope.properties), envelope.content_type,
                 envelope.content_encoding, sqlite3.Binary(_as_bytes(envelope.body)), "",
                 queue or "", int(envelope.properties.get("priority") or 0)))
        self._db.write(move)

    def renew_leases(self) -> None:
        """Push out the lease of every row we hold."""
        self._db.execute("UPDATE messages SET lease_until = ? WHERE lease_owner = ?",
                         (time.time() + self.lease_seconds, self.consumer_id))

    def restore_expired(self) -> int:
        """Expired leases of any queue back to ready, marked redelivered."""
        return self._db.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL, redelivered = 1"
            " WHERE lease_owner IS NOT NULL AND lease_until <= ?", (time.time(),)).rowcount

    def release_all(self) -> int:
        """Every row we hold back to ready, marked redelivered."""
        return self._db.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL, redelivered = 1"
            " WHERE lease_owner = ?", (self.consumer_id,)).rowcount

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed (unleased) rows of ``queue``."""
        return self._db.execute("DELETE FROM messages WHERE queue = ? AND lease_owner IS NULL",
                                (queue,)).rowcount

    def queue_size(self, queue: str) -> int:
        """Ready plus delayed (unleased) rows of ``queue``."""
        return self._db.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND lease_owner IS NULL",
            (queue,)).fetchone()[0])

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters first."""
        rows = self._db.read(lambda c: c.execute(
            "SELECT id, queue, reason, died_at, headers, properties, content_type,"
            " content_encoding, body FROM dead_letters ORDER BY id LIMIT ?", (int(limit),)).fetchall())
        letters = []
        for row in rows:
            envelope, raw, _ = decode_envelope(*row[4:9])
            letters.append(DeadLetter(id=row[0], queue=row[1], reason=row[2], died_at=row[3],
                                      envelope=envelope, raw=raw))
        return letters

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Dead letters back into their queue, visible now, delivery count reset."""
        now = time.time()
        copy = ("INSERT INTO messages (queue, priority, visible_at, exchange, routing_key, headers,"
                " properties, content_type, content_encoding, body, created)"
                " SELECT queue, priority, ?, exchange, routing_key, headers, properties,"
                " content_type, content_encoding, body, ? FROM dead_letters")

        def run(conn: sqlite3.Connection) -> int:
            if ids is None:
                count = conn.execute(copy + " ORDER BY id", (now, now)).rowcount
                conn.execute("DELETE FROM dead_letters")
                return count
            count = 0
            for chunk in _chunks([int(i) for i in ids]):
                where = f" WHERE id IN ({_marks(len(chunk))})"
                count += conn.execute(copy + where + " ORDER BY id", (now, now, *chunk)).rowcount
                conn.execute("DELETE FROM dead_letters" + where, chunk)
            return count
        return self._db.write(run)

    def purge_dead(self) -> int:
        """Delete every dead letter."""
        return self._db.execute("DELETE FROM dead_letters").rowcount

    # -- broadcast exchanges, reply mailboxes and the live-node registry ------------------

    def _cleanup(self, now: float) -> None:
        # Stale control rows are dropped lazily, at most every 10 s per object.
        if now - self._last_cleanup < 10.0:
            return
        self._last_cleanup = now
        self._db.write(lambda c: (
            c.execute("DELETE FROM control_broadcasts WHERE created < ?", (now - _BROADCAST_KEEP,)),
            c.execute("DELETE FROM control_replies WHERE expires < ?", (now,)),
            c.execute("DELETE FROM nodes WHERE expires <= ?", (now,)),
            c.execute("DELETE FROM mailboxes WHERE touched < ?", (now - _MAILBOX_IDLE,))))

    def broadcast(self, exchange: str, message: ControlMessage) -> None:
        """Insert a row every current subscriber of ``exchange`` with a matching pattern reads once."""
        now = time.time()
        self._db.execute("INSERT INTO control_broadcasts (exchange, routing_key, headers, body,"
                         " created) VALUES (?, ?, ?, ?, ?)", (exchange, *_control_row(message), now))
        self._cleanup(now)

    def subscribe(self, exchange: str, pattern: str = "#", name: str | None = None) -> Subscription:
        """A cursor on ``exchange`` after the newest broadcast (no queue: ``name`` is unused)."""
        return SqliteSubscription(self, exchange, pattern)

    def open_mailbox(self, mailbox: str) -> None:
        """Record ``mailbox`` as open (again): replies to it are kept from now on."""
        self._db.execute("INSERT OR REPLACE INTO mailboxes (name, touched) VALUES (?, ?)",
                         (mailbox, time.time()))

    def put_reply(self, mailbox: str, message: ControlMessage, ttl: float = 60.0) -> None:
        """Insert a reply that expires after ``ttl`` s unless ``mailbox`` is not open (one statement)."""
        now = time.time()
        self._db.execute(
            "INSERT INTO control_replies (mailbox, routing_key, headers, body, expires)"
            " SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM mailboxes WHERE name = ?)",
            (mailbox, *_control_row(message), now + ttl, mailbox))
        self._cleanup(now)

    def get_replies(self, mailbox: str, timeout: float) -> list[ControlMessage]:
        """Take (delete) the waiting replies; the write lock is taken only when some wait."""
        def take(conn: sqlite3.Connection) -> list[ControlMessage]:
            now = time.time()
            rows = conn.execute("DELETE FROM control_replies WHERE mailbox = ?"
                                " RETURNING id, routing_key, headers, body, expires",
                                (mailbox,)).fetchall()
            conn.execute("UPDATE mailboxes SET touched = ? WHERE name = ?", (now, mailbox))
            return [decode_control(*row[1:4]) for row in sorted(rows)
                    if row[4] is None or row[4] >= now]

        def check() -> list[ControlMessage]:
            waiting = self._db.read(lambda c: c.execute(
                "SELECT 1 FROM control_replies WHERE mailbox = ? AND expires >= ? LIMIT 1",
                (mailbox, time.time())).fetchone())
            return self._db.write(take) if waiting else []
        return self._db.poll(check, timeout)

    def close_mailbox(self, mailbox: str) -> None:
        """Forget ``mailbox`` and delete its unread replies."""
        self._db.write(lambda c: (
            c.execute("DELETE FROM mailboxes WHERE name = ?", (mailbox,)),
            c.execute("DELETE FROM control_replies WHERE mailbox = ?", (mailbox,))))

    def announce_node(self, nodename: str, ttl: float) -> None:
        """``nodename`` is alive until ``ttl`` s from now."""
        now = time.time()
        self._db.execute("INSERT OR REPLACE INTO nodes (name, expires) VALUES (?, ?)",
                         (nodename, now + ttl))
        self._cleanup(now)

    def forget_node(self, nodename: str) -> None:
        """Delete ``nodename`` from the registry."""
        self._db.execute("DELETE FROM nodes WHERE name = ?", (nodename,))

    def live_nodes(self) -> set[str] | None:
        """Names whose announcement has not expired."""
        return {row[0] for row in self._db.read(lambda c: c.execute(
            "SELECT name FROM nodes WHERE expires > ?", (time.time(),)).fetchall())}

    # -- life cycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Open the file (creating the schema); ``OperationalError`` when that fails."""
        self._db.read(lambda c: c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone())

    def close(self) -> None:
        """Close this process's connections. Idempotent; the object reopens on next use."""
        self._db.close()
