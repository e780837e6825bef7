"""Messages a worker cannot run (SPEC §10, §11): each is logged once with a clear message, moved
to the dead-letter queue with the reason, and the worker keeps working."""
from __future__ import annotations

import json
import pickle
import re
import sqlite3
import time
import uuid

import pytest

from qctl import protocol, states
from qctl.exceptions import WorkerLostError
from qctl.transports import Envelope
from tests.helpers import pid_alive, wait_for

pytestmark = pytest.mark.timeout(120)

GET = 15


@pytest.fixture(scope="module")
def worker(module_project):
    return module_project.start_worker("-c", "2", "-P", "prefork")


@pytest.fixture(scope="module")
def app(module_project, worker):
    return module_project.client()


def dead_letter_for(app, task_id: str):
    for letter in app.transport.dead_letters(10000):
        if letter.envelope is not None and letter.envelope.headers.get("id") == task_id:
            return letter
    return None


def error_lines(worker, needle: str) -> list[str]:
    return [line for line in worker.log().splitlines()
            if needle in line and re.search(r": (ERROR|CRITICAL|WARNING)/", line)]


def check_handled(app, worker, task_id: str, reason: str, log: str, *, letter=None):
    """The message is a dead letter whose reason matches ``reason``, exactly one warning/error
    line mentions it and matches ``log``, the worker still runs and takes the next task."""
    if letter is None:
        letter = wait_for(lambda: dead_letter_for(app, task_id), GET,
                          message=lambda: "no dead letter\n" + worker.tail())
    assert re.search(reason, letter.reason, re.I), letter.reason
    worker.wait_log(re.escape(task_id))
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42   # next good task
    lines = error_lines(worker, task_id)
    assert len(lines) == 1, "\n".join(lines) or worker.tail()
    assert re.search(log, lines[0], re.I), lines[0]
    assert worker.alive()
    return letter


def task_envelope(name: str, args=(), kwargs=None, **headers) -> Envelope:
    envelope = protocol.build_task_message(name, args, kwargs)
    envelope.headers.update(headers)
    return envelope


def test_unknown_task_name(app, worker):
    result = app.send_task("proj.nope", args=[1])
    letter = check_handled(app, worker, result.id, r"unregistered task 'proj\.nope'",
                           r"unregistered task.*proj\.nope")
    assert letter.queue == "celery"


def test_undecodable_body(app, worker):
    envelope = task_envelope("proj.add", (1, 2))
    envelope.body = b"\xff{not json"
    envelope.content_type = "application/json"
    app.transport.publish("celery", envelope)
    letter = check_handled(app, worker, envelope.headers["id"], r"decode", r"decode")
    assert letter.envelope.body == b"\xff{not json"   # kept as it came, for inspection


def test_body_that_is_not_a_task_body(app, worker):
    envelope = task_envelope("proj.add", (1, 2))
    envelope.body = json.dumps({"hello": "world"}).encode()
    app.transport.publish("celery", envelope)
    check_handled(app, worker, envelope.headers["id"], r"args, kwargs, embed", r"args, kwargs")


class _Unpickled:
    """Unpickling this creates ``path``: proof that a refused body was deserialized."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refused_content_type_is_never_deserialized(app, worker, module_project):
    marker = module_project.path / f"UNPICKLED-{uuid.uuid4().hex}"
    envelope = task_envelope("proj.add")
    envelope.body = pickle.dumps([[_Unpickled(str(marker)), 1], {}, {}], protocol=4)
    envelope.content_type = "application/x-python-serialize"
    envelope.content_encoding = "binary"
    app.transport.publish("celery", envelope)
    letter = check_handled(app, worker, envelope.headers["id"],
                           r"content type.*application/x-python-serialize",
                           r"application/x-python-serialize")
    assert letter.envelope.body == envelope.body
    assert not marker.exists(), "the worker unpickled a refused message"


def test_wrong_arguments(app, worker):
    result = app.send_task("proj.add", args=[1])
    check_handled(app, worker, result.id, r"argument.*'y'", r"argument.*'y'")
    assert result.state == states.FAILURE


def new_dead_letters(app, before: set) -> list:
    return [d for d in app.transport.dead_letters(10000) if d.id not in before]


def new_error_lines(worker, mark: int, pattern: str) -> list[str]:
    return [line for line in worker.log().splitlines()[mark:]
            if re.search(r": (ERROR|CRITICAL|WARNING)/", line) and re.search(pattern, line)]


@pytest.mark.parametrize("headers, reason", [
    ({"id": None}, r"'id' header"),
    ({"timelimit": 5}, r"timelimit"),
    ({"retries": "many"}, r"retries"),
    ({"eta": "tomorrow-ish"}, r"bad time"),
    ({"expires": "never"}, r"bad time"),
    ({"task": 42}, r"'task' header"),
], ids=["no-id", "timelimit", "retries", "eta", "expires", "task-not-a-name"])
def test_malformed_headers(app, worker, headers, reason):
    envelope = task_envelope("proj.add", (1, 2))
    envelope.headers.update(headers)
    before = {d.id for d in app.transport.dead_letters(10000)}
    mark = len(worker.log().splitlines())
    app.transport.publish("celery", envelope)
    (letter,) = wait_for(lambda: new_dead_letters(app, before), GET,
                         message=lambda: worker.tail())
    assert re.search(reason, letter.reason), letter.reason
    assert letter.envelope is not None and letter.envelope.headers == envelope.headers
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42
    lines = new_error_lines(worker, mark, r".")
    assert len(lines) == 1, worker.tail()
    assert "dead-letter" in lines[0] and re.search(reason, lines[0]), lines[0]
    assert worker.alive()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("headers_text, reason", [
    ("{not json", r"headers are not valid JSON"),
    ("[1, 2]", r"headers are not a JSON object"),
], ids=["not-json", "not-an-object"])
def test_malformed_row(app, worker, module_project, headers_text, reason):
    """A row whose headers cannot even be read (written by something other than qctl)."""
    body = f"[[{uuid.uuid4().int % 1000}, 2], {{}}, {{}}]".encode()
    before = {d.id for d in app.transport.dead_letters(10000)}
    mark = len(worker.log().splitlines())
    conn = sqlite3.connect(str(module_project.db_path), timeout=30, isolation_level=None)
    try:
        now = time.time()
        tag = conn.execute(
            "INSERT INTO messages (queue, priority, visible_at, exchange, routing_key, headers,"
            " properties, content_type, content_encoding, body, created)"
            " VALUES ('celery', 0, ?, '', 'celery', ?, '{}', 'application/json', 'utf-8', ?, ?)",
            (now, headers_text, body, now)).lastrowid
    finally:
        conn.close()
    (letter,) = wait_for(lambda: new_dead_letters(app, before), GET,
                         message=lambda: worker.tail())
    assert re.search(reason, letter.reason), letter.reason
    assert letter.queue == "celery"
    assert letter.raw == body
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42
    lines = new_error_lines(worker, mark, r".")
    assert len(lines) == 1, worker.tail()
    assert f"#{tag} " in lines[0] and re.search(reason, lines[0]), lines[0]
    assert worker.alive()


def test_task_that_kills_its_process(app, worker, module_project):
    result = app.send_task("proj.suicide")
    with pytest.raises(WorkerLostError):
        result.get(timeout=GET)
    (run,) = module_project.runs("suicide", result.id)
    wait_for(lambda: not pid_alive(run["pid"]), 10)
    check_handled(app, worker, result.id, r"process died.*(SIGKILL|signal 9)",
                  r"(SIGKILL|signal 9)")
    assert len(module_project.runs("suicide", result.id)) == 1


def test_acks_late_task_that_keeps_killing_its_process(app, worker, module_project):
    """acks_late + reject_on_worker_lost: redelivered, then dead-lettered after N crashes."""
    result = app.send_task("proj.suicide_late")
    letter = wait_for(lambda: dead_letter_for(app, result.id), 30,
                      message=lambda: worker.tail())
    assert re.search(r"process died 3 times", letter.reason), letter.reason
    assert app.send_task("proj.add", (20, 22)).get(timeout=GET) == 42
    assert len(module_project.runs("suicide_late", result.id)) == 3
    dead_lines = [line for line in error_lines(worker, result.id) if "dead-letter" in line]
    assert len(dead_lines) == 1, worker.tail()
    assert worker.alive()
