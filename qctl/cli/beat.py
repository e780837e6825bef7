"""``qctl beat``: the periodic-task scheduler (and ``--list`` to read the schedule).

The scheduler itself lives in ``qctl_worker.beat``; it is imported inside the command so
``qctl --help`` stays light.
"""
from __future__ import annotations

import click

from . import exitcodes
from .context import CliContext, CliError
from .output import to_json
from .params import daemon_options

LOGLEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@click.command()
@click.option("-s", "--schedule", "schedule_file", metavar="FILE",
              help="Last-run state file (JSON, replaced atomically). "
                   "Default: beat_schedule_filename (qctl-beat-schedule).")
@click.option("--max-interval", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Longest sleep between two looks at the schedule (default: beat_max_loop_interval).")
@click.option("-l", "--loglevel", type=click.Choice(LOGLEVELS, case_sensitive=False),
              default="WARNING", show_default=True, help="Logging level.")
@click.option("-f", "--logfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Log to this file instead of stderr.")
@click.option("--pidfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the process id here (removed on clean exit).")
@daemon_options("Run in the background; return once the scheduler runs. "
                   "Defaults --pidfile=qctl-beat.pid --logfile=qctl-beat.log.")
@click.option("--list", "list_only", is_flag=True,
              help="Print the entries with their last and next runs, and who leads; start nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --list: JSON output.")
@click.pass_obj
def beat(obj: CliContext, schedule_file: str | None, max_interval: float | None, loglevel: str,
         logfile: str | None, pidfile: str | None, detach: bool, node_workdir: str | None,
         uid: str | None, gid: str | None, umask: str | None, list_only: bool,
         as_json: bool) -> None:
    """Send the app's periodic tasks (beat_schedule, add_periodic_task) when they are due.

    Run as many beats as you like on one broker: one leads and sends, the others stand by
    and take over within seconds when it dies. A tick is never sent twice: last-run times
    are written to the broker before the tasks go out. TERM/INT/QUIT stop it (the lead passes
    at once to a standby), HUP reopens the log file.
    """
    try:
        from qctl_worker import beat as beat_module
        from qctl_worker import beat_service, daemon
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("qctl_worker"):
            raise
        raise CliError(f"the worker runtime is not installed: {exc}", exitcodes.SOFTWARE) from exc
    app = obj.app
    if list_only:
        _list(obj, app, beat_module, as_json)
        return
    try:
        mask = daemon.parse_umask(umask)
        user_id, group_id = daemon.resolve_ids(uid, gid)
        beat_module.load_entries(app)                       # a bad entry fails here, in front
    except ValueError as exc:
        raise CliError(str(exc), exitcodes.USAGE if "--" in str(exc) else exitcodes.CONFIG) from exc
    ready = None
    if detach:
        pidfile = pidfile or "qctl-beat.pid"
        logfile = logfile or "qctl-beat.log"
        ready = daemon.detach("beat", logfile)
    try:
        daemon.prepare_process(node_workdir, mask, user_id, group_id)
    except OSError as exc:                           # e.g. --uid without root: one line, 77
        if ready is not None:
            ready.fail(exitcodes.NOPERM, f"cannot prepare beat: {exc.strerror or exc}")
            raise SystemExit(exitcodes.NOPERM)
        raise CliError(f"cannot prepare beat: {exc.strerror or exc}", exitcodes.NOPERM) from exc
    code, error = beat_service.run(app, schedule_file, max_interval, loglevel.upper(), logfile,
                                   pidfile, no_color=obj.no_color, quiet=obj.quiet,
                                   on_ready=ready.ready if ready is not None else None)
    if ready is not None and code != 0:
        ready.fail(code, error or f"exited with code {code}")
    if code != 0 and ready is None:
        raise CliError(error, code)
    raise SystemExit(code)


def _list(obj: CliContext, app, beat_module, as_json: bool) -> None:
    try:
        rows = beat_module.describe(app)
    except ValueError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from exc
    try:
        holder = app.transport.lease_holder(app.conf.beat_lease_name)
    except Exception:  # noqa: BLE001 - the listing is still useful without the broker
        holder = None
    if as_json:
        obj.out.print(to_json({"leader": holder, "entries": rows}, indent=2))
        return
    if not rows:
        obj.out.print("No periodic tasks (set beat_schedule or use app.add_periodic_task).")
    for row in rows:
        obj.out.print(f"{row['name']}: {row['task']} {row['schedule']}")
        obj.out.print(f"    last run: {row['last_run_at'] or 'never'} ({row['total_run_count']} sent)"
                      f"    next run: {row['next_run_at']}")
    obj.out.print(f"leader: {holder or 'none running'}")
