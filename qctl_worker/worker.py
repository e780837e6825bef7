"""The worker node. ``Worker.run()`` is the map of the node: start order, wait, stop order.

    start: logging -> app -> broker -> queues -> state db -> pool -> consumer -> beat (-B)
           -> remote control -> ready
    signals: TERM warm stop, INT warm then cold, QUIT cold, USR1 stack dump (main process and
           every pool child), HUP reopen log files and, when detached, restart in place
    warm stop (TERM, INT): beat gives its lead up -> leave the fleet -> stop fetching -> give
           back messages not running -> let running tasks finish (up to --shutdown-timeout)
           -> flush results and acks -> pool -> state db
    cold stop (QUIT, second INT, or the timeout): the same, but the pool is killed at once and
           every message still leased is given back
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from qctl import signals as app_signals
from qctl.exceptions import ImproperlyConfigured, OperationalError
from qctl.pidfile import Pidfile, PidfileError
from qctl.routing import select_queues

from . import banner, logs, pools, sdnotify
from .autoscale import Autoscaler
from .consumer import Consumer
from .remote import RemoteControl
from .state import NodeState

logger = logging.getLogger("qctl.worker")

EX_OK, EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_CONFIG = 0, 69, 70, 73, 78


def expand_hostname(name: str | None) -> str:
    """``-n`` templates: ``%h`` host, ``%n`` short host, ``%d`` domain; default ``qctl@host``."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    name = name or "qctl@%h"
    name = name.replace("%h", host).replace("%n", short).replace("%d", domain).replace("%%", "%")
    return name if "@" in name else f"{name}@{host}"


class Worker:
    def __init__(self, app: Any, hostname: str | None = None, concurrency: int | None = None,
                 pool: str | None = None, queues: list[str] | None = None,
                 exclude_queues: list[str] | None = None, loglevel: str = "INFO",
                 logfile: str | None = None, pidfile: str | None = None, events: bool = False,
                 beat: bool = False, prefetch_multiplier: int | None = None,
                 max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
                 time_limit: float | None = None, soft_time_limit: float | None = None,
                 autoscale: tuple[int, int] | None = None, without_heartbeat: bool = False,
                 statedb: str | None = None, shutdown_timeout: float | None = None,
                 no_color: bool = False, quiet: bool = False, detached: bool = False,
                 on_ready: Callable[[], None] | None = None,
                 restart_command: tuple[str, list[str]] | None = None, **extra: Any) -> None:
        conf = app.conf
        self.app = app
        self.hostname = expand_hostname(hostname)
        self.pool_name = pool or conf.worker_pool or "prefork"
        self.concurrency = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        if self.pool_name == "solo":
            self.concurrency = 1
        self.include_queues, self.exclude_queues = queues, exclude_queues
        self.loglevel, self.logfile, self.pidfile = loglevel, logfile, pidfile
        self.events = bool(events or conf.worker_send_task_events)
        self.beat = beat
        self.schedule_file = extra.get("schedule_file")
        self.embedded_beat: Any = None
        self.prefetch_multiplier = prefetch_multiplier or conf.worker_prefetch_multiplier or 4
        self.max_tasks_per_child = max_tasks_per_child or conf.worker_max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child or conf.worker_max_memory_per_child
        self.time_limit = time_limit or conf.task_time_limit
        self.soft_time_limit = soft_time_limit or conf.task_soft_time_limit
        self.statedb = statedb or conf.worker_state_db
        self.shutdown_timeout = shutdown_timeout if shutdown_timeout is not None else conf.worker_shutdown_timeout
        self.no_color, self.quiet = no_color, quiet
        self.without_heartbeat = without_heartbeat
        self.autoscale = autoscale
        self.autoscaler: Autoscaler | None = None
        if autoscale:  # the pool starts at MIN and grows with the work
            self.concurrency = int(autoscale[1]) or 1
        self.state = NodeState(self.statedb)
        self.clock = 0                      # Lamport clock shared by control replies and events
        self.started_at = time.monotonic()
        self.remote: RemoteControl | None = None
        self.queues: list[str] = []
        self.pool: Any = None
        self.consumer: Consumer | None = None
        self.detached = detached
        self.on_ready = on_ready                  # the detach pipe: tell the shell we are up
        self.restart_command = restart_command    # (cwd, argv) to re-execute on HUP
        self.start_error = ""                     # why start() failed, for the detach pipe
        self.notifier = sdnotify.Notifier.from_env()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._actions: collections.deque[str] = collections.deque()
        self._cold = False
        self._restart = False
        self._int_count = 0

    # -- the node's life, in order --------------------------------------------------------

    def run(self) -> int:
        """Start, wait for a stop signal, stop. Returns the process exit code."""
        pidfile = Pidfile(self.pidfile) if self.pidfile else None
        try:
            if pidfile is not None:
                pidfile.acquire()                              # before anything else: one node
        except PidfileError as exc:
            logs.setup(self.loglevel, None, no_color=self.no_color)  # not the running node's log
            logger.critical("Cannot start worker %s: %s", self.hostname, exc)
            self.start_error = str(exc)
            return EX_CANTCREAT
        logs.setup(self.loglevel, self.logfile, no_color=self.no_color)
        self._install_signal_handlers()                        # a TERM during start is a stop
        try:
            self.start()
        except (ImproperlyConfigured, OperationalError, ValueError) as exc:
            logger.critical("Cannot start worker %s: %s", self.hostname, exc)
            self.start_error = str(exc)
            self.stop(cold=True)
            if pidfile is not None:
                pidfile.release()
            return EX_UNAVAILABLE if isinstance(exc, OperationalError) else EX_CONFIG
        self._tell_ready()
        while not self._stop.is_set():                         # signal handlers only queue
            self._wake.wait(1.0)
            self._wake.clear()
            while self._actions:
                self._perform(self._actions.popleft())
        self.stop(cold=self._cold)
        if self._restart and self.restart_command is not None:
            self._reexec()                                     # same PID, same pidfile
        if pidfile is not None:
            pidfile.release()                                  # removed on a clean exit
        return EX_OK

    def start(self) -> None:
        app = self.app
        app_signals.worker_init.send(sender=self)
        app.finalize()
        app.transport.ping()                                   # broker reachable?
        self.queues = self._select_queues()
        for name in self.queues:
            app.transport.declare_queue(name)
        self.state.load()                                      # revoked ids from --statedb
        self.pool = pools.create(self.pool_name, app, self.concurrency,
                                 max_tasks_per_child=self.max_tasks_per_child,
                                 max_memory_per_child=self.max_memory_per_child)
        self.consumer = Consumer(self)
        self.pool.start(self.consumer.on_outcome)
        if not self.quiet:
            banner.show(self, self.logfile, self.no_color)
        self.consumer.start()                                  # consuming
        if self.autoscale:
            self.autoscaler = Autoscaler(self, *self.autoscale)
            self.consumer.call_every(1.0, self.autoscaler.tick)
        if self.beat:                                          # -B: beat in a thread here
            from .beat_service import EmbeddedBeat
            self.embedded_beat = EmbeddedBeat(self.app, schedule_file=self.schedule_file)
            self.embedded_beat.start()
        self.remote = RemoteControl(self)
        self.remote.start()                                    # answers inspect/control: last
        # Shown at any log level, as Celery prints it: scripts and operators wait for it.
        logger.log(max(logging.getLogger().getEffectiveLevel(), logging.INFO), "%s ready.", self.hostname)
        app_signals.worker_ready.send(sender=self)

    def _tell_ready(self) -> None:
        """Consuming: release ``--detach``'s shell, tell systemd, start its watchdog."""
        if self.on_ready is not None:
            self.on_ready()
        if self.notifier is not None:
            self.notifier.ready(f"{self.hostname}: consuming from {', '.join(self.queues)}")
            interval = self.notifier.watchdog_interval()
            if interval and self.consumer is not None:
                # From the consumer's loop: a wedged loop stops the pings and systemd acts.
                self.consumer.call_every(interval, self.notifier.watchdog)

    def stop(self, cold: bool = False) -> None:
        if self.notifier is not None:
            self.notifier.stopping(f"{self.hostname}: {'cold' if cold else 'warm'} shutdown")
        app_signals.worker_shutting_down.send(sender=self.hostname, sig=None, how="cold" if cold else "warm")
        consumer, pool = self.consumer, self.pool
        if self.embedded_beat is not None:
            self.embedded_beat.stop()                          # the lead passes to a standby
        if self.remote is not None:
            self.remote.stop()                                 # 0. leave the fleet (worker-offline)
        if consumer is not None:
            consumer.stop_consuming()                          # 1. fetch no more
            returned = consumer.drain()                        # 2. give back what is not running
            if returned:
                logger.info("Restored %d message(s) not yet started to the queue", returned)
            if not cold and not consumer.wait_active(self.shutdown_timeout, abort=lambda: self._cold):
                if not self._cold:
                    logger.warning("Warm shutdown timed out after %ss: stopping running tasks",
                                   self.shutdown_timeout)
                cold = True
        if pool is not None:
            if cold:
                pool.terminate()                               # 3. cold: kill running tasks
            else:
                pool.stop(timeout=5.0)                         # 3. warm: tasks are done
        if consumer is not None:
            consumer.stop()                                    # 4. last results and acks
        try:
            restored = self.app.transport.release_all()        # 5. nothing leased stays ours
            if restored:
                logger.info("Restored %d unacknowledged message(s) to the queue", restored)
        except Exception as exc:  # noqa: BLE001
            logger.error("Cannot give messages back to the broker: %s", exc)
        self.state.save()                                      # 6. revoked ids
        app_signals.worker_shutdown.send(sender=self)
        self.app.close()

    def resize_pool(self, delta: int) -> None:
        """``pool_grow``/``pool_shrink``: the prefetch window follows the pool's size."""
        if delta > 0:
            self.pool.grow(delta)
        elif delta < 0:
            self.pool.shrink(-delta)
        self.concurrency = self.pool.limit
        if self.consumer is not None:
            self.consumer.window = max(self.concurrency * self.prefetch_multiplier, 1)

    def _select_queues(self) -> list[str]:
        conf = self.app.conf
        known = [q.name if hasattr(q, "name") else str(q) for q in (conf.task_queues or [])]
        if not known:
            known = [conf.task_default_queue]
        names = select_queues(known, self.include_queues, self.exclude_queues)
        if not names:
            raise ImproperlyConfigured("no queue left to consume from (check -Q and -X)")
        return names

    # -- signals: handlers only queue work for the main loop ------------------------------

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_int)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGHUP, self._on_hup)

    def request_stop(self, cold: bool = False) -> None:
        self._cold = self._cold or cold
        self._stop.set()
        self._wake.set()

    def _on_term(self, signum: int, frame: Any) -> None:
        logger.info("worker: Warm shutdown (MainProcess)")
        self.request_stop()

    def _on_int(self, signum: int, frame: Any) -> None:
        self._int_count += 1
        if self._int_count > 1:
            logger.info("worker: Cold shutdown (MainProcess)")
            self.request_stop(cold=True)
            return
        logger.info("worker: Hitting Ctrl+C again will terminate all running tasks!")
        self.request_stop()

    def _on_quit(self, signum: int, frame: Any) -> None:
        logger.info("worker: Cold shutdown (MainProcess)")
        self.request_stop(cold=True)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._actions.append("dump-stacks")
        self._wake.set()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._actions.append("hup")
        self._wake.set()

    def _perform(self, action: str) -> None:
        """Run in the main loop, outside any signal handler (logging takes locks)."""
        if action == "dump-stacks":
            logger.warning("%s", logs.format_stacks("MainProcess"))
            for pid in self.pool.pids() if self.pool is not None else []:
                try:
                    os.kill(pid, signal.SIGUSR1)               # each child logs its own
                except ProcessLookupError:
                    pass
        elif action == "hup":
            reopened = logs.reopen()
            if self.detached and self.restart_command is not None:
                logger.warning("worker: Restarting in place (HUP)")
                self._restart = True
                self.request_stop()
            else:
                logger.info("worker: HUP: %d log file(s) reopened; a node in the foreground "
                            "restarts only when detached (its supervisor restarts it)", reopened)

    def _reexec(self) -> None:
        cwd, argv = self.restart_command  # type: ignore[misc]
        logger.info("worker: Re-executing %s", " ".join(argv))
        logging.shutdown()
        os.environ["QCTL_DETACHED_REEXEC"] = "1"
        # An ignored signal stays ignored across exec: another HUP (or USR1) arriving before
        # the new image installs its handlers must not kill the node with the default action.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            os.chdir(cwd)
        except OSError:
            pass
        os.execv(sys.executable, [sys.executable, "-m", "qctl", *argv])
