"""A real worker process end to end: results, states, ETA/expiry, retries, logs, pools,
queue selection, priority and the state db (SPEC §2, §4)."""
from __future__ import annotations

import re
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from qctl import states
from qctl.exceptions import TaskRevokedError, TimeoutError as QctlTimeoutError
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

GET = 15  # seconds: generous deadline for a result that should come at once


@pytest.fixture(scope="module")
def project(module_project):
    return module_project


@pytest.fixture(scope="module")
def worker(project):
    """One prefork node shared by the tests that need nothing special."""
    return project.start_worker("-c", "2", "-P", "prefork", "-n", "w1@%h")


@pytest.fixture(scope="module")
def app(project, worker):
    app = project.client()

    # Client-side declarations of the worker's tasks, so tests can use delay()/apply_async().
    @app.task(name="proj.add")
    def add(x, y):
        raise AssertionError("runs in the worker only")

    @app.task(name="proj.fail")
    def fail(message="boom"):
        raise AssertionError("runs in the worker only")

    return app


def send(app, name, *args, **options):
    return app.send_task(name, args=list(args), **options)


# -- values, failures, states ----------------------------------------------------------------

def test_delay_get_returns_value(app):
    result = app.tasks["proj.add"].delay(2, 2)
    assert result.get(timeout=GET) == 4
    assert result.state == states.SUCCESS
    assert result.successful() and result.ready() and not result.failed()
    assert result.date_done is not None
    assert result.traceback is None
    assert send(app, "proj.mul", 6, 7).get(timeout=GET) == 42
    assert app.tasks["proj.add"].apply_async((["a"], ["b"])).get(timeout=GET) == ["a", "b"]


def test_failure_propagates_type_message_and_traceback(app, worker):
    result = app.tasks["proj.fail"].delay("kaboom 42")
    with pytest.raises(ValueError, match="kaboom 42"):
        result.get(timeout=GET)
    assert result.state == states.FAILURE
    assert result.failed() and result.ready() and not result.successful()
    assert isinstance(result.result, ValueError)
    assert result.result.args == ("kaboom 42",)
    # propagate=False hands the exception back instead of raising it
    assert isinstance(result.get(timeout=GET, propagate=False), ValueError)
    tb = result.traceback
    assert tb and "Traceback (most recent call last)" in tb
    assert "ValueError: kaboom 42" in tb
    assert "proj.py" in tb and "raise ValueError(message)" in tb
    worker.wait_log(rf"ERROR/MainProcess\] Task proj\.fail\[{result.id}\] raised unexpected: "
                    r"ValueError\('kaboom 42'\)$")


def test_unknown_id_is_pending(app):
    result = app.AsyncResult(str(uuid.uuid4()))
    assert result.state == states.PENDING
    assert not result.ready()
    with pytest.raises(QctlTimeoutError):
        result.get(timeout=0.2, interval=0.05)


def test_ignore_result_stores_nothing(app, project, worker):
    ignored = send(app, "proj.ignored", 7)
    wait_for(lambda: project.runs("ignored", ignored.id), GET)
    worker.wait_log(rf"Task proj\.ignored\[{ignored.id}\] succeeded in .*: 7$")
    # Also when asked per call, for a task that would store its result otherwise.
    per_call = send(app, "proj.add", 1, 1, ignore_result=True)
    worker.wait_log(rf"Task proj\.add\[{per_call.id}\] succeeded in .*: 2$")
    # A task received after those lines were logged is settled in a later round of the
    # worker's loop: once its result is stored, anything the ignored ones stored would be too.
    assert send(app, "proj.add", 2, 3).get(timeout=GET) == 5
    for result in (ignored, per_call):
        assert app.backend.get(result.id) is None
        assert result.state == states.PENDING
        with pytest.raises(QctlTimeoutError):
            result.get(timeout=0.2, interval=0.05)


def test_custom_progress_state_visible_while_running(app, project):
    gate = f"progress-{uuid.uuid4().hex}"
    result = send(app, "proj.progress", gate, 5)
    try:
        wait_for(lambda: result.state == "PROGRESS", GET,
                 message=lambda: f"state is {result.state}")
        assert result.info == {"current": 1, "total": 5}
        assert not result.ready()
    finally:
        project.open_gate(gate)
    assert result.get(timeout=GET) == 5
    assert result.state == states.SUCCESS


def test_track_started_gives_started_while_running(app, project, worker):
    gate = f"tracked-{uuid.uuid4().hex}"
    result = send(app, "proj.tracked", gate)
    try:
        wait_for(lambda: result.state == states.STARTED, GET,
                 message=lambda: f"state is {result.state}")
        assert not result.ready()
        run = wait_for(lambda: project.runs("tracked", result.id), GET)[0]
        info = result.info
        assert info["hostname"] == worker.hostname
        # Celery stores the pid of the process that runs the task in the STARTED meta.
        assert info["pid"] == run["pid"], f"STARTED meta: {info!r}"
    finally:
        project.open_gate(gate)
    assert result.get(timeout=GET) == "tracked"
    assert result.state == states.SUCCESS


def test_task_without_track_started_stays_pending_while_running(app, project):
    gate = f"untracked-{uuid.uuid4().hex}"
    result = send(app, "proj.gated", gate, "v")
    try:
        wait_for(lambda: project.runs("gated", result.id), GET)
        assert result.state == states.PENDING
    finally:
        project.open_gate(gate)
    assert result.get(timeout=GET) == "v"


def test_ignore_and_reject(app, project, worker):
    ignored = send(app, "proj.ignore_me")
    rejected = send(app, "proj.reject")
    wait_for(lambda: project.runs("ignore_me", ignored.id), GET)
    worker.wait_log(rf"{rejected.id}")
    letter = wait_for(lambda: [d for d in app.transport.dead_letters(1000)
                               if d.envelope and d.envelope.headers.get("id") == rejected.id], GET)
    assert "reject" in letter[0].reason and "not for me" in letter[0].reason
    assert send(app, "proj.add", 1, 2).get(timeout=GET) == 3
    assert app.backend.get(ignored.id) is None       # Ignore: nothing stored
    assert len(project.runs("ignore_me", ignored.id)) == 1
    assert len(project.runs("reject", rejected.id)) == 1


# -- ETA, countdown, expiry ------------------------------------------------------------------

def test_countdown_and_eta_run_at_or_after_their_time(app, project):
    eta = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    by_eta = send(app, "proj.stamp", "eta", eta=eta)
    sent = time.time()
    by_countdown = send(app, "proj.stamp", "countdown", countdown=1.0)
    assert by_countdown.get(timeout=GET) == "countdown"
    assert by_eta.get(timeout=GET) == "eta"
    (ran,) = project.runs("stamp", by_countdown.id)
    announced = datetime.fromisoformat(ran["eta"]).timestamp()
    assert announced >= sent + 1.0 - 0.01
    assert ran["time"] >= announced, f"ran {announced - ran['time']:.3f}s before its countdown"
    (ran,) = project.runs("stamp", by_eta.id)
    assert ran["time"] >= eta.timestamp(), f"ran {eta.timestamp() - ran['time']:.3f}s early"


def test_expired_in_the_past_is_revoked_not_run(app, project):
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    result = send(app, "proj.stamp", "expired", expires=past)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=GET)
    assert result.state == states.REVOKED
    # expires while waiting for its ETA: revoked at the ETA, not run
    later = send(app, "proj.stamp", "expires-before-eta", countdown=1.0, expires=0.5)
    with pytest.raises(TaskRevokedError):
        later.get(timeout=GET)
    assert send(app, "proj.add", 1, 1).get(timeout=GET) == 2
    assert project.runs("stamp", result.id) == []
    assert project.runs("stamp", later.id) == []


# -- retries ----------------------------------------------------------------------------------

def test_explicit_retry_reaches_success(app, project):
    result = send(app, "proj.retry_explicit", 2)
    assert result.get(timeout=GET) == 2
    assert result.state == states.SUCCESS
    runs = project.runs("retry_explicit", result.id)
    assert [r["retries"] for r in runs] == [0, 1, 2]


def test_retry_state_is_visible_between_tries(app, project):
    result = send(app, "proj.retry_explicit", 1, 1.5)
    wait_for(lambda: result.state == states.RETRY, GET,
             message=lambda: f"state is {result.state}")
    assert isinstance(result.info, KeyError)
    assert result.get(timeout=GET) == 1


def test_max_retries_exceeded_raises_the_original_exception(app, project):
    result = send(app, "proj.retry_explicit", 10)
    with pytest.raises(KeyError, match="try 3"):
        result.get(timeout=GET)
    assert result.state == states.FAILURE
    runs = project.runs("retry_explicit", result.id)
    assert [r["retries"] for r in runs] == [0, 1, 2, 3]   # max_retries=3: 1 + 3 runs


def test_autoretry_with_backoff(app, project):
    ok = send(app, "proj.retry_auto", 2)
    spent = send(app, "proj.retry_auto", 10)
    assert ok.get(timeout=GET) == 2
    with pytest.raises(OSError, match="flaky 3"):
        spent.get(timeout=GET)
    runs = project.runs("retry_auto", ok.id)
    assert [r["retries"] for r in runs] == [0, 1, 2]
    runs = project.runs("retry_auto", spent.id)
    assert [r["retries"] for r in runs] == [0, 1, 2, 3]
    # retry_backoff=0.2, no jitter: 0.2 s, 0.4 s, 0.8 s between tries
    gaps = [b["time"] - a["time"] for a, b in zip(runs, runs[1:])]
    for gap, expected in zip(gaps, (0.2, 0.4, 0.8)):
        assert gap >= expected - 0.02, f"gaps {gaps}"


# -- logs and node name -------------------------------------------------------------------------

def test_node_name_and_log_lines(app, worker):
    assert worker.hostname == f"w1@{socket.gethostname()}"
    assert worker.log_lines(rf"\] w1@{re.escape(socket.gethostname())} ready\.$")
    result = app.tasks["proj.add"].delay(2, 2)
    assert result.get(timeout=GET) == 4
    stamp = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: INFO/MainProcess\] "
    received = worker.wait_log(stamp + rf"Task proj\.add\[{result.id}\] received$")
    succeeded = worker.wait_log(stamp + rf"Task proj\.add\[{result.id}\] succeeded in \d+\.\d+s: 4$")
    assert len(received) == 1 and len(succeeded) == 1


# -- pools --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["prefork", "threads", "solo", "asyncio"])
def test_pool_runs_tasks(pool, tmp_project, start_worker, client_app):
    node = start_worker("-P", pool, "-c", "2")
    assert re.search(rf"concurrency: {1 if pool == 'solo' else 2} \({pool}\)", node.log())
    app = client_app
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42
    # async def tasks run in every pool
    result = app.send_task("proj.async_sleep", (0.01,))
    assert result.get(timeout=GET) == 0.01
    (run,) = tmp_project.runs("async_sleep", result.id)
    if pool == "prefork":
        assert run["pid"] != node.pid          # a child process
    else:
        assert run["pid"] == node.pid          # in the node's own process


def test_asyncio_pool_runs_async_tasks_concurrently(tmp_project, start_worker, client_app):
    start_worker("-P", "asyncio", "-c", "4")
    app = client_app
    results = [app.send_task("proj.async_sleep", (1.0,)) for _ in range(4)]
    assert [r.get(timeout=GET) for r in results] == [1.0] * 4
    starts = [tmp_project.runs("async_sleep", r.id)[0]["time"] for r in results]
    ends = [tmp_project.runs("async_sleep-end", r.id)[0]["time"] for r in results]
    # every task started before any finished: they all ran at the same time on one loop
    assert max(starts) < min(ends), f"starts {starts} ends {ends}"


# -- queues and priority ------------------------------------------------------------------------

def test_queue_selection_with_Q_and_X(tmp_project, start_worker, client_app):
    app = client_app
    only_other = start_worker("-Q", "other", "-c", "1")
    in_celery = app.send_task("proj.add", (1, 2))
    in_third = app.send_task("proj.third_add", (3, 4))
    in_other = app.send_task("proj.other_add", (5, 6))
    assert in_other.get(timeout=GET) == 11
    assert in_celery.state == states.PENDING and in_third.state == states.PENDING
    assert app.transport.queue_size("celery") == 1
    assert app.transport.queue_size("third") == 1
    assert in_celery.id not in only_other.log() and in_third.id not in only_other.log()
    assert only_other.stop() == 0

    left_in_other = app.send_task("proj.other_add", (7, 8))
    without_other = start_worker("-X", "other", "-c", "1")
    assert in_celery.get(timeout=GET) == 3
    assert in_third.get(timeout=GET) == 7
    assert left_in_other.state == states.PENDING
    assert app.transport.queue_size("other") == 1
    assert left_in_other.id not in without_other.log()
    assert tmp_project.runs("other_add", left_in_other.id) == []


def test_higher_priority_runs_first(tmp_project, start_worker, client_app):
    """SQLite and memory: higher numbers first (AMQP's convention). Redis: kombu's bands,
    lower numbers first, as Celery on Redis. RabbitMQ: only on queues declared with
    x-max-priority, which Celery's default queues are not."""
    if tmp_project.broker_url.startswith("amqp"):
        pytest.skip("RabbitMQ orders by priority only on queues declared with x-max-priority")
    urgent, later = (0, 9) if tmp_project.broker_url.startswith("redis") else (9, 1)
    app = client_app
    low = [app.send_task("proj.prio", (f"low{i}",), queue="prio", priority=later) for i in range(3)]
    high = [app.send_task("proj.prio", (f"high{i}",), queue="prio", priority=urgent) for i in range(3)]
    start_worker("-Q", "prio", "-c", "1", "--prefetch-multiplier", "1")
    for result in low + high:
        result.get(timeout=GET)
    order = [run["label"] for run in tmp_project.runs("prio")]
    assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_statedb_revoked_id_is_not_run(tmp_project, start_worker, client_app):
    from qctl_worker.state import NodeState
    statedb = tmp_project.path / "worker.state"
    revoked_id = str(uuid.uuid4())
    state = NodeState(str(statedb))
    state.revoked.add(revoked_id)
    state.save()
    node = start_worker("--statedb", str(statedb), "-c", "1")
    app = client_app
    result = app.send_task("proj.stamp", ("revoked",), task_id=revoked_id)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=GET)
    assert result.state == states.REVOKED
    assert app.send_task("proj.add", (1, 1)).get(timeout=GET) == 2
    assert tmp_project.runs("stamp", revoked_id) == []
    assert node.stop() == 0
    # the node wrote the revoked id back when it stopped: it survives the next restart too
    reloaded = NodeState(str(statedb))
    reloaded.load()
    assert revoked_id in reloaded.revoked


# -- files ------------------------------------------------------------------------------------

def test_logfile_gets_the_banner_and_the_log(tmp_project, start_worker, client_app):
    logfile = tmp_project.path / "node.log"
    node = start_worker("-c", "1", "--logfile", str(logfile), wait_ready=False)
    wait_for(lambda: logfile.exists() and " ready." in logfile.read_text(), 30,
             message=lambda: node.tail())
    app = client_app
    result = app.send_task("proj.add", (2, 2))
    assert result.get(timeout=GET) == 4
    wait_for(lambda: f"Task proj.add[{result.id}] succeeded" in logfile.read_text(), GET)
    text = logfile.read_text()
    assert "[tasks]" in text and "proj.add" in text          # the banner
    assert result.id not in node.log()                       # nothing on stdout/stderr


def test_pidfile_written_and_removed_on_clean_exit(tmp_project, start_worker):
    pidfile = tmp_project.path / "node.pid"
    node = start_worker("-c", "1", "--pidfile", str(pidfile))
    assert pidfile.exists(), "--pidfile was accepted but no pidfile was written"
    assert int(pidfile.read_text().strip()) == node.pid
    assert node.stop() == 0
    assert not pidfile.exists()
