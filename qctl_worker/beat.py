"""beat: sends periodic tasks, one sender at a time per broker.

Every beat process runs the same loop; the broker decides who sends:

    standby: try to take the lease (``beat_lease_name``) every second; log who leads
    leader:  renew the lease -> find the due entries -> write their new last-run times to the
             broker (only while the lease is ours) and to the schedule file -> send them

Writing the last-run times *before* sending (write-ahead, fenced by the lease) is what makes a
tick go out at most once: a leader that dies after the write and before the send loses that
tick (logged by nobody, counted by the next leader as done) rather than have the next leader
send it again. A new leader starts from the broker's state, merged with its own file.

Catching up: an entry that missed several runs while no beat ran is sent once, then follows
its schedule from now. Each tick's task id is derived from (entry, scheduled time), so the
same tick has the same id wherever it is sent from.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from qctl.schedules import BaseSchedule, maybe_schedule, to_dict

logger = logging.getLogger("qctl.beat")

STATE_VERSION = 1
STANDBY_POLL = 1.0                  # seconds between a standby's attempts to take the lease
_TICK_NAMESPACE = uuid.UUID("6f1c1a52-5d51-4e55-9a3c-2f0c6b7c9e10")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), timezone.utc)


def tick_id(entry_name: str, slot: datetime) -> str:
    """The task id of one tick: the same wherever and however often it is computed."""
    return str(uuid.uuid5(_TICK_NAMESPACE, f"{entry_name}|{slot.timestamp():.6f}"))


@dataclass
class Entry:
    """One periodic task: what to send, when, and when it last went out."""

    name: str
    task: str
    schedule: BaseSchedule
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    last_run_at: datetime | None = None
    total_run_count: int = 0

    def fingerprint(self) -> str:
        """Changes when the entry's definition changes: its saved last run is then dropped."""
        return json.dumps([self.task, to_dict(self.schedule)], sort_keys=True, default=str)

    def next_slot(self, now: datetime) -> datetime:
        """The scheduled instant this entry waits for (a past one when it is due)."""
        return self.schedule.next_run_after(self.last_run_at or now)


def load_entries(app: Any) -> dict[str, Entry]:
    """``beat_schedule`` (with what ``add_periodic_task`` added) as entries; bad ones raise
    ValueError naming the entry."""
    entries: dict[str, Entry] = {}
    for name, spec in (app.conf.beat_schedule or {}).items():
        if not isinstance(spec, dict) or not spec.get("task"):
            raise ValueError(f"beat_schedule entry {name!r} has no 'task'")
        try:
            sched = maybe_schedule(spec.get("schedule"), relative=bool(spec.get("relative")), app=app)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"beat_schedule entry {name!r}: {exc}") from None
        if sched is None:
            raise ValueError(f"beat_schedule entry {name!r} has no 'schedule'")
        entries[name] = Entry(name=name, task=spec["task"], schedule=sched,
                              args=tuple(spec.get("args") or ()),
                              kwargs=dict(spec.get("kwargs") or {}),
                              options=dict(spec.get("options") or {}))
    return entries


class ScheduleFile:
    """The local copy of the last-run state (``-s FILE``): JSON, replaced atomically."""

    def __init__(self, path: str | None) -> None:
        self.path = os.path.abspath(path) if path else None
        self.failed = False

    def load(self) -> dict:
        if not self.path or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("not a qctl beat schedule file")
            return data
        except (OSError, ValueError) as exc:
            logger.error("beat: schedule file %s is unreadable (%s): starting from the "
                         "broker's state and the schedule", self.path, exc)
            return {}

    def save(self, state: dict) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(state, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            if self.failed:
                logger.info("beat: schedule file %s written again", self.path)
            self.failed = False
        except OSError as exc:
            if not self.failed:  # once per outage (a full disk must not flood the log)
                logger.error("beat: cannot write schedule file %s: %s (the broker keeps the "
                             "state; still sending)", self.path, exc)
            self.failed = True
            try:
                os.unlink(tmp)
            except OSError:
                pass


class Beat:
    """The scheduler loop. ``run_forever()`` until ``stop()``; thread-safe ``stop``."""

    def __init__(self, app: Any, schedule_file: str | None = None,
                 max_interval: float | None = None, owner: str | None = None) -> None:
        self.app = app
        conf = app.conf
        self.file = ScheduleFile(schedule_file if schedule_file is not None
                                 else conf.beat_schedule_filename)
        self.max_interval = float(max_interval or conf.beat_max_loop_interval or 300)
        self.lease_name = conf.beat_lease_name
        self.lease_ttl = float(conf.beat_lease_ttl)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.entries = load_entries(app)
        self.leader = False
        self.sent = 0
        self._stop = threading.Event()
        self._announced_holder: str | None = "?"

    # -- life ------------------------------------------------------------------------------

    def run_forever(self, on_started: Any = None) -> None:
        logger.info("beat: Starting... %d entr%s, owner %s", len(self.entries),
                    "y" if len(self.entries) == 1 else "ies", self.owner)
        if on_started is not None:
            on_started()
        try:
            while not self._stop.is_set():
                try:
                    delay = self.tick()
                except Exception as exc:  # noqa: BLE001 - a broker outage must not end beat
                    logger.error("beat: %s: %s (retrying)", type(exc).__name__, exc)
                    self._step_down()
                    delay = STANDBY_POLL
                self._stop.wait(delay)
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        if self.leader:
            try:
                self.app.transport.release_lease(self.lease_name, self.owner)
                logger.info("beat: %s gave the lead up", self.owner)
            except Exception as exc:  # noqa: BLE001
                logger.warning("beat: cannot release the lease: %s", exc)
        self.leader = False

    # -- one pass ----------------------------------------------------------------------------

    def tick(self) -> float:
        """Lead or stand by; send what is due. Returns how long to sleep."""
        transport = self.app.transport
        if not transport.acquire_lease(self.lease_name, self.owner, self.lease_ttl):
            self._step_down()
            holder = transport.lease_holder(self.lease_name)
            if holder != self._announced_holder:
                logger.info("beat: standing by: %s leads", holder or "nobody")
                self._announced_holder = holder
            return STANDBY_POLL
        if not self.leader:
            self._take_over()
        now = utcnow()
        due = [(e, e.next_slot(now)) for e in self.entries.values()]
        due = [(e, slot) for e, slot in due if slot <= now]
        if due:
            self._send(due, now)
        return self._next_wake(utcnow())

    def _take_over(self) -> None:
        """Become the leader: start from the newest of the broker's and the file's state."""
        self.leader = True
        self._announced_holder = self.owner
        logger.info("beat: %s is the leader now", self.owner)
        now = utcnow()
        merged = _merge(self.app.transport.load_state(self.lease_name) or {}, self.file.load())
        for entry in self.entries.values():
            saved = merged.get(entry.name)
            if saved and saved.get("fingerprint") == entry.fingerprint():
                entry.last_run_at = from_epoch(saved.get("last_run_at"))
                entry.total_run_count = int(saved.get("total_run_count") or 0)
            else:
                entry.last_run_at = now     # new or changed entry: first run one period away
                entry.total_run_count = 0
        self._persist()

    def _step_down(self) -> None:
        if self.leader:
            logger.warning("beat: %s lost the lead; standing by", self.owner)
        self.leader = False

    def _send(self, due: list[tuple[Entry, datetime]], now: datetime) -> None:
        previous = {e.name: (e.last_run_at, e.total_run_count) for e, _ in due}
        for entry, slot in due:
            # On time: count from the slot (no drift). Late (a missed period): from now, so
            # the missed runs collapse into this one send.
            period = entry.schedule.next_run_after(slot) - slot
            entry.last_run_at = slot if now - slot < period else now
            entry.total_run_count += 1
        if not self._persist():                                 # write-ahead, fenced
            for entry, _ in due:
                entry.last_run_at, entry.total_run_count = previous[entry.name]
            self._step_down()
            return
        for entry, slot in due:
            task_id = tick_id(entry.name, slot)
            try:
                self.app.send_task(entry.task, entry.args, entry.kwargs, task_id=task_id,
                                   **entry.options)
            except Exception as exc:  # noqa: BLE001 - the next entries still go out
                logger.error("beat: cannot send %s (%s): %s — this tick is lost",
                             entry.name, entry.task, exc)
                continue
            self.sent += 1
            logger.info("Scheduler: Sending due task %s (%s) [%s]", entry.name, entry.task, task_id)

    def _persist(self) -> bool:
        state = self.state()
        if not self.app.transport.save_state(self.lease_name, self.owner, state):
            return False
        self.file.save(state)
        return True

    def state(self) -> dict:
        return {"version": STATE_VERSION, "owner": self.owner, "saved_at": time.time(),
                "entries": {e.name: {"last_run_at": e.last_run_at.timestamp() if e.last_run_at else None,
                                     "total_run_count": e.total_run_count,
                                     "fingerprint": e.fingerprint()}
                            for e in self.entries.values()}}

    def _next_wake(self, now: datetime) -> float:
        wait = min(self.max_interval, self.lease_ttl / 3)       # renew well within the ttl
        for entry in self.entries.values():
            wait = min(wait, (entry.next_slot(now) - now).total_seconds())
        return max(wait, 0.01)


def _merge(broker: dict, local: dict) -> dict[str, dict]:
    """Per entry, the record with the later last run (the broker's wins ties)."""
    out: dict[str, dict] = {}
    for source in (local.get("entries") or {}, broker.get("entries") or {}):
        for name, record in source.items():
            if not isinstance(record, dict):
                continue
            old = out.get(name)
            if old is None or (record.get("last_run_at") or 0) >= (old.get("last_run_at") or 0):
                out[name] = record
    return out


def describe(app: Any, now: datetime | None = None) -> list[dict]:
    """The schedule as ``qctl beat --list`` shows it: entries, last and next runs (from the
    broker's state when there is one), without taking the lease."""
    now = now or utcnow()
    entries = load_entries(app)
    try:
        saved = _merge(app.transport.load_state(app.conf.beat_lease_name) or {}, {})
    except Exception:  # noqa: BLE001 - a listing without the broker still helps
        saved = {}
    rows = []
    for entry in entries.values():
        record = saved.get(entry.name) or {}
        if record.get("fingerprint") == entry.fingerprint():
            entry.last_run_at = from_epoch(record.get("last_run_at"))
            entry.total_run_count = int(record.get("total_run_count") or 0)
        rows.append({"name": entry.name, "task": entry.task, "schedule": entry.schedule.human(),
                     "last_run_at": entry.last_run_at.isoformat() if entry.last_run_at else None,
                     "next_run_at": entry.next_slot(now).isoformat(),
                     "total_run_count": entry.total_run_count,
                     "args": list(entry.args), "kwargs": entry.kwargs, "options": entry.options})
    return rows
