"""What a worker sends after a task: ``link`` callbacks, the next step of a chain, errbacks,
and a chord's body once its header is complete.

The client side of workflows (signatures, chain, group, chord) is ``qctl.canvas``; this module
runs in the worker, after the task's result is known.

Chords: every header task carries the body in ``request.chord`` and the header's group id in
``request.group``. When one reaches a final state (SUCCESS, FAILURE, REVOKED; never RETRY)
the worker reports it to ``backend.chord_part_return``, which answers exactly one caller --
the one whose part completes the header -- with all parts in header order. That worker sends
the body with the list of values or, when a part did not succeed, stores ``ChordError`` as
the body's result and calls the body's errbacks, as Celery does.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

from . import states
from .canvas import maybe_signature

logger = logging.getLogger("qctl.followups")

#: Steps sent as one task message, which can carry the rest of the chain along.
_ONE_MESSAGE = (None, "xmap", "xstarmap")

def send_follow_ups(task: Any, request: Any, value: Any) -> None:
    """After success: send ``link`` callbacks and the next step of a chain."""
    app = task.app
    common = {"parent_id": request.id, "root_id": request.root_id}
    for callback in request.callbacks or ():
        _sig(callback, app).apply_async((value,), **common)
    if request.chain:
        send_next_step(app, request, value)


def send_next_step(app: Any, request: Any, value: Any) -> None:
    """Pop the next step of ``request.chain`` (stored reversed) and apply it to ``value``.

    A signature (also ``map``/``starmap``) is sent with the steps left as its own ``chain``.
    A group or chord (also ``chunks``) is applied as a whole: the client has already folded
    the steps after it into a chord body (a sender that did not gets them passed as
    ``chain``, which the group or chord folds itself). A nested chain followed by more steps
    is unrolled into the steps.
    """
    remaining = list(request.chain)
    common = {"parent_id": request.id, "root_id": request.root_id}
    step = _sig(remaining.pop(), app)
    while step["subtask_type"] == "chain" and remaining:
        remaining.extend(reversed(_steps_of(step, app)))
        step = _sig(remaining.pop(), app)
    if step["subtask_type"] in _ONE_MESSAGE:
        step.apply_async((value,), chain=remaining or None, **common)
    elif remaining:
        step.apply_async((value,), chain=remaining, **common)
    else:
        step.apply_async((value,), **common)


def _steps_of(nested: Any, app: Any) -> list[Any]:
    """A nested chain's steps, carrying its partial args, links and errbacks."""
    unchained = getattr(nested, "_unchained", None)
    if unchained is not None:
        return list(unchained())
    steps = [_sig(step, app) for step in (nested["kwargs"] or {}).get("tasks") or ()]
    if steps and nested["args"]:
        steps[0] = steps[0].clone(nested["args"])
    return steps


def _sig(value: Any, app: Any) -> Any:
    """``maybe_signature`` of a value known not to be None."""
    return maybe_signature(value, app)


def send_errbacks(task: Any, request: Any, exc: BaseException, traceback_text: str | None) -> None:
    """After failure: errbacks that take ``(request, exc, traceback)`` run here, others are sent
    with the failed task's id."""
    call_errbacks(task.app, request, request.errbacks or (), exc, traceback_text)


def call_errbacks(app: Any, request: Any, errbacks: Any, exc: BaseException,
                  traceback_text: str | None) -> None:
    """``send_errbacks`` for any list of errback signatures, on behalf of ``request``. One
    errback that raises (or cannot be sent) is logged and does not stop the others."""
    for errback in errbacks:
        try:
            sig = _sig(errback, app)
            target = app.tasks.get(sig["task"])
            if target is not None and _takes_request(target):
                args, kwargs, _ = sig._merge((request, exc, traceback_text))
                target(*args, **kwargs)
            else:
                sig.apply_async((request.id,), parent_id=request.id, root_id=request.root_id)
        except Exception as errback_exc:  # noqa: BLE001 - the failure itself is what counts
            logger.exception("Errback %r of %s failed: %r", errback, request.id, errback_exc)


def _takes_request(task: Any) -> bool:
    try:
        params = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


# -- chords -------------------------------------------------------------------------------

def on_chord_part_return(app: Any, request: Any, state: str, value: Any) -> None:
    """Report a header task's final ``state`` and ``value`` (the return value, or the exception
    meta of a failure); if this part completes the chord, send its body or fail it.

    Never raises: a chord that cannot be completed is logged, and the task's own outcome
    stands."""
    body = request.chord
    group_id = request.group or ((body or {}).get("options") or {}).get("group_id")
    if not body or not group_id:
        logger.error("Task %s carries a chord body but no group id; the body is never sent",
                     request.id)
        return
    backend = app.backend
    try:
        parts = backend.chord_part_return(group_id, request.id, request.group_index, state, value)
    except Exception as exc:  # noqa: BLE001 - the backend's error is the whole story
        logger.error("Cannot count part %s of chord %s: %s", request.id, group_id, exc)
        return
    if parts is None:
        return
    try:
        _complete_chord(app, request, group_id, body, parts)
    except Exception as exc:  # noqa: BLE001
        logger.exception("Cannot complete chord %s: %s", group_id, exc)
    finally:
        try:
            backend.chord_cleanup(group_id)
        except Exception as exc:  # noqa: BLE001 - the counters expire on their own
            logger.warning("Cannot clean up chord %s: %s", group_id, exc)


def _complete_chord(app: Any, request: Any, group_id: str, body: Any,
                    parts: list[tuple[str, str, Any]]) -> None:
    from .exceptions import ChordError
    from .result import meta_to_exception
    sig = _sig(body, app)
    for task_id, state, value in parts:
        if state != states.SUCCESS:
            reason = meta_to_exception(value)
            fail_chord(app, sig, ChordError(f"Dependency {task_id} raised {reason!r}"), request)
            return
    # A plain body's options already hold the group id; a group or chain body keeps its own.
    options = {"group_id": group_id} if sig["subtask_type"] is None else {}
    try:
        sig.apply_async(([value for _, _, value in parts],), parent_id=request.id,
                        root_id=request.root_id, **options)
    except Exception as exc:  # noqa: BLE001 - e.g. the broker is down: the chord fails
        logger.error("Cannot send the body of chord %s: %r", group_id, exc)
        fail_chord(app, sig, ChordError(f"Callback error: {exc!r}"), request)


def fail_chord(app: Any, body: Any, exc: BaseException, request: Any) -> None:
    """Call the body's errbacks, then store FAILURE with ``exc`` under the id(s) the chord's
    result is read from (the body's own id, a chain body's last task, each member of a group
    body). ``request`` is the header task whose part completed the chord."""
    from .result import exception_to_meta
    from .task import Context
    from .trace import utcnow_iso
    ids = final_result_ids(body)
    if not ids:
        logger.error("The body of chord %s has no task id; its failure cannot be stored: %s",
                     request.group, exc)
    group_id = (body.get("options") or {}).get("group_id")
    failed_body = Context(
        id=ids[0] if ids else None, task=body["task"], args=list(body["args"] or ()),
        kwargs=dict(body["kwargs"] or {}), root_id=request.root_id, parent_id=request.id,
        group=group_id, group_index=None, chord=None, chain=None, callbacks=None,
        errbacks=errbacks_of(body), delivery_info={}, called_directly=False, is_eager=False,
        hostname=getattr(request, "hostname", None), retries=0, headers={}, children=[])
    call_errbacks(app, failed_body, failed_body.errbacks, exc, None)
    items = []
    for task_id in ids:
        meta: dict[str, Any] = {"status": states.FAILURE, "result": exception_to_meta(exc),
                                "traceback": None, "children": [], "date_done": utcnow_iso()}
        if group_id:
            meta["group_id"] = group_id
        meta["parent_id"] = request.id
        meta["task_id"] = task_id
        items.append((task_id, app.backend.encode(meta), states.FAILURE))
    if items:
        app.backend.set_many(items)


def final_result_ids(sig: Any) -> list[str]:
    """The task ids a canvas's result is read from: its own ``task_id``; for a chain, its last
    step's; for a chord, its body's; for a group, every member's."""
    kind = sig.get("subtask_type")
    kwargs = sig.get("kwargs") or {}
    own = (sig.get("options") or {}).get("task_id")
    if kind == "chain":
        tasks = kwargs.get("tasks") or []
        return (final_result_ids(tasks[-1]) if tasks else []) or ([own] if own else [])
    if kind == "chord" and kwargs.get("body"):
        return final_result_ids(kwargs["body"]) or ([own] if own else [])
    if kind == "group":
        return [tid for member in kwargs.get("tasks") or () for tid in final_result_ids(member)]
    return [own] if own else []


def errbacks_of(sig: Any) -> list[Any]:
    """``link_error`` of a canvas: its own, and for a chain also those of its steps (where
    ``chain.on_error`` puts them), without repeats."""
    found: list[Any] = []

    def add(value: Any) -> None:
        for errback in value if isinstance(value, (list, tuple)) else [value] if value else []:
            if errback not in found:
                found.append(errback)
    add((sig.get("options") or {}).get("link_error"))
    if sig.get("subtask_type") == "chain":
        for step in (sig.get("kwargs") or {}).get("tasks") or ():
            add((step.get("options") or {}).get("link_error"))
    return found


def chord_part_from_message(app: Any, headers: dict[str, Any], source: Any, accept: Any,
                            state: str, exc: BaseException) -> None:
    """A header task that ended without finishing in a pool (revoked or expired before it
    ran, killed at its hard time limit, its process lost, not registered): read the chord
    from the message ``source`` (an envelope or a job: body, content type and encoding,
    properties) and report ``exc`` as its part. Does nothing for tasks outside a chord."""
    if not headers.get("group"):
        return                              # every chord header task has a group id
    from .protocol import TaskMessage
    from .result import exception_to_meta
    from .trace import build_context
    from .transports import Envelope
    envelope = Envelope(source.body, headers, source.properties, source.content_type,
                        source.content_encoding)
    message = TaskMessage(headers=headers, envelope=envelope)
    try:
        message.decode_body(accept)
    except Exception:  # noqa: BLE001 - an unreadable body carries no chord we could use
        return
    if not message.embed.get("chord"):
        return
    request = build_context(headers, message.args, message.kwargs, message.embed, {},
                            source.properties, None)
    on_chord_part_return(app, request, state, exception_to_meta(exc))


def fail_rest_of_chain(task: Any, request: Any, exc_meta: dict, traceback_text: str) -> int:
    """A chain step failed: the steps after it will never run. Store the same FAILURE under
    their pre-assigned ids (as Celery's workers do), so a client already waiting on a later
    step's result hears of it at once. Nested groups/chords keep their own ids and are left
    alone. Returns how many results were stored."""
    from .trace import utcnow_iso
    stored = 0
    for step in request.chain or ():
        if not isinstance(step, dict) or step.get("subtask_type") in ("group", "chord"):
            continue
        task_id = (step.get("options") or {}).get("task_id")
        if not task_id:
            continue
        meta = {"status": states.FAILURE, "result": exc_meta, "traceback": traceback_text,
                "children": [], "date_done": utcnow_iso(), "parent_id": request.id,
                "task_id": task_id}
        backend = task.app.backend
        try:
            if hasattr(backend, "store_for"):       # rpc://: to the client that sent the chain
                reply_to = (step.get("options") or {}).get("reply_to") or request.reply_to
                backend.store_for(task_id, backend.encode(meta), states.FAILURE, reply_to)
            else:
                backend.store_result(task_id, meta)
            stored += 1
        except Exception as exc:  # noqa: BLE001 - the failed step's own result is stored
            logger.warning("Cannot mark the rest of the chain of %s as failed: %s", request.id, exc)
            break
    return stored
