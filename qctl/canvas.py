"""Signatures and the follow-up tasks a worker sends (link callbacks, errbacks, chains).

A ``Signature`` is a dict in Celery's JSON shape (``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``) so it travels inside messages unchanged.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable


class Signature(dict):
    """A task call packed up to be sent later: ``add.s(2, 2)``."""

    def __init__(self, task: Any = None, args: Iterable[Any] | None = None,
                 kwargs: dict | None = None, options: dict | None = None,
                 subtask_type: str | None = None, immutable: bool = False,
                 app: Any = None, **ex: Any) -> None:
        if isinstance(task, dict) and args is None and kwargs is None:
            data = dict(task)
            super().__init__(task=data.get("task"), args=list(data.get("args") or ()),
                             kwargs=dict(data.get("kwargs") or {}),
                             options=dict(data.get("options") or {}),
                             subtask_type=data.get("subtask_type"),
                             immutable=bool(data.get("immutable", False)))
        else:
            name = task if isinstance(task, str) or task is None else task.name
            super().__init__(task=name, args=list(args or ()), kwargs=dict(kwargs or {}),
                             options=dict(options or {}, **ex), subtask_type=subtask_type,
                             immutable=immutable)
        self._app = app if app is not None else (getattr(task, "app", None) if not isinstance(task, (str, dict)) else None)

    # dict keys as attributes, as Celery offers them
    task = property(lambda self: self["task"])
    name = task
    args = property(lambda self: tuple(self["args"]))
    kwargs = property(lambda self: self["kwargs"])
    options = property(lambda self: self["options"])
    subtask_type = property(lambda self: self["subtask_type"])
    immutable = property(lambda self: self["immutable"])

    @property
    def app(self) -> Any:
        if self._app is None:
            from .app import current_app
            self._app = current_app()
        return self._app

    @property
    def type(self) -> Any:
        return self.app.tasks[self["task"]]

    @property
    def id(self) -> str | None:
        return self["options"].get("task_id")

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]] +
                         [f"{k}={v!r}" for k, v in self["kwargs"].items()])
        return f"{self['task']}({args}){'!' if self['immutable'] else ''}"

    def _merge(self, args: Iterable[Any] = (), kwargs: dict | None = None,
               options: dict | None = None) -> tuple[tuple, dict, dict]:
        opts = dict(self["options"], **(options or {}))
        if self["immutable"]:
            return tuple(self["args"]), dict(self["kwargs"]), opts
        return (tuple(args) + tuple(self["args"]), dict(self["kwargs"], **(kwargs or {})), opts)

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> "Signature":
        """A copy with ``args`` prepended, ``kwargs`` merged and ``options`` overridden."""
        new_args, new_kwargs, new_options = self._merge(args or (), kwargs, options)
        sig = Signature(self["task"], new_args, new_kwargs, new_options,
                        self["subtask_type"], self["immutable"], app=self._app)
        return sig

    partial = clone

    def set(self, immutable: bool | None = None, **options: Any) -> "Signature":
        if immutable is not None:
            self["immutable"] = immutable
        self["options"].update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Any) -> Any:
        self["options"].setdefault("link", []).append(callback)
        return callback

    def on_error(self, errback: Any) -> Any:
        self["options"].setdefault("link_error", []).append(errback)
        return errback

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    **options: Any) -> Any:
        new_args, new_kwargs, opts = self._merge(args or (), kwargs, options)
        task = self.app.tasks.get(self["task"])
        if task is not None:
            return task.apply_async(new_args, new_kwargs, **opts)
        return self.app.send_task(self["task"], new_args, new_kwargs, **opts)

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        new_args, new_kwargs, opts = self._merge(args or (), kwargs, options)
        return self.type.apply(new_args, new_kwargs, **opts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        new_args, new_kwargs, _ = self._merge(args, kwargs)
        return self.type(*new_args, **new_kwargs)

    def __or__(self, other: Any) -> Any:
        return chain(self, other)

    def __json__(self) -> dict:
        return dict(self)

    def __reduce__(self) -> Any:
        return (Signature, (dict(self),))


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """``signature('proj.add', (2, 2))`` or ``signature(dict_from_a_message)``."""
    app = kwargs.pop("app", None)
    if isinstance(varies, dict) and not args and not kwargs:
        return varies if isinstance(varies, Signature) else Signature(varies, app=app)
    return Signature(varies, *args, app=app, **kwargs)


subtask = signature


def maybe_signature(value: Any, app: Any = None) -> Signature | None:
    if value is None:
        return None
    if isinstance(value, Signature):
        if app is not None and value._app is None:
            value._app = app
        return value
    return Signature(value, app=app)


class chain(Signature):
    """Tasks run one after the other, each result prepended to the next one's args."""

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and isinstance(tasks[0], (list, tuple)) and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])
        flat: list[Signature] = []
        for t in tasks:
            if isinstance(t, chain):
                flat.extend(t.tasks)
            else:
                flat.append(maybe_signature(t, app))  # type: ignore[arg-type]
        super().__init__("celery.chain", (), {"tasks": [dict(t) for t in flat]}, options,
                         subtask_type="chain", app=app or (flat[0]._app if flat else None))
        self.tasks = flat

    def __or__(self, other: Any) -> "chain":
        return chain(*self.tasks, other, app=self._app)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    **options: Any) -> Any:
        from .result import AsyncResult
        tasks = [t.clone() for t in self.tasks]
        if not tasks:
            return None
        results = []
        parent = None
        for t in tasks:
            t["options"].setdefault("task_id", str(uuid.uuid4()))
            result = AsyncResult(t["options"]["task_id"], app=self.app, parent=parent)
            results.append(result)
            parent = result
        first, rest = tasks[0], tasks[1:]
        rest_reversed = [dict(t) for t in reversed(rest)]
        first.apply_async(args, kwargs, chain=rest_reversed or None, **options)
        return results[-1]

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None, **options: Any) -> Any:
        result = None
        for i, t in enumerate(self.tasks):
            result = t.apply((args or ()) if i == 0 else (result.get(),), kwargs if i == 0 else None)
        return result


def result_from_tuple(value: Any, app: Any = None) -> Any:
    from .result import AsyncResult, GroupResult
    if value is None:
        return None
    (id_, parent), nodes = value
    parent_result = result_from_tuple(parent, app) if parent else None
    if nodes is not None:
        return GroupResult(id_, [result_from_tuple(n, app) for n in nodes], parent=parent_result, app=app)
    return AsyncResult(id_, app=app, parent=parent_result)


def xmap(sig: Signature, it: Iterable[Any], app: Any = None) -> Any:
    raise NotImplementedError("map() arrives with the canvas")


def xstarmap(sig: Signature, it: Iterable[Any], app: Any = None) -> Any:
    raise NotImplementedError("starmap() arrives with the canvas")


def chunks(sig: Signature, it: Iterable[Any], n: int, app: Any = None) -> Any:
    raise NotImplementedError("chunks() arrives with the canvas")


def group(*tasks: Any, **options: Any) -> Any:
    raise NotImplementedError("group() arrives with the canvas")


def chord(header: Any, body: Any = None, **options: Any) -> Any:
    raise NotImplementedError("chord() arrives with the canvas")
