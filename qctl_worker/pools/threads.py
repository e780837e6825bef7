"""The threads pool (``-P threads``) and the solo pool (``-P solo``: the same with one thread).

Time limits are enforced by raising ``SoftTimeLimitExceeded``/``TimeLimitExceeded`` inside
the task's thread (a thread cannot be killed): a task blocked in C code sees it only when
it returns to Python.
"""
from __future__ import annotations

import ctypes
import queue
import threading
from typing import Any

from qctl.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from qctl.trace import Outcome

from ..execution import Job, execute
from . import Pool


def raise_in_thread(thread_id: int, exc_type: type) -> bool:
    """Ask the interpreter to raise ``exc_type`` in thread ``thread_id`` at its next bytecode."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return done == 1


class ThreadPool(Pool):
    def __init__(self, app: Any, limit: int, name: str = "threads", **options: Any) -> None:
        super().__init__(app, limit, **options)
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._running: dict[int, tuple[Job, int]] = {}  # job seq -> (job, thread id)
        self._lock = threading.Lock()

    def start(self, on_outcome: Any) -> None:
        super().start(on_outcome)
        for _ in range(self.limit):
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"ThreadPoolWorker-{len(self._threads) + 1}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._running[job.seq] = (job, me)
            timer = None
            if job.soft_time_limit:
                timer = threading.Timer(job.soft_time_limit, self._expire, (job, SoftTimeLimitExceeded))
                timer.daemon = True
                timer.start()
            try:
                outcome = execute(self.app, job)
            except BaseException as exc:  # an async exception landed outside the task itself
                outcome = Outcome(job.task_id, "FAILURE", 0.0, summary=repr(exc))
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    self._running.pop(job.seq, None)
                    self._busy -= 1
            self.on_outcome(job, outcome)

    def _expire(self, job: Job, exc_type: type) -> bool:
        with self._lock:
            entry = self._running.get(job.seq)
            if entry is None or entry[0] is not job:
                return False
            return raise_in_thread(entry[1], exc_type)

    def free_slots(self) -> int:
        with self._lock:
            return self.limit - self._busy

    def apply(self, job: Job) -> None:
        with self._lock:
            self._busy += 1
        self._jobs.put(job)

    def terminate_job(self, job: Job, signum: int, reason: str) -> bool:
        return self._expire(job, TimeLimitExceeded)

    def grow(self, n: int = 1) -> None:
        self.limit += n
        for _ in range(n):
            self._add_thread()

    def shrink(self, n: int = 1) -> None:
        n = min(n, self.limit - 1)
        self.limit -= n
        for _ in range(n):
            self._jobs.put(None)

    def stop(self, timeout: float | None = None) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def terminate(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
