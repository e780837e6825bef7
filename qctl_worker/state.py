"""What a node knows about its tasks: revoked ids (kept with ``--statedb``) and counters."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from typing import Iterable

logger = logging.getLogger("qctl.worker.state")

#: Revoked ids are remembered this long and at most this many, oldest dropped first.
REVOKE_EXPIRES = 10800.0
REVOKES_MAX = 50000


class RevokedSet:
    """Task ids that must not run: a bounded, expiring, ordered set."""

    def __init__(self, maxlen: int = REVOKES_MAX, expires: float = REVOKE_EXPIRES) -> None:
        self.maxlen, self.expires = maxlen, expires
        self._data: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, task_id: str, when: float | None = None) -> None:
        with self._lock:
            self._data[task_id] = when or time.time()
            self._data.move_to_end(task_id)
            self._purge()

    def update(self, ids: Iterable[str]) -> None:
        for task_id in ids:
            self.add(task_id)

    def _purge(self) -> None:
        cutoff = time.time() - self.expires
        while self._data:
            oldest, stamp = next(iter(self._data.items()))
            if len(self._data) > self.maxlen or stamp < cutoff:
                self._data.popitem(last=False)
            else:
                break

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._data.items())

    def ids(self) -> list[str]:
        return [i for i, _ in self.items()]


class NodeState:
    """Counters and the revoked set of one node; ``save()``/``load()`` with ``--statedb``."""

    def __init__(self, statedb: str | None = None) -> None:
        self.statedb = statedb
        self.revoked = RevokedSet()
        self.total: Counter[str] = Counter()

    def load(self) -> None:
        if not self.statedb or not os.path.exists(self.statedb):
            return
        try:
            with open(self.statedb, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            logger.error("Cannot read state db %s (%s); starting with an empty one", self.statedb, exc)
            return
        for task_id, stamp in data.get("revoked", []):
            self.revoked.add(task_id, stamp)
        self.revoked._purge()

    def save(self) -> None:
        """Write the state atomically (temp file + rename): a crash leaves the old one."""
        if not self.statedb:
            return
        folder = os.path.dirname(os.path.abspath(self.statedb))
        fd, tmp = tempfile.mkstemp(prefix=".statedb-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"revoked": self.revoked.items(), "saved": time.time()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.statedb)
        except OSError as exc:
            logger.error("Cannot write state db %s: %s", self.statedb, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
