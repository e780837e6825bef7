"""``qctl multi``: start, stop, restart, watch and supervise many worker nodes on one host.

Each subcommand takes node names and worker options in Celery's ``multi`` style (parsed by
``qctl.multi.nodes``, from click's leftover arguments, never from ``sys.argv``), calls one
function of ``qctl.multi`` and prints its report. Exit codes: 0 done; 1 a node failed to
start, could not be signalled or is not up (``status``); 64 a bad node name, per-node scope,
option or subcommand; 73 ``run`` found a node already running; 75 ``stopwait --timeout``
passed with nodes still running.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable

import click

from . import exitcodes
from .context import CliContext, CliError

_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}
_HIDDEN_WORKER_OPTIONS = {"check", "check_timeout", "help"}
_COMMAND_ORDER = ["start", "stop", "stopwait", "restart", "kill", "status", "run", "show",
                  "get", "names", "expand"]
_ALIASES = {"stop_verify": "stopwait"}


class MultiGroup(click.Group):
    """Subcommands in a useful order; an unknown one is a usage error (64), not click's 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in _COMMAND_ORDER if name in self.commands]

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = _ALIASES.get(args[0], args[0]) if args else ""
        command = self.get_command(ctx, name)
        if command is None:
            raise CliError(f"unknown multi command {args[0]!r} (one of: "
                           f"{', '.join(self.list_commands(ctx))})", exitcodes.USAGE)
        return name, command, args[1:]


@click.group(cls=MultiGroup)
def multi() -> None:
    """Many worker nodes on one host, as Celery's `multi`.

    \b
    qctl multi start w1 w2 -A proj -l INFO -c:1 4     two detached nodes
    qctl multi start 3 -A proj                        qctl1@host .. qctl3@host
    qctl multi stopwait w1 w2 --kill-after 30         TERM, KILL survivors after 30s
    qctl multi restart w1 w2 -A proj -l INFO          rolling: one node at a time
    qctl multi status w1 w2 --json                    exit 0 only if every node is up
    qctl multi run w1 w2 -A proj                      supervise in the foreground

    \b
    Node names: w1 -> w1@<hostname>, a count N -> qctl1..qctlN, name@host kept.
    Per-node options: -c:1-3 4, -c:w1 2, -Q:w2 images. Templates in option values:
    %n name, %h/%p full node name, %d domain; %i/%I are left to the worker.
    Defaults: --pidfile=%n.pid --logfile=%n%I.log in the current folder.
    """


def worker_option_table() -> dict[str, Any]:
    """Every spelling of every ``qctl worker`` option -> its OptionSpec (from the worker
    command itself, so the two never disagree)."""
    from ..multi.nodes import OptionSpec
    from .worker import worker
    table: dict[str, Any] = {}
    for param in worker.params:
        if not isinstance(param, click.Option) or param.name in _HIDDEN_WORKER_OPTIONS:
            continue
        spec = OptionSpec(str(param.name), flag=bool(param.is_flag or param.count),
                          multiple=bool(param.multiple))
        for opt in (*param.opts, *param.secondary_opts):
            table[opt] = spec
    return table


def _prepare(obj: CliContext, args: tuple[str, ...], range_prefix: str,
             accept_signal: bool = False, take_first: bool = False,
             keep_alone: bool = False) -> tuple[Any, list, str | None]:
    """Parse the free arguments, apply the root options found among them, build the nodes.
    Returns (MultiArgs, nodes, the first positional when ``take_first``; with ``keep_alone``
    that positional stays the node list when nothing follows it)."""
    from ..multi.nodes import NodeSpecError, build_nodes, parse_args, root_arguments
    try:
        parsed = parse_args(args, worker_option_table(), accept_signal=accept_signal)
    except NodeSpecError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from exc
    first = None
    if take_first:
        if not parsed.names:
            raise CliError("missing argument (see --help)", exitcodes.USAGE)
        first = parsed.names.pop(0)
        if keep_alone and not parsed.names:
            parsed.names.append(first)
    root = parsed.root
    if root.get("quiet"):
        obj.quiet = obj.out.quiet = True
    if root.get("no_color"):
        obj.no_color = obj.out.no_color = True
    if root.get("workdir"):
        try:
            os.chdir(root["workdir"])
        except OSError as exc:
            raise CliError(f"--workdir {root['workdir']}: {exc.strerror}", exitcodes.USAGE) from exc
        obj.workdir = root["workdir"]
    for key in ("app", "broker", "result_backend", "config"):
        if root.get(key):
            setattr(obj, "app_spec" if key == "app" else key, root[key])
    obj.export_environment()  # -b / --result-backend reach the nodes through the environment
    root_args = root_arguments(obj.app_spec, obj.config, os.getcwd() if obj.workdir else None)
    try:
        nodes = build_nodes(parsed, cwd=os.getcwd(), range_prefix=range_prefix,
                            root_args=root_args)
    except NodeSpecError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from exc
    return parsed, nodes, first


def _say(obj: CliContext) -> Callable[..., None]:
    def say(text: str, err: bool = False) -> None:
        obj.out.print(text, err=err)
    return say


def _need_files(nodes: list, detached: bool) -> None:
    """Detached nodes need a pidfile and a log file; their folders are created if missing."""
    for node in nodes:
        if detached and not (node.pidfile and node.logfile):
            raise CliError("--pidfile and --logfile cannot be empty for detached nodes",
                           exitcodes.USAGE)
        for path in (node.pidfile_path, node.main_logfile):
            if path:
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                except OSError as exc:
                    raise CliError(f"cannot create {os.path.dirname(path)}: {exc.strerror}",
                                   exitcodes.CANTCREAT) from exc


def _node_args(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.argument("args", nargs=-1, type=click.UNPROCESSED)(function)
    return click.option("--range-prefix", default="qctl", show_default=True, metavar="NAME",
                        help="Name prefix of the nodes a count (`3`) stands for.")(function)


_KILL_AFTER = click.option("--kill-after", type=click.FloatRange(min=0), metavar="SECONDS",
                           help="KILL the nodes (and their pool processes) still running "
                                "this long after the signal.")
_TIMEOUT = click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
                        help="Stop waiting after this long (exit 75). Default: no limit.")


@multi.command(context_settings=_ARGS, short_help="Start detached nodes; OK once each is consuming.")
@_node_args
@click.pass_obj
def start(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """Start detached nodes; `> NODE: OK` once each is consuming.

    A node whose pidfile names its running worker is reported `already running (pid N)`
    and counts as success. A failed node shows the worker's error and the end of its log;
    the exit code is then 1.
    """
    from ..multi import control
    _, nodes, _ = _prepare(obj, args, range_prefix)
    _need_files(nodes, detached=True)
    say = _say(obj)
    results = control.start_nodes(nodes, lambda result: control.report_start(result, say))
    if not all(result.ok for result in results):
        raise click.exceptions.Exit(exitcodes.FAILURE)


def _stop(obj: CliContext, args: tuple[str, ...], range_prefix: str, *, wait: bool,
          kill: bool = False, timeout: float | None = None,
          kill_after: float | None = None) -> None:
    from ..multi import control
    parsed, nodes, _ = _prepare(obj, args, range_prefix, accept_signal=not kill)
    signum = signal.SIGKILL if kill else (parsed.signal or signal.SIGTERM)
    code = control.stop_nodes(nodes, _say(obj), signum=signum, wait=wait, timeout=timeout,
                              kill_after=kill_after)
    if code:
        raise click.exceptions.Exit(code)


@multi.command(context_settings=_ARGS, short_help="Send TERM (or -QUIT, -KILL...) to the running nodes.")
@_KILL_AFTER
@_node_args
@click.pass_obj
def stop(obj: CliContext, kill_after: float | None, range_prefix: str,
         args: tuple[str, ...]) -> None:
    """Send TERM (warm shutdown) to each running node, or -QUIT, -KILL, -9 ...

    Returns at once unless --kill-after is given. A stale pidfile is removed and reported;
    a PID that now belongs to another process is never signalled.
    """
    _stop(obj, args, range_prefix, wait=False, kill_after=kill_after)


@multi.command(context_settings=_ARGS, short_help="Send TERM and wait until the nodes are gone.")
@_TIMEOUT
@_KILL_AFTER
@_node_args
@click.pass_obj
def stopwait(obj: CliContext, timeout: float | None, kill_after: float | None,
             range_prefix: str, args: tuple[str, ...]) -> None:
    """Send TERM and wait until the nodes' processes are gone (`> NODE: DOWN`)."""
    _stop(obj, args, range_prefix, wait=True, timeout=timeout, kill_after=kill_after)


@multi.command(context_settings=_ARGS, short_help="Send KILL to the nodes and their pool processes.")
@_node_args
@click.pass_obj
def kill(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """Send KILL to each running node and its pool processes; remove their pidfiles."""
    _stop(obj, args, range_prefix, wait=False, kill=True)


@multi.command(context_settings=_ARGS, short_help="stopwait then start; rolling by default.")
@click.option("--rolling/--all-at-once", default=True, show_default=True,
              help="One node at a time, each consuming again before the next stops; or "
                   "stop them all, then start them all.")
@_TIMEOUT
@_KILL_AFTER
@_node_args
@click.pass_obj
def restart(obj: CliContext, rolling: bool, timeout: float | None, kill_after: float | None,
            range_prefix: str, args: tuple[str, ...]) -> None:
    """stopwait, then start with the options given (give the same ones as to start).

    A rolling restart stops at the first node that fails to come back: the nodes after it
    keep running as they were.
    """
    from ..multi import control
    _, nodes, _ = _prepare(obj, args, range_prefix)
    _need_files(nodes, detached=True)
    code = control.restart_nodes(nodes, _say(obj), rolling=rolling, timeout=timeout,
                                 kill_after=kill_after)
    if code:
        raise click.exceptions.Exit(code)


@multi.command(context_settings=_ARGS, short_help="pid, state, uptime, memory and tasks of each node.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per node.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, metavar="SECONDS", help="How long to wait for the nodes' replies.")
@_node_args
@click.pass_obj
def status(obj: CliContext, as_json: bool, timeout: float, range_prefix: str,
           args: tuple[str, ...]) -> None:
    """Each node's pid, state, uptime, memory and tasks done.

    \b
    States: up (answers over the broker), running (process alive, no answer),
    stopped (no pidfile), stale (the pidfile names no live node).
    Exit 0 only when every node is up.
    """
    from ..multi import control
    _, nodes, _ = _prepare(obj, args, range_prefix)

    def ask_stats(names: list[str]) -> dict:
        return obj.app.control.inspect(destination=names, timeout=timeout).stats() or {}

    rows, problem = control.node_status(nodes, ask_stats)
    if problem:
        obj.out.warn(f"no answer from the broker ({problem}); states come from the pidfiles")
    if as_json:
        obj.out.json([row.as_dict() for row in rows])
    else:
        obj.out.table(["NODE", "PID", "STATE", "UPTIME", "MEMORY", "TASKS"], [
            [row.name, row.pid or "-", row.state, _duration(row.uptime), _size(row.memory),
             "-" if row.tasks is None else row.tasks] for row in rows])
    if not all(row.state == "up" for row in rows):
        raise click.exceptions.Exit(exitcodes.FAILURE)


@multi.command(context_settings=_ARGS, short_help="Run and supervise the nodes in the foreground.")
@_KILL_AFTER
@_node_args
@click.pass_obj
def run(obj: CliContext, kill_after: float | None, range_prefix: str,
        args: tuple[str, ...]) -> None:
    """Run the nodes in the foreground and supervise them (containers, systemd).

    \b
    A node that dies is started again after a back-off (1s doubling to 30s).
    TERM, INT and QUIT are passed on to every node and stop the supervisor once all
    nodes have exited (exit 0 when all exited cleanly); HUP and USR1 are passed on.
    --logfile= (empty) sends the nodes' logs to stderr.
    """
    from ..multi import control
    from ..multi.supervisor import Supervisor
    _, nodes, _ = _prepare(obj, args, range_prefix)
    _need_files(nodes, detached=False)
    for state in (control.probe(node) for node in nodes):
        if state.state == "running":
            raise CliError(f"{state.node.name} is already running (pid {state.pid}); "
                           f"stop it first", exitcodes.CANTCREAT)
        control.clear_stale(state)
    raise click.exceptions.Exit(Supervisor(nodes, kill_after=kill_after).run())


@multi.command(context_settings=_ARGS, short_help="Print each node's worker command line.")
@_node_args
@click.pass_obj
def show(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """Print each node's worker command line (nothing is started)."""
    _, nodes, _ = _prepare(obj, args, range_prefix)
    for node in nodes:
        obj.out.print(node.command_line(detach=True))


@multi.command(context_settings=_ARGS, short_help="Print one node's worker command line.")
@_node_args
@click.pass_obj
def get(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """`get NODE [NODES...] [options]`: one node's command line.

    NODE is a name (short or full) or a position in NODES; without NODES, the node list is
    NODE alone.
    """
    from ..multi.nodes import NodeSpecError, find_node
    _, nodes, wanted = _prepare(obj, args, range_prefix, take_first=True, keep_alone=True)
    try:
        node = find_node(nodes, str(wanted))
    except NodeSpecError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from exc
    obj.out.print(node.command_line(detach=True))


@multi.command(context_settings=_ARGS, short_help="Print the node names.")
@_node_args
@click.pass_obj
def names(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """Print the node names, one per line."""
    _, nodes, _ = _prepare(obj, args, range_prefix)
    for node in nodes:
        obj.out.print(node.name)


@multi.command(context_settings=_ARGS, short_help="Print a template expanded for each node.")
@_node_args
@click.pass_obj
def expand(obj: CliContext, range_prefix: str, args: tuple[str, ...]) -> None:
    """`expand TEMPLATE NODES...`: the template expanded for each node."""
    from ..multi.nodes import expand_template
    _, nodes, template = _prepare(obj, args, range_prefix, take_first=True)
    for node in nodes:
        obj.out.print(expand_template(str(template), node.name))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
