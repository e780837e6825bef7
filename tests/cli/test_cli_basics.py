"""The qctl command line: global options, -A lookup, errors and exit codes, call/result/purge/
dead/report/worker — through click's CliRunner for parsing and rendering, and through real
``python -m qctl`` processes for what must hold end to end (imports, exit codes, stderr).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from qctl import App, protocol
from qctl.cli import exitcodes, main
from qctl.cli.output import Output
from qctl.cli.params import parse_rate

pytestmark = pytest.mark.timeout(60)

MAIN = Path(__file__).resolve().parents[2]
ENV_KEYS = ("QCTL_BROKER_URL", "QCTL_RESULT_BACKEND", "QCTL_APP", "QCTL_DEBUG", "NO_COLOR",
            "QCTL_WORKER_POOL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def runner():
    # Keys listed here are restored after each invoke: `-b` exports QCTL_BROKER_URL.
    # catch_exceptions=False: a bug in a command fails the test with its traceback.
    return CliRunner(env={key: None for key in ENV_KEYS}, catch_exceptions=False)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/broker.db"


def run(tmp_path, *args, env=None, input=None, cwd=None):
    """``python -m qctl ARGS`` in ``tmp_path`` with a clean QCTL_* environment."""
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    environ["PYTHONPATH"] = os.pathsep.join([str(MAIN), str(tmp_path)])
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "qctl", *args], cwd=cwd or tmp_path,
                          env=environ, capture_output=True, text=True, timeout=30,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def assert_one_line_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def write(tmp_path, name, source):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def store(url, task_id, status, result, traceback=None):
    App(broker=url, set_as_current=False).backend.store_result(task_id, {
        "status": status, "result": result, "traceback": traceback, "children": [],
        "date_done": "2030-01-01T00:00:00+00:00", "task_id": task_id})


def queue_size(url, queue="celery"):
    return App(broker=url, set_as_current=False).transport.queue_size(queue)


# -- global options -------------------------------------------------------------------------


def test_version(runner, tmp_path):
    from qctl import __version__
    assert runner.invoke(main, ["--version"]).output == f"qctl {__version__}\n"
    proc = run(tmp_path, "--version")
    assert proc.returncode == 0 and proc.stdout == f"qctl {__version__}\n"


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("call", "dead", "purge", "report", "result", "worker", "-A, --app", "--broker",
                 "--result-backend", "--config", "--workdir", "--no-color", "--quiet"):
        assert name in result.output
    for command in ("call", "dead", "purge", "report", "result", "worker"):
        assert runner.invoke(main, [command, "--help"]).exit_code == 0


def test_help_imports_neither_worker_nor_rich(tmp_path):
    code = ("import sys; from qctl.cli import main; main(['--help'], standalone_mode=False); "
            "main(['worker', '--help'], standalone_mode=False); "
            "print('qctl_worker' in sys.modules, 'rich' in sys.modules)")
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    environ["PYTHONPATH"] = str(MAIN)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_import_qctl_does_not_import_click_or_rich(tmp_path):
    code = "import sys, qctl; print('click' in sys.modules, 'rich' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=30, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(MAIN)})
    assert proc.stdout.strip() == "False False", proc.stderr


# -- -A resolution --------------------------------------------------------------------------


@pytest.fixture
def apps(tmp_path):
    write(tmp_path, "proj.py", """
        from qctl import App
        app = App('proj-main')
        other = 1
    """)
    write(tmp_path, "single.py", """
        from qctl import App
        my_app = App('single-main')
    """)
    write(tmp_path, "pkg/__init__.py", "")
    write(tmp_path, "pkg/qctl.py", """
        from qctl import App
        app = App('pkg-main')
    """)
    write(tmp_path, "cpkg/__init__.py", "")
    write(tmp_path, "cpkg/celery.py", """
        from qctl import Celery
        app = Celery('cpkg-main')
    """)
    write(tmp_path, "two.py", """
        from qctl import App
        a = App('a-main')
        b = App('b-main')
    """)
    write(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    write(tmp_path, "emptypkg/__init__.py", "")
    return tmp_path


@pytest.mark.parametrize("spec, main_name", [
    ("proj", "proj-main"),             # module -> its `app`
    ("single", "single-main"),         # module -> its only App, whatever its name
    ("pkg", "pkg-main"),               # package -> pkg.qctl's app
    ("cpkg", "cpkg-main"),             # package -> cpkg.celery's app (migrating from Celery)
    ("two:b", "b-main"),               # module:attr
    ("proj:app", "proj-main"),
    ("proj.app", "proj-main"),         # dotted attribute, as Celery accepts
])
def test_app_resolution(apps, spec, main_name):
    proc = run(apps, "-A", spec, "report")
    assert proc.returncode == 0, proc.stderr
    assert f"app      -> {main_name} (-A {spec})" in proc.stdout


def test_app_from_env_and_workdir(apps):
    proc = run(apps, "report", env={"QCTL_APP": "single"})
    assert "single-main" in proc.stdout, proc.stderr
    # --workdir: chdir first, so ./proj.py is found from elsewhere
    proc = run(apps, "--workdir", str(apps), "-A", "proj", "report", cwd=apps.parent)
    assert proc.returncode == 0 and "proj-main" in proc.stdout, proc.stderr


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "Error: cannot load app 'nosuch': No module named 'nosuch'"),
    ("proj:missing", "Error: cannot load app 'proj:missing': module 'proj' has no attribute 'missing'"),
    ("proj:other", "Error: cannot load app 'proj:other': 'proj:other' is not a qctl App (got int)"),
    ("two", "Error: cannot load app 'two': module 'two' has several qctl apps (a, b); "
            "choose one with -A two:NAME"),
    ("broken", "Error: cannot load app 'broken': RuntimeError: boom at import"),
    ("emptypkg", "Error: cannot load app 'emptypkg': no qctl App in module 'emptypkg' (looked "
                 "for 'app', a single App instance, and the submodules emptypkg.qctl and "
                 "emptypkg.celery)"),
])
def test_bad_app_is_one_line_and_exit_64(apps, spec, message):
    proc = run(apps, "-A", spec, "report")
    assert assert_one_line_error(proc, exitcodes.USAGE) == message


def test_bad_config_module(apps):
    proc = run(apps, "--config", "nosuchsettings", "report")
    line = assert_one_line_error(proc, exitcodes.USAGE)
    assert "nosuchsettings" in line


def test_config_module_is_applied(tmp_path, url):
    write(tmp_path, "settings.py", "task_default_queue = 'other'\n")
    proc = run(tmp_path, "-b", url, "--config", "settings", "call", "proj.add")
    assert proc.returncode == 0, proc.stderr
    assert queue_size(url, "other") == 1


# -- broker errors --------------------------------------------------------------------------


def test_unusable_broker_is_one_line(tmp_path):
    proc = run(tmp_path, "-b", "sqlite:////nonexistent-dir/x.db", "purge", "-f")
    assert "/nonexistent-dir" in assert_one_line_error(proc, exitcodes.UNAVAILABLE)
    proc = run(tmp_path, "-b", "nosuch://x", "purge", "-f")
    assert "nosuch" in assert_one_line_error(proc, exitcodes.CONFIG)
    proc = run(tmp_path, "-b", "nosuch://user:hunter2@x", "call", "proj.add")
    assert "hunter2" not in assert_one_line_error(proc, exitcodes.CONFIG)


def test_unexpected_error_is_one_line_unless_debug(runner, url, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("kaput")
    monkeypatch.setattr(App, "send_task", explode)
    result = runner.invoke(main, ["-b", url, "call", "proj.add"])
    assert result.exit_code == exitcodes.SOFTWARE
    assert result.stderr.strip() == ("Error: unexpected RuntimeError: kaput "
                                     "(run with QCTL_DEBUG=1 to see the traceback)")
    with pytest.raises(RuntimeError, match="kaput"):
        runner.invoke(main, ["-b", url, "call", "proj.add"], env={"QCTL_DEBUG": "1"})


# -- call -----------------------------------------------------------------------------------


def test_call_enqueues_on_sqlite_and_prints_id(tmp_path, url):
    proc = run(tmp_path, "-b", url, "call", "proj.add", "--args", "[2, 2]",
               "--kwargs", '{"z": 1}', "--priority", "5")
    assert proc.returncode == 0, proc.stderr
    uuid.UUID(proc.stdout.strip())
    assert queue_size(url) == 1
    [delivery] = App(broker=url, set_as_current=False).transport.fetch(["celery"], 1, 1.0)
    assert delivery.envelope.headers["task"] == "proj.add"
    assert delivery.envelope.headers["id"] == proc.stdout.strip()


def test_call_default_broker_is_qctl_sqlite3_in_cwd(tmp_path):
    proc = run(tmp_path, "call", "proj.add", "--queue", "q1")
    assert proc.returncode == 0, proc.stderr
    assert queue_size(f"sqlite:///{tmp_path}/qctl.sqlite3", "q1") == 1


def test_broker_flag_beats_env(tmp_path):
    flag, env = f"sqlite:///{tmp_path}/flag.db", f"sqlite:///{tmp_path}/env.db"
    proc = run(tmp_path, "-b", flag, "call", "proj.add", env={"QCTL_BROKER_URL": env})
    assert proc.returncode == 0, proc.stderr
    assert queue_size(flag) == 1 and queue_size(env) == 0


@pytest.mark.parametrize("args", [
    ["--args", "[2, 2"], ["--args", '{"a": 1}'], ["--kwargs", "[1]"],
    ["--eta", "tomorrow"], ["--countdown", "1", "--eta", "2030-01-01T00:00:00"],
])
def test_call_bad_arguments_are_usage_errors(runner, url, args):
    result = runner.invoke(main, ["-b", url, "call", "proj.add", *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Error:" in result.stderr
    assert queue_size(url) == 0


def test_call_bad_json_in_subprocess(tmp_path, url):
    proc = run(tmp_path, "-b", url, "call", "proj.add", "--args", "not json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not valid JSON" in proc.stderr


def _serve_one(url, status, result):
    """A stand-in worker: take one message and store ``status``/``result`` for it."""
    app = App(broker=url, set_as_current=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        deliveries = app.transport.fetch(["celery"], 1, 0.5)
        if deliveries:
            task_id = deliveries[0].envelope.headers["id"]
            store(url, task_id, status, result)
            app.transport.ack([deliveries[0].tag])
            return


@pytest.mark.parametrize("status, result, code, out", [
    ("SUCCESS", {"sum": 4}, 0, '{"sum": 4}'),
    ("FAILURE", {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
     1, "ValueError: boom"),
])
def test_call_wait_prints_result(tmp_path, url, status, result, code, out):
    server = threading.Thread(target=_serve_one, args=(url, status, result), daemon=True)
    server.start()
    proc = run(tmp_path, "-b", url, "call", "proj.add", "--args", "[2, 2]", "--wait",
               "--timeout", "20")
    server.join(5)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.strip() == out
    uuid.UUID(proc.stderr.strip())  # the id goes to stderr with --wait


def test_call_wait_timeout_exits_75(runner, url):
    result = runner.invoke(main, ["-b", url, "call", "proj.add", "--wait", "--timeout", "0.2"])
    assert result.exit_code == exitcodes.TEMPFAIL
    assert "timed out after 0.2s waiting for task" in result.stderr


# -- result ---------------------------------------------------------------------------------


def test_result_unknown_is_pending(tmp_path, url):
    proc = run(tmp_path, "-b", url, "result", str(uuid.uuid4()))
    assert proc.returncode == 0 and proc.stdout == "PENDING\n", proc.stderr


def test_result_success_and_failure(tmp_path, url):
    store(url, "ok-id", "SUCCESS", [1, "two", {"three": 3}])
    store(url, "bad-id", "FAILURE",
          {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
          traceback="Traceback (most recent call last):\n  ...\nValueError: boom\n")
    store(url, "run-id", "STARTED", {"pid": 1})
    proc = run(tmp_path, "-b", url, "result", "ok-id")
    assert proc.returncode == 0 and proc.stdout == '[1, "two", {"three": 3}]\n'
    proc = run(tmp_path, "-b", url, "result", "bad-id")
    assert proc.returncode == 1 and proc.stdout == "ValueError: boom\n"
    assert "Traceback" not in proc.stderr
    proc = run(tmp_path, "-b", url, "result", "bad-id", "--traceback")
    assert proc.returncode == 1 and proc.stdout.startswith("Traceback (most recent call last)")
    proc = run(tmp_path, "-b", url, "result", "run-id")
    assert proc.returncode == 0 and proc.stdout == "STARTED\n"


def test_result_json_and_wait(runner, url):
    import json
    store(url, "ok-id", "SUCCESS", 4)
    result = runner.invoke(main, ["-b", url, "result", "ok-id", "--json"])
    data = json.loads(result.stdout)
    assert data["state"] == "SUCCESS" and data["result"] == 4 and data["id"] == "ok-id"
    result = runner.invoke(main, ["-b", url, "result", "ok-id", "--wait", "--timeout", "5"])
    assert result.exit_code == 0 and result.stdout == "4\n"
    result = runner.invoke(main, ["-b", url, "result", "nope", "--wait", "--timeout", "0.2"])
    assert result.exit_code == exitcodes.TEMPFAIL
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: timed out")


# -- purge ----------------------------------------------------------------------------------


def _publish(url, n, queue="celery"):
    app = App(broker=url, set_as_current=False)
    for i in range(n):
        app.transport.publish(queue, protocol.build_task_message("proj.add", [i, i]))


def test_purge_force(tmp_path, url):
    _publish(url, 3)
    proc = run(tmp_path, "-b", url, "purge", "-f")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Purged 3 messages from 1 known task queue.\n"
    assert queue_size(url) == 0
    proc = run(tmp_path, "-b", url, "purge", "-f")
    assert proc.stdout == "No messages purged from 1 queue.\n"


def test_purge_named_queues(runner, url):
    _publish(url, 2, "a")
    _publish(url, 1, "b")
    _publish(url, 1)
    result = runner.invoke(main, ["-b", url, "purge", "-Q", "a,b", "-f"])
    assert result.stdout == "Purged 3 messages from 2 known task queues.\n"
    assert queue_size(url) == 1


def test_purge_without_force_needs_a_terminal(tmp_path, url, runner, monkeypatch):
    _publish(url, 2)
    proc = run(tmp_path, "-b", url, "purge")
    assert "use -f/--force" in assert_one_line_error(proc, exitcodes.FAILURE)
    assert queue_size(url) == 2
    monkeypatch.setattr("qctl.cli.purge.stdin_is_tty", lambda: True)
    result = runner.invoke(main, ["-b", url, "purge"], input="n\n")
    assert result.exit_code == 1 and queue_size(url) == 2
    assert "Purge 2 messages from queue celery? [y/N]" in result.output
    result = runner.invoke(main, ["-b", url, "purge"], input="y\n")
    assert result.exit_code == 0 and queue_size(url) == 0


# -- dead letters ---------------------------------------------------------------------------


def test_dead_letters_round_trip(tmp_path, url, runner):
    import json
    app = App(broker=url, set_as_current=False)
    envelope = protocol.build_task_message("proj.add", [1, 2], task_id="t-1")
    app.transport.dead_letter(None, "unknown task proj.add", envelope, "celery")
    app.transport.dead_letter(None, "cannot decode", protocol.build_task_message("proj.mul"), "q2")

    proc = run(tmp_path, "-b", url, "dead", "list")
    assert proc.returncode == 0, proc.stderr
    assert "proj.add" in proc.stdout and "unknown task proj.add" in proc.stdout
    assert "t-1" in proc.stdout and "q2" in proc.stdout
    letters = json.loads(run(tmp_path, "-b", url, "dead", "list", "--json").stdout)
    assert [d["task"] for d in letters] == ["proj.add", "proj.mul"]
    assert letters[0]["queue"] == "celery" and letters[0]["reason"] == "unknown task proj.add"
    assert len(json.loads(runner.invoke(main, ["-b", url, "dead", "list", "--json",
                                               "--limit", "1"]).stdout)) == 1

    proc = run(tmp_path, "-b", url, "dead", "requeue", str(letters[0]["id"]))
    assert proc.returncode == 0 and proc.stdout == "Requeued 1 dead letter.\n", proc.stderr
    assert queue_size(url) == 1
    assert runner.invoke(main, ["-b", url, "dead", "requeue"]).exit_code == 2
    proc = run(tmp_path, "-b", url, "dead", "requeue", str(letters[0]["id"]))
    assert "not found" in assert_one_line_error(proc, exitcodes.FAILURE)

    proc = run(tmp_path, "-b", url, "dead", "purge")
    assert_one_line_error(proc, exitcodes.FAILURE)        # no terminal, no -f
    proc = run(tmp_path, "-b", url, "dead", "purge", "-f")
    assert proc.stdout == "Purged 1 dead letter.\n"
    assert run(tmp_path, "-b", url, "dead", "list").stdout == "No dead letters.\n"
    app.transport.dead_letter(None, "again", envelope, "celery")
    assert runner.invoke(main, ["-b", url, "dead", "requeue", "--all"]).stdout == \
        "Requeued 1 dead letter.\n"
    assert queue_size(url) == 2


# -- report ---------------------------------------------------------------------------------


def test_report_hides_password_and_does_not_connect(tmp_path):
    # Port 1 refuses connections: a report that connected would fail.
    proc = run(tmp_path, "-b", "redis://:secret@localhost:1/0", "report")
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stdout + proc.stderr
    assert "redis://:********@localhost:1/0" in proc.stdout
    assert "qctl:" in proc.stdout and "python:" in proc.stdout


# -- worker ---------------------------------------------------------------------------------


@pytest.fixture
def fake_worker(monkeypatch):
    calls = []

    class Worker:
        def __init__(self, app, **kwargs):
            calls.append((app, kwargs))

        def run(self):
            return 0

    from qctl_worker.worker import expand_hostname
    module = types.ModuleType("qctl_worker.worker")
    module.Worker = Worker
    module.expand_hostname = expand_hostname
    monkeypatch.setitem(sys.modules, "qctl_worker.worker", module)
    return calls


def test_worker_options_are_converted(runner, url, fake_worker):
    result = runner.invoke(main, [
        "--no-color", "-q", "-b", url, "worker", "-n", "w1@%h", "-c", "3", "-P", "THREADS",
        "-Q", "a, b", "-X", "c", "-l", "info", "-E", "-B", "--prefetch-multiplier", "2",
        "--max-tasks-per-child", "10", "--max-memory-per-child", "2048", "--time-limit", "30",
        "--soft-time-limit", "20", "--autoscale", "10,3", "--without-heartbeat",
        "--statedb", "w.db", "--shutdown-timeout", "5", "--pidfile", "w.pid", "--logfile", "w.log"])
    assert result.exit_code == 0, result.output
    [(app, kwargs)] = fake_worker
    assert app.conf.broker_url == url
    from qctl_worker.worker import expand_hostname
    assert kwargs == dict(
        hostname=expand_hostname("w1@%h"), concurrency=3, pool="threads", queues=["a", "b"],
        exclude_queues=["c"], loglevel="INFO", logfile="w.log", pidfile="w.pid", events=True,
        beat=True, prefetch_multiplier=2, max_tasks_per_child=10, max_memory_per_child=2048,
        time_limit=30.0, soft_time_limit=20.0, autoscale=(10, 3), without_heartbeat=True,
        statedb="w.db", shutdown_timeout=5.0, no_color=True, quiet=True, detached=False,
        on_ready=None, restart_command=None)


def test_worker_defaults(runner, url, fake_worker):
    result = runner.invoke(main, ["-b", url, "worker"], env={"QCTL_WORKER_POOL": "solo"})
    assert result.exit_code == 0, result.output
    kwargs = fake_worker[0][1]
    assert kwargs["pool"] == "solo" and kwargs["queues"] is None and kwargs["autoscale"] is None
    assert kwargs["loglevel"] == "WARNING" and kwargs["events"] is False


@pytest.mark.parametrize("args, code, message", [
    (["--umask", "9x"], exitcodes.USAGE, "Error: --umask '9x' is not an octal number such as 022"),
    (["--uid", "no-such-user-qctl"], exitcodes.USAGE, "Error: --uid: no such user 'no-such-user-qctl'"),
    (["--gid", "no-such-group-qctl"], exitcodes.USAGE, "Error: --gid: no such group 'no-such-group-qctl'"),
])
def test_worker_unusable_daemon_options(runner, url, fake_worker, args, code, message):
    result = runner.invoke(main, ["-b", url, "worker", *args])
    assert result.exit_code == code and result.stderr.strip() == message
    assert fake_worker == []


@pytest.mark.parametrize("args", [["-P", "gevent"], ["-l", "LOUD"], ["--autoscale", "3,10"],
                                  ["--prefetch-multiplier", "0"], ["-c", "x"]])
def test_worker_bad_options(runner, fake_worker, args):
    result = runner.invoke(main, ["worker", *args])
    assert result.exit_code == 2 and fake_worker == []


# -- params and output ----------------------------------------------------------------------


@pytest.mark.parametrize("text, per_second", [("10/m", 10 / 60), ("100/s", 100.0),
                                              ("5/h", 5 / 3600), ("3", 3.0), ("0", 0.0)])
def test_parse_rate(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "ten/m", "10/d", "-1", "10/m/s", "/m"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_plain_output(capsys):
    out = Output(no_color=True, quiet=True)
    out.table(["ID", "NAME"], [[1, "alpha"], [22, None]])
    out.info("hidden by --quiet")
    out.json({"when": __import__("datetime").date(2030, 1, 2)})
    out.error("bad thing")
    captured = capsys.readouterr()
    assert captured.out == 'ID  NAME\n1   alpha\n22\n{"when": "2030-01-02"}\n'
    assert captured.err == "Error: bad thing\n"
