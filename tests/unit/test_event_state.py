"""qctl.events without a broker process: decoding (task.multi lists, malformed bodies), the
receiver on the in-memory transport, State folding with fake clocks, and dump lines."""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import uuid

import pytest

from qctl import App
from qctl.events import EventReceiver, State, decode_events, event_line
from qctl.transports import ControlMessage

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0


def worker_event(kind: str, hostname: str = "w1@vm", timestamp: float = T0, **fields):
    event = {"hostname": hostname, "utcoffset": 0.0, "pid": 4242, "clock": 1, "freq": 2.0,
             "active": 0, "processed": 0, "loadavg": [0.5, 0.25, 0.1], "sw_ident": "py-qctl",
             "sw_ver": "0.1.0", "sw_sys": "Linux", "timestamp": timestamp, "type": kind}
    event.update(fields)
    return event


def task_event(kind: str, task_id: str, hostname: str = "w1@vm", timestamp: float = T0,
               **fields):
    return {"hostname": hostname, "utcoffset": 0.0, "pid": 4242, "clock": 2, "uuid": task_id,
            **fields, "timestamp": timestamp, "type": kind}


def received(task_id: str, **kw):
    fields = {"name": "proj.add", "args": "(2, 2)", "kwargs": "{}", "root_id": task_id,
              "parent_id": None, "retries": 0, "eta": None, "expires": None, **kw}
    return task_event("task-received", task_id, **fields)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- decoding ---------------------------------------------------------------------------------


def test_decode_single_object_and_task_multi_list():
    one = worker_event("worker-heartbeat")
    assert decode_events(json.dumps(one).encode()) == [one]
    batch = [task_event("task-failed", "a", exception="ValueError('boom')", traceback="Tb"),
             received("b")]
    assert decode_events(json.dumps(batch).encode()) == batch


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", b"42", b'"text"', b"null",
                                  b'{"no": "type"}', b'{"type": 3}', b'{"type": ""}', b"[]",
                                  b"[1, 2, [3]]"])
def test_decode_skips_malformed_bodies(body):
    assert decode_events(body) == []


def test_decode_keeps_the_good_items_of_a_list_and_fills_hostname_from_headers():
    good = {"type": "task-started", "uuid": "x", "timestamp": T0}
    body = json.dumps([good, "junk", {"type": None}, 7]).encode()
    assert decode_events(body, {"hostname": "w9@vm"}) == [{**good, "hostname": "w9@vm"}]


# -- the receiver, on the in-memory transport ---------------------------------------------------


@pytest.fixture
def memory_app():
    app = App("evtest", broker=f"memory://events-{uuid.uuid4().hex}", backend="cache+memory://",
              set_as_current=False)
    yield app
    app.close()


def _send(app, body, routing_key="worker.heartbeat", headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    app.transport.broadcast(app.conf.event_exchange, ControlMessage(raw, headers or {}, routing_key))


def test_receiver_flattens_task_multi_and_skips_malformed(memory_app):
    seen = []
    receiver = EventReceiver(memory_app, handlers={"*": seen.append}, clock=lambda: 123.0)
    with receiver:
        _send(memory_app, worker_event("worker-online"), "worker.online")
        _send(memory_app, b"{broken", "worker.heartbeat")
        _send(memory_app, [received("t1"), task_event("task-started", "t1"),
                           task_event("task-succeeded", "t1", result="4", runtime=0.01)],
              "task.multi")
        _send(memory_app, ["junk", task_event("task-started", "t2")], "task.multi")
        _send(memory_app, b"[1, 2", "task.multi")
        count = receiver.capture(limit=5, timeout=5, wakeup=False)
    assert count == 5
    assert [e["type"] for e in seen] == ["worker-online", "task-received", "task-started",
                                         "task-succeeded", "task-started"]
    assert [e.get("uuid") for e in seen[1:]] == ["t1", "t1", "t1", "t2"]
    assert all(e["local_received"] == 123.0 for e in seen)


def test_receiver_handlers_by_type_and_limits(memory_app):
    succeeded, other = [], []
    receiver = EventReceiver(memory_app, handlers={"task-succeeded": succeeded.append,
                                                   "*": other.append})
    receiver.subscribe()
    try:
        for i in range(3):
            _send(memory_app, [task_event("task-succeeded", f"s{i}", result=str(i), runtime=0.1)],
                  "task.multi")
        _send(memory_app, worker_event("worker-heartbeat"))
        assert receiver.capture(limit=4, timeout=5, wakeup=False) == 4
        assert [e["uuid"] for e in succeeded] == ["s0", "s1", "s2"]
        assert [e["type"] for e in other] == ["worker-heartbeat"]
        # nothing more: the timeout ends it, having handled nothing
        assert receiver.capture(timeout=0.2, wakeup=False) == 0
        assert list(receiver.iter_events(timeout=0.2)) == []
    finally:
        receiver.close()
        receiver.close()  # idempotent


def test_receiver_only_sees_events_sent_after_subscribing(memory_app):
    _send(memory_app, worker_event("worker-heartbeat", hostname="early@vm"))
    receiver = EventReceiver(memory_app).subscribe()
    try:
        _send(memory_app, worker_event("worker-heartbeat", hostname="late@vm"))
        events = list(receiver.iter_events(timeout=5, limit=1))
        assert [e["hostname"] for e in events] == ["late@vm"]
    finally:
        receiver.close()


def test_should_stop_ends_capture(memory_app):
    receiver = EventReceiver(memory_app)

    def stop(event):
        receiver.should_stop = True
    receiver.handlers["*"] = stop
    with receiver:
        for _ in range(3):
            _send(memory_app, worker_event("worker-heartbeat"))
        assert receiver.capture(timeout=5, wakeup=False) == 1


def test_receiver_survives_a_lost_connection():
    from types import SimpleNamespace

    from qctl.exceptions import OperationalError

    class FlakySubscription:
        def __init__(self, script):
            self.script, self.closed = script, False

        def get(self, timeout):
            step = self.script.pop(0) if self.script else []
            if isinstance(step, Exception):
                raise step
            return step

        def close(self):
            self.closed = True

    beat = ControlMessage(json.dumps(worker_event("worker-heartbeat")).encode(), {}, "worker.heartbeat")
    subscriptions = [FlakySubscription([OperationalError("gone")]),
                     OperationalError("still down"),
                     FlakySubscription([[beat]])]

    def subscribe(exchange, pattern):
        item = subscriptions.pop(0)
        if isinstance(item, Exception):
            raise item
        return item
    first = subscriptions[0]
    app = SimpleNamespace(conf=SimpleNamespace(event_exchange="celeryev"),
                          transport=SimpleNamespace(subscribe=subscribe))
    receiver = EventReceiver(app)
    assert receiver.poll(0) == []          # the connection drops
    assert str(receiver.last_error) == "gone" and first.closed
    assert receiver.poll(0) == []          # cannot subscribe again yet
    assert str(receiver.last_error) == "still down"
    events = receiver.poll(0)              # back
    assert [e["type"] for e in events] == ["worker-heartbeat"] and receiver.last_error is None


def test_the_first_subscribe_error_reaches_the_caller():
    from types import SimpleNamespace

    from qctl.exceptions import OperationalError

    def subscribe(exchange, pattern):
        raise OperationalError("broker down")
    app = SimpleNamespace(conf=SimpleNamespace(event_exchange="celeryev"),
                          transport=SimpleNamespace(subscribe=subscribe))
    with pytest.raises(OperationalError):
        list(EventReceiver(app).iter_events(timeout=1))


# -- State: workers ---------------------------------------------------------------------------


def test_worker_heartbeats_fold_into_workers():
    clock = FakeClock()
    state = State(clock=clock)
    state.event(worker_event("worker-online", processed=0))
    clock.now += 2
    w = state.event(worker_event("worker-heartbeat", timestamp=T0 + 2, processed=7, active=2,
                                 loadavg=[1.5, 1.0, 0.5]))
    assert w is state.workers["w1@vm"]
    assert (w.status, w.processed, w.active, w.loadavg) == ("online", 7, 2, [1.5, 1.0, 0.5])
    assert w.freq == 2.0 and w.pid == 4242 and w.sw_ident == "py-qctl"
    assert w.last_heartbeat == T0 + 2 and w.timestamp == T0 + 2
    assert w.heartbeat_expires == T0 + 6
    assert [x.hostname for x in state.alive_workers()] == ["w1@vm"]
    snap = state.snapshot()["workers"]["w1@vm"]
    assert snap["status"] == "online" and snap["processed"] == 7


def test_worker_goes_offline_after_two_heartbeat_intervals():
    clock = FakeClock()
    state = State(clock=clock)
    state.event(worker_event("worker-heartbeat"))
    w = state.workers["w1@vm"]
    clock.now = T0 + 3.9
    assert w.status == "online"
    clock.now = T0 + 4.0  # 2 x freq (2.0) without a word: offline, as Celery's State says
    assert w.status == "offline" and state.alive_workers() == []
    clock.now = T0 + 4.5
    state.event(worker_event("worker-heartbeat", timestamp=T0 + 4.5))
    assert w.status == "online"
    # a different freq (e.g. `control heartbeat` sends freq 5) moves the deadline
    state.event(worker_event("worker-heartbeat", timestamp=T0 + 4.5, freq=5.0))
    assert w.alive_at(T0 + 14.4) and not w.alive_at(T0 + 14.5)


def test_liveness_uses_the_arrival_time_not_the_senders_clock():
    clock = FakeClock(T0 + 100)
    state = State(clock=clock)
    # a worker whose clock is 100 s behind ours is still online when its heartbeats arrive
    state.event(worker_event("worker-heartbeat", timestamp=T0))
    assert state.workers["w1@vm"].status == "online"
    # an explicit arrival time (what EventReceiver adds) wins over the state's clock
    state.event(worker_event("worker-heartbeat", hostname="w2@vm", local_received=T0 + 90))
    assert state.workers["w2@vm"].status == "offline"


def test_worker_offline_event_and_task_events_count_as_life():
    clock = FakeClock()
    state = State(clock=clock)
    state.event(worker_event("worker-online"))
    state.event(worker_event("worker-offline", timestamp=T0 + 1))
    w = state.workers["w1@vm"]
    assert w.status == "offline" and w.offline
    clock.now = T0 + 1.5  # it came back and did work: a task event is a sign of life
    state.event(received("t1", timestamp=T0 + 1.5))
    assert w.status == "online"
    clock.now = T0 + 5.4
    assert w.status == "online"  # 1.5 + 4 > 5.4
    clock.now = T0 + 5.5
    assert w.status == "offline"


def test_worker_events_without_hostname_are_ignored():
    state = State()
    assert state.event({"type": "worker-heartbeat", "timestamp": T0}) is None
    assert state.event({"type": "task-started", "timestamp": T0}) is None  # no uuid
    assert state.event({"nothing": 1}) is None
    assert state.workers == {} and state.tasks == {}


# -- State: tasks ----------------------------------------------------------------------------


def test_task_lifecycle_success():
    state = State(clock=FakeClock())
    state.event(received("t1", timestamp=T0))
    t = state.tasks["t1"]
    assert (t.state, t.name, t.args, t.kwargs, t.worker, t.received) == (
        "RECEIVED", "proj.add", "(2, 2)", "{}", "w1@vm", T0)
    state.event(task_event("task-started", "t1", timestamp=T0 + 0.1))
    assert t.state == "STARTED" and t.started == T0 + 0.1
    state.event(task_event("task-succeeded", "t1", timestamp=T0 + 0.2, result="4", runtime=0.001))
    assert (t.state, t.result, t.runtime, t.succeeded, t.timestamp) == (
        "SUCCESS", "4", 0.001, T0 + 0.2, T0 + 0.2)
    assert t.ready
    d = t.as_dict()
    assert d["uuid"] == "t1" and d["state"] == "SUCCESS" and d["worker"] == "w1@vm"
    assert state.task_count == 1 and state.event_count == 3


def test_task_failure_retry_revoke_reject():
    state = State(clock=FakeClock())
    state.event(task_event("task-failed", "f", exception="ValueError('boom')", traceback="Tb..."))
    f = state.tasks["f"]
    assert (f.state, f.exception, f.traceback) == ("FAILURE", "ValueError('boom')", "Tb...")
    state.event(received("r"))
    state.event(task_event("task-retried", "r", timestamp=T0 + 1, exception="None", traceback=""))
    assert state.tasks["r"].state == "RETRY"
    state.event(received("r", timestamp=T0 + 2, retries=1))  # received again after a retry
    assert state.tasks["r"].state == "RECEIVED" and state.tasks["r"].retries == 1
    state.event(task_event("task-revoked", "v", terminated=True, signum=9, expired=False))
    v = state.tasks["v"]
    assert v.state == "REVOKED" and v.info == {"terminated": True, "signum": 9, "expired": False}
    state.event(task_event("task-rejected", "j", requeue=False))
    assert state.tasks["j"].state == "REJECTED" and state.tasks["j"].info["requeue"] is False


def test_events_out_of_order_never_move_a_task_back():
    state = State(clock=FakeClock())
    state.event(task_event("task-succeeded", "t", timestamp=T0 + 2, result="4", runtime=0.5))
    state.event(task_event("task-started", "t", timestamp=T0 + 1))
    state.event(received("t", timestamp=T0))
    t = state.tasks["t"]
    assert t.state == "SUCCESS" and t.timestamp == T0 + 2
    # what the earlier events knew is merged in: the name and arguments, and their times
    assert (t.name, t.args, t.received, t.started) == ("proj.add", "(2, 2)", T0, T0 + 1)
    assert t.result == "4"


def test_task_sent_is_from_the_client_not_a_worker():
    state = State(clock=FakeClock())
    state.event(task_event("task-sent", "s", hostname="gen99@vm", name="proj.add", queue="celery"))
    s = state.tasks["s"]
    assert (s.state, s.client, s.worker, s.info["queue"]) == ("PENDING", "gen99@vm", None, "celery")
    assert "gen99@vm" not in state.workers
    state.event(received("s"))
    assert s.state == "RECEIVED" and s.worker == "w1@vm"


def test_only_the_most_recent_tasks_are_kept():
    state = State(max_tasks=3, clock=FakeClock())
    for i in range(5):
        state.event(received(f"t{i}"))
    assert list(state.tasks) == ["t2", "t3", "t4"]
    state.event(task_event("task-started", "t2"))  # updated: now the most recent
    state.event(received("t5"))
    assert list(state.tasks) == ["t4", "t2", "t5"]
    assert [t.uuid for t in state.recent_tasks()] == ["t5", "t2", "t4"]
    assert [t.uuid for t in state.recent_tasks(2)] == ["t5", "t2"]
    assert state.task_count == 6


def test_state_as_receiver_handler(memory_app):
    state = State()
    with EventReceiver(memory_app, handlers={"*": state.event}) as receiver:
        _send(memory_app, worker_event("worker-heartbeat", processed=3))
        _send(memory_app, [received("m1"), task_event("task-succeeded", "m1", result="4",
                                                      runtime=0.002)], "task.multi")
        receiver.capture(limit=3, timeout=5, wakeup=False)
    assert state.workers["w1@vm"].status == "online"
    assert state.workers["w1@vm"].processed == 3
    assert state.tasks["m1"].state == "SUCCESS" and state.tasks["m1"].result == "4"


# -- dump lines --------------------------------------------------------------------------------


def local(ts: float) -> str:
    moment = _dt.datetime.fromtimestamp(ts)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def test_event_line_task_succeeded():
    ts = T0 + 0.123
    line = event_line(task_event("task-succeeded", "abc", timestamp=ts, result="4", runtime=0.001))
    assert line == f"w1@vm [{local(ts)}]: task-succeeded uuid=abc result=4 runtime=0.001"


def test_event_line_received_failed_and_worker():
    line = event_line(received("abc"))
    assert line == f"w1@vm [{local(T0)}]: task-received uuid=abc name=proj.add args=(2, 2) kwargs={{}}"
    line = event_line(task_event("task-failed", "abc", exception="ValueError('boom')",
                                 traceback="Traceback (most recent call last):\n  ...\nValueError"))
    assert line == f"w1@vm [{local(T0)}]: task-failed uuid=abc exception=ValueError('boom')"
    line = event_line(worker_event("worker-heartbeat", active=1, processed=9))
    assert line == (f"w1@vm [{local(T0)}]: worker-heartbeat active=1 processed=9 "
                    f"loadavg=0.5,0.25,0.1 freq=2.0")
    line = event_line(task_event("task-revoked", "abc", terminated=True, signum=None, expired=False))
    assert line.endswith("task-revoked uuid=abc terminated=True expired=False")


def test_event_line_is_one_line_and_survives_odd_events():
    line = event_line(task_event("task-succeeded", "x", result="'a\nb'", runtime=1.5))
    assert "\n" not in line and "result='a\\nb'" in line and "runtime=1.5" in line
    assert event_line({"type": "custom-thing", "b": {"k": 1}, "a": [1, "x"]}) == \
        "? [?]: custom-thing a=1,x b={\"k\": 1}"
    assert event_line({}).startswith("? [?]: ?")
    assert event_line({"type": "task-started", "timestamp": "garbage", "hostname": "h"}) == \
        "h [?]: task-started"


# -- the library stays light -------------------------------------------------------------------


def test_importing_qctl_events_imports_no_cli_rich_or_broker_client():
    code = ("import sys, qctl.events\n"
            "bad = [m for m in ('click', 'rich', 'redis', 'pika', 'qctl_worker', 'qctl.cli') "
            "if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# -- the CLI's rendering (no broker) ------------------------------------------------------------


def test_live_view_renders_workers_and_tasks():
    from rich.console import Console

    from qctl.cli.events import render

    clock = FakeClock()
    state = State(clock=clock)
    state.event(worker_event("worker-heartbeat", processed=5, active=1))
    state.event(worker_event("worker-heartbeat", hostname="w2@vm", timestamp=T0 - 10,
                             local_received=T0 - 10))
    state.event(received("t1"))
    state.event(task_event("task-succeeded", "t1", result="4", runtime=0.0012))
    state.event(task_event("task-failed", "t2", exception="ValueError('[bold]boom')"))
    console = Console(width=160, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(render(state, now=T0 + 1, height=40))
    text = console.export_text()
    assert "1 worker(s) online, 1 offline" in text
    assert "w1@vm" in text and "online" in text and "w2@vm" in text and "offline" in text
    assert "0.50 0.25 0.10" in text
    assert "t1" in text and "SUCCESS" in text and "4 in 1.2ms" in text
    assert "ValueError('[bold]boom')" in text  # no markup: printed as it is
