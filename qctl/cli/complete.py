"""Dynamic shell completion: the values offered for task names, node names and remote commands.

The scripts ``qctl completion SHELL`` prints run ``qctl`` again at every TAB with
``_QCTL_COMPLETE`` set; click parses the words typed so far (resiliently: no command runs) and
calls the ``shell_complete`` callback of the parameter being completed. Those callbacks are:

- ``task_names``: the tasks of the app the command line names (``-A``, else ``QCTL_APP``),
  loaded as every command loads it (``CliContext``), without contacting the broker. Internal
  ``qctl.*``/``celery.*`` tasks are left out.
- ``node_names``: for ``-d/--destination`` (a comma-separated list: its last item is
  completed). The nodes the broker lists as alive, asked for at most ``LIVE_NODES_TIMEOUT``
  seconds and only when the broker can exist (a SQLite file is never created), and the nodes
  with a trusted pidfile in the working directory: ``w1.pid`` (multi's default ``%n.pid``)
  names ``w1@<this host>``.
- ``remote_command_names(table)`` for the COMMAND of ``inspect``/``control``, and
  ``remote_arguments(table)`` for their ARGS: task names where the command expects TASK.

Contract: a callback never raises and never prints. It runs inside the user's shell, where a
traceback or a warning from user code would garble the line being edited; whatever fails
offers nothing.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import socket
import threading
from typing import Any, Callable, Iterator, Mapping

import click
from click.shell_completion import CompletionItem

__all__ = ["task_names", "node_names", "remote_command_names", "remote_arguments",
           "LIVE_NODES_TIMEOUT", "INTERNAL_TASK_PREFIXES"]

#: How long ``-d`` completion waits for the broker's list of live nodes.
LIVE_NODES_TIMEOUT = 1.0

#: Tasks the app registers for itself; nobody sends or rate-limits them by hand.
INTERNAL_TASK_PREFIXES = ("qctl.", "celery.")

Callback = Callable[[click.Context, click.Parameter, str], list]


def _silent(callback: Callable[..., list]) -> Callable[..., list]:
    """Run ``callback`` with stdout/stderr captured; any failure offers nothing."""
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> list:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                return callback(*args, **kwargs)
        except (Exception, SystemExit):  # user code may even call sys.exit() at import
            return []
    return wrapper


# -- the app the command line names ----------------------------------------------------------


def _root_options(ctx: click.Context) -> dict[str, Any]:
    params = dict(ctx.find_root().params)
    if not params.get("app"):
        params["app"] = os.environ.get("QCTL_APP") or None
    return params


@contextlib.contextmanager
def _in_workdir(options: Mapping[str, Any]) -> Iterator[str]:
    """Inside ``--workdir`` when given (where the command would run), else where we are."""
    workdir = options.get("workdir")
    if not workdir:
        yield os.getcwd()
        return
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        yield os.getcwd()
    finally:
        os.chdir(previous)


def _load_app(options: Mapping[str, Any]) -> Any:
    """The app the command would use (``-A``, ``-b``, ``--config``...); raises on failure."""
    from .context import CliContext
    obj = CliContext(app=options.get("app"), broker=options.get("broker"),
                     result_backend=options.get("result_backend"), config=options.get("config"))
    return obj.app


def _first_line(text: str | None) -> str | None:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return None


def _task_items(ctx: click.Context, incomplete: str) -> list[CompletionItem]:
    options = _root_options(ctx)
    with _in_workdir(options):
        app = _load_app(options)
    items = []
    for name in sorted(app.tasks):
        if name.startswith(INTERNAL_TASK_PREFIXES) or not name.startswith(incomplete):
            continue
        items.append(CompletionItem(name, help=_first_line(getattr(app.tasks[name], "__doc__",
                                                                   None))))
    return items


@_silent
def task_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """The app's task names starting with ``incomplete`` (``call TASK``)."""
    return _task_items(ctx, incomplete)


# -- node names -------------------------------------------------------------------------------


def _broker_may_exist(url: str) -> bool:
    """False when asking would create the broker (a SQLite file) or cannot find other nodes
    (the in-process memory broker)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        return False
    if scheme == "sqlite":
        from ..transports.sqlite import split_url
        path = split_url(url)[0]
        return path != ":memory:" and os.path.isfile(path)
    return True


def _live_nodes(options: Mapping[str, Any]) -> set[str]:
    """The nodes the broker knows to be alive; empty when it cannot tell within the limit."""
    with _in_workdir(options):
        app = _load_app(options)
        if not _broker_may_exist(app.conf.effective_broker_url):
            return set()
        transport = app.transport  # made here: a relative SQLite path is relative to workdir
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["nodes"] = transport.live_nodes()
        except BaseException:  # noqa: BLE001 - this thread has nobody to tell
            pass

    # A daemon thread: an unreachable broker may block a connect far longer than a TAB
    # should take, and the process must still exit once the shell has its answer.
    thread = threading.Thread(target=ask, name="qctl-complete-nodes", daemon=True)
    thread.start()
    thread.join(LIVE_NODES_TIMEOUT)
    if thread.is_alive():
        return set()
    with contextlib.suppress(Exception):
        app.close()
    return {str(name) for name in answer.get("nodes") or ()}


def _pidfile_nodes(folder: str) -> set[str]:
    """``NAME.pid`` files in ``folder`` that a live qctl process owns, as ``NAME@host``."""
    from ..pidfile import Pidfile
    host = socket.gethostname()
    nodes = set()
    for path in glob.glob(os.path.join(glob.escape(folder), "*.pid")):
        stem = os.path.basename(path)[:-len(".pid")]
        if not stem or Pidfile(path).process() is None:
            continue
        nodes.add(stem if "@" in stem else f"{stem}@{host}")
    return nodes


def _node_items(ctx: click.Context, incomplete: str) -> list[CompletionItem]:
    options = _root_options(ctx)
    with _in_workdir(options) as folder:
        from_pidfiles = _pidfile_nodes(folder)
    try:
        live = _live_nodes(options)
    except (Exception, SystemExit):  # a broken -A still leaves the pidfiles
        live = set()
    done, comma, last = incomplete.rpartition(",")
    chosen = {item.strip() for item in done.split(",")}
    items = []
    for name in sorted(live | from_pidfiles):
        if name in chosen or not name.startswith(last):
            continue
        where = "alive" if name in live else "pidfile"
        items.append(CompletionItem(f"{done}{comma}{name}", help=where))
    return items


@_silent
def node_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Node names for ``-d/--destination``: live on the broker, or with a pidfile here."""
    return _node_items(ctx, incomplete)


# -- inspect/control commands and their arguments ---------------------------------------------


def remote_command_names(table: Mapping[str, Any]) -> Callback:
    """A callback offering the names of ``table`` (``INSPECT_COMMANDS``...) with their help."""
    @_silent
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        return [CompletionItem(name, help=table[name].help)
                for name in sorted(table) if name.startswith(incomplete)]
    return complete


def remote_arguments(table: Mapping[str, Any]) -> Callback:
    """A callback for the ARGS of a remote command: task names where the command's next
    positional argument is ``TASK`` (``rate_limit TASK RATE``), nothing elsewhere."""
    @_silent
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        command = table.get(ctx.params.get("command") or "")
        position = len(ctx.params.get(param.name or "") or ())
        if command is None or position >= len(command.args):
            return []
        if command.args[position].name != "TASK":
            return []
        return _task_items(ctx, incomplete)
    return complete
