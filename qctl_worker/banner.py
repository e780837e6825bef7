"""The start-up banner: who this node is and what it will do. Passwords are masked."""
from __future__ import annotations

import platform
import sys
from datetime import datetime
from typing import Any

import qctl


def lines(worker: Any) -> list[str]:
    app = worker.app
    tasks = sorted(app.tasks.regular())
    out = [
        f" -------------- {worker.hostname} v{qctl.__version__}",
        f"--- ***** ----- {platform.platform()} {datetime.now():%Y-%m-%d %H:%M:%S}",
        "-- ******* ---- ",
        "- *** --- * --- [config]",
        f"- ** ---------- .> app:         {app.main or '__main__'}:{id(app):#x}",
        f"- ** ---------- .> transport:   {app.safe_broker_url}",
        f"- ** ---------- .> results:     {app.safe_result_backend}",
        f"- *** --- * --- .> concurrency: {worker.concurrency} ({worker.pool_name})",
        f"-- ******* ---- .> task events: {'ON' if worker.events else 'OFF (enable -E to monitor tasks in this worker)'}",
        "--- ***** ----- ",
        " -------------- [queues]",
    ]
    out += [f"                .> {name:<16} exchange={name}(direct) key={name}" for name in worker.queues]
    out += ["", "[tasks]"] + [f"  . {name}" for name in tasks] + [""]
    return out


def show(worker: Any, logfile: str | None, no_color: bool) -> None:
    """Print to stdout; with ``--logfile`` the banner goes to the log file too."""
    text = "\n".join(lines(worker))
    if logfile:
        from .logs import expand_logfile, open_logfile
        handler = open_logfile(expand_logfile(logfile, 0))   # no symlink followed here either
        try:
            handler.stream.write(text + "\n")
        finally:
            handler.close()
        return
    if sys.stdout.isatty() and not no_color:
        from rich.console import Console
        Console(highlight=False).print(text, style="cyan", markup=False)
    else:
        print(text, flush=True)
