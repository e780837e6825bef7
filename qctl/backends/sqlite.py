"""Results in a SQLite file (``sqlite:///results.db``; may be the broker's file too).

Schema (created ``IF NOT EXISTS`` on first connect)::

    CREATE TABLE results (task_id TEXT PRIMARY KEY, status TEXT, data BLOB,
                          date_done REAL, expires REAL NULL);
    CREATE INDEX results_expires ON results (expires) WHERE expires IS NOT NULL;

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
"""

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
