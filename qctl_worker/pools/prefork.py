"""The prefork pool: forked child processes, one job at a time each, over a pipe per child.

The main process keeps the jobs; a child only ever holds the one it runs. A reader thread in
the main process waits on every child's pipe and process sentinel: an outcome frees the child,
an ended process is replaced and its job reported as lost (or as killed by its time limit).
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import resource
import selectors
import signal
import threading
from typing import Any

from qctl import signals as app_signals
from qctl.exceptions import SoftTimeLimitExceeded
from qctl.trace import Outcome

from .. import logs
from ..execution import WORKER_LOST, Job, execute
from . import Pool

logger = logging.getLogger("qctl.worker.pool")


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


_loads = pickle.loads
_PR_SET_PDEATHSIG = 1


class _Child:
    def __init__(self, process: Any, conn: Any, index: int) -> None:
        self.process = process
        self.conn = conn
        self.index = index
        self.job: Job | None = None
        self.kill_reason: str | None = None
        self.retiring = False      # takes no new job; it exits after the current one
        self.replace = True        # spawn a successor when it exits (not after a shrink)

    @property
    def pid(self) -> int:
        return self.process.pid


class PreforkPool(Pool):
    name = "prefork"

    def __init__(self, app: Any, limit: int, **options: Any) -> None:
        super().__init__(app, limit, **options)
        self._ctx = multiprocessing.get_context("fork")
        self._children: list[_Child] = []
        self._lock = threading.RLock()
        self._stopping = False
        self._reader: threading.Thread | None = None
        self._wakeup_r, self._wakeup_w = os.pipe()

    # -- life cycle -----------------------------------------------------------------------

    def start(self, on_outcome: Any) -> None:
        super().start(on_outcome)
        with self._lock:
            for _ in range(self.limit):
                self._spawn()
        self._reader = threading.Thread(target=self._read_loop, name="PoolReader", daemon=True)
        self._reader.start()

    def _spawn(self) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # Slot numbers, as Celery's %i: a replacement child takes the lowest free index, so
        # per-process log files (w1-1.log, w1-2.log) stay few however often children recycle.
        taken = {c.index for c in self._children if c.process.is_alive() or c.job is not None}
        index = next(i for i in range(1, len(self._children) + 2) if i not in taken)
        process = self._ctx.Process(
            target=_child_main, name=f"ForkPoolWorker-{index}",
            args=(child_conn, self.app, self.max_tasks_per_child, self.max_memory_per_child,
                  index))
        process.start()
        child_conn.close()
        child = _Child(process, parent_conn, index)
        self._children.append(child)
        self._wake()
        return child

    def _wake(self) -> None:
        try:
            os.write(self._wakeup_w, b"x")
        except OSError:
            pass

    def free_slots(self) -> int:
        with self._lock:
            return sum(1 for c in self._children if c.job is None and not c.retiring)

    def apply(self, job: Job) -> None:
        with self._lock:
            child = next(c for c in self._children if c.job is None and not c.retiring)
            child.job = job
            job.worker_pid = child.pid
        try:
            child.conn.send_bytes(_dumps(job.for_child()))
        except (OSError, ValueError):
            pass  # the child is gone: the reader reports the job as lost

    def terminate_job(self, job: Job, signum: int, reason: str) -> bool:
        with self._lock:
            for child in self._children:
                if child.job is job:
                    child.kill_reason = reason
                    try:
                        os.kill(child.pid, signum)
                    except ProcessLookupError:
                        pass
                    return True
        return False

    def grow(self, n: int = 1) -> None:
        with self._lock:
            self.limit += n
            for _ in range(n):
                self._spawn()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            for _ in range(min(n, self.limit - 1)):
                idle = [c for c in self._children if not c.retiring]
                child = next((c for c in idle if c.job is None), idle[-1] if idle else None)
                if child is None:
                    break
                child.retiring = True
                child.replace = False
                self.limit -= 1
                if child.job is None:
                    self._send_stop(child)

    def restart(self) -> None:
        """Replace every child: idle ones now, busy ones after their current task."""
        with self._lock:
            for child in self._children:
                child.retiring = True          # takes no new job; a successor is spawned
                if child.job is None:
                    self._send_stop(child)

    def _send_stop(self, child: _Child) -> None:
        try:
            child.conn.send_bytes(_dumps(None))
        except (OSError, ValueError):
            pass

    def stop(self, timeout: float | None = None) -> None:
        self._stopping = True
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.job is None:
                self._send_stop(child)
        for child in children:
            child.process.join(timeout)
        self.terminate()

    def terminate(self) -> None:
        self._stopping = True
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.process.is_alive():
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for child in children:
            child.process.join(2)
        self._wake()

    def pids(self) -> list[int]:
        with self._lock:
            return [c.pid for c in self._children]

    def active_pids(self) -> dict[int, Job]:
        with self._lock:
            return {c.pid: c.job for c in self._children if c.job is not None}

    # -- the reader thread ----------------------------------------------------------------

    def _read_loop(self) -> None:
        # One selector for the pool's life: children are (un)registered as they come and go,
        # instead of building a new poll set for every wake-up.
        selector = selectors.DefaultSelector()
        selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        watched: dict[_Child, tuple] = {}
        while True:
            with self._lock:
                children = list(self._children)
            if self._stopping and not any(c.process.is_alive() for c in children):
                return
            for child in children:
                if child not in watched:
                    keys = (child.conn.fileno(), child.process.sentinel)
                    selector.register(keys[0], selectors.EVENT_READ, (child, "conn"))
                    selector.register(keys[1], selectors.EVENT_READ, (child, "sentinel"))
                    watched[child] = keys
            for child in [c for c in watched if c not in children]:
                for fd in watched.pop(child):
                    try:
                        selector.unregister(fd)
                    except (KeyError, ValueError):
                        pass
            for key, _ in selector.select(timeout=1.0):
                if key.data is None:
                    os.read(self._wakeup_r, 4096)
                    continue
                child, kind = key.data
                if child not in watched:
                    continue
                if kind == "conn":
                    if not self._receive(child):
                        self._end(child, selector, watched)
                elif child.process.exitcode is not None or not child.process.is_alive():
                    while child.conn.poll(0) and self._receive(child):
                        pass  # an outcome may still sit in the pipe
                    self._end(child, selector, watched)

    def _end(self, child: _Child, selector: Any, watched: dict) -> None:
        for fd in watched.pop(child, ()):
            try:
                selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._reap(child)

    def _receive(self, child: _Child) -> bool:
        """Read one message from ``child``; False when its pipe is closed (it exited)."""
        try:
            message = _loads(child.conn.recv_bytes())
        except (EOFError, OSError):
            return False
        if isinstance(message, tuple) and len(message) == 2 and isinstance(message[0], Outcome):
            message, exiting = message
            if exiting:  # recycled after this task: it must not be handed another one
                child.retiring = True
        if isinstance(message, Outcome):
            with self._lock:
                job, child.job = child.job, None
            if job is not None:
                self.on_outcome(job, message)
            if child.retiring:
                self._send_stop(child)
        return True

    def _reap(self, child: _Child) -> None:
        with self._lock:
            if child not in self._children:
                return
            self._children.remove(child)
            job, child.job = child.job, None
            child.process.join(0.1)
            code = child.process.exitcode
            if not self._stopping and child.replace:
                self._spawn()
        try:
            child.conn.close()
        except OSError:
            pass
        if job is not None:
            if child.kill_reason:
                state, text = child.kill_reason, f"killed by signal (pid {child.pid})"
            else:
                state, text = WORKER_LOST, _exit_text(code)
            self.on_outcome(job, Outcome(job.task_id, state, 0.0, summary=text))
        elif code not in (0, None) and not self._stopping:
            logger.warning("Pool process %s exited unexpectedly: %s", child.pid, _exit_text(code))


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exitcode {code}"


# -- inside the child -----------------------------------------------------------------------

_in_task = False


def _on_soft_limit(signum: int, frame: Any) -> None:
    if _in_task:
        raise SoftTimeLimitExceeded("SoftTimeLimitExceeded()")


def _on_usr1(signum: int, frame: Any) -> None:
    logs.write_stacks_raw(multiprocessing.current_process().name)


def _child_main(conn: Any, app: Any, max_tasks: int | None, max_memory_kib: int | None,
                index: int = 0) -> None:
    global _in_task
    # The main process handles INT/TERM/QUIT/HUP for the node (a Ctrl+C reaches the whole
    # process group: children must not act on it); a child only dies with the node. TERM
    # stays default so the node can end a child; USR1 dumps this child's stacks.
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN if signum != signal.SIGTERM else signal.SIG_DFL)
    signal.signal(signal.SIGALRM, _on_soft_limit)
    signal.signal(signal.SIGUSR1, _on_usr1)
    logs.setup_child(index)
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux: the pipe's EOF still ends us when idle
        pass
    app_signals.worker_process_init.send(sender=None)
    done = 0
    while True:
        try:
            job = _loads(conn.recv_bytes())
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if job is None:
            break
        soft = job.soft_time_limit
        _in_task = True
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)
        try:
            outcome = execute(app, job)
        finally:
            if soft:
                signal.setitimer(signal.ITIMER_REAL, 0)
            _in_task = False
        done += 1
        # Decide before reporting, so the parent never hands a job to a child about to exit.
        exiting = bool(max_tasks and done >= max_tasks)
        if max_memory_kib and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > max_memory_kib:
            logging.getLogger("qctl.worker.pool").info(
                "Pool process %s over --max-memory-per-child (%s KiB): replacing it",
                os.getpid(), max_memory_kib)
            exiting = True
        try:
            conn.send_bytes(_dumps((outcome, exiting) if exiting else outcome))
        except (OSError, ValueError):
            break
        if exiting:
            break
    app_signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    logging.shutdown()
    os._exit(0)
