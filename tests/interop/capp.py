"""The Celery 5.7 side of the interoperability tests (runs only in the Celery virtualenv).

Its tasks carry the SAME names as qctl's test app (``tests/apps/proj.py``, which the qctl side
runs), so a message sent by either kind of client runs on either kind of worker::

    proj.add  proj.mul  proj.fail  proj.sleep  proj.stamp  proj.record_run  proj.prio
    proj.retry_explicit  proj.catch_soft

They record what they do exactly as ``proj.record`` does (one JSON line per event, appended to
``runs-<pid>.jsonl`` in ``PROJ_RECORD_DIR``), with ``"side": "celery"`` added, so the tests read
the runs of both kinds of worker with ``tests.helpers.read_runs``.

Configuration comes from the environment: ``CAPP_BROKER_URL``, ``CAPP_RESULT_BACKEND``.
Client snippets (``InteropProject.celery_client``) use ``emit()`` to hand a JSON value back
and ``outcome()`` to turn a result into plain data (state, value or exception type/message).
"""
from __future__ import annotations

import json
import os
import time

from celery import Celery

app = Celery("capp", broker=os.environ.get("CAPP_BROKER_URL"),
             backend=os.environ.get("CAPP_RESULT_BACKEND") or None)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_redirect_stdouts=False,
    task_default_queue="celery",
)

#: Prefix of the line a client snippet prints its JSON answer on (other output is ignored).
MARK = "@@capp-json@@"


def _record_dir() -> str:
    return os.environ.get("PROJ_RECORD_DIR") or os.getcwd()


def record(kind: str, task_id: str | None = None, **fields) -> None:
    """Append one JSON line to this process's run file (atomic: one O_APPEND write)."""
    line = json.dumps({"kind": kind, "id": task_id, "pid": os.getpid(), "time": time.time(),
                       "side": "celery", **fields}) + "\n"
    path = os.path.join(_record_dir(), f"runs-{os.getpid()}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


# -- tasks (names shared with tests/apps/proj.py) ----------------------------------------------

@app.task(name="proj.add")
def add(x, y):
    return x + y


@app.task(name="proj.mul")
def mul(x, y):
    return x * y


@app.task(name="proj.fail")
def fail(message="boom"):
    raise ValueError(message)


@app.task(bind=True, name="proj.sleep")
def sleep(self, seconds):
    record("sleep", self.request.id, seconds=seconds)
    time.sleep(seconds)
    record("sleep-end", self.request.id)
    return seconds


@app.task(bind=True, name="proj.stamp")
def stamp(self, label=None):
    """Records when it ran (ETA/countdown checks)."""
    eta = self.request.eta
    record("stamp", self.request.id, label=label, eta=eta if eta is None else str(eta))
    return label


@app.task(bind=True, name="proj.record_run")
def record_run(self, n=None):
    """One line per execution (also used as a link callback: ``n`` is the parent's result)."""
    record("run", self.request.id, n=n, parent_id=self.request.parent_id,
           root_id=self.request.root_id)
    return n


@app.task(bind=True, name="proj.prio")
def prio(self, label):
    record("prio", self.request.id, label=label)
    return label


@app.task(bind=True, max_retries=3, name="proj.retry_explicit")
def retry_explicit(self, succeed_after, countdown=0.1):
    """Fails (and retries itself) until it has been retried ``succeed_after`` times."""
    record("retry_explicit", self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_after:
        raise self.retry(exc=KeyError(f"try {self.request.retries}"), countdown=countdown)
    return self.request.retries


@app.task(bind=True, name="proj.catch_soft")
def catch_soft(self, seconds=5):
    """Sleeps; returns "soft" when its soft time limit (prefork pool only) interrupts it."""
    from celery.exceptions import SoftTimeLimitExceeded
    record("soft", self.request.id, timelimit=self.request.timelimit)
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        record("soft-caught", self.request.id)
        return "soft"
    return "slept"


# -- helpers for client snippets -----------------------------------------------------------------

def emit(value) -> None:
    """Hand ``value`` back to the test (one marked JSON line on stdout)."""
    print(MARK + json.dumps(value, default=str), flush=True)


def outcome(result, timeout: float = 20.0) -> dict:
    """``result.get()`` as data: ``{"state", "value"}`` or the exception's type, module, args."""
    try:
        value = result.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"id": result.id, "state": result.state, "exc_type": type(exc).__name__,
                "exc_module": type(exc).__module__, "exc_args": [repr(a) for a in exc.args],
                "message": str(exc), "traceback": result.traceback}
    return {"id": result.id, "state": result.state, "value": value}


def outcomes(results, timeout: float = 30.0) -> list:
    """``outcome()`` of each result, all within one ``timeout`` (so a snippet never outlives
    the test's patience when results do not come)."""
    deadline = time.monotonic() + timeout
    return [outcome(r, timeout=max(deadline - time.monotonic(), 0.1)) for r in results]
