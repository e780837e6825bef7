"""Results as the client sees them: AsyncResult, EagerResult, GroupResult.

Failures travel as ``{"exc_type", "exc_message", "exc_module"}`` (Celery's shape) and are
rebuilt into exception objects here; only ``BaseException`` subclasses are ever built.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any, Callable, Iterable

from . import states
from .exceptions import TaskRevokedError, TimeoutError

#: Our exception types that Celery also has are written with Celery's module name, so a
#: Celery client rebuilds its own class; on reading, that module maps back to ours.
_CELERY_MODULES = {"celery.exceptions": "qctl.exceptions", "billiard.exceptions": "qctl.exceptions"}


def exception_to_meta(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    module = cls.__module__
    if module == "qctl.exceptions":
        module = "celery.exceptions"
    args = list(exc.args)
    try:
        from .serialization import json_dumps
        json_dumps(args)
    except (TypeError, ValueError):
        args = [repr(a) for a in args]
    return {"exc_type": cls.__qualname__, "exc_message": args, "exc_module": module}


def meta_to_exception(value: Any) -> BaseException:
    if isinstance(value, BaseException):
        return value
    if not isinstance(value, dict) or "exc_type" not in value:
        return Exception(value)
    name = str(value["exc_type"])
    module_name = _CELERY_MODULES.get(value.get("exc_module") or "", value.get("exc_module") or "builtins")
    message = value.get("exc_message") or []
    if not isinstance(message, (list, tuple)):
        message = [message]
    # Only modules already loaded are searched: stored data must not make us import code.
    cls: Any = sys.modules.get(module_name)
    try:
        for part in name.split("."):
            cls = getattr(cls, part)
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = type(name, (Exception,), {"__module__": module_name})
    try:
        return cls(*message)
    except Exception:
        exc = Exception(*message)
        return exc


#: How often (seconds) ``get()`` on a workflow step looks at the steps before it.
PARENT_CHECK_INTERVAL = 1.0


class ResultBase:
    parent: "ResultBase | None" = None

    def as_tuple(self) -> list:
        raise NotImplementedError


class AsyncResult(ResultBase):
    """The state and return value of a task sent to the workers."""

    def __init__(self, id: str, backend: Any = None, task_name: str | None = None,
                 app: Any = None, parent: ResultBase | None = None) -> None:
        if app is None:
            from .app import current_app
            app = current_app()
        self.id = self.task_id = id
        self.app = app
        self._backend = backend
        self.task_name = task_name
        self.parent = parent
        self._cache: dict[str, Any] | None = None

    @property
    def backend(self) -> Any:
        return self._backend or self.app.backend

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        return other == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _get_meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_task_meta(self.id)
        if meta.get("status") in states.READY_STATES:
            self._cache = meta
        return meta

    @property
    def state(self) -> str:
        return self._get_meta()["status"]

    status = state

    @property
    def result(self) -> Any:
        meta = self._get_meta()
        if meta["status"] in states.EXCEPTION_STATES and meta.get("result") is not None:
            return meta_to_exception(meta["result"])
        return meta.get("result")

    info = result

    @property
    def traceback(self) -> str | None:
        return self._get_meta().get("traceback")

    @property
    def date_done(self) -> datetime | None:
        value = self._get_meta().get("date_done")
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        return value

    @property
    def children(self) -> list[Any]:
        from .canvas import result_from_tuple
        return [result_from_tuple(c, self.app) for c in (self._get_meta().get("children") or [])]

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            no_ack: bool = True, follow_parents: bool = True, disable_sync_subtasks: bool = True,
            on_message: Callable[[dict], Any] | None = None, on_interval: Any = None) -> Any:
        """Wait for the task to finish and return its value (raise its exception).

        With ``follow_parents`` (and ``propagate``), a task of a workflow whose earlier step
        failed -- so that this one will never run -- raises that step's error instead of
        waiting for ``timeout``."""
        if self._cache is None:
            if follow_parents and propagate and self.parent is not None:
                self._cache = self._wait_watching_parents(timeout, interval, on_message)
            else:
                self._cache = self.backend.wait_for(self.id, timeout=timeout, interval=interval,
                                                    on_message=on_message)
        return self._value(propagate)

    def _wait_watching_parents(self, timeout: float | None, interval: float,
                               on_message: Callable[[dict], Any] | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_failed_parent()
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            step = PARENT_CHECK_INTERVAL if remaining is None else min(PARENT_CHECK_INTERVAL, remaining)
            try:
                return self.backend.wait_for(self.id, timeout=step, interval=interval,
                                             on_message=on_message)
            except TimeoutError:
                if remaining is not None and remaining <= step:
                    raise

    def _raise_failed_parent(self) -> None:
        """Raise the error of the nearest failed step before this one, if any (a chord's
        header is not inspected: its failure reaches the body as a ``ChordError``)."""
        node = self.parent
        while node is not None:
            if isinstance(node, AsyncResult):
                meta = node._get_meta()
                if meta["status"] in states.PROPAGATE_STATES:
                    node._value(True)
            node = node.parent

    wait = get

    def _value(self, propagate: bool) -> Any:
        meta = self._cache or self._get_meta()
        status = meta["status"]
        if status in states.PROPAGATE_STATES and propagate:
            exc = meta_to_exception(meta.get("result"))
            if status == states.REVOKED and not isinstance(exc, TaskRevokedError):
                exc = TaskRevokedError(*getattr(exc, "args", ()))
            raise exc
        if status in states.EXCEPTION_STATES and meta.get("result") is not None:
            return meta_to_exception(meta["result"])
        return meta.get("result")

    def forget(self) -> None:
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, connection: Any = None, terminate: bool = False, signal: str = "SIGTERM",
               wait: bool = False, timeout: float | None = None) -> Any:
        return self.app.control.revoke(self.id, terminate=terminate, signal=signal,
                                       reply=wait, timeout=timeout)

    def as_tuple(self) -> list:
        """``[[id, parent_tuple_or_None], None]``, Celery's form (e.g. in ``children``)."""
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], None]


class EagerResult(AsyncResult):
    """The result of ``Task.apply()``: already known, nothing is stored."""

    def __init__(self, id: str, ret_value: Any, state: str, traceback: str | None = None,
                 name: str | None = None, app: Any = None) -> None:
        self.id = self.task_id = id
        self.app = app
        self._backend = None
        self.task_name = name
        self.parent = None
        self._state = state
        self._result = ret_value
        self._traceback = traceback
        self._cache = {"status": state, "result": ret_value, "traceback": traceback,
                       "children": [], "date_done": None, "task_id": id}

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"

    def _get_meta(self) -> dict[str, Any]:
        return self._cache  # type: ignore[return-value]

    @property
    def result(self) -> Any:
        return self._result

    info = result

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        if self._state in states.PROPAGATE_STATES and propagate:
            raise self._result if isinstance(self._result, BaseException) else meta_to_exception(self._result)
        return self._result

    wait = get

    def forget(self) -> None:
        pass

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        self._state = states.REVOKED


class GroupResult(ResultBase):
    """The results of a group's tasks, in the group's order."""

    def __init__(self, id: str | None = None, results: Iterable[AsyncResult] | None = None,
                 parent: ResultBase | None = None, app: Any = None) -> None:
        if app is None:
            from .app import current_app
            app = current_app()
        self.id = id
        self.results = list(results or [])
        self.parent = parent
        self.app = app

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(str(r.id) for r in self.results)}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    @property
    def children(self) -> list[AsyncResult]:
        return self.results

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for r in self.results if r.successful())

    @property
    def supports_native_join(self) -> bool:
        return False

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            **kwargs: Any) -> list[Any]:
        """The members' values in member order; ``timeout`` is for the whole group. With
        ``propagate`` the first failure found (in order) is raised."""
        return self.join(timeout=timeout, propagate=propagate, interval=interval)

    def join(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
             **kwargs: Any) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if remaining == 0.0 and not result.ready():
                raise TimeoutError("The operation timed out.")
            values.append(result.get(timeout=remaining, propagate=propagate, interval=interval))
        return values

    join_native = join

    def forget(self) -> None:
        for result in self.results:
            result.forget()

    def revoke(self, connection: Any = None, terminate: bool = False, signal: str = "SIGTERM",
               wait: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """Revoke every member (one broadcast)."""
        ids = [leaf.id for leaf in _leaves(self)]
        if not ids:
            return None
        return self.app.control.revoke(ids, terminate=terminate, signal=signal, reply=wait,
                                       timeout=timeout)

    def as_tuple(self) -> list:
        """``[[group_id, parent_tuple_or_None], [member tuples]]``, Celery's form."""
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], [r.as_tuple() for r in self.results]]

    def save(self, backend: Any = None) -> "GroupResult":
        """Store the group under ``celery-taskset-meta-<id>`` so ``restore(id)`` finds it."""
        backend = backend or self.app.backend
        backend.set_raw(f"celery-taskset-meta-{self.id}",
                        backend.encode({"result": self.as_tuple()}))
        return self

    def delete(self, backend: Any = None) -> None:
        (backend or self.app.backend).delete(f"celery-taskset-meta-{self.id}")

    @classmethod
    def restore(cls, id: str, backend: Any = None, app: Any = None) -> "GroupResult | None":
        """The group saved under ``id`` (None if nothing was saved)."""
        if app is None:
            from .app import current_app
            app = current_app()
        backend = backend or app.backend
        data = backend.get_raw(f"celery-taskset-meta-{id}")
        if data is None:
            return None
        from .canvas import result_from_tuple
        return result_from_tuple(backend.decode(data)["result"], app)


def _leaves(result: Any) -> list[AsyncResult]:
    members = getattr(result, "results", None)
    if members is None:
        return [result]
    return [leaf for member in members for leaf in _leaves(member)]
