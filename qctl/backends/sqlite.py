"""Results in a SQLite file (``sqlite:///results.db``; may be the broker's file too).

Schema (created ``IF NOT EXISTS`` on first connect)::

    CREATE TABLE results (task_id TEXT PRIMARY KEY, status TEXT, data BLOB,
                          date_done REAL, expires REAL NULL);
    CREATE INDEX results_expires ON results (expires) WHERE expires IS NOT NULL;

Chord counting uses two more tables; a part is one row keyed by (group, task), so a task that
reports twice is counted once, and each report is one ``BEGIN IMMEDIATE`` transaction::

    CREATE TABLE chords (group_id TEXT PRIMARY KEY, size INTEGER NOT NULL,
                         claimed INTEGER NOT NULL DEFAULT 0, expires REAL NOT NULL);
    CREATE TABLE chord_parts (group_id TEXT, task_id TEXT, idx INTEGER, state TEXT,
                              data BLOB, PRIMARY KEY (group_id, task_id));

Connections follow the broker's rules (one per thread and process, WAL, busy timeout); the
helpers live in ``qctl.transports.sqlite``.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any, Iterable

from ..transports.sqlite import Database, split_url
from . import ResultBackend

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (task_id TEXT PRIMARY KEY, status TEXT, data BLOB,
                                    date_done REAL, expires REAL NULL);
CREATE INDEX IF NOT EXISTS results_expires ON results (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS chords (group_id TEXT PRIMARY KEY, size INTEGER NOT NULL,
                                   claimed INTEGER NOT NULL DEFAULT 0, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chord_parts (group_id TEXT NOT NULL, task_id TEXT NOT NULL,
                                        idx INTEGER, state TEXT NOT NULL, data BLOB NOT NULL,
                                        PRIMARY KEY (group_id, task_id));
"""

#: How long a completed chord keeps ignoring late duplicate parts (as Celery's ``.c`` key).
DONE_FOR = 300.0

_CLEANUP_EVERY = 60.0   # seconds between lazy deletions of expired rows (per backend object)


class SqliteBackend(ResultBackend):
    """``results`` rows keyed by task id; waiting polls ``PRAGMA data_version``."""

    def __init__(self, url: str, app: Any = None, options: dict[str, Any] | None = None) -> None:
        path, params = split_url(url)
        super().__init__(url, app, {**params, **(options or {})})
        self.path = path
        self._db = Database(path, self.options, SCHEMA, "result backend")
        self._seen = threading.local()   # data_version read just before this thread's last get
        self._last_cleanup = time.time()

    def _row(self, task_id: str, data: bytes, state: str, now: float) -> tuple:
        expires = now + float(self.expires) if self.expires else None
        return task_id, state, sqlite3.Binary(bytes(data)), now, expires

    def _cleanup(self, conn: sqlite3.Connection, now: float) -> None:
        if now - self._last_cleanup >= _CLEANUP_EVERY:
            self._last_cleanup = now
            conn.execute("DELETE FROM results WHERE expires < ?", (now,))

    def set(self, task_id: str, data: bytes, state: str) -> None:
        """INSERT OR REPLACE one row."""
        now = time.time()
        if now - self._last_cleanup >= _CLEANUP_EVERY:
            self.set_many([(task_id, data, state)])
            return
        self._db.execute("INSERT OR REPLACE INTO results (task_id, status, data, date_done, expires)"
                         " VALUES (?, ?, ?, ?, ?)", self._row(task_id, data, state, now))

    def ensure_schema(self) -> None:
        """Create the results table now (first use opens a connection, which creates it)."""
        self._db.conn()

    def rows(self, items: Iterable[tuple[str, bytes, str]]) -> list[tuple]:
        now = time.time()
        return [self._row(task_id, data, state, now) for task_id, data, state in items]

    def insert_rows(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """Inside the caller's transaction (the broker's ack shares it in the same file)."""
        conn.executemany("INSERT OR REPLACE INTO results (task_id, status, data, date_done,"
                         " expires) VALUES (?, ?, ?, ?, ?)", rows)
        self._cleanup(conn, time.time())

    def set_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        """All rows in one transaction."""
        rows = self.rows(items)
        if rows:
            self._db.write(self.insert_rows, rows)

    def get(self, task_id: str) -> bytes | None:
        """The stored data unless expired."""
        def run(conn: sqlite3.Connection) -> Any:
            # data_version first: a commit after it is seen by wait_for_change.
            self._seen.version = conn.execute("PRAGMA data_version").fetchone()[0]
            return conn.execute("SELECT data FROM results WHERE task_id = ?"
                                " AND (expires IS NULL OR expires > ?)",
                                (task_id, time.time())).fetchone()
        row = self._db.read(run)
        return None if row is None else bytes(row[0])

    def delete(self, task_id: str) -> None:
        """Forget ``task_id``. Idempotent."""
        self._db.execute("DELETE FROM results WHERE task_id = ?", (task_id,))

    def wait_for_change(self, task_ids: list[str], timeout: float) -> None:
        """Return when another connection committed since this thread's last ``get``
        (or since now), or after ``timeout`` s."""
        version = getattr(self._seen, "version", None)
        if version is None:
            version = self._db.data_version()
        self._seen.version = None
        self._db.wait_change(version, time.monotonic() + max(timeout, 0.0))

    def close(self) -> None:
        """Close this process's connections. Idempotent."""
        self._db.close()

    # -- chords ---------------------------------------------------------------------------

    @staticmethod
    def _drop_expired_chords(conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM chord_parts WHERE group_id IN"
                     " (SELECT group_id FROM chords WHERE expires < ?)", (now,))
        conn.execute("DELETE FROM chords WHERE expires < ?", (now,))

    def chord_set_size(self, group_id: str, size: int) -> None:
        """Insert or reset the ``chords`` row (expired chords are swept here)."""
        def run(conn: sqlite3.Connection) -> None:
            now = time.time()
            self._drop_expired_chords(conn, now)
            conn.execute("INSERT OR REPLACE INTO chords (group_id, size, claimed, expires)"
                         " VALUES (?, ?, 0, ?)", (group_id, int(size), now + self.chord_keys_expire()))
        self._db.write(run)

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        """Insert the part, count and claim in one ``BEGIN IMMEDIATE`` transaction."""
        data = sqlite3.Binary(self.encode_part(value))

        def run(conn: sqlite3.Connection) -> list | None:
            now = time.time()
            row = conn.execute("SELECT size, claimed FROM chords WHERE group_id = ?"
                               " AND expires >= ?", (group_id, now)).fetchone()
            if row is None or row[1]:
                return None
            added = conn.execute("INSERT OR IGNORE INTO chord_parts (group_id, task_id, idx,"
                                 " state, data) VALUES (?, ?, ?, ?, ?)",
                                 (group_id, task_id, index, state, data)).rowcount
            if not added:
                return None
            conn.execute("UPDATE chords SET expires = ? WHERE group_id = ?",
                         (now + self.chord_keys_expire(), group_id))
            count = conn.execute("SELECT COUNT(*) FROM chord_parts WHERE group_id = ?",
                                 (group_id,)).fetchone()[0]
            if count < row[0]:
                return None
            conn.execute("UPDATE chords SET claimed = 1 WHERE group_id = ?", (group_id,))
            # Parts without an index (not sent as a chord by us) come last, in arrival order.
            return conn.execute("SELECT task_id, state, data FROM chord_parts WHERE group_id = ?"
                                " ORDER BY idx IS NULL, idx, rowid", (group_id,)).fetchall()

        parts = self._db.write(run)
        if parts is None:
            return None
        return [(tid, part_state, self.decode(bytes(part))) for tid, part_state, part in parts]

    def chord_cleanup(self, group_id: str) -> None:
        """Delete the parts; the claimed row stays ``DONE_FOR`` s against late duplicates."""
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM chord_parts WHERE group_id = ?", (group_id,))
            conn.execute("UPDATE chords SET claimed = 1, expires = ? WHERE group_id = ?",
                         (time.time() + DONE_FOR, group_id))
        self._db.write(run)
