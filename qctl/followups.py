"""What a worker sends after a task: ``link`` callbacks, the next step of a chain, errbacks,
and a chord's body once its header is complete.

The client side of workflows (signatures, chain, group, chord) is ``qctl.canvas``; this module
runs in the worker, after the task's result is known.
"""
from __future__ import annotations

import inspect
from typing import Any

from .canvas import maybe_signature


def send_follow_ups(task: Any, request: Any, value: Any) -> None:
    """After success: send ``link`` callbacks and the next task of a chain."""
    app = task.app
    common = {"parent_id": request.id, "root_id": request.root_id}
    for callback in request.callbacks or ():
        sig = maybe_signature(callback, app)
        sig.apply_async((value,), **common)  # type: ignore[union-attr]
    if request.chain:
        remaining = list(request.chain)
        nxt = maybe_signature(remaining.pop(), app)
        nxt.apply_async((value,), chain=remaining or None, **common)  # type: ignore[union-attr]


def send_errbacks(task: Any, request: Any, exc: BaseException, traceback_text: str) -> None:
    """After failure: errbacks that take ``(request, exc, traceback)`` run here, others are sent
    with the failed task's id."""
    app = task.app
    for errback in request.errbacks or ():
        sig = maybe_signature(errback, app)
        target = app.tasks.get(sig["task"])  # type: ignore[index]
        if target is not None and _takes_request(target):
            args, kwargs, _ = sig._merge((request, exc, traceback_text))  # type: ignore[union-attr]
            target(*args, **kwargs)
        else:
            sig.apply_async((request.id,), parent_id=request.id, root_id=request.root_id)  # type: ignore[union-attr]


def _takes_request(task: Any) -> bool:
    try:
        params = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
