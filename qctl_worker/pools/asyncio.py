"""The asyncio pool (``-P asyncio``): one event loop thread runs up to ``limit`` tasks at once.

``async def`` tasks are awaited on the loop; plain functions run in the loop's thread
executor so they cannot block it. At its soft time limit a task gets ``SoftTimeLimitExceeded``
raised where it awaits (it may catch it); at the hard limit, ``TimeLimitExceeded``.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any

from qctl.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from qctl.trace import Outcome, Tracer

from ..execution import Job, execute, prepare
from . import Pool


class AsyncioPool(Pool):
    name = "asyncio"

    def __init__(self, app: Any, limit: int, **options: Any) -> None:
        super().__init__(app, limit, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="AsyncioPool", daemon=True)
        self._busy = 0
        self._tasks: dict[int, asyncio.Task] = {}
        self._drivers: dict[int, _Interruptible] = {}
        self._lock = threading.Lock()

    def start(self, on_outcome: Any) -> None:
        super().start(on_outcome)
        self._thread.start()

    def free_slots(self) -> int:
        with self._lock:
            return self.limit - self._busy

    def apply(self, job: Job) -> None:
        with self._lock:
            self._busy += 1
        self._loop.call_soon_threadsafe(self._start_job, job)

    def _start_job(self, job: Job) -> None:
        self._tasks[job.seq] = self._loop.create_task(self._run(job))

    async def _run(self, job: Job) -> None:
        try:
            outcome = await self._execute(job)
        except BaseException as exc:  # noqa: BLE001 - never lose a job's end
            outcome = Outcome(job.task_id, "FAILURE", 0.0, summary=repr(exc))
        finally:
            self._tasks.pop(job.seq, None)
            with self._lock:
                self._busy -= 1
        self.on_outcome(job, outcome)

    async def _execute(self, job: Job) -> Outcome:
        prepared = prepare(self.app, job)
        if isinstance(prepared, Outcome):
            return prepared
        task, request = prepared
        if not task._is_coroutine:
            return await self._loop.run_in_executor(None, execute, self.app, job)
        tracer = Tracer(task, request)
        tracer.begin()
        timers = []
        try:
            driver = _Interruptible(task.run(*request.args, **(request.kwargs or {})))
            self._drivers[job.seq] = driver
            current = asyncio.current_task()
            if job.soft_time_limit:
                timers.append(self._loop.call_later(job.soft_time_limit, driver.interrupt, current,
                                                    SoftTimeLimitExceeded(f"soft time limit ({job.soft_time_limit}s)")))
            if job.time_limit:
                timers.append(self._loop.call_later(job.time_limit, driver.interrupt, current,
                                                    TimeLimitExceeded(job.time_limit)))
            try:
                value = await driver
                if inspect.iscoroutine(value):
                    value = await value
            except BaseException as exc:  # noqa: BLE001
                return tracer.failed(exc)
            return tracer.succeeded(value)
        finally:
            for timer in timers:
                timer.cancel()
            self._drivers.pop(job.seq, None)
            tracer.end()

    def terminate_job(self, job: Job, signum: int, reason: str) -> bool:
        task, driver = self._tasks.get(job.seq), self._drivers.get(job.seq)
        if task is None:
            return False
        if driver is not None:
            self._loop.call_soon_threadsafe(driver.interrupt, task, TimeLimitExceeded(job.time_limit))
        else:
            self._loop.call_soon_threadsafe(task.cancel)
        return True

    def grow(self, n: int = 1) -> None:
        self.limit += n

    def stop(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._busy and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        self.terminate()

    def terminate(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)


class _Interruptible:
    """Awaits a coroutine step by step so that a time limit can raise a chosen exception at
    the point where the coroutine waits, instead of a bare ``CancelledError``."""

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.pending: BaseException | None = None

    def interrupt(self, task: "asyncio.Task", exc: BaseException) -> None:
        """Raise ``exc`` inside the coroutine: cancel the task to wake it, then swap the error."""
        if not task.done():
            self.pending = exc
            task.cancel()

    def __await__(self) -> Any:
        coro, to_throw = self.coro, None
        while True:
            try:
                yielded = coro.send(None) if to_throw is None else coro.throw(to_throw)
            except StopIteration as stop:
                return stop.value
            to_throw = None
            try:
                yield yielded
            except asyncio.CancelledError as exc:
                if self.pending is not None:
                    to_throw, self.pending = self.pending, None
                    current = asyncio.current_task()
                    if current is not None and hasattr(current, "uncancel"):
                        current.uncancel()
                else:
                    to_throw = exc
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as await does
                to_throw = exc
