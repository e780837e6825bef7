"""``qctl events``: watch the workers and their tasks as they work (Celery's ``celery events``).

- On a colour terminal: a live view, redrawn in place about four times a second, of the
  workers (node, status, load average, active, processed, last seen) and of the most recent
  tasks (id, name, state, worker, and runtime and result, or the exception). A worker is
  offline after ``worker-offline`` or two heartbeat intervals (4 s) without a word from it.
  Task rows need task events: start workers with ``-E`` or run
  ``qctl control enable_events``.
- ``--dump`` (and always when stdout is not a terminal, with ``--no-color`` or ``NO_COLOR``):
  one line per event, ``w1@host [2026-11-22 01:02:03.123]: task-succeeded uuid=... result=4
  runtime=0.001``; with ``-j/--json`` one JSON object per line, the event as sent (plus
  ``local_received``, when it arrived here).

Runs until ``--count`` events were received or ``--timeout`` seconds passed (either, both or
neither), or until Ctrl-C, which ends it quietly with exit 0. At start the workers are asked
for a heartbeat, so they show up at once. Exit 69 when the broker cannot be reached at start;
a connection lost later is retried (a warning says so).
"""
from __future__ import annotations

import time
from typing import Any

import click

from ..events import EventReceiver, State, event_line
from .context import CliContext
from .output import to_json

#: Redraws per second of the live view.
REFRESH_PER_SECOND = 4


@click.command()
@click.option("-d", "--dump", is_flag=True,
              help="Print one line per event instead of the live view.")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="Print each event as one JSON object per line (implies --dump).")
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="Stop after N events.")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this many seconds.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=1000, show_default=True,
              metavar="N", help="Tasks the live view remembers.")
@click.pass_obj
def events(obj: CliContext, dump: bool, as_json: bool, count: int | None,
           timeout: float | None, max_tasks: int) -> None:
    """Watch the workers and their tasks live (events; task events need workers with -E).

    Without --dump, a live view of the workers and the recent tasks, refreshed in place;
    when stdout is not a terminal, the events are printed as lines. Ctrl-C to stop.
    """
    app = obj.app
    receiver = EventReceiver(app)
    try:
        receiver.subscribe()  # before the wakeup: its heartbeats must not be missed
        if dump or as_json or not obj.out.rich_enabled:
            _dump(obj, receiver, count, timeout, as_json)
        else:
            _live(obj, receiver, State(max_tasks=max_tasks), count, timeout)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one stops watching: not an error
    finally:
        receiver.close()


class _Lost:
    """Says once on stderr that the event stream was lost, and once that it is back."""

    def __init__(self, obj: CliContext, receiver: EventReceiver) -> None:
        self.obj, self.receiver, self.lost = obj, receiver, False

    def check(self) -> None:
        error = self.receiver.last_error
        if error is not None and not self.lost:
            self.obj.out.warn(f"lost the connection to the broker: {error} (retrying)")
            self.lost = True
        elif error is None and self.lost:
            self.obj.out.info("Receiving events again.", err=True)
            self.lost = False


def _dump(obj: CliContext, receiver: EventReceiver, count: int | None,
          timeout: float | None, as_json: bool) -> None:
    lost = _Lost(obj, receiver)
    receiver.wakeup_workers()
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while count is None or seen < count:
        wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if wait <= 0:
            return
        for event in receiver.poll(wait):
            click.echo(to_json(event) if as_json else event_line(event))
            seen += 1
            if count is not None and seen >= count:
                return
        lost.check()


# -- the live view ------------------------------------------------------------------------------

_STATE_STYLES = {"SUCCESS": "green", "FAILURE": "bold red", "STARTED": "yellow",
                 "RECEIVED": "cyan", "RETRY": "magenta", "REVOKED": "dim red",
                 "REJECTED": "dim red", "PENDING": "dim"}


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s ago"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m ago"


def _clock(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f}s"
    return f"{seconds * 1000:.1f}ms"


def task_info(task: Any) -> str:
    """The last column of a task row: what the task came to (or what it was given)."""
    runtime = f" in {_duration(task.runtime)}" if task.runtime is not None else ""
    if task.state == "SUCCESS":
        return f"{task.result}{runtime}" if task.result is not None else runtime.strip()
    if task.state in ("FAILURE", "RETRY"):
        return f"{task.exception or ''}{runtime}"
    if task.state == "REVOKED":
        why = [name for name in ("terminated", "expired") if task.info.get(name)]
        return ", ".join(why)
    if task.state == "REJECTED":
        return "requeued" if task.info.get("requeue") else ""
    parts = [str(task.args) if task.args is not None else "",
             str(task.kwargs) if task.kwargs not in (None, "{}") else ""]
    return " ".join(p for p in parts if p)


def render(state: State, receiver: EventReceiver | None = None, now: float | None = None,
           height: int = 40) -> Any:
    """The live view of ``state``: a summary line, the workers table and the tasks table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    workers = state.worker_list()
    online = sum(1 for w in workers if w.alive_at(now))
    summary = Text()
    summary.append("qctl events", style="bold")
    summary.append(f"  {online} worker(s) online, {len(workers) - online} offline  ·  "
                   f"{state.task_count} task(s)  ·  {state.event_count} event(s)  ·  Ctrl-C to quit")
    if receiver is not None and receiver.last_error is not None:
        summary.append(f"\nlost the connection to the broker: {receiver.last_error} (retrying)",
                       style="bold red")

    wtable = Table(title="Workers", title_justify="left", header_style="bold", show_edge=False)
    for name, justify in (("Worker", "left"), ("Status", "left"), ("Load", "right"),
                          ("Active", "right"), ("Processed", "right"), ("Last seen", "right")):
        wtable.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for w in workers:
        alive = w.alive_at(now)
        load = " ".join(f"{x:.2f}" for x in w.loadavg) if w.loadavg else "-"
        wtable.add_row(Text(w.hostname), Text("online" if alive else "offline",
                                              style="green" if alive else "red"),
                       load, str(w.active), str(w.processed), _ago(w.last_heartbeat, now))
    if not workers:
        wtable.add_row(Text("(no worker seen yet)", style="dim"), "", "", "", "", "")

    rows = max(3, height - max(1, len(workers)) - 12)
    tasks = state.recent_tasks(rows)
    ttable = Table(title=f"Recent tasks ({len(tasks)} of {len(state.tasks)})", title_justify="left",
                   header_style="bold", expand=True, show_edge=False)
    ttable.add_column("Task id", no_wrap=True, min_width=8)
    ttable.add_column("Name", no_wrap=True, overflow="ellipsis")
    ttable.add_column("State", no_wrap=True)
    ttable.add_column("Worker", no_wrap=True, overflow="ellipsis")
    ttable.add_column("Received", no_wrap=True)
    ttable.add_column("Runtime / result", no_wrap=True, overflow="ellipsis", ratio=1)
    for t in tasks:
        ttable.add_row(Text(t.uuid), Text(t.name or "?"),
                       Text(t.state, style=_STATE_STYLES.get(t.state, "")), Text(t.worker or "-"),
                       _clock(t.received or t.sent or t.timestamp), Text(task_info(t)))
    if not tasks:
        ttable.add_row(Text("(no task events yet: workers send them with -E, or after "
                            "`qctl control enable_events`)", style="dim"), "", "", "", "", "")
    return Group(summary, Text(""), wtable, Text(""), ttable)


def _live(obj: CliContext, receiver: EventReceiver, state: State, count: int | None,
          timeout: float | None) -> None:
    from rich.live import Live

    console = obj.out.console()
    interval = 1.0 / REFRESH_PER_SECOND
    deadline = None if timeout is None else time.monotonic() + timeout
    receiver.wakeup_workers()
    seen = 0

    def frame() -> Any:
        return render(state, receiver, height=console.size.height)

    with Live(frame(), console=console, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False, vertical_overflow="crop") as live:
        next_draw = time.monotonic() + interval
        done = False
        while not done:
            now = time.monotonic()
            wait = max(0.0, next_draw - now)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            for event in receiver.poll(wait):
                state.event(event)
                seen += 1
                if count is not None and seen >= count:
                    done = True
                    break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                done = True
            if done or now >= next_draw:
                live.update(frame(), refresh=True)
                next_draw = now + interval
