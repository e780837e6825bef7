"""Exceptions raised by qctl and by tasks; names and meanings follow Celery's."""
from __future__ import annotations


class QctlError(Exception):
    """Base class of qctl's own errors."""


class ImproperlyConfigured(QctlError):
    """A setting, URL or option cannot be used as given."""


class OperationalError(QctlError):
    """The broker or result backend cannot be reached (after the retry policy is spent)."""


class NotRegistered(KeyError, QctlError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:
        return repr(self.args[0]) if self.args else "NotRegistered"


class ContentDisallowed(QctlError):
    """A message's content type is not in ``accept_content``; it was not deserialized."""


class DecodeError(QctlError):
    """A message body could not be decoded."""


class TimeoutError(QctlError):  # noqa: A001 - Celery's name
    """``AsyncResult.get()`` gave up waiting."""


class TaskError(QctlError):
    """Base of errors raised about a task's execution."""


class Ignore(TaskError):
    """Raised by a task: store nothing, acknowledge the message."""


class Reject(TaskError):
    """Raised by a task: reject the message, requeueing it when ``requeue`` is true."""

    def __init__(self, reason: object = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"


class Retry(TaskError):
    """Raised by ``Task.retry()``: the task was sent again to run later."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: object = None, **kwargs: object) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        self.eager_result = kwargs.get("eager_result")  # the re-run's result under apply()
        super().__init__(message, exc, when)

    def humanize(self) -> str:
        if isinstance(self.when, (int, float)):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"


class MaxRetriesExceededError(TaskError):
    """``retry()`` was called more often than ``max_retries`` allows."""


class TaskRevokedError(TaskError):
    """The task was revoked or expired and did not run."""


class TimeLimitExceeded(TaskError):
    """The hard time limit was reached; the process running the task was replaced."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task when its soft time limit is reached."""


class WorkerLostError(TaskError):
    """The process running the task died before the task finished."""


class InvalidTaskError(TaskError):
    """A message that is not a valid task message."""


class QueueNotFound(KeyError, QctlError):
    """A queue that is not in ``task_queues`` while ``task_create_missing_queues`` is off."""


class ChordError(TaskError):
    """A task of a chord's header failed."""


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, BaseException)]
