"""Shell completion: ``qctl completion SHELL``, the generated scripts in ``completions/``, and
what click's completion protocol offers when those scripts call ``qctl`` back at a TAB
(sub-commands, options, remote commands, task names, node names), through real
``python -m qctl`` processes with each shell's environment variables.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from qctl.cli import COMMANDS, main
from tests.conftest import Project

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("bash", "zsh", "fish")
FILES = {"bash": "qctl.bash", "zsh": "_qctl", "fish": "qctl.fish"}
HOST = socket.gethostname()
ENV_KEYS = ("QCTL_BROKER_URL", "QCTL_RESULT_BACKEND", "QCTL_APP", "QCTL_DEBUG",
            "QCTL_CONFIG_MODULE")

APP_MODULE = textwrap.dedent('''\
    import sys, warnings
    from qctl import App

    # Output at import must never reach the shell's completion list.
    print("tasksmod: imported")
    print("tasksmod: on stderr", file=sys.stderr)
    warnings.warn("tasksmod: a warning at import")

    app = App("tasksmod", broker="sqlite:///tasksmod.sqlite3")

    @app.task
    def add(x, y):
        """Add two numbers."""
        return x + y

    @app.task(name="tasksmod.mul")
    def mul(x, y):
        return x * y

    @app.task(name="celery.backend_cleanup")
    def cleanup():
        pass

    @app.task(name="qctl.internal_housekeeping")
    def housekeeping():
        pass
''')

BROKEN_APPS = {
    "missing": None,  # no such module at all
    "syntax": "def broken(:\n",
    "raises": "raise RuntimeError('configuration missing')\n",
    "exits": "import sys\nprint('about to exit')\nsys.exit(3)\n",
    "no_app": "VALUE = 1\n",
}


def environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def qctl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qctl", *args], cwd=cwd, env=environ(env),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def complete(shell: str, line: str, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """The values ``shell``'s script gets from ``qctl`` for ``line``, the cursor at its end.

    The variables are the ones click's scripts set: bash and zsh pass the words and the index
    of the current one (a trailing space starts a new, empty word); fish passes the line up
    to the cursor and the current token.
    """
    words = shlex.split(line)
    current = "" if line.endswith(" ") else words[-1]
    if shell == "fish":
        variables = {"COMP_WORDS": line, "COMP_CWORD": current}
    else:
        cword = len(words) if line.endswith(" ") else len(words) - 1
        variables = {"COMP_WORDS": line, "COMP_CWORD": str(cword)}
    variables["_QCTL_COMPLETE"] = f"{shell}_complete"
    proc = subprocess.run([sys.executable, "-m", "qctl"], cwd=cwd,
                          env=environ({**(env or {}), **variables}), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", f"completion wrote to stderr:\n{proc.stderr}"
    return parse(shell, proc.stdout)


def parse(shell: str, output: str) -> list[str]:
    lines = output.rstrip("\n").split("\n") if output.strip() else []
    if shell == "bash":  # "type,value" per line
        pairs = [line.split(",", 1) for line in lines]
        assert all(kind in ("plain", "dir", "file") for kind, _ in pairs), output
        return [value for kind, value in pairs if kind == "plain"]
    # zsh and fish: type, value and help on three lines per item
    assert len(lines) % 3 == 0, f"not whole items:\n{output}"
    items = [lines[i:i + 3] for i in range(0, len(lines), 3)]
    assert all(kind in ("plain", "dir", "file") for kind, _, _ in items), output
    values = [value for kind, value, _ in items if kind == "plain"]
    return [value.replace(r"\:", ":") for value in values] if shell == "zsh" else values


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "tasksmod.py").write_text(APP_MODULE)
    return folder


@pytest.fixture
def qctl_process(tmp_path: Path):
    """A live process whose command line says qctl, as a pidfile's owner must; killed by PID."""
    started: list[subprocess.Popen] = []

    def start() -> int:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                 "qctl-test-node"], stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


# -- the scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_files_are_what_the_cli_prints(shell, tmp_path):
    proc = qctl("completion", shell, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "_QCTL_COMPLETE" in proc.stdout
    path = ROOT / "completions" / FILES[shell]
    assert path.exists(), f"{path} is missing: run scripts/gen-completions.sh"
    assert path.read_text() == proc.stdout, (
        f"completions/{FILES[shell]} differs from `qctl completion {shell}`: run "
        f"scripts/gen-completions.sh (or `qctl completion {shell} > completions/{FILES[shell]}`)")


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_script_is_the_one_click_generates(shell, tmp_path):
    """The same text as click's own ``_QCTL_COMPLETE=SHELL_source qctl``."""
    ours = qctl("completion", shell, cwd=tmp_path)
    clicks = qctl(cwd=tmp_path, env={"_QCTL_COMPLETE": f"{shell}_source"})
    assert clicks.returncode == 0, clicks.stderr
    assert ours.stdout.rstrip("\n") == clicks.stdout.rstrip("\n")


@pytest.mark.parametrize("args, message", [
    ((), "Missing argument 'SHELL'"),
    (("tcsh",), "'tcsh' is not one of"),
])
def test_completion_needs_a_known_shell(args, message, tmp_path):
    proc = qctl("completion", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert message in proc.stderr
    assert all(shell in proc.stderr for shell in SHELLS)
    assert "Traceback" not in proc.stderr


def test_completion_help_tells_how_to_install():
    result = CliRunner().invoke(main, ["completion", "--help"])
    assert result.exit_code == 0
    assert "qctl completion bash > /etc/bash_completion.d/qctl" in result.output
    assert 'eval "$(qctl completion bash)"' in result.output
    assert "~/.config/fish/completions/qctl.fish" in result.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_in_a_real_bash(tmp_path, workdir):
    """Source completions/qctl.bash in bash, call its function as bash would at a TAB."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "qctl"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qctl "$@"\n')
    wrapper.chmod(0o755)
    script = textwrap.dedent(f'''\
        source {shlex.quote(str(ROOT / "completions" / "qctl.bash"))}
        complete -p qctl
        COMP_WORDS=(qctl -A tasksmod call tasksmod.)
        COMP_CWORD=4
        _qctl_completion qctl
        printf 'reply:%s\\n' "${{COMPREPLY[@]}}"
    ''')
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=workdir,
                          env=environ({"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "_qctl_completion qctl" in proc.stdout  # `complete -p`: registered for qctl
    replies = [line[len("reply:"):] for line in proc.stdout.splitlines()
               if line.startswith("reply:")]
    assert replies == ["tasksmod.add", "tasksmod.mul"]


# -- sub-commands, options, remote commands ----------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_subcommands_come_from_the_cli(shell, tmp_path):
    assert complete(shell, "qctl ins", tmp_path) == ["inspect"]
    assert set(complete(shell, "qctl ", tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("shell", SHELLS)
def test_options_come_from_the_cli(shell, tmp_path):
    assert complete(shell, "qctl worker --con", tmp_path) == ["--concurrency"]
    assert complete(shell, "qctl --work", tmp_path) == ["--workdir"]
    assert complete(shell, "qctl worker --pool ", tmp_path) == ["prefork", "threads", "solo",
                                                                 "asyncio"]


def test_completion_does_not_import_the_worker_runtime(tmp_path):
    """A TAB must stay quick: completing the worker's options imports neither the worker
    runtime nor the broker clients."""
    code = textwrap.dedent('''\
        import sys
        from click.shell_completion import BashComplete
        from qctl.cli import main
        comp = BashComplete(main, {}, "qctl", "_QCTL_COMPLETE")
        print([item.value for item in comp.get_completions(["worker"], "--con")])
        heavy = ("qctl_worker", "redis", "pika", "rich", "psutil")
        print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environ(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['--concurrency']", "[]"]


@pytest.mark.parametrize("shell", SHELLS)
def test_remote_commands_of_inspect_and_control(shell, tmp_path):
    assert complete(shell, "qctl inspect re", tmp_path) == ["registered", "report", "reserved",
                                                             "revoked"]
    assert complete(shell, "qctl control rate", tmp_path) == ["rate_limit"]
    assert "shutdown" in complete(shell, "qctl control ", tmp_path)


# -- task names -------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_call_completes_the_apps_task_names(shell, workdir):
    assert complete(shell, "qctl -A tasksmod call ", workdir) == ["tasksmod.add", "tasksmod.mul"]
    assert complete(shell, "qctl -A tasksmod call tasksmod.m", workdir) == ["tasksmod.mul"]
    assert not (workdir / "tasksmod.sqlite3").exists()  # the broker was never opened


@pytest.mark.parametrize("shell", SHELLS)
def test_control_rate_limit_and_time_limit_complete_task_names(shell, workdir):
    names = ["tasksmod.add", "tasksmod.mul"]
    assert complete(shell, "qctl -A tasksmod control rate_limit ", workdir) == names
    assert complete(shell, "qctl -A tasksmod control time_limit tasksmod.a", workdir) == [
        "tasksmod.add"]
    # Only the TASK position: not RATE, not the ids of revoke.
    assert complete(shell, "qctl -A tasksmod control rate_limit tasksmod.add ", workdir) == []
    assert complete(shell, "qctl -A tasksmod control revoke ", workdir) == []


def test_task_names_from_the_app_in_QCTL_APP(workdir):
    assert complete("bash", "qctl call ", workdir, env={"QCTL_APP": "tasksmod"}) == [
        "tasksmod.add", "tasksmod.mul"]
    assert complete("bash", "qctl call ", workdir) == []  # the default app has no tasks


def test_task_names_with_workdir(tmp_path, workdir):
    line = f"qctl --workdir {workdir} -A tasksmod control rate_limit tasksmod."
    assert complete("bash", line, tmp_path) == ["tasksmod.add", "tasksmod.mul"]


@pytest.mark.parametrize("kind", sorted(BROKEN_APPS))
def test_a_broken_app_offers_nothing_and_stays_silent(kind, tmp_path, qctl_process):
    if BROKEN_APPS[kind] is not None:
        (tmp_path / "brokenmod.py").write_text(BROKEN_APPS[kind])
    (tmp_path / "w1.pid").write_text(f"{qctl_process()}\n")
    for shell in ("bash", "zsh"):
        assert complete(shell, "qctl -A brokenmod call ", tmp_path) == []
        assert complete(shell, "qctl -A brokenmod control rate_limit ", tmp_path) == []
        # The pidfiles are still there to offer.
        assert complete(shell, "qctl -A brokenmod status -d ", tmp_path) == [f"w1@{HOST}"]


# -- node names -------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_node_names_from_live_pidfiles(shell, tmp_path, qctl_process):
    pid = qctl_process()
    (tmp_path / "w1.pid").write_text(f"{pid}\n")
    (tmp_path / "w2.pid").write_text(f"{pid}\n")
    (tmp_path / f"named@{HOST}.pid").write_text(f"{pid}\n")
    (tmp_path / "stale.pid").write_text(f"{dead_pid()}\n")
    (tmp_path / "garbage.pid").write_text("not a pid\n")
    everything = [f"named@{HOST}", f"w1@{HOST}", f"w2@{HOST}"]
    assert complete(shell, "qctl status -d ", tmp_path) == everything
    assert complete(shell, "qctl inspect ping -d w", tmp_path) == [f"w1@{HOST}", f"w2@{HOST}"]
    # A comma-separated list: the last item is completed, the chosen ones are not offered.
    assert complete(shell, f"qctl control shutdown --destination w1@{HOST},", tmp_path) == [
        f"w1@{HOST},named@{HOST}", f"w1@{HOST},w2@{HOST}"]
    # No broker anywhere: completing must not create the default SQLite file.
    assert not (tmp_path / "qctl.sqlite3").exists()


@pytest.mark.timeout(90)
def test_node_names_from_a_running_worker(tmp_path, _clean_qctl_env):
    project = Project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        project.start_worker("-n", "complete1@%h", "-P", "solo")
        node = f"complete1@{HOST}"
        assert complete("bash", "qctl status -d comp", project.path,
                        env={"QCTL_BROKER_URL": project.broker_url}) == [node]
        assert complete("fish", f"qctl -b {project.broker_url} inspect -d ", elsewhere) == [node]
    finally:
        project.close()


def test_an_unresponsive_broker_does_not_hold_up_completion(tmp_path, qctl_process):
    """A broker that accepts connections and never answers (and a client that would wait
    ten minutes for it): the live-node lookup gives up, the pidfile nodes are still offered."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        (tmp_path / "slowmod.py").write_text(textwrap.dedent(f'''\
            from qctl import App
            app = App("slowmod", broker="redis://127.0.0.1:{port}/0",
                      broker_transport_options={{"socket_timeout": 600}})
        '''))
        (tmp_path / "w1.pid").write_text(f"{qctl_process()}\n")
        assert complete("bash", "qctl -A slowmod status -d ", tmp_path) == [f"w1@{HOST}"]
    finally:
        silent.close()
