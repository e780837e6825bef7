"""``qctl beat`` as a process, and beat inside a worker (``-B``).

    start: logging -> pidfile -> signals -> banner -> the loop (leader or standby) -> ready
    stop (TERM, INT, QUIT): leave the loop -> give the lease up (a standby takes over at once)
          -> pidfile removed
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from qctl.pidfile import Pidfile, PidfileError

from . import logs
from .beat import Beat, describe

logger = logging.getLogger("qctl.beat")

EX_OK, EX_CANTCREAT, EX_CONFIG = 0, 73, 78


def banner_lines(beat: Beat) -> list[str]:
    app = beat.app
    lines = [f"qctl beat v{_version()} is starting.",
             "LocalTime -> " + _local_now(),
             "Configuration ->",
             f"    . app -> {app.main or '__main__'}",
             f"    . broker -> {_masked_broker(app)}",
             f"    . schedule file -> {beat.file.path or '(none)'}",
             f"    . lease -> {beat.lease_name} (ttl {beat.lease_ttl:g}s), owner {beat.owner}",
             f"    . maxinterval -> {beat.max_interval:g}s",
             "Entries ->"]
    for row in describe(app):
        lines.append(f"    . {row['name']}: {row['task']} {row['schedule']} -> next {row['next_run_at']}")
    if not beat.entries:
        lines.append("    (none: set beat_schedule or use app.add_periodic_task)")
    return lines


def run(app: Any, schedule_file: str | None, max_interval: float | None, loglevel: str,
        logfile: str | None, pidfile: str | None, no_color: bool = False, quiet: bool = False,
        on_ready: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run beat in this process until a stop signal. Returns (exit code, error text)."""
    lock = Pidfile(pidfile) if pidfile else None
    if lock is not None:
        try:
            lock.acquire()
        except PidfileError as exc:
            logs.setup(loglevel, None, no_color=no_color)
            logger.critical("Cannot start beat: %s", exc)
            return EX_CANTCREAT, str(exc)
    logs.setup(loglevel, logfile, no_color=no_color)
    try:
        app.finalize()
        beat = Beat(app, schedule_file=schedule_file, max_interval=max_interval)
        if not quiet:
            text = "\n".join(banner_lines(beat))
            if logfile:
                logger.warning("%s", text)
            else:
                print(text, flush=True)
    except ValueError as exc:
        logger.critical("Cannot start beat: %s", exc)
        if lock is not None:
            lock.release()
        return EX_CONFIG, str(exc)

    def on_stop(signum: int, frame: Any) -> None:
        logger.info("beat: %s: shutting down", signal.Signals(signum).name)
        beat.stop()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, on_stop)
    signal.signal(signal.SIGHUP, lambda s, f: logs.reopen())
    try:
        beat.run_forever(on_started=on_ready)
    finally:
        if lock is not None:
            lock.release()
        app.close()
    return EX_OK, ""


class EmbeddedBeat:
    """Beat in a thread of a worker (``qctl worker -B``)."""

    def __init__(self, app: Any, schedule_file: str | None = None) -> None:
        self.beat = Beat(app, schedule_file=schedule_file)
        self.thread = threading.Thread(target=self.beat.run_forever, name="Beat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.beat.stop()
        self.thread.join(timeout)


def _version() -> str:
    from qctl import __version__
    return __version__


def _local_now() -> str:
    from datetime import datetime
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _masked_broker(app: Any) -> str:
    from qctl.conf import mask_url
    return str(mask_url(app.conf.effective_broker_url))
