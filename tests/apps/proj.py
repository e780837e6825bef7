"""The app the worker integration tests run: ``qctl -A proj worker ...``.

``tests/conftest.py`` copies this file into a temporary project folder and starts workers
there. Configuration comes from the environment, so one file serves every test:

- ``QCTL_BROKER_URL``: the broker and (by default) the result store: the library honours it
  over anything set here.
- ``PROJ_VISIBILITY_TIMEOUT``: the broker lease (``visibility_timeout``) in seconds.
- ``PROJ_RECORD_DIR``: where tasks record their runs (default: the working directory).

Tasks record what they do with ``record()``: one JSON line per event, appended (``O_APPEND``,
one ``write``) to ``runs-<pid>.jsonl``, a file per process, never in the broker file. Tests
read them back with ``tests.helpers.read_runs``. Tasks that must stay running until the test
has looked at them wait for a *gate* file (``gate-<name>``) that the test creates.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from qctl import App
from qctl.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from qctl.routing import Queue

app = App("proj")
app.conf.update(
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("PROJ_VISIBILITY_TIMEOUT") or 30)},
    task_queues=[Queue("celery"), Queue("other"), Queue("third")],
    task_routes={"proj.other_*": {"queue": "other"}, "proj.third_*": {"queue": "third"}},
)

#: Route table the test clients use too (they do not import this module).
ROUTES = {"proj.other_*": {"queue": "other"}, "proj.third_*": {"queue": "third"}}

GATE_TIMEOUT = 60.0


def _record_dir() -> str:
    return os.environ.get("PROJ_RECORD_DIR") or os.getcwd()


def record(kind: str, task_id: str | None = None, **fields) -> None:
    """Append one JSON line to this process's run file (atomic: one O_APPEND write)."""
    line = json.dumps({"kind": kind, "id": task_id, "pid": os.getpid(), "time": time.time(),
                       **fields}) + "\n"
    path = os.path.join(_record_dir(), f"runs-{os.getpid()}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def wait_gate(name: str, timeout: float = GATE_TIMEOUT) -> bool:
    """Block until the test creates ``gate-<name>`` (True) or ``timeout`` passes (False)."""
    path = os.path.join(_record_dir(), f"gate-{name}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


# -- plain values and failures ---------------------------------------------------------------

@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def fail(message="boom"):
    raise ValueError(message)


@app.task(bind=True)
def sleep(self, seconds):
    record("sleep", self.request.id, seconds=seconds)
    time.sleep(seconds)
    record("sleep-end", self.request.id)
    return seconds


@app.task(bind=True)
def stamp(self, label=None):
    """Records when it ran (ETA/countdown checks)."""
    record("stamp", self.request.id, label=label, eta=self.request.eta)
    return label


@app.task(bind=True)
def gated(self, gate, value=None):
    """Runs until the test opens ``gate``."""
    record("gated", self.request.id, gate=gate)
    if not wait_gate(gate):
        raise RuntimeError(f"gate {gate!r} never opened")
    record("gated-end", self.request.id, gate=gate)
    return value


@app.task
def getpid():
    return os.getpid()


# -- states -----------------------------------------------------------------------------------

@app.task(bind=True)
def progress(self, gate, total=3):
    """PROGRESS state with meta while waiting for the test, then SUCCESS."""
    self.update_state(state="PROGRESS", meta={"current": 1, "total": total})
    record("progress", self.request.id)
    if not wait_gate(gate):
        raise RuntimeError(f"gate {gate!r} never opened")
    return total


@app.task(bind=True, track_started=True)
def tracked(self, gate):
    record("tracked", self.request.id)
    if not wait_gate(gate):
        raise RuntimeError(f"gate {gate!r} never opened")
    return "tracked"


@app.task(bind=True, ignore_result=True)
def ignored(self, value=42):
    record("ignored", self.request.id)
    return value


@app.task(bind=True)
def reject(self, requeue=False):
    record("reject", self.request.id)
    raise Reject("not for me", requeue=requeue)


@app.task(bind=True)
def ignore_me(self):
    record("ignore_me", self.request.id)
    raise Ignore()


# -- retries ----------------------------------------------------------------------------------

@app.task(bind=True, max_retries=3)
def retry_explicit(self, succeed_after, countdown=0.1):
    """Fails (and retries itself) until it has been retried ``succeed_after`` times."""
    record("retry_explicit", self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_after:
        raise self.retry(exc=KeyError(f"try {self.request.retries}"), countdown=countdown)
    return self.request.retries


@app.task(bind=True, autoretry_for=(IOError,), retry_backoff=0.2, retry_jitter=False,
          retry_backoff_max=5, max_retries=3)
def retry_auto(self, succeed_after):
    record("retry_auto", self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_after:
        raise IOError(f"flaky {self.request.retries}")
    return self.request.retries


# -- reliability --------------------------------------------------------------------------------

@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def late_gated(self, gate, value=None):
    """acks_late: the message stays leased until this returns."""
    record("late_gated", self.request.id, gate=gate)
    if not wait_gate(gate):
        raise RuntimeError(f"gate {gate!r} never opened")
    return value


@app.task(bind=True)
def suicide(self):
    """Kills the process running it (early ack: the message is already acknowledged)."""
    record("suicide", self.request.id)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def suicide_late(self):
    """Kills the process running it; acks_late + reject_on_worker_lost: redelivered."""
    record("suicide_late", self.request.id)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True)
def record_run(self, n=None):
    """Exactly-once counting: one line per execution."""
    record("run", self.request.id)
    return n


# -- limits -----------------------------------------------------------------------------------

@app.task(bind=True, rate_limit="5/s")
def limited(self, n):
    record("limited", self.request.id, n=n)
    return n


def _catch_soft(task, seconds):
    record("soft", task.request.id)
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        record("soft-caught", task.request.id)
        return "soft"
    return "slept"


@app.task(bind=True, soft_time_limit=0.5, time_limit=10)
def soft_limited(self, seconds=5):
    """Soft limit from the task's options: catches SoftTimeLimitExceeded."""
    return _catch_soft(self, seconds)


@app.task(bind=True)
def catch_soft(self, seconds=5):
    """No limit of its own (the worker's --soft-time-limit applies)."""
    return _catch_soft(self, seconds)


@app.task(bind=True, time_limit=1)
def hard_limited(self, seconds=10):
    """Sleeps past its hard time limit."""
    record("hard", self.request.id)
    time.sleep(seconds)
    return "not killed"


@app.task(bind=True)
def stubborn(self, seconds=10):
    """Ignores the soft limit and sleeps on (the worker's --time-limit must kill it)."""
    record("stubborn", self.request.id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(max(deadline - time.monotonic(), 0))
        except SoftTimeLimitExceeded:
            record("stubborn-soft", self.request.id)
    return "not killed"


@app.task(bind=True)
def alloc(self, megabytes):
    """Touches ``megabytes`` MiB (resident, not just reserved) and returns its pid."""
    block = b"x" * (megabytes * 1024 * 1024)
    record("alloc", self.request.id, size=len(block))
    del block
    return os.getpid()


# -- pools ------------------------------------------------------------------------------------

@app.task(bind=True)
async def async_sleep(self, seconds):
    record("async_sleep", self.request.id)
    await asyncio.sleep(seconds)
    record("async_sleep-end", self.request.id)
    return seconds


@app.task(bind=True)
async def async_catch_soft(self, seconds=5):
    """async def under a soft time limit: catches SoftTimeLimitExceeded like a sync task."""
    record("async-soft", self.request.id)
    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        record("async-soft-caught", self.request.id)
        return "soft"
    return "slept"


# -- routing ----------------------------------------------------------------------------------

@app.task(bind=True)
def other_add(self, x, y):
    """Routed to the 'other' queue."""
    record("other_add", self.request.id)
    return x + y


@app.task(bind=True)
def third_add(self, x, y):
    """Routed to the 'third' queue."""
    record("third_add", self.request.id)
    return x + y


@app.task(bind=True)
def prio(self, label):
    record("prio", self.request.id, label=label)
    return label


# -- periodic tasks (beat) -------------------------------------------------------------------
# PROJ_BEAT='{"every-second": 1.0, "nightly": {"crontab": {"minute": "0", "hour": "3"}}}'
# gives beat entries that send proj.tick(name); a number is seconds.

def _beat_schedule(text: str) -> dict:
    from qctl.schedules import crontab
    entries = {}
    for name, spec in json.loads(text).items():
        sched = crontab(**spec["crontab"]) if isinstance(spec, dict) else float(spec)
        entries[name] = {"task": "proj.tick", "schedule": sched, "args": (name,)}
    return entries


if os.environ.get("PROJ_BEAT"):
    app.conf.beat_schedule = _beat_schedule(os.environ["PROJ_BEAT"])


@app.task(bind=True)
def tick(self, name):
    """One beat tick: the task id is the tick's id (entry, scheduled time)."""
    record("tick", self.request.id, entry=name)
    return name


# -- workflows (canvas) ----------------------------------------------------------------------
# Chain steps, chord bodies and link callbacks record their runs with the ``label`` the test
# gave them, so a test can tell which step of which workflow ran (or never ran).

@app.task(bind=True)
def identity(self, value, label=None):
    """Returns ``value`` unchanged (a chord body here receives the header's list)."""
    record("identity", self.request.id, label=label, value=value, group=self.request.group,
           parent_id=self.request.parent_id, root_id=self.request.root_id)
    return value


@app.task(bind=True)
def step(self, x, y=0, label=None):
    """``x + y``, recorded with the ids that link it to the rest of its workflow."""
    record("step", self.request.id, label=label, x=x, y=y,
           parent_id=self.request.parent_id, root_id=self.request.root_id)
    return x + y


@app.task
def tsum(numbers):
    """Sum of a list (a chord body's header results)."""
    return sum(numbers)


@app.task
def xsum(numbers):
    """Sum of a list of lists (the results of chunks, or of a group of groups)."""
    return sum(sum(part) if isinstance(part, (list, tuple)) else part for part in numbers)


@app.task
def delayed(value, seconds=0.0):
    """Returns ``value`` after ``seconds``: header tasks that finish out of order."""
    time.sleep(seconds)
    return value


@app.task(bind=True)
def fail_with(self, *args, message="boom"):
    """Raises ``ValueError(message)`` whatever it is given (a failing step of a workflow)."""
    record("fail_with", self.request.id, args=list(args), message=message)
    raise ValueError(message)


@app.task(bind=True)
def errback_request(self, request, exc, traceback, label=None):
    """An errback of the old form: called in the worker with the failed task's request, its
    exception and traceback text."""
    record("errback_request", self.request.id, label=label, failed_id=request.id,
           failed_group=getattr(request, "group", None), exc_type=type(exc).__name__,
           exc=str(exc), traceback=str(traceback))


@app.task(bind=True)
def errback_id(self, failed_id):
    """An errback of the new form: sent as a task with the failed task's id."""
    record("errback_id", self.request.id, failed_id=failed_id,
           parent_id=self.request.parent_id)
    return failed_id
