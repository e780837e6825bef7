"""``qctl status``: which workers are up (Celery's ``celery status``).

Pings every node (or those named by ``-d``) and prints ``->  w1@host: OK`` per node that
answered (a rich table on a colour terminal), a blank line and ``N node(s) online.`` (left out
with ``-q``); ``-j/--json`` prints ``{node: reply, ...}`` instead.

Exit codes: 0 when every node that answered is OK; 1 when a node named by ``--destination``
did not answer (a warning names it); 69 (``UNAVAILABLE``) with
``Error: No nodes replied within time constraint`` when no node answered.
"""
from __future__ import annotations

import click

from .context import CliContext
from .inspect import finish, remote_options


@click.command()
@remote_options
@click.pass_obj
def status(obj: CliContext, destination: list[str] | None, timeout: float,
           as_json: bool) -> None:
    """List the workers that answer a ping, then `N node(s) online.`

    Exits 69 when no node answered, 1 when a node named by -d did not.
    """
    replies = obj.app.control.ping(destination=destination, timeout=timeout)
    finish(obj, replies, command="ping", as_json=as_json, destination=destination,
           show_reply=False)
