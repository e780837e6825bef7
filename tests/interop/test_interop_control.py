"""Remote control between qctl and Celery 5.7 (the pidbox protocol), on Redis and RabbitMQ.

Real processes only: qctl workers (``python -m qctl -A proj worker``), Celery workers and the
real ``celery`` command line of the cached Celery venv, qctl's own command line, and Flower
(from a second cached venv, ``flower_python``) reading the broker the workers use.

1. Celery's CLI sees and steers a qctl worker: ``celery inspect ping``/``status``/``inspect
   stats --json``, ``celery control rate_limit`` (and the qctl worker's rate really changes).
2. qctl's CLI and ``app.control`` see a Celery worker and a qctl worker at once; the qctl
   node's ``stats``/``active_queues`` replies carry every key the Celery node's do.
3. Flower lists the qctl worker (``/api/workers``): from its ``stats``/``registered`` replies
   and, for liveness, from its ``worker-heartbeat`` events; it follows a task the qctl worker
   ran (``-E``) from its task events, and renders the worker's page.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.helpers import wait_for

from .conftest import VENV_TIMEOUT, celery_cli, cli_text, qctl_cli

pytestmark = pytest.mark.timeout(240)

#: ``-t`` of every inspect/control command. Celery waits this long after the LAST reply (its
#: timeout is per reply), so each Celery CLI call costs about this plus its start-up.
REPLY_TIMEOUT = "3"
QCTL_NAME = "qctl1@%h"
CELERY_NAME = "celery1@%h"
QCTL_ONE = ("-c", "1", "--prefetch-multiplier", "1")


@pytest.fixture(params=["redis", "amqp"])
def project(request):
    """Both sides on the session's Redis (a fresh database) or RabbitMQ node (rpc:// results;
    every queue/exchange of earlier tests deleted)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_project")
    return request.getfixturevalue("amqp_project")("rpc")


def node_line(node: str) -> re.Pattern:
    """Celery's ``->  node: OK`` line (two spaces after the arrow), as a whole line."""
    return re.compile(r"^->  " + re.escape(node) + r": OK$", re.M)


def json_out(proc) -> Any:
    """The one JSON object a ``--json`` command printed (the last line that parses)."""
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError("no JSON in the output\n" + cli_text(proc))


def no_log_problems(project) -> None:
    problems = project.log_problems()
    assert not problems, "\n".join(problems) + project._worker_tails()


def registered_line(items: list[str], task: str) -> str:
    found = [item for item in items if item == task or item.startswith(task + " ")]
    assert len(found) == 1, items
    return found[0]


# -- 1. the real Celery CLI steering a qctl worker ---------------------------------------------

def test_celery_cli_sees_and_steers_qctl_worker(project):
    qctl = project.start_worker(*QCTL_ONE, "-n", QCTL_NAME)
    node = qctl.hostname

    # celery inspect ping --json: {"qctl1@host": {"ok": "pong"}}
    proc = celery_cli(project, "inspect", "ping", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    assert json_out(proc) == {node: {"ok": "pong"}}, cli_text(proc)

    # celery inspect ping (text): ->  node: OK / 8-space "pong" / 1 node online.
    proc = celery_cli(project, "inspect", "ping", "-t", REPLY_TIMEOUT)
    assert proc.returncode == 0, cli_text(proc)
    assert node_line(node).search(proc.stdout), cli_text(proc)
    assert re.search(r"^        pong$", proc.stdout, re.M), cli_text(proc)
    assert re.search(r"^1 node online\.$", proc.stdout, re.M), cli_text(proc)

    # celery status
    proc = celery_cli(project, "status", "-t", REPLY_TIMEOUT)
    assert proc.returncode == 0, cli_text(proc)
    assert node_line(node).search(proc.stdout), cli_text(proc)
    assert re.search(r"^1 node online\.$", proc.stdout, re.M), cli_text(proc)

    # celery inspect stats --json: the keys Flower's worker page indexes directly
    proc = celery_cli(project, "inspect", "stats", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    stats = json_out(proc)
    assert list(stats) == [node], cli_text(proc)
    assert isinstance(stats[node].get("broker"), dict), stats
    assert isinstance(stats[node].get("total"), dict), stats
    assert isinstance(stats[node].get("pool"), dict), stats
    assert isinstance(stats[node].get("clock"), str), stats       # Celery sends a string

    # no rate limit on proj.add yet (seen by qctl's client)
    app = project.client()
    before = app.control.inspect(destination=[node], timeout=float(REPLY_TIMEOUT)).registered()
    assert before and node in before, before
    assert "rate_limit=" not in registered_line(before[node], "proj.add"), before

    # celery control rate_limit proj.add 10/m -> "new rate limit set successfully"
    proc = celery_cli(project, "control", "rate_limit", "proj.add", "10/m", "-t", REPLY_TIMEOUT)
    assert proc.returncode == 0, cli_text(proc)
    assert node_line(node).search(proc.stdout), cli_text(proc)
    assert re.search(r"^        new rate limit set successfully$", proc.stdout, re.M), \
        cli_text(proc)
    proc = celery_cli(project, "control", "rate_limit", "proj.add", "10/m", "-t", REPLY_TIMEOUT,
                      "--json")
    # (``celery control --json`` prints the raw list of replies, ``inspect --json`` a dict)
    assert json_out(proc) == [{node: {"ok": "new rate limit set successfully"}}], cli_text(proc)

    # ... and the qctl worker's rate really changed: qctl inspect registered, app.control
    proc = qctl_cli(project, "inspect", "registered", "-t", REPLY_TIMEOUT, "-d", node)
    assert proc.returncode == 0, cli_text(proc)
    assert re.search(r"^    \* proj\.add \[(.* )?rate_limit=10/m\]$", proc.stdout, re.M), \
        cli_text(proc)
    after = app.control.inspect(destination=[node], timeout=float(REPLY_TIMEOUT)).registered()
    assert "rate_limit=10/m" in registered_line(after[node], "proj.add"), after

    # Celery's CLI reads the same from the qctl node
    proc = celery_cli(project, "inspect", "registered", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    assert "rate_limit=10/m" in registered_line(json_out(proc)[node], "proj.add"), \
        cli_text(proc)

    no_log_problems(project)


# -- 2. qctl's CLI and app.control seeing both kinds of worker ------------------------------------

#: How many times the Python API pings: replies of the two nodes race each other.
PINGS = 5


def test_qctl_sees_celery_and_qctl_workers(project):
    celery = project.start_celery_worker(name=CELERY_NAME)
    qctl = project.start_worker(*QCTL_ONE, "-n", QCTL_NAME)
    both = {celery.hostname, qctl.hostname}
    assert len(both) == 2, both

    # qctl inspect ping --json
    proc = qctl_cli(project, "inspect", "ping", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    assert json_out(proc) == {name: {"ok": "pong"} for name in both}, cli_text(proc)

    # qctl status (plain text: not a terminal)
    proc = qctl_cli(project, "status", "-t", REPLY_TIMEOUT)
    assert proc.returncode == 0, cli_text(proc)
    for name in both:
        assert node_line(name).search(proc.stdout), cli_text(proc)
    assert re.search(r"^2 node\(s\) online\.$", proc.stdout, re.M), cli_text(proc)

    # app.control: every ping must hear both nodes, however their replies are ordered
    app = project.client()
    heard = []
    for _ in range(PINGS):
        started = time.monotonic()
        replies = app.control.inspect(timeout=float(REPLY_TIMEOUT)).ping()
        heard.append((sorted(replies or {}), round(time.monotonic() - started, 3)))
    missing = [(names, took) for names, took in heard if set(names) != both]
    assert not missing, f"pings that missed a node (names, seconds): {missing}; all: {heard}"
    pongs = app.control.ping(timeout=float(REPLY_TIMEOUT))
    assert sorted(n for reply in pongs for n in reply) == sorted(both), pongs

    # a reply of the Celery node read by qctl: stats has Celery's keys
    stats = app.control.inspect(destination=[celery.hostname],
                                timeout=float(REPLY_TIMEOUT)).stats()
    assert set(stats) == {celery.hostname}, stats
    assert {"broker", "total", "pool", "clock"} <= set(stats[celery.hostname]), stats

    no_log_problems(project)


# -- 2b. replies of a qctl node have the shape of a Celery node's ---------------------------------

#: ``stats.broker`` values that must be the same on both kinds of node for one broker URL.
BROKER_FIELDS = ("hostname", "port", "transport", "ssl", "virtual_host", "userid", "insist")
#: ``active_queues`` values that must be the same for queue ``celery``.
QUEUE_FIELDS = ("name", "routing_key", "durable", "exclusive", "auto_delete", "no_ack", "alias")


def test_qctl_replies_have_celery_shape(project):
    """``celery inspect stats|active_queues --json`` with a Celery and a qctl node on the same
    broker: every key the Celery node sends, the qctl node sends too (Flower and other tools
    index them), with the same values where they describe the same thing."""
    celery = project.start_celery_worker(name=CELERY_NAME)
    qctl = project.start_worker(*QCTL_ONE, "-n", QCTL_NAME)

    proc = celery_cli(project, "inspect", "stats", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    stats = json_out(proc)
    theirs, ours = stats[celery.hostname], stats[qctl.hostname]
    problems = []
    if set(theirs) - set(ours):
        problems.append(f"stats keys missing: {sorted(set(theirs) - set(ours))}")
    if set(theirs["broker"]) - set(ours["broker"]):
        problems.append(f"stats.broker keys missing: "
                        f"{sorted(set(theirs['broker']) - set(ours['broker']))}")
    for key in BROKER_FIELDS:
        if theirs["broker"].get(key) != ours["broker"].get(key):
            problems.append(f"stats.broker.{key}: Celery {theirs['broker'].get(key)!r}, "
                            f"qctl {ours['broker'].get(key)!r}")
    if not isinstance(ours.get("clock"), str):
        problems.append(f"stats.clock must be a string: {ours.get('clock')!r}")

    proc = celery_cli(project, "inspect", "active_queues", "-t", REPLY_TIMEOUT, "--json")
    assert proc.returncode == 0, cli_text(proc)
    queues = json_out(proc)
    theirs_q = {q["name"]: q for q in queues[celery.hostname]}["celery"]
    ours_q = {q["name"]: q for q in queues[qctl.hostname]}.get("celery")
    assert ours_q is not None, queues
    if set(theirs_q) - set(ours_q):
        problems.append(f"active_queues[celery] keys missing: "
                        f"{sorted(set(theirs_q) - set(ours_q))}")
    if set(theirs_q["exchange"]) - set(ours_q["exchange"]):
        problems.append(f"active_queues[celery].exchange keys missing: "
                        f"{sorted(set(theirs_q['exchange']) - set(ours_q['exchange']))}")
    for key in QUEUE_FIELDS:
        if theirs_q.get(key) != ours_q.get(key):
            problems.append(f"active_queues[celery].{key}: Celery {theirs_q.get(key)!r}, "
                            f"qctl {ours_q.get(key)!r}")
    assert not problems, "\n".join(problems) + \
        f"\n--- Celery stats.broker: {json.dumps(theirs['broker'], sort_keys=True)}" \
        f"\n--- qctl   stats.broker: {json.dumps(ours['broker'], sort_keys=True)}" \
        f"\n--- Celery queue: {json.dumps(theirs_q, sort_keys=True)}" \
        f"\n--- qctl   queue: {json.dumps(ours_q, sort_keys=True)}"
    no_log_problems(project)


# -- 3. Flower --------------------------------------------------------------------------------

FLOWER_SEES = 60.0      # seconds Flower may take to list a worker


@pytest.mark.timeout(VENV_TIMEOUT + 240)   # the Flower venv is built at first use
def test_flower_lists_qctl_worker(project, start_flower):
    qctl = project.start_worker(*QCTL_ONE, "-E", "-n", QCTL_NAME)
    celery = project.start_celery_worker(name=CELERY_NAME)   # the control group
    flower = start_flower(project)

    # /api/workers?refresh=1: Flower inspects (stats, active_queues, registered, conf)
    last: dict[str, Any] = {}

    def listed() -> Any:
        status, data = flower.get("/api/workers?refresh=1")
        last.update(status=status, data=data)
        if status == 200 and isinstance(data, dict) and \
                all("stats" in data.get(name, {}) for name in (qctl.hostname, celery.hostname)):
            return data
        return None

    workers = wait_for(listed, FLOWER_SEES, interval=1.0,
                       message=lambda: f"last answer: {last}\n{flower.tail()}"
                                       + project._worker_tails())
    info = workers[qctl.hostname]
    assert isinstance(info["stats"].get("broker"), dict), info
    assert isinstance(info["stats"].get("total"), dict), info
    assert "registered" in info and registered_line(info["registered"], "proj.add"), info
    assert "active_queues" in info and any(q.get("name") == "celery"
                                           for q in info["active_queues"]), info

    # /api/workers?status=1: alive from its worker-online/worker-heartbeat events
    def alive() -> Any:
        status, data = flower.get("/api/workers?status=1")
        last.update(status=status, data=data)
        return status == 200 and isinstance(data, dict) and data.get(qctl.hostname) is True \
            and data.get(celery.hostname) is True
    wait_for(alive, FLOWER_SEES, interval=0.5,
             message=lambda: f"last answer: {last}\n{flower.tail()}")

    # still alive heartbeats later (Flower: offline after 2 x freq = 4 s without one)
    until = time.monotonic() + 5.0
    while time.monotonic() < until:
        status, data = flower.get("/api/workers?status=1")
        assert status == 200 and data.get(qctl.hostname) is True, (status, data, flower.tail())
        time.sleep(0.5)

    # a task run by the qctl worker (-E): Flower follows it from its task events (queue
    # ``other``, which only the qctl worker consumes)
    result = project.client().send_task("proj.other_add", (2, 3))
    assert result.get(timeout=30) == 5

    def task_seen() -> Any:
        status, data = flower.get(f"/api/tasks?workername={qctl.hostname}")
        last.update(status=status, data=data)
        task = data.get(result.id) if status == 200 and isinstance(data, dict) else None
        return task if task and task.get("state") == "SUCCESS" else None
    task = wait_for(task_seen, FLOWER_SEES, interval=0.5,
                    message=lambda: f"last answer: {last}\n{flower.tail()}")
    assert task.get("name") == "proj.other_add", task
    assert task.get("worker") == qctl.hostname, task
    assert task.get("result") == "5", task

    # the worker pages render: Flower's worker.html indexes stats['total'], stats['broker']
    # and, for each active_queues element, queue['no_ack'], ['alias'], ['binding_arguments']...
    for name in (celery.hostname, qctl.hostname):
        status, page = flower.get(f"/worker/{name}")
        assert status == 200, (name, status, flower.tail(8))
        assert name in str(page)

    problems = [line for line in flower.tail(400).splitlines()
                if re.search(r"ERROR|Traceback|WARNING", line)]
    assert not problems, "\n".join(problems)
    no_log_problems(project)
