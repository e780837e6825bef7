"""``qctl dead list|requeue|purge``: the messages workers gave up on (SPEC §10).

A dead letter keeps its original message and the reason it died; ``requeue`` puts it back on
its queue unchanged, ``purge`` deletes them all.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import click

from . import exitcodes
from .context import CliContext, CliError
from .purge import confirm_or_abort, plural


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def describe(letter: Any) -> dict[str, Any]:
    """A dead letter as plain data: what ``list`` shows."""
    headers = (letter.envelope.headers if letter.envelope is not None else None) or {}
    return {"id": letter.id, "queue": letter.queue, "task": headers.get("task"),
            "task_id": headers.get("id"), "reason": letter.reason,
            "died_at": _when(letter.died_at)}


@click.group()
def dead() -> None:
    """Inspect, requeue or delete dead letters (messages the workers could not process)."""


@dead.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Show at most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def list_(obj: CliContext, limit: int, as_json: bool) -> None:
    """List dead letters: id, queue, task name, reason and time of death."""
    letters = [describe(letter) for letter in obj.app.transport.dead_letters(limit=limit)]
    if as_json:
        obj.out.json(letters, indent=2)
        return
    if not letters:
        obj.out.info("No dead letters.")
        return
    obj.out.table(["ID", "QUEUE", "TASK", "TASK ID", "REASON", "DIED AT (UTC)"],
                  [[d["id"], d["queue"], d["task"] or "?", d["task_id"] or "", d["reason"],
                    d["died_at"]] for d in letters])


@dead.command()
@click.argument("ids", nargs=-1, metavar="ID...")
@click.option("--all", "all_", is_flag=True, help="Requeue every dead letter.")
@click.pass_obj
def requeue(obj: CliContext, ids: tuple[str, ...], all_: bool) -> None:
    """Put dead letters back on their queue (the given IDs, or --all)."""
    if bool(ids) == all_:
        raise click.UsageError("give dead-letter IDs or --all (not both)")
    try:
        count = obj.app.transport.requeue_dead(None if all_ else list(ids))
    except (TypeError, ValueError) as exc:
        raise CliError(f"bad dead-letter id in {' '.join(ids)}: {exc}", exitcodes.USAGE) from exc
    obj.out.print(f"Requeued {count} dead {plural(count, 'letter')}.")
    if not all_ and count < len(set(ids)):
        missing = len(set(ids)) - count
        raise CliError(f"{missing} of the given {plural(len(set(ids)), 'id')} "
                       f"{'was' if missing == 1 else 'were'} not found", exitcodes.FAILURE)


@dead.command("purge")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge_dead(obj: CliContext, force: bool) -> None:
    """Delete every dead letter."""
    transport = obj.app.transport
    if not transport.dead_letters(limit=1):
        obj.out.print("No dead letters.")
        return
    confirm_or_abort("Delete all dead letters?", force)
    count = transport.purge_dead()
    obj.out.print(f"Purged {count} dead {plural(count, 'letter')}.")
