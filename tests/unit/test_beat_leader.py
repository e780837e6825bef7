"""Two schedulers on one broker, in one process (threads): one sends, none sends a tick twice,
the lead moves on a clean stop and on a lost lease — on memory, sqlite, redis and amqp."""
from __future__ import annotations

import collections
import threading
import time
import uuid

import pytest

from qctl import App
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["memory", "sqlite", "redis", "amqp"])
def broker_url(request, tmp_path):
    if request.param == "memory":
        return f"memory://beat-{uuid.uuid4().hex[:6]}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'beat.sqlite3'}"
    return request.getfixturevalue(f"{request.param}_urls")[0]


def make_app(url: str, lease: str, ttl: float = 2.0) -> App:
    app = App("beatproj", broker=url, backend="memory://", set_as_current=False)
    app.conf.update(beat_lease_name=lease, beat_lease_ttl=ttl, task_default_queue=f"q-{lease}",
                    beat_schedule={"half": {"task": "beatproj.tick", "schedule": 0.5}})
    return app


def sent_ids(app: App, queue: str) -> list[str]:
    transport, ids = app.transport, []
    while True:
        batch = transport.fetch([queue], 500, 0.5)
        if not batch:
            return ids
        ids += [d.envelope.headers["id"] for d in batch]
        transport.ack([d.tag for d in batch])


class Running:
    def __init__(self, app: App, schedule_file: str | None) -> None:
        from qctl_worker.beat import Beat
        self.beat = Beat(app, schedule_file=schedule_file, max_interval=0.5)
        self.thread = threading.Thread(target=self.beat.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.beat.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_one_sender_and_a_clean_handover(broker_url, tmp_path):
    lease = f"lead-{uuid.uuid4().hex[:8]}"
    apps = [make_app(broker_url, lease) for _ in range(3)]
    apps[2].transport.declare_queue(f"q-{lease}")
    first = Running(apps[0], str(tmp_path / "a.json"))
    second = Running(apps[1], str(tmp_path / "b.json"))
    both = (first, second)
    overlap = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:                      # never two leaders at once
        overlap.append(sum(r.beat.leader for r in both))
        time.sleep(0.01)
    assert max(overlap) == 1, "two schedulers led at once"
    leader = first if first.beat.leader else second
    standby = second if leader is first else first
    assert leader.beat.sent >= 3 and standby.beat.sent == 0

    leader.stop()                                           # releases the lease
    wait_for(lambda: standby.beat.leader, 5, message="the standby did not take over")
    wait_for(lambda: standby.beat.sent >= 3, 10)
    standby.stop()
    ids = sent_ids(apps[2], f"q-{lease}")
    counts = collections.Counter(ids)
    assert len(ids) == leader.beat.sent + standby.beat.sent
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
    for app in apps:
        app.close()


def test_a_leader_that_lost_its_lease_sends_nothing(broker_url, tmp_path):
    """Fencing: the state write before a send fails once another owner holds the lease."""
    from qctl_worker.beat import Beat
    lease = f"fence-{uuid.uuid4().hex[:8]}"
    old_app, new_app = make_app(broker_url, lease, ttl=1.0), make_app(broker_url, lease, ttl=1.0)
    old = Beat(old_app, schedule_file=str(tmp_path / "old.json"))
    assert old.tick() is not None and old.leader
    if broker_url.startswith("amqp"):
        old_app.transport.close()                           # the lease dies with its connection
    else:
        wait_for(lambda: new_app.transport.acquire_lease(lease, "intruder", 30.0), 10)
    assert not old._persist()                               # fenced: no write, so no send
    before = old.sent
    if not broker_url.startswith("amqp"):
        old.tick()
        assert not old.leader and old.sent == before
    for app in (old_app, new_app):
        app.close()


def test_add_periodic_task_entries_are_sent_like_any_task(tmp_path):
    """Entries from on_after_configure + add_periodic_task, with routing and options."""
    from qctl_worker.beat import Beat
    url = f"memory://periodic-{uuid.uuid4().hex[:6]}"
    app = App("periodic", broker=url, backend="memory://", set_as_current=False)

    @app.task
    def ping(word):
        return word

    @app.on_after_configure.connect
    def setup(sender, **kwargs):
        sender.add_periodic_task(0.2, ping.s("hello"), name="ping-often",
                                 queue="other", priority=7, expires=60)

    app.finalize()
    beat = Beat(app, schedule_file=str(tmp_path / "s.json"), max_interval=0.1)
    assert set(beat.entries) == {"ping-often"}
    thread = threading.Thread(target=beat.run_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: beat.sent >= 2, 10)
    finally:
        beat.stop()
        thread.join(10)
    batch = app.transport.fetch(["other"], 10, 1.0)
    assert len(batch) >= 2
    headers = batch[0].envelope.headers
    assert headers["task"] == ping.name and headers["argsrepr"] == "('hello',)"
    assert headers["expires"] is not None
    assert app.transport.queue_size("celery") == 0
