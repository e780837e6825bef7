"""Remote control against a running fleet of two nodes, on every broker: inspect, control,
status, through the Python API and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from qctl import states
from qctl.exceptions import TaskRevokedError
from qctl.transports import ControlMessage
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

GET = 20.0


@pytest.fixture
def fleet(broker_project):
    """Two nodes, w1 and w2, on one broker; returns (project, client app, [w1, w2])."""
    w1 = broker_project.start_worker("-n", "w1@%h", "-c", "2")
    w2 = broker_project.start_worker("-n", "w2@%h", "-c", "1")
    app = broker_project.client()
    wait_for(lambda: len(app.control.ping(timeout=1.0)) == 2, 20)
    return broker_project, app, [w1, w2]


def test_ping_and_status_answer_before_the_timeout(fleet):
    project, app, (w1, w2) = fleet
    names = {w1.hostname, w2.hostname}
    started = time.monotonic()
    replies = app.control.inspect(timeout=10).ping()
    elapsed = time.monotonic() - started
    assert replies == {name: {"ok": "pong"} for name in names}
    if app.transport.live_nodes() is not None:  # the broker knows who is alive
        assert elapsed < 5, f"waited {elapsed:.1f}s for nodes that had all answered"
    out = subprocess.run([sys.executable, "-m", "qctl", "-A", "proj", "status", "-t", "10"],
                         cwd=project.path, env=project.env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "2 node(s) online." in out.stdout
    for name in names:
        assert name in out.stdout


def test_inspect_commands_describe_the_nodes(fleet):
    project, app, (w1, w2) = fleet
    gate = f"insp-{uuid.uuid4().hex}"
    running = app.send_task("proj.gated", (gate, "x"))
    wait_for(lambda: project.runs("gated", running.id), GET)
    inspect = app.control.inspect(destination=[w1.hostname, w2.hostname], timeout=5)
    stats = inspect.stats()
    for name in (w1.hostname, w2.hostname):
        assert {"broker", "total", "pool", "rusage", "prefetch_count", "pid"} <= set(stats[name])
    assert stats[w1.hostname]["pool"]["max-concurrency"] == 2
    active = inspect.active()
    ids = [task["id"] for node in active.values() for task in node]
    assert ids == [running.id]
    info = next(task for node in active.values() for task in node)
    assert info["name"] == "proj.gated" and info["args"] == [gate, "x"] and info["worker_pid"]
    assert "proj.add" in inspect.registered()[w1.hostname]
    assert any(q["name"] == "celery" for q in inspect.active_queues()[w2.hostname])
    queried = inspect.query_task(running.id)
    assert [entry[0] for node in queried.values() for entry in node.values()] == ["active"]
    assert "clock" in inspect.clock()[w1.hostname]
    conf = inspect.conf()[w1.hostname]
    assert isinstance(conf, dict) and "broker_transport_options" in conf
    assert "ok" in inspect.report()[w1.hostname]
    project.open_gate(gate)
    assert running.get(timeout=GET) == "x"


def test_rate_limit_changes_at_run_time(fleet):
    project, app, (w1, w2) = fleet
    replies = app.control.rate_limit("proj.stamp", "2/s", reply=True, timeout=5)
    assert {k: v for r in replies for k, v in r.items()} == {
        w1.hostname: {"ok": "new rate limit set successfully"},
        w2.hostname: {"ok": "new rate limit set successfully"}}
    bad = app.control.rate_limit("proj.stamp", "xx/q", reply=True, timeout=5)
    assert all("error" in reply for r in bad for reply in r.values())
    unknown = app.control.rate_limit("proj.nope", "1/s", reply=True, timeout=5)
    assert all(reply == {"error": "unknown task"} for r in unknown for reply in r.values())
    results = [app.send_task("proj.stamp", (i,)) for i in range(6)]
    assert [r.get(timeout=GET) for r in results] == list(range(6))
    starts = sorted(run["time"] for run in project.runs("stamp"))
    # two nodes at 2/s each: six tasks need at least ~1 s from first to last start
    assert starts[-1] - starts[0] >= 0.9
    off = app.control.rate_limit("proj.stamp", "0", reply=True, timeout=5)
    assert all(reply == {"ok": "rate limit disabled successfully"} for r in off for reply in r.values())


def test_time_limit_and_revoke(fleet):
    project, app, (w1, w2) = fleet
    replies = app.control.time_limit("proj.catch_soft", soft=0.3, hard=10, reply=True, timeout=5)
    assert all(reply == {"ok": "time limits set successfully"} for r in replies for reply in r.values())
    assert app.send_task("proj.catch_soft", (5,)).get(timeout=GET) == "soft"

    doomed = str(uuid.uuid4())
    app.control.revoke(doomed, reply=True, timeout=5)
    result = app.send_task("proj.stamp", ("never",), task_id=doomed)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=GET)
    assert project.runs("stamp", doomed) == []
    revoked = app.control.inspect(timeout=5).revoked()
    assert all(doomed in ids for ids in revoked.values())

    gate = f"term-{uuid.uuid4().hex}"
    running = app.send_task("proj.gated", (gate, "x"))
    wait_for(lambda: project.runs("gated", running.id), GET)
    replies = app.control.revoke(running.id, terminate=True, signal="SIGKILL", reply=True, timeout=5)
    texts = [reply["ok"] for r in replies for reply in r.values()]
    assert f"terminate: {running.id}" in texts
    assert wait_for(lambda: running.state == states.REVOKED or None, GET)
    assert app.send_task("proj.add", (1, 2)).get(timeout=GET) == 3


def test_consumers_pool_and_shutdown(fleet):
    project, app, (w1, w2) = fleet
    reply = app.control.add_consumer("extra", destination=[w2.hostname], reply=True, timeout=5)
    assert reply == [{w2.hostname: {"ok": "add consumer extra"}}]
    assert app.send_task("proj.add", (2, 2), queue="extra").get(timeout=GET) == 4
    reply = app.control.cancel_consumer("extra", destination=[w2.hostname], reply=True, timeout=5)
    assert reply == [{w2.hostname: {"ok": "no longer consuming from extra"}}]

    assert app.control.pool_grow(2, destination=[w1.hostname], reply=True, timeout=5) == \
        [{w1.hostname: {"ok": "pool will grow"}}]
    stats = app.control.inspect(destination=[w1.hostname], timeout=5).stats()
    assert stats[w1.hostname]["pool"]["max-concurrency"] == 4
    assert app.control.pool_shrink(1, destination=[w1.hostname], reply=True, timeout=5) == \
        [{w1.hostname: {"ok": "pool will shrink"}}]

    assert app.control.inspect(destination=["nobody@nowhere"], timeout=1).ping() is None
    # a malformed control message does not hurt the nodes
    app.transport.broadcast(f"{app.conf.control_exchange}.pidbox", ControlMessage(b"\xff{nope", {}))
    assert len(app.control.ping(timeout=5)) == 2

    app.control.shutdown(destination=[w2.hostname])
    assert w2.wait_exit(30) == 0
    assert app.control.inspect(timeout=5).ping() == {w1.hostname: {"ok": "pong"}}
    assert app.send_task("proj.add", (5, 5)).get(timeout=GET) == 10


def test_cli_inspect_and_control(fleet):
    project, app, (w1, w2) = fleet

    def qctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qctl", "-A", "proj", *args], cwd=project.path,
                              env=project.env(), capture_output=True, text=True, timeout=60)
    out = qctl("inspect", "ping", "--json", "-t", "10")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {w1.hostname: {"ok": "pong"}, w2.hostname: {"ok": "pong"}}
    out = qctl("control", "rate_limit", "proj.add", "10/m", "-d", w1.hostname)
    assert out.returncode == 0, out.stderr
    assert f"{w1.hostname}: OK" in out.stdout and "new rate limit set successfully" in out.stdout
    bad = qctl("control", "rate_limit", "proj.add", "often")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    none = qctl("inspect", "ping", "-d", "nobody@nowhere", "-t", "1")
    assert none.returncode == 69 and "No nodes replied" in none.stderr


def test_autoscale_grows_with_work_and_obeys_the_control_command(broker_project):
    node = broker_project.start_worker("-n", "auto@%h", "--autoscale", "3,1")
    app = broker_project.client()
    inspect = app.control.inspect(destination=[node.hostname], timeout=5)
    assert inspect.stats()[node.hostname]["pool"]["max-concurrency"] == 1
    gate = f"auto-{uuid.uuid4().hex}"
    held = [app.send_task("proj.gated", (gate, i)) for i in range(4)]
    wait_for(lambda: inspect.stats()[node.hostname]["pool"]["max-concurrency"] == 3 or None, 20)
    assert inspect.stats()[node.hostname]["autoscaler"]["max"] == 3
    reply = app.control.autoscale(2, 1, destination=[node.hostname], reply=True, timeout=5)
    assert reply == [{node.hostname: {"ok": "autoscale now max=2 min=1"}}]
    assert inspect.stats()[node.hostname]["pool"]["max-concurrency"] == 2
    grow = app.control.pool_grow(1, destination=[node.hostname], reply=True, timeout=5)
    assert "error" in grow[0][node.hostname]
    broker_project.open_gate(gate)
    assert sorted(r.get(timeout=GET) for r in held) == [0, 1, 2, 3]


def test_pool_restart_replaces_the_pool_processes(broker_project):
    node = broker_project.start_worker("-n", "restart@%h", "-c", "2",
                                       env={"QCTL_WORKER_POOL_RESTARTS": "true"})
    app = broker_project.client()
    inspect = app.control.inspect(destination=[node.hostname], timeout=5)
    before = set(inspect.stats()[node.hostname]["pool"]["processes"])
    assert app.control.pool_restart(destination=[node.hostname], reply=True, timeout=5) == \
        [{node.hostname: {"ok": "reload started"}}]
    wait_for(lambda: (lambda now: len(now) == 2 and not now & before or None)(
        set(inspect.stats()[node.hostname]["pool"]["processes"])), 20)
    assert app.send_task("proj.add", (1, 1)).get(timeout=GET) == 2
