"""``qctl result ID``: show a task's state or result, and ``render_meta``, shared with ``call``.

A finished task prints its return value as JSON; an unfinished one prints its state name
(unknown ids are PENDING, as everywhere in Celery). FAILURE and REVOKED exit 1, so scripts
can test the outcome.
"""
from __future__ import annotations

from typing import Any

import click

from .. import states
from ..exceptions import TimeoutError as QctlTimeoutError
from ..result import meta_to_exception
from . import exitcodes
from .context import CliContext, CliError


def describe_exception(value: Any) -> str:
    """``ValueError: boom`` for a stored failure (``{"exc_type", "exc_message", ...}``)."""
    exc = meta_to_exception(value)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def render_meta(obj: CliContext, meta: dict[str, Any], show_traceback: bool = False,
                as_json: bool = False) -> int:
    """Print a task meta the way ``qctl result`` does; return the exit code."""
    status = meta.get("status") or states.PENDING
    code = exitcodes.FAILURE if status in states.PROPAGATE_STATES else exitcodes.OK
    if as_json:
        obj.out.json({"id": meta.get("task_id"), "state": status, "result": meta.get("result"),
                      "traceback": meta.get("traceback"), "date_done": meta.get("date_done")})
        return code
    if status == states.SUCCESS:
        obj.out.json(meta.get("result"))
    elif status == states.FAILURE:
        trace = meta.get("traceback")
        if show_traceback and trace:
            obj.out.print(str(trace).rstrip("\n"))
        else:
            obj.out.print(describe_exception(meta.get("result")))
    else:
        obj.out.print(status)
    return code


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--traceback", "show_traceback", is_flag=True,
              help="For a failed task, print its traceback instead of the error line.")
@click.option("--wait", is_flag=True, help="Wait until the task has finished.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="With --wait: give up after this long (exit 75). Default: wait forever.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole stored state as a JSON object (id, state, result, ...).")
@click.pass_obj
def result(obj: CliContext, task_id: str, show_traceback: bool, wait: bool,
           timeout: float | None, as_json: bool) -> None:
    """Print the result of task ID as JSON when it has finished, else its state.

    Exits 1 when the task FAILED (printing `ExcType: message`) or was REVOKED.
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout only makes sense with --wait")
    backend = obj.app.backend
    if wait:
        try:
            meta = backend.wait_for(task_id, timeout=timeout)
        except QctlTimeoutError:
            raise CliError(f"timed out after {timeout:g}s waiting for task {task_id}",
                           exitcodes.TEMPFAIL) from None
    else:
        meta = backend.get_task_meta(task_id)
    meta.setdefault("task_id", task_id)
    code = render_meta(obj, meta, show_traceback=show_traceback, as_json=as_json)
    if code:
        raise click.exceptions.Exit(code)
