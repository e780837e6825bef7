"""Task routing: ``Exchange``/``Queue``/``Binding`` declarations and the ``Router``.

``Router.route()`` turns the options of one task call into its final destination (``queue``,
``exchange``, ``routing_key``) following Celery's ``task_routes`` rules; ``resolve_exchange()``
emulates AMQP exchanges (direct, topic, fanout) for brokers that have none (sqlite, memory).
``select_queues()``/``parse_queue_list()`` implement the worker's ``-Q``/``-X`` options.
Standard library only.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from itertools import accumulate
from typing import Any, Callable, Iterable, Mapping

from .exceptions import ImproperlyConfigured, QueueNotFound

EXCHANGE_TYPES = ("direct", "topic", "fanout")
#: Task attributes used as defaults when neither a route nor the call sets them.
TASK_DEFAULT_KEYS = ("queue", "exchange", "routing_key", "priority")


class _Declaration:
    """Equality, hashing and repr shared by the declarations, all derived from ``as_dict()``."""

    DEFAULTS: dict[str, Any] = {}

    def _defaults(self) -> dict[str, Any]:
        """``as_dict()`` values that ``repr`` leaves out."""
        return self.DEFAULTS

    def __eq__(self, other: object) -> bool:
        return self.as_dict() == other.as_dict() if type(other) is type(self) else NotImplemented

    def __hash__(self) -> int:
        return hash((type(self).__name__, getattr(self, "name", None)))

    def __repr__(self) -> str:
        first, *rest = self.as_dict().items()
        defaults, missing = self._defaults(), object()
        shown = "".join(f", {k}={getattr(self, k)!r}" for k, v in rest if defaults.get(k, missing) != v)
        return f"{type(self).__name__}({getattr(self, first[0])!r}{shown})"


class Exchange(_Declaration):
    """An AMQP exchange: messages are published to it and its type picks the bound queues."""

    DEFAULTS = {"type": "direct", "durable": True, "auto_delete": False, "arguments": {}}

    def __init__(self, name: str = "", type: str = "direct", durable: bool = True,  # noqa: A002
                 auto_delete: bool = False, arguments: dict[str, Any] | None = None) -> None:
        if not isinstance(name, str):
            raise ImproperlyConfigured(f"exchange name must be a string, not {name!r}")
        if type not in EXCHANGE_TYPES:
            raise ImproperlyConfigured(f"unknown exchange type {type!r} (known: {', '.join(EXCHANGE_TYPES)})")
        self.name, self.type, self.durable, self.auto_delete = name, type, durable, auto_delete
        self.arguments = dict(arguments or {})

    def as_dict(self) -> dict[str, Any]:
        """The declaration as plain data (JSON-safe)."""
        return {"name": self.name, "type": self.type, "durable": self.durable,
                "auto_delete": self.auto_delete, "arguments": dict(self.arguments)}


class Binding(_Declaration):
    """One binding of a queue to an exchange with a routing (binding) key, as kombu's ``binding``."""

    DEFAULTS = {"arguments": {}}

    def __init__(self, exchange: Exchange | str, routing_key: str = "",
                 arguments: dict[str, Any] | None = None) -> None:
        self.exchange = _coerce(Exchange, exchange)
        self.routing_key = routing_key or ""
        self.arguments = dict(arguments or {})

    def as_dict(self) -> dict[str, Any]:
        """The binding as plain data."""
        return {"exchange": self.exchange.as_dict(), "routing_key": self.routing_key,
                "arguments": dict(self.arguments)}


binding = Binding  # kombu's spelling


class Queue(_Declaration):
    """A named queue bound to an exchange. Defaults as Celery's missing queues: a direct
    ``Exchange(name)`` and ``routing_key=name``. ``bindings`` adds further bindings; when they
    are given and ``exchange`` is not, only they bind the queue."""

    def __init__(self, name: str, exchange: Exchange | str | None = None, routing_key: str | None = None,
                 durable: bool = True, exclusive: bool = False, auto_delete: bool = False,
                 queue_arguments: dict[str, Any] | None = None, max_priority: int | None = None,
                 bindings: Iterable[Binding | Mapping[str, Any] | tuple] | None = None) -> None:
        if not name or not isinstance(name, str):
            raise ImproperlyConfigured(f"a queue needs a non-empty string name, not {name!r}")
        self.name = name
        self.bindings = [_coerce(Binding, b) for b in bindings or ()]
        self._bound_to_exchange = exchange is not None or not self.bindings
        self.exchange = _coerce(Exchange, name if exchange is None else exchange)
        self.routing_key = name if routing_key is None else routing_key
        self.durable, self.exclusive, self.auto_delete = durable, exclusive, auto_delete
        self.queue_arguments = dict(queue_arguments or {})
        self.max_priority = self.queue_arguments.get("x-max-priority") if max_priority is None else max_priority

    def all_bindings(self) -> list[Binding]:
        """Every (exchange, key) this queue is bound with, the main binding first."""
        main = [Binding(self.exchange, self.routing_key)] if self._bound_to_exchange else []
        return main + self.bindings

    def declare_arguments(self) -> dict[str, Any]:
        """``queue_arguments`` plus ``x-max-priority`` when ``max_priority`` is set."""
        extra = {} if self.max_priority is None else {"x-max-priority": self.max_priority}
        return {**self.queue_arguments, **extra}

    def as_dict(self) -> dict[str, Any]:
        """The declaration as plain data (JSON-safe; ``Queue(**q.as_dict())`` rebuilds it)."""
        exchange = self.exchange.as_dict() if self._bound_to_exchange else None
        return {"name": self.name, "exchange": exchange, "routing_key": self.routing_key,
                "durable": self.durable, "exclusive": self.exclusive, "auto_delete": self.auto_delete,
                "queue_arguments": dict(self.queue_arguments), "max_priority": self.max_priority,
                "bindings": [b.as_dict() for b in self.bindings]}

    def _defaults(self) -> dict[str, Any]:
        """Constructor defaults."""
        exchange = Exchange(self.name).as_dict() if self._bound_to_exchange else None
        return {"exchange": exchange, "routing_key": self.name, "durable": True,
                "exclusive": False, "auto_delete": False, "queue_arguments": {}, "max_priority": None,
                "bindings": []}


def _coerce(cls: type, value: Any) -> Any:
    """An instance of ``cls`` from an instance, an ``as_dict()`` mapping, a tuple of arguments or a name."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    return cls(*value) if isinstance(value, (tuple, list)) else cls(value)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic match: ``*`` is one dot-separated word, ``#`` zero or more words."""
    pat = pattern.split(".") if pattern else []
    words = routing_key.split(".") if routing_key else []
    # reachable[j]: the pattern prefix seen so far can match words[:j]
    reachable = [True] + [False] * len(words)
    for token in pat:
        if token == "#":
            nxt = list(accumulate(reachable, lambda seen, ok: seen or ok))
        else:
            nxt = [False] + [reachable[j] and (token == "*" or token == words[j]) for j in range(len(words))]
        reachable = nxt
    return reachable[-1]


def parse_queue_list(value: Any) -> list[str]:
    """Queue names from ``"a,b"``, lists of such strings, ``Queue`` objects or a mapping's keys;
    blanks dropped, duplicates removed, order kept."""
    if value is None:
        return []
    if isinstance(value, Queue):
        return [value.name]
    if isinstance(value, str):
        return list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    names: list[str] = []
    for item in value:  # a list, tuple, set or mapping (its keys)
        names.extend(parse_queue_list(item))
    return list(dict.fromkeys(names))


def select_queues(all_queues: Any, include: Any = None, exclude: Any = None) -> list[str]:
    """The queues a worker consumes: only ``include`` (``-Q``, even unknown ones) when given,
    else ``all_queues``; minus ``exclude`` (``-X``)."""
    names = parse_queue_list(include) or parse_queue_list(all_queues)
    skip = set(parse_queue_list(exclude))
    return [n for n in names if n not in skip]


def _is_pair(entry: Any) -> bool:
    """True for one ``(pattern, route)`` pair (rather than a list of pairs)."""
    return (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, re.Pattern))
            and isinstance(entry[1], (str, Mapping, Queue, type(None))))


def _as_route(value: Any, source: Any) -> dict[str, Any] | None:
    """A route dict from what a router returned (dict, queue name, ``Queue``, or None)."""
    if not value:
        return None
    if isinstance(value, (str, Queue)):
        return {"queue": value}
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None} or None
    raise ImproperlyConfigured(f"router {source!r} returned {value!r}: expected a dict, a queue name or None")


class MapRoute:
    """Routes by task name: exact names first, then glob (fnmatch) and regex patterns in order."""

    def __init__(self, mapping: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        self.exact: dict[str, Any] = {}
        self.patterns: list[tuple[Callable[[str], Any], Any]] = []
        for pair in items:
            try:
                key, route = pair
            except (TypeError, ValueError):
                raise ImproperlyConfigured(f"task_routes: expected a (pattern, route) pair, got {pair!r}") from None
            if isinstance(key, re.Pattern):
                self.patterns.append((key.match, route))
            elif not isinstance(key, str):
                raise ImproperlyConfigured(f"task_routes: pattern {key!r} is neither a string nor a regex")
            elif any(c in key for c in "*?["):
                self.patterns.append((lambda name, _p=key: fnmatch.fnmatchcase(name, _p), route))
            else:
                self.exact[key] = route

    def __call__(self, name: str, args: Any = (), kwargs: Any = None, options: Any = None,
                 task: Any = None, **kw: Any) -> dict[str, Any] | None:
        """The route of the first matching entry, or None."""
        candidates = [self.exact[name]] if name in self.exact else []
        candidates += [route for matches, route in self.patterns if matches(name)]
        for found in (_as_route(route, self) for route in candidates):
            if found:
                return found
        return None


class CallableRoute:
    """Adapts a router callable: called as ``(name, args, kwargs, options, task=task)``, or with
    fewer positional arguments (4, 3, 2 or just the name) when its signature takes fewer.
    Pre-4.0 routers (objects or classes with ``route_for_task(name, args, kwargs)``) work too."""

    FORMS = ((4, True), (4, False), (3, False), (2, False), (1, False))

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn() if inspect.isclass(fn) and hasattr(fn, "route_for_task") else fn
        self.form: tuple[int, bool] | None = (3, False) if hasattr(self.fn, "route_for_task") else None

    def _pick_form(self) -> tuple[int, bool]:
        """The longest call form the callable's signature accepts."""
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError):  # no signature (some builtins): assume the full form
            return self.FORMS[0]
        for count, with_task in self.FORMS:
            try:
                sig.bind(*range(count), **({"task": None} if with_task else {}))
                return (count, with_task)
            except TypeError:
                pass
        raise ImproperlyConfigured(f"router {self.fn!r} cannot be called as (name, args, kwargs, options, task=)")

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> dict[str, Any] | None:
        """Call the router with as many arguments as it takes."""
        if self.form is None:
            self.form = self._pick_form()
        count, with_task = self.form
        fn, call_args = getattr(self.fn, "route_for_task", self.fn), (name, args, kwargs, options)[:count]
        return _as_route(fn(*call_args, task=task) if with_task else fn(*call_args), self.fn)


def import_object(path: str) -> Any:
    """The object named by ``'pkg.mod:attr'`` or ``'pkg.mod.attr'``."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ImproperlyConfigured(f"not an import path: {path!r} (expected 'pkg.module.name')")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(f"cannot import router {path!r}: {exc}") from exc
    return obj


def expand_route(entry: Any) -> Callable[..., dict[str, Any] | None]:
    """One ``task_routes`` entry as a callable ``(name, args, kwargs, options, task=)``."""
    if isinstance(entry, (MapRoute, CallableRoute)):
        return entry
    if isinstance(entry, Mapping):
        return MapRoute(entry)
    if isinstance(entry, str):  # an import path: imported on first use, so it may import the app
        loaded: list[Callable[..., dict[str, Any] | None]] = []

        def lazy(name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> dict[str, Any] | None:
            if not loaded:
                loaded.append(expand_route(import_object(entry)))
            return loaded[0](name, args, kwargs, options, task=task)
        lazy.path = entry  # type: ignore[attr-defined]
        return lazy
    if isinstance(entry, (list, tuple)):
        return MapRoute([entry] if _is_pair(entry) else entry)
    if callable(entry) or hasattr(entry, "route_for_task"):
        return CallableRoute(entry)
    raise ImproperlyConfigured(f"task_routes: cannot use {entry!r} as a router")


def prepare_routes(routes: Any) -> list[Callable[..., dict[str, Any] | None]]:
    """The ``task_routes`` setting (None, dict, list/tuple of routers, or one router) as callables."""
    entries = [] if routes is None else routes if isinstance(routes, (list, tuple)) else [routes]
    return [expand_route(entry) for entry in entries]


def _name_of(exchange: Exchange | str) -> str:
    """An exchange's name."""
    return exchange.name if isinstance(exchange, Exchange) else str(exchange)


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base`` key by key, except that a new queue alone drops base's
    exchange/routing key and a new exchange alone drops base's queue."""
    out = dict(base)
    if "queue" in top and "exchange" not in top and "routing_key" not in top:
        out.pop("exchange", None)
        out.pop("routing_key", None)
    if "exchange" in top and "queue" not in top:
        out.pop("queue", None)
    out.update(top)
    return out


class Router:
    """Decides where each task message goes (``task_routes``, ``task_queues``, default queue)."""

    def __init__(self, routes: Any = None, queues: Iterable[Queue | str] | Mapping[str, Queue] | None = None,
                 default_queue: str = "celery", create_missing: bool = True,
                 default_exchange: Exchange | str | None = None, default_routing_key: str | None = None) -> None:
        self.routes = prepare_routes(routes)
        self.default_queue = default_queue
        self.create_missing = create_missing
        self.default_exchange = _coerce(Exchange, default_exchange if default_exchange is not None else default_queue)
        self.default_routing_key = default_queue if default_routing_key is None else default_routing_key
        self.queues: dict[str, Queue] = {}
        for queue in (queues.values() if isinstance(queues, Mapping) else queues or ()):
            self.add_queue(queue)
        if not self.queues:  # as Celery: no task_queues means just the default queue
            self.add_queue(self._new_queue(default_queue))

    def _new_queue(self, name: str) -> Queue:
        """A queue created on demand; the default queue gets the default exchange and key."""
        if name == self.default_queue:
            return Queue(name, self.default_exchange, self.default_routing_key)
        return Queue(name)

    def add_queue(self, queue: Queue | str | Mapping[str, Any]) -> Queue:
        """Make ``queue`` known (replacing one of the same name); returns it."""
        queue = _coerce(Queue, queue)
        self.queues[queue.name] = queue
        return queue

    def get_queue(self, queue: Queue | str) -> Queue:
        """The known queue of that name; created when missing if ``create_missing``, else QueueNotFound."""
        if isinstance(queue, Queue):
            return queue
        if queue in self.queues:
            return self.queues[queue]
        if not self.create_missing:
            raise QueueNotFound(f"Queue {queue!r} missing from task_queues")
        return self.add_queue(self._new_queue(queue))

    @property
    def exchanges(self) -> dict[str, Exchange]:
        """The named exchanges the known queues are bound to (name -> Exchange)."""
        return {b.exchange.name: b.exchange for q in self.queues.values()
                for b in q.all_bindings() if b.exchange.name}

    def lookup_route(self, name: str, args: Any = (), kwargs: Any = None, options: Any = None,
                     task: Any = None) -> dict[str, Any] | None:
        """The route of the first router that has one for ``name``, or None."""
        for router in self.routes:
            route = router(name, args, {} if kwargs is None else kwargs, dict(options or {}), task=task)
            if route:
                return {k: v for k, v in route.items() if v is not None}
        return None

    def route(self, options: Mapping[str, Any] | None, name: str, args: Any = (), kwargs: Any = None,
              task: Any = None) -> dict[str, Any]:
        """Final delivery options: call options over route over task defaults over the default queue."""
        opts = dict(options or {})
        given = {k: v for k, v in opts.items() if v is not None}
        route = self.lookup_route(name, args, kwargs, opts, task) or {}
        defaults = {k: getattr(task, k) for k in TASK_DEFAULT_KEYS if getattr(task, k, None) is not None}
        merged = _overlay(_overlay(defaults, route), given)
        queue = self._pick_queue(merged)
        main = queue.all_bindings()[0]  # never empty
        exchange, routing_key = merged.get("exchange"), merged.get("routing_key")
        return {**opts, **merged, "queue": queue,
                "exchange": main.exchange.name if exchange is None else _name_of(exchange),
                "routing_key": main.routing_key if routing_key is None else str(routing_key)}

    def _pick_queue(self, merged: Mapping[str, Any]) -> Queue:
        """The named queue; else the first queue the exchange reaches; else the default queue."""
        if merged.get("queue") is not None:
            return self.get_queue(merged["queue"])
        if merged.get("exchange") is not None:
            exchange, routing_key = _name_of(merged["exchange"]), merged.get("routing_key")
            if exchange == "" and routing_key:
                return self.get_queue(str(routing_key))
            hits = self.resolve_exchange(exchange, "" if routing_key is None else str(routing_key))
            if hits:
                return self.queues[hits[0]]
        return self.get_queue(self.default_queue)

    def resolve_exchange(self, exchange: Exchange | str, routing_key: str) -> list[str]:
        """Names of the known queues a message published to ``exchange`` with ``routing_key`` reaches."""
        name = _name_of(exchange)
        if name == "":
            return [routing_key] if routing_key in self.queues else []
        hits: list[str] = []
        for queue in self.queues.values():
            for b in queue.all_bindings():
                if b.exchange.name != name:
                    continue
                kind = b.exchange.type
                if (kind == "fanout" or (kind == "direct" and b.routing_key == routing_key)
                        or (kind == "topic" and topic_matches(b.routing_key, routing_key))):
                    hits.append(queue.name)
                    break
        return hits

