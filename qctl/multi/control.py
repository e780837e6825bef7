"""Start, stop, kill, restart and look at detached nodes.

A node is found through its pidfile, and the pidfile is believed only when psutil says the
PID is alive, its command line is *that node's* ``qctl worker`` and it started before the file
was written (``Pidfile.process(node=...)``). So:

- ``running``: the pidfile names the node's live worker; only then is a signal ever sent,
  and psutil checks the process's identity once more at the moment it sends it;
- ``stale``: the file names a dead process or a PID now used by something else; ``stop``,
  ``kill`` and ``start`` remove it (``status`` only reports it);
- ``stopped``: no pidfile.

``start`` runs ``qctl worker --detach`` per node, in parallel. That command returns only once
its daemon is consuming (exit 0) or has failed (its exit code, and one ``Error:`` line), so
"OK" here means the node is consuming, not merely forked. A node whose pidfile is taken by a
running node (exit 73, or found before starting) is reported ``already running``: two
concurrent ``multi start w1`` start one node, and neither reports a failure.

Progress is reported through a ``say(text, err=False)`` callable, one line per event, in the
``> w1@host: ...`` form of Celery's ``multi``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..pidfile import Pidfile
from .nodes import Node

Say = Callable[..., None]

#: How long ``start`` waits for ``qctl worker --detach`` (which gives up itself after 120 s).
START_WAIT = 180.0
#: How long a KILLed process may take to disappear before we call it unkillable.
KILL_WAIT = 10.0
#: How many lines of a failed node's log ``start`` shows.
LOG_TAIL_LINES = 12
#: Exit code of ``qctl worker`` when the pidfile belongs to a running node (sysexits CANTCREAT).
EX_CANTCREAT = 73
EX_OK, EX_FAILURE, EX_TEMPFAIL = 0, 1, 75
_POLL = 0.05


@dataclass
class NodeState:
    """What the pidfile says about a node, after the identity check."""

    node: Node
    state: str                 # "running", "stale" or "stopped"
    pid: int | None = None
    process: Any = None        # psutil.Process while running


def probe(node: Node) -> NodeState:
    """The node's state from its pidfile (see the module docstring)."""
    path = node.pidfile_path
    if not path or not os.path.lexists(path):
        return NodeState(node, "stopped")
    pidfile = Pidfile(path)
    deadline = time.monotonic() + 2.0
    while pidfile.is_fresh_and_empty() and time.monotonic() < deadline:
        time.sleep(_POLL)  # a node is writing it right now
    pid = pidfile.read_pid()
    proc = pidfile.process(node=node.name)
    if proc is not None:
        return NodeState(node, "running", proc.pid, proc)
    if not os.path.lexists(path):
        return NodeState(node, "stopped")
    return NodeState(node, "stale", pid)


def clear_stale(state: NodeState) -> bool:
    """Remove a stale pidfile (checked again under the folder lock). True when removed."""
    if state.state != "stale" or not state.node.pidfile_path:
        return False
    return Pidfile(state.node.pidfile_path).remove_if_stale(node=state.node.name, pid=state.pid)


def alive(proc: Any) -> bool:
    """True while ``proc`` (a psutil.Process) is the same process and not a zombie."""
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(proc: Any, signum: int) -> str | None:
    """Signal ``proc``; psutil refuses if the PID now belongs to another process. Returns
    None when sent, else why not."""
    import psutil
    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.AccessDenied:
        return "permission denied"
    return None


def _kill_tree(proc: Any) -> str | None:
    """KILL the node's main process and its pool processes (children found first: once the
    main process is gone, they can no longer be told apart)."""
    import psutil
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    why = _send(proc, signal.SIGKILL)
    for child in children:
        _send(child, signal.SIGKILL)
    return why


# -- start ----------------------------------------------------------------------------------


@dataclass
class StartResult:
    node: Node
    outcome: str                       # "started", "running" (already) or "failed"
    pid: int | None = None
    exit_code: int | None = None
    error: list[str] = field(default_factory=list)      # what the worker printed
    log_tail: list[str] = field(default_factory=list)   # what it logged during this start
    stale_removed: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"


def start_node(node: Node, wait: float = START_WAIT) -> StartResult:
    """Start one detached node and wait until it is consuming or has failed."""
    state = probe(node)
    if state.state == "running":
        return StartResult(node, "running", state.pid)
    stale_removed = clear_stale(state)
    log_path = node.main_logfile
    log_offset = _size(log_path)
    # Output to a file, not a pipe: a pipe would stay open for as long as anything that
    # inherited it lives, which must never be the daemon's lifetime.
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(node.argv(detach=True), stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            return StartResult(node, "failed", error=[f"cannot run {node.python}: {exc}"])
        try:
            code: int | None = proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        output.seek(0)
        printed = output.read().decode("utf-8", "replace").splitlines()
    if code == 0:
        return StartResult(node, "started", probe(node).pid, 0, stale_removed=stale_removed)
    if code == EX_CANTCREAT:
        state = probe(node)
        if state.state == "running":  # another start won the pidfile: one node, as asked
            return StartResult(node, "running", state.pid, code)
    error = [line for line in printed if line.strip()][-LOG_TAIL_LINES:]
    if code is None:
        error.append(f"Error: no verdict from the node within {wait:g}s; it may still be "
                     f"starting")
    return StartResult(node, "failed", None, code, error=error,
                       log_tail=_tail(log_path, log_offset), stale_removed=stale_removed)


def start_nodes(nodes: Sequence[Node], on_result: Callable[[StartResult], None],
                wait: float = START_WAIT, parallel: int = 8) -> list[StartResult]:
    """Start every node (up to ``parallel`` at once); ``on_result`` gets the results in node
    order, each as soon as it and the ones before it are known."""
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(nodes)))) as pool:
        futures = [pool.submit(start_node, node, wait) for node in nodes]
        results = []
        for future in futures:
            results.append(future.result())
            on_result(results[-1])
    return results


def report_start(result: StartResult, say: Say) -> None:
    """``> w1@host: OK`` / ``already running (pid N)`` / ``FAILED (exit N)`` and the why."""
    name = result.node.name
    note = " (stale pidfile removed)" if result.stale_removed else ""
    if result.outcome == "started":
        say(f"> {name}: OK{note}")
    elif result.outcome == "running":
        say(f"> {name}: already running (pid {result.pid})")
    else:
        code = "no exit" if result.exit_code is None else f"exit {result.exit_code}"
        say(f"> {name}: FAILED ({code}){note}")
        for line in result.error:
            say(f"    {line}", err=True)
        if result.log_tail:
            say(f"    last lines of {result.node.main_logfile}:", err=True)
            for line in result.log_tail:
                say(f"    | {line}", err=True)


def _size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _tail(path: str | None, offset: int, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines written to ``path`` after ``offset``."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(offset if offset <= size else 0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# -- stop, stopwait, kill -------------------------------------------------------------------


def stop_nodes(nodes: Sequence[Node], say: Say, signum: int = signal.SIGTERM,
               wait: bool = False, timeout: float | None = None,
               kill_after: float | None = None) -> int:
    """Signal every running node; report each. Returns the exit code.

    ``wait`` (stopwait): until the processes are gone, at most ``timeout`` seconds (then exit
    75 with the survivors named). ``kill_after``: KILL the nodes still running after that many
    seconds (then ``timeout`` does not apply). KILL goes to the node's pool processes too, and
    is always followed by a short wait, so the pidfile the worker could not remove is removed
    here once its process is gone.
    """
    name = signal.Signals(signum).name.removeprefix("SIG")
    targets: list[NodeState] = []
    code = EX_OK
    for state in (probe(node) for node in nodes):
        node = state.node
        if state.state == "stale":
            clear_stale(state)
            say(f"> {node.name}: not running (stale pidfile removed)")
            continue
        if state.state == "stopped":
            say(f"> {node.name}: not running")
            continue
        why = _kill_tree(state.process) if signum == signal.SIGKILL else _send(state.process, signum)
        if why == "gone":
            _forget(state)
            say(f"> {node.name}: not running")
        elif why:
            say(f"> {node.name}: cannot send {name} to pid {state.pid}: {why}")
            code = EX_FAILURE
        else:
            say(f"> {node.name}: {name} -> {state.pid}")
            targets.append(state)
    if not targets:
        return code
    report = say if wait else None
    if signum == signal.SIGKILL:
        first: float | None = KILL_WAIT
    elif kill_after is not None:
        first = kill_after
    elif wait:
        first = timeout
    else:
        return code  # plain stop: the workers remove their pidfiles as they exit
    left = _wait_gone(targets, report, first)
    if left and kill_after is not None and signum != signal.SIGKILL:
        for state in left:
            say(f"> {state.node.name}: still running after {kill_after:g}s: KILL -> {state.pid}")
            _kill_tree(state.process)
        left = _wait_gone(left, report, KILL_WAIT)
    for state in left:
        say(f"> {state.node.name}: still running (pid {state.pid})")
    if left:
        return EX_TEMPFAIL if wait else EX_FAILURE
    return code


def _wait_gone(states: list[NodeState], say: Say | None,
               timeout: float | None) -> list[NodeState]:
    """Wait until the processes are gone (``say`` reports each as DOWN), at most ``timeout``
    seconds (None: no limit); returns those still alive."""
    deadline = None if timeout is None else time.monotonic() + timeout
    left = list(states)
    while left:
        for state in list(left):
            if not alive(state.process):
                left.remove(state)
                _forget(state)
                if say is not None:
                    say(f"> {state.node.name}: DOWN")
        if not left or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(_POLL)
    return left


def _forget(state: NodeState) -> None:
    """The process is gone: drop its pidfile if the worker could not (KILL, crash)."""
    if state.node.pidfile_path and state.pid:
        Pidfile(state.node.pidfile_path).remove_if_stale(node=state.node.name, pid=state.pid)


# -- restart --------------------------------------------------------------------------------


def restart_nodes(nodes: Sequence[Node], say: Say, rolling: bool = True,
                  timeout: float | None = None, kill_after: float | None = None,
                  wait: float = START_WAIT) -> int:
    """stopwait, then start, with the options given.

    Rolling (the default): one node at a time, the next only once this one is consuming
    again, so the fleet never stops consuming; the first node that fails to come back stops
    the restart and leaves the rest running as they were. Otherwise: stop every node, wait,
    start them all.
    """
    if not rolling:
        code = stop_nodes(nodes, say, wait=True, timeout=timeout, kill_after=kill_after)
        if code not in (EX_OK,):
            say("> restart aborted: some nodes did not stop", err=True)
            return code
        results = start_nodes(nodes, lambda r: report_start(r, say), wait=wait)
        return EX_OK if all(r.ok for r in results) else EX_FAILURE
    for i, node in enumerate(nodes):
        code = stop_nodes([node], say, wait=True, timeout=timeout, kill_after=kill_after)
        result = start_node(node, wait) if code == EX_OK else None
        if result is not None:
            report_start(result, say)
        if result is None or not result.ok:
            rest = [n.name for n in nodes[i + 1:]]
            if rest:
                say(f"> restart stopped at {node.name}; not restarted: {', '.join(rest)}",
                    err=True)
            return code if result is None else EX_FAILURE
    return EX_OK


# -- status ---------------------------------------------------------------------------------


@dataclass
class NodeStatus:
    name: str
    state: str                        # "up", "running", "stopped" or "stale"
    pid: int | None = None
    uptime: float | None = None       # seconds
    memory: int | None = None         # resident bytes, main process and pool together
    tasks: int | None = None          # tasks done since the node started
    pidfile: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.name, "state": self.state, "pid": self.pid,
                "uptime": None if self.uptime is None else round(self.uptime, 1),
                "memory": self.memory, "tasks": self.tasks, "pidfile": self.pidfile}


def node_status(nodes: Sequence[Node], ask_stats: Callable[[list[str]], dict] | None
                ) -> tuple[list[NodeStatus], str | None]:
    """Each node's status; ``ask_stats(names)`` returns ``{node: stats reply}`` from the broker.
    When it fails, the pidfile states stand and the error text is returned with them."""
    states = [probe(node) for node in nodes]
    rows = [_process_status(state) for state in states]
    running = [row.name for row in rows if row.state == "running"]
    problem = None
    if running and ask_stats is not None:
        try:
            replies = ask_stats(running) or {}
        except Exception as exc:  # noqa: BLE001 - the pidfiles still tell what runs here
            replies, problem = {}, str(exc) or type(exc).__name__
        for row in rows:
            reply = replies.get(row.name)
            if row.state == "running" and isinstance(reply, dict):
                row.state = "up"
                total = reply.get("total")
                if isinstance(total, dict):
                    row.tasks = sum(v for v in total.values() if isinstance(v, int))
    return rows, problem


def _process_status(state: NodeState) -> NodeStatus:
    import psutil
    row = NodeStatus(state.node.name, state.state, state.pid, pidfile=state.node.pidfile_path)
    if state.process is None:
        return row
    try:
        row.uptime = max(time.time() - state.process.create_time(), 0.0)
        memory = state.process.memory_info().rss
        for child in state.process.children(recursive=True):
            try:
                memory += child.memory_info().rss
            except psutil.Error:
                pass
        row.memory = memory
    except psutil.Error:
        pass
    return row
