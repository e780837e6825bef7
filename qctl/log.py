"""Loggers for tasks: ``get_task_logger(__name__)`` adds the running task's name and id."""
from __future__ import annotations

import logging
import contextvars
from typing import Any

TASK_LOGGER_NAME = "qctl.task"


class TaskContextFilter(logging.Filter):
    """Puts ``task_name`` and ``task_id`` of the running task on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_task()
        record.task_name = getattr(current, "name", None) or "???"
        request = getattr(current, "request", None)
        record.task_id = getattr(request, "id", None) or "???"
        return True


_running: contextvars.ContextVar[tuple] = contextvars.ContextVar("qctl_running_task", default=())


def _current_task() -> Any:
    stack = _running.get()
    return stack[-1] if stack else None


def set_current_task(task: Any) -> None:
    _running.set(_running.get() + (task,))


def clear_current_task() -> None:
    _running.set(_running.get()[:-1])


def get_task_logger(name: str) -> logging.Logger:
    """A logger under ``qctl.task`` whose records carry ``task_name``/``task_id``."""
    logger = logging.getLogger(f"{TASK_LOGGER_NAME}.{name}" if name != TASK_LOGGER_NAME else name)
    if not any(isinstance(f, TaskContextFilter) for f in logger.filters):
        logger.addFilter(TaskContextFilter())
    return logger


get_logger = logging.getLogger
