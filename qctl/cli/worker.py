"""``qctl worker``: parse Celery's worker options and hand them to ``qctl_worker.Worker``.

The worker runtime is imported inside the callback, so this module (and ``qctl --help``)
stays light. Everything about running the node lives in ``qctl_worker``.
"""
from __future__ import annotations

import click

from . import exitcodes
from .context import CliContext, CliError
from .params import Autoscale, CommaList

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
@click.option("-B", "--beat", is_flag=True, help="Also run the beat scheduler in this worker.")
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
@click.option("-D", "--detach", is_flag=True, help="Run in the background (not supported yet).")
@click.option("--uid", metavar="UID", help="Drop privileges to this user (not supported yet).")
@click.option("--gid", metavar="GID", help="Drop privileges to this group (not supported yet).")
@click.option("--umask", metavar="UMASK", help="File creation mask (not supported yet).")
@click.option("--check", is_flag=True, help="Check the broker and the app, then exit.")
@click.pass_obj
def worker(obj: CliContext, hostname: str | None, concurrency: int | None, pool: str | None,
           queues: list[str] | None, exclude_queues: list[str] | None, loglevel: str,
           logfile: str | None, pidfile: str | None, task_events: bool, beat: bool,
           prefetch_multiplier: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, time_limit: float | None,
           soft_time_limit: float | None, autoscale: tuple[int, int] | None,
           without_heartbeat: bool, statedb: str | None, shutdown_timeout: float | None,
           detach: bool, uid: str | None, gid: str | None, umask: str | None,
           check: bool) -> None:
    """Start a worker node: consume tasks from the broker and run them.

    TERM or the first INT stops it warmly (running tasks finish), QUIT or a second INT
    stops it at once; unacknowledged messages go back to their queue.
    """
    for flag, given in (("--detach", detach), ("--uid", uid), ("--gid", gid), ("--umask", umask)):
        if given:
            raise CliError(f"{flag} is not supported yet", exitcodes.USAGE)
    if check:
        raise CliError("--check is not implemented yet", exitcodes.SOFTWARE)
    app = obj.app
    try:
        from qctl_worker.worker import Worker
    except ModuleNotFoundError as exc:
        if exc.name not in ("qctl_worker", "qctl_worker.worker"):
            raise
        raise CliError(f"the worker runtime is not installed: {exc}", exitcodes.SOFTWARE) from exc
    raise SystemExit(Worker(
        app, hostname=hostname, concurrency=concurrency,
        pool=(pool or app.conf.worker_pool or "prefork").lower(),
        queues=queues or None, exclude_queues=exclude_queues or None,
        loglevel=loglevel.upper(), logfile=logfile, pidfile=pidfile, events=task_events,
        beat=beat, prefetch_multiplier=prefetch_multiplier,
        max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child,
        time_limit=time_limit, soft_time_limit=soft_time_limit, autoscale=autoscale,
        without_heartbeat=without_heartbeat, statedb=statedb,
        shutdown_timeout=shutdown_timeout, no_color=obj.no_color, quiet=obj.quiet,
    ).run())
