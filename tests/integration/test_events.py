"""``qctl events`` and ``qctl.events.EventReceiver`` against real workers, on every broker:
heartbeats always, task events (received/started/succeeded/failed) only with ``-E`` or after
``enable_events``; fields as Celery sends them (wire notes §6)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from qctl.events import EventReceiver, State
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)

GET = 20.0
#: Heartbeats come every 2 s; give slow CI machines a margin.
BEAT = 10.0

STANDARD = {"hostname", "timestamp", "utcoffset", "pid", "clock", "type"}


class EventsCommand:
    """``python -m qctl -A proj events ...`` in the background; its stdout lines collected."""

    def __init__(self, project, *args: str) -> None:
        self.args = args
        self.err_path = project.path / f"events-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "qctl", "-A", "proj", "events", *args], cwd=str(project.path),
            env=project.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err,
            text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def find(self, kind: str, uuid: str | None = None, hostname: str | None = None) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind
                and (uuid is None or e.get("uuid") == uuid)
                and (hostname is None or e.get("hostname") == hostname)]

    def wait_event(self, kind: str, uuid: str | None = None, hostname: str | None = None,
                   timeout: float = GET) -> dict:
        return wait_for(lambda: self.find(kind, uuid, hostname), timeout,
                        message=lambda: f"no {kind} {uuid or ''} from {hostname or 'anyone'}\n"
                                        + self.describe())[0]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"events {' '.join(self.args)}: returncode {self.popen.poll()}\n--- stdout\n"
                + "\n".join(self.lines[-40:]) + "\n--- stderr\n" + self.stderr())

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # our own child, by its PID
            self.popen.wait(10)
        self._reader.join(5)
        self._err.close()


@pytest.fixture
def events_command(tmp_project):
    started: list[EventsCommand] = []

    def start(*args: str) -> EventsCommand:
        command = EventsCommand(tmp_project, *args)
        started.append(command)
        return command
    yield start
    for command in started:
        command.close()


def check_worker_event(event: dict, worker, kind: str) -> None:
    assert event["type"] == kind
    assert STANDARD <= set(event), event
    assert event["hostname"] == worker.hostname
    assert event["pid"] == worker.pid  # the main process
    assert isinstance(event["timestamp"], float) and abs(event["timestamp"] - time.time()) < 60
    assert isinstance(event["clock"], int) and isinstance(event["utcoffset"], (int, float))
    assert event["freq"] in (2.0, 5.0)  # 5.0: the answer to a `heartbeat` control command
    assert isinstance(event["active"], int) and isinstance(event["processed"], int)
    assert isinstance(event["loadavg"], list) and len(event["loadavg"]) == 3
    assert all(isinstance(x, (int, float)) for x in event["loadavg"])
    assert event["sw_ident"] and event["sw_ver"] and event["sw_sys"]


def check_task_events(cmd: EventsCommand, worker, task_id: str, name: str, args: str) -> list[dict]:
    """received, started and then an outcome, in that order, with Celery's fields."""
    received = cmd.wait_event("task-received", task_id)
    assert STANDARD <= set(received)
    assert received["hostname"] == worker.hostname and received["pid"] == worker.pid
    assert received["name"] == name and received["args"] == args and received["kwargs"] == "{}"
    assert received["root_id"] == task_id and received["parent_id"] is None
    assert received["retries"] == 0 and received["eta"] is None and received["expires"] is None
    started = cmd.wait_event("task-started", task_id)
    assert started["hostname"] == worker.hostname and started["pid"] == worker.pid
    assert received["clock"] < started["clock"]
    assert received["timestamp"] <= started["timestamp"]
    return [received, started]


def test_dump_json_shows_heartbeats_and_task_events(tmp_project, start_worker, client_app,
                                                    events_command):
    worker = start_worker("-E", "-n", "ev1@%h", "-c", "2")
    cmd = events_command("--dump", "--json", "--timeout", "90")
    beat = cmd.wait_event("worker-heartbeat", hostname=worker.hostname, timeout=BEAT)
    check_worker_event(beat, worker, "worker-heartbeat")  # the command is listening now

    ok = client_app.send_task("proj.add", (2, 2))
    bad = client_app.send_task("proj.fail", ("boom",))
    assert ok.get(timeout=GET) == 4
    with pytest.raises(Exception):
        bad.get(timeout=GET)

    received, started = check_task_events(cmd, worker, ok.id, "proj.add", "(2, 2)")
    succeeded = cmd.wait_event("task-succeeded", ok.id)
    assert succeeded["hostname"] == worker.hostname and STANDARD <= set(succeeded)
    assert succeeded["result"] == "4"
    assert isinstance(succeeded["runtime"], float) and 0 <= succeeded["runtime"] < GET
    assert started["clock"] < succeeded["clock"]

    check_task_events(cmd, worker, bad.id, "proj.fail", "('boom',)")
    failed = cmd.wait_event("task-failed", bad.id)
    assert failed["exception"] == "ValueError('boom')"
    assert "ValueError" in failed["traceback"] and "Traceback" in failed["traceback"]

    # exactly one of each for each task (no duplicates from batching or the transport)
    for task_id, outcome in ((ok.id, "task-succeeded"), (bad.id, "task-failed")):
        kinds = [e["type"] for e in cmd.events if e.get("uuid") == task_id]
        assert kinds == ["task-received", "task-started", outcome], kinds

    # heartbeats keep coming and count the work done
    wait_for(lambda: any(e["processed"] >= 2 for e in cmd.find("worker-heartbeat",
                                                              hostname=worker.hostname)),
             BEAT, message=cmd.describe)

    # and the goodbye
    assert worker.stop() == 0
    offline = cmd.wait_event("worker-offline", hostname=worker.hostname, timeout=GET)
    check_worker_event(offline, worker, "worker-offline")

    # Ctrl-C ends it quietly, exit 0
    cmd.popen.send_signal(signal.SIGINT)
    assert cmd.wait(20) == 0, cmd.describe()
    assert "Traceback" not in cmd.stderr() and "Aborted" not in cmd.stderr(), cmd.describe()


def test_dump_lines_count_and_timeout(tmp_project, start_worker, client_app, events_command):
    # nobody there: --timeout ends it, exit 0, nothing printed
    started = time.monotonic()
    idle = events_command("--dump", "--timeout", "1")
    assert idle.wait(60) == 0, idle.describe()
    assert idle.lines == [] and time.monotonic() - started < 30

    worker = start_worker("-E", "-n", "ev2@%h")
    # not a terminal: without --dump it prints the same lines; --count ends it
    cmd = events_command("--count", "2", "--timeout", "60")
    assert cmd.wait(60) == 0, cmd.describe()
    assert len(cmd.lines) == 2, cmd.describe()
    for line in cmd.lines:
        assert line.startswith(f"{worker.hostname} [")
        assert re.search(r"\]: worker-(heartbeat|online) active=\d+ processed=\d+ loadavg=", line)

    cmd = events_command("--dump", "--timeout", "60")
    wait_for(lambda: any("worker-heartbeat" in line for line in cmd.lines), BEAT,
             message=cmd.describe)
    result = client_app.send_task("proj.add", (20, 22))
    assert result.get(timeout=GET) == 42
    wait_for(lambda: any(f"task-succeeded uuid={result.id}" in line for line in cmd.lines), GET,
             message=cmd.describe)
    cmd.popen.send_signal(signal.SIGINT)
    assert cmd.wait(20) == 0, cmd.describe()
    task_lines = [line for line in cmd.lines if result.id in line]
    prefix = f"{worker.hostname} ["
    assert all(line.startswith(prefix) for line in task_lines), task_lines
    assert [line.split("]: ", 1)[1] for line in task_lines[:2]] == [
        f"task-received uuid={result.id} name=proj.add args=(20, 22) kwargs={{}}",
        f"task-started uuid={result.id}"], task_lines
    assert re.fullmatch(rf"task-succeeded uuid={result.id} result=42 runtime=\d+\.\d+",
                        task_lines[2].split("]: ", 1)[1]), task_lines
    assert len(task_lines) == 3, task_lines


def test_receiver_without_task_events_sees_only_heartbeats(tmp_project, start_worker, client_app):
    worker = start_worker("-n", "ev3@%h")  # no -E
    seen: list[dict] = []
    state = State()
    receiver = EventReceiver(client_app, handlers={"*": lambda e: (seen.append(e), state.event(e))})
    with receiver:
        result = client_app.send_task("proj.add", (1, 2))
        assert result.get(timeout=GET) == 3

        def heartbeat_after_the_task(event: dict) -> None:
            if event["type"] == "worker-heartbeat" and event.get("processed", 0) >= 1:
                receiver.should_stop = True
        receiver.handlers["worker-heartbeat"] = lambda e: (
            seen.append(e), state.event(e), heartbeat_after_the_task(e))
        receiver.capture(timeout=BEAT + 5, wakeup=False)
    beats = [e for e in seen if e["type"] == "worker-heartbeat" and e["hostname"] == worker.hostname]
    assert beats, seen
    assert beats[-1]["processed"] >= 1, "no heartbeat after the task was done"
    check_worker_event(beats[-1], worker, "worker-heartbeat")
    assert [e for e in seen if e["type"].startswith("task-")] == []
    assert all(isinstance(e["local_received"], float) for e in seen)
    node = state.workers[worker.hostname]
    assert node.status == "online" and node.processed >= 1 and state.tasks == {}


def test_enable_events_turns_task_events_on(tmp_project, start_worker, client_app):
    worker = start_worker("-n", "ev4@%h")  # no -E
    with EventReceiver(client_app) as receiver:
        replies = client_app.control.enable_events(reply=True, timeout=5)
        assert {k: v for r in replies for k, v in r.items()} == {
            worker.hostname: {"ok": "task events enabled"}}
        result = client_app.send_task("proj.add", (3, 4))
        assert result.get(timeout=GET) == 7
        kinds: list[str] = []
        for event in receiver.iter_events(timeout=GET):
            if event.get("uuid") == result.id:
                kinds.append(event["type"])
                if event["type"] == "task-succeeded":
                    assert event["result"] == "7"
                    break
        assert kinds == ["task-received", "task-started", "task-succeeded"]
