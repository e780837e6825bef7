"""What a pool runs for one task: decode the body, build the request, trace the task.

``Job`` is what the main process hands to a pool (picklable, no app objects); ``execute``
runs in the process and thread that executes the task and returns a ``qctl.trace.Outcome``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qctl.exceptions import ContentDisallowed, DecodeError, InvalidTaskError, NotRegistered
from qctl.protocol import TaskMessage
from qctl.trace import Outcome, Tracer, build_context
from qctl.transports import Envelope

#: Outcome state for a message whose body could not be read (dead-lettered by the consumer).
INVALID = "INVALID"
#: Outcome state for a task whose process died under it.
WORKER_LOST = "WORKER_LOST"
#: Outcome state for a task killed by its hard time limit.
TIME_LIMIT = "TIME_LIMIT"


@dataclass
class Job:
    """One task handed to a pool. ``seq`` is unique within the worker."""

    seq: int
    task_name: str
    headers: dict[str, Any]
    body: bytes
    content_type: str
    content_encoding: str
    properties: dict[str, Any]
    delivery_info: dict[str, Any]
    hostname: str
    soft_time_limit: float | None = None
    time_limit: float | None = None
    accept: frozenset[str] = field(default_factory=frozenset)
    # Main-process bookkeeping, never sent to a child:
    expires_at: float | None = None
    delivery: Any = field(default=None, repr=False, compare=False)
    started: float = 0.0
    worker_pid: int | None = None

    @property
    def task_id(self) -> str:
        return self.headers["id"]

    def for_child(self) -> "Job":
        """A copy without main-process-only fields (cheaper to pickle)."""
        return Job(self.seq, self.task_name, self.headers, self.body, self.content_type,
                   self.content_encoding, self.properties, self.delivery_info, self.hostname,
                   self.soft_time_limit, self.time_limit, self.accept)


def prepare(app: Any, job: Job) -> tuple[Any, Any] | Outcome:
    """Find the task and decode the body: (task, request), or an INVALID outcome."""
    try:
        task = app.tasks[job.task_name]
    except NotRegistered:
        return Outcome(job.task_id, INVALID, 0.0, summary=f"unregistered task {job.task_name!r}")
    envelope = Envelope(job.body, job.headers, job.properties, job.content_type, job.content_encoding)
    message = TaskMessage(headers=job.headers, envelope=envelope)
    try:
        message.decode_body(job.accept)
    except (ContentDisallowed, DecodeError, InvalidTaskError) as exc:
        return Outcome(job.task_id, INVALID, 0.0, summary=str(exc))
    except Exception as exc:  # any other surprise in a hostile body
        return Outcome(job.task_id, INVALID, 0.0, summary=f"cannot decode body: {exc!r}")
    request = build_context(job.headers, message.args, message.kwargs, message.embed,
                            job.delivery_info, job.properties, job.hostname)
    if task.typing:
        try:
            task.check_arguments(tuple(message.args), message.kwargs)
        except TypeError as exc:
            return Outcome(job.task_id, INVALID, 0.0, summary=f"wrong arguments: {exc}")
    return task, request


def execute(app: Any, job: Job) -> Outcome:
    """Run ``job`` to its end here (any pool but asyncio's ``async def`` path)."""
    prepared = prepare(app, job)
    if isinstance(prepared, Outcome):
        return prepared
    task, request = prepared
    started = time.monotonic()
    outcome = Tracer(task, request).run()
    outcome.runtime = time.monotonic() - started
    return outcome
