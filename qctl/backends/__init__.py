"""The result-backend interface and ``by_url()``.

A backend stores one *meta* dict per task id, in Celery's shape::

    {"status": "SUCCESS", "result": 4, "traceback": None, "children": [],
     "date_done": "2026-01-01T00:00:00+00:00", "task_id": "..."}

and hands it back. Encoding the meta (JSON with kombu's type tags by default) is done here
once, in ``encode``/``decode``, so implementations store and fetch opaque bytes. Like
transports, backends are safe to share between threads and must be re-created after fork.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from .. import states
from ..exceptions import ImproperlyConfigured, TimeoutError
from ..transports import load_class

_SCHEMES = {
    "memory": "qctl.backends.memory:MemoryBackend",
    "cache+memory": "qctl.backends.memory:MemoryBackend",
    "sqlite": "qctl.backends.sqlite:SqliteBackend",
    "redis": "qctl.backends.redis:RedisBackend",
    "rediss": "qctl.backends.redis:RedisBackend",
    "rpc": "qctl.backends.rpc:RpcBackend",
    "disabled": "qctl.backends:DisabledBackend",
}


class ResultBackend:
    """Stores and returns task metas. Subclasses implement the four ``_``-less primitives."""

    #: Where results go when the worker cannot tell the client directly; True for all but rpc.
    persistent = True

    def __init__(self, url: str, app: Any = None, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.app = app
        self.options = dict(options or {})
        self.serializer = getattr(getattr(app, "conf", None), "result_serializer", "json") or "json"
        self.accept = getattr(getattr(app, "conf", None), "result_accept_content", None) or \
            getattr(getattr(app, "conf", None), "accept_content", None) or ["json"]
        expires = getattr(getattr(app, "conf", None), "result_expires", 86400)
        self.expires = expires.total_seconds() if hasattr(expires, "total_seconds") else expires

    # -- primitives every backend implements ----------------------------------------------

    def set(self, task_id: str, data: bytes, state: str) -> None:
        """Store encoded meta for ``task_id`` (overwrite), expiring after ``self.expires`` s."""
        raise NotImplementedError

    def set_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        """Store several metas at once; one round trip/transaction where the store allows."""
        for task_id, data, state in items:
            self.set(task_id, data, state)

    def get(self, task_id: str) -> bytes | None:
        """The stored encoded meta, or None."""
        raise NotImplementedError

    def delete(self, task_id: str) -> None:
        """Forget ``task_id``. Idempotent."""
        raise NotImplementedError

    def wait_for_change(self, task_ids: list[str], timeout: float) -> None:
        """Block up to ``timeout`` s or until something may have been stored for one of
        ``task_ids``. Spurious wake-ups are allowed; the default just sleeps a little."""
        time.sleep(min(timeout, 0.05))

    def set_raw(self, key: str, data: bytes) -> None:
        """Store ``data`` under a non-task key (group metas)."""
        self.set(key, data, "")

    def get_raw(self, key: str) -> bytes | None:
        return self.get(key)

    def close(self) -> None:
        """Release connections. Idempotent."""

    # -- chords ---------------------------------------------------------------------------
    #
    # A chord's header tasks each report their final state here; the backend counts them
    # atomically, so that exactly one worker -- the one whose part completes the header --
    # sends the body. Values are stored encoded like results (``encode``/``decode``).

    def chord_set_size(self, group_id: str, size: int) -> None:
        """Start counting the chord of ``group_id``: ``size`` header tasks are coming.

        Called by the client before it sends any header task. Calling it again for the same
        group (the chord applied once more) makes a completed chord count anew."""
        raise NotImplementedError(f"{type(self).__name__} cannot count chord parts")

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        """Record that header task ``task_id`` (position ``index``) ended in ``state`` with
        ``value`` (its return value, or the exception meta of a failure).

        Atomic across threads, processes and hosts sharing the backend. A part is counted
        once per ``task_id``, however often it is reported. Returns the parts of the whole
        header as ``(task_id, state, value)`` ordered by index to the one caller whose part
        completes the chord; None to everyone else, including late duplicates, parts of a
        chord whose size was never set and parts of a chord already completed."""
        raise NotImplementedError(f"{type(self).__name__} cannot count chord parts")

    def chord_cleanup(self, group_id: str) -> None:
        """Forget the parts of ``group_id`` once its body was dispatched (or its failure
        stored). A part reported afterwards is still ignored for a while. Idempotent."""
        raise NotImplementedError(f"{type(self).__name__} cannot count chord parts")

    def chord_keys_expire(self) -> int:
        """Seconds a chord's counters live without news: ``result_expires``, or a day."""
        import math
        return int(math.ceil(float(self.expires))) if self.expires else 86400

    def encode_part(self, value: Any) -> bytes:
        """A chord part's value encoded like a result, so whatever a task may return fits."""
        from ..serialization import dumps
        return dumps(value, self.serializer)[2]

    # -- built on the primitives ----------------------------------------------------------

    def encode(self, meta: dict[str, Any]) -> bytes:
        from ..serialization import dumps
        return dumps(meta, self.serializer)[2]

    def decode(self, data: bytes) -> dict[str, Any]:
        from ..serialization import loads, content_type_of
        return loads(data, content_type_of(self.serializer), "utf-8", accept=self.accept)

    def store_result(self, task_id: str, meta: dict[str, Any]) -> None:
        self.set(task_id, self.encode(meta), meta["status"])

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        data = self.get(task_id)
        if data is None:
            return {"status": states.PENDING, "result": None, "traceback": None,
                    "children": [], "date_done": None, "task_id": task_id}
        return self.decode(data)

    def forget(self, task_id: str) -> None:
        self.delete(task_id)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 on_message: Any = None) -> dict[str, Any]:
        """Block until ``task_id`` is in a ready state; raise ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_state = None
        while True:
            meta = self.get_task_meta(task_id)
            if on_message is not None and meta["status"] != last_state:
                on_message(meta)
            last_state = meta["status"]
            if meta["status"] in states.READY_STATES:
                return meta
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("The operation timed out.")
            step = interval if remaining is None else min(interval, remaining)
            self.wait_for_change([task_id], step)


class DisabledBackend(ResultBackend):
    """``result_backend='disabled://'``: results are not stored; ``get()`` is an error."""

    persistent = False

    def set(self, task_id: str, data: bytes, state: str) -> None:
        pass

    def get(self, task_id: str) -> bytes | None:
        return None

    def delete(self, task_id: str) -> None:
        pass

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 on_message: Any = None) -> dict[str, Any]:
        raise ImproperlyConfigured("no result backend is configured (result_backend='disabled://')")

    def chord_set_size(self, group_id: str, size: int) -> None:
        raise ImproperlyConfigured("chords need a result backend that can count: sqlite, redis "
                                   "or memory — no result backend is configured")

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        self.chord_set_size(group_id, 0)
        return None

    def chord_cleanup(self, group_id: str) -> None:
        pass


def by_url(url: str, app: Any = None, options: dict[str, Any] | None = None) -> ResultBackend:
    """A new result backend for ``url`` (its module imported only now)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme not in _SCHEMES:
        known = ", ".join(sorted(_SCHEMES))
        from ..conf import mask_url
        raise ImproperlyConfigured(f"unknown result backend {scheme!r} in {mask_url(url)!r} (known: {known})")
    base = scheme.split("+", 1)[0]
    cls = load_class({base: _SCHEMES[scheme]}, f"{base}://", "result backend")
    return cls(url, app, options)
