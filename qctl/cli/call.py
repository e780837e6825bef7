"""``qctl call TASK``: send a task by name (it need not be importable here) and print its id.

With ``--wait`` the command waits for the result and prints it; the outcome rendering is
shared with ``qctl result`` (``render_meta``).
"""
from __future__ import annotations

from typing import Any

import click

from ..exceptions import TimeoutError as QctlTimeoutError
from . import exitcodes
from .complete import task_names
from .context import CliContext, CliError
from .params import JSON_ARRAY, JSON_OBJECT, ISODateTime, SecondsOrDateTime
from .result import render_meta

SERIALIZERS = ["json", "pickle", "yaml", "msgpack"]


@click.command()
@click.argument("task", shell_complete=task_names)
@click.option("-a", "--args", "args", type=JSON_ARRAY, default=None, metavar="JSON",
              help='Positional arguments as a JSON array, e.g. \'[2, 2]\'.')
@click.option("-k", "--kwargs", "kwargs", type=JSON_OBJECT, default=None, metavar="JSON",
              help='Keyword arguments as a JSON object, e.g. \'{"x": 1}\'.')
@click.option("--countdown", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Run no earlier than this many seconds from now.")
@click.option("--eta", type=ISODateTime(), help="Run no earlier than this time (naive = UTC).")
@click.option("--expires", type=SecondsOrDateTime(),
              help="Revoke the task if it has not started by then (seconds from now or ISO time).")
@click.option("-Q", "--queue", metavar="QUEUE", help="Send to this queue instead of the routed one.")
@click.option("--priority", type=click.IntRange(0, 255), help="Message priority, 0-255.")
@click.option("--serializer", type=click.Choice(SERIALIZERS), help="Serializer for the arguments.")
@click.option("--wait", is_flag=True, help="Wait for the task and print its result.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="With --wait: give up after this long (exit 75). Default: wait forever.")
@click.option("--traceback", "show_traceback", is_flag=True,
              help="With --wait: print a failed task's traceback instead of its error.")
@click.pass_obj
def call(obj: CliContext, task: str, args: list | None, kwargs: dict | None,
         countdown: float | None, eta: Any, expires: Any, queue: str | None,
         priority: int | None, serializer: str | None, wait: bool, timeout: float | None,
         show_traceback: bool) -> None:
    """Send task TASK by name and print its id.

    With --wait the id goes to stderr (unless -q) and the result, as JSON, to stdout; a
    failed or revoked task prints its error and exits 1.
    """
    if countdown is not None and eta is not None:
        raise click.UsageError("--countdown and --eta cannot be used together")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout only makes sense with --wait")
    options = {k: v for k, v in {"queue": queue, "priority": priority,
                                 "serializer": serializer}.items() if v is not None}
    result = obj.app.send_task(task, args=args, kwargs=kwargs, countdown=countdown, eta=eta,
                               expires=expires, **options)
    if not wait:
        obj.out.print(result.id)
        return
    obj.out.info(result.id, err=True)
    try:
        meta = obj.app.backend.wait_for(result.id, timeout=timeout)
    except QctlTimeoutError:
        raise CliError(f"timed out after {timeout:g}s waiting for task {result.id}",
                       exitcodes.TEMPFAIL) from None
    code = render_meta(obj, meta, show_traceback=show_traceback)
    if code:
        raise click.exceptions.Exit(code)
