"""The node's remote-control mailbox and heartbeats.

One thread listens on the broadcast exchange ``celery.pidbox`` (Celery's pidbox), runs the
commands addressed to this node (``control.py``) and answers in the caller's mailbox; every
2 s it announces the node to the broker's live-node registry (so clients stop waiting once
every live node answered) and sends a ``worker-heartbeat`` event on ``celeryev``.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import threading
import time
from typing import Any

import qctl
from qctl.transports import ControlMessage

from .control import NO_REPLY, dispatch

logger = logging.getLogger("qctl.worker.remote")

HEARTBEAT_INTERVAL = 2.0
#: A node missing two heartbeats in a row drops out of the registry (Celery: 2 x freq).
NODE_TTL = 2 * HEARTBEAT_INTERVAL + 1.0


class RemoteControl:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.app = worker.app
        self.hostname = worker.hostname
        self.exchange = f"{self.app.conf.control_exchange}.pidbox"
        self.event_exchange = self.app.conf.event_exchange
        self.heartbeats = not worker.without_heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Any = None
        self._next_beat = 0.0
        self._events: list[dict] = []
        self._events_lock = threading.Lock()

    def start(self) -> None:
        """Subscribe first (so no request sent after start is missed), then run the thread."""
        self._subscription = self.app.transport.subscribe(
            self.exchange, "#", name=f"{self.hostname}.{self.app.conf.control_exchange}.pidbox")
        self._beat("worker-online")
        self._thread = threading.Thread(target=self._loop, name="RemoteControl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._flush_task_events()
            if self._subscription is not None:
                self._subscription.close()
            self.app.transport.forget_node(self.hostname)
            self.send_worker_event("worker-offline")
        except Exception as exc:  # noqa: BLE001 - the broker may be gone already
            logger.debug("cannot say goodbye: %s", exc)

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                if time.monotonic() >= self._next_beat:
                    self._beat("worker-heartbeat")
                for message in self._subscription.get(0.1 if self._events else 0.5):
                    self._handle(message)
                self._flush_task_events()
                if failing:
                    logger.info("Remote control: connected to the broker again")
                    failing = False
            except Exception as exc:  # noqa: BLE001 - keep listening whatever happens
                if not failing:
                    logger.error("Remote control: %s (retrying)", exc)
                    failing = True
                self._stop.wait(1.0)
                try:  # a lost subscription is made again
                    self._subscription = self.app.transport.subscribe(
                        self.exchange, "#",
                        name=f"{self.hostname}.{self.app.conf.control_exchange}.pidbox")
                except Exception:  # noqa: BLE001
                    pass

    def _beat(self, kind: str) -> None:
        self._next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        self.app.transport.announce_node(self.hostname, NODE_TTL)
        if self.heartbeats or kind != "worker-heartbeat":
            self.send_worker_event(kind)

    # -- requests -------------------------------------------------------------------------

    def _handle(self, message: ControlMessage) -> None:
        try:
            request = json.loads(message.body)
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise ValueError("not a control request")
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("Ignoring a malformed control message: %s", exc)
            return
        clock = message.headers.get("clock") if isinstance(message.headers, dict) else None
        if isinstance(clock, (int, float)):
            self.worker.clock = max(self.worker.clock, int(clock)) + 1
        if not self._for_me(request):
            return
        reply = dispatch(self.worker, request["method"], request.get("arguments") or {})
        reply_to = request.get("reply_to")
        if reply is NO_REPLY or not isinstance(reply_to, dict) or not request.get("ticket"):
            return
        self.worker.clock += 1
        answer = ControlMessage(json.dumps({self.hostname: reply}, default=repr).encode(),
                                {"ticket": request["ticket"], "clock": self.worker.clock})
        self.app.transport.put_reply(str(reply_to.get("routing_key")), answer)

    def _for_me(self, request: dict) -> bool:
        destination = request.get("destination")
        if destination:
            return self.hostname in destination
        pattern = request.get("pattern")
        if pattern:
            if request.get("matcher") == "pcre":
                return re.search(pattern, self.hostname) is not None
            return fnmatch.fnmatchcase(self.hostname, pattern)
        return True

    # -- events ---------------------------------------------------------------------------

    def send_worker_event(self, kind: str, **fields: Any) -> None:
        body = {"freq": HEARTBEAT_INTERVAL,
                "active": len(self.worker.consumer.active) if self.worker.consumer else 0,
                "processed": sum(self.worker.state.total.values()),
                "loadavg": [round(x, 2) for x in os.getloadavg()], "sw_ident": "py-qctl",
                "sw_ver": qctl.__version__, "sw_sys": os.uname().sysname}
        body.update(fields)
        self.send_event(kind, **body)

    def task_event(self, kind: str, **fields: Any) -> None:
        """Queue a task event (``-E``); they go out in batches as Celery's ``task.multi``."""
        self.worker.clock += 1
        event = {"hostname": self.hostname, "utcoffset": -time.timezone / 3600.0,
                 "pid": os.getpid(), "clock": self.worker.clock, **fields,
                 "timestamp": time.time(), "type": kind}
        with self._events_lock:
            self._events.append(event)

    def _flush_task_events(self) -> None:
        with self._events_lock:
            batch, self._events = self._events, []
        if batch:
            self.app.transport.broadcast(self.event_exchange, ControlMessage(
                json.dumps(batch, default=repr).encode(), {"hostname": self.hostname}, "task.multi"))

    def send_event(self, kind: str, **fields: Any) -> None:
        """One event on ``celeryev`` in Celery's format (routing key: type with dots)."""
        self.worker.clock += 1
        body = {"hostname": self.hostname, "utcoffset": -time.timezone / 3600.0,
                "pid": os.getpid(), "clock": self.worker.clock, **fields,
                "timestamp": time.time(), "type": kind}
        self.app.transport.broadcast(self.event_exchange, ControlMessage(
            json.dumps(body).encode(), {"hostname": self.hostname}, kind.replace("-", ".")))
