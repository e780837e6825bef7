"""The App: settings, the task registry, sending tasks, and the per-process broker connection."""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable

from . import signals
from .conf import Settings, import_object
from .exceptions import ImproperlyConfigured, NotRegistered, OperationalError
from .task import Task, task_class_from_function

logger = logging.getLogger("qctl.app")

_current: list["App"] = []
_lock = threading.Lock()


def current_app() -> "App":
    """The most recently created App, or a default one (embedded broker) if there is none."""
    if not _current:
        with _lock:
            if not _current:
                App("default")
    return _current[-1]


class TaskRegistry(dict):
    """Task name -> Task instance. Looking up a missing name raises ``NotRegistered``."""

    def __missing__(self, key: str) -> Task:
        raise NotRegistered(key)

    def regular(self) -> dict[str, Task]:
        return {name: task for name, task in self.items() if not name.startswith("celery.")}


class App:
    """A qctl application: ``App('proj', broker=..., backend=..., include=[...])``."""

    Task = Task

    def __init__(self, main: str | None = None, broker: str | None = None,
                 backend: str | None = None, include: Iterable[str] | None = None,
                 config_source: Any = None, set_as_current: bool = True,
                 task_cls: type | str | None = None, **settings: Any) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.config_from_object(config_source)
        if broker:
            self.conf["broker_url"] = broker
        if backend:
            self.conf["result_backend"] = backend
        if include:
            self.conf["include"] = list(include)
        self.conf.update(settings)
        if task_cls is not None:
            self.Task = import_object(task_cls) if isinstance(task_cls, str) else task_cls
        self.tasks = TaskRegistry()
        self.on_after_configure = signals.Signal("on_after_configure")
        self.on_after_finalize = signals.Signal("on_after_finalize")
        self._finalized = False
        self._pending_periodic: list[tuple] = []
        self._local = threading.local()
        self._pid = os.getpid()
        self._transport: Any = None
        self._backend: Any = None
        self._conn_lock = threading.Lock()
        self._control: Any = None
        if set_as_current:
            _current.append(self)

    def __repr__(self) -> str:
        return f"<App {self.main or '__main__'}:{id(self):#x}>"

    # -- configuration --------------------------------------------------------------------

    def config_from_object(self, obj: Any, silent: bool = False, force: bool = False,
                           namespace: str | None = None) -> None:
        """Load settings from a module path, ``'module:attr'``, a module, class or dict."""
        try:
            self.conf.load_object(obj, namespace=namespace)
        except (ImportError, AttributeError) as exc:
            if silent:
                return
            raise ImproperlyConfigured(f"cannot load configuration {obj!r}: {exc}") from exc
        self._reset_connections()

    def config_from_envvar(self, variable_name: str, silent: bool = False,
                           force: bool = False) -> bool:
        """``config_from_object(os.environ[variable_name])``."""
        module_name = os.environ.get(variable_name)
        if not module_name:
            if silent:
                return False
            raise ImproperlyConfigured(
                f"The environment variable {variable_name!r} is not set, and as such the "
                "configuration could not be loaded.")
        self.config_from_object(module_name, silent=silent)
        return True

    def finalize(self) -> None:
        """Import ``include``/``imports`` modules and fire ``on_after_configure`` (once)."""
        if self._finalized:
            return
        self._finalized = True
        importlib.import_module("qctl.canvas_group").register_builtins(self)
        for module in list(self.conf.include or []) + list(self.conf.imports or []):
            importlib.import_module(module)
        self.on_after_configure.send(sender=self, source=self.conf)
        self.on_after_finalize.send(sender=self)

    def autodiscover_tasks(self, packages: Iterable[str] | Callable[[], Iterable[str]] | None = None,
                           related_name: str = "tasks", force: bool = False) -> None:
        """Import ``<package>.<related_name>`` for each package that has one."""
        if callable(packages):
            packages = packages()
        for package in packages or ():
            try:
                importlib.import_module(f"{package}.{related_name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{related_name}":
                    raise

    # -- tasks ----------------------------------------------------------------------------

    def gen_task_name(self, name: str, module: str) -> str:
        """``module.name``; a task defined in ``__main__`` takes the app's main name."""
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    def task(self, *args: Any, **options: Any) -> Any:
        """``@app.task`` or ``@app.task(name=..., bind=True, ...)``."""
        def create(fun: Callable[..., Any]) -> Task:
            return self._task_from_fun(fun, **options)
        if len(args) == 1 and callable(args[0]):
            return create(args[0])
        if args:
            raise TypeError("@app.task() takes keyword arguments only")
        return create

    def _task_from_fun(self, fun: Callable[..., Any], name: str | None = None,
                       base: type | None = None, bind: bool = False, **options: Any) -> Task:
        name = name or self.gen_task_name(fun.__name__, fun.__module__)
        if name in self.tasks and getattr(self.tasks[name], "__wrapped__", None) is fun:
            return self.tasks[name]
        cls = task_class_from_function(fun, base or self.Task, name, bind, options)
        task = cls()
        task.bind(self)
        self.tasks[name] = task
        return task

    def register_task(self, task: Task | type) -> Task:
        """Register a class-based task (an instance or the class)."""
        if isinstance(task, type):
            task = task()
        if not task.name:
            task.name = self.gen_task_name(type(task).__name__, type(task).__module__)
        task.bind(self)
        self.tasks[task.name] = task
        return task

    def add_periodic_task(self, schedule: Any, sig: Any, args: tuple = (), kwargs: Any = (),
                          name: str | None = None, **opts: Any) -> str:
        """Add an entry to ``beat_schedule``; ``name`` defaults to the signature's repr."""
        key = name or repr(sig)
        entry = {"task": sig["task"] if isinstance(sig, dict) else sig.name,
                 "schedule": schedule, "args": tuple(sig.get("args", args)) if isinstance(sig, dict) else args,
                 "kwargs": dict(sig.get("kwargs") or {}) if isinstance(sig, dict) else dict(kwargs or {}),
                 "options": dict(sig.get("options") or {}, **opts) if isinstance(sig, dict) else opts}
        schedule_table = dict(self.conf.beat_schedule or {})
        schedule_table[key] = entry
        self.conf["beat_schedule"] = schedule_table
        return key

    # -- sending --------------------------------------------------------------------------

    @property
    def router(self) -> Any:
        router = getattr(self._local, "router", None)
        if router is None or self._local.router_conf != self._router_key():
            from .routing import Router
            conf = self.conf
            router = Router(conf.task_routes, conf.task_queues, default_queue=conf.task_default_queue,
                            create_missing=conf.task_create_missing_queues,
                            default_exchange=conf.task_default_exchange,
                            default_routing_key=conf.task_default_routing_key)
            self._local.router = router
            self._local.router_conf = self._router_key()
        return router

    def _router_key(self) -> tuple:
        conf = self.conf
        return (id(conf.task_routes), id(conf.task_queues), conf.task_default_queue,
                conf.task_create_missing_queues)

    def send_task(self, name: str, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                  countdown: float | None = None, eta: Any = None, task_id: str | None = None,
                  producer: Any = None, connection: Any = None, router: Any = None,
                  result_cls: Any = None, expires: Any = None, publisher: Any = None,
                  link: Any = None, link_error: Any = None, add_to_parent: bool = True,
                  group_id: str | None = None, group_index: int | None = None,
                  retries: int = 0, chord: Any = None, reply_to: str | None = None,
                  time_limit: float | None = None, soft_time_limit: float | None = None,
                  root_id: str | None = None, parent_id: str | None = None,
                  route_name: str | None = None, shadow: str | None = None,
                  chain: Any = None, task_type: Any = None, _task: Task | None = None,
                  **options: Any) -> Any:
        """Send task ``name`` by name (it need not be importable here); returns AsyncResult."""
        from . import protocol
        from .result import AsyncResult
        conf = self.conf
        task_id = task_id or str(uuid.uuid4())
        parent = _running_request()
        if parent is not None and parent.id and (parent_id is None or root_id is None):
            parent_id = parent_id or parent.id
            root_id = root_id or parent.root_id or parent.id
        route = (router or self.router).route(options, route_name or name, args, kwargs, task=_task)
        serializer = options.get("serializer") or conf.task_serializer
        ignore_result = options.get("ignore_result")
        if ignore_result is None:
            ignore_result = conf.task_ignore_result
        if expires is None and _task is not None:
            expires = _task.expires
        envelope = protocol.build_task_message(
            name, args, kwargs, task_id=task_id, countdown=countdown, eta=eta, expires=expires,
            retries=retries, time_limit=time_limit, soft_time_limit=soft_time_limit,
            root_id=root_id, parent_id=parent_id, group_id=group_id, group_index=group_index,
            shadow=shadow, callbacks=_sig_list(link), errbacks=_sig_list(link_error),
            chain=chain, chord=chord, ignore_result=bool(ignore_result),
            headers=options.get("headers"), reply_to=reply_to, priority=route.get("priority"),
            serializer=serializer, compression=options.get("compression") or conf.task_compression)
        on_task_call = getattr(self.backend, "on_task_call", None)
        if on_task_call is not None:  # rpc://: the reply queue must exist before any reply
            try:
                on_task_call(task_id)
            except OperationalError:
                pass  # the broker is down: the publish below retries by policy, then raises
        signals.before_task_publish.send(sender=name, body=None, headers=envelope.headers,
                                         routing_key=route.get("routing_key"))
        self.publish(envelope, route, retry=options.get("retry"),
                     retry_policy=options.get("retry_policy"))
        signals.after_task_publish.send(sender=name, headers=envelope.headers,
                                        routing_key=route.get("routing_key"))
        if conf.task_send_sent_event:
            self._send_sent_event(envelope.headers, route)
        result = (result_cls or AsyncResult)(task_id, app=self, task_name=name)
        children = getattr(parent, "children", None)
        if add_to_parent and children is not None and task_id != getattr(parent, "id", None):
            children.append(result)  # the running task's stored result lists what it sent
        return result

    def publish(self, envelope: Any, route: dict[str, Any], retry: bool | None = None,
                retry_policy: dict[str, Any] | None = None) -> None:
        """Hand ``envelope`` to the broker, retrying by the publish retry policy."""
        from .protocol import parse_iso
        queue = route["queue"]
        exchange = route.get("exchange") or ""
        routing_key = route.get("routing_key") or queue.name
        queue_exchange = getattr(queue, "exchange", None)
        if getattr(queue_exchange, "type", "direct") == "direct" and routing_key == queue.name \
                and exchange in ("", getattr(queue_exchange, "name", "")):
            exchange = ""  # Celery's anonymous exchange: straight to the queue, no binding lookup
        transport = self.transport
        if exchange and hasattr(self.router, "resolve_exchange") and not getattr(transport, "has_exchanges", False):
            names = self.router.resolve_exchange(exchange, routing_key) or [queue.name]
        else:
            names = [queue.name]
        eta = parse_iso(envelope.headers.get("eta"))
        eta_ts = eta.timestamp() if eta else None
        priority = route.get("priority") or 0
        if retry is None:
            retry = self.conf.task_publish_retry
        policy = dict(self.conf.task_publish_retry_policy or {}, **(retry_policy or {}))
        attempts = int(policy.get("max_retries", 3) or 0) if retry else 0
        interval = float(policy.get("interval_start", 0) or 0)
        for attempt in range(attempts + 1):
            try:
                for queue_name in names:
                    transport.publish(queue_name, envelope, priority=priority, eta=eta_ts,
                                      exchange=exchange, routing_key=routing_key)
                return
            except OperationalError as exc:
                if attempt >= attempts:
                    raise OperationalError(f"cannot publish to {self.safe_broker_url}: {exc}") from exc
                time.sleep(interval)
                interval = min(interval + float(policy.get("interval_step", 0.2)),
                               float(policy.get("interval_max", 0.2)))

    def _send_sent_event(self, headers: dict, route: dict) -> None:
        """``task-sent`` on the event exchange (``task_send_sent_event``), in Celery's format."""
        import json
        from .protocol import origin_nodename
        from .transports import ControlMessage
        queue = route["queue"]
        event = {"hostname": origin_nodename(), "utcoffset": -time.timezone / 3600.0,
                 "pid": os.getpid(), "clock": 0, "uuid": headers["id"],
                 "root_id": headers.get("root_id"), "parent_id": headers.get("parent_id"),
                 "name": headers["task"], "args": headers.get("argsrepr"),
                 "kwargs": headers.get("kwargsrepr"), "retries": headers.get("retries"),
                 "eta": headers.get("eta"), "expires": headers.get("expires"),
                 "queue": queue.name, "exchange": route.get("exchange") or "",
                 "routing_key": route.get("routing_key") or queue.name,
                 "timestamp": time.time(), "type": "task-sent"}
        try:
            self.transport.broadcast(self.conf.event_exchange, ControlMessage(
                json.dumps(event).encode(), {"hostname": event["hostname"]}, "task.sent"))
        except OperationalError as exc:  # monitoring must not fail the send itself
            logger.warning("cannot send the task-sent event: %s", exc)

    # -- connections (one set per process) ------------------------------------------------

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # we were forked: the parent's connections are not ours
            self._pid = os.getpid()
            self._transport = None
            self._backend = None

    def _reset_connections(self) -> None:
        self._transport = None
        self._backend = None

    @property
    def transport(self) -> Any:
        """The broker connection of this process (created on first use)."""
        self._check_pid()
        if self._transport is None:
            with self._conn_lock:
                if self._transport is None:
                    from .transports import by_url
                    self._transport = by_url(self.conf.effective_broker_url,
                                             self.conf.broker_transport_options)
        return self._transport

    connection_for_write = transport

    @property
    def backend(self) -> Any:
        """The result backend of this process (created on first use)."""
        self._check_pid()
        if self._backend is None:
            with self._conn_lock:
                if self._backend is None:
                    from .backends import by_url
                    self._backend = by_url(self.conf.effective_result_backend, self,
                                           self.conf.result_backend_transport_options)
        return self._backend

    @property
    def safe_broker_url(self) -> str:
        from .conf import mask_url
        return mask_url(self.conf.effective_broker_url)

    @property
    def safe_result_backend(self) -> str:
        from .conf import mask_url
        return mask_url(self.conf.effective_result_backend)

    def close(self) -> None:
        for conn in (self._transport, self._backend):
            if conn is not None:
                conn.close()
        self._reset_connections()

    # -- accessors ------------------------------------------------------------------------

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        from .result import AsyncResult
        return AsyncResult(task_id, app=self, **kwargs)

    def GroupResult(self, *args: Any, **kwargs: Any) -> Any:
        from .result import GroupResult
        return GroupResult(*args, app=self, **kwargs)

    @property
    def control(self) -> Any:
        if self._control is None:
            from .control import Control
            self._control = Control(self)
        return self._control

    def signature(self, *args: Any, **kwargs: Any) -> Any:
        from .canvas import signature
        return signature(*args, app=self, **kwargs)


def _sig_list(value: Any) -> list | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return [value]
    return list(value)


def _running_request() -> Any:
    from .log import _current_task
    task = _current_task()
    if task is None:
        return None
    request = task.request
    return None if request.called_directly else request
