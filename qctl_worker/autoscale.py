"""``--autoscale MAX,MIN``: grow the pool while work waits, shrink it when idle.

Runs on the consumer's hub thread once a second: one process more while messages wait for a
free slot (up to MAX), one fewer after ``idle_after`` seconds without waiting work (down to MIN).
"""
from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("qctl.worker.autoscale")


class Autoscaler:
    def __init__(self, worker: Any, max_concurrency: int, min_concurrency: int,
                 idle_after: float = 5.0) -> None:
        self.worker = worker
        self.max, self.min = int(max_concurrency), int(min_concurrency)
        self.idle_after = idle_after
        self._last_busy = time.monotonic()

    def update(self, max_concurrency: int | None = None, min_concurrency: int | None = None) -> None:
        """The ``autoscale`` control command: a new range, applied at once."""
        if max_concurrency is not None:
            self.max = int(max_concurrency)
        if min_concurrency is not None:
            self.min = int(min_concurrency)
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        size = self.worker.pool.limit
        if size > self.max:
            self.worker.resize_pool(self.max - size)
        elif size < self.min:
            self.worker.resize_pool(self.min - size)

    def tick(self) -> None:
        """One decision (hub thread)."""
        consumer, size = self.worker.consumer, self.worker.pool.limit
        waiting = len(consumer.ready) > 0 and self.worker.pool.free_slots() == 0
        now = time.monotonic()
        if waiting:
            self._last_busy = now
            if size < self.max:
                logger.info("Autoscaler: growing the pool to %d", size + 1)
                self.worker.resize_pool(1)
        elif size > self.min and not consumer.active and now - self._last_busy > self.idle_after:
            logger.info("Autoscaler: shrinking the pool to %d", size - 1)
            self.worker.resize_pool(-1)
            self._last_busy = now

    def info(self) -> dict:
        return {"max": self.max, "min": self.min, "qty": self.worker.pool.limit}
