"""Results in a process-wide dict (``memory://`` / ``cache+memory://``), shared per URL."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Iterable

from . import ResultBackend


class _Store:
    """One URL's results: task_id -> (data, state, expires_at or None, change stamp)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.data: dict[str, tuple[bytes, str, float | None, int]] = {}
        self.stamps = itertools.count(1)
        self.stamp = 0      # the newest change stamp handed out


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
