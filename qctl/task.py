"""The Task base class: calling (delay/apply_async/apply/__call__), retry, update_state, handlers.

A task is a class with a ``run`` method; ``@app.task`` builds one such class per function
and registers its single instance under the task's name. Running a task (in a worker or
with ``apply()``) is ``qctl.trace``'s job; this module only describes and sends.
"""
from __future__ import annotations

import asyncio
import inspect
import contextvars
from datetime import datetime
from typing import Any, Callable, Iterable

from . import states
from .exceptions import MaxRetriesExceededError, Retry


class Context:
    """``self.request``: what the running task knows about its message."""

    id: str | None = None
    args: list | tuple = ()
    kwargs: dict | None = None
    retries: int = 0
    eta: str | None = None
    expires: str | None = None
    group: str | None = None
    group_index: int | None = None
    chord: Any = None
    root_id: str | None = None
    parent_id: str | None = None
    correlation_id: str | None = None
    hostname: str | None = None
    delivery_info: dict | None = None
    reply_to: str | None = None
    called_directly: bool = True
    timelimit: Any = None
    callbacks: Any = None
    errbacks: Any = None
    chain: Any = None
    headers: dict | None = None
    origin: str | None = None
    is_eager: bool = False
    shadow: str | None = None
    ignore_result: bool = False
    properties: dict | None = None
    stamps: dict | None = None

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"<Context: {self.__dict__!r}>"


class _RequestStack:
    """Per thread *and* per asyncio task (a context variable), so concurrent ``async def``
    tasks on one loop each see their own ``self.request``."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[tuple] = contextvars.ContextVar(f"request:{name}", default=())

    @property
    def stack(self) -> tuple:
        return self._var.get()

    def push(self, context: "Context") -> None:
        self._var.set(self._var.get() + (context,))

    def pop(self) -> None:
        self._var.set(self._var.get()[:-1])


class Task:
    """Base class of every task. Class attributes left ``None`` take the app's setting."""

    app: Any = None
    name: str = None  # type: ignore[assignment]
    typing: bool = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    rate_limit: str | None = None
    ignore_result: bool | None = None
    store_errors_even_if_ignored: bool | None = None
    serializer: str | None = None
    compression: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    reject_on_worker_lost: bool | None = None
    track_started: bool | None = None
    autoretry_for: tuple = ()
    dont_autoretry_for: tuple = ()
    retry_kwargs: dict = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    throws: tuple = ()
    queue: str | None = None
    priority: int | None = None
    expires: Any = None
    abstract: bool = True
    _bound: bool = False
    _is_coroutine: bool = False
    _request_stack: _RequestStack

    _SETTING_DEFAULTS = {
        "ignore_result": "task_ignore_result",
        "store_errors_even_if_ignored": "task_store_errors_even_if_ignored",
        "serializer": "task_serializer",
        "compression": "task_compression",
        "time_limit": "task_time_limit",
        "soft_time_limit": "task_soft_time_limit",
        "acks_late": "task_acks_late",
        "acks_on_failure_or_timeout": "task_acks_on_failure_or_timeout",
        "reject_on_worker_lost": "task_reject_on_worker_lost",
        "track_started": "task_track_started",
        "rate_limit": "task_default_rate_limit",
    }

    def __init__(self) -> None:
        self._request_stack = _RequestStack(type(self).__name__)

    def bind(self, app: Any) -> None:
        """Attach to ``app``: fill unset options from its settings (done once, on registration)."""
        self.app = app
        conf = app.conf
        for attr, setting in self._SETTING_DEFAULTS.items():
            if getattr(self, attr) is None:
                setattr(self, attr, conf.get(setting))
        annotations = conf.get("task_annotations")
        for annotation in _as_list(annotations):
            options = annotation(self) if callable(annotation) else (
                annotation.get(self.name) or annotation.get("*"))
            if options:
                for key, value in options.items():
                    setattr(self, key, value)

    # -- calling --------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task inline in this process (no message, no result stored)."""
        pushed = False
        if not self._request_stack.stack:
            self.push_request(Context(args=args, kwargs=kwargs, called_directly=True))
            pushed = True
        try:
            value = self.run(*args, **kwargs)
            if inspect.iscoroutine(value):
                try:
                    asyncio.get_running_loop()
                    return value
                except RuntimeError:
                    return asyncio.run(value)
            return value
        finally:
            if pushed:
                self.pop_request()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("tasks must define the run method")

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)`` with no options."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    task_id: str | None = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, **options: Any) -> Any:
        """Send the task to the workers; returns an ``AsyncResult``."""
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if self.typing:
            self.check_arguments(args, kwargs)
        app = self.app
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=task_id, link=link, link_error=link_error,
                              **options)
        for key in ("serializer", "compression", "time_limit", "soft_time_limit", "expires",
                    "ignore_result"):
            options.setdefault(key, getattr(self, key))
        if self.priority is not None:
            options.setdefault("priority", self.priority)
        return app.send_task(self.name, args, kwargs, task_id=task_id, link=link,
                             link_error=link_error, shadow=shadow, _task=self, **options)

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              task_id: str | None = None, throw: bool | None = None, **options: Any) -> Any:
        """Run the task here and now, as a worker would, and return an ``EagerResult``."""
        from .trace import apply_eagerly
        if throw is None:
            throw = self.app.conf.task_eager_propagates
        return apply_eagerly(self, tuple(args or ()), dict(kwargs or {}), task_id=task_id,
                             throw=throw, **options)

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """Raise ``TypeError`` at the call site when ``args``/``kwargs`` do not fit ``run``."""
        signature = type(self).__dict__.get("_signature_cache")
        if signature is None:
            try:
                signature = inspect.signature(self.run)
            except (TypeError, ValueError):
                return
            type(self)._signature_cache = signature  # type: ignore[attr-defined]
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None

    # -- inside a running task ------------------------------------------------------------

    @property
    def request(self) -> Context:
        stack = self._request_stack.stack
        return stack[-1] if stack else Context()

    def push_request(self, context: Context | None = None, **fields: Any) -> None:
        self._request_stack.push(context or Context(**fields))

    def pop_request(self) -> None:
        self._request_stack.pop()

    def retry(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              exc: BaseException | None = None, throw: bool = True, eta: datetime | None = None,
              countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Retry:
        """Send this task again to run later, then raise ``Retry`` (unless ``throw=False``).

        Raises ``exc`` (or ``MaxRetriesExceededError``) once ``max_retries`` is spent.
        """
        request = self.request
        if request.called_directly:
            if exc is not None:
                raise exc
            raise Retry("Task can be retried", None)
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}")
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        delivery = request.delivery_info or {}
        send_options = {
            "task_id": request.id, "retries": request.retries + 1, "countdown": countdown,
            "eta": eta, "root_id": request.root_id, "parent_id": request.id,
            "group_id": request.group, "group_index": request.group_index,
            "chord": request.chord, "chain": request.chain,
            "link": request.callbacks, "link_error": request.errbacks,
            "expires": request.expires, "shadow": request.shadow,
            "reply_to": request.reply_to,  # rpc:// results go back to the original caller
            "time_limit": (request.timelimit or [None, None])[0],
            "soft_time_limit": (request.timelimit or [None, None])[1],
            "priority": (delivery.get("priority") if delivery else None),
        }
        if delivery.get("routing_key") and "queue" not in options:
            send_options["queue"] = delivery["routing_key"]
        send_options.update(options)
        new_args = request.args if args is None else args
        new_kwargs = request.kwargs if kwargs is None else kwargs
        if request.is_eager:
            from .trace import apply_eagerly
            value = apply_eagerly(self, tuple(new_args), dict(new_kwargs or {}),
                                  task_id=request.id, retries=request.retries + 1, throw=False)
            raise Retry(exc=exc, when=countdown, eager_result=value)
        send_options = {k: v for k, v in send_options.items() if v is not None}
        self.app.send_task(self.name, tuple(new_args), dict(new_kwargs or {}), _task=self,
                           **send_options)
        retry = Retry(exc=exc, when=eta or countdown)
        if throw:
            raise retry
        return retry

    def update_state(self, task_id: str | None = None, state: str | None = None,
                     meta: Any = None, **kwargs: Any) -> None:
        """Store a state (custom ones such as PROGRESS included) for this or another task."""
        task_id = task_id or self.request.id
        if task_id is None:
            return
        self.app.backend.store_result(task_id, {
            "status": state or states.PENDING, "result": meta, "traceback": None,
            "children": [], "date_done": None, "task_id": task_id})

    # -- handlers (override in a base class) ----------------------------------------------

    def on_success(self, retval: Any, task_id: str, args: tuple, kwargs: dict) -> None:
        """Called in the worker after the task returned."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict,
                   einfo: Any) -> None:
        """Called in the worker after the task raised."""

    def on_retry(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict,
                 einfo: Any) -> None:
        """Called in the worker when the task is to be retried."""

    def after_return(self, status: str, retval: Any, task_id: str, args: tuple, kwargs: dict,
                     einfo: Any) -> None:
        """Called in the worker after any of the above."""

    # -- canvas ---------------------------------------------------------------------------

    def signature(self, args: Iterable[Any] | None = None, *starargs: Any, **starkwargs: Any) -> Any:
        """``signature(args, kwargs, **options)``: this task's call, to be sent later."""
        from .canvas import signature
        starkwargs.setdefault("app", self.app)
        return signature(self, args, *starargs, **starkwargs)

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Any:
        """A signature with these (partial) arguments: ``add.s(2)``."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Any:
        """An immutable signature: arguments given when it is applied are ignored."""
        return self.signature(args, kwargs, immutable=True)

    def map(self, it: Iterable[Any]) -> Any:
        """One ``celery.map`` task calling this task on each item of ``it``."""
        from .canvas_group import xmap
        return xmap(self.s(), it, app=self.app)

    def starmap(self, it: Iterable[Any]) -> Any:
        """One ``celery.starmap`` task calling this task with each item of ``it`` as args."""
        from .canvas_group import xstarmap
        return xstarmap(self.s(), it, app=self.app)

    def chunks(self, it: Iterable[Any], n: int) -> Any:
        """``it`` split into ``celery.starmap`` tasks of ``n`` items each (a group)."""
        from .canvas_group import chunks
        return chunks(self.s(), it, n, app=self.app)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        from .result import AsyncResult
        return AsyncResult(task_id, app=self.app, task_name=self.name, **kwargs)

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def task_class_from_function(fun: Callable[..., Any], base: type, name: str, bind: bool,
                             options: dict[str, Any]) -> type:
    """The Task subclass ``@app.task`` builds around a function."""
    run = fun if bind else staticmethod(fun)
    attrs = {
        "name": name, "run": run, "_bound": bind, "__doc__": fun.__doc__,
        "__module__": fun.__module__, "__wrapped__": fun, "__qualname__": name,
        "_is_coroutine": inspect.iscoroutinefunction(fun), "abstract": False,
        "_signature_cache": None,
    }
    for key, value in options.items():
        attrs[key] = value
    return type(fun.__name__, (base,), attrs)
