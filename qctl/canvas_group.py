"""Groups, chords, chunks and map/starmap, and the ``celery.*`` built-in tasks they rely on.

A group sends its members at once, each with ``group_id`` and its ``group_index``; its
result is a ``GroupResult`` in member order. A chord is a group (the *header*) whose members
each carry the *body*: the result backend counts the header's parts and the worker that
completes the count sends the body with the list of values (``qctl.followups``). The client
sets the count (``backend.chord_set_size``) before sending any header task.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable

from .canvas import (_BY_NAME, _TYPES, Signature, _Nested, _as_list, _chain_or_single, _drop_none,
                     _has_failed, chain, maybe_signature, root_of)


def _listed(tasks: tuple) -> list:
    """``group(a, b)``, ``group([a, b])`` and ``group(generator)`` all mean the same."""
    if len(tasks) == 1 and not isinstance(tasks[0], (dict, str)) and hasattr(tasks[0], "__iter__"):
        return list(tasks[0])
    return list(tasks)


class group(_Nested):
    """Signatures applied in parallel: ``group(add.s(1, 1), add.s(2, 2))`` or
    ``group(add.s(i, i) for i in range(10))``. A group nested in a group is unrolled into it."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        items = _listed(tasks)
        if len(items) == 1 and isinstance(items[0], group):
            items = items[0].tasks
        members = [maybe_signature(t, app) for t in items]
        app = app or next((m._app for m in members if m._app is not None), None)
        super().__init__("celery.group", (), {"tasks": members}, options,
                         subtask_type="group", app=app)

    def __len__(self) -> int:
        """The number of members, as Celery's ``len(group)`` (not the dict's size)."""
        return len(self["kwargs"].get("tasks") or ())

    def __bool__(self) -> bool:
        return True  # an empty group is still a group to apply

    def _own_kwargs(self) -> dict:
        return {k: v for k, v in self["kwargs"].items() if k != "tasks"}

    def _set_own_kwargs(self, kwargs: dict) -> None:
        self["kwargs"] = {"tasks": self["kwargs"].get("tasks", []), **kwargs}

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chord(self, other, app=self._app)
        return NotImplemented

    def link(self, callback: Any) -> Any:
        """As Celery: linked to the first member only. Use a chord to wait for all."""
        callback = maybe_signature(callback, self._app).clone(immutable=True)
        return self.tasks[0].link(callback) if self.tasks else callback

    def link_error(self, errback: Any) -> Any:
        """Added to every member."""
        for member in self.tasks:
            member.link_error(maybe_signature(errback, self._app).clone(immutable=True))
        return errback

    on_error = link_error

    def _unrolled(self) -> list[Signature]:
        """Members with nested groups replaced by their own members (in place)."""
        members: list[Signature] = []
        for member in self.tasks:
            if isinstance(member, group):
                members.extend(member._unrolled())
            else:
                members.append(member)
        self["kwargs"]["tasks"] = members
        return members

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the group id (``options.task_id``) and every member's ids, ``group_id`` and
        ``group_index`` (and ``chord``, for a chord's header), in place; return the
        ``GroupResult``."""
        from .result import GroupResult
        opts = self["options"]
        gid = _id or opts.get("task_id") or str(uuid.uuid4())
        opts["task_id"] = gid
        results = [member.freeze(group_id=gid, chord=chord, root_id=root_id, parent_id=parent_id,
                                 group_index=index)
                   for index, member in enumerate(self._unrolled())]
        return GroupResult(gid, results, app=self.app)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    add_to_parent: bool = True, **options: Any) -> Any:
        """Send every member (``args`` prepended to each mutable one); returns the
        ``GroupResult`` in member order. ``task_id`` sets the group id."""
        options = _drop_none(options)
        if options.get("link") is not None:
            raise TypeError("Cannot add link to group: use a chord")
        if options.get("link_error") is not None:
            raise TypeError("Cannot add link_error to group: do that on individual tasks")
        rest = options.pop("chain", None)
        if rest:  # steps after a group run once all members are done: that is a chord
            body = _chain_or_single([maybe_signature(s, self._app) for s in reversed(rest)], self._app)
            return chord(self, body, app=self._app).apply_async(args, kwargs, **options)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        from .result import GroupResult
        args, kwargs, options = self._merge(args, kwargs, options)
        for key in ("group_id", "group_index", "chord"):
            options.pop(key, None)
        sig = self.clone()
        frozen = sig.freeze(options.pop("task_id", None), root_id=options.get("root_id"))
        results = [member.apply_async(args, kwargs, add_to_parent=False, **options)
                   for member in sig.tasks]
        result = GroupResult(frozen.id, results, app=self.app)
        if add_to_parent:
            _add_to_running_task(result)
        return result

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        """Run every member here, in order (no broker); returns a ``GroupResult`` of eager
        results."""
        from .result import GroupResult
        args, kwargs, options = self._merge(args, kwargs, _drop_none(options))
        sig = self.clone()
        frozen = sig.freeze(options.get("task_id"))
        return GroupResult(frozen.id, [m.apply(args, kwargs) for m in sig.tasks], app=self.app)

    def __call__(self, *partial_args: Any, **options: Any) -> Any:
        """As Celery: calling a group sends it."""
        return self.apply_async(partial_args, **options)


def _add_to_running_task(result: Any) -> None:
    """A group sent from inside a task is listed as one child of that task's result."""
    from .app import _running_request
    parent = _running_request()
    children = getattr(parent, "children", None)
    if children is not None:
        children.append(result)


class chord(Signature):
    """``chord(header, body)``: the body is applied with the list of the header's values
    once every header task has succeeded. Also ``chord(header)(body)``."""

    def __init__(self, header: Any, body: Any = None, task: str = "celery.chord",
                 args: Iterable[Any] | None = None, kwargs: dict | None = None,
                 app: Any = None, **options: Any) -> None:
        header = maybe_signature(header, app) if isinstance(header, dict) else header
        if not isinstance(header, group):
            header = group(header if isinstance(header, Signature) else _listed((header,)), app=app)
        body = maybe_signature(body, app)
        app = app or header._app or (body._app if body is not None else None)
        super().__init__(task, args or (), {"kwargs": dict(kwargs or {}), "header": header,
                                            "body": body}, options, subtask_type="chord", app=app)

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> "chord":
        kwargs = dict(data.get("kwargs") or {})
        sig = cls(kwargs.get("header") or [], kwargs.get("body"), task=data.get("task") or "celery.chord",
                  args=data.get("args"), kwargs=kwargs.get("kwargs"), app=app,
                  **dict(data.get("options") or {}))
        sig["immutable"] = bool(data.get("immutable", False))
        return sig

    @property
    def header(self) -> group:
        header = self["kwargs"]["header"]
        if not isinstance(header, group) or header._app is None:
            header = self["kwargs"]["header"] = (
                maybe_signature(header, self._app) if isinstance(header, dict)
                else group(header, app=self._app))
        return header

    @property
    def tasks(self) -> list[Signature]:
        return self.header.tasks

    @property
    def body(self) -> Signature | None:
        body = self["kwargs"].get("body")
        if body is not None and (not isinstance(body, Signature) or body._app is None):
            body = self["kwargs"]["body"] = maybe_signature(body, self._app)
        return body

    @body.setter
    def body(self, value: Any) -> None:
        self["kwargs"]["body"] = maybe_signature(value, self._app)

    def _own_kwargs(self) -> dict:
        return self["kwargs"].get("kwargs") or {}

    def _set_own_kwargs(self, kwargs: dict) -> None:
        self["kwargs"]["kwargs"] = kwargs

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(self, other, app=self._app)
        return NotImplemented

    def link(self, callback: Any) -> Any:
        """Called with the body's value."""
        return self.body.link(callback)

    def link_error(self, errback: Any) -> Any:
        """Called when the body fails (also when the chord fails because of its header)."""
        return self.body.link_error(errback)

    on_error = link_error

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the header's group id and every id (in place); return the body's result,
        whose ``.parent`` is the header's ``GroupResult``. ``_id``, and the ``group_id``,
        ``group_index`` and ``chord`` of a group this chord is a member of, go to the body."""
        header, body = self.header, self.body
        gid = header["options"].get("task_id") or str(uuid.uuid4())
        header["options"]["task_id"] = gid
        if body is None:
            return header.freeze(gid, chord=None, root_id=root_id, parent_id=parent_id)
        if group_id and body["subtask_type"] is None:
            # The body counts towards an outer chord under the outer group id. A plain body
            # is sent under this chord's group id when the header completes; a chain keeps
            # the group and index of its last step, so the body travels as a one-step chain.
            body = self["kwargs"]["body"] = chain(body, app=self._app)
        body_result = body.freeze(_id, group_id=group_id or _final_option(body, "group_id") or gid,
                                  chord=chord, root_id=root_id, group_index=group_index)
        header_result = header.freeze(gid, chord=body, root_id=root_id, parent_id=parent_id)
        root_of(body_result).parent = header_result
        return body_result

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    task_id: str | None = None, **options: Any) -> Any:
        """Set the chord's size in the result backend, send the header tasks (each carrying
        the frozen body); return the body's result (``.parent`` is the header's). An empty
        header sends the body at once with ``[]``."""
        from .result import GroupResult
        options = _drop_none(options)
        task_id = task_id or options.pop("task_id", None)
        kwargs = dict(kwargs or {})
        body = maybe_signature(kwargs.pop("body", None), self._app)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, body=body, task_id=task_id, **options)
        args, kwargs, options = self._merge(args, kwargs, options)
        # Only a task_id given now names the body: Celery stores the header's group id as
        # the chord's own task_id, and a body it froze already has its id.
        options.pop("task_id", None)
        sig = self.clone()
        if body is not None:
            sig.body = body.clone()
        if sig.body is None:
            raise TypeError("a chord needs a body: chord(header, body) or chord(header)(body)")
        rest = options.pop("chain", None)
        if rest:
            sig.body = _chain_or_single([sig.body] + [maybe_signature(s, self._app)
                                                      for s in reversed(rest)], self._app)
        outer = {key: options.pop(key, None) for key in ("group_id", "group_index", "chord")}
        links, errbacks = options.pop("link", None), options.pop("link_error", None)
        options.pop("add_to_parent", None)
        sig.body["options"].update({k: v for k, v in options.items()
                                    if k not in ("root_id", "parent_id")})
        for callback in _as_list(links):
            sig.body.link(callback)
        for errback in _as_list(errbacks):
            sig.body.link_error(errback)
        body_result = sig.freeze(task_id, root_id=options.get("root_id"), **outer)
        header = sig.header
        members = header.tasks
        if members:
            _set_chord_size(self.app, header.id, len(members))
            results = [m.apply_async(args, kwargs, **options) for m in members]
        else:
            sig.body.apply_async(([],), **{k: v for k, v in options.items()
                                           if k in ("root_id", "parent_id")})
            results = []
        root_of(body_result).parent = GroupResult(header.id, results, app=self.app)
        return body_result

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              body: Any = None, task_id: str | None = None, **options: Any) -> Any:
        """Run the header here, then the body with the list of values (no broker). If a
        header task failed, the body does not run and its result is a ``ChordError``."""
        from . import states
        from .exceptions import ChordError
        from .result import EagerResult
        args, kwargs, _ = self._merge(args, kwargs, None)
        body = maybe_signature(body, self._app) or self.body
        if body is None:
            raise TypeError("a chord needs a body: chord(header, body) or chord(header)(body)")
        header_result = self.header.clone().apply(args, kwargs)
        failed = next((r for r in _leaves(header_result) if _has_failed(r)), None)
        if failed is not None:
            exc = failed.result if isinstance(failed.result, BaseException) else Exception(failed.result)
            result = EagerResult(task_id or body.clone().freeze().id,
                                 ChordError(f"Dependency {failed.id} raised {exc!r}"),
                                 states.FAILURE, app=self.app)
        else:
            values = [r.get() for r in header_result.results]
            result = body.apply((values,), **({"task_id": task_id} if task_id else {}))
        root_of(result).parent = header_result
        return result

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(body)``: send the chord with ``body``."""
        return self.apply_async((), {"body": body} if body is not None else {}, **options)


def _leaves(result: Any) -> list[Any]:
    members = getattr(result, "results", None)
    if members is None:
        return [result]
    return [leaf for member in members for leaf in _leaves(member)]


def _final_option(sig: Signature, key: str) -> Any:
    """An option of the task whose result is the canvas's result (a chain's last step)."""
    if isinstance(sig, chain):
        return _final_option(sig.tasks[-1], key) if sig.tasks else None
    if isinstance(sig, chord):
        return _final_option(sig.body, key) if sig.body is not None else None
    return sig["options"].get(key)


def ensure_chords_allowed(app: Any) -> None:
    """Raise ``ImproperlyConfigured`` if the result backend cannot count a chord's parts
    (rpc:// keeps results in the client only; disabled:// keeps none)."""
    from .exceptions import ImproperlyConfigured
    backend = app.backend
    if not getattr(backend, "persistent", True):
        scheme = str(getattr(backend, "url", "") or "").split("://", 1)[0] or type(backend).__name__
        raise ImproperlyConfigured("chords need a result backend that can count: sqlite, redis "
                                   f"or memory — {scheme}:// cannot")


def _set_chord_size(app: Any, group_id: str, size: int) -> None:
    from .exceptions import ImproperlyConfigured
    ensure_chords_allowed(app)
    try:
        app.backend.chord_set_size(group_id, size)
    except NotImplementedError:
        raise ImproperlyConfigured(
            f"chords need a result backend that can count: sqlite, redis or memory "
            f"({app.safe_result_backend} cannot)") from None


class chunks(Signature):
    """``task.chunks(items, n)``: the items split into groups of ``n``, each run as one
    ``celery.starmap`` task; applying it returns the ``GroupResult`` (a list of lists)."""

    def __init__(self, task: Any, it: Iterable[Any], n: int, app: Any = None,
                 **options: Any) -> None:
        task = maybe_signature(task, app)
        if int(n) < 1:
            raise ValueError(f"chunks need a positive size, not {n!r}")
        super().__init__("celery.chunks", (), {"task": task, "it": list(it), "n": int(n)},
                         options, immutable=True, app=app or task._app)

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> "chunks":
        kwargs = data.get("kwargs") or {}
        return cls(kwargs["task"], kwargs.get("it") or [], kwargs.get("n") or 1, app=app,
                   **dict(data.get("options") or {}))

    def group(self) -> group:
        """The group of ``celery.starmap`` tasks, one per chunk."""
        task = maybe_signature(self["kwargs"]["task"], self._app)
        items, n = list(self["kwargs"]["it"]), int(self["kwargs"]["n"])
        return group([xstarmap(task, items[i:i + n], app=self._app) for i in range(0, len(items), n)],
                     app=self._app)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    **options: Any) -> Any:
        return self.group().apply_async(None, None, **dict(self["options"], **options))

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        return self.group().apply(None, None, **options)

    def __call__(self, **options: Any) -> Any:
        return self.apply_async(**options)

    def __repr__(self) -> str:
        task = self["kwargs"]["task"]
        return f"{task.get('task')}.chunks({len(self['kwargs']['it'])} items, n={self['kwargs']['n']})"


class xmap(Signature):
    """``task.map(items)``: one ``celery.map`` task calling the task on each item; its value
    is the list of results."""

    builtin = "celery.map"

    def __init__(self, task: Any, it: Iterable[Any], app: Any = None, **options: Any) -> None:
        task = maybe_signature(task, app)
        super().__init__(self.builtin, (), {"task": task, "it": list(it)}, options,
                         immutable=True, app=app or task._app)

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> "xmap":
        kwargs = data.get("kwargs") or {}
        return cls(kwargs["task"], kwargs.get("it") or [], app=app, **dict(data.get("options") or {}))

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    **options: Any) -> Any:
        """Routed as the mapped task would be (its name picks the queue)."""
        options.setdefault("route_name", maybe_signature(self["kwargs"]["task"], self._app)["task"])
        return super().apply_async((), {}, **options)

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        if self.builtin not in self.app.tasks:
            register_builtins(self.app)
        return super().apply((), {}, **options)

    def __repr__(self) -> str:
        return f"[{self['kwargs']['task'].get('task')}(x) for x in {self['kwargs']['it']!r}]"


class xstarmap(xmap):
    """``task.starmap(items)``: like ``map`` with each item spread as the arguments."""

    builtin = "celery.starmap"

    def __repr__(self) -> str:
        return f"[{self['kwargs']['task'].get('task')}(*x) for x in {self['kwargs']['it']!r}]"


_TYPES.update(group=group, chord=chord)
_BY_NAME.update({"celery.chunks": chunks, "celery.map": xmap, "celery.starmap": xstarmap})


def register_builtins(app: Any) -> None:
    """Register the ``celery.*`` tasks that canvas messages name (idempotent): ``celery.map``
    and ``celery.starmap`` (used by map/starmap/chunks) run the signature over the items in
    one task; ``celery.chunks``, ``celery.group``, ``celery.chain`` and ``celery.chord``
    apply a canvas sent to them as a task (Celery's older forms) and return its result tuple."""
    if "celery.map" in app.tasks:
        return

    def xmap_task(task: Any, it: list) -> list:
        sig = maybe_signature(task, app)
        return [sig(item) for item in it]

    def xstarmap_task(task: Any, it: list) -> list:
        sig = maybe_signature(task, app)
        return [sig(*item) for item in it]

    def chunks_task(task: Any, it: list, n: int) -> Any:
        return chunks(task, it, n, app=app).apply_async().as_tuple()

    def group_task(tasks: list, result: Any = None, group_id: str | None = None,
                   partial_args: Any = (), add_to_parent: bool = True) -> Any:
        return group(tasks, app=app).apply_async(partial_args, task_id=group_id).as_tuple()

    def chain_task(*args: Any, tasks: list | None = None, **kwargs: Any) -> Any:
        result = chain(*(tasks or []), app=app).apply_async(args, kwargs)
        return result.as_tuple() if result is not None else None

    def chord_task(header: Any, body: Any, partial_args: Any = (), interval: Any = None,
                   countdown: Any = 1, max_retries: Any = None, eager: bool = False,
                   kwargs: dict | None = None, **options: Any) -> Any:
        return chord(header, body, app=app).apply_async(partial_args, kwargs).as_tuple()

    for name, fun in (("celery.map", xmap_task), ("celery.starmap", xstarmap_task),
                      ("celery.chunks", chunks_task), ("celery.group", group_task),
                      ("celery.chain", chain_task), ("celery.chord", chord_task)):
        app.task(name=name, typing=False)(fun)


__all__ = ["group", "chord", "chunks", "xmap", "xstarmap", "register_builtins",
           "ensure_chords_allowed"]
