"""qctl: a distributed task queue with an operations-first command line.

Importing this package is cheap: it pulls in neither the worker, nor the command line, nor
any broker client (those load when a command or a broker URL needs them).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import states
from .app import App, current_app
from .canvas import (Signature, chain, chord, chunks, group, maybe_signature, signature,
                     subtask, xmap, xstarmap)
from .result import AsyncResult, EagerResult, GroupResult
from .task import Task

Celery = App  # so that ``from qctl import Celery`` reads naturally while migrating

__all__ = ["App", "Celery", "Task", "AsyncResult", "EagerResult", "GroupResult", "Signature",
           "signature", "subtask", "maybe_signature", "chain", "group", "chord", "chunks",
           "xmap", "xstarmap", "states",
           "current_app", "__version__"]
