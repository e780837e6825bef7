"""The pool interface, and ``create()`` to build one by name.

A pool runs jobs (``qctl_worker.execution.Job``) and reports each one's end by calling the
``on_outcome(job, outcome)`` it was started with, from a thread of its own: the consumer turns
that call into an event for its loop. Pools never touch the broker or the result backend.
"""
from __future__ import annotations

from typing import Any, Callable

from ..execution import Job

OnOutcome = Callable[[Job, Any], None]


class Pool:
    """Runs up to ``limit`` jobs at once."""

    name = "base"

    def __init__(self, app: Any, limit: int, *, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.on_outcome: OnOutcome = lambda job, outcome: None

    def start(self, on_outcome: OnOutcome) -> None:
        """Start the processes/threads; ``on_outcome`` receives every finished job."""
        self.on_outcome = on_outcome

    def free_slots(self) -> int:
        """How many more jobs ``apply`` takes right now without queueing them."""
        raise NotImplementedError

    def apply(self, job: Job) -> None:
        """Start ``job``; never blocks. Only called while ``free_slots() > 0``."""
        raise NotImplementedError

    def terminate_job(self, job: Job, signum: int, reason: str) -> bool:
        """Stop ``job`` now if it still runs (the process running it is killed and replaced
        where the pool has processes). Its outcome is reported with state ``reason``. Returns
        False when the job is not running any more or this pool cannot stop it."""
        return False

    def grow(self, n: int = 1) -> None:
        self.limit += n

    def shrink(self, n: int = 1) -> None:
        self.limit = max(1, self.limit - n)

    def stop(self, timeout: float | None = None) -> None:
        """Warm: wait for running jobs (up to ``timeout`` s), then end the workers."""
        raise NotImplementedError

    def terminate(self) -> None:
        """Cold: end every worker now; running jobs are reported as lost."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Process ids of the pool's processes (empty for in-process pools)."""
        return []

    def info(self) -> dict[str, Any]:
        """What ``inspect stats`` shows under ``pool``."""
        return {"implementation": f"qctl_worker.pools.{self.name}", "max-concurrency": self.limit,
                "processes": self.pids(), "max-tasks-per-child": self.max_tasks_per_child or "N/A"}


def create(name: str, app: Any, limit: int, **options: Any) -> Pool:
    """A pool by its ``-P`` name: prefork, threads, solo or asyncio."""
    if name == "prefork":
        from .prefork import PreforkPool
        return PreforkPool(app, limit, **options)
    if name in ("threads", "solo"):
        from .threads import ThreadPool
        return ThreadPool(app, 1 if name == "solo" else limit, name=name, **options)
    if name == "asyncio":
        from .asyncio import AsyncioPool
        return AsyncioPool(app, limit, **options)
    raise ValueError(f"unknown pool {name!r} (choose prefork, threads, solo or asyncio)")
