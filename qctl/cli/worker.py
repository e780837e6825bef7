"""``qctl worker``: parse Celery's worker options and hand them to ``qctl_worker.Worker``.

The worker runtime is imported inside the callback, so this module (and ``qctl --help``)
stays light. Everything about running the node lives in ``qctl_worker``.
"""
from __future__ import annotations

import errno
import os
import sys

import click

from . import exitcodes
from .context import CliContext, CliError
from .params import Autoscale, CommaList, daemon_options

POOLS = ["prefork", "threads", "solo", "asyncio"]
LOGLEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@click.command()
@click.option("-n", "--hostname", metavar="NAME",
              help="Node name, e.g. w1@%h (%h host, %n name, %d domain). Default: qctl@<host>.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1),
              help="Pool processes/threads. Default: worker_concurrency, else the CPU count.")
@click.option("-P", "--pool", type=click.Choice(POOLS, case_sensitive=False),
              help="Pool implementation. Default: the worker_pool setting (prefork).")
@click.option("-Q", "--queues", type=CommaList(), metavar="Q1,Q2",
              help="Consume only these queues. Default: all the app's task queues.")
@click.option("-X", "--exclude-queues", type=CommaList(), metavar="Q1,Q2",
              help="Do not consume these queues.")
@click.option("-l", "--loglevel", type=click.Choice(LOGLEVELS, case_sensitive=False),
              default="WARNING", show_default=True, help="Logging level.")
@click.option("-f", "--logfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Log to this file instead of stderr.")
@click.option("--pidfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the main process id here (removed on clean exit).")
@click.option("-E", "--task-events", is_flag=True, help="Send task events (for monitors).")
@click.option("-B", "--beat", is_flag=True,
              help="Also run beat in this worker (one sender per broker: other beats stand by).")
@click.option("-s", "--schedule-filename", "schedule_file", metavar="FILE",
              help="With -B: beat's last-run state file (default: qctl-beat-schedule).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1), metavar="N",
              help="Reserve up to N messages per pool slot.")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), metavar="N",
              help="Replace a pool child after it ran N tasks.")
@click.option("--max-memory-per-child", type=click.IntRange(min=1), metavar="KIB",
              help="Replace a pool child whose resident memory exceeds KIB kibibytes.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Hard time limit per task: the child is killed and replaced.")
@click.option("--soft-time-limit", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="Soft time limit: SoftTimeLimitExceeded in the task.")
@click.option("--autoscale", type=Autoscale(), help="Grow the pool up to MAX, shrink to MIN.")
@click.option("--without-heartbeat", is_flag=True, help="Send no worker heartbeats.")
@click.option("-S", "--statedb", type=click.Path(dir_okay=False), metavar="FILE",
              help="Keep revoked task ids in this file across restarts.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Warm shutdown: wait this long for running tasks, then stop cold.")
@daemon_options("Run in the background; return once the node is consuming (exit 0) or "
                   "failed to start (its exit code). Defaults --pidfile=%n.pid --logfile=%n%I.log.")
@click.option("--check", is_flag=True,
              help="Probe: exit 0 if the node named by -n is consuming (answers a ping), "
                   "69 otherwise. Starts nothing.")
@click.option("--check-timeout", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, metavar="SECONDS", help="How long --check waits for the node.")
@click.pass_context
def worker(ctx: click.Context, hostname: str | None, concurrency: int | None, pool: str | None,
           queues: list[str] | None, exclude_queues: list[str] | None, loglevel: str,
           logfile: str | None, pidfile: str | None, task_events: bool, beat: bool,
           schedule_file: str | None, prefetch_multiplier: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, time_limit: float | None,
           soft_time_limit: float | None, autoscale: tuple[int, int] | None,
           without_heartbeat: bool, statedb: str | None, shutdown_timeout: float | None,
           detach: bool, node_workdir: str | None, uid: str | None, gid: str | None,
           umask: str | None, check: bool, check_timeout: float) -> None:
    """Start a worker node: consume tasks from the broker and run them.

    \b
    Signals: TERM (or a first INT) stops warmly: running tasks finish, nothing new starts.
    QUIT (or a second INT) stops at once; unacknowledged messages go back to their queue.
    USR1 logs the stack of every thread and pool process. HUP reopens the log files and,
    when detached, restarts the node in place (same pid).
    \b
    In --pidfile, --logfile and --statedb: %n node name, %h/%p full node name, %d domain,
    %i pool process index (0 = main), %I '-<index>' in children and '' in the main process.
    """
    obj: CliContext = ctx.obj
    try:
        from qctl_worker import daemon
        from qctl_worker.worker import Worker, expand_hostname
    except ModuleNotFoundError as exc:
        if exc.name not in ("qctl_worker", "qctl_worker.worker", "qctl_worker.daemon"):
            raise
        raise CliError(f"the worker runtime is not installed: {exc}", exitcodes.SOFTWARE) from exc
    nodename = expand_hostname(hostname)
    if check:
        _check(obj, nodename, check_timeout)
        return
    try:
        mask = daemon.parse_umask(umask)
        user_id, group_id = daemon.resolve_ids(uid, gid)
    except ValueError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from exc
    reexec = os.environ.pop(daemon.REEXEC_ENV, "") == "1"      # HUP: already a daemon
    if detach:
        pidfile = pidfile or "%n.pid"
        logfile = logfile or "%n%I.log"
    pidfile, logfile, statedb = (daemon.expand_node_template(v, nodename) if v else v
                                 for v in (pidfile, logfile, statedb))
    app = obj.app                                   # a bad -A fails here, in the foreground
    ready = None
    if detach and not reexec:
        from qctl_worker.logs import expand_logfile
        ready = daemon.detach(nodename, logfile and expand_logfile(logfile, 0))
    try:
        daemon.prepare_process(node_workdir, mask, user_id, group_id)
    except OSError as exc:
        message = f"cannot become {uid or ''}{':' if gid else ''}{gid or ''}: {exc.strerror}" \
            if exc.errno == errno.EPERM else f"cannot prepare the node: {exc}"
        if ready is not None:
            ready.fail(exitcodes.NOPERM, message)
            raise SystemExit(exitcodes.NOPERM)
        raise CliError(message, exitcodes.NOPERM) from exc
    start_cwd = ctx.find_root().meta.get("qctl.start_cwd", os.getcwd())
    node = Worker(
        app, hostname=nodename, concurrency=concurrency,
        pool=(pool or app.conf.worker_pool or "prefork").lower(),
        queues=queues or None, exclude_queues=exclude_queues or None,
        loglevel=loglevel.upper(), logfile=logfile, pidfile=pidfile, events=task_events,
        beat=beat, prefetch_multiplier=prefetch_multiplier,
        max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child,
        time_limit=time_limit, soft_time_limit=soft_time_limit, autoscale=autoscale,
        without_heartbeat=without_heartbeat, statedb=statedb,
        shutdown_timeout=shutdown_timeout, no_color=obj.no_color, quiet=obj.quiet,
        detached=detach, on_ready=ready.ready if ready is not None else None,
        restart_command=(start_cwd, sys.argv[1:]) if detach else None,
        **({"schedule_file": schedule_file} if schedule_file else {}),
    )
    code = node.run()
    if ready is not None and code != 0:
        ready.fail(code, node.start_error or f"exited with code {code}")
    raise SystemExit(code)


def _check(obj: CliContext, nodename: str, timeout: float) -> None:
    """Health probe: the node answers a ping only once its consumer runs."""
    replies = obj.app.control.ping(destination=[nodename], timeout=timeout)
    if not any(nodename in reply for reply in replies or []):
        raise CliError(f"node {nodename} is not consuming (no reply within {timeout:g}s)",
                       exitcodes.UNAVAILABLE)
    obj.out.print(f"{nodename}: OK")
