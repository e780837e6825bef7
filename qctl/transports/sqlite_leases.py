"""Scheduler leases and fenced state for the SQLite broker (``qctl.transports.sqlite``).

Two tables in the broker file, created with the others (``LEASE_SCHEMA`` is part of the
broker's schema, so existing files get them on first open by a newer version)::

    CREATE TABLE qctl_leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
    CREATE TABLE qctl_state (name TEXT PRIMARY KEY, data TEXT NOT NULL, updated_at REAL NOT NULL);

Every check-and-write is one ``BEGIN IMMEDIATE`` transaction, so processes sharing the file
see each lease change whole. Expiry is wall-clock time (``time.time``): the processes share
the machine's clock, not a monotonic one. ``save_state`` is durable as the broker's other
commits are (the ``synchronous`` option; NORMAL survives a crash of the process, not
necessarily a power cut).
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any

from . import check_lease_ttl, state_from_text, state_text

LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS qctl_leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL,
    expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS qctl_state (name TEXT PRIMARY KEY, data TEXT NOT NULL,
    updated_at REAL NOT NULL);
"""


def _holder(conn: sqlite3.Connection, name: str, now: float) -> str | None:
    row = conn.execute("SELECT owner FROM qctl_leases WHERE name = ? AND expires_at > ?",
                       (name, now)).fetchone()
    return row[0] if row else None


class SqliteLeases:
    """Mixed into ``SqliteTransport``; uses its ``Database`` (``self._db``)."""

    _db: Any

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take the row when there is none, it expired or it is ours; one transaction."""
        ttl = check_lease_ttl(ttl)

        def take(conn: sqlite3.Connection) -> bool:
            now = time.time()
            holder = _holder(conn, name, now)
            if holder is not None and holder != owner:
                return False
            conn.execute("INSERT OR REPLACE INTO qctl_leases (name, owner, expires_at)"
                         " VALUES (?, ?, ?)", (name, owner, now + ttl))
            return True
        return bool(self._db.write(take))

    def release_lease(self, name: str, owner: str) -> None:
        """Delete the row if ``owner`` holds it (also when it just expired: nobody took it)."""
        self._db.execute("DELETE FROM qctl_leases WHERE name = ? AND owner = ?", (name, owner))

    def lease_holder(self, name: str) -> str | None:
        """The owner of the unexpired row."""
        return self._db.read(lambda conn: _holder(conn, name, time.time()))

    def load_state(self, name: str) -> dict | None:
        """The stored JSON object."""
        row = self._db.read(lambda conn: conn.execute(
            "SELECT data FROM qctl_state WHERE name = ?", (name,)).fetchone())
        return state_from_text(row[0]) if row else None

    def save_state(self, name: str, owner: str, state: dict) -> bool:
        """Check the lease and write the state in one committed transaction."""
        text = state_text(state)

        def store(conn: sqlite3.Connection) -> bool:
            now = time.time()
            if _holder(conn, name, now) != owner:
                return False
            conn.execute("INSERT OR REPLACE INTO qctl_state (name, data, updated_at)"
                         " VALUES (?, ?, ?)", (name, text, now))
            return True
        return bool(self._db.write(store))
