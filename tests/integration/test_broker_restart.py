"""A broker that goes away under a running worker: the worker logs the loss once, reconnects
with back-off and resumes consuming; nothing the broker had acknowledged is lost, and a
publish while it is down raises ``OperationalError`` instead of returning."""
from __future__ import annotations

import pytest

from qctl.exceptions import OperationalError
from tests.conftest import Project
from tests.servers_redis import start_redis, stop_redis, with_db

pytestmark = pytest.mark.timeout(180)

GET = 30.0
LOSS = r"Cannot fetch from the broker"
BACK = r"Connected to the broker again"


def _exercise_restart(project: Project, stop, start) -> None:
    worker = project.start_worker("-c", "2")
    app = project.client(task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1,
                                                    "interval_step": 0.1, "interval_max": 0.2})
    assert [r.get(timeout=GET) for r in [app.send_task("proj.add", (i, i)) for i in range(10)]] == \
        [2 * i for i in range(10)]
    # Waiting in the broker when it stops: ETA tasks due after the restart.
    delayed = [app.send_task("proj.stamp", (f"d{i}",), countdown=3) for i in range(5)]

    stop()
    worker.wait_log(LOSS, 30)
    with pytest.raises(OperationalError):
        app.send_task("proj.add", (1, 1))
    app.close()
    start()

    worker.wait_log(BACK, 60)
    after = [app.send_task("proj.add", (i, 1)) for i in range(20)]
    assert [r.get(timeout=GET) for r in after] == [i + 1 for i in range(20)]
    assert [r.get(timeout=GET) for r in delayed] == [f"d{i}" for i in range(5)]
    assert len(worker.log_lines(LOSS)) == 1, worker.tail()
    assert worker.alive()


def test_worker_survives_a_redis_restart(tmp_path, _clean_qctl_env):
    folder = tmp_path / "redis"
    url, server = start_redis(folder, durable=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    state = {"server": server}
    project = Project(tmp_path / "proj", with_db(url, 0), with_db(url, 1))
    try:
        _exercise_restart(project, lambda: stop_redis(state["server"]),
                          lambda: state.update(server=start_redis(folder, port=port, durable=True)[1]))
    finally:
        project.close()
        stop_redis(state["server"])


def test_worker_survives_a_rabbitmq_restart(tmp_path, rabbit, _clean_qctl_env):
    backend = f"sqlite:///{tmp_path}/results.sqlite3"  # results must outlive the broker
    project = Project(tmp_path / "proj", rabbit.url, backend)
    try:
        _exercise_restart(project, rabbit.stop_node, rabbit.start_node)
    finally:
        project.close()
        if rabbit.server is None or rabbit.server.poll() is not None:
            rabbit.start_node()
