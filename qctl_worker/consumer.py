"""The consumer: fetch messages within the prefetch window, check them, run them, settle them.

Two threads. The *fetcher* leases batches of messages from the broker whenever the window has
room and posts them as events. The *hub* owns every piece of bookkeeping and is the only
thread that changes it: it checks each message (bad ones go to the dead-letter queue, revoked
and expired ones are settled without running), holds ETA and rate-limited jobs on its timers,
hands jobs to the pool, and turns pool outcomes into stored results and acks, batched per loop.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from typing import Any, Callable

from qctl import states
from qctl.exceptions import (ContentDisallowed, DecodeError, InvalidTaskError, NotRegistered,
                             OperationalError, TaskRevokedError, TimeLimitExceeded, WorkerLostError)
from qctl.followups import chord_part_from_message
from qctl.protocol import read_headers
from qctl.result import exception_to_meta
from qctl.serialization import accepted_content_types
from qctl.trace import Outcome, utcnow_iso

from .execution import INVALID, TIME_LIMIT, WORKER_LOST, Job
from .ratelimit import TokenBucket, parse_rate

logger = logging.getLogger("qctl.worker")


class Consumer:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.app = worker.app
        self.transport = worker.app.transport
        self.backend = worker.app.backend
        self.pool = worker.pool
        self.state = worker.state
        self.hostname = worker.hostname
        self.queues: list[str] = worker.queues
        self.window = max(worker.concurrency * worker.prefetch_multiplier, 1)
        self.accept = accepted_content_types(self.app.conf.accept_content)
        self.max_deliveries = int(self.app.conf.task_max_deliveries or 3)
        self.time_limits: dict[str, tuple[float | None, float | None]] = {}
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.consuming = threading.Event()
        self.draining = False
        self._reserved = 0
        self._window = threading.Condition()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._job_seq = itertools.count(1)
        self.ready: deque[Job] = deque()
        self.rate_waiting: dict[str, deque[Job]] = {}
        self.buckets: dict[str, TokenBucket | None] = {}
        self.scheduled: dict[int, Job] = {}
        self.active: dict[int, Job] = {}
        self._acks: list[Any] = []
        self._results: list[tuple[str, bytes, str]] = []
        self._settler: queue.SimpleQueue = queue.SimpleQueue()
        self._settler_thread = threading.Thread(target=self._settle_loop, name="Settler", daemon=True)
        self._fetcher: threading.Thread | None = None
        self._hub: threading.Thread | None = None
        self._hub_done = threading.Event()
        self._broker_down_logged = False
        # Checked once: at WARNING (the default) the per-task lines cost nothing at all.
        self.log_info = logger.isEnabledFor(logging.INFO)
        self.remember_reply_to = getattr(self.backend, "remember_reply_to", None)

    # -- threads --------------------------------------------------------------------------

    def start(self) -> None:
        self.consuming.set()
        self._settler_thread.start()
        self._hub = threading.Thread(target=self._hub_loop, name="Hub", daemon=True)
        self._hub.start()
        self._fetcher = threading.Thread(target=self._fetch_loop, name="Fetcher", daemon=True)
        self._fetcher.start()
        self.call_every(max(self.transport.lease_seconds / 3.0, 0.2), self.transport.renew_leases)

    def _fetch_loop(self) -> None:
        backoff = 0.1
        # Fetch when at least half the window is free: one broker round trip then leases a
        # batch, instead of one message per round trip when the pool runs at full speed.
        # When the last fetch drained the queue, fetch again as soon as any slot is free:
        # messages that trickle in must not wait for half the window to empty.
        low_water = self.window - max(1, self.window // 2)
        drained = True
        while self.consuming.is_set():
            with self._window:
                limit = self.window - 1 if drained else low_water
                while self._reserved > limit and self.consuming.is_set():
                    self._window.wait(0.5)
                free = self.window - self._reserved
            if not self.consuming.is_set():
                break
            try:
                deliveries = self.transport.fetch(self.queues, free, 1.0)
            except OperationalError as exc:
                if not self._broker_down_logged:
                    logger.error("Cannot fetch from the broker: %s (retrying)", exc)
                    self._broker_down_logged = True
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if self._broker_down_logged:
                logger.info("Connected to the broker again")
                self._broker_down_logged = False
            backoff = 0.1
            drained = len(deliveries) < free
            if deliveries:
                with self._window:
                    self._reserved += len(deliveries)
                self.events.put(("deliveries", deliveries))

    def _release_window(self, n: int = 1) -> None:
        with self._window:
            self._reserved -= n
            self._window.notify()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hub thread (control commands use this)."""
        self.events.put(("call", fn))

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), fn))

    def call_every(self, interval: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a periodic chore must not stop the hub
                logger.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
            self.call_at(time.monotonic() + interval, tick)
        self.events.put(("call", lambda: self.call_at(time.monotonic() + interval, tick)))

    def _hub_loop(self) -> None:
        try:
            while True:
                timeout = 0.5
                if self._timers:
                    timeout = min(max(self._timers[0][0] - time.monotonic(), 0.0), 0.5)
                try:
                    event = self.events.get(timeout=timeout)
                except queue.Empty:
                    event = None
                while event is not None:
                    if event[0] == "stop":
                        self._flush()
                        return
                    self._handle(event)
                    try:
                        event = self.events.get_nowait()
                    except queue.Empty:
                        event = None
                self._run_timers()
                self._dispatch()
                self._flush()
        except Exception:  # pragma: no cover - a bug here must be loud, not silent
            logger.exception("Consumer hub crashed")
            self.worker.request_stop(cold=True)
        finally:
            self._hub_done.set()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "deliveries":
            for delivery in event[1]:
                try:
                    self._on_delivery(delivery)
                except Exception as exc:  # noqa: BLE001 - one bad message never stops the hub
                    self._dead_letter(delivery, f"cannot handle message: {exc!r}", None)
        elif kind == "outcome":
            self._on_outcome(event[1], event[2])
        elif kind == "call":
            event[1]()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    # -- receiving ------------------------------------------------------------------------

    def _on_delivery(self, delivery: Any) -> None:
        if self.draining:
            self.transport.requeue([delivery.tag])
            self._release_window()
            return
        envelope = delivery.envelope
        if envelope is None:
            self._dead_letter(delivery, delivery.error or "unreadable message", None)
            return
        if envelope.content_type not in self.accept:
            self._dead_letter(delivery, f"refused content type {envelope.content_type!r} "
                              "(not in accept_content)", None)
            return
        try:
            message = read_headers(envelope, self.accept)
        except (InvalidTaskError, DecodeError, ContentDisallowed) as exc:
            self._dead_letter(delivery, f"invalid task message: {exc}", None)
            return
        headers = message.headers
        name, task_id = message.name, message.id
        if self.remember_reply_to is not None:  # rpc://: results go to the client's queue
            self.remember_reply_to(task_id, envelope.properties.get("reply_to"))
        try:
            task = self.app.tasks[name]
        except NotRegistered:
            logger.error("Received unregistered task of type %r. The message is in the "
                         "dead-letter queue. [%s]", name, task_id)
            self._store_exception(task_id, states.FAILURE, NotRegistered(name), headers,
                                  envelope)
            self._dead_letter(delivery, f"unregistered task {name!r}", None, log=False)
            return
        if task_id in self.state.revoked:
            self._discard(delivery, headers, "revoked")
            return
        if message.expires is not None and message.expires < time.time():
            self._discard(delivery, headers, "expired")
            return
        hard, soft = (headers.get("timelimit") or [None, None])
        override = self.time_limits.get(name, (None, None))
        job = Job(seq=next(self._job_seq), task_name=name, headers=headers, body=envelope.body,
                  content_type=envelope.content_type, content_encoding=envelope.content_encoding,
                  properties=envelope.properties,
                  delivery_info={"exchange": delivery.exchange, "routing_key": delivery.routing_key,
                                 "priority": envelope.properties.get("priority"),
                                 "redelivered": delivery.redelivered},
                  hostname=self.hostname,
                  soft_time_limit=soft or override[0] or task.soft_time_limit or self.worker.soft_time_limit,
                  time_limit=hard or override[1] or task.time_limit or self.worker.time_limit,
                  accept=self.accept, delivery=delivery, expires_at=message.expires)
        if self.log_info:
            logger.info("Task %s[%s] received", headers.get("shadow") or name, task_id)
        if self.worker.events:
            self._event("task-received", uuid=task_id, name=headers.get("shadow") or name,
                        args=headers.get("argsrepr"), kwargs=headers.get("kwargsrepr"),
                        root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
                        retries=headers.get("retries"), eta=headers.get("eta"),
                        expires=headers.get("expires"))
        delay = (message.eta - time.time()) if message.eta else 0.0
        if delay > 0.001:
            self.scheduled[job.seq] = job
            self.call_at(time.monotonic() + delay, lambda: self._eta_due(job))
        else:
            self._admit(job)

    def _event(self, kind: str, **fields: Any) -> None:
        remote = self.worker.remote
        if remote is not None:
            remote.task_event(kind, **fields)

    def _outcome_event(self, job: Job, outcome: Outcome) -> None:
        state, uuid = outcome.state, job.task_id
        if state == states.SUCCESS:
            self._event("task-succeeded", uuid=uuid, result=outcome.summary, runtime=outcome.runtime)
        elif state == states.RETRY:
            self._event("task-retried", uuid=uuid, exception=outcome.summary, traceback=outcome.traceback)
        elif state == states.REJECTED:
            self._event("task-rejected", uuid=uuid, requeue=outcome.requeue)
        elif state == states.REVOKED:
            self._event("task-revoked", uuid=uuid, terminated=True, signum=None, expired=False)
        elif state != states.IGNORED:
            self._event("task-failed", uuid=uuid, exception=outcome.summary or state,
                        traceback=outcome.traceback)

    def _discard(self, delivery: Any, headers: dict, why: str) -> None:
        logger.info("Discarding revoked task: %s[%s] (%s)", headers["task"], headers["id"], why)
        if self.worker.events:
            self._event("task-revoked", uuid=headers["id"], terminated=False, signum=None,
                        expired=why == "expired")
        self._store_exception(headers["id"], states.REVOKED, TaskRevokedError(why), headers,
                              delivery.envelope)
        self._acks.append(delivery.tag)
        self._release_window()

    def _eta_due(self, job: Job) -> None:
        if self.scheduled.pop(job.seq, None) is not None and not self.draining:
            self._admit(job)

    def _admit(self, job: Job) -> None:
        """Ready to run, once its task's rate limit allows."""
        bucket = self._bucket(job.task_name)
        waiting = self.rate_waiting.get(job.task_name)
        if bucket is None or (not waiting and bucket.can_consume()):
            self.ready.append(job)
            return
        if waiting is None:
            waiting = self.rate_waiting[job.task_name] = deque()
        waiting.append(job)
        if len(waiting) == 1:
            self.call_at(time.monotonic() + bucket.expected_time(), lambda: self._rate_due(job.task_name))

    def _rate_due(self, name: str) -> None:
        waiting = self.rate_waiting.get(name)
        bucket = self._bucket(name)
        while waiting and (bucket is None or bucket.can_consume()):
            self.ready.append(waiting.popleft())
        if waiting:
            self.call_at(time.monotonic() + bucket.expected_time(), lambda: self._rate_due(name))  # type: ignore[union-attr]
        else:
            self.rate_waiting.pop(name, None)

    def _bucket(self, name: str) -> TokenBucket | None:
        if name not in self.buckets:
            task = self.app.tasks.get(name)
            rate = 0.0
            try:
                rate = parse_rate(getattr(task, "rate_limit", None))
            except ValueError as exc:
                logger.error("Ignoring the rate limit of %s: %s", name, exc)
            self.buckets[name] = TokenBucket(rate) if rate else None
        return self.buckets[name]

    def set_rate_limit(self, name: str, rate: str | float | None) -> None:
        """Change a task's rate limit now (raises ValueError for a bad rate)."""
        value = parse_rate(rate)
        self.app.tasks[name].rate_limit = rate if value else None
        self.buckets[name] = TokenBucket(value) if value else None
        if name in self.rate_waiting:
            self._rate_due(name)

    # -- running --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self.ready and not self.draining and self.pool.free_slots() > 0:
            job = self.ready.popleft()
            headers = job.headers
            if job.task_id in self.state.revoked:
                self._discard(job.delivery, headers, "revoked")
                continue
            if job.expires_at is not None and job.expires_at < time.time():
                self._discard(job.delivery, headers, "expired")
                continue
            task = self.app.tasks[job.task_name]
            if not task.acks_late:
                self._acks.append(job.delivery.tag)
                job.delivery.tag = None  # acknowledged: a later dead letter stores a copy
            job.started = time.monotonic()
            self.active[job.seq] = job
            self.pool.apply(job)
            if self.worker.events:
                self._event("task-started", uuid=job.task_id)
            if task.track_started:
                self._store_meta(job.task_id, {"status": states.STARTED, "result": {
                    "pid": job.worker_pid or os.getpid(), "hostname": self.hostname},
                    "traceback": None, "children": [], "date_done": None, "task_id": job.task_id})
            if job.time_limit:
                self.call_at(job.started + job.time_limit, lambda job=job: self._hard_limit(job))

    def terminate(self, ids: list[str], signum: int) -> list[str]:
        """``revoke --terminate``: stop the running jobs with these ids (hub thread only)."""
        wanted, hit = set(ids), []
        for job in list(self.active.values()):
            if job.task_id in wanted and self.pool.terminate_job(job, signum, states.REVOKED):
                hit.append(job.task_id)
        return hit

    def _hard_limit(self, job: Job) -> None:
        if self.active.get(job.seq) is job:
            if not self.pool.terminate_job(job, signal.SIGKILL, TIME_LIMIT):
                logger.warning("Cannot stop %s[%s] at its hard time limit in this pool",
                               job.task_name, job.task_id)

    def on_outcome(self, job: Job, outcome: Outcome) -> None:
        """Called by the pool from its own thread."""
        self.events.put(("outcome", job, outcome))

    def _on_outcome(self, job: Job, outcome: Outcome) -> None:
        self.active.pop(job.seq, None)
        self._release_window()
        self.state.total[job.task_name] += 1
        task = self.app.tasks.get(job.task_name)
        late = job.delivery.tag is not None
        name = job.headers.get("shadow") or job.task_name
        state = outcome.state
        if self.worker.events:
            self._outcome_event(job, outcome)
        if outcome.meta is not None:
            self._results.append((job.task_id, outcome.meta, state))
        if state == states.SUCCESS:
            if self.log_info:
                    logger.info("Task %s[%s] succeeded in %.6fs: %s", name, job.task_id,
                            outcome.runtime, outcome.summary)
        elif state == states.FAILURE:
            if outcome.expected:
                logger.info("Task %s[%s] raised expected: %s", name, job.task_id, outcome.summary)
            else:
                logger.error("Task %s[%s] raised unexpected: %s\n%s", name, job.task_id,
                             outcome.summary, (outcome.traceback or "").rstrip())
        elif state == states.RETRY:
            logger.info("Task %s[%s] retry: %s", name, job.task_id, outcome.summary)
        elif state == states.REJECTED:
            if outcome.requeue and late:
                self.transport.requeue([job.delivery.tag])
            elif outcome.requeue:
                self.app.transport.publish(job.delivery.queue, job.delivery.envelope,
                                           priority=job.delivery.envelope.properties.get("priority") or 0)
            else:
                self._dead_letter(job.delivery, f"rejected by the task: {outcome.summary}", job)
            return
        elif state == INVALID:
            logger.error("Cannot run %s[%s]: %s. The message is in the dead-letter queue.",
                         name, job.task_id, outcome.summary)
            self._store_exception(job.task_id, states.FAILURE, InvalidTaskError(outcome.summary), job.headers)
            self._dead_letter(job.delivery, outcome.summary, job, log=False)
            return
        elif state == states.REVOKED:
            logger.info("Task %s[%s] terminated (revoked)", name, job.task_id)
            self._store_exception(job.task_id, states.REVOKED, TaskRevokedError("terminated"),
                                  job.headers, job)
        elif state == TIME_LIMIT:
            logger.error("Hard time limit (%ss) exceeded for %s[%s]", job.time_limit, name, job.task_id)
            self._store_exception(job.task_id, states.FAILURE,
                                  TimeLimitExceeded(job.time_limit), job.headers, job)
        elif state == WORKER_LOST:
            self._worker_lost(job, outcome, task)
            return
        if late:
            self._acks.append(job.delivery.tag)

    def _worker_lost(self, job: Job, outcome: Outcome, task: Any) -> None:
        delivery = job.delivery
        if delivery.tag is not None and getattr(task, "reject_on_worker_lost", False):
            if delivery.delivery_count >= self.max_deliveries:
                logger.error("Task %s[%s] killed its process %s times (%s); the message is in the "
                             "dead-letter queue.", job.task_name, job.task_id,
                             delivery.delivery_count, outcome.summary)
                self._dead_letter(delivery, f"process died {delivery.delivery_count} times: "
                                  f"{outcome.summary}", job, log=False)
            else:
                logger.error("Task %s[%s] lost its process (%s); requeued.", job.task_name,
                             job.task_id, outcome.summary)
                self.transport.requeue([delivery.tag])
            return
        logger.error("Task %s[%s] failed: the process running it exited (%s). The message is "
                     "in the dead-letter queue.", job.task_name, job.task_id, outcome.summary)
        self._store_exception(job.task_id, states.FAILURE, WorkerLostError(
            f"Worker exited prematurely: {outcome.summary}."), job.headers, job)
        self._dead_letter(delivery, f"process died running the task: {outcome.summary}", job, log=False)

    # -- settling -------------------------------------------------------------------------

    def _dead_letter(self, delivery: Any, reason: str, job: Job | None, log: bool = True) -> None:
        if log:
            logger.error("Message %s from queue %r moved to the dead-letter queue: %s",
                         _message_label(delivery), delivery.queue, reason)
        try:
            if delivery.tag is None:
                self.transport.dead_letter(None, reason, delivery.envelope, delivery.queue)
            else:
                self.transport.dead_letter(delivery.tag, reason)
        except Exception as exc:  # noqa: BLE001
            logger.error("Cannot dead-letter message %s: %s", _message_label(delivery), exc)
        if job is None:
            self._release_window()

    def _store_exception(self, task_id: str, state: str, exc: BaseException, headers: dict,
                         source: Any = None) -> None:
        """Store a final state the pool did not; ``source`` (the envelope or job) tells
        whether the task was part of a chord, which then learns of its end."""
        meta = {"status": state, "result": exception_to_meta(exc), "traceback": None,
                "children": [], "date_done": utcnow_iso()}
        if headers.get("group"):
            meta["group_id"] = headers["group"]
        if headers.get("parent_id"):
            meta["parent_id"] = headers["parent_id"]
        meta["task_id"] = task_id
        self._store_meta(task_id, meta)
        if source is not None and headers.get("group"):
            chord_part_from_message(self.app, headers, source, self.accept, state, exc)

    def _store_meta(self, task_id: str, meta: dict) -> None:
        try:
            self._results.append((task_id, self.backend.encode(meta), meta["status"]))
        except Exception as exc:  # noqa: BLE001
            logger.error("Cannot encode the result of %s: %s", task_id, exc)

    def _flush(self) -> None:
        """Hand pending results and acks to the settler thread, which writes them in batches
        so the hub never waits on the broker between two tasks."""
        if self._results or self._acks:
            self._settler.put((self._results, self._acks))
            self._results, self._acks = [], []

    def _settle_loop(self) -> None:
        """Store results, then acknowledge: one round trip each for everything pending."""
        results: list = []
        acks: list = []
        stopping = failing = False
        while True:
            if not results and not acks:
                if stopping:
                    return
                item = self._settler.get()
                if item is None:
                    return
                results, acks = list(item[0]), list(item[1])
            while True:  # take everything that queued up meanwhile: bigger batches under load
                try:
                    item = self._settler.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                results += item[0]
                acks += item[1]
            try:
                self.transport.ack_and_store(acks, self.backend, results)
                results, acks = [], []
                if failing:
                    logger.info("Results and acknowledgements are being written again")
                    failing = False
            except Exception as exc:  # noqa: BLE001 - keep them and try again
                if not failing:  # once per outage, not once per attempt
                    logger.error("Cannot store results / acknowledge messages: %s (retrying)", exc)
                    failing = True
                time.sleep(0.5)

    # -- stopping -------------------------------------------------------------------------

    def stop_consuming(self) -> None:
        """Fetch no more; returns once the fetcher has stopped."""
        self.consuming.clear()
        with self._window:
            self._window.notify_all()
        if self._fetcher is not None:
            self._fetcher.join(5)

    def drain(self) -> int:
        """Give back every message not yet running (ready, rate-limited, ETA-held)."""
        done = threading.Event()
        count = [0]

        def give_back() -> None:
            self.draining = True
            jobs = list(self.ready) + list(self.scheduled.values())
            for waiting in self.rate_waiting.values():
                jobs.extend(waiting)
            self.ready.clear()
            self.scheduled.clear()
            self.rate_waiting.clear()
            tags = [j.delivery.tag for j in jobs if j.delivery.tag is not None]
            if tags:
                self.transport.requeue(tags)
            self._release_window(len(jobs))
            count[0] = len(tags)
            done.set()
        self.call_soon(give_back)
        done.wait(10)
        return count[0]

    def wait_active(self, timeout: float | None, abort: Callable[[], bool] = lambda: False) -> bool:
        """Wait for running jobs to end; False when ``timeout`` passed or ``abort()`` first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.active:
            if abort() or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        """End the hub after a last flush, then the settler once it wrote everything."""
        self.events.put(("stop",))
        self._hub_done.wait(10)
        self._settler.put(None)
        if self._settler_thread.is_alive():
            self._settler_thread.join(30)


def _message_label(delivery: Any) -> str:
    envelope = delivery.envelope
    headers = envelope.headers if envelope is not None and isinstance(envelope.headers, dict) else {}
    if headers.get("task"):
        return f"{headers.get('task')}[{headers.get('id')}]"
    return f"#{delivery.tag}"
