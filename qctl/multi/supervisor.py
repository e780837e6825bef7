"""``qctl multi run``: the nodes as child processes of one foreground supervisor.

For containers and ``Type=simple`` systemd units, where the service manager wants one process
to watch and one process to signal:

- every node is ``qctl worker`` without ``--detach``, a child of the supervisor, in its own
  session: a terminal's Ctrl+C or a signal to the supervisor's process group never reaches
  the pool processes directly, and each worker main process is signalled exactly once, by us;
- TERM, INT and QUIT are passed on to every node and mean "stop": nothing is restarted any
  more, and the supervisor exits once every node has exited: 0 when all exited with 0, else 1.
  ``kill_after`` bounds that wait: nodes still running then are KILLed;
- HUP is passed on (the workers reopen their log files); USR1 too (stack dumps);
- a node that exits on its own with a non-zero code or by a signal is started again after a
  back-off that doubles from ``backoff`` up to ``backoff_max`` seconds and starts over once
  the node had stayed up for ``stable_after`` seconds. A node that exits 0 by itself (for
  example after ``qctl control shutdown``) was stopped on purpose and is left stopped; one
  that exits with a usage error (2 or 64) would fail again and is left stopped too;
- children are reaped with ``waitpid(-1)``, so the supervisor can be PID 1 in a container
  and still collects the orphaned processes that are re-parented to it.

What it does is logged on stderr, one line per event, in the workers' log format.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from .nodes import Node

#: Signals passed on to the nodes; the first three also stop the supervisor.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
PASSED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)
#: Exit codes of a worker whose command line is wrong: starting it again cannot help.
USAGE_CODES = (2, 64)


@dataclass
class Child:
    """One node's process, and when to start it again."""

    node: Node
    popen: Any = None
    started_at: float = 0.0
    delay: float = 0.0                 # back-off before the next restart
    restart_at: float | None = None    # monotonic time of a scheduled restart
    exit_code: int | None = None
    done: bool = False                 # will not be started again

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.exit_code is None else None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, nodes: Sequence[Node], backoff: float = 1.0, backoff_max: float = 30.0,
                 stable_after: float = 30.0, kill_after: float | None = None,
                 log: TextIO | None = None) -> None:
        self.children = [Child(node, delay=backoff) for node in nodes]
        self.backoff, self.backoff_max, self.stable_after = backoff, backoff_max, stable_after
        self.kill_after = kill_after
        self.log_stream = log
        self.stopping = False
        self.kill_at: float | None = None
        self._pending: list[int] = []
        self._wake_r = self._wake_w = -1

    # -- logging ------------------------------------------------------------------------

    def log(self, message: str, level: str = "INFO") -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        stream = self.log_stream or sys.stderr
        stream.write(f"[{stamp},{int(now % 1 * 1000):03d}: {level}/multi] {message}\n")
        stream.flush()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Start the nodes, supervise them, return the exit code once all have stopped."""
        previous = self._install_signals()
        try:
            names = ", ".join(c.node.name for c in self.children)
            self.log(f"supervising {len(self.children)} node(s): {names}")
            for child in self.children:
                self._spawn(child)
            while True:
                self._reap()
                self._handle_signals()
                now = time.monotonic()
                if self.stopping and self.kill_at is not None and now >= self.kill_at:
                    self._kill_survivors()
                if not self.stopping:
                    for child in self.children:
                        if child.restart_at is not None and now >= child.restart_at:
                            self._spawn(child)
                if all(c.pid is None for c in self.children) and (
                        self.stopping or all(c.done for c in self.children)):
                    break
                self._sleep(self._next_timer(now))
        finally:
            self._restore_signals(previous)
        clean = all(c.exit_code == 0 for c in self.children)
        self.log("all nodes stopped" + ("" if clean else " (not all cleanly)"))
        return 0 if clean else 1

    def _next_timer(self, now: float) -> float:
        due = [c.restart_at for c in self.children if c.restart_at is not None and not self.stopping]
        if self.stopping and self.kill_at is not None:
            due.append(self.kill_at)
        return max(0.0, min([*due, now + 1.0]) - now)

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.exit_code = None
        try:
            # The service manager's notification socket is the supervisor's, not the nodes':
            # a node's READY/MAINPID would otherwise speak for the whole unit.
            env = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            child.popen = subprocess.Popen(child.node.argv(detach=False), stdin=subprocess.DEVNULL,
                                           start_new_session=True, env=env)
        except OSError as exc:
            self.log(f"{child.node.name}: cannot start: {exc}", "ERROR")
            child.popen, child.exit_code = None, 127
            self._schedule_restart(child, time.monotonic())
            return
        child.started_at = time.monotonic()
        self.log(f"{child.node.name}: started (pid {child.popen.pid})")

    def _reap(self) -> None:
        """Collect every exited child (ours and orphans re-parented to us)."""
        by_pid = {c.popen.pid: c for c in self.children if c.pid is not None}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            child = by_pid.get(pid)
            if child is not None:
                code = os.waitstatus_to_exitcode(status)
                child.popen.returncode = code  # Popen must not wait for it again
                self._exited(child, code)

    def _exited(self, child: Child, code: int) -> None:
        child.exit_code = code
        now = time.monotonic()
        name = child.node.name
        if self.stopping:
            self.log(f"{name}: stopped ({describe_exit(code)})", "INFO" if code == 0 else "WARNING")
            return
        if code == 0:
            child.done = True
            self.log(f"{name}: exited with code 0 on its own; not restarting it", "WARNING")
            return
        if code in USAGE_CODES:
            child.done = True
            self.log(f"{name}: {describe_exit(code)} (a usage error); not restarting it", "ERROR")
            return
        if now - child.started_at >= self.stable_after:
            child.delay = self.backoff
        self.log(f"{name}: {describe_exit(code)}; restarting in {child.delay:g}s", "WARNING")
        self._schedule_restart(child, now)

    def _schedule_restart(self, child: Child, now: float) -> None:
        child.restart_at = now + child.delay
        child.delay = min(child.delay * 2, self.backoff_max)

    # -- signals: the handler only queues, the loop acts ------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        previous: dict[int, Any] = {}
        previous[-1] = signal.set_wakeup_fd(self._wake_w)
        for signum in (*PASSED_SIGNALS, signal.SIGCHLD):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self._pending.append(signum)

    def _sleep(self, seconds: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise

    def _handle_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            name = signal.Signals(signum).name
            if signum in STOP_SIGNALS:
                if not self.stopping:
                    self.stopping = True
                    if self.kill_after is not None:
                        self.kill_at = time.monotonic() + self.kill_after
                    for child in self.children:
                        child.restart_at = None
                self.log(f"got {name}: passing it on to the nodes and stopping")
            else:
                self.log(f"got {name}: passing it on to the nodes")
            for child in self.children:
                if child.pid is not None:
                    self._signal(child, signum)

    def _signal(self, child: Child, signum: int) -> None:
        # Our own unreaped child: its PID cannot have been reused, so no identity check.
        try:
            os.kill(child.popen.pid, signum)
        except ProcessLookupError:
            pass

    def _kill_survivors(self) -> None:
        self.kill_at = None
        for child in self.children:
            if child.pid is not None:
                self.log(f"{child.node.name}: still running after {self.kill_after:g}s: KILL",
                         "WARNING")
                self._signal(child, signal.SIGKILL)
