"""``qctl worker --detach`` end to end (SPEC §4, §6): real daemons, real pidfiles, signals.

Each test runs ``qctl -A proj worker --detach ...`` in its own project folder (SQLite broker:
daemon mode does not depend on the broker). The daemons are not children of the test, so the
``daemons`` fixture remembers every node process a pidfile named and, at teardown, stops
whatever is left by PID (TERM, then KILL after a deadline; psutil makes sure it is still the
same process).
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, Project
from tests.helpers import pid_alive, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.sqlite_only]

HOST = socket.gethostname()
W1 = f"w1@{HOST}"
GET = 20            # a task result
COMMAND = 60        # a foreground command: --detach waits for the daemon's verdict
RESTART = 30        # a node restarting in place (HUP)


@dataclass
class Run:
    """A finished ``qctl`` command; ``pid`` is its (foreground) process id."""
    pid: int
    returncode: int
    stdout: str
    stderr: str


class Daemons:
    """The ``qctl`` commands a test runs in its project, and the nodes they left running."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.path = project.path
        self.seen: dict[int, psutil.Process] = {}

    def qctl(self, *args: str, cwd: Path | None = None) -> Run:
        proc = subprocess.Popen([sys.executable, "-m", "qctl", *args], cwd=str(cwd or self.path),
                                env=self.project.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=COMMAND)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"qctl {' '.join(args)} still running after {COMMAND}s\n{out}{err}")
        finally:
            self.remember()
        return Run(proc.pid, proc.returncode, out, err)

    def worker(self, *args: str, app: str = "proj", before: tuple[str, ...] = (),
               cwd: Path | None = None) -> Run:
        """``qctl -A APP [BEFORE] worker --detach -l INFO ARGS``."""
        return self.qctl("-A", app, *before, "worker", "--detach", "-l", "INFO", *args, cwd=cwd)

    def check(self, node: str = "w1@%h", timeout: float = 2.0) -> Run:
        return self.qctl("-A", "proj", "worker", "--check", "-n", node,
                         "--check-timeout", str(timeout))

    def pid(self, pidfile: str = "w1.pid") -> int:
        return int((self.path / pidfile).read_text().strip())

    def remember(self) -> None:
        """Note every node process a pidfile in the project names (for the teardown)."""
        for path in self.path.rglob("*.pid"):
            try:
                proc = psutil.Process(int(path.read_text().strip()))
                if "worker" in proc.cmdline():
                    self.seen.setdefault(proc.pid, proc)
            except (OSError, ValueError, psutil.Error):
                pass

    def cleanup(self) -> None:
        self.remember()
        alive = [p for p in self.seen.values() if p.is_running()]
        for proc in alive:
            try:
                proc.send_signal(signal.SIGTERM)    # psutil: only if it is the same process
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(alive, timeout=15)
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.project.close()


@pytest.fixture
def daemons(tmp_path, _clean_qctl_env):
    fixture = Daemons(Project(tmp_path / "proj"))
    yield fixture
    fixture.cleanup()


def error_line(run: Run) -> str:
    """The one line a failed command prints: on stderr, no traceback, nothing else."""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run
    assert "Traceback" not in run.stderr + run.stdout
    return lines[0]


def processes_named(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        command = " ".join(proc.info["cmdline"] or ())
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in command:
            found.append(proc)
    return found


def workers_in(folder: Path) -> list[dict]:
    """Live worker processes (main and pool) running in ``folder``: other test runs on this
    host may use the same node names, never the same folder."""
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status", "cwd"]):
        info = proc.info
        if (info["status"] != psutil.STATUS_ZOMBIE and info["cwd"] == str(folder.resolve())
                and "worker" in (info["cmdline"] or ())):
            found.append(info)
    return found


def unique_node() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


def children_of(pid: int) -> list[int]:
    return sorted(p.pid for p in psutil.Process(pid).children() if pid_alive(p.pid))


# -- start-up -------------------------------------------------------------------------------

def test_detach_returns_zero_only_once_the_node_consumes(daemons):
    run = daemons.worker("-n", "w1@%h", "-c", "2")
    assert run.returncode == 0, run
    assert run.stderr == ""
    # Right away, nothing waited for: the node is up, in the background, and consuming.
    assert f"{W1} ready." in (daemons.path / "w1.log").read_text()
    pid = daemons.pid()
    assert pid_alive(pid)
    assert pid != run.pid
    assert psutil.Process(pid).ppid() != os.getpid()
    assert os.getsid(pid) != os.getsid(0)              # its own session: no terminal's signals
    check = daemons.check()
    assert check.returncode == 0, check
    assert check.stdout.strip() == f"{W1}: OK"
    # the defaults --pidfile=%n.pid --logfile=%n%I.log: in the current directory, a log
    # file for the main process and one per pool child (by index)
    names = {p.name for p in daemons.path.iterdir() if p.suffix in (".pid", ".log")}
    assert names == {"w1.pid", "w1.log", "w1-1.log", "w1-2.log"}

    app = daemons.project.client()
    assert app.send_task("proj.add", (2, 2)).get(timeout=GET) == 4


def test_detach_with_an_unreachable_broker_fails_with_its_reason(daemons):
    name = unique_node()
    run = daemons.worker("-n", f"{name}@%h", before=("-b", "redis://127.0.0.1:1/0"))
    assert run.returncode == 69, run
    line = error_line(run)
    assert line.startswith(f"Error: node {name}@{HOST}: ") and "127.0.0.1:1" in line, line
    assert not (daemons.path / f"{name}.pid").exists()
    wait_for(lambda: not processes_named(name), 10, message="the failed daemon is still running")
    assert "Cannot start worker" in (daemons.path / f"{name}.log").read_text()


def test_detach_with_a_pidfile_of_a_running_node_fails_and_leaves_it_alone(daemons):
    assert daemons.worker("-n", "w1@%h", "-c", "1").returncode == 0
    pid = daemons.pid()
    children = children_of(pid)

    run = daemons.worker("-n", "w1@%h", "-c", "1")
    assert run.returncode == 73, run
    line = error_line(run)
    assert line.startswith(f"Error: node {W1}: ") and f"(pid {pid})" in line, line
    # the second daemon is gone; the first node, its pidfile and its pool are untouched
    wait_for(lambda: [p for p in workers_in(daemons.path)
                      if pid not in (p["pid"], p["ppid"])] == [], 10,
             message="the second daemon is still running")
    assert daemons.pid() == pid and pid_alive(pid)
    assert children_of(pid) == children
    assert daemons.check().returncode == 0
    assert daemons.project.client().send_task("proj.add", (1, 1)).get(timeout=GET) == 2


def test_detach_with_an_app_that_cannot_be_loaded_fails_in_the_foreground(daemons):
    run = daemons.worker("-n", "w1@%h", app="no_such_module")
    assert run.returncode == 64, run
    assert "no_such_module" in error_line(run)
    assert not [p for p in daemons.path.iterdir() if p.suffix in (".pid", ".log")]


def test_stale_pidfile_of_an_unrelated_process_is_replaced_never_signalled(daemons):
    sleeper = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        (daemons.path / "w1.pid").write_text(f"{sleeper.pid}\n")
        run = daemons.worker("-n", "w1@%h", "--pidfile", "w1.pid", "-c", "1")
        assert run.returncode == 0, run
        pid = daemons.pid()
        assert pid != sleeper.pid and "worker" in psutil.Process(pid).cmdline()
        assert daemons.check().returncode == 0
        assert sleeper.poll() is None                 # alive: nobody sent it anything
        # stopping the node removes its own pidfile and still leaves the process alone
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), 20)
        assert not (daemons.path / "w1.pid").exists()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(10)


# -- signals to a daemon ----------------------------------------------------------------------

def test_hup_restarts_a_detached_node_in_place(daemons):
    assert daemons.worker("-n", "w1@%h", "-c", "3").returncode == 0
    pid = daemons.pid()
    old_children = set(children_of(pid))
    assert len(old_children) == 3
    log = daemons.path / "w1.log"

    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: log.read_text().count(" ready.") == 2, RESTART,
             message=lambda: log.read_text()[-3000:])
    text = log.read_text()
    assert "worker: Restarting in place (HUP)" in text
    assert "worker: Re-executing" in text
    wait_for(lambda: daemons.check().returncode == 0, RESTART)
    # the same process (pid, pidfile), a new pool of the same size
    assert pid_alive(pid) and daemons.pid() == pid
    app = daemons.project.client()
    stats = (app.control.inspect(destination=[W1], timeout=5).stats() or {}).get(W1)
    assert stats, "no stats reply after the restart"
    assert stats["pid"] == pid
    assert stats["pool"]["max-concurrency"] == 3
    new_children = set(stats["pool"]["processes"])
    assert len(new_children) == 3 and not new_children & old_children
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42


def test_a_second_hup_during_the_restart_does_not_kill_the_node(daemons):
    """Between exec and the new handlers, HUP must be ignored, not fatal (default action)."""
    assert daemons.worker("-n", "w1@%h", "-c", "1").returncode == 0
    pid = daemons.pid()
    log = daemons.path / "w1.log"
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "worker: Re-executing" in log.read_text(), RESTART,
             message=lambda: log.read_text()[-3000:])
    os.kill(pid, signal.SIGHUP)                     # lands in the new image, early or late
    wait_for(lambda: daemons.check().returncode == 0, RESTART,
             message=lambda: log.read_text()[-3000:])
    assert pid_alive(pid) and daemons.pid() == pid


def test_term_stops_a_detached_node_and_removes_its_pidfile(daemons):
    assert daemons.worker("-n", "w1@%h", "-c", "1").returncode == 0
    pid = daemons.pid()
    children = children_of(pid)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 20, message="the node is still running")
    assert not (daemons.path / "w1.pid").exists()
    assert not any(pid_alive(child) for child in children)
    assert "worker: Warm shutdown (MainProcess)" in (daemons.path / "w1.log").read_text()


# -- files and privileges -------------------------------------------------------------------

def test_workdir_and_umask_apply_to_the_files_of_the_node(daemons):
    (daemons.path / "run").mkdir()
    run = daemons.worker("-n", "w1@%h", "-c", "1", "--workdir", "run", "--umask", "077")
    assert run.returncode == 0, run
    # relative --pidfile/--logfile (here the defaults) are inside --workdir
    assert not [p for p in daemons.path.iterdir() if p.suffix in (".pid", ".log")]
    assert daemons.pid("run/w1.pid") in [p["pid"] for p in workers_in(daemons.path / "run")]
    for name in ("w1.pid", "w1.log", "w1-1.log"):
        mode = stat.S_IMODE((daemons.path / "run" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))        # 0o644 and 0o640 without --umask
    assert daemons.check().returncode == 0


@pytest.mark.parametrize("option, value, message", [
    ("--uid", "no_such_user_q", "Error: --uid: no such user 'no_such_user_q'"),
    ("--gid", "no_such_group_q", "Error: --gid: no such group 'no_such_group_q'"),
])
def test_unknown_user_or_group_is_a_usage_error(daemons, option, value, message):
    run = daemons.worker("-n", "w1@%h", option, value)
    assert run.returncode == 64, run
    assert error_line(run) == message
    assert not [p for p in daemons.path.iterdir() if p.suffix in (".pid", ".log")]


def _unprivileged_names() -> tuple[str, str] | None:
    for user in ("nobody", "daemon"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        for group in ("nogroup", "nobody"):
            try:
                grp.getgrnam(group)
                return user, group
            except KeyError:
                continue
        return user, grp.getgrgid(entry.pw_gid).gr_name
    return None


def _others_can_reach(path: str) -> bool:
    """True when every folder down to ``path`` lets other users through (o+x)."""
    current = Path(path).resolve()
    for folder in [current, *current.parents]:
        if folder.is_dir() and not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return True


#: An app module for a node that drops to a user who cannot read the interpreter's files
#: (a Python under /root, say): what the node imports on demand is imported before the drop.
PRELOADED_APP = '''\
import importlib, pkgutil
import qctl, qctl_worker
for _package in (qctl, qctl_worker):
    for _module in pkgutil.walk_packages(_package.__path__, _package.__name__ + "."):
        try:
            importlib.import_module(_module.name)
        except ImportError:
            pass  # an optional broker client that is not installed
import ctypes, sqlite3, psutil  # noqa: E401
import multiprocessing.connection, multiprocessing.popen_fork, multiprocessing.util  # noqa: E401
from proj import app  # noqa: E402,F401
'''


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="--uid/--gid need root")
@pytest.mark.skipif(_unprivileged_names() is None, reason="no unprivileged user to become")
def test_uid_and_gid_drop_privileges_of_the_detached_node(_clean_qctl_env):
    user, group = _unprivileged_names()  # type: ignore[misc]
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    # The user must reach the project folder (pytest's tmp_path is private to root).
    folder = Path(tempfile.mkdtemp(prefix="qctl-uid-"))
    folder.chmod(0o777)
    fixture = Daemons(Project(folder))
    try:
        app_module = "proj"
        if not all(_others_can_reach(p) for p in (sysconfig.get_paths()["stdlib"],
                                                  sysconfig.get_paths()["purelib"], str(ROOT))):
            (folder / "proj_preloaded.py").write_text(PRELOADED_APP)
            app_module = "proj_preloaded"
        run = fixture.worker("-n", "w1@%h", "-c", "1", "--uid", user, "--gid", group,
                             app=app_module)
        assert run.returncode == 0, (run, (folder / "w1.log").read_text(errors="replace"))
        pid = fixture.pid()
        node = psutil.Process(pid)
        assert node.uids().real == uid and node.uids().effective == uid
        assert node.gids().real == gid and node.gids().effective == gid
        for child in node.children():
            assert child.uids().effective == uid
        assert (folder / "w1.log").stat().st_uid == uid
        app = fixture.project.client()
        assert app.send_task("proj.add", (5, 5)).get(timeout=GET) == 10
    finally:
        fixture.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


# -- the health probe -------------------------------------------------------------------------

def test_check_of_a_node_nobody_runs_fails_in_one_line(daemons):
    name = unique_node()
    run = daemons.check(f"{name}@%h", timeout=1)
    assert run.returncode == 69, run
    assert error_line(run) == f"Error: node {name}@{HOST} is not consuming (no reply within 1s)"


def test_check_with_an_unreachable_broker_fails_in_one_line(daemons):
    run = daemons.qctl("-A", "proj", "-b", "redis://127.0.0.1:1/0", "worker", "--check",
                       "-n", "w1@%h", "--check-timeout", "1")
    assert run.returncode == 69, run
    assert "127.0.0.1:1" in error_line(run)
