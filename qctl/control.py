"""The remote-control client: broadcast a command to the fleet and gather the replies.

Requests and replies follow Celery's pidbox protocol (``celery.pidbox`` exchange, replies to
the caller's mailbox with the request's ticket), so Celery and qctl nodes answer both kinds of
client. Unlike Celery, which always waits out its timeout, collection ends as soon as every
node expected to answer has answered: the named destinations, or the live nodes the broker
knows from their heartbeats.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable

from .transports import ControlMessage

DEFAULT_TIMEOUT = 1.0


class Control:
    """``app.control``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.clock = 0

    @property
    def exchange(self) -> str:
        return f"{self.app.conf.control_exchange}.pidbox"

    def broadcast(self, command: str, arguments: dict | None = None,
                  destination: Iterable[str] | str | None = None, connection: Any = None,
                  reply: bool = False, timeout: float = DEFAULT_TIMEOUT, limit: int | None = None,
                  callback: Any = None, pattern: str | None = None, matcher: str | None = None,
                  **kwargs: Any) -> list[dict] | None:
        """Send ``command`` to every node (or ``destination``); with ``reply``, return the
        replies as ``[{node: reply}, ...]``."""
        if isinstance(destination, str):
            destination = [d for d in destination.split(",") if d]
        destination = list(destination) if destination else None
        transport = self.app.transport
        body: dict[str, Any] = {"method": command, "arguments": dict(arguments or {}),
                                "destination": destination, "pattern": pattern, "matcher": matcher}
        mailbox = ticket = None
        if reply:
            ticket, mailbox = str(uuid.uuid4()), str(uuid.uuid4())
            body["ticket"] = ticket
            body["reply_to"] = {"exchange": f"reply.{self.app.conf.control_exchange}.pidbox",
                                "routing_key": mailbox}
            transport.open_mailbox(mailbox)
        self.clock += 1
        expected = set(destination) if destination else None
        if reply and expected is None and limit is None:
            expected = transport.live_nodes()
        message = ControlMessage(json.dumps(body).encode(),
                                 {"clock": self.clock, "expires": time.time() + timeout})
        try:
            transport.broadcast(self.exchange, message)
            if not reply:
                return None
            return self._collect(transport, mailbox, ticket, timeout,  # type: ignore[arg-type]
                                 limit, expected, callback)
        finally:
            if mailbox is not None:
                transport.close_mailbox(mailbox)

    def _collect(self, transport: Any, mailbox: str, ticket: str, timeout: float,
                 limit: int | None, expected: set[str] | None, callback: Any) -> list[dict]:
        replies: list[dict] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for message in transport.get_replies(mailbox, left):
                if message.headers.get("ticket") != ticket:
                    continue
                try:
                    answer = json.loads(message.body)
                except ValueError:
                    continue
                if not isinstance(answer, dict):
                    continue
                replies.append(answer)
                seen.update(answer)
                if callback is not None:
                    callback(answer)
            if limit is not None and len(replies) >= limit:
                break
            if expected and expected <= seen:
                break  # everyone who is alive has answered: no need to wait out the timeout
        return replies

    # -- commands -------------------------------------------------------------------------

    def inspect(self, destination: Iterable[str] | str | None = None,
                timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> "Inspect":
        return Inspect(self, destination, timeout)

    def ping(self, destination: Any = None, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> list[dict]:
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout) or []

    def _command(self, command: str, arguments: dict, destination: Any, reply: bool,
                 timeout: float) -> list[dict] | None:
        return self.broadcast(command, arguments, destination=destination, reply=reply, timeout=timeout)

    def rate_limit(self, task_name: str, rate_limit: Any, destination: Any = None,
                   reply: bool = False, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                             destination, reply, timeout)

    def time_limit(self, task_name: str, soft: float | None = None, hard: float | None = None,
                   destination: Any = None, reply: bool = False, timeout: float = DEFAULT_TIMEOUT,
                   **kwargs: Any) -> Any:
        return self._command("time_limit", {"task_name": task_name, "hard": hard, "soft": soft},
                             destination, reply, timeout)

    def revoke(self, task_id: str | list[str], destination: Any = None, terminate: bool = False,
               signal: str = "SIGTERM", reply: bool = False, timeout: float | None = None,
               **kwargs: Any) -> Any:
        """Flag tasks as revoked on every node; also store REVOKED for tasks not started yet."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        self._mark_revoked(ids)
        return self._command("revoke", {"task_id": ids, "terminate": terminate, "signal": signal},
                             destination, reply, timeout or DEFAULT_TIMEOUT)

    def _mark_revoked(self, ids: list[str]) -> None:
        from . import states
        from .exceptions import TaskRevokedError
        from .result import exception_to_meta
        from .trace import utcnow_iso
        backend = self.app.backend
        for task_id in ids:
            try:
                if backend.get_task_meta(task_id)["status"] in (states.PENDING, states.RECEIVED,
                                                                states.RETRY, states.REJECTED):
                    backend.store_result(task_id, {
                        "status": states.REVOKED, "result": exception_to_meta(TaskRevokedError("revoked")),
                        "traceback": None, "children": None, "date_done": utcnow_iso(),
                        "task_id": task_id})
            except Exception:  # noqa: BLE001 - the workers' revoke is what counts
                pass

    def terminate(self, task_id: Any, destination: Any = None, signal: str = "SIGTERM",
                  **kwargs: Any) -> Any:
        return self.revoke(task_id, destination=destination, terminate=True, signal=signal, **kwargs)

    def add_consumer(self, queue: str, exchange: str | None = None, exchange_type: str = "direct",
                     routing_key: str | None = None, options: dict | None = None,
                     destination: Any = None, reply: bool = False,
                     timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("add_consumer", {"queue": queue, "exchange": exchange,
                                              "exchange_type": exchange_type,
                                              "routing_key": routing_key, **(options or {})},
                             destination, reply, timeout)

    def cancel_consumer(self, queue: str, destination: Any = None, reply: bool = False,
                        timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("cancel_consumer", {"queue": queue}, destination, reply, timeout)

    def pool_grow(self, n: int = 1, destination: Any = None, reply: bool = False,
                  timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("pool_grow", {"n": n}, destination, reply, timeout)

    def pool_shrink(self, n: int = 1, destination: Any = None, reply: bool = False,
                    timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("pool_shrink", {"n": n}, destination, reply, timeout)

    def autoscale(self, max: int, min: int, destination: Any = None, reply: bool = False,  # noqa: A002
                  timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("autoscale", {"max": max, "min": min}, destination, reply, timeout)

    def pool_restart(self, modules: Any = None, reload: bool = False, reloader: Any = None,
                     destination: Any = None, reply: bool = False,
                     timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("pool_restart", {"modules": modules, "reload": reload,
                                              "reloader": reloader}, destination, reply, timeout)

    def shutdown(self, destination: Any = None, reply: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("shutdown", {}, destination, reply, timeout)

    def enable_events(self, destination: Any = None, reply: bool = False,
                      timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("enable_events", {}, destination, reply, timeout)

    def disable_events(self, destination: Any = None, reply: bool = False,
                       timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("disable_events", {}, destination, reply, timeout)

    def heartbeat(self, destination: Any = None, reply: bool = False,
                  timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> Any:
        return self._command("heartbeat", {}, destination, reply, timeout)


class Inspect:
    """``app.control.inspect()``: each method returns ``{node: reply}`` or None (no reply)."""

    def __init__(self, control: Control, destination: Any, timeout: float) -> None:
        self.control = control
        self.destination = destination
        self.timeout = timeout

    def _request(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        replies = self.control.broadcast(command, arguments, destination=self.destination,
                                         reply=True, timeout=self.timeout)
        merged: dict[str, Any] = {}
        for answer in replies or ():
            merged.update(answer)
        return merged or None

    def ping(self) -> Any:
        return self._request("ping")

    def stats(self) -> Any:
        return self._request("stats")

    def active(self, safe: Any = None) -> Any:
        return self._request("active", safe=safe)

    def reserved(self) -> Any:
        return self._request("reserved")

    def scheduled(self) -> Any:
        return self._request("scheduled")

    def revoked(self) -> Any:
        return self._request("revoked")

    def registered(self, *taskinfoitems: str) -> Any:
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    registered_tasks = registered

    def active_queues(self) -> Any:
        return self._request("active_queues")

    def query_task(self, *ids: str) -> Any:
        if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
            ids = tuple(ids[0])
        return self._request("query_task", ids=list(ids))

    def conf(self, with_defaults: bool = False) -> Any:
        return self._request("conf", with_defaults=with_defaults)

    def report(self) -> Any:
        return self._request("report")

    def clock(self) -> Any:
        return self._request("clock")

    def hello(self, from_node: str, revoked: Any = None) -> Any:
        return self._request("hello", from_node=from_node, revoked=revoked or [])
