"""Signals with Celery's names: connect a receiver, the library sends."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

logger = logging.getLogger("qctl.signals")


class Signal:
    """A named hook. Receivers are called with ``sender=`` and keyword arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[Any] = []

    def connect(self, receiver: Callable[..., Any] | None = None, weak: bool = False,
                **kwargs: Any) -> Any:
        if receiver is None:  # used as @signal.connect(...)
            return lambda fn: self.connect(fn, weak=weak)
        self.receivers.append(weakref.ref(receiver) if weak else receiver)
        return receiver

    def disconnect(self, receiver: Callable[..., Any]) -> None:
        self.receivers = [r for r in self.receivers
                          if r is not receiver and not (isinstance(r, weakref.ref) and r() is receiver)]

    def send(self, sender: Any = None, **named: Any) -> list[tuple[Any, Any]]:
        """Call every receiver; an error in one is logged and does not stop the others."""
        replies = []
        for ref in list(self.receivers):
            receiver = ref() if isinstance(ref, weakref.ref) else ref
            if receiver is None:
                continue
            try:
                replies.append((receiver, receiver(sender=sender, signal=self, **named)))
            except Exception as exc:  # noqa: BLE001
                logger.exception("Signal handler %r raised: %r", receiver, exc)
                replies.append((receiver, exc))
        return replies

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"


before_task_publish = Signal("before_task_publish")
after_task_publish = Signal("after_task_publish")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_rejected = Signal("task_rejected")
task_unknown = Signal("task_unknown")
worker_init = Signal("worker_init")
worker_ready = Signal("worker_ready")
worker_shutting_down = Signal("worker_shutting_down")
worker_shutdown = Signal("worker_shutdown")
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
beat_init = Signal("beat_init")
