"""Helpers shared by the integration tests: waiting on conditions, reading what tasks recorded."""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable


class WaitTimeout(AssertionError):
    """``wait_for`` gave up: the condition never held before the deadline."""


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
             message: str | Callable[[], str] | None = None) -> Any:
    """Call ``predicate`` until it returns something truthy and return that.

    Fails the test (``AssertionError``) after ``timeout`` seconds, with ``message`` (a string
    or a callable giving one, e.g. the tail of a worker log) and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else (message or "")
            raise WaitTimeout(f"condition not met within {timeout}s "
                              f"(last value: {value!r}){': ' + text if text else ''}")
        time.sleep(interval)


def read_runs(folder: str, kind: str | None = None, task_id: str | None = None) -> list[dict]:
    """Every event the test app's tasks recorded in ``folder`` (all processes), by time."""
    events = []
    for path in glob.glob(os.path.join(str(folder), "runs-*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    continue  # being written right now
                event = json.loads(line)
                if kind is not None and event["kind"] != kind:
                    continue
                if task_id is not None and event["id"] != task_id:
                    continue
                events.append(event)
    events.sort(key=lambda e: e["time"])
    return events


def open_gate(folder: str, name: str) -> None:
    """Let tasks waiting on ``name`` (``proj.wait_gate``) go on."""
    with open(os.path.join(str(folder), f"gate-{name}"), "w"):
        pass


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied...
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
