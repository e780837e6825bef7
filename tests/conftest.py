"""Shared fixtures: temporary projects, real worker processes, a client app.

- ``tmp_project`` / ``module_project``: a temporary folder holding the test app
  (``tests/apps/proj.py`` copied in as ``proj.py``) and a private SQLite broker and result
  store ``sqlite:///<tmp>/broker.sqlite3``. Workers run with this folder as their working
  directory and on their ``PYTHONPATH``; tasks record their runs there (``tests.helpers``).
- ``start_worker(*args, app_module='proj', env=None)``: starts ``python -m qctl -A proj worker
  -l INFO *args`` (or, while ``qctl/cli/worker.py`` does not exist yet, a small script calling
  ``qctl_worker.worker.Worker(app, **options).run()``), output to ``worker-N.log`` in the
  project, and waits for the ``ready.`` line. At teardown every worker still running gets
  SIGTERM, then SIGKILL after a deadline: by PID only.
- ``client_app``: an ``App`` in the test process on the same broker and result store.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import open_gate, read_runs, wait_for  # noqa: E402
from tests.servers_rabbit import launch_session_rabbit, rabbit  # noqa: E402,F401 - fixture
from tests.servers_redis import flushdb, redis_server, with_db  # noqa: E402,F401 - fixtures

APPS = ROOT / "tests" / "apps"
CLI_WORKER = ROOT / "qctl" / "cli" / "worker.py"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
READY_RE = re.compile(r"^\[[^\]]*\] (\S+@\S+) ready\.\s*$", re.M)

#: The test app's routes (``tests/apps/proj.py``), for clients that do not import it.
PROJ_ROUTES = {"proj.other_*": {"queue": "other"}, "proj.third_*": {"queue": "third"}}

#: Variables of the test process that would point a client at another broker or app.
_REDIRECTING_ENV = ("QCTL_BROKER_URL", "QCTL_RESULT_BACKEND", "QCTL_APP", "QCTL_CONFIG_MODULE")

_FALLBACK_RUNNER = textwrap.dedent('''\
    """Start a worker without the CLI (used only while qctl/cli/worker.py does not exist)."""
    import argparse, importlib, os, sys
    sys.path.insert(0, os.getcwd())
    parser = argparse.ArgumentParser()
    parser.add_argument("app")
    parser.add_argument("-n", "--hostname")
    parser.add_argument("-c", "--concurrency", type=int)
    parser.add_argument("-P", "--pool")
    parser.add_argument("-Q", "--queues")
    parser.add_argument("-X", "--exclude-queues")
    parser.add_argument("-l", "--loglevel", default="WARNING")
    parser.add_argument("-f", "--logfile")
    parser.add_argument("--prefetch-multiplier", type=int)
    parser.add_argument("--max-tasks-per-child", type=int)
    parser.add_argument("--max-memory-per-child", type=int)
    parser.add_argument("--time-limit", type=float)
    parser.add_argument("--soft-time-limit", type=float)
    parser.add_argument("-S", "--statedb")
    parser.add_argument("--shutdown-timeout", type=float)
    ns = parser.parse_args()
    module = importlib.import_module(ns.app.partition(":")[0])
    app = getattr(module, ns.app.partition(":")[2] or "app")
    app.finalize()
    from qctl_worker.worker import Worker
    split = lambda v: [q for q in v.split(",") if q] if v else None
    raise SystemExit(Worker(
        app, hostname=ns.hostname, concurrency=ns.concurrency, pool=ns.pool,
        queues=split(ns.queues), exclude_queues=split(ns.exclude_queues),
        loglevel=ns.loglevel.upper(), logfile=ns.logfile,
        prefetch_multiplier=ns.prefetch_multiplier, max_tasks_per_child=ns.max_tasks_per_child,
        max_memory_per_child=ns.max_memory_per_child, time_limit=ns.time_limit,
        soft_time_limit=ns.soft_time_limit, statedb=ns.statedb,
        shutdown_timeout=ns.shutdown_timeout).run())
''')


class WorkerProcess:
    """One real worker node started by a test."""

    def __init__(self, project: "Project", command: list[str], env: dict[str, str],
                 log_path: Path) -> None:
        self.project = project
        self.command = command
        self.log_path = log_path
        self._log_fh = open(log_path, "ab")
        self.popen = subprocess.Popen(command, cwd=str(project.path), env=env,
                                      stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        self.hostname: str | None = None
        self._text = ""
        self._offset = 0

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid} {' '.join(self.command[2:])}>"

    # -- the log ------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the worker wrote so far (stdout and stderr)."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        # Keep only whole lines; a line being written is read again next time.
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        self._text += data[:cut].decode("utf-8", "replace")
        return self._text

    def tail(self, lines: int = 60) -> str:
        text = self.log()
        with open(self.log_path, "rb") as fh:  # include a partial last line
            fh.seek(self._offset)
            text += fh.read().decode("utf-8", "replace")
        return f"--- tail of {self.log_path} (pid {self.pid}, returncode " \
               f"{self.popen.poll()}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def log_lines(self, pattern: str | re.Pattern) -> list[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [line for line in self.log().splitlines() if regex.search(line)]

    def wait_log(self, pattern: str | re.Pattern, timeout: float = 15.0, count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match the regex ``pattern``; returns them."""
        return wait_for(lambda: (lambda found: found if len(found) >= count else None)(
                            self.log_lines(pattern)),
                        timeout, message=lambda: f"waiting for {count} x {pattern!r} in the log\n"
                                                 + self.tail())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = READY_RE.search(self.log())
            if match:
                self.hostname = match.group(1)
                return self.hostname
            if self.popen.poll() is not None:
                pytest.fail(f"worker exited with {self.popen.returncode} before it was ready\n"
                            + self.tail(), pytrace=False)
            if time.monotonic() >= deadline:
                pytest.fail(f"worker not ready after {timeout}s\n" + self.tail(), pytrace=False)
            time.sleep(0.02)

    # -- the process --------------------------------------------------------------------

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Warm shutdown (SIGTERM); SIGKILL after ``timeout``. Returns the exit code."""
        self.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            self.kill()
            code = self.popen.returncode
        self._close()
        return code

    def kill(self) -> int:
        """SIGKILL the main process (its pool children die with it) and reap it."""
        self.send_signal(signal.SIGKILL)
        code = self.popen.wait(10)
        self._close()
        return code

    def _close(self) -> None:
        try:
            self._log_fh.close()
        except OSError:
            pass


class Project:
    """A temporary project folder with the test app, a broker file and its workers."""

    def __init__(self, path: Path, broker_url: str | None = None,
                 backend_url: str | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copy(APPS / "proj.py", self.path / "proj.py")
        self.db_path = self.path / "broker.sqlite3"
        # absolute: sqlite:////tmp/...; other brokers (redis, amqp) come from the session's servers
        self.broker_url = broker_url or f"sqlite:///{self.db_path}"
        self.backend_url = backend_url or self.broker_url
        self.workers: list[WorkerProcess] = []
        self._apps: list[Any] = []
        self._count = 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _REDIRECTING_ENV}
        pythonpath = [str(self.path), str(ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env.update({
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "QCTL_BROKER_URL": self.broker_url,
            "QCTL_RESULT_BACKEND": self.backend_url,
            "PROJ_RECORD_DIR": str(self.path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "NO_COLOR": "1",
        })
        env.update(extra or {})
        return env

    def worker_command(self, args: Iterable[str], app_module: str) -> list[str]:
        args = list(args)
        if not any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") for a in args):
            args = ["-l", "INFO", *args]
        if CLI_WORKER.exists():
            return [sys.executable, "-m", "qctl", "-A", app_module, "worker", *args]
        runner = self.path / "_run_worker.py"
        if not runner.exists():
            runner.write_text(_FALLBACK_RUNNER)
        return [sys.executable, str(runner), app_module, *args]

    def start_worker(self, *args: str, app_module: str = "proj", env: dict[str, str] | None = None,
                     wait_ready: bool = True, ready_timeout: float = READY_TIMEOUT) -> WorkerProcess:
        """Start a worker (``-l INFO`` unless given) and wait for its ``ready.`` line."""
        self._count += 1
        worker = WorkerProcess(self, self.worker_command(args, app_module), self.env(env),
                               self.path / f"worker-{self._count}.log")
        self.workers.append(worker)
        if wait_ready:
            worker.wait_ready(ready_timeout)
        return worker

    def client(self, **settings: Any) -> Any:
        """An App in this process on the project's broker and result store."""
        from qctl import App
        for name in _REDIRECTING_ENV:
            if os.environ.get(name):
                raise RuntimeError(f"{name} is set in the test process; it would redirect the client")
        settings.setdefault("task_routes", PROJ_ROUTES)
        app = App("proj", broker=self.broker_url, backend=self.backend_url,
                  set_as_current=False, **settings)
        self._apps.append(app)
        return app

    def runs(self, kind: str | None = None, task_id: str | None = None) -> list[dict]:
        return read_runs(self.path, kind, task_id)

    def open_gate(self, name: str) -> None:
        open_gate(self.path, name)

    def close(self) -> None:
        """Stop every worker still running: all get SIGTERM at once, then each is waited
        for (SIGKILL after the deadline)."""
        running = [w for w in self.workers if w.alive()]
        for worker in running:
            worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            if worker.wait_exit(max(deadline - time.monotonic(), 0.1)) is None:
                worker.kill()
            worker._close()
        for app in self._apps:
            try:
                app.close()
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture(scope="session")
def _clean_qctl_env():
    """The test process must not inherit a broker/app override from the shell."""
    mp = pytest.MonkeyPatch()
    for name in _REDIRECTING_ENV:
        mp.delenv(name, raising=False)
    yield
    mp.undo()


BROKERS = ["sqlite", "redis", "amqp"]


_VHOSTS: set[str] = set()


def _rabbit_vhost(rabbit: Any, name: str) -> str:
    """The URL of vhost ``name`` on the session's node (created once, guest allowed)."""
    if name not in _VHOSTS:
        ctl = str(Path(rabbit.binary).with_name("rabbitmqctl"))
        for args in (["add_vhost", name], ["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]):
            subprocess.run([ctl, "-n", rabbit.node, *args], env=rabbit.env, check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        _VHOSTS.add(name)
    return rabbit.url.rstrip("/") + "/" + name


def _project_on(request: Any, kind: str, path: Path, shared: bool = False) -> "Project":
    """A project on broker ``kind``; tests marked ``sqlite_only`` (they read the SQLite file
    itself) run on SQLite alone. A module-wide (``shared``) project gets its own Redis
    databases and RabbitMQ vhost, so its workers never see a single test's tasks."""
    if kind != "sqlite" and request.node.get_closest_marker("sqlite_only"):
        pytest.skip("inspects the SQLite broker file itself")
    if kind == "sqlite":
        return Project(path)
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        first = 10 if shared else 8
        broker, backend = with_db(server, first), with_db(server, first + 1)
        flushdb(broker)
        flushdb(backend)
        return Project(path, broker, backend)
    rabbit = request.getfixturevalue("rabbit")
    url = _rabbit_vhost(rabbit, "module") if shared else rabbit.url
    _purge_rabbit(url)
    return Project(path, url, "rpc://")


@pytest.fixture(params=BROKERS)
def tmp_project(request, tmp_path, _clean_qctl_env):
    """A project on each broker in turn: every worker test runs on sqlite, redis and amqp."""
    project = _project_on(request, request.param, tmp_path / "proj")
    yield project
    project.close()


@pytest.fixture(scope="module", params=BROKERS)
def module_project(request, tmp_path_factory, _clean_qctl_env):
    """One project (and its workers) shared by the tests of a module, per broker."""
    project = _project_on(request, request.param, tmp_path_factory.mktemp("proj"), shared=True)
    yield project
    project.close()


@pytest.fixture
def start_worker(tmp_project):
    """``start_worker(*args, app_module='proj', env=None)`` -> a ready ``WorkerProcess``."""
    return tmp_project.start_worker


@pytest.fixture
def client_app(tmp_project):
    return tmp_project.client()


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def broker_project(request, tmp_path, _clean_qctl_env):
    """A project on each broker in turn (servers: once per session, see ``_server_url``)."""
    kind = request.param
    if kind == "sqlite":
        project = Project(tmp_path / "proj")
    else:
        broker, backend = request.getfixturevalue(f"{kind}_urls")
        project = Project(tmp_path / "proj", broker, backend)
    yield project
    project.close()


@pytest.fixture
def redis_urls(redis_server):
    """(broker, result backend) on two freshly emptied databases of the session's server."""
    broker, backend = with_db(redis_server, 14), with_db(redis_server, 15)
    flushdb(broker)
    flushdb(backend)
    return broker, backend


def pytest_collection_finish(session):
    """RabbitMQ takes seconds to boot: start it as soon as a selected test may need it."""
    if any("amqp" in item.nodeid or "rpc" in item.nodeid or "interop" in item.nodeid
           for item in session.items):
        import tempfile
        launch_session_rabbit(tempfile.mkdtemp(prefix="qctl-rabbit-"))


def _purge_rabbit(url: str) -> None:
    """What earlier tests left in the default queues must not reach this one's workers."""
    from qctl.transports.amqp import AmqpTransport
    transport = AmqpTransport(url)
    try:
        for queue in ("celery", "other", "third"):
            try:
                transport.purge(queue)
            except Exception:  # noqa: BLE001 - not declared yet
                pass
        transport.purge_dead()
    finally:
        transport.close()


@pytest.fixture
def amqp_urls(rabbit):
    """(broker, result backend): the session's RabbitMQ node, results over rpc://."""
    _purge_rabbit(rabbit.url)
    return rabbit.url, "rpc://"


@pytest.fixture(autouse=True)
def _sqlite_only(request):
    """Skip a ``sqlite_only`` test's redis/amqp instances (also for module-wide projects)."""
    if request.node.get_closest_marker("sqlite_only"):
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        kind = params.get("tmp_project", params.get("module_project", "sqlite"))
        if kind != "sqlite":
            pytest.skip("inspects the SQLite broker file itself")
