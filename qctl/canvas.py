"""Signatures and chains: task calls packed up to be sent later, and tasks run one after another.

Every canvas object is a dict in Celery's JSON shape::

    {"task": "proj.add", "args": [2], "kwargs": {}, "options": {}, "subtask_type": null,
     "immutable": false}

so it travels inside task messages unchanged (``link``, ``chain``, ``chord`` in the body) and
``maybe_signature`` turns what a worker receives back into the right class, chosen by
``subtask_type`` (``chain``, ``group``, ``chord``) or, as Celery leaves it null for them, by
the task name (``celery.chunks``, ``celery.map``, ``celery.starmap``). Groups, chords,
chunks and map/starmap live in ``qctl.canvas_group``.

Partial application is Celery's: arguments given when a signature is applied are put
*before* its own (``add.s(2).delay(1)`` is ``add(1, 2)``), keyword arguments are merged and
call options override stored ones -- unless the signature is immutable (``si()``), which
keeps its arguments and takes only the options.
"""
from __future__ import annotations

import copy
import uuid
from typing import Any, Iterable

#: subtask_type -> class; each canvas class registers itself below or in canvas_group.
_TYPES: dict[str | None, type] = {}
#: Celery leaves ``subtask_type`` null for chunks/map/starmap: their task name tells them.
_BY_NAME: dict[str, type] = {}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    return list(value)


def _drop_none(options: dict[str, Any]) -> dict[str, Any]:
    # The worker passes e.g. ``chain=None``; None never overrides a stored option.
    return {key: value for key, value in options.items() if value is not None}


def root_of(result: Any) -> Any:
    """The first result of a frozen workflow: follow ``.parent`` while there is one."""
    node = result
    while getattr(node, "parent", None) is not None:
        node = node.parent
    return node


class Signature(dict):
    """A task call packed up to be sent later: ``add.s(2, 2)``, ``signature('proj.add', (2, 2))``.

    ``task`` is a task name, a Task, or a signature dict (a copy is made). Options given as
    keyword arguments (``countdown=10``, ``queue='q'``) are stored with ``options``.
    """

    def __init__(self, task: Any = None, args: Iterable[Any] | None = None,
                 kwargs: dict | None = None, options: dict | None = None,
                 subtask_type: str | None = None, immutable: bool = False,
                 app: Any = None, **ex: Any) -> None:
        self._type = None
        if isinstance(task, dict) and args is None and kwargs is None:
            data = task
            if isinstance(task, Signature):
                app = app or task._app
                self._type = task._type
            super().__init__(task=data.get("task"), args=list(data.get("args") or ()),
                             kwargs=dict(data.get("kwargs") or {}),
                             options=dict(data.get("options") or {}, **ex),
                             subtask_type=data.get("subtask_type"),
                             immutable=bool(data.get("immutable", False)))
        else:
            name = task
            if task is not None and not isinstance(task, str):
                name = task.name
                self._type = task
                app = app or getattr(task, "app", None)
            super().__init__(task=name, args=list(args or ()), kwargs=dict(kwargs or {}),
                             options=dict(options or {}, **ex), subtask_type=subtask_type,
                             immutable=bool(immutable))
        self._app = app

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> "Signature":
        """Rebuild from the dict form (as found in a message)."""
        return Signature(data, app=app)

    # -- fields as attributes, as Celery offers them ------------------------------------------

    @property
    def task(self) -> str:
        return self["task"]

    name = task

    @property
    def args(self) -> tuple:
        return tuple(self["args"])

    @args.setter
    def args(self, value: Iterable[Any]) -> None:
        self["args"] = list(value)

    @property
    def kwargs(self) -> dict:
        return self["kwargs"]

    @kwargs.setter
    def kwargs(self, value: dict) -> None:
        self["kwargs"] = dict(value)

    @property
    def options(self) -> dict:
        return self["options"]

    @options.setter
    def options(self, value: dict) -> None:
        self["options"] = dict(value)

    @property
    def subtask_type(self) -> str | None:
        return self["subtask_type"]

    @property
    def immutable(self) -> bool:
        return self["immutable"]

    @immutable.setter
    def immutable(self, value: bool) -> None:
        self["immutable"] = bool(value)

    @property
    def app(self) -> Any:
        if self._app is None:
            from .app import current_app
            self._app = current_app()
        return self._app

    @app.setter
    def app(self, value: Any) -> None:
        self._app = value

    @property
    def type(self) -> Any:
        """The Task this signature calls (looked up in the app's registry by name)."""
        if self._type is None:
            self._type = self.app.tasks[self["task"]]
        return self._type

    @property
    def id(self) -> str | None:
        """The task id assigned by ``freeze()`` (or the ``task_id`` option), else None."""
        return self["options"].get("task_id")

    @id.setter
    def id(self, value: str) -> None:
        self["options"]["task_id"] = value

    def AsyncResult(self, task_id: str) -> Any:
        from .result import AsyncResult
        return AsyncResult(task_id, app=self.app, task_name=self["task"])

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]] +
                         [f"{k}={v!r}" for k, v in self._own_kwargs().items()])
        return f"{self['task']}({args}){'!' if self['immutable'] else ''}"

    # -- partial application ------------------------------------------------------------------

    def _own_kwargs(self) -> dict:
        """The keyword arguments that partial application merges into."""
        return self["kwargs"]

    def _set_own_kwargs(self, kwargs: dict) -> None:
        self["kwargs"] = kwargs

    def _merge(self, args: Iterable[Any] | None = (), kwargs: dict | None = None,
               options: dict | None = None) -> tuple[tuple, dict, dict]:
        """``(args, kwargs, options)`` to call with: given args before ours, kwargs merged,
        given options over ours; an immutable signature keeps its args and kwargs."""
        opts = dict(self["options"], **(options or {}))
        own_args, own_kwargs = tuple(self["args"]), dict(self._own_kwargs())
        if self["immutable"]:
            return own_args, own_kwargs, opts
        return tuple(args or ()) + own_args, dict(own_kwargs, **(kwargs or {})), opts

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> "Signature":
        """A deep copy with ``args`` prepended, ``kwargs`` merged and ``options`` overridden
        (an immutable signature takes the options only)."""
        new = copy.deepcopy(self)
        if not new["immutable"]:
            if args:
                new["args"] = list(args) + new["args"]
            if kwargs:
                new._set_own_kwargs(dict(new._own_kwargs(), **kwargs))
        new["options"].update(options)
        return new

    partial = clone

    def __deepcopy__(self, memo: dict) -> "Signature":
        new = _from_dict(copy.deepcopy(dict(self), memo), self._app, type(self))
        new._type = self._type
        return new

    def __copy__(self) -> "Signature":
        return self.clone()

    def __reduce__(self) -> Any:
        return (_from_dict, (dict(self),))

    def __json__(self) -> dict:
        return dict(self)

    def replace(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                options: dict | None = None) -> "Signature":
        """A copy with ``args``, ``kwargs`` or ``options`` replaced (not merged)."""
        new = self.clone()
        if args is not None:
            new["args"] = list(args)
        if kwargs is not None:
            new._set_own_kwargs(dict(kwargs))
        if options is not None:
            new["options"] = dict(options)
        return new

    def set(self, immutable: bool | None = None, **options: Any) -> "Signature":
        """Update options in place (and immutability); returns the signature itself."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self["options"].update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    # -- callbacks ----------------------------------------------------------------------------

    def _append_option(self, key: str, value: Any) -> Any:
        items = self["options"].get(key)
        items = _as_list(items)
        if value not in items:
            items.append(value)
        self["options"][key] = items
        return value

    def link(self, callback: Any) -> Any:
        """Apply ``callback`` with this task's return value when it succeeds."""
        return self._append_option("link", callback)

    def link_error(self, errback: Any) -> Any:
        """Call ``errback`` when this task fails (see ``followups.send_errbacks``)."""
        return self._append_option("link_error", errback)

    on_error = link_error

    # -- ids ----------------------------------------------------------------------------------

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the task id now (``_id``, else the one already assigned, else a new one) and
        return the result ``apply_async`` will return. Calling it again changes nothing
        unless new values are given."""
        opts = self["options"]
        tid = _id or opts.get("task_id") or str(uuid.uuid4())
        opts["task_id"] = tid
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if "reply_to" not in opts:
            from .protocol import process_oid
            opts["reply_to"] = process_oid()
        if group_id:
            opts["group_id"] = group_id
        if chord is not None:
            opts["chord"] = chord
        if group_index is not None:
            opts["group_index"] = group_index
        return self.AsyncResult(tid)

    # -- calling ------------------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    route_name: str | None = None, **options: Any) -> Any:
        """Send the task; returns its ``AsyncResult``. Tasks not registered here are sent by
        name."""
        args, kwargs, options = self._merge(args, kwargs, _drop_none(options))
        options = _drop_none(options)
        if route_name:
            options["route_name"] = route_name
        task = self._type or self.app.tasks.get(self["task"])
        if task is not None:
            return task.apply_async(args, kwargs, **options)
        return self.app.send_task(self["task"], args, kwargs, **options)

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        """Run the task here and now (no broker); returns an ``EagerResult``."""
        args, kwargs, options = self._merge(args, kwargs, _drop_none(options))
        return self.type.apply(args, kwargs, **_drop_none(options))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task inline in this process with the partial arguments applied."""
        args, kwargs, _ = self._merge(args, kwargs)
        return self.type(*args, **kwargs)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(self, other, app=self._app)
        return NotImplemented


_TYPES[None] = Signature


def _from_dict(data: dict, app: Any = None, cls: type | None = None) -> Signature:
    if cls is None:
        kind = data.get("subtask_type")
        cls = _TYPES.get(kind) if kind else None
        if cls is None and "task" in (data.get("kwargs") or {}):
            cls = _BY_NAME.get(data.get("task"))  # type: ignore[arg-type]
        cls = cls or Signature
    sig = cls.from_dict(data, app=app)
    if isinstance(data, Signature) and sig._type is None:
        sig._type = data._type
    return sig


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """``signature('proj.add', (2, 2), {}, countdown=1)``, ``signature(task, ...)``, or
    ``signature(a_dict)``, which returns the class its ``subtask_type`` names."""
    app = kwargs.pop("app", None)
    if isinstance(varies, dict) and not args and not kwargs:
        if isinstance(varies, Signature):
            if app is not None and varies._app is None:
                varies._app = app
            return varies
        return _from_dict(varies, app)
    return Signature(varies, *args, app=app, **kwargs)


subtask = signature


def maybe_signature(value: Any, app: Any = None) -> Signature | None:
    """None stays None; a signature is returned as is; a dict becomes the right class."""
    if value is None:
        return None
    if isinstance(value, Signature):
        if app is not None and value._app is None:
            value._app = app
        return value
    return _from_dict(value, app)


class _Nested(Signature):
    """A canvas holding signatures in ``kwargs["tasks"]`` (chain, group)."""

    @classmethod
    def from_dict(cls, data: dict, app: Any = None) -> Any:
        kwargs = dict(data.get("kwargs") or {})
        sig = cls(kwargs.pop("tasks", None) or [], app=app, **dict(data.get("options") or {}))
        sig["args"] = list(data.get("args") or ())
        sig["kwargs"].update(kwargs)
        sig["immutable"] = bool(data.get("immutable", False))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The members as signatures bound to this canvas's app (dicts are converted once)."""
        items = self["kwargs"].setdefault("tasks", [])
        for i, item in enumerate(items):
            if not isinstance(item, Signature) or item._app is None:
                items[i] = maybe_signature(item, self._app)
        return items


class chain(_Nested):
    """Tasks run one after another, each result prepended to the next one's arguments:
    ``chain(add.s(1, 1), add.s(10))`` or ``add.s(1, 1) | add.s(10)``.

    Steps are normalized when the chain is built: nested chains are unrolled, a group
    followed by more steps becomes ``chord(group, rest)`` and steps after a chord join its
    body. So only the last step is ever a group or chord, and each step is sent by the worker
    that ran the one before it. (Celery stops at ``chord(group, next_step)`` and leaves the
    later steps in the chain; applying a group or chord with ``chain=`` accepts that form.)
    """

    def __init__(self, *tasks: Any, app: Any = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], (dict, str)) and hasattr(tasks[0], "__iter__"):
            tasks = tuple(tasks[0])
        steps = [maybe_signature(t, app) for t in tasks]
        app = app or next((s._app for s in steps if s._app is not None), None)
        super().__init__("celery.chain", (), {"tasks": _normalize(steps, app)}, options,
                         subtask_type="chain", app=app)

    def _own_kwargs(self) -> dict:
        return {k: v for k, v in self["kwargs"].items() if k != "tasks"}

    def _set_own_kwargs(self, kwargs: dict) -> None:
        self["kwargs"] = {"tasks": self["kwargs"].get("tasks", []), **kwargs}

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(*self._unchained(), other, app=self._app)
        return NotImplemented

    def _unchained(self) -> list[Signature]:
        """Copies of the steps carrying this chain's own partial args, links and errbacks, to
        splice into another chain."""
        steps = [t.clone() for t in self.tasks]
        if not steps:
            return steps
        if self["args"] or self._own_kwargs():
            steps[0] = steps[0].clone(self["args"], self._own_kwargs())
        for callback in _as_list(self["options"].get("link")):
            steps[-1].link(callback)
        for errback in _as_list(self["options"].get("link_error")):
            for step in steps:
                step.link_error(errback)
        return steps

    def link(self, callback: Any) -> Any:
        """Called with the last step's value (added to the last step when sent)."""
        return self._append_option("link", callback)

    def link_error(self, errback: Any) -> Any:
        """Called when any step fails (added to every step when sent)."""
        return self._append_option("link_error", errback)

    on_error = link_error

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign ids to every step (in place); return the last step's result, whose
        ``.parent`` walks back to the first. ``_id``, ``group_id``, ``group_index`` and
        ``chord`` belong to the last step: the chain's result is its result."""
        steps = self.tasks
        previous = None
        for i, step in enumerate(steps):
            if i == len(steps) - 1:
                result = step.freeze(_id, group_id=group_id, chord=chord, root_id=root_id,
                                     parent_id=parent_id if i == 0 else None,
                                     group_index=group_index)
            else:
                result = step.freeze(root_id=root_id, parent_id=parent_id if i == 0 else None)
            if previous is not None:
                root_of(result).parent = previous
            previous = result
        return previous

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
                    **options: Any) -> Any:
        """Send the first step carrying the others (reversed, ids assigned) as its ``chain``;
        return the last step's result (None for an empty chain)."""
        options = _drop_none(options)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        args, kwargs, options = self._merge(args, kwargs, options)
        sig = self.clone()
        steps = sig.tasks
        if not steps:
            return None
        if any(_holds_chord(step) for step in steps):
            from .canvas_group import ensure_chords_allowed
            ensure_chords_allowed(self.app)  # refused now rather than by a worker mid-way
        if args or kwargs:
            steps[0] = steps[0].clone(args, kwargs)
        task_id = options.pop("task_id", None)
        last_options = {key: options.pop(key, None) for key in ("group_id", "group_index", "chord")}
        for callback in _as_list(options.pop("link", None)):
            steps[-1].link(callback)
        for errback in _as_list(options.pop("link_error", None)):
            for step in steps:
                step.link_error(errback)
        result = sig.freeze(task_id, root_id=options.get("root_id"), **last_options)
        first, rest = steps[0], steps[1:]
        sent = first.apply_async(chain=list(reversed(rest)) or None, **options)
        return result if rest else sent

    def apply(self, args: Iterable[Any] | None = None, kwargs: dict | None = None,
              **options: Any) -> Any:
        """Run every step here, in order (no broker); return the last step's eager result.
        A failed step ends the chain: its result is returned (``get()`` raises its error)."""
        args, kwargs, options = self._merge(args, kwargs, _drop_none(options))
        result = None
        for i, step in enumerate(self.tasks):
            step_args = args if i == 0 else (result.get(),)
            current = step.apply(step_args, kwargs if i == 0 else None)
            if result is not None:
                root_of(current).parent = result
            result = current
            if _has_failed(result):
                break
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """As Celery: calling a chain sends it (``apply_async(args, kwargs)``)."""
        return self.apply_async(args, kwargs)


_TYPES["chain"] = chain


def _has_failed(result: Any) -> bool:
    members = getattr(result, "results", None)
    if members is not None:
        return any(_has_failed(r) for r in members)
    return result.failed()


def _holds_chord(sig: Signature) -> bool:
    kind = sig["subtask_type"]
    if kind == "chord":
        return True
    if kind in ("chain", "group"):
        return any(_holds_chord(maybe_signature(t, sig._app)) for t in sig["kwargs"].get("tasks") or ())
    return False


def _chain_or_single(steps: list[Signature], app: Any) -> Signature:
    return steps[0] if len(steps) == 1 else chain(*steps, app=app)


def _normalize(steps: list[Any], app: Any) -> list[Signature]:
    """Unroll nested chains; fold what follows a group or chord into a chord body."""
    from .canvas_group import chord, chunks, group
    flat: list[Signature] = []
    for step in steps:
        if isinstance(step, chain):
            flat.extend(step._unchained())
        else:
            flat.append(step)
    out: list[Signature] = []
    for i, step in enumerate(flat):
        rest = flat[i + 1:]
        if rest and isinstance(step, chunks):
            step = step.group()
        if rest and isinstance(step, group):
            out.append(chord(step, _chain_or_single(rest, app), app=app))
            break
        if rest and isinstance(step, chord):
            body = step.body
            new = chord(step.header, _chain_or_single(([body] if body is not None else []) + rest, app),
                        app=app, **step["options"])
            new["args"], new["immutable"] = list(step["args"]), step["immutable"]
            new["kwargs"]["kwargs"] = dict(step._own_kwargs())
            out.append(new)
            break
        out.append(step)
    return out


def result_from_tuple(value: Any, app: Any = None) -> Any:
    """Rebuild an ``AsyncResult``/``GroupResult`` from its ``as_tuple()`` form."""
    from .result import AsyncResult, GroupResult
    if value is None:
        return None
    (id_, parent), nodes = value
    parent_result = result_from_tuple(parent, app) if parent else None
    if nodes is not None:
        return GroupResult(id_, [result_from_tuple(n, app) for n in nodes], parent=parent_result, app=app)
    return AsyncResult(id_, app=app, parent=parent_result)


_LATER = ("group", "chord", "chunks", "xmap", "xstarmap", "register_builtins")


def __getattr__(name: str) -> Any:
    # canvas_group builds on this module, so its names are looked up on first use.
    if name in _LATER:
        from . import canvas_group
        return getattr(canvas_group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Signature", "signature", "subtask", "maybe_signature", "chain", "group", "chord",
           "chunks", "xmap", "xstarmap", "register_builtins", "result_from_tuple"]
