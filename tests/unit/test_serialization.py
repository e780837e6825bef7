"""Serializers and compression: kombu's JSON type tags, accept_content, opt-in codecs.

The JSON shapes are the ones in celery-wire.md §1.4 (kombu ``kombu/utils/json.py``), so a
Celery peer reads what qctl writes and the other way round.
"""
from __future__ import annotations

import base64
import bz2
import datetime as dt
import decimal
import json
import pickle
import uuid
import zlib

import pytest

from qctl import serialization
from qctl.exceptions import ContentDisallowed, DecodeError
from qctl.serialization import (accepted_content_types, compress, decompress, dumps, json_dumps,
                                json_loads, loads)

pytestmark = pytest.mark.timeout(30)

UTC = dt.timezone.utc


def tagged(obj):
    """What ``json_dumps`` wrote, parsed with the plain json module (no type hooks)."""
    return json.loads(json_dumps(obj))


# -- kombu type tags ------------------------------------------------------------------------


def test_aware_datetime_tag():
    value = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert tagged(value) == {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}


def test_aware_datetime_with_other_offset_keeps_offset():
    tz = dt.timezone(dt.timedelta(hours=2))
    value = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=tz)
    assert tagged(value) == {"__type__": "datetime",
                             "__value__": "2024-01-02T03:04:05.123456+02:00"}
    assert json_loads(json_dumps(value)) == value


def test_naive_datetime_has_no_offset():
    value = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert tagged(value) == {"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}
    back = json_loads(json_dumps(value))
    assert back == value and back.tzinfo is None


def test_date_tag_is_date_not_datetime():
    value = dt.date(2024, 1, 2)
    assert tagged(value) == {"__type__": "date", "__value__": "2024-01-02"}
    back = json_loads(json_dumps(value))
    assert back == value and type(back) is dt.date


def test_time_tag():
    value = dt.time(1, 2, 3)
    assert tagged(value) == {"__type__": "time", "__value__": "01:02:03"}
    assert json_loads(json_dumps(value)) == value


def test_decimal_tag_keeps_exact_text():
    value = decimal.Decimal("1.10")
    assert tagged(value) == {"__type__": "decimal", "__value__": "1.10"}
    back = json_loads(json_dumps(value))
    assert isinstance(back, decimal.Decimal) and str(back) == "1.10"


def test_uuid_tag():
    value = uuid.UUID(int=1)
    assert tagged(value) == {"__type__": "uuid",
                             "__value__": {"hex": "00000000000000000000000000000001"}}
    assert json_loads(json_dumps(value)) == value


def test_utf8_bytes_tag():
    value = "héllo".encode("utf-8")
    assert tagged(value) == {"__type__": "bytes", "__value__": "héllo"}
    assert json_loads(json_dumps(value)) == value


def test_non_utf8_bytes_are_base64():
    value = b"\xff\x00\xfe"
    assert tagged(value) == {"__type__": "base64",
                             "__value__": base64.b64encode(value).decode("ascii")}
    assert json_loads(json_dumps(value)) == value


def test_nested_round_trip():
    value = {
        "when": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
        "day": dt.date(2024, 5, 6),
        "at": dt.time(23, 59, 1, 5),
        "price": decimal.Decimal("-0.000001"),
        "ids": [uuid.UUID(int=7), uuid.uuid4()],
        "blob": b"\x80\x81",
        "text": b"abc",
        "plain": [1, 2.5, "x", None, True],
    }
    assert json_loads(json_dumps(value)) == value


def test_tuples_become_lists_and_sets_are_refused():
    assert json_loads(json_dumps((1, 2))) == [1, 2]
    with pytest.raises(TypeError):
        json_dumps({1, 2})


def test_compact_separators_match_python_json():
    # kombu uses json.dumps' defaults: ", " and ": ".
    assert json_dumps([1, {"a": 2}]) == '[1, {"a": 2}]'


def test_unknown_type_tag_raises():
    text = '{"__type__": "set", "__value__": [1, 2]}'
    with pytest.raises(ValueError):
        json_loads(text)
    with pytest.raises(DecodeError):
        loads(text.encode(), "application/json")


def test_dict_with_extra_keys_is_not_a_type_tag():
    value = {"__type__": "nope", "__value__": 1, "other": 2}
    assert json_loads(json_dumps(value)) == value


def test_json_loads_accepts_bytes_and_str():
    assert json_loads(b'{"a": 1}') == {"a": 1}
    assert json_loads('{"a": 1}') == {"a": 1}


# -- dumps/loads and accept_content ---------------------------------------------------------


def test_dumps_default_is_json():
    content_type, encoding, body = dumps({"a": 1})
    assert (content_type, encoding) == ("application/json", "utf-8")
    assert isinstance(body, bytes) and json.loads(body) == {"a": 1}


def test_default_accept_is_json_only():
    assert accepted_content_types(None) == frozenset({"application/json"})
    assert loads(b"[1, 2]", "application/json") == [1, 2]


class _Marker:
    """Unpickling this creates the marker file: proof that pickle.loads ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_is_refused_without_being_deserialized(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    for accept in (None, ["json"], ["application/json", "yaml"]):
        with pytest.raises(ContentDisallowed):
            loads(payload, "application/x-python-serialize", "binary", accept=accept)
    assert not marker.exists()
    # The payload does work when it is accepted: the test above really proves something.
    fh = loads(payload, "application/x-python-serialize", "binary", accept=["pickle"])
    fh.close()
    assert marker.exists()


def test_refused_types_raise_contentdisallowed_before_decoding():
    # Garbage that could not even be decoded: refusal must come first.
    with pytest.raises(ContentDisallowed):
        loads(b"\x00garbage", "application/x-yaml", "utf-8", accept=["json"])
    with pytest.raises(ContentDisallowed):
        loads(b"\x00garbage", "application/x-msgpack", "binary", accept=["json"])


@pytest.mark.parametrize("name", ["pickle", "yaml", "msgpack"])
def test_opt_in_serializers_round_trip_when_accepted(name):
    value = {"a": [1, 2, 3], "b": "text", "c": None, "d": 1.5, "e": {"nested": True}}
    content_type, encoding, body = dumps(value, name)
    assert content_type == serialization.content_type_of(name)
    assert loads(body, content_type, encoding, accept=[name]) == value
    # accept by content type instead of by name
    assert loads(body, content_type, encoding, accept=[content_type]) == value
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=["json"])


@pytest.mark.parametrize("name,content_type", [
    ("json", "application/json"),
    ("pickle", "application/x-python-serialize"),
    ("yaml", "application/x-yaml"),
    ("msgpack", "application/x-msgpack"),
])
def test_content_types_are_kombus(name, content_type):
    assert serialization.content_type_of(name) == content_type
    assert accepted_content_types([name]) == frozenset({content_type})


def test_accept_mixes_names_and_content_types():
    assert accepted_content_types(["json", "application/x-yaml"]) == frozenset(
        {"application/json", "application/x-yaml"})


def test_msgpack_keeps_kombu_types():
    value = {"when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "amount": decimal.Decimal("2.50"),
             "raw": b"\x00\x01"}
    content_type, encoding, body = dumps(value, "msgpack")
    back = loads(body, content_type, encoding, accept=["msgpack"])
    assert back["when"] == value["when"]
    assert back["amount"] == value["amount"]
    assert back["raw"] == value["raw"]


def test_pickle_round_trips_arbitrary_objects():
    value = {"s": {1, 2}, "t": (1, "x"), "d": dt.datetime(2024, 1, 1)}
    content_type, encoding, body = dumps(value, "pickle")
    assert loads(body, content_type, encoding, accept=["pickle"]) == value


def test_unknown_serializer_name():
    with pytest.raises(DecodeError):
        dumps({}, "nope")


def test_undecodable_json_is_a_decode_error():
    with pytest.raises(DecodeError):
        loads(b"{not json", "application/json")


def test_accepted_but_unknown_content_type_is_a_decode_error():
    with pytest.raises(DecodeError):
        loads(b"x", "application/x-unknown", accept=["application/x-unknown"])


# -- compression ----------------------------------------------------------------------------

DATA = json_dumps({"payload": "x" * 2000, "n": list(range(100))}).encode()


@pytest.mark.parametrize("method", ["zlib", "gzip", "bzip2"])
def test_compression_round_trip(method):
    header, packed = compress(DATA, method)
    assert packed != DATA and len(packed) < len(DATA)
    assert decompress(packed, header) == DATA
    assert decompress(packed, method) == DATA  # the alias works as a header too


def test_zlib_header_is_kombus():
    header, packed = compress(DATA, "zlib")
    assert header == "application/x-gzip"
    # kombu decodes 'application/x-gzip' with zlib.decompress
    assert zlib.decompress(packed) == DATA


def test_bzip2_header_is_kombus():
    header, packed = compress(DATA, "bzip2")
    assert header == "application/x-bz2"
    assert bz2.decompress(packed) == DATA


def test_gzip_name_is_what_kombu_sends():
    """kombu registers 'gzip' as an alias of zlib ('application/x-gzip'); a Celery worker
    has no decoder for any other gzip header, so qctl's 'gzip' must produce the same."""
    header, packed = compress(DATA, "gzip")
    assert header == "application/x-gzip"
    assert zlib.decompress(packed) == DATA


def test_decompress_reads_what_a_celery_client_sends_for_gzip():
    # Celery: task_compression='gzip' -> header application/x-gzip, zlib data.
    assert decompress(zlib.compress(DATA), "application/x-gzip") == DATA


def test_unknown_compression():
    with pytest.raises(DecodeError):
        compress(DATA, "lz4")
    with pytest.raises(DecodeError):
        decompress(DATA, "application/x-lz4")


def test_corrupt_compressed_body_is_a_decode_error():
    with pytest.raises(DecodeError):
        decompress(b"not compressed at all", "application/x-gzip")

