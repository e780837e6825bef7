"""beat with real processes: ticks on time, one sender among several beats, failover without a
duplicate tick, restarts without a burst, ``worker -B``, ``beat --list`` (SPEC §7, §10).

Every tick is ``proj.tick(entry)`` with the tick's id (entry, scheduled time) as task id, and
the worker records each run: a tick sent twice shows up as one id run twice.
"""
from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import Project, WorkerProcess
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(150)

EVERY_SECOND = json.dumps({"every-second": 1.0})


@pytest.fixture
def sqlite_project(tmp_path, _clean_qctl_env):
    """For what does not depend on the broker (restarts, -B, --list, files): SQLite only."""
    project = Project(tmp_path / "proj")
    yield project
    project.close()


def beat_env(project, schedule: str = EVERY_SECOND, lease: str | None = None) -> dict:
    return project.env({"PROJ_BEAT": schedule,
                        "QCTL_BEAT_LEASE_NAME": lease or f"beat-{uuid.uuid4().hex[:8]}"})


def start_beat(project, env: dict, *args: str, name: str = "beat") -> WorkerProcess:
    schedule_file = project.path / f"{name}-schedule.json"
    command = [sys.executable, "-m", "qctl", "-A", "proj", "beat", "-l", "INFO",
               "-s", str(schedule_file), *args]
    process = WorkerProcess(project, command, env, project.path / f"{name}-{uuid.uuid4().hex[:6]}.log")
    project.workers.append(process)          # stopped with the project
    process.wait_log(r"beat: Starting")
    return process


def ticks(project) -> list[dict]:
    return sorted(project.runs("tick"), key=lambda r: r["time"])


def assert_no_duplicate(runs: list[dict]) -> None:
    counts = collections.Counter(r["id"] for r in runs)
    twice = {k: v for k, v in counts.items() if v > 1}
    assert not twice, f"ticks run more than once: {twice}"


def wait_ticks(project, count: int, timeout: float = 30) -> list[dict]:
    return wait_for(lambda: (lambda r: r if len(r) >= count else None)(ticks(project)), timeout,
                    message=lambda: f"{len(ticks(project))} tick(s) of {count}")


def leader_of(*beats: WorkerProcess) -> WorkerProcess:
    def find():
        leading = [b for b in beats if b.log_lines(r"is the leader now")]
        return leading[0] if len(leading) == 1 else None
    return wait_for(find, 20, message=lambda: "\n".join(b.tail(20) for b in beats))


def test_every_second_entry_runs_on_time(tmp_project):
    tmp_project.start_worker("-c", "2")
    env = beat_env(tmp_project)
    start_beat(tmp_project, env)
    runs = wait_ticks(tmp_project, 5)
    assert_no_duplicate(runs)
    gaps = [b["time"] - a["time"] for a, b in zip(runs, runs[1:])]
    # on time: one per second, not a burst, not drifting away (generous: a loaded machine)
    assert all(0.3 < gap < 2.5 for gap in gaps), gaps


def test_two_beats_send_each_tick_once_and_the_standby_takes_over(tmp_project):
    tmp_project.start_worker("-c", "2")
    env = beat_env(tmp_project)
    first = start_beat(tmp_project, env, name="first")
    second = start_beat(tmp_project, env, name="second")
    leader = leader_of(first, second)
    standby = second if leader is first else first
    standby.wait_log(r"beat: standing by: .* leads")
    before = len(wait_ticks(tmp_project, 5))

    leader.kill()                                            # no goodbye: the lease expires
    killed_at = time.time()
    standby.wait_log(r"is the leader now", timeout=20)
    runs = wait_ticks(tmp_project, before + 4)
    assert_no_duplicate(runs)
    after = [r for r in runs if r["time"] > killed_at]
    assert after and after[0]["time"] - killed_at < 15, "takeover took too long"
    assert not standby.log_lines(r"lost the lead")


def test_a_clean_stop_hands_the_lead_over_at_once(tmp_project):
    tmp_project.start_worker("-c", "1")
    env = beat_env(tmp_project)
    first = start_beat(tmp_project, env, name="first")
    first.wait_log(r"is the leader now")
    second = start_beat(tmp_project, env, name="second")
    second.wait_log(r"standing by")
    wait_ticks(tmp_project, 3)
    assert first.stop() == 0
    assert first.log_lines(r"gave the lead up")
    second.wait_log(r"is the leader now", timeout=5)         # no lease expiry to wait for
    count = len(ticks(tmp_project))
    assert_no_duplicate(wait_ticks(tmp_project, count + 3))


def test_a_restart_neither_repeats_nor_bursts(sqlite_project):
    sqlite_project.start_worker("-c", "2")
    env = beat_env(sqlite_project, lease="restart")
    beat = start_beat(sqlite_project, env)
    wait_ticks(sqlite_project, 3)
    assert beat.stop() == 0
    stopped = time.time()
    sent_before = {r["id"] for r in ticks(sqlite_project)}
    # A downtime of several periods: those runs are missed while no beat runs.
    wait_for(lambda: time.time() - stopped > 4.0, 10)
    again = start_beat(sqlite_project, env, name="again")
    restarted = time.time()
    runs = wait_ticks(sqlite_project, len(sent_before) + 3)
    after = [r for r in runs if r["time"] > restarted]
    assert_no_duplicate(runs)
    assert not {r["id"] for r in after} & sent_before, "a tick that already ran was sent again"
    # the missed runs collapse into one catch-up send, then one per second
    first_window = [r for r in after if r["time"] - after[0]["time"] < 0.8]
    assert len(first_window) == 1, [r["time"] - restarted for r in after]
    assert again.log_lines(r"is the leader now")


def test_worker_with_B_runs_the_schedule(sqlite_project):
    env = {"PROJ_BEAT": EVERY_SECOND, "QCTL_BEAT_LEASE_NAME": "worker-b"}
    node = sqlite_project.start_worker("-c", "1", "-B", "-s", str(sqlite_project.path / "wb.json"),
                                    env=env)
    assert_no_duplicate(wait_ticks(sqlite_project, 3))
    assert node.stop() == 0
    assert node.log_lines(r"beat: .* gave the lead up")
    assert json.loads((sqlite_project.path / "wb.json").read_text())["entries"]["every-second"]


def test_a_corrupt_schedule_file_is_reported_and_rebuilt(sqlite_project):
    sqlite_project.start_worker("-c", "1")
    (sqlite_project.path / "beat-schedule.json").write_text("{not json")
    beat = start_beat(sqlite_project, beat_env(sqlite_project))
    beat.wait_log(r"schedule file .* is unreadable")
    wait_ticks(sqlite_project, 2)
    wait_for(lambda: json.loads((sqlite_project.path / "beat-schedule.json").read_text() or "{}")
             .get("entries"), 10)


def _qctl(project, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qctl", "-A", "proj", *args], cwd=project.path,
                          env=env, capture_output=True, text=True, timeout=60)


def test_list_shows_entries_next_runs_and_the_leader_without_scheduling(sqlite_project):
    schedule = json.dumps({"every-second": 1.0,
                           "nightly": {"crontab": {"minute": "30", "hour": "3"}}})
    env = beat_env(sqlite_project, schedule, lease="listing")
    listed = _qctl(sqlite_project, env, "beat", "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    rows = {row["name"]: row for row in data["entries"]}
    assert set(rows) == {"every-second", "nightly"} and data["leader"] is None
    assert rows["nightly"]["next_run_at"].endswith("03:30:00+00:00")
    assert rows["every-second"]["last_run_at"] is None
    assert sqlite_project.runs("tick") == []                     # --list sends nothing

    start_beat(sqlite_project, env)
    sqlite_project.start_worker("-c", "1")
    wait_ticks(sqlite_project, 1)
    text = _qctl(sqlite_project, env, "beat", "--list")
    assert text.returncode == 0, text.stderr
    assert "every-second: proj.tick" in text.stdout and "leader: " in text.stdout
    assert "none running" not in text.stdout


def test_a_bad_crontab_is_one_clear_line(sqlite_project):
    env = beat_env(sqlite_project, json.dumps({"bad": {"crontab": {"minute": "61"}}}))
    result = _qctl(sqlite_project, env, "beat")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "61" in lines[0] and "minute" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_beat_detach_returns_once_running_and_term_stops_it(sqlite_project):
    env = beat_env(sqlite_project)
    result = _qctl(sqlite_project, env, "beat", "--detach", "-l", "INFO")
    assert result.returncode == 0, result.stderr
    pidfile = sqlite_project.path / "qctl-beat.pid"
    pid = int(pidfile.read_text())
    try:
        log = sqlite_project.path / "qctl-beat.log"
        wait_for(lambda: "is the leader now" in log.read_text(), 10)
    finally:
        import os
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), 15)
