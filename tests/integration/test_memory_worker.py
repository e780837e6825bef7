"""The memory broker is a product feature: a worker embedded in the same process.

``memory://`` queues live in one process, so the worker runs here, on the threads pool,
started and stopped through ``Worker.start()``/``Worker.stop()`` (what ``run()`` does
without signal handling).
"""
from __future__ import annotations

import time
import uuid

import pytest

from qctl import App, states
from qctl.exceptions import TaskRevokedError
from qctl.transports import Envelope
from qctl_worker.worker import Worker
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app():
    url = f"memory://{uuid.uuid4().hex}"
    app = App("mem", broker=url, backend=url, set_as_current=False)
    runs: list[tuple[str, float]] = []

    @app.task(name="mem.add")
    def add(x, y):
        return x + y

    @app.task(name="mem.stamp", bind=True)
    def stamp(self, label):
        runs.append((self.request.id, time.time()))
        return label

    @app.task(name="mem.flaky", bind=True, max_retries=3)
    def flaky(self):
        if self.request.retries < 2:
            raise self.retry(countdown=0.1)
        return self.request.retries

    @app.task(name="mem.fail")
    def fail():
        raise KeyError("missing")

    app.runs = runs
    return app


@pytest.fixture
def worker(app):
    node = Worker(app, pool="threads", concurrency=2, quiet=True, hostname="mem@%h")
    node.start()
    yield node
    node.stop()


def test_in_process_worker_runs_tasks(app, worker):
    assert [app.send_task("mem.add", (i, 1)).get(timeout=10) for i in range(5)] == [1, 2, 3, 4, 5]
    result = app.send_task("mem.fail")
    with pytest.raises(KeyError):
        result.get(timeout=10)
    assert result.state == states.FAILURE


def test_countdown_expires_and_retry_on_memory(app, worker):
    sent = time.time()
    later = app.send_task("mem.stamp", ("x",), countdown=0.5)
    assert later.get(timeout=10) == "x"
    assert [t for i, t in app.runs if i == later.id][0] >= sent + 0.5 - 0.05
    expired = app.send_task("mem.stamp", ("y",), expires=-1)
    with pytest.raises(TaskRevokedError):
        expired.get(timeout=10)
    assert app.send_task("mem.flaky").get(timeout=10) == 2


def test_bad_input_is_dead_lettered_on_memory(app, worker):
    app.send_task("mem.nope")
    app.transport.publish("celery", Envelope(body=b"\x00garbage", headers={"task": "mem.add", "id": "bad-1"},
                                             properties={}))
    assert app.send_task("mem.add", (1, 1)).get(timeout=10) == 2
    letters = wait_for(lambda: (lambda d: d if len(d) >= 2 else None)(app.transport.dead_letters()), 10)
    assert {"unregistered task 'mem.nope'"} <= {l.reason for l in letters}
