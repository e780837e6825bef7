"""Results on Redis (``redis://[:password@]host:port/db``, ``rediss://``), as Celery stores them.

Keys: ``celery-task-meta-<task id>`` holds the task's meta JSON and ``celery-taskset-meta-<group
id>`` a saved group. Every write is Celery's pair, in one MULTI/EXEC::

    SETEX celery-task-meta-<id> <result_expires> <json>     (SET when result_expires is None/0)
    PUBLISH celery-task-meta-<id> <json>                     (channel name == key name)

so a Celery client already waiting on the channel wakes up, and a qctl client reads results
written by Celery workers. Waiting (``wait_for_change``) subscribes to those channels, then
reads the keys once more so a result stored just before the subscription is not missed; it
never polls. Options: ``socket_timeout``, ``socket_connect_timeout``, ``max_connections``.

Chords are counted under Celery 5.7's key names, beside ``celery-taskset-meta-<group id>``:
``.s`` the header size (``.t`` an adjustment, read when present), ``.j`` a sorted set of the
parts scored by group index, ``.d`` the ``"<task id>:<index>"`` already counted and ``.c`` set
once the chord is complete (``done`` for a while after cleanup). One Lua script records a
part, counts and claims, so exactly one caller receives the parts. Chords whose header tasks
run on both qctl and Celery workers are not supported.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Iterable

from ..transports.redis import _INHERITED, Errors, confirm, connect
from . import ResultBackend

TASK_PREFIX = "celery-task-meta-"
GROUP_PREFIX = "celery-taskset-meta-"
_MAX_BLOCK = 5.0          # longest single wait on the socket; below socket_timeout
_SEEN_LIMIT = 10000       # values remembered per thread for wait_for_change


#: How long a completed chord keeps ignoring late duplicate parts (Celery's ``.c`` "done").
DONE_FOR = 300

# KEYS: .j .t .s .d .c   ARGV: "<task id>:<index>", score, encoded part, ttl, claim token
CHORD_PART_RETURN = """
if redis.call('EXISTS', KEYS[5]) == 1 then return nil end
local size = redis.call('GET', KEYS[3])
if not size then return nil end
if redis.call('SADD', KEYS[4], ARGV[1]) == 0 then return nil end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local ttl = tonumber(ARGV[4])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
local total = tonumber(size) + tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('ZCARD', KEYS[1]) < total then return nil end
redis.call('SET', KEYS[5], ARGV[5], 'EX', ttl)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def chord_keys(group_id: str) -> list[str]:
    """``.j .t .s .d .c`` of ``group_id``, in the order the script takes them."""
    base = f"{GROUP_PREFIX}{group_id}"
    return [f"{base}.j", f"{base}.t", f"{base}.s", f"{base}.d", f"{base}.c"]


class RedisBackend(ResultBackend):
    """Celery's Redis result layout: SETEX + PUBLISH, waiting on PUB/SUB."""

    def __init__(self, url: str, app: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(url, app, options)
        self._errors = Errors(url, "result backend")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: Any = None
        self._local = threading.local()
        self._pubsubs: weakref.WeakSet[Any] = weakref.WeakSet()   # die with their thread
        self._redis()                       # bad URLs fail here; nothing is sent yet

    def _redis(self) -> Any:
        """This process's client (a new one after fork)."""
        if os.getpid() != self._pid:
            _INHERITED.append((self._client, list(self._pubsubs)))
            self._pid, self._client, self._pubsubs = os.getpid(), None, weakref.WeakSet()
            self._lock, self._local = threading.Lock(), threading.local()
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect(self.url, self.options)
        return self._client

    @staticmethod
    def key(task_id: str) -> str:
        return f"{TASK_PREFIX}{task_id}"

    def _write(self, pipe: Any, key: str, data: bytes) -> None:
        expires = self.expires
        if expires:
            if float(expires).is_integer():
                pipe.execute_command("SETEX", key, int(expires), data)    # Celery's command
            else:
                pipe.execute_command("PSETEX", key, max(1, int(float(expires) * 1000)), data)
        else:
            pipe.set(key, data)
        pipe.publish(key, data)

    def _write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        if not items:
            return
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            for key, data in items:
                self._write(pipe, key, data)
            pipe.execute()

    def set(self, task_id: str, data: bytes, state: str) -> None:
        """SETEX + PUBLISH in one transaction."""
        self._write_many([(self.key(task_id), data)])

    def set_many(self, items: Iterable[tuple[str, bytes, str]]) -> None:
        """Every SETEX + PUBLISH pair in one MULTI/EXEC: one round trip."""
        self._write_many((self.key(task_id), data) for task_id, data, _ in items)

    def _read(self, key: str) -> bytes | None:
        client = self._redis()
        with self._errors:
            value = client.get(key)
        seen = self._seen()
        if len(seen) >= _SEEN_LIMIT:
            seen.clear()
        seen[key] = value
        return value

    def get(self, task_id: str) -> bytes | None:
        """GET the meta (remembered for ``wait_for_change``)."""
        return self._read(self.key(task_id))

    def delete(self, task_id: str) -> None:
        """DEL the task's key (or a ``celery-taskset-meta-`` key given whole). Idempotent."""
        key = task_id if task_id.startswith(GROUP_PREFIX) else self.key(task_id)
        client = self._redis()
        with self._errors:
            client.delete(key)

    def set_raw(self, key: str, data: bytes) -> None:
        """Store a group meta under its full key, written like a result (SETEX + PUBLISH)."""
        self._write_many([(key, data)])

    def get_raw(self, key: str) -> bytes | None:
        return self._read(key)

    # -- chords ---------------------------------------------------------------------------

    def chord_set_size(self, group_id: str, size: int) -> None:
        """``DEL .c`` and ``SET .s <size> EX <ttl>`` in one transaction, as Celery 5.7 does."""
        keys = chord_keys(group_id)
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            pipe.delete(keys[4])
            pipe.set(keys[2], int(size), ex=self.chord_keys_expire())
            pipe.execute()

    def chord_part_return(self, group_id: str, task_id: str, index: int | None, state: str,
                          value: Any) -> list[tuple[str, str, Any]] | None:
        """One ``EVALSHA`` of ``CHORD_PART_RETURN``; the caller that completes gets the parts."""
        member = self.encode_part([1, task_id, state, value])   # Celery's element layout
        score = "+inf" if index is None else int(index)
        client = self._redis()
        with self._errors:
            script = client.register_script(CHORD_PART_RETURN)
            parts = script(keys=chord_keys(group_id),
                           args=[f"{task_id}:{index}", score, member, self.chord_keys_expire(),
                                 f"{os.getpid()}:{task_id}"])
        if parts is None:
            return None
        decoded = [self.decode(part) for part in parts]
        return [(tid, part_state, part_value) for _, tid, part_state, part_value in decoded]

    def chord_cleanup(self, group_id: str) -> None:
        """``DEL .j .t .s .d`` and ``SET .c done EX 300`` in one transaction."""
        keys = chord_keys(group_id)
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            pipe.delete(*keys[:4])
            pipe.set(keys[4], "done", ex=DONE_FOR)
            pipe.execute()

    # -- waiting --------------------------------------------------------------------------

    def _seen(self) -> dict[str, bytes | None]:
        if os.getpid() != self._pid:
            self._redis()
        seen = getattr(self._local, "seen", None)
        if seen is None:
            seen = self._local.seen = {}
        return seen

    def _subscription(self) -> tuple[Any, set[str]]:
        state = getattr(self._local, "pubsub", None)
        if state is None:
            pubsub = self._redis().pubsub()
            state = self._local.pubsub = (pubsub, set())
            with self._lock:
                self._pubsubs.add(pubsub)
        return state

    def _drop_subscription(self) -> None:
        state = getattr(self._local, "pubsub", None)
        self._local.pubsub = None
        if state is not None:
            try:
                state[0].close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def wait_for_change(self, task_ids: list[str], timeout: float) -> None:
        """Until a result of one of ``task_ids`` is published (or was stored since this
        thread last read it), or ``timeout`` s pass."""
        deadline = time.monotonic() + max(timeout, 0.0)
        keys = {self.key(t) for t in task_ids}
        seen = self._seen()
        with self._errors:
            try:
                pubsub, channels = self._subscription()
                stale, new = channels - keys, keys - channels
                if stale:
                    pubsub.unsubscribe(*stale)
                    channels -= stale
                if new:
                    ordered = sorted(new)
                    pubsub.subscribe(*ordered)
                    confirm(pubsub, new)
                    channels |= new
                    # Subscribed now: a result stored before this is in the key.
                    values = self._redis().mget(ordered)
                    if any(value != seen.get(key) for key, value in zip(ordered, values)):
                        return
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    message = pubsub.get_message(timeout=min(left, _MAX_BLOCK))
                    if message is not None and message["type"] == "message":
                        channel = message["channel"]
                        channel = channel.decode() if isinstance(channel, bytes) else channel
                        if channel in keys:
                            return
            except BaseException:
                self._drop_subscription()
                raise

    def close(self) -> None:
        """Close this process's connections. Idempotent."""
        if os.getpid() != self._pid:
            self._redis()
            return
        with self._lock:
            pubsubs, self._pubsubs = list(self._pubsubs), weakref.WeakSet()
            client = self._client
        self._local = threading.local()
        for pubsub in pubsubs:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001
                pass
        if client is not None:
            try:
                client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001
                pass
