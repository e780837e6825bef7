"""Signals on a node in the foreground (SPEC §4): INT warm then cold, Ctrl+C on the whole
process group, USR1 stack dumps, the warm shutdown timeout, HUP and log rotation.

TERM and QUIT alone are covered by ``test_worker_reliability.py``. The signal handling does
not depend on the broker, so these tests run on SQLite only.
"""
from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import pytest

from qctl import states
from tests.conftest import Project
from tests.helpers import pid_alive, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.sqlite_only]

GET = 20          # a result, a recorded run
EXIT = 15         # a node that was told to stop, when nothing keeps it running


@pytest.fixture
def tmp_project(tmp_path, _clean_qctl_env):
    """SQLite alone (instead of the conftest fixture's three brokers): nothing to skip, and
    no RabbitMQ node booted for tests that cannot use it."""
    project = Project(tmp_path / "proj")
    yield project
    project.close()


def gate_name(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def started_run(project: Project, kind: str, task_id: str) -> dict:
    """The run the pool child recorded when it started the task (its pid included)."""
    (run,) = wait_for(lambda: project.runs(kind, task_id), GET,
                      message=f"{kind}[{task_id}] never started")
    return run


def file_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def wait_in_file(path: Path, pattern: str, timeout: float = GET) -> str:
    """Wait until the text of ``path`` matches the regex ``pattern``; returns the text."""
    regex = re.compile(pattern, re.M)

    def matching_text() -> str | None:
        text = file_text(path)
        return text if regex.search(text) else None

    return wait_for(matching_text, timeout,
                    message=lambda: f"{pattern!r} not in {path}:\n{file_text(path)[-3000:]}")


def start_logging_to(project: Project, logfile: str, *args: str):
    """A node logging to ``logfile`` (relative to the project) instead of stdout."""
    node = project.start_worker("-c", "1", "--logfile", logfile, *args, wait_ready=False)
    wait_in_file(project.path / logfile.replace("%I", ""), r" ready\.$", 30)
    return node


def prefetch_one(node, client_app):
    """A message the busy node (one pool process) has reserved but not started."""
    waiting = client_app.send_task("proj.add", (1, 1))
    node.wait_log(rf"Task proj\.add\[{waiting.id}\] received$")
    return waiting


def wait_warm_stop_decided(node) -> None:
    """Wait until the node has given its reserved message back: the last step before it
    either waits for the running task (warm) or kills the pool (cold)."""
    node.wait_log(r"Restored 1 message\(s\) not yet started to the queue")


# -- INT ------------------------------------------------------------------------------------

def test_first_int_is_warm_running_task_finishes(tmp_project, start_worker, client_app):
    node = start_worker("-c", "1")
    gate = gate_name("int-warm")
    result = client_app.send_task("proj.gated", (gate, "finished"))
    run = started_run(tmp_project, "gated", result.id)
    waiting = prefetch_one(node, client_app)

    node.send_signal(signal.SIGINT)
    node.wait_log(r"worker: Hitting Ctrl\+C again will terminate all running tasks!")
    wait_warm_stop_decided(node)
    # warm: the node waits for the running task
    assert node.alive(), node.tail()
    assert pid_alive(run["pid"])
    assert not tmp_project.runs("gated-end", result.id)
    assert result.state == states.PENDING

    tmp_project.open_gate(gate)
    assert result.get(timeout=GET) == "finished"
    assert node.wait_exit(EXIT) == 0, node.tail()
    assert len(tmp_project.runs("gated-end", result.id)) == 1
    assert not node.log_lines(r"Cold shutdown")
    assert waiting.state == states.PENDING            # given back, not run
    assert client_app.transport.queue_size("celery") == 1


def test_second_int_is_cold_running_task_is_stopped(tmp_project, start_worker, client_app):
    node = start_worker("-c", "1")
    gate = gate_name("int-cold")
    result = client_app.send_task("proj.gated", (gate, "never"))
    run = started_run(tmp_project, "gated", result.id)

    node.send_signal(signal.SIGINT)
    node.wait_log(r"worker: Hitting Ctrl\+C again")
    node.send_signal(signal.SIGINT)
    node.wait_log(r"worker: Cold shutdown \(MainProcess\)")
    # The gate stays closed: a node still waiting for the task would run for the task's
    # whole gate timeout (60 s), far past this deadline.
    assert node.wait_exit(EXIT) is not None, node.tail()
    wait_for(lambda: not pid_alive(run["pid"]), 10, message="the pool child outlived the node")
    tmp_project.open_gate(gate)            # too late: nobody is left to go on
    assert tmp_project.runs("gated-end", result.id) == []


def test_ctrl_c_on_the_process_group_leaves_pool_children_alone(tmp_project, start_worker,
                                                                client_app):
    """A terminal's Ctrl+C reaches every process of the foreground group. The pool children
    ignore it: only the main process decides, and its first INT is a warm shutdown."""
    node = start_worker("-c", "1")
    # The node leads its own session and process group (conftest: start_new_session), so
    # the whole group is the node and its pool and nothing of the test run.
    assert os.getpgid(node.pid) == node.pid
    gate = gate_name("ctrl-c")
    result = client_app.send_task("proj.gated", (gate, "survived"))
    run = started_run(tmp_project, "gated", result.id)
    assert os.getpgid(run["pid"]) == node.pid
    prefetch_one(node, client_app)

    os.killpg(node.pid, signal.SIGINT)
    node.wait_log(r"worker: Hitting Ctrl\+C again")
    wait_warm_stop_decided(node)
    assert pid_alive(run["pid"]), node.tail()
    assert node.alive()
    assert result.state == states.PENDING

    tmp_project.open_gate(gate)
    assert result.get(timeout=GET) == "survived"
    (end,) = tmp_project.runs("gated-end", result.id)
    assert end["pid"] == run["pid"]        # the same child finished it
    assert node.wait_exit(EXIT) == 0, node.tail()


# -- USR1 -----------------------------------------------------------------------------------

def test_usr1_dumps_main_and_child_stacks_and_the_node_runs_on(tmp_project, client_app):
    node = start_logging_to(tmp_project, "node%I.log")
    main_log, child_log = tmp_project.path / "node.log", tmp_project.path / "node-1.log"
    gate = gate_name("usr1")
    result = client_app.send_task("proj.gated", (gate, "dumped"))
    run = started_run(tmp_project, "gated", result.id)

    node.send_signal(signal.SIGUSR1)
    text = wait_in_file(main_log, rf"Stacks of MainProcess \(pid {node.pid}\)")
    assert "--- Thread MainThread" in text
    assert "--- Thread PoolReader" in text          # every thread, not just the main one
    # the child writes its own stacks to its own file (%I -> -1), task frame included
    text = wait_in_file(child_log, rf"Stacks of ForkPoolWorker-1 \(pid {run['pid']}\)")
    assert "in wait_gate" in text and "in gated" in text, text
    assert "Stacks of ForkPoolWorker" not in file_text(main_log)

    assert node.alive()
    tmp_project.open_gate(gate)
    assert result.get(timeout=GET) == "dumped"
    # the same child takes the next task: USR1 did not end or replace it
    assert client_app.send_task("proj.getpid").get(timeout=GET) == run["pid"]
    assert node.alive()


def test_usr1_of_a_child_after_log_rotation_goes_to_the_new_file(tmp_project, client_app):
    node = start_logging_to(tmp_project, "node%I.log")
    child_log = tmp_project.path / "node-1.log"
    pid = client_app.send_task("proj.getpid").get(timeout=GET)
    wait_for(child_log.exists, 10)
    child_log.rename(tmp_project.path / "node-1.log.1")          # logrotate moved it away
    node.send_signal(signal.SIGUSR1)
    text = wait_in_file(child_log, rf"Stacks of ForkPoolWorker-1 \(pid {pid}\)")
    assert "--- Thread MainThread" in text
    assert "Stacks of" not in file_text(tmp_project.path / "node-1.log.1")


# -- the warm shutdown timeout ----------------------------------------------------------------

def test_warm_shutdown_timeout_stops_the_task_and_gives_its_message_back(tmp_project,
                                                                         start_worker, client_app):
    node = start_worker("-c", "1", "--shutdown-timeout", "1")
    gate = gate_name("timeout")
    result = client_app.send_task("proj.late_gated", (gate, "second run"))
    run = started_run(tmp_project, "late_gated", result.id)

    node.send_signal(signal.SIGTERM)
    node.wait_log(r"Warm shutdown timed out after 1\.0s: stopping running tasks")
    # the gate is still closed: only the timeout can have ended the node this soon
    assert node.wait_exit(EXIT) is not None, node.tail()
    wait_for(lambda: not pid_alive(run["pid"]), 10, message="the pool child outlived the node")
    assert tmp_project.runs("gated-end", result.id) == []

    # acks_late: the message went back to the queue and another node runs it
    tmp_project.open_gate(gate)
    start_worker("-c", "1")
    assert result.get(timeout=GET) == "second run"
    runs = tmp_project.runs("late_gated", result.id)
    assert len(runs) == 2 and runs[1]["pid"] != run["pid"], runs


# -- HUP and log rotation ---------------------------------------------------------------------

def test_hup_in_the_foreground_reopens_the_log_and_keeps_running(tmp_project, client_app):
    node = start_logging_to(tmp_project, "node.log")
    logfile = tmp_project.path / "node.log"
    pid_before = client_app.send_task("proj.getpid").get(timeout=GET)

    node.send_signal(signal.SIGHUP)
    wait_in_file(logfile, r"worker: HUP: 1 log file\(s\) reopened")
    assert client_app.send_task("proj.add", (2, 3)).get(timeout=GET) == 5
    assert node.alive()
    # no restart: one banner, one ready line, the same pool child
    text = file_text(logfile)
    assert len(re.findall(r" ready\.$", text, re.M)) == 1, text
    assert "Restarting in place" not in text
    assert client_app.send_task("proj.getpid").get(timeout=GET) == pid_before
    assert node.stop() == 0


def test_moved_log_file_is_replaced_by_a_new_one(tmp_project, client_app):
    """Rotation by moving the file away (no copytruncate): the node's next lines go to a new
    file at the same path, by itself; after a HUP too, also when the rotating tool has
    already created the new file (logrotate's ``create``)."""
    node = start_logging_to(tmp_project, "node.log")
    logfile = tmp_project.path / "node.log"

    first = logfile.rename(tmp_project.path / "node.log.1")
    result = client_app.send_task("proj.add", (1, 2))
    assert result.get(timeout=GET) == 3
    text = wait_in_file(logfile, rf"Task proj\.add\[{result.id}\] succeeded")
    assert "ready." not in text                     # a new file, not the old one back
    assert result.id not in file_text(first)

    second = logfile.rename(tmp_project.path / "node.log.2")
    logfile.touch(mode=0o640)
    node.send_signal(signal.SIGHUP)
    text = wait_in_file(logfile, r"worker: HUP: 1 log file\(s\) reopened")
    assert text.startswith("[")                     # appended to the created (empty) file
    result = client_app.send_task("proj.add", (3, 4))
    assert result.get(timeout=GET) == 7
    wait_in_file(logfile, rf"Task proj\.add\[{result.id}\] succeeded")
    assert "HUP" not in file_text(second) and result.id not in file_text(second)
    assert node.alive()
