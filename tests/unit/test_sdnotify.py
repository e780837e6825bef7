"""The sd_notify protocol against real ``AF_UNIX`` datagram sockets, as systemd binds them:
a socket file in a temporary folder and an abstract socket (``@name``)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import pytest

from qctl_worker.sdnotify import Notifier

pytestmark = pytest.mark.timeout(20)


class Manager:
    """The service manager's end: a bound datagram socket that collects notifications."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def receive(self) -> bytes:
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        """Whatever has arrived, without waiting."""
        found = []
        self.sock.setblocking(False)
        try:
            while True:
                found.append(self.sock.recv(65536))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5.0)
        return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_manager(tmp_path):
    path = str(tmp_path / "notify.sock")
    manager = Manager(path)
    manager.env_value = path
    yield manager
    manager.close()


@pytest.fixture
def abstract_manager():
    name = f"qctl-test-{os.getpid()}-{uuid.uuid4().hex}"
    manager = Manager("\0" + name)
    manager.env_value = "@" + name
    yield manager
    manager.close()


@pytest.fixture(params=["path", "abstract"])
def manager(request):
    return request.getfixturevalue(f"{request.param}_manager")


@pytest.fixture
def notifier(manager):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": manager.env_value})
    assert notifier is not None
    yield notifier
    notifier.close()


# -- from_env --------------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_no_notifier_without_a_socket(environ):
    assert Notifier.from_env(environ) is None


@pytest.mark.parametrize("value", ["relative/notify.sock", "@", "vsock:2:1234"])
def test_no_notifier_for_an_address_it_cannot_use(value):
    assert Notifier.from_env({"NOTIFY_SOCKET": value}) is None


def test_from_env_reads_os_environ_and_leaves_it_alone(path_manager, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", path_manager.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    notifier = Notifier.from_env()
    try:
        assert notifier is not None
        notifier.status("up")
        assert path_manager.receive() == b"STATUS=up"
        assert os.environ["NOTIFY_SOCKET"] == path_manager.env_value
        assert os.environ["WATCHDOG_USEC"] == "3000000"
    finally:
        notifier.close()


def test_abstract_address_has_a_leading_nul(abstract_manager):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_manager.env_value})
    try:
        assert notifier.address == "\0" + abstract_manager.env_value[1:]
    finally:
        notifier.close()


# -- the datagrams, byte for byte ------------------------------------------------------


def test_ready_with_status_and_main_pid(manager, notifier):
    notifier.ready("Consuming from celery")
    assert manager.receive() == \
        f"READY=1\nSTATUS=Consuming from celery\nMAINPID={os.getpid()}".encode()


def test_ready_without_status(manager, notifier):
    notifier.ready()
    assert manager.receive() == f"READY=1\nMAINPID={os.getpid()}".encode()


def test_stopping(manager, notifier):
    notifier.stopping()
    assert manager.receive() == b"STOPPING=1"
    notifier.stopping("Warm shutdown")
    assert manager.receive() == b"STOPPING=1\nSTATUS=Warm shutdown"


def test_status(manager, notifier):
    notifier.status("3 tasks running")
    assert manager.receive() == b"STATUS=3 tasks running"


def test_watchdog(manager, notifier):
    notifier.watchdog()
    assert manager.receive() == b"WATCHDOG=1"


def test_send_keeps_field_order_and_encodes_utf8(manager, notifier):
    assert notifier.send(STATUS="prêt", ERRNO="0") is True
    assert manager.receive() == "STATUS=prêt\nERRNO=0".encode("utf-8")


def test_a_newline_in_a_status_cannot_forge_a_field(manager, notifier):
    notifier.status("line one\nREADY=1")
    assert manager.receive() == b"STATUS=line one READY=1"


def test_each_call_is_one_datagram(manager, notifier):
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    received = [manager.receive() for _ in range(3)]
    assert received == [f"READY=1\nMAINPID={os.getpid()}".encode(), b"WATCHDOG=1", b"STOPPING=1"]
    assert manager.pending() == []


def test_sending_from_many_threads(manager, notifier):
    threads = [threading.Thread(target=notifier.watchdog) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert [manager.receive() for _ in range(8)] == [b"WATCHDOG=1"] * 8


@pytest.mark.parametrize("fields", [{}, {"lower": "1"}, {"BAD KEY": "1"}], ids=str)
def test_invalid_fields_are_refused_without_raising(manager, notifier, fields):
    assert notifier.send(**fields) is False
    assert manager.pending() == []


# -- watchdog_interval -----------------------------------------------------------------


def _interval(**environ: str) -> float | None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify.sock", **environ})
    try:
        return notifier.watchdog_interval()
    finally:
        notifier.close()


def test_watchdog_interval_is_half_the_timeout():
    assert _interval(WATCHDOG_USEC="400000") == pytest.approx(0.2)
    assert _interval(WATCHDOG_USEC="60000000") == pytest.approx(30.0)


def test_watchdog_interval_when_the_watchdog_is_for_this_process():
    assert _interval(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid())) == pytest.approx(0.2)


def test_no_watchdog_interval_when_the_watchdog_is_for_another_process():
    assert _interval(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid() + 1)) is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_no_watchdog_interval_without_a_usable_timeout(usec):
    environ = {} if usec is None else {"WATCHDOG_USEC": usec}
    assert _interval(**environ) is None


# -- failures never raise --------------------------------------------------------------


def test_socket_gone_returns_false_and_logs_once(tmp_path, caplog):
    path = tmp_path / "notify.sock"
    manager = Manager(str(path))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    try:
        assert notifier.send(READY="1") is True
        manager.close()
        path.unlink()
        with caplog.at_level(logging.DEBUG, logger="qctl.worker.sdnotify"):
            assert notifier.send(WATCHDOG="1") is False
            notifier.ready("still here")
            notifier.stopping()
            notifier.status("x")
            notifier.watchdog()
        failures = [r for r in caplog.records if r.name == "qctl.worker.sdnotify"]
        assert len(failures) == 1 and failures[0].levelno == logging.DEBUG
    finally:
        notifier.close()


def test_socket_never_there(tmp_path):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    try:
        assert notifier.send(READY="1") is False
        notifier.watchdog()
    finally:
        notifier.close()


def test_close_is_idempotent_and_later_sends_fail_quietly(manager, notifier):
    notifier.close()
    notifier.close()
    assert notifier.send(WATCHDOG="1") is False
    notifier.ready()
    assert manager.pending() == []


def test_context_manager_closes(manager):
    with Notifier.from_env({"NOTIFY_SOCKET": manager.env_value}) as notifier:
        notifier.watchdog()
    assert manager.receive() == b"WATCHDOG=1"
    assert notifier.send(WATCHDOG="1") is False
