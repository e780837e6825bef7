"""Task message protocol 2: what a client builds and what a worker accepts.

The expected shapes are Celery 5's, as captured in celery-wire.md §1 (headers §1.2, body
§1.3, properties §1.1, the captured messages in §1.5).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import socket
import uuid
import zlib
from datetime import datetime, timedelta, timezone

import pytest

from qctl import serialization
from qctl.exceptions import ContentDisallowed, DecodeError, InvalidTaskError
from qctl.protocol import (TaskMessage, build_task_message, origin_nodename, process_oid,
                           read_headers)
from qctl.transports import Envelope

pytestmark = pytest.mark.timeout(30)

#: Every header key Celery 5 puts on a task message (celery-wire.md §1.2 and §1.5).
CELERY_HEADER_KEYS = {
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
}

TID = "11111111-1111-1111-1111-111111111111"


def body_of(env: Envelope):
    assert env.content_type == "application/json"
    return json.loads(env.body)


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


# -- headers --------------------------------------------------------------------------------


def test_plain_message_headers_match_celery_exactly():
    env = build_task_message("proj.add", (4, 5), task_id=TID)
    h = env.headers
    assert set(h) == CELERY_HEADER_KEYS
    assert h["lang"] == "py"
    assert h["task"] == "proj.add"
    assert h["id"] == TID
    assert h["shadow"] is None
    assert h["eta"] is None and h["expires"] is None
    assert h["group"] is None and h["group_index"] is None
    assert h["retries"] == 0
    assert h["timelimit"] == [None, None]
    assert h["root_id"] == TID
    assert h["parent_id"] is None
    assert h["argsrepr"] == "(4, 5)"
    assert h["kwargsrepr"] == "{}"
    assert h["ignore_result"] is False
    assert h["replaced_task_nesting"] == 0
    assert h["stamped_headers"] is None
    assert h["stamps"] == {}


def test_headers_serialize_as_json_like_celerys_capture():
    env = build_task_message("proj.add", [2, 3], task_id=TID)
    text = json.dumps(env.headers)  # plain JSON types only (AMQP headers, Redis envelope)
    assert json.loads(text) == env.headers


def test_origin_is_gen_pid_at_host():
    env = build_task_message("proj.add", task_id=TID)
    assert env.headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"
    assert re.fullmatch(r"gen\d+@.+", origin_nodename())
    env2 = build_task_message("proj.add", origin="gen1@elsewhere")
    assert env2.headers["origin"] == "gen1@elsewhere"


def test_timelimit_is_hard_then_soft():
    env = build_task_message("proj.add", time_limit=30, soft_time_limit=20)
    assert env.headers["timelimit"] == [30, 20]
    env = build_task_message("proj.add", soft_time_limit=5)
    assert env.headers["timelimit"] == [None, 5]


def test_root_id_defaults_to_id_and_can_be_given():
    env = build_task_message("proj.add")
    assert env.headers["root_id"] == env.headers["id"]
    uuid.UUID(env.headers["id"])  # a generated id is a uuid
    env = build_task_message("proj.add", task_id=TID, root_id="r", parent_id="p",
                             group_id="g", group_index=2, retries=3, shadow="alias",
                             ignore_result=True)
    h = env.headers
    assert (h["root_id"], h["parent_id"], h["group"], h["group_index"]) == ("r", "p", "g", 2)
    assert (h["retries"], h["shadow"], h["ignore_result"]) == (3, "alias", True)


def test_argsrepr_and_kwargsrepr():
    env = build_task_message("proj.add", [2, "x"], {"y": [1, 2]})
    assert env.headers["argsrepr"] == "(2, 'x')"
    assert env.headers["kwargsrepr"] == "{'y': [1, 2]}"
    env = build_task_message("proj.add", [1], argsrepr="(hidden)", kwargsrepr="{hidden}")
    assert env.headers["argsrepr"] == "(hidden)" and env.headers["kwargsrepr"] == "{hidden}"


def test_argsrepr_is_bounded():
    env = build_task_message("proj.add", ["x" * 100_000] + list(range(10_000)))
    assert len(env.headers["argsrepr"]) <= 1024
    assert len(env.headers["kwargsrepr"]) <= 1024


def test_custom_headers_are_merged_at_top_level():
    env = build_task_message("proj.add", task_id=TID, headers={"x_custom": "hello"})
    assert env.headers["x_custom"] == "hello"
    assert "headers" not in env.headers
    assert CELERY_HEADER_KEYS <= set(env.headers)


# -- body -----------------------------------------------------------------------------------


def test_body_is_args_kwargs_embed():
    env = build_task_message("proj.add", (4, 5), task_id=TID)
    assert env.body == (b'[[4, 5], {}, {"callbacks": null, "errbacks": null, '
                        b'"chain": null, "chord": null}]')
    assert env.content_encoding == "utf-8"


def test_body_with_kwargs_and_callbacks():
    cb = {"task": "proj.log_result", "args": [], "kwargs": {}, "options": {},
          "subtask_type": None, "immutable": False}
    eb = dict(cb, task="proj.on_err")
    env = build_task_message("proj.add", [2, 3], {"z": 1}, callbacks=[cb], errbacks=[eb],
                             chain=[dict(cb, task="proj.next")], chord=dict(cb, task="proj.cb"))
    args, kwargs, embed = body_of(env)
    assert args == [2, 3] and kwargs == {"z": 1}
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert embed["callbacks"] == [cb]
    assert embed["errbacks"] == [eb]
    assert embed["chain"] == [dict(cb, task="proj.next")]
    assert embed["chord"] == dict(cb, task="proj.cb")


def test_single_callback_dict_becomes_a_list():
    cb = {"task": "proj.cb", "args": [], "kwargs": {}, "options": {}, "subtask_type": None,
          "immutable": False}
    _, _, embed = body_of(build_task_message("proj.add", callbacks=cb))
    assert embed["callbacks"] == [cb]


def test_body_uses_kombu_type_tags():
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    env = build_task_message("proj.add", [when])
    args, _, _ = body_of(env)
    assert args == [{"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}]


# -- properties -----------------------------------------------------------------------------


def test_properties():
    env = build_task_message("proj.add", task_id=TID)
    p = env.properties
    assert p["correlation_id"] == TID
    assert p["delivery_mode"] == 2
    assert p["priority"] == 0
    assert "expiration" not in p
    uuid.UUID(p["reply_to"])  # a uuid string like kombu's thread_oid
    assert p["reply_to"] == process_oid()  # the same for every message of this process
    env = build_task_message("proj.add", priority=5, reply_to="my-reply-queue")
    assert env.properties["priority"] == 5
    assert env.properties["reply_to"] == "my-reply-queue"


def test_expires_seconds_sets_header_and_expiration_ms():
    before = datetime.now(timezone.utc)
    env = build_task_message("proj.add", expires=3600)
    after = datetime.now(timezone.utc)
    expiration = env.properties["expiration"]
    assert isinstance(expiration, str)
    assert 3_599_000 <= int(expiration) <= 3_600_000
    expires = parse(env.headers["expires"])
    assert expires.utcoffset() == timedelta(0)
    assert before + timedelta(seconds=3600) <= expires <= after + timedelta(seconds=3600)


def test_expires_datetime_and_past_expires():
    when = datetime.now(timezone.utc) + timedelta(minutes=10)
    env = build_task_message("proj.add", expires=when)
    assert parse(env.headers["expires"]) == when
    assert 590_000 <= int(env.properties["expiration"]) <= 600_000
    past = build_task_message("proj.add", expires=datetime.now(timezone.utc) - timedelta(hours=1))
    assert past.properties["expiration"] == "0"


def test_countdown_becomes_absolute_utc_eta():
    before = datetime.now(timezone.utc)
    env = build_task_message("proj.add", countdown=10)
    after = datetime.now(timezone.utc)
    eta_text = env.headers["eta"]
    assert eta_text.endswith("+00:00")
    eta = parse(eta_text)
    assert before + timedelta(seconds=10) <= eta <= after + timedelta(seconds=10)
    assert "countdown" not in env.headers
    assert "countdown" not in env.properties


def test_eta_datetime_is_written_with_offset():
    naive = datetime(2030, 1, 2, 3, 4, 5)
    env = build_task_message("proj.add", eta=naive)
    assert env.headers["eta"] == "2030-01-02T03:04:05+00:00"  # naive means UTC
    aware = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    env = build_task_message("proj.add", eta=aware)
    assert parse(env.headers["eta"]) == aware


def test_compression_header_and_body():
    env = build_task_message("proj.add", [1, 2], task_id=TID, compression="zlib")
    assert env.headers["compression"] == "application/x-gzip"
    assert env.content_type == "application/json"  # stays json, as in kombu
    assert json.loads(zlib.decompress(env.body))[0] == [1, 2]


def test_no_compression_header_without_compression():
    assert "compression" not in build_task_message("proj.add").headers


def test_other_serializer():
    env = build_task_message("proj.add", [1], serializer="pickle")
    assert env.content_type == "application/x-python-serialize"
    assert pickle.loads(env.body)[0] == [1]


# -- reading --------------------------------------------------------------------------------


def test_read_headers_v2_and_decode_body():
    env = build_task_message("proj.add", [2, 3], {"k": 1}, task_id=TID)
    msg = read_headers(env, ["json"])
    assert isinstance(msg, TaskMessage)
    assert msg.id == TID and msg.name == "proj.add"
    assert not msg.body_decoded
    msg.decode_body(["json"])
    assert msg.body_decoded
    assert msg.args == [2, 3] and msg.kwargs == {"k": 1}
    assert msg.embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_decode_body_decompresses():
    env = build_task_message("proj.add", [7], task_id=TID, compression="bzip2")
    msg = read_headers(env, None)
    msg.decode_body(None)
    assert msg.args == [7]


def test_read_headers_converts_protocol_1():
    body = {"task": "proj.add", "id": TID, "args": [1, 2], "kwargs": {"x": 3}, "retries": 2,
            "eta": None, "expires": None, "taskset": "g1", "callbacks": None,
            "errbacks": None, "chord": None, "timelimit": [10, 5]}
    env = Envelope(body=json.dumps(body).encode(), headers={})
    msg = read_headers(env, ["json"])
    assert msg.name == "proj.add" and msg.id == TID
    assert msg.headers["retries"] == 2
    assert msg.headers["group"] == "g1"
    assert msg.headers["root_id"] == TID
    assert list(msg.headers["timelimit"]) == [10, 5]
    assert msg.body_decoded
    assert msg.args == [1, 2] and msg.kwargs == {"x": 3}
    msg.decode_body(["json"])  # already decoded: a no-op
    assert msg.args == [1, 2]


def test_protocol_1_body_is_refused_unless_accepted(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    env = Envelope(body=pickle.dumps(Evil()), headers={},
                   content_type="application/x-python-serialize", content_encoding="binary")
    with pytest.raises(ContentDisallowed):
        read_headers(env, ["json"])
    assert not marker.exists()


def test_decode_body_enforces_accept(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    env = build_task_message("proj.add", [1], task_id=TID, serializer="pickle")
    env.body = pickle.dumps([[Evil()], {}, {}])
    msg = read_headers(env, None)  # headers are fine to read
    with pytest.raises(ContentDisallowed):
        msg.decode_body(None)
    with pytest.raises(ContentDisallowed):
        msg.decode_body(["json", "yaml"])
    assert not marker.exists()
    assert not msg.body_decoded
    msg.decode_body(["pickle"])
    assert marker.exists()


def test_decode_body_yaml_when_accepted():
    env = build_task_message("proj.add", [1, 2], {"a": "b"}, serializer="yaml")
    msg = read_headers(env, ["yaml"])
    with pytest.raises(ContentDisallowed):
        msg.decode_body(["json"])
    msg.decode_body(["application/x-yaml"])
    assert msg.args == [1, 2] and msg.kwargs == {"a": "b"}


@pytest.mark.parametrize("drop", ["id", "task"])
def test_read_headers_rejects_missing_id_or_task(drop):
    # Without a ``task`` header it could only be protocol 1, and this body is not.
    env = build_task_message("proj.add", [1], task_id=TID)
    del env.headers[drop]
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


def test_read_headers_rejects_empty_id():
    env = build_task_message("proj.add", task_id=TID)
    env.headers["id"] = ""
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


@pytest.mark.parametrize("value", ["", None, 5])
def test_read_headers_rejects_bad_task_name(value):
    env = build_task_message("proj.add", task_id=TID)
    env.headers["task"] = value
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


@pytest.mark.parametrize("value", [5, "30", [1], [1, 2, 3], {"hard": 1}])
def test_read_headers_rejects_bad_timelimit(value):
    env = build_task_message("proj.add", task_id=TID)
    env.headers["timelimit"] = value
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


@pytest.mark.parametrize("key", ["eta", "expires"])
def test_read_headers_rejects_bad_times(key):
    env = build_task_message("proj.add", task_id=TID)
    env.headers[key] = "tomorrow at noon"
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


def test_read_headers_accepts_celery_captured_headers():
    # The headers of celery-wire.md §1.5, verbatim.
    headers = {"lang": "py", "task": "proj.add", "id": TID, "shadow": None,
               "eta": "2026-11-21T22:20:36.775902+00:00",
               "expires": "2026-11-21T23:20:26.775902+00:00", "group": None,
               "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": TID,
               "parent_id": None, "argsrepr": "(2, 3)", "kwargsrepr": "{}",
               "origin": "gen5463@vm", "ignore_result": False, "replaced_task_nesting": 0,
               "stamped_headers": None, "stamps": {}}
    body = (b'[[2, 3], {}, {"callbacks": [{"task": "proj.log_result", "args": [], "kwargs": {}, '
            b'"options": {}, "subtask_type": null, "immutable": false}], "errbacks": null, '
            b'"chain": null, "chord": null}]')
    msg = read_headers(Envelope(body=body, headers=headers), ["json"])
    msg.decode_body(["json"])
    assert msg.args == [2, 3]
    assert msg.embed["callbacks"][0]["task"] == "proj.log_result"


@pytest.mark.parametrize("value", [["a", "b"], [[1], None], [None, {"s": 1}]])
def test_read_headers_rejects_non_numeric_timelimit_values(value):
    """A [hard, soft] pair of non-numbers is a bad timelimit too: the worker would only
    fail later, when it arms the timers."""
    env = build_task_message("proj.add", task_id=TID)
    env.headers["timelimit"] = value
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


def test_read_headers_rejects_non_integer_retries():
    env = build_task_message("proj.add", task_id=TID)
    env.headers["retries"] = "1"
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


def test_read_headers_timelimit_floats_and_naive_eta():
    env = build_task_message("proj.add", task_id=TID)
    env.headers["timelimit"] = [20.0, 10.0]
    env.headers["eta"] = "2030-01-01T00:00:00"
    read_headers(env, ["json"])


def test_headers_that_are_not_a_dict():
    env = Envelope(body=b"[[], {}, {}]", headers=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError):
        read_headers(env, ["json"])


@pytest.mark.parametrize("body", [b'{"a": 1}', b"[1, 2]", b'["x", {}, {}]', b"[[], [], {}]"])
def test_decode_body_rejects_bodies_that_are_not_tasks(body):
    env = build_task_message("proj.add", task_id=TID)
    env.body = body
    msg = read_headers(env, ["json"])
    with pytest.raises(InvalidTaskError):
        msg.decode_body(["json"])


def test_decode_body_bad_json_is_decode_error():
    env = build_task_message("proj.add", task_id=TID)
    env.body = b"[[1], {"
    msg = read_headers(env, ["json"])
    with pytest.raises(DecodeError):
        msg.decode_body(["json"])


def test_serialization_module_and_protocol_agree_on_accept():
    # accept may be a frozenset of content types (what workers precompute)
    allowed = serialization.accepted_content_types(["json"])
    env = build_task_message("proj.add", [3], task_id=TID)
    msg = read_headers(env, allowed)
    msg.decode_body(allowed)
    assert msg.args == [3]
