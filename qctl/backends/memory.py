"""Results in a process-wide dict (``memory://`` / ``cache+memory://``), shared per URL.

Chord counters live beside the results, under the same lock, so every thread of the process
(an embedded worker's and the client's) counts the same parts.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Iterable

from . import ResultBackend


#: How long a completed chord keeps ignoring late duplicate parts (as Celery's ``.c`` key).
DONE_FOR = 300.0


class _Chord:
    """One chord being counted: header size and the parts seen, by task id."""

    __slots__ = ("size", "parts", "claimed", "expires")

    def __init__(self, size: int, expires: float) -> None:
        self.size = size
        self.parts: dict[str, tuple[float, int, str, bytes]] = {}  # id -> (index, seq, state, data)
        self.claimed = False    # the completing part was seen: the chord is done counting
        self.expires = expires


class _Store:
    """One URL's results: task_id -> (data, state, expires_at or None, change stamp)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.data: dict[str, tuple[bytes, str, float | None, int]] = {}
        self.stamps = itertools.count(1)
        self.stamp = 0      # the newest change stamp handed out
        self.chords: dict[str, _Chord] = {}
        self.arrivals = itertools.count()


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


class MemoryBackend(ResultBackend):
    """Shared dict plus a ``threading.Condition`` that ``set`` notifies."""

    def __init__(self, url: str = "memory://", app: Any = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(url, app, options)
        with _STORES_LOCK:
            self._store = _STORES.setdefault(url.rstrip("/"), _Store())
        self._seen = threading.local()   # newest stamp when this thread last called get

    def set(self, task_id: str, data: bytes, state: str) -> None:
        """Store and wake the waiters."""
        self.set_many([(task_id, data, state)])

    def set_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        """Store all under one lock acquisition."""
        store = self._store
        expires = time.time() + float(self.expires) if self.expires else None
        with store.cond:
            for task_id, data, state in items:
                store.stamp = next(store.stamps)
                store.data[task_id] = (bytes(data), state, expires, store.stamp)
            store.cond.notify_all()

    def get(self, task_id: str) -> bytes | None:
        """The stored data unless expired (expired entries are dropped here)."""
        store = self._store
        with store.cond:
            self._seen.stamp = store.stamp
            entry = store.data.get(task_id)
            if entry is None:
                return None
            if entry[2] is not None and entry[2] <= time.time():
                del store.data[task_id]
                return None
            return entry[0]

    def delete(self, task_id: str) -> None:
        """Forget ``task_id``. Idempotent."""
        with self._store.cond:
            self._store.data.pop(task_id, None)

    def wait_for_change(self, task_ids: list[str], timeout: float) -> None:
        """Wait until one of ``task_ids`` was stored after this thread's last ``get``."""
        store = self._store
        with store.cond:
            seen = getattr(self._seen, "stamp", None)
            if seen is None:
                seen = store.stamp
            self._seen.stamp = None

            def changed() -> bool:
                return any(store.data.get(t, (0, 0, 0, 0))[3] > seen for t in task_ids)
            store.cond.wait_for(changed, max(timeout, 0.0))

    # -- chords ---------------------------------------------------------------------------

    def chord_set_size(self, group_id: str, size: int) -> None:
        """Start (or restart) counting ``group_id``; parts already seen are kept."""
        store, now = self._store, time.time()
        with store.cond:
            for gid in [g for g, c in store.chords.items() if c.expires <= now]:
                del store.chords[gid]
            chord = store.chords.get(group_id)
            if chord is None:
                store.chords[group_id] = _Chord(int(size), now + self.chord_keys_expire())
            else:
                chord.size, chord.claimed = int(size), False
                chord.expires = now + self.chord_keys_expire()

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        """Count the part under the store's lock; the completing caller gets the parts."""
        data = self.encode_part(value)       # before locking: may raise for odd values
        store, now = self._store, time.time()
        with store.cond:
            chord = store.chords.get(group_id)
            if chord is None or chord.expires <= now or chord.claimed:
                return None
            if task_id in chord.parts:
                return None
            position = float("inf") if index is None else float(index)
            chord.parts[task_id] = (position, next(store.arrivals), state, data)
            chord.expires = now + self.chord_keys_expire()
            if len(chord.parts) < chord.size:
                return None
            chord.claimed = True
            parts = sorted(chord.parts.items(), key=lambda item: item[1][:2])
        return [(tid, part_state, self.decode(part))
                for tid, (_, _, part_state, part) in parts]

    def chord_cleanup(self, group_id: str) -> None:
        """Drop the parts; keep a claimed marker for ``DONE_FOR`` s against late duplicates."""
        store = self._store
        with store.cond:
            chord = store.chords.get(group_id)
            if chord is not None:
                chord.parts.clear()
                chord.claimed = True
                chord.expires = time.time() + DONE_FOR
