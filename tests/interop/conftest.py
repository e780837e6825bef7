"""Fixtures for the qctl <-> Celery 5.7 interoperability tests.

- ``celery_python`` (session): the python of a separate virtualenv holding ``celery==5.7.0``
  and ``redis`` (py-amqp comes with kombu). It is created once and cached between runs in
  ``$XDG_CACHE_HOME/qctl-tests/celery-5.7-venv`` (``~/.cache/...`` without XDG_CACHE_HOME),
  checked at every session start and rebuilt when broken. Celery is never installed into
  the environment that runs the tests: it is a test-only peer. When the venv cannot be made
  the tests are skipped, or fail when ``CI`` is ``true``.
- ``InteropProject``: ``tests.conftest.Project`` (qctl workers of ``tests/apps/proj.py``, the
  qctl client, ``runs()``) plus the Celery side: ``capp.py`` copied beside ``proj.py``,
  ``start_celery_worker()`` (``celery -A capp worker -l INFO -P solo|prefork -c N -n
  celery1@%h``; waits for ``ready.`` with a deadline; stopped TERM -> KILL by PID with the
  qctl workers at teardown) and ``celery_client(code)`` (runs a snippet with the venv's
  python, ``capp``/``app``/``emit``/``outcome`` already imported, and returns what it
  ``emit()``-ed).
- ``redis_project``: both sides on a fresh database of the session's ``redis-server``
  (broker and result backend). ``amqp_project(backend)``: both sides on the session's
  RabbitMQ node, with every queue/exchange of earlier tests deleted first.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import Project, WorkerProcess  # noqa: E402
from tests.servers_redis import redis_server, redis_url  # noqa: E402,F401 (fixtures)

try:  # the RabbitMQ helper may be missing or broken while it is being written
    from tests.servers_rabbit import rabbit  # noqa: F401 (fixture)
    _RABBIT_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001
    _RABBIT_IMPORT_ERROR = f"tests/servers_rabbit.py unusable: {type(exc).__name__}: {exc}"

    @pytest.fixture(scope="session")
    def rabbit():  # type: ignore[no-redef]
        _missing(_RABBIT_IMPORT_ERROR or "no RabbitMQ helper")

CELERY_VERSION = "5.7.0"
#: ``[redis]``: kombu's Redis transport also needs ``packaging``, which only that extra brings.
REQUIREMENTS = (f"celery[redis]=={CELERY_VERSION}", "redis")
VENV_NAME = "celery-5.7-venv"
MARKER = ".qctl-interop-ok"
VENV_TIMEOUT = 900.0
CELERY_READY_TIMEOUT = 60.0
CLIENT_TIMEOUT = 90.0
_CHECK = ("import json, celery, kombu, amqp, redis, billiard; "
          "import kombu.transport.redis, kombu.transport.pyamqp, celery.backends.redis; "
          "assert celery.__version__ == %r, celery.__version__; "
          "print(json.dumps({'celery': celery.__version__, 'kombu': kombu.__version__, "
          "'amqp': amqp.__version__, 'redis': redis.__version__, "
          "'billiard': billiard.__version__}))" % CELERY_VERSION)

#: Variables that would point a Celery process at another broker, app or site-packages.
_CELERY_ENV_DROP_PREFIX = ("QCTL_", "CELERY_", "CAPP_")
_CELERY_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")

VENV_REPORT: dict[str, Any] = {}

#: Worker log lines that mean trouble between the two sides (either kind of worker).
LOG_PROBLEM = re.compile(r"PRECONDITION_FAILED|inequivalent arg|NOT_FOUND|CRITICAL|"
                         r"Unrecoverable error|ERROR/|WARNING/")
#: ... except the failures the tests cause on purpose.
EXPECTED_LOG_LINES = ("raised unexpected: ValueError('kaboom')",)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# -- the Celery virtualenv ---------------------------------------------------------------------

def venv_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qctl-tests" / VENV_NAME


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _marker_text() -> str:
    return json.dumps({"requirements": list(REQUIREMENTS), "base": sys.version.split()[0]})


def _venv_ok(path: Path) -> dict | None:
    """The versions inside the venv when it is complete and works, else None."""
    python = _venv_python(path)
    try:
        if (path / MARKER).read_text() != _marker_text():
            return None
        if not os.access(path / "bin" / "celery", os.X_OK):
            return None
        proc = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True,
                              timeout=120, env=_pip_env(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _CELERY_ENV_DROP and not k.startswith(_CELERY_ENV_DROP_PREFIX)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run_step(args: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=_pip_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(args[:4])} ... timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{tail}")


def ensure_celery_venv() -> Path:
    """The venv's python; builds the venv (under a file lock) when it is missing or broken.
    Fills ``VENV_REPORT`` with what happened and how long it took."""
    path = venv_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path.parent / f"{VENV_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # another session may be building it right now
        versions = _venv_ok(path)
        if versions is not None:
            VENV_REPORT.update(path=str(path), created=False, versions=versions,
                               seconds=time.monotonic() - started)
            return _venv_python(path)
        VENV_REPORT["rebuilt"] = path.exists()
        shutil.rmtree(path, ignore_errors=True)
        _run_step([sys.executable, "-m", "venv", str(path)], 300)
        _run_step([str(_venv_python(path)), "-m", "pip", "install", "--quiet", "--no-input",
                   "--disable-pip-version-check", *REQUIREMENTS], VENV_TIMEOUT)
        (path / MARKER).write_text(_marker_text())
        versions = _venv_ok(path)
        if versions is None:
            (path / MARKER).unlink(missing_ok=True)
            raise RuntimeError(f"the new venv {path} does not import celery {CELERY_VERSION}")
        VENV_REPORT.update(path=str(path), created=True, versions=versions,
                           seconds=time.monotonic() - started)
        return _venv_python(path)


_VENV_ERROR: list[str] = []
_VENV_PYTHON: list[Path] = []


def _prepare_venv() -> Path | None:
    """Build or check the venv once per session; remembers the python or the error."""
    if _VENV_PYTHON:
        return _VENV_PYTHON[0]
    if _VENV_ERROR:
        return None
    try:
        _VENV_PYTHON.append(ensure_celery_venv())
        return _VENV_PYTHON[0]
    except Exception as exc:  # noqa: BLE001
        _VENV_ERROR.append(f"cannot create the Celery {CELERY_VERSION} virtualenv in "
                           f"{venv_dir()}: {exc}")
        return None


def pytest_collection_finish(session) -> None:
    """Build the venv before the first test when interop tests were selected, so that a
    slow first download does not count against a test's timeout."""
    if session.config.option.collectonly:
        return
    if any(HERE in Path(str(item.path)).resolve().parents for item in session.items):
        _prepare_venv()


@pytest.fixture(scope="session")
def celery_python() -> Path:
    """The python of the cached Celery 5.7 virtualenv (skip, or fail in CI, without it)."""
    python = _prepare_venv()
    if python is None:
        _missing(_VENV_ERROR[0])
    return python


def pytest_terminal_summary(terminalreporter) -> None:
    if VENV_REPORT:
        what = ("rebuilt (it was broken)" if VENV_REPORT.get("rebuilt") else "created") \
            if VENV_REPORT.get("created") else "reused (checked)"
        terminalreporter.write_line(
            f"celery venv {VENV_REPORT.get('path')}: {what} in {VENV_REPORT['seconds']:.1f}s; "
            f"versions {VENV_REPORT.get('versions')}")


# -- projects with both kinds of workers and clients -------------------------------------------

class InteropProject(Project):
    """``Project`` (qctl side, ``tests/apps/proj.py``) plus the Celery side (``capp.py``)."""

    def __init__(self, path: Path, broker_url: str, backend_url: str, celery_python: Path,
                 celery_backend_url: str | None = None) -> None:
        super().__init__(path, broker_url, backend_url)
        shutil.copy(HERE / "capp.py", self.path / "capp.py")
        self.celery_python = Path(celery_python)
        self.celery_backend_url = celery_backend_url or backend_url
        self.celery_workers: list[WorkerProcess] = []

    def celery_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in _CELERY_ENV_DROP and not k.startswith(_CELERY_ENV_DROP_PREFIX)}
        env.update({
            "PYTHONPATH": str(self.path),
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "NO_COLOR": "1",
            "CAPP_BROKER_URL": self.broker_url,
            "CAPP_RESULT_BACKEND": self.celery_backend_url,
            "PROJ_RECORD_DIR": str(self.path),
        })
        env.update(extra or {})
        return env

    def start_celery_worker(self, *args: str, pool: str = "solo", concurrency: int = 1,
                            name: str = "celery1@%h", env: dict[str, str] | None = None,
                            wait_ready: bool = True,
                            ready_timeout: float = CELERY_READY_TIMEOUT) -> WorkerProcess:
        """``celery -A capp worker -l INFO -P pool -c N -n name *args``, ready (log line
        ``<name> ready.``) within ``ready_timeout`` s."""
        self._count += 1
        command = [str(self.celery_python.parent / "celery"), "-A", "capp", "worker",
                   "-l", "INFO", "-P", pool, "-c", str(concurrency), "-n", name, *args]
        worker = WorkerProcess(self, command, self.celery_env(env),
                               self.path / f"celery-worker-{self._count}.log")
        self.workers.append(worker)
        self.celery_workers.append(worker)
        if wait_ready:
            worker.wait_ready(ready_timeout)
        return worker

    def celery_client(self, code: str, timeout: float = CLIENT_TIMEOUT,
                      env: dict[str, str] | None = None) -> Any:
        """Run ``code`` with the Celery venv's python (``app``, ``capp``, ``emit``, ``outcome``
        imported) and return the value it ``emit()``-ed last (None if it emitted nothing)."""
        prelude = "import json, time\nimport capp\nfrom capp import app, emit, outcome, outcomes\n"
        args = [str(self.celery_python), "-c", prelude + textwrap.dedent(code)]
        try:
            proc = subprocess.run(args, cwd=str(self.path), env=self.celery_env(env),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            pytest.fail(f"Celery client timed out after {timeout}s\n--- code ---\n{code}\n"
                        f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
                        + self._worker_tails(), pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"Celery client exited {proc.returncode}\n--- code ---\n{code}\n"
                        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                        f"{proc.stderr[-5000:]}" + self._worker_tails(), pytrace=False)
        values = [line[len("@@capp-json@@"):] for line in proc.stdout.splitlines()
                  if line.startswith("@@capp-json@@")]
        return json.loads(values[-1]) if values else None

    def log_problems(self, expected: tuple[str, ...] = EXPECTED_LOG_LINES) -> list[str]:
        """Error/warning lines in any worker log (lines holding an ``expected`` text aside):
        what one side's messages or declarations did to the other side."""
        found = []
        for worker in self.workers:
            for line in worker.log().splitlines():
                if LOG_PROBLEM.search(line) and not any(text in line for text in expected):
                    found.append(f"{worker.log_path.name}: {line}")
        return found

    def _worker_tails(self) -> str:
        return "".join("\n" + w.tail(30) for w in self.workers)

    def close(self) -> None:
        super().close()
        # A Celery prefork child whose parent was SIGKILLed: end it too. The process group is
        # the one each worker got at start (start_new_session), so only our processes.
        for worker in self.celery_workers:
            try:
                os.killpg(worker.pid, 0)
            except (ProcessLookupError, PermissionError):
                continue
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def redis_project(celery_python, redis_url, tmp_path, _clean_qctl_env) -> Iterator[InteropProject]:
    """Both sides on a freshly emptied Redis database (broker and result backend)."""
    project = InteropProject(tmp_path / "proj", redis_url, redis_url, celery_python)
    yield project
    project.close()


# -- RabbitMQ ----------------------------------------------------------------------------------

#: Everything the tests' apps may declare on RabbitMQ: deleted before each test so that one
#: side's declarations never leak into the next test.
AMQP_QUEUES = ("celery", "other", "third")
AMQP_EXCHANGES = ("celery", "other", "third", "celery.pidbox", "reply.celery.pidbox", "celeryev")


def reset_amqp(url: str) -> None:
    """Delete the test apps' queues and exchanges (and so their messages) on the node."""
    import pika
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    params = pika.ConnectionParameters(
        host=parts.hostname or "127.0.0.1", port=parts.port or 5672, virtual_host="/",
        credentials=pika.PlainCredentials(parts.username or "guest", parts.password or "guest"),
        connection_attempts=3, retry_delay=0.5, socket_timeout=5)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for queue in AMQP_QUEUES:
            channel.queue_delete(queue)
        for exchange in AMQP_EXCHANGES:
            channel.exchange_delete(exchange)
    finally:
        connection.close()


def amqp_queue_declared(url: str, queue: str) -> bool:
    """True when ``queue`` exists on the node (passive declare)."""
    import pika
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    params = pika.ConnectionParameters(
        host=parts.hostname or "127.0.0.1", port=parts.port or 5672, virtual_host="/",
        credentials=pika.PlainCredentials(parts.username or "guest", parts.password or "guest"),
        connection_attempts=3, retry_delay=0.5, socket_timeout=5)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(queue, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker:
            return False
    finally:
        if connection.is_open:
            connection.close()


@pytest.fixture
def amqp_project(celery_python, rabbit, redis_server, tmp_path, _clean_qctl_env):
    """``amqp_project(backend)`` -> an ``InteropProject`` on the session's RabbitMQ node, with
    results on ``rpc://`` (``backend='rpc'``) or on a fresh Redis database (``'redis'``)."""
    from tests.servers_redis import flushdb, with_db
    made: list[InteropProject] = []
    counter = [0]

    def make(backend: str = "rpc") -> InteropProject:
        reset_amqp(rabbit.url)
        counter[0] += 1
        if backend == "rpc":
            backend_url = "rpc://"
        elif backend == "redis":
            backend_url = with_db(redis_server, 15)
            flushdb(backend_url)
        else:
            raise ValueError(backend)
        project = InteropProject(tmp_path / f"proj{counter[0]}", rabbit.url, backend_url,
                                 celery_python)
        made.append(project)
        return project

    yield make
    for project in made:
        project.close()


# -- command-line helpers: the real ``celery`` CLI of the venv and qctl's own ----------------

CLI_TIMEOUT = 60.0


def _completed(args: list[str], cwd: Path, env: dict[str, str],
               timeout: float) -> subprocess.CompletedProcess:
    """Run ``args``; a hang fails the test with what it printed so far."""
    try:
        return subprocess.run(args, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"{' '.join(args)} timed out after {timeout}s\n--- stdout ---\n"
                    f"{out[-3000:]}\n--- stderr ---\n{err[-3000:]}", pytrace=False)


def celery_cli(project: InteropProject, *args: str, timeout: float = CLI_TIMEOUT,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``<venv>/bin/celery -A capp *args`` (e.g. ``inspect ping -t 5 --json``) in the
    project, with the project's Celery environment (same broker as the qctl side)."""
    command = [str(project.celery_python.parent / "celery"), "-A", "capp", *args]
    return _completed(command, project.path, project.celery_env(env), timeout)


def qctl_cli(project: Project, *args: str, timeout: float = CLI_TIMEOUT,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m qctl -A proj *args`` (e.g. ``status -t 5``) in the project, with the
    project's qctl environment."""
    command = [sys.executable, "-m", "qctl", "-A", "proj", *args]
    return _completed(command, project.path, project.env({"COLUMNS": "200", **(env or {})}),
                      timeout)


def cli_text(proc: subprocess.CompletedProcess) -> str:
    """What a command printed, for assertion messages."""
    return (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}")


# -- Flower: a second cached venv (Celery 5.7 + Flower) ----------------------------------------
#
# Flower lives in its own venv, not in ``celery-5.7-venv``: adding it there would make every
# other interop session rebuild (rmtree) the venv its running Celery workers come from.
# This one is built only when a Flower test runs, cached like the first one and rebuilt when
# its requirement list (kept in its marker file) changes or it no longer imports.

FLOWER_VERSION = "2.2.0"
FLOWER_REQUIREMENTS = (*REQUIREMENTS, f"flower=={FLOWER_VERSION}")
FLOWER_VENV_NAME = "celery-5.7-flower-venv"
_FLOWER_CHECK = ("import json, celery, flower, tornado, kombu.transport.redis, "
                 "kombu.transport.pyamqp; "
                 "assert celery.__version__ == %r, celery.__version__; "
                 "print(json.dumps({'celery': celery.__version__, 'flower': flower.__version__, "
                 "'tornado': tornado.version}))" % CELERY_VERSION)

FLOWER_REPORT: dict[str, Any] = {}
_FLOWER_STATE: dict[str, Any] = {}


def flower_venv_dir() -> Path:
    return venv_dir().parent / FLOWER_VENV_NAME


def _flower_marker_text() -> str:
    return json.dumps({"requirements": list(FLOWER_REQUIREMENTS),
                       "base": sys.version.split()[0]})


def _flower_venv_ok(path: Path) -> dict | None:
    try:
        if (path / MARKER).read_text() != _flower_marker_text():
            return None
        if not os.access(path / "bin" / "celery", os.X_OK):
            return None
        proc = subprocess.run([str(_venv_python(path)), "-c", _FLOWER_CHECK],
                              capture_output=True, text=True, timeout=120, env=_pip_env(),
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def ensure_flower_venv() -> Path:
    """The python of the Flower venv; built (under its own file lock) when missing, broken
    or made for another requirement list."""
    path = flower_venv_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path.parent / f"{FLOWER_VENV_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        versions = _flower_venv_ok(path)
        if versions is None:
            FLOWER_REPORT["rebuilt"] = path.exists()
            shutil.rmtree(path, ignore_errors=True)
            _run_step([sys.executable, "-m", "venv", str(path)], 300)
            _run_step([str(_venv_python(path)), "-m", "pip", "install", "--quiet", "--no-input",
                       "--disable-pip-version-check", *FLOWER_REQUIREMENTS], VENV_TIMEOUT)
            (path / MARKER).write_text(_flower_marker_text())
            versions = _flower_venv_ok(path)
            if versions is None:
                (path / MARKER).unlink(missing_ok=True)
                raise RuntimeError(f"the new venv {path} does not import flower "
                                   f"{FLOWER_VERSION} with celery {CELERY_VERSION}")
            FLOWER_REPORT["created"] = True
        FLOWER_REPORT.update(path=str(path), versions=versions,
                             seconds=time.monotonic() - started)
        return _venv_python(path)


@pytest.fixture(scope="session")
def flower_python() -> Path:
    """The python of the cached Celery 5.7 + Flower venv (skip, or fail in CI, without it).
    Built at first use: give the test that first asks for it a timeout that allows for it."""
    if "python" not in _FLOWER_STATE and "error" not in _FLOWER_STATE:
        try:
            _FLOWER_STATE["python"] = ensure_flower_venv()
        except Exception as exc:  # noqa: BLE001
            _FLOWER_STATE["error"] = (f"cannot create the Flower {FLOWER_VERSION} virtualenv in "
                                      f"{flower_venv_dir()}: {exc}")
    if "error" in _FLOWER_STATE:
        _missing(_FLOWER_STATE["error"])
    return _FLOWER_STATE["python"]


class FlowerProcess:
    """``celery -A capp flower --port P --address 127.0.0.1`` of the Flower venv, on the
    project's broker; stopped (TERM -> KILL, by PID) by ``close()``."""

    def __init__(self, project: InteropProject, flower_python: Path,
                 *args: str) -> None:
        from tests.servers_redis import free_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = project.path / f"flower-{self.port}.log"
        self._log = open(self.log_path, "ab")
        command = [str(Path(flower_python).parent / "celery"), "-A", "capp", "flower",
                   f"--port={self.port}", "--address=127.0.0.1", *args]
        env = project.celery_env({"FLOWER_UNAUTHENTICATED_API": "true"})
        self.popen = subprocess.Popen(command, cwd=str(project.path), env=env,
                                      stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return (f"--- tail of {self.log_path} (pid {self.pid}, returncode "
                f"{self.popen.poll()}) ---\n" + "\n".join(text.splitlines()[-lines:]))

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or text) of ``GET path``."""
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        text = data.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_listening(self, timeout: float = 60.0) -> None:
        import socket
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                pytest.fail(f"flower exited with {self.popen.returncode}\n" + self.tail(),
                            pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                pytest.fail(f"flower not listening on {self.port} after {timeout}s\n"
                            + self.tail(), pytrace=False)
            time.sleep(0.1)

    def close(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        try:
            os.killpg(self.pid, signal.SIGKILL)   # anything it started (its own group only)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


@pytest.fixture
def start_flower(flower_python) -> Iterator[Any]:
    """``start_flower(project, *args)`` -> a listening ``FlowerProcess``; stopped at teardown."""
    started: list[FlowerProcess] = []

    def start(project: InteropProject, *args: str, timeout: float = 60.0) -> FlowerProcess:
        flower = FlowerProcess(project, flower_python, *args)
        started.append(flower)
        flower.wait_listening(timeout)
        return flower

    yield start
    for flower in started:
        flower.close()
