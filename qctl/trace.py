"""Run one task the way a worker does: request context, retries, handlers, follow-up tasks.

Used by every pool (inside the process that runs the task) and by ``Task.apply()``. The
result is an ``Outcome``: small and picklable, it carries the encoded meta to store, so a
prefork child never sends the return value itself back to its parent.
"""
from __future__ import annotations

import inspect
import logging
import random
import time
import traceback as tb_module
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from . import states
from .exceptions import Ignore, Reject, Retry
from .log import clear_current_task, set_current_task
from .protocol import saferepr
from .result import exception_to_meta
from .task import Context, Task

logger = logging.getLogger("qctl.trace")


@dataclass
class Outcome:
    """How a task ended, as the worker's main process needs to know it."""

    task_id: str
    state: str
    runtime: float
    meta: bytes | None = None          # encoded meta still to be stored by the caller
    summary: str = ""                  # repr of the value, or of the exception
    traceback: str | None = None
    requeue: bool = False              # for REJECTED: give the message back
    expected: bool = False             # the exception is in ``task.throws``
    retry_when: Any = None


class ExceptionInfo:
    """``einfo`` handed to handlers: the exception, its type and formatted traceback."""

    def __init__(self, exc: BaseException, traceback_text: str) -> None:
        self.exception = exc
        self.type = type(exc)
        self.traceback = traceback_text

    def __str__(self) -> str:
        return self.traceback


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def backoff_countdown(factor: float, retries: int, maximum: float, full_jitter: bool) -> float:
    """Celery's exponential back-off: ``factor * 2**retries`` capped, optionally jittered."""
    countdown = min(maximum, factor * (2 ** retries))
    if full_jitter:
        countdown = random.randrange(int(countdown) + 1)
    return max(0, countdown)


def build_context(headers: dict[str, Any], args: list, kwargs: dict, embed: dict,
                  delivery_info: dict | None, properties: dict | None, hostname: str | None,
                  is_eager: bool = False) -> Context:
    return Context(
        id=headers["id"], args=args, kwargs=kwargs, retries=headers.get("retries") or 0,
        eta=headers.get("eta"), expires=headers.get("expires"), group=headers.get("group"),
        group_index=headers.get("group_index"), chord=embed.get("chord"),
        root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
        correlation_id=(properties or {}).get("correlation_id", headers["id"]),
        hostname=hostname, delivery_info=delivery_info or {},
        reply_to=(properties or {}).get("reply_to"), called_directly=False,
        timelimit=headers.get("timelimit"), callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"), chain=embed.get("chain"), headers=headers,
        origin=headers.get("origin"), is_eager=is_eager, shadow=headers.get("shadow"),
        ignore_result=headers.get("ignore_result", False), properties=properties or {},
        stamps=headers.get("stamps"), children=[],
    )


class Tracer:
    """One execution of one task. ``run`` for plain functions; pools with an event loop call
    ``begin``, await the coroutine themselves, then ``succeeded``/``failed``."""

    def __init__(self, task: Task, request: Context, store: Callable[[str, dict], None] | None = None) -> None:
        self.task = task
        self.request = request
        self.store = store  # store now (eager stores nothing; workers defer to the parent)
        self.started = 0.0
        self.value: Any = None
        self.exception: BaseException | None = None

    def begin(self) -> None:
        self.task.push_request(self.request)
        set_current_task(self.task)
        self.started = time.monotonic()

    def end(self) -> None:
        clear_current_task()
        self.task.pop_request()

    def run(self) -> Outcome:
        self.begin()
        try:
            try:
                value = self.task.run(*self.request.args, **(self.request.kwargs or {}))
                if inspect.iscoroutine(value):
                    value = run_coroutine(value)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
                if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not self.request.is_eager:
                    raise
                return self.failed(exc)
            return self.succeeded(value)
        finally:
            self.end()

    # -- endings --------------------------------------------------------------------------

    def _meta(self, status: str, result: Any, traceback: str | None, ready: bool) -> dict[str, Any]:
        request = self.request
        children = [child.as_tuple() for child in (getattr(request, "children", None) or ())]
        meta: dict[str, Any] = {"status": status, "result": result, "traceback": traceback,
                                "children": children, "date_done": utcnow_iso() if ready else None}
        if request.group:
            meta["group_id"] = request.group
        if request.parent_id:
            meta["parent_id"] = request.parent_id
        if self.task.app.conf.result_extended:
            meta.update(name=self.task.name, args=request.args, kwargs=request.kwargs,
                        worker=request.hostname, retries=request.retries,
                        queue=(request.delivery_info or {}).get("routing_key"))
        meta["task_id"] = request.id
        return meta

    def _finish_meta(self, meta: dict[str, Any] | None, now: bool = False) -> bytes | None:
        """Store ``meta`` now (eager runs; with ``now``, a chord header task's result, which
        must be readable before the body can run) or encode it for the worker's main
        process. Raises only when the meta cannot be encoded."""
        if meta is None:
            return None
        if self.store is not None:
            self.store(self.request.id, meta)
            return None
        backend = self.task.app.backend
        encoded = backend.encode(meta)
        if now and backend.persistent:
            try:
                backend.set(self.request.id, encoded, meta["status"])
                return None
            except Exception as exc:  # noqa: BLE001 - the main process stores it, retrying
                logger.warning("Cannot store the result of %s before counting its chord part: "
                               "%s", self.request.id, exc)
        return encoded

    def _chord_part(self, state: str, value: Any) -> None:
        from .followups import on_chord_part_return
        on_chord_part_return(self.task.app, self.request, state, value)

    def succeeded(self, value: Any) -> Outcome:
        task, request = self.task, self.request
        runtime = time.monotonic() - self.started
        self.value = value
        ignore = task.ignore_result or request.ignore_result
        chord = bool(request.chord) and not request.is_eager
        if (request.callbacks or request.chain) and not request.is_eager:
            # Sent first, as Celery does, so the stored result lists them as children.
            from .followups import send_follow_ups
            try:
                send_follow_ups(task, request, value)
            except Exception as exc:  # e.g. the broker is down: the task fails, as in Celery
                return self.failed(exc)
        meta = None if ignore else self._meta(states.SUCCESS, value, None, True)
        try:
            encoded = self._finish_meta(meta, now=chord)
        except Exception as exc:  # e.g. the value cannot be serialized
            return self.failed(exc)
        if chord:
            self._chord_part(states.SUCCESS, value)
        task.on_success(value, request.id, tuple(request.args), request.kwargs or {})
        task.after_return(states.SUCCESS, value, request.id, tuple(request.args),
                          request.kwargs or {}, None)
        return Outcome(request.id, states.SUCCESS, runtime, encoded, summary=saferepr(value))

    def failed(self, exc: BaseException) -> Outcome:
        task, request = self.task, self.request
        if isinstance(exc, Retry):
            return self._retried(exc)
        if isinstance(exc, Ignore):
            return Outcome(request.id, states.IGNORED, time.monotonic() - self.started, summary=repr(exc))
        if isinstance(exc, Reject):
            return Outcome(request.id, states.REJECTED, time.monotonic() - self.started,
                           summary=repr(exc), requeue=bool(exc.requeue))
        if task.autoretry_for and isinstance(exc, task.autoretry_for) and not (
                task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for)):
            options = dict(task.retry_kwargs or {})
            if task.retry_backoff:
                options["countdown"] = backoff_countdown(
                    float(task.retry_backoff), request.retries, task.retry_backoff_max,
                    task.retry_jitter)
            try:
                task.retry(exc=exc, **options)
            except Retry as retry:
                return self._retried(retry)
            except BaseException as final:  # max retries spent: fail with the last error
                exc = final
        return self._failure(exc)

    def _retried(self, retry: Retry) -> Outcome:
        task, request = self.task, self.request
        runtime = time.monotonic() - self.started
        text = format_traceback(retry.exc or retry)
        meta = self._meta(states.RETRY, exception_to_meta(retry.exc or retry), text, False)
        encoded = self._finish_meta(meta) if not request.is_eager else None
        einfo = ExceptionInfo(retry.exc or retry, text)
        task.on_retry(retry.exc or retry, request.id, tuple(request.args), request.kwargs or {}, einfo)
        task.after_return(states.RETRY, retry, request.id, tuple(request.args),
                          request.kwargs or {}, einfo)
        self.exception = retry
        return Outcome(request.id, states.RETRY, runtime, encoded, summary=str(retry),
                       traceback=text, retry_when=retry.when)

    def _failure(self, exc: BaseException) -> Outcome:
        task, request = self.task, self.request
        runtime = time.monotonic() - self.started
        self.exception = exc
        text = format_traceback(exc)
        store = not (task.ignore_result or request.ignore_result) or task.store_errors_even_if_ignored
        meta = self._meta(states.FAILURE, exception_to_meta(exc), text, True) if store else None
        encoded = None
        if not request.is_eager:
            chord = bool(request.chord)
            exc_meta = exception_to_meta(exc)
            try:
                encoded = self._finish_meta(meta, now=chord)
            except Exception:  # the exception's args do not serialize: store its repr
                exc_meta = {"exc_type": type(exc).__name__, "exc_message": [repr(exc)],
                            "exc_module": "builtins"}
                meta["result"] = exc_meta
                encoded = self._finish_meta(meta, now=chord)
            # Celery's order: the result, then the chord part, then the errbacks.
            if chord:
                self._chord_part(states.FAILURE, exc_meta)
            if request.errbacks:
                from .followups import send_errbacks
                send_errbacks(task, request, exc, text)
            if request.chain:
                from .followups import fail_rest_of_chain
                fail_rest_of_chain(task, request, exc_meta, text)
        einfo = ExceptionInfo(exc, text)
        task.on_failure(exc, request.id, tuple(request.args), request.kwargs or {}, einfo)
        task.after_return(states.FAILURE, exc, request.id, tuple(request.args),
                          request.kwargs or {}, einfo)
        expected = bool(task.throws) and isinstance(exc, task.throws)
        return Outcome(request.id, states.FAILURE, runtime, encoded, summary=repr(exc),
                       traceback=text, expected=expected)


def format_traceback(exc: BaseException) -> str:
    return "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))


_loops: dict[int, Any] = {}


def run_coroutine(coro: Any) -> Any:
    """Run an ``async def`` task's coroutine to completion on this thread's own loop."""
    import asyncio
    import threading
    key = threading.get_ident()
    loop = _loops.get(key)
    if loop is None or loop.is_closed():
        loop = _loops[key] = asyncio.new_event_loop()
    return loop.run_until_complete(coro)


def apply_eagerly(task: Task, args: tuple, kwargs: dict, task_id: str | None = None,
                  throw: bool = False, retries: int = 0, link: Any = None,
                  link_error: Any = None, **options: Any) -> Any:
    """``Task.apply()``: run in this thread, return an ``EagerResult``."""
    import uuid
    from .result import EagerResult
    task_id = task_id or str(uuid.uuid4())
    headers = {"id": task_id, "task": task.name, "retries": retries, "root_id": task_id,
               "timelimit": [None, None], "ignore_result": False}
    request = build_context(headers, list(args), kwargs, {}, {"is_eager": True}, {},
                            "localhost", is_eager=True)
    request.called_directly = False
    tracer = Tracer(task, request, store=lambda task_id, meta: None)
    outcome = tracer.run()
    if outcome.state == states.RETRY and getattr(tracer.exception, "eager_result", None) is not None:
        final = tracer.exception.eager_result  # type: ignore[union-attr]
        if throw and final.state == states.FAILURE:
            raise final.result
        return final
    if outcome.state == states.FAILURE:
        if throw:
            raise tracer.exception  # type: ignore[misc]
        return EagerResult(task_id, tracer.exception, states.FAILURE, outcome.traceback,
                           name=task.name, app=task.app)
    if outcome.state == states.SUCCESS:
        for callback in _as_list(link):
            callback_sig = _as_sig(callback, task.app)
            callback_sig.apply((tracer.value,) if not callback_sig.immutable else ())
    return EagerResult(task_id, tracer.value, outcome.state, outcome.traceback,
                       name=task.name, app=task.app)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_sig(value: Any, app: Any) -> Any:
    from .canvas import maybe_signature
    return maybe_signature(value, app=app)


__all__ = ["Outcome", "Tracer", "build_context", "apply_eagerly", "backoff_countdown",
           "format_traceback", "ExceptionInfo", "run_coroutine"]
