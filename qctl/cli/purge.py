"""``qctl purge``: delete the waiting messages of the app's task queues (or of ``-Q`` ones).

Destructive, so it asks first; without a terminal to ask on it refuses unless ``-f`` is given
(a cron job never hangs on a prompt, and never purges by accident).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import click

from . import exitcodes
from .context import CliContext, CliError
from .params import CommaList


def plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def stdin_is_tty() -> bool:
    """Whether a confirmation can be asked (a function so that tests can pretend)."""
    stream = sys.stdin
    return bool(stream is not None and not stream.closed and stream.isatty())


def confirm_or_abort(question: str, force: bool) -> None:
    """Ask ``question`` unless ``force``; abort (exit 1) on no, or when nobody can answer."""
    if force:
        return
    if not stdin_is_tty():
        raise CliError("refusing to delete without confirmation: stdin is not a terminal "
                       "(use -f/--force)", exitcodes.FAILURE)
    if not click.confirm(question, default=False):
        raise CliError("aborted, nothing deleted", exitcodes.FAILURE)


def known_queues(app: Any) -> list[str]:
    """``task_default_queue`` plus the names in ``task_queues`` (Queue objects, names, a dict)."""
    names = [app.conf.task_default_queue]
    configured: Iterable[Any] = app.conf.task_queues or ()
    if isinstance(configured, dict):
        configured = configured.keys()
    for queue in configured:
        name = queue if isinstance(queue, str) else getattr(queue, "name", None)
        if name and name not in names:
            names.append(name)
    return names


@click.command()
@click.option("-Q", "--queues", type=CommaList(), metavar="Q1,Q2",
              help="Purge these queues instead of the app's known task queues.")
@click.option("-X", "--exclude-queues", type=CommaList(), metavar="Q1,Q2",
              help="Leave these queues alone.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(obj: CliContext, queues: list[str] | None, exclude_queues: list[str] | None,
          force: bool) -> None:
    """Delete all waiting (and delayed) task messages from the task queues.

    Messages a worker holds right now are not touched. Asks for confirmation unless -f.
    """
    app = obj.app
    names = list(queues) if queues else known_queues(app)
    names = [n for n in names if n not in set(exclude_queues or ())]
    if not names:
        raise CliError("no queues left to purge", exitcodes.USAGE)
    transport = app.transport
    waiting = sum(transport.queue_size(name) for name in names)
    if waiting:
        confirm_or_abort(f"Purge {waiting} {plural(waiting, 'message')} from "
                         f"{plural(len(names), 'queue')} {', '.join(names)}?", force)
    purged = sum(transport.purge(name) for name in names)
    # Celery's wording, so scripts written against `celery purge` keep working.
    if purged:
        obj.out.print(f"Purged {purged} {plural(purged, 'message')} from {len(names)} "
                      f"known task {plural(len(names), 'queue')}.")
    else:
        obj.out.print(f"No messages purged from {len(names)} {plural(len(names), 'queue')}.")
