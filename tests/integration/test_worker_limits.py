"""Time limits, rate limits and pool child recycling (SPEC §4)."""
from __future__ import annotations

from collections import Counter

import pytest

from qctl import states
from qctl.exceptions import TimeLimitExceeded
from tests.helpers import pid_alive, wait_for

pytestmark = pytest.mark.timeout(120)

GET = 20


@pytest.fixture(scope="module")
def worker(module_project):
    """One prefork child, so 'the child was replaced' is a plain pid comparison."""
    return module_project.start_worker("-c", "1", "-P", "prefork")


@pytest.fixture(scope="module")
def app(module_project, worker):
    return module_project.client()


def call(app, name, *args, timeout=GET, **options):
    return app.send_task(name, args=list(args), **options).get(timeout=timeout)


# -- time limits from the task's options --------------------------------------------------------

def test_soft_time_limit_from_task_options(app, module_project):
    result = app.send_task("proj.soft_limited", (5,))
    assert result.get(timeout=GET) == "soft"
    (started,) = module_project.runs("soft", result.id)
    (caught,) = module_project.runs("soft-caught", result.id)
    assert 0.4 <= caught["time"] - started["time"] < 4     # soft_time_limit=0.5


def test_hard_time_limit_from_task_options_replaces_the_child(app, module_project, worker):
    before = call(app, "proj.getpid")
    result = app.send_task("proj.hard_limited", (10,))
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=GET)
    assert result.state == states.FAILURE
    (run,) = module_project.runs("hard", result.id)
    assert run["pid"] == before
    wait_for(lambda: not pid_alive(before), 10, message="the killed child is still there")
    worker.wait_log(rf"Hard time limit \(1(\.0)?s\) exceeded for proj\.hard_limited\[{result.id}\]")
    after = call(app, "proj.getpid")
    assert after != before
    assert call(app, "proj.add", 2, 3) == 5
    assert worker.alive()


def test_rate_limit_delays_but_never_drops(app, module_project):
    results = [app.send_task("proj.limited", (n,)) for n in range(10)]
    assert [r.get(timeout=GET) for r in results] == list(range(10))
    runs = module_project.runs("limited")
    assert sorted(r["id"] for r in runs) == sorted(r.id for r in results)   # each ran once
    times = sorted(r["time"] for r in runs)
    # 5/s: 10 tasks need at least 9 intervals of 0.2 s between the first and the last start
    assert times[-1] - times[0] >= 1.6, f"10 tasks started within {times[-1] - times[0]:.3f}s"


def test_time_limits_per_call(app, module_project):
    soft = app.send_task("proj.catch_soft", (5,), soft_time_limit=0.3)
    assert soft.get(timeout=GET) == "soft"
    hard = app.send_task("proj.sleep", (10,), time_limit=0.5)
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=GET)
    assert not module_project.runs("sleep-end", hard.id)
    assert call(app, "proj.add", 1, 2) == 3


# -- time limits from the worker's options ------------------------------------------------------

def test_worker_time_limit_options(tmp_project, start_worker, client_app):
    node = start_worker("-c", "1", "--soft-time-limit", "0.5", "--time-limit", "1.5")
    app = client_app
    soft = app.send_task("proj.catch_soft", (5,))
    assert soft.get(timeout=GET) == "soft"
    before = call(app, "proj.getpid")
    hard = app.send_task("proj.stubborn", (10,))
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=GET)
    (started,) = tmp_project.runs("stubborn", hard.id)
    assert tmp_project.runs("stubborn-soft", hard.id), "the soft limit came first"
    assert started["pid"] == before
    wait_for(lambda: not pid_alive(before), 10)
    assert call(app, "proj.getpid") != before
    assert call(app, "proj.add", 1, 1) == 2
    assert node.alive()


# -- recycling pool children --------------------------------------------------------------------

def test_max_tasks_per_child(start_worker, client_app):
    start_worker("-c", "1", "--max-tasks-per-child", "2")
    app = client_app
    pids = [call(app, "proj.getpid") for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
    assert len(set(pids)) == 3, pids


def test_max_tasks_per_child_under_load_loses_nothing(start_worker, client_app):
    """A burst while children retire: no task may land on a child that is on its way out."""
    node = start_worker("-c", "1", "--max-tasks-per-child", "2")
    app = client_app
    results = [app.send_task("proj.getpid") for _ in range(20)]
    pids = []
    for result in results:
        try:
            pids.append(result.get(timeout=GET))
        except Exception as exc:  # noqa: BLE001 - report all of them below
            pids.append(exc)
    lost = [p for p in pids if isinstance(p, BaseException)]
    assert not lost, f"{len(lost)} of 20 tasks failed: {lost[:3]}\n{node.tail(20)}"
    assert max(Counter(pids).values()) <= 2, pids
    assert app.transport.dead_letters() == []


def test_max_memory_per_child(start_worker, client_app):
    start_worker("-c", "1", "--max-memory-per-child", str(80 * 1024))   # 80 MiB
    app = client_app
    first = call(app, "proj.getpid")
    assert call(app, "proj.getpid") == first          # small tasks do not recycle the child
    assert call(app, "proj.alloc", 120) == first      # 120 MiB: over the limit after this task
    wait_for(lambda: not pid_alive(first), 10, message="the child over its memory limit stays")
    after = call(app, "proj.getpid")
    assert after != first
    assert call(app, "proj.getpid") == after


def test_asyncio_pool_soft_time_limit_is_raised_inside_the_task(tmp_project, start_worker, client_app):
    """SPEC §4: the soft limit raises SoftTimeLimitExceeded inside the task, in every pool
    that runs async def tasks; the task may catch it and return."""
    start_worker("-P", "asyncio", "-c", "2", "--soft-time-limit", "0.3")
    app = client_app
    result = app.send_task("proj.async_catch_soft", (5,))
    try:
        value = result.get(timeout=GET)
    except Exception as exc:  # noqa: BLE001
        value = exc
    assert value == "soft", f"got {value!r}; recorded {tmp_project.runs(task_id=result.id)}"
