"""``qctl multi`` end to end: real ``qctl worker --detach`` daemons, real signals, real pidfiles.

Every test runs in its own project folder (``tests/conftest.py`` ``Project``: the test app and
a private SQLite broker). The daemons are not children of the test, so the ``fleet`` fixture
remembers every node process it saw in a pidfile and, at teardown, stops whatever is left by
PID: TERM, then KILL after a deadline, each time only if psutil confirms it is still the same
process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import Project
from tests.helpers import pid_alive, wait_for

pytestmark = pytest.mark.timeout(90)

HOST = socket.gethostname()
W1, W2 = f"w1@{HOST}", f"w2@{HOST}"
#: Small, fast nodes: one pool process each.
NODE_OPTS = ["-A", "proj", "-c", "1", "-l", "INFO"]
MULTI_TIMEOUT = 60


class Fleet:
    """A project folder and the ``qctl multi`` commands run in it."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.path = project.path
        self.seen: dict[int, psutil.Process] = {}
        self.supervisors: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return self.project.env()

    def multi(self, *args: str, check: int | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "qctl", "multi", *args], cwd=self.path,
                              env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=MULTI_TIMEOUT)
        self.remember()
        if check is not None:
            assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def run_supervisor(self, *args: str) -> subprocess.Popen:
        """``qctl multi run ARGS`` in the background; its stderr goes to ``supervisor.log``."""
        log = open(self.path / "supervisor.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "qctl", "multi", "run", *args],
                                cwd=self.path, env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.supervisors.append(proc)
        return proc

    def pid(self, node: str = "w1") -> int | None:
        try:
            return int((self.path / f"{node}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def node_pid(self, node: str = "w1") -> int | None:
        """The pidfile's PID while it names a live worker of that node (else None)."""
        pid = self.pid(node)
        if pid is None:
            return None
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            return None
        return pid if f"{node}@{HOST}" in cmdline and pid_alive(pid) else None

    def remember(self) -> None:
        for path in self.path.glob("*.pid"):
            try:
                proc = psutil.Process(int(path.read_text().strip()))
                if "worker" in proc.cmdline():
                    self.seen.setdefault(proc.pid, proc)
            except (OSError, ValueError, psutil.Error):
                pass

    def ping(self, *nodes: str, timeout: float = 5.0) -> set[str]:
        client = self.project.client()
        replies = client.control.ping(destination=list(nodes), timeout=timeout)
        return {name for reply in replies for name in reply}

    def stats(self, node: str) -> dict:
        client = self.project.client()
        return (client.control.inspect(destination=[node], timeout=5.0).stats() or {}).get(node, {})

    def supervisor_log(self) -> str:
        return (self.path / "supervisor.log").read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in self.supervisors:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.remember()
        alive = [p for p in self.seen.values() if p.is_running()]
        for proc in alive:
            proc.send_signal(signal.SIGQUIT)  # cold: quick; psutil checks it is the same process
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p.pid) and p.is_running() for p in alive):
            time.sleep(0.02)
        for proc in alive:
            if proc.is_running():
                proc.kill()
        for proc in self.supervisors:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.project.close()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(Project(tmp_path / "proj"))
    yield fleet
    fleet.cleanup()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- start, stop, stopwait, kill ------------------------------------------------------------------


def test_start_reports_ok_once_nodes_answer_and_stopwait_takes_them_down(fleet):
    started = fleet.multi("start", "w1", "w2", *NODE_OPTS, check=0)
    assert lines(started.stdout) == [f"> {W1}: OK", f"> {W2}: OK"]
    pids = {name: fleet.node_pid(name) for name in ("w1", "w2")}
    assert all(pids.values()), f"no live node behind the pidfiles: {pids}"
    # "OK" means consuming: both answer at once, no waiting for a late start
    assert fleet.ping(W1, W2, timeout=5) == {W1, W2}
    # the default log file of the main process (%n%I.log -> w1.log) is in the project folder
    assert "ready." in (fleet.path / "w1.log").read_text()

    stopped = fleet.multi("stopwait", "w1", "w2", check=0)
    out = lines(stopped.stdout)
    assert f"> {W1}: TERM -> {pids['w1']}" in out and f"> {W2}: TERM -> {pids['w2']}" in out
    assert f"> {W1}: DOWN" in out and f"> {W2}: DOWN" in out
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not list(fleet.path.glob("*.pid"))


def test_start_of_a_running_node_reports_already_running(fleet):
    fleet.multi("start", "w1", *NODE_OPTS, check=0)
    pid = fleet.node_pid("w1")
    again = fleet.multi("start", "w1", *NODE_OPTS, check=0)
    assert lines(again.stdout) == [f"> {W1}: already running (pid {pid})"]
    assert fleet.node_pid("w1") == pid


@pytest.mark.parametrize("args, code, error, logged", [
    (["-A", "broken", "-c", "1"], 64, "No module named 'no_such_dependency'", None),
    (["-A", "proj", "-c", "1", "-b", "redis://127.0.0.1:9/0"], 69, "Error: node", "Cannot start worker"),
], ids=["bad-app", "broker-down"])
def test_start_of_a_node_that_cannot_start_fails_with_its_error(fleet, args, code, error, logged):
    (fleet.path / "broken.py").write_text("import no_such_dependency\n")
    result = fleet.multi("start", "w1", *args, check=1)
    assert lines(result.stdout) == [f"> {W1}: FAILED (exit {code})"]
    assert error in result.stderr
    if logged:  # the daemon failed after logging started: its last log lines are shown
        assert f"last lines of {fleet.path / 'w1.log'}" in result.stderr
        assert logged in result.stderr
    assert "Traceback" not in result.stderr
    assert fleet.node_pid("w1") is None


def test_two_concurrent_starts_of_one_node_start_it_once(fleet):
    command = [sys.executable, "-m", "qctl", "multi", "start", "w1", *NODE_OPTS]
    procs = [subprocess.Popen(command, cwd=fleet.path, env=fleet.env(), text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=MULTI_TIMEOUT) for p in procs]
    fleet.remember()
    assert [p.returncode for p in procs] == [0, 0], outputs
    pid = fleet.node_pid("w1")
    reports = sorted(out.strip() for out, _ in outputs)
    assert reports == [f"> {W1}: OK", f"> {W1}: already running (pid {pid})"], outputs

    def main_processes() -> list[int]:
        """w1's worker main processes (its pool children share its command line; the
        daemon that lost may take a moment to finish exiting)."""
        pidfile = str(fleet.path / "w1.pid")  # this project's nodes only
        found = [p for p in psutil.process_iter(["cmdline", "ppid", "status"])
                 if W1 in (p.info["cmdline"] or []) and pidfile in p.info["cmdline"]
                 and p.info["status"] != psutil.STATUS_ZOMBIE]
        pids = {p.pid for p in found}
        return [p.pid for p in found if p.info["ppid"] not in pids]

    wait_for(lambda: main_processes() == [pid], 10,
             message=lambda: f"w1 main processes: {main_processes()}, pidfile: {pid}")
    assert fleet.ping(W1) == {W1}


def test_stop_sends_term_and_the_node_removes_its_pidfile(fleet):
    fleet.multi("start", "w1", *NODE_OPTS, check=0)
    pid = fleet.node_pid("w1")
    result = fleet.multi("stop", "w1", check=0)
    assert lines(result.stdout) == [f"> {W1}: TERM -> {pid}"]
    wait_for(lambda: not pid_alive(pid), 20, message="the node did not stop after TERM")
    wait_for(lambda: not (fleet.path / "w1.pid").exists(), 5)
    # stopping a node that is not running is fine and says so
    assert lines(fleet.multi("stop", "w1", check=0).stdout) == [f"> {W1}: not running"]


def test_kill_sends_kill_and_removes_the_pidfile_left_behind(fleet):
    fleet.multi("start", "w1", *NODE_OPTS, check=0)
    pid = fleet.node_pid("w1")
    children = psutil.Process(pid).children(recursive=True)
    result = fleet.multi("kill", "w1", check=0)
    assert lines(result.stdout) == [f"> {W1}: KILL -> {pid}"]
    assert not pid_alive(pid)
    assert not (fleet.path / "w1.pid").exists()
    wait_for(lambda: not any(pid_alive(c.pid) for c in children), 10,
             message="pool processes survived the node's KILL")


def test_a_pidfile_naming_an_unrelated_process_is_never_signalled(fleet):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = fleet.path / "w1.pid"
        pidfile.write_text(f"{sleeper.pid}\n")
        status = fleet.multi("status", "w1", "--json", check=1)
        assert json.loads(status.stdout)[0]["state"] == "stale"
        assert pidfile.exists(), "status must only report a stale pidfile"
        for command in ("stop", "kill"):
            pidfile.write_text(f"{sleeper.pid}\n")
            result = fleet.multi(command, "w1", check=0)
            assert lines(result.stdout) == [f"> {W1}: not running (stale pidfile removed)"]
            assert not pidfile.exists()
            assert sleeper.poll() is None, f"multi {command} signalled a process it does not own"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pidfile_naming_another_node_is_stale_for_this_one(fleet):
    fleet.multi("start", "w2", *NODE_OPTS, check=0)
    w2 = fleet.node_pid("w2")
    (fleet.path / "w1.pid").write_text(f"{w2}\n")
    result = fleet.multi("stopwait", "w1", check=0)
    assert lines(result.stdout) == [f"> {W1}: not running (stale pidfile removed)"]
    assert fleet.node_pid("w2") == w2 and fleet.ping(W2) == {W2}
    # and start replaces such a file instead of believing it
    (fleet.path / "w1.pid").write_text(f"{w2}\n")
    started = fleet.multi("start", "w1", *NODE_OPTS, check=0)
    assert lines(started.stdout) == [f"> {W1}: OK (stale pidfile removed)"]
    assert fleet.node_pid("w1") not in (None, w2)


# -- restart, status ------------------------------------------------------------------------------


def test_restart_is_rolling_changes_the_pids_and_keeps_the_options(fleet):
    opts = ["-A", "proj", "-c", "1", "-c:w1", "2", "-l", "INFO"]
    fleet.multi("start", "w1", "w2", *opts, check=0)
    before = {name: fleet.node_pid(name) for name in ("w1", "w2")}
    result = fleet.multi("restart", "w1", "w2", *opts, check=0)
    after = {name: fleet.node_pid(name) for name in ("w1", "w2")}
    assert all(after.values()) and all(after[n] != before[n] for n in after), (before, after)
    # rolling: w1 is back before w2 is asked to stop, so one node is always consuming
    assert lines(result.stdout) == [
        f"> {W1}: TERM -> {before['w1']}", f"> {W1}: DOWN", f"> {W1}: OK",
        f"> {W2}: TERM -> {before['w2']}", f"> {W2}: DOWN", f"> {W2}: OK"]
    cmdline = psutil.Process(after["w1"]).cmdline()
    assert cmdline[cmdline.index("-c") + 1] == "2"
    assert fleet.stats(W1)["pool"]["max-concurrency"] == 2
    assert fleet.stats(W2)["pool"]["max-concurrency"] == 1


def test_status_json_exit_code_says_whether_every_node_is_up(fleet):
    fleet.multi("start", "w1", *NODE_OPTS, check=0)
    pid = fleet.node_pid("w1")
    up = fleet.multi("status", "w1", "-A", "proj", "--json", check=0)
    row, = json.loads(up.stdout)
    assert (row["node"], row["state"], row["pid"]) == (W1, "up", pid)
    assert row["memory"] > 0 and row["uptime"] >= 0 and row["tasks"] == 0

    partly = fleet.multi("status", "w1", "w2", "-A", "proj", "--json", check=1)
    assert [r["state"] for r in json.loads(partly.stdout)] == ["up", "stopped"]

    # no app to ask the broker with: the pidfiles still tell what runs here
    blind = fleet.multi("status", "w1", "-A", "no_such_app", "--json", check=1)
    assert [(r["state"], r["pid"]) for r in json.loads(blind.stdout)] == [("running", pid)]
    assert blind.stderr.startswith("Warning: no answer from the broker")

    table = fleet.multi("status", "w1", "-A", "proj", check=0)
    assert re.search(rf"^{re.escape(W1)}\s+{pid}\s+up\s", table.stdout, re.M), table.stdout


# -- run: the foreground supervisor ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_run_restarts_a_killed_node_and_exits_0_after_term(fleet):
    supervisor = fleet.run_supervisor("w1", "w2", *NODE_OPTS)
    first = wait_for(lambda: fleet.node_pid("w1") and fleet.node_pid("w2") and
                     fleet.ping(W1, W2, timeout=2) == {W1, W2}, 30, message=fleet.supervisor_log)
    assert first
    w1, w2 = fleet.node_pid("w1"), fleet.node_pid("w2")
    # the nodes are the supervisor's children, each in its own session (signals reach the
    # worker main process only from the supervisor)
    for pid in (w1, w2):
        assert psutil.Process(pid).ppid() == supervisor.pid
        assert os.getsid(pid) == pid

    os.kill(w1, signal.SIGKILL)
    new = wait_for(lambda: (lambda p: p if p not in (None, w1) else None)(fleet.node_pid("w1")),
                   30, message=fleet.supervisor_log)
    wait_for(lambda: fleet.ping(W1, timeout=2) == {W1}, 30, message=fleet.supervisor_log)
    assert fleet.node_pid("w2") == w2, "only the node that died is restarted"
    assert f"{W1}: was killed by SIGKILL; restarting in" in fleet.supervisor_log()

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0, fleet.supervisor_log()
    assert not pid_alive(new) and not pid_alive(w2)
    assert not list(fleet.path.glob("*.pid")), "the workers remove their pidfiles on a clean stop"
    log = fleet.supervisor_log()
    assert "got SIGTERM: passing it on to the nodes and stopping" in log
    assert f"{W1}: stopped (exited with code 0)" in log


def test_run_refuses_nodes_that_are_already_running(fleet):
    fleet.multi("start", "w1", *NODE_OPTS, check=0)
    pid = fleet.node_pid("w1")
    result = fleet.multi("run", "w1", *NODE_OPTS, check=73)
    assert lines(result.stderr) == [f"Error: {W1} is already running (pid {pid}); stop it first"]


# -- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["bogus", "w1"], "Error: unknown multi command 'bogus'"),
    (["start", "w1", "3"], "Error: a node count (3) must be the only node argument"),
    (["start", "w1", "--frobnicate"], "Error: unknown worker option '--frobnicate'"),
    (["show", "w1", "w2", "-c:w3", "2"], "Error: ':w3': 'w3' names no node"),
    (["stop"], "Error: no nodes given"),
])
def test_usage_errors_are_one_line_and_exit_64(fleet, args, message):
    result = fleet.multi(*args, check=64)
    assert lines(result.stderr) == [lines(result.stderr)[0]] and result.stderr.startswith(message)
    assert result.stdout == ""


def test_show_names_expand_and_get_print_without_starting_anything(fleet):
    show = fleet.multi("show", "2", "-A", "proj", "-c:2", "3", check=0)
    first, second = lines(show.stdout)
    assert first.endswith(f"-m qctl -A proj worker --detach -n qctl1@{HOST} "
                          f"--pidfile {fleet.path}/qctl1.pid --logfile {fleet.path}/qctl1%I.log")
    assert second.endswith("--logfile " f"{fleet.path}/qctl2%I.log -c 3")
    assert lines(fleet.multi("names", "w1", "w2@elsewhere", check=0).stdout) == [
        W1, "w2@elsewhere"]
    assert lines(fleet.multi("expand", "%n-%i.log", "w1", "w2", check=0).stdout) == [
        "w1-%i.log", "w2-%i.log"]
    got = fleet.multi("get", "w2", "w1", "w2", "-c:w2", "5", check=0)
    assert lines(got.stdout)[0].endswith(f"-n {W2} --pidfile {fleet.path}/w2.pid "
                                         f"--logfile {fleet.path}/w2%I.log -c 5")
    assert not list(fleet.path.glob("*.pid")) and not list(fleet.path.glob("*.log"))
