"""A real worker talking sd_notify to a datagram socket bound by the test, as systemd does for
``Type=notify`` units: READY=1 once consuming, WATCHDOG=1 while alive, STOPPING=1 on TERM,
all from the main process (``NotifyAccess=main`` drops anything else)."""
from __future__ import annotations

import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import READY_RE, Project
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)

WATCHDOG_USEC = 400_000
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class Notification:
    fields: dict[str, str]
    sender_pid: int
    at: float
    ready_logged: bool  # the worker's "ready." line was in its log when this arrived


class Manager:
    """The service manager's end of NOTIFY_SOCKET: records each datagram with its sender."""

    def __init__(self, path: str, log_path: Path) -> None:
        self.path, self.log_path = path, log_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        # the kernel attaches the sender's pid, as systemd asks it to
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.received: list[Notification] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except socket.timeout:
                continue
            except OSError:
                return
            ready_logged = self.log_path.exists() and bool(
                READY_RE.search(self.log_path.read_text(errors="replace")))
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._lock:
                self.received.append(Notification(fields, pid, time.monotonic(), ready_logged))

    def with_field(self, key: str) -> list[Notification]:
        with self._lock:
            return [n for n in self.received if key in n.fields]

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def project(tmp_path, _clean_qctl_env):
    project = Project(tmp_path / "proj")
    yield project
    project.close()


@pytest.fixture
def socket_dir():
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="qctl-notify-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_worker_notifies_ready_watchdog_and_stopping(project, socket_dir):
    # The log file the worker is about to write: start_worker numbers them from 1.
    manager = Manager(str(socket_dir / "notify.sock"), project.path / "worker-1.log")
    try:
        worker = project.start_worker("-c", "2", wait_ready=False, env={
            "NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        assert worker.log_path == manager.log_path
        ready = wait_for(lambda: manager.with_field("READY"), 30,
                         message=lambda: worker.tail())[0]
        hostname = worker.wait_ready(5)
        assert ready.fields["READY"] == "1"
        assert ready.ready_logged, "READY=1 arrived before the worker logged 'ready.'"
        assert ready.fields["MAINPID"] == str(worker.pid)
        assert hostname in ready.fields.get("STATUS", "")

        # pings keep coming, at about WATCHDOG_USEC / 2, only once ready
        pings = wait_for(lambda: (lambda p: p if len(p) >= 4 else None)(
                             manager.with_field("WATCHDOG")), 20,
                         message=lambda: f"{manager.received}\n{worker.tail()}")
        assert all(p.fields["WATCHDOG"] == "1" and p.at >= ready.at for p in pings)
        assert not manager.with_field("STOPPING")

        terminated_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        stopping = wait_for(lambda: manager.with_field("STOPPING"), 20,
                            message=lambda: worker.tail())[0]
        assert stopping.fields["STOPPING"] == "1" and stopping.at >= terminated_at
        assert worker.wait_exit(30) == 0, worker.tail()

        # systemd's NotifyAccess=main accepts only the main process: so must everything be
        assert {n.sender_pid for n in manager.received} == {worker.pid}
        assert len(manager.with_field("READY")) == 1
    finally:
        manager.close()


def test_worker_without_a_listener_runs_normally(project, socket_dir):
    """A notification socket nobody listens on (a stale NOTIFY_SOCKET) changes nothing."""
    worker = project.start_worker(env={"NOTIFY_SOCKET": str(socket_dir / "nobody.sock"),
                                       "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    result = project.client().send_task("proj.add", args=(2, 3))
    assert result.get(timeout=20) == 5
    assert worker.stop() == 0, worker.tail()
