"""A private RabbitMQ node for the test session: ``start_rabbit(tmpdir)`` / ``stop_rabbit(handle)``.

The node listens on 127.0.0.1 only, on free ports, with its data, logs and Erlang cookie in
``tmpdir``; it gets its own ``epmd`` (also loopback-only, on a private port) so that it never
depends on, or disturbs, an epmd someone else started. Nothing is left running afterwards.

Why it starts in ~4 s here rather than timing out: Debian's ``/usr/sbin/rabbitmq-server`` is a
wrapper that, run as root, re-executes the server through ``su rabbitmq``; that user cannot
create the data folders under our temp dir (``failed_to_create_feature_flags_file_directory``,
after a slow ~40 s). We run the real script ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly
as the current user instead. stdin is /dev/null and ``RABBITMQ_ALLOW_INPUT`` is unset so the
script runs the node in the background of itself and turns SIGTERM into a clean stop.

Use from ``tests/conftest.py``::

    from tests.servers_rabbit import rabbit  # noqa: F401  (the session fixture)

    def pytest_configure(config):
        pytest_configure_rabbit(config)        # registers the ``slow`` marker

and optionally ``launch_session_rabbit(tmp_dir)`` from ``pytest_sessionstart`` to boot the node
while collection goes on. The fixture ``rabbit`` is a ``RabbitHandle`` (``.url``,
``.stop_node()``, ``.start_node()``); it is one node per session however many modules import
it. Without ``rabbitmq-server`` the tests using it are skipped, or fail when ``CI=true``.
Boot takes ~4.5 s here, a stop ~1 s.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/lib/rabbitmq/sbin/rabbitmq-server")


def rabbit_binary() -> str | None:
    """The real server script (not Debian's ``su`` wrapper), or None when not installed."""
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("rabbitmq-server")


def _epmd_binary() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    for path in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
        return str(path)
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RabbitHandle:
    """One node: its files, ports and processes. ``stop_node``/``start_node`` keep the data
    (durable queues and persistent messages survive, as after a real broker restart)."""

    def __init__(self, tmpdir: str | Path) -> None:
        binary = rabbit_binary()
        epmd = _epmd_binary()
        if binary is None or epmd is None:
            raise FileNotFoundError("rabbitmq-server (and epmd) not installed")
        self.binary, self.epmd_binary = binary, epmd
        self.dir = Path(tmpdir)
        self.port, self.dist_port, self.epmd_port = _free_ports(3)
        self.node = f"qctltest{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.log_path = self.dir / "server.log"
        self.server: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.boot_seconds: float | None = None
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = true\nlog.console.level = warning\nlog.file.level = info\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env.update({
            "HOME": str(self.dir),                      # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            # Erlang distribution listens on all interfaces unless told otherwise.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })

    # -- processes ------------------------------------------------------------------------

    def launch(self) -> None:
        """Start epmd (once) and the node; returns at once (``wait_ready`` waits)."""
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(
                [self.epmd_binary, "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=self.env, start_new_session=True)
            deadline = time.monotonic() + 10
            while not _port_open(self.epmd_port):
                if self.epmd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"epmd did not start on 127.0.0.1:{self.epmd_port}")
                time.sleep(0.02)
        self._started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.server = subprocess.Popen([self.binary], cwd=str(self.dir), env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until an AMQP connection succeeds; raises with the log tail when the node died."""
        import pika
        params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
                                    "?connection_attempts=1&socket_timeout=2")
        deadline = time.monotonic() + timeout
        while True:
            if self.server is None or self.server.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited early\n{self.tail()}")
            if _port_open(self.port):
                try:
                    pika.BlockingConnection(params).close()
                    self.boot_seconds = time.monotonic() - self._started_at
                    return
                except Exception:  # noqa: BLE001 - still booting
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq-server not ready after {timeout}s\n{self.tail()}")
            time.sleep(0.1)

    def _vm_pid(self, server: subprocess.Popen) -> int | None:
        """The Erlang VM's pid from the node's pid file, if it is our script's child."""
        try:
            pid = int((self.dir / "rabbit.pid").read_text().split()[0])
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pid if ppid == server.pid else None

    def stop_node(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the Erlang VM we started (a clean stop, no ``rabbitmqctl`` needed), or its
        start script; SIGKILL its process group (the one we created) after ``timeout``.
        Keeps epmd and the data."""
        server, self.server = self.server, None
        if server is None or server.poll() is not None:
            return
        vm = self._vm_pid(server)
        os.kill(vm if vm else server.pid, signal.SIGTERM)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        # The Erlang VM is a child of the script: wait until it released the port too.
        deadline = time.monotonic() + timeout
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _port_open(self.port):
            os.killpg(server.pid, signal.SIGKILL)

    def start_node(self, timeout: float = READY_TIMEOUT) -> None:
        self.launch()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop the node and epmd. Idempotent."""
        self.stop_node()
        epmd, self.epmd = self.epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(10)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait(5)

    def tail(self, lines: int = 40) -> str:
        parts = []
        for path in [self.log_path, *sorted((self.dir / "log").glob("*.log"))]:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)


def start_rabbit(tmpdir: str | Path, timeout: float = READY_TIMEOUT) -> tuple[str, RabbitHandle]:
    """Start a node in ``tmpdir`` and wait until it accepts AMQP connections. A second try
    (in a subfolder, on new ports) covers a port taken between choosing and binding it."""
    for attempt in (0, 1):
        handle = RabbitHandle(Path(tmpdir) / f"node{attempt}" if attempt else tmpdir)
        try:
            handle.launch()
            handle.wait_ready(timeout)
            return handle.url, handle
        except RuntimeError as exc:
            handle.stop()
            if attempt or "exited early" not in str(exc):     # a slow boot is not retried
                raise
        except BaseException:
            handle.stop()
            raise
    raise AssertionError("unreachable")


def stop_rabbit(handle: RabbitHandle) -> None:
    handle.stop()


# -- pytest ------------------------------------------------------------------------------

_SESSION: dict[str, object] = {}
_SESSION_LOCK = threading.Lock()


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"RabbitMQ tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def launch_session_rabbit(tmp_root: str | Path) -> None:
    """Start booting the session's node now without waiting (e.g. from ``pytest_sessionstart``
    when AMQP tests are selected); the ``rabbit`` fixture then only waits for the rest."""
    with _SESSION_LOCK:
        if "handle" in _SESSION or "error" in _SESSION or rabbit_binary() is None:
            return
        try:
            handle = RabbitHandle(tmp_root)
            handle.launch()
        except Exception as exc:  # noqa: BLE001 - reported when a test asks for the node
            _SESSION["error"] = f"cannot start rabbitmq-server: {exc}"
            return
        _SESSION["booting"] = handle
        atexit.register(stop_session_rabbit)    # also when no test ends up using it


def session_rabbit(tmp_root: str | Path) -> RabbitHandle:
    """The session's node (started on first use, shared by every module that asks)."""
    with _SESSION_LOCK:
        booting = _SESSION.pop("booting", None)
        if isinstance(booting, RabbitHandle):
            try:
                booting.wait_ready()
                _SESSION["handle"] = booting
            except RuntimeError as exc:
                booting.stop()
                _SESSION["error"] = f"cannot start rabbitmq-server: {exc}"
                pytest.fail(str(_SESSION["error"]), pytrace=False)
        handle = _SESSION.get("handle")
        if handle is None:
            if "error" in _SESSION:
                pytest.fail(str(_SESSION["error"]), pytrace=False)
            if rabbit_binary() is None or _epmd_binary() is None:
                _missing("rabbitmq-server is not installed")
            try:
                _, handle = start_rabbit(Path(tmp_root))
            except Exception as exc:  # noqa: BLE001
                _SESSION["error"] = f"cannot start rabbitmq-server: {exc}"
                pytest.fail(str(_SESSION["error"]), pytrace=False)
            _SESSION["handle"] = handle
            atexit.register(stop_session_rabbit)  # an interrupted session still stops it
        assert isinstance(handle, RabbitHandle)
        # A test that stopped the node (restart tests) must not break the next one.
        if handle.server is None or handle.server.poll() is not None:
            handle.start_node()
        return handle


def stop_session_rabbit() -> None:
    with _SESSION_LOCK:
        handles = [_SESSION.pop("handle", None), _SESSION.pop("booting", None)]
    for handle in handles:
        if isinstance(handle, RabbitHandle):
            handle.stop()


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory):
    """The session's RabbitMQ node (``RabbitHandle``); skipped when not installed."""
    handle = session_rabbit(tmp_path_factory.mktemp("rabbit"))
    yield handle
    stop_session_rabbit()


def pytest_configure_rabbit(config) -> None:
    """Register the ``slow`` marker (call from conftest's ``pytest_configure``)."""
    config.addinivalue_line("markers", "slow: slow tests (broker restarts)")
