"""Monitoring: receive the events workers send, and fold them into a picture of the cluster.

Workers send events in Celery's format on the broadcast exchange ``app.conf.event_exchange``
(``celeryev``): ``worker-online``, ``worker-heartbeat`` (every 2 s) and ``worker-offline``
always, one JSON object per message; with ``-E`` (or the ``enable_events`` control command)
also task events, batched as one message with routing key ``task.multi`` whose body is a JSON
list. Field reference: Celery's event reference (``task-received``: uuid, name, args, kwargs,
...; ``task-succeeded``: uuid, result, runtime; ...).

- ``EventReceiver(app, handlers)`` subscribes to the exchange and yields the events as dicts,
  one per event (lists flattened, malformed bodies skipped), each with ``local_received``
  (this process' ``time.time()`` when it arrived) added, as Celery's receiver does.
- ``State`` folds events into ``workers`` (hostname -> ``Worker``) and ``tasks``
  (uuid -> ``Task``, the most recent ``max_tasks``), as ``celery.events.state.State`` does:
  a worker is offline after ``worker-offline`` or 2 x ``freq`` seconds without an event from
  it; a task's state never goes back to one that logically comes before it.
- ``event_line(event)`` formats an event as one line for dumps.

What ``qctl events`` is made of. This module imports no CLI, rich or broker client library.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from . import states
from .exceptions import OperationalError

__all__ = ["EventReceiver", "State", "Worker", "Task", "event_line", "decode_events",
           "TASK_EVENT_TO_STATE", "HEARTBEAT_EXPIRE_WINDOW", "DEFAULT_FREQ", "STANDARD_FIELDS"]

logger = logging.getLogger("qctl.events")

#: A worker counts as offline ``freq * HEARTBEAT_EXPIRE_WINDOW / 100`` s after the last event
#: received from it (Celery's ``expire_window``: 2 x freq).
HEARTBEAT_EXPIRE_WINDOW = 200
#: The heartbeat interval assumed until a worker tells its own ``freq``.
DEFAULT_FREQ = 2.0

#: The fields every event carries; dumps leave them out of the ``key=value`` part.
STANDARD_FIELDS = frozenset({"type", "hostname", "timestamp", "utcoffset", "pid", "clock",
                             "local_received"})

#: The task state each task event moves a task to (Celery's ``TASK_EVENT_TO_STATE``).
TASK_EVENT_TO_STATE = {
    "sent": states.PENDING,
    "received": states.RECEIVED,
    "started": states.STARTED,
    "succeeded": states.SUCCESS,
    "failed": states.FAILURE,
    "retried": states.RETRY,
    "revoked": states.REVOKED,
    "rejected": states.REJECTED,
}

#: When an event arrives after one that logically follows it (``task-received`` after
#: ``task-succeeded``), only these fields of it are kept and the state stays.
_MERGE_RULES = {states.RECEIVED: ("name", "args", "kwargs", "parent_id", "root_id", "retries",
                                  "eta", "expires")}


# -- decoding ---------------------------------------------------------------------------------


def decode_events(body: Any, headers: Mapping[str, Any] | None = None) -> list[dict]:
    """The events in one message body: a JSON object, or a list of them (``task.multi``).

    Anything that is not JSON, or not an object with a string ``type``, is left out (a list
    keeps its good items). An event without ``hostname`` takes the message's ``hostname``
    header."""
    try:
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = bytes(body).decode("utf-8")
        data = json.loads(body) if isinstance(body, str) else body
    except (ValueError, UnicodeDecodeError, TypeError):
        return []
    items = data if isinstance(data, list) else [data]
    events = []
    sender = headers.get("hostname") if isinstance(headers, Mapping) else None
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not item["type"]:
            continue
        if not item.get("hostname") and isinstance(sender, str):
            item["hostname"] = sender
        events.append(item)
    return events


# -- receiving --------------------------------------------------------------------------------


class EventReceiver:
    """Receives the events broadcast on ``app.conf.event_exchange``.

    ``handlers`` maps an event type (``"task-succeeded"``) to a callable taking the event
    dict; ``"*"`` catches every type without its own handler. ``capture()`` calls them;
    ``iter_events()`` and ``poll()`` just return the events.

    Only events broadcast after the subscription exists are received: call ``subscribe()``
    (or enter ``with receiver:``) before doing what should be seen; the iterators subscribe
    on their first step otherwise. A lost broker connection met while receiving is retried
    (``poll`` returns ``[]`` meanwhile and ``last_error`` says why); the first ``subscribe``
    raises ``OperationalError`` when the broker cannot be reached.
    """

    def __init__(self, app: Any, handlers: Mapping[str, Callable[[dict], Any]] | None = None,
                 routing_key: str = "#", clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.handlers: dict[str, Callable[[dict], Any]] = dict(handlers or {})
        self.routing_key = routing_key
        self.exchange = app.conf.event_exchange
        self.clock = clock
        #: Set to True (from a handler or another thread) to end ``capture``/``iter_events``.
        self.should_stop = False
        #: The last error met while receiving (None once receiving works again).
        self.last_error: BaseException | None = None
        self._subscription: Any = None
        self._lock = threading.Lock()

    # -- the subscription ---------------------------------------------------------------

    def subscribe(self) -> "EventReceiver":
        """Start receiving (idempotent). Raises ``OperationalError`` when the broker is down."""
        with self._lock:
            if self._subscription is None:
                self._subscription = self.app.transport.subscribe(self.exchange, self.routing_key)
        return self

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        with self._lock:
            subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                subscription.close()
            except Exception as exc:  # noqa: BLE001 - closing never fails the caller
                logger.debug("closing the event subscription: %s", exc)

    def __enter__(self) -> "EventReceiver":
        return self.subscribe()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def wakeup_workers(self) -> None:
        """Ask every worker for a heartbeat now (the ``heartbeat`` control command), so that a
        monitor sees the fleet at once instead of after up to ``freq`` seconds."""
        try:
            self.app.control.heartbeat()
        except Exception as exc:  # noqa: BLE001 - only a nicety
            logger.debug("cannot wake the workers up: %s", exc)

    # -- receiving ----------------------------------------------------------------------

    def poll(self, timeout: float) -> list[dict]:
        """The events that arrived since the last call; waits up to ``timeout`` s for the
        first. Returns ``[]`` after waiting when the connection is lost (and retries)."""
        timeout = max(0.0, float(timeout))
        if self._subscription is None:
            if self.last_error is None:
                self.subscribe()  # the first time: errors go to the caller
            else:
                started = time.monotonic()
                try:
                    self.subscribe()
                except (OperationalError, OSError) as exc:
                    self.last_error = exc
                    time.sleep(max(0.0, timeout - (time.monotonic() - started)))
                    return []
        subscription = self._subscription
        try:
            messages = subscription.get(timeout)
        except (OperationalError, OSError) as exc:
            if self.last_error is None:
                logger.info("Lost the event stream: %s (retrying)", exc)
            self.last_error = exc
            self.close()
            return []
        if self.last_error is not None:
            logger.info("Receiving events again")
            self.last_error = None
        now = self.clock()
        events: list[dict] = []
        for message in messages:
            found = decode_events(message.body, getattr(message, "headers", None))
            if not found:
                logger.debug("Skipping a malformed event message (%r)",
                              getattr(message, "routing_key", ""))
            for event in found:
                event.setdefault("local_received", now)
                events.append(event)
        return events

    def iter_events(self, timeout: float | None = None, limit: int | None = None,
                    wakeup: bool = False, poll_interval: float = 0.5) -> Iterator[dict]:
        """Yield events as they arrive until ``limit`` events, ``timeout`` seconds in all
        (None: no end), or ``should_stop``. The subscription stays open afterwards."""
        self.subscribe()
        if wakeup:
            self.wakeup_workers()
        deadline = None if timeout is None else time.monotonic() + timeout
        count = 0
        if limit is not None and limit <= 0:
            return
        while not self.should_stop:
            wait = poll_interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            for event in self.poll(wait):
                yield event
                count += 1
                if (limit is not None and count >= limit) or self.should_stop:
                    return

    def itercapture(self, limit: int | None = None, timeout: float | None = None,
                    wakeup: bool = True) -> Iterator[dict]:
        """Celery's name and argument order for ``iter_events``."""
        return self.iter_events(timeout=timeout, limit=limit, wakeup=wakeup)

    def process(self, event: dict) -> None:
        """Call the handler for ``event``'s type (or ``"*"``), if any."""
        handler = self.handlers.get(event.get("type", "")) or self.handlers.get("*")
        if handler is not None:
            handler(event)

    def capture(self, limit: int | None = None, timeout: float | None = None,
                wakeup: bool = True) -> int:
        """Receive events and hand each to its handler until ``limit`` events, ``timeout``
        seconds or ``should_stop``; ``wakeup`` first asks the workers for a heartbeat.
        Returns how many events were handled."""
        count = 0
        for event in self.iter_events(timeout=timeout, limit=limit, wakeup=wakeup):
            self.process(event)
            count += 1
        return count


# -- folding events into state ----------------------------------------------------------------


def _number(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


@dataclass
class Worker:
    """What is known about one node, from its events."""

    hostname: str
    freq: float = DEFAULT_FREQ
    loadavg: list[float] | None = None
    processed: int = 0
    active: int = 0
    pid: int | None = None
    sw_ident: str | None = None
    sw_ver: str | None = None
    sw_sys: str | None = None
    clock: int | None = None
    #: The sender's ``timestamp`` of the newest event from it.
    timestamp: float | None = None
    #: When (our ``time.time()``) the newest event from it arrived: Celery's last heartbeat.
    last_heartbeat: float | None = None
    #: It said goodbye (``worker-offline``) and has not spoken since.
    offline: bool = False
    #: ``State``'s clock, for ``status``.
    now: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    @property
    def heartbeat_expires(self) -> float | None:
        """When it counts as gone unless it speaks again (last heartbeat + 2 x freq)."""
        if self.last_heartbeat is None:
            return None
        return self.last_heartbeat + self.freq * HEARTBEAT_EXPIRE_WINDOW / 100.0

    def alive_at(self, now: float | None = None) -> bool:
        expires = self.heartbeat_expires
        if self.offline or expires is None:
            return False
        return (self.now() if now is None else now) < expires

    @property
    def alive(self) -> bool:
        return self.alive_at()

    def status_at(self, now: float | None = None) -> str:
        return "online" if self.alive_at(now) else "offline"

    @property
    def status(self) -> str:
        """``online`` or ``offline``."""
        return self.status_at()

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        return {"hostname": self.hostname, "status": self.status_at(now), "freq": self.freq,
                "loadavg": self.loadavg, "processed": self.processed, "active": self.active,
                "pid": self.pid, "sw_ident": self.sw_ident, "sw_ver": self.sw_ver,
                "sw_sys": self.sw_sys, "clock": self.clock, "timestamp": self.timestamp,
                "last_heartbeat": self.last_heartbeat,
                "heartbeat_expires": self.heartbeat_expires}

    def _seen(self, event: dict, local_received: float) -> None:
        """Any event from the node (worker or task): it is alive."""
        self.offline = False
        if self.last_heartbeat is None or local_received > self.last_heartbeat:
            self.last_heartbeat = local_received
        timestamp = _number(event.get("timestamp"))
        if timestamp is not None and (self.timestamp is None or timestamp > self.timestamp):
            self.timestamp = timestamp
        if isinstance(event.get("pid"), int):
            self.pid = event["pid"]
        if isinstance(event.get("clock"), int):
            self.clock = max(self.clock or 0, event["clock"])

    def _worker_event(self, kind: str, event: dict, local_received: float) -> None:
        freq = _number(event.get("freq"))
        if freq is not None and freq > 0:
            self.freq = freq
        for name in ("processed", "active"):
            value = event.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        loadavg = event.get("loadavg")
        if isinstance(loadavg, (list, tuple)):
            self.loadavg = [v for v in (_number(x) for x in loadavg) if v is not None]
        for name in ("sw_ident", "sw_ver", "sw_sys"):
            if isinstance(event.get(name), str):
                setattr(self, name, event[name])
        self._seen(event, local_received)
        if kind == "offline":
            self.offline = True


@dataclass
class Task:
    """What is known about one task, from its events."""

    uuid: str
    name: str | None = None
    state: str = states.PENDING
    args: Any = None
    kwargs: Any = None
    result: Any = None
    exception: Any = None
    traceback: Any = None
    runtime: float | None = None
    #: Hostname of the worker that sent its latest worker-side event.
    worker: str | None = None
    #: Hostname of the client that sent ``task-sent``.
    client: str | None = None
    retries: int | None = None
    eta: Any = None
    expires: Any = None
    root_id: str | None = None
    parent_id: str | None = None
    #: Timestamp of the event that set the current state.
    timestamp: float | None = None
    #: When (our clock) its newest event arrived.
    local_received: float | None = None
    sent: float | None = None
    received: float | None = None
    started: float | None = None
    succeeded: float | None = None
    failed: float | None = None
    retried: float | None = None
    revoked: float | None = None
    rejected: float | None = None
    #: Other fields the events carried (``terminated``, ``signum``, ``requeue``, ``queue``...).
    info: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("name", "args", "kwargs", "result", "exception", "traceback", "runtime",
               "retries", "eta", "expires", "root_id", "parent_id")

    @property
    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def as_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in (
            "uuid", "name", "state", "args", "kwargs", "result", "exception", "traceback",
            "runtime", "worker", "client", "retries", "eta", "expires", "root_id", "parent_id",
            "timestamp", "local_received", "sent", "received", "started", "succeeded", "failed",
            "retried", "revoked", "rejected")}
        data.update({k: v for k, v in self.info.items() if k not in data})
        return data

    def _event(self, subject: str, event: dict, local_received: float) -> None:
        timestamp = _number(event.get("timestamp"))
        state = TASK_EVENT_TO_STATE.get(subject)
        if state is not None:
            setattr(self, subject, timestamp)
        fields = {k: v for k, v in event.items() if k not in STANDARD_FIELDS and k != "uuid"}
        if state is not None and state != states.RETRY and self.state != states.RETRY and \
                states.precedence(state) > states.precedence(self.state):
            # This logically happened before the current state (events crossed): keep the
            # state, take only what the current one cannot know.
            keep = _MERGE_RULES.get(state)
            if keep is not None:
                fields = {k: v for k, v in fields.items() if k in keep}
        elif state is not None:
            self.state, self.timestamp = state, timestamp
        self.local_received = local_received
        for key, value in fields.items():
            if key in self._FIELDS:
                if key == "runtime":
                    value = _number(value)
                setattr(self, key, value)
            else:
                self.info[key] = value


class State:
    """The cluster as the events describe it.

    ``workers``: hostname -> ``Worker``; ``tasks``: uuid -> ``Task``, the ``max_tasks`` most
    recently updated (oldest first). ``clock`` is the time source for "now" (liveness, and
    ``local_received`` of events that lack it): tests give a fake one.
    """

    def __init__(self, max_tasks: int = 1000, max_workers: int = 5000,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_tasks = max_tasks
        self.max_workers = max_workers
        self.clock = clock
        self.workers: "OrderedDict[str, Worker]" = OrderedDict()
        self.tasks: "OrderedDict[str, Task]" = OrderedDict()
        self.event_count = 0
        self.task_count = 0
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self.workers.clear()
            self.tasks.clear()
            self.event_count = self.task_count = 0

    # -- folding ------------------------------------------------------------------------

    def event(self, event: dict) -> Worker | Task | None:
        """Fold one event in; returns the ``Worker`` or ``Task`` it updated (None if neither)."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return None
        local_received = _number(event.get("local_received"))
        if local_received is None:
            local_received = self.clock()
        group, _, subject = event["type"].partition("-")
        hostname = event.get("hostname")
        with self._lock:
            self.event_count += 1
            if group == "worker":
                if not isinstance(hostname, str) or not hostname:
                    return None
                worker = self._worker(hostname)
                worker._worker_event(subject, event, local_received)
                return worker
            if group != "task":
                return None
            uuid = event.get("uuid")
            if not isinstance(uuid, str) or not uuid:
                return None
            task = self.tasks.get(uuid)
            if task is None:
                task = self.tasks[uuid] = Task(uuid)
                self.task_count += 1
                while len(self.tasks) > self.max_tasks:
                    self.tasks.popitem(last=False)
            else:
                self.tasks.move_to_end(uuid)
            if isinstance(hostname, str) and hostname:
                if subject == "sent":  # sent by the client, not by a worker
                    task.client = hostname
                else:
                    task.worker = hostname
                    self._worker(hostname)._seen(event, local_received)
            task._event(subject, event, local_received)
            return task

    #: Celery's spelling: ``State.event`` is also what you register as the ``"*"`` handler.
    __call__ = event

    def feed(self, events: Iterable[dict]) -> int:
        """Fold many events in; returns how many."""
        count = 0
        for event in events:
            self.event(event)
            count += 1
        return count

    def _worker(self, hostname: str) -> Worker:
        worker = self.workers.get(hostname)
        if worker is None:
            worker = self.workers[hostname] = Worker(hostname, now=self.clock)
            while len(self.workers) > self.max_workers:
                self.workers.popitem(last=False)
        return worker

    # -- reading ------------------------------------------------------------------------

    def alive_workers(self, now: float | None = None) -> list[Worker]:
        now = self.clock() if now is None else now
        with self._lock:
            return [w for w in self.workers.values() if w.alive_at(now)]

    def worker_list(self) -> list[Worker]:
        """Every worker seen, by hostname."""
        with self._lock:
            return sorted(self.workers.values(), key=lambda w: w.hostname)

    def recent_tasks(self, limit: int | None = None) -> list[Task]:
        """The most recently updated tasks, newest first."""
        with self._lock:
            tasks = list(reversed(self.tasks.values()))
        return tasks if limit is None else tasks[:max(0, limit)]

    def tasks_by_state(self, state: str) -> list[Task]:
        with self._lock:
            return [t for t in self.tasks.values() if t.state == state]

    def snapshot(self) -> dict[str, Any]:
        """Plain data: ``{"workers": {host: {...}}, "tasks": {uuid: {...}}}``."""
        now = self.clock()
        with self._lock:
            return {"workers": {h: w.as_dict(now) for h, w in self.workers.items()},
                    "tasks": {u: t.as_dict() for u, t in self.tasks.items()},
                    "event_count": self.event_count, "task_count": self.task_count}


# -- dump lines -------------------------------------------------------------------------------

#: The fields shown first, in this order, for each event type; others follow, sorted.
_LINE_FIELDS = {
    "task-sent": ("uuid", "name", "args", "kwargs", "retries", "eta", "expires", "queue"),
    "task-received": ("uuid", "name", "args", "kwargs", "retries", "eta", "expires"),
    "task-started": ("uuid",),
    "task-succeeded": ("uuid", "result", "runtime"),
    "task-failed": ("uuid", "exception"),
    "task-retried": ("uuid", "exception"),
    "task-revoked": ("uuid", "terminated", "signum", "expired"),
    "task-rejected": ("uuid", "requeue"),
    "task-cancelled": ("uuid",),
}
_WORKER_FIELDS = ("active", "processed", "loadavg", "freq")
#: Left out of lines: multi-line or noise (use --json for everything).
_LINE_SKIP = {"traceback", "sw_ident", "sw_ver", "sw_sys", "root_id", "parent_id",
              "exchange", "routing_key"}
#: Shown only when set.
_LINE_OPTIONAL = {"eta", "expires", "retries", "signum", "queue"}


def _format_time(timestamp: Any) -> str:
    value = _number(timestamp)
    if value is None:
        return "?"
    try:
        moment = _dt.datetime.fromtimestamp(value)
    except (OverflowError, OSError, ValueError):
        return str(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int)):
        text = str(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
    return text


def event_line(event: Mapping[str, Any]) -> str:
    """One event as one line: ``host [local time]: type key=value ...``.

    e.g. ``w1@vm [2026-11-22 01:02:03.123]: task-succeeded uuid=... result=4 runtime=0.001``.
    Tracebacks and the standard fields are left out; unset optional fields too."""
    kind = str(event.get("type", "?"))
    hostname = event.get("hostname") or "?"
    order = _LINE_FIELDS.get(kind) or (_WORKER_FIELDS if kind.startswith("worker-") else ("uuid",))
    keys = [k for k in order if k in event]
    keys += sorted(k for k in event if k not in STANDARD_FIELDS and k not in _LINE_SKIP
                   and k not in order and isinstance(k, str))
    parts = []
    for key in keys:
        value = event[key]
        if key in _LINE_OPTIONAL and value in (None, 0, "", [], {}):
            continue
        parts.append(f"{key}={_format_value(value)}")
    head = f"{hostname} [{_format_time(event.get('timestamp'))}]: {kind}"
    return " ".join([head, *parts])
