"""Serializers (json by default; pickle, yaml, msgpack opt-in) and body compression.

JSON follows kombu's encoding so Celery peers read what qctl writes: datetimes, dates, times,
Decimals, UUIDs and bytes travel as ``{"__type__": ..., "__value__": ...}``. ``loads`` checks
the content type against ``accept_content`` *before* touching the bytes: a refused type is
never deserialized.
"""
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json
import uuid
from typing import Any, Callable, Iterable

from .exceptions import ContentDisallowed, DecodeError

# -- JSON with kombu's type tags ------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.datetime):
        return {"__type__": "datetime", "__value__": obj.isoformat()}
    if isinstance(obj, _dt.date):
        return {"__type__": "date", "__value__": obj.isoformat()}
    if isinstance(obj, _dt.time):
        return {"__type__": "time", "__value__": obj.isoformat()}
    if isinstance(obj, decimal.Decimal):
        return {"__type__": "decimal", "__value__": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": obj.hex}}
    if isinstance(obj, (bytes, bytearray)):
        try:
            return {"__type__": "bytes", "__value__": bytes(obj).decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(obj).decode("ascii")}
    if hasattr(obj, "__json__"):
        return obj.__json__()
    if isinstance(obj, (tuple, frozenset)):
        return list(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": _dt.datetime.fromisoformat,
    "date": _dt.date.fromisoformat,
    "time": _dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v),
}


def _object_hook(obj: dict) -> Any:
    if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
        decoder = _DECODERS.get(obj["__type__"])
        if decoder is None:
            raise ValueError(f"Unsupported type: {obj['__type__']!r}")
        return decoder(obj["__value__"])
    return obj


_encoder = json.JSONEncoder(default=_default, separators=(", ", ": "), ensure_ascii=False)
_decoder = json.JSONDecoder(object_hook=_object_hook)


def json_dumps(obj: Any) -> str:
    return _encoder.encode(obj)


def json_loads(text: str | bytes) -> Any:
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    return _decoder.decode(text)


# -- the serializer registry ----------------------------------------------------------------


class Serializer:
    def __init__(self, name: str, content_type: str, encoding: str,
                 dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]) -> None:
        self.name, self.content_type, self.encoding = name, content_type, encoding
        self.dumps, self.loads = dumps, loads


def _pickle_dumps(obj: Any) -> bytes:
    import pickle
    return pickle.dumps(obj, protocol=4)


def _pickle_loads(data: bytes) -> Any:
    import pickle
    return pickle.loads(data)


def _yaml_dumps(obj: Any) -> bytes:
    import yaml
    return yaml.safe_dump(obj).encode("utf-8")


def _yaml_loads(data: bytes) -> Any:
    import yaml
    return yaml.safe_load(data)


def _msgpack_dumps(obj: Any) -> bytes:
    import msgpack
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def _msgpack_loads(data: bytes) -> Any:
    import msgpack
    return msgpack.unpackb(data, raw=False, object_hook=_object_hook)


SERIALIZERS: dict[str, Serializer] = {
    s.name: s for s in (
        Serializer("json", "application/json", "utf-8",
                   lambda o: json_dumps(o).encode("utf-8"), json_loads),
        Serializer("pickle", "application/x-python-serialize", "binary", _pickle_dumps, _pickle_loads),
        Serializer("yaml", "application/x-yaml", "utf-8", _yaml_dumps, _yaml_loads),
        Serializer("msgpack", "application/x-msgpack", "binary", _msgpack_dumps, _msgpack_loads),
    )
}
_BY_CONTENT_TYPE = {s.content_type: s for s in SERIALIZERS.values()}
_BY_CONTENT_TYPE["application/data"] = Serializer("raw", "application/data", "binary",
                                                   bytes, bytes)
_BY_CONTENT_TYPE["application/text"] = Serializer("text", "application/text", "utf-8",
                                                   lambda s: str(s).encode(), bytes.decode)


def serializer(name: str) -> Serializer:
    try:
        return SERIALIZERS[name]
    except KeyError:
        raise DecodeError(f"unknown serializer {name!r} (known: {', '.join(SERIALIZERS)})") from None


def content_type_of(name: str) -> str:
    return serializer(name).content_type


def accepted_content_types(accept: Iterable[str] | None) -> frozenset[str]:
    """``accept_content`` may name serializers ('json') or content types; normalise to types."""
    if accept is None:
        accept = ["json"]
    return frozenset(SERIALIZERS[a].content_type if a in SERIALIZERS else a for a in accept)


def dumps(obj: Any, name: str = "json") -> tuple[str, str, bytes]:
    """Serialize ``obj``: (content_type, content_encoding, bytes)."""
    s = serializer(name)
    return s.content_type, s.encoding, s.dumps(obj)


def loads(data: bytes, content_type: str, content_encoding: str = "utf-8",
          accept: Iterable[str] | frozenset[str] | None = None) -> Any:
    """Deserialize ``data``; refuse (without reading it) a content type outside ``accept``."""
    allowed = accept if isinstance(accept, frozenset) else accepted_content_types(accept)
    if content_type not in allowed:
        raise ContentDisallowed(f"refusing to deserialize content of type {content_type}")
    s = _BY_CONTENT_TYPE.get(content_type)
    if s is None:
        raise DecodeError(f"no serializer for content type {content_type!r}")
    try:
        return s.loads(data)
    except Exception as exc:
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc


# -- compression ----------------------------------------------------------------------------

# kombu's names: 'gzip' is an alias of zlib, and both travel as 'application/x-gzip'.
_COMPRESSION = {
    "zlib": "application/x-gzip",
    "gzip": "application/x-gzip",
    "bzip2": "application/x-bz2",
}
_ALIASES = {"application/x-gzip": "zlib", "application/gzip": "gzip", "application/x-bz2": "bzip2",
            "zlib": "zlib", "gzip": "zlib", "bzip2": "bzip2"}


def compress(data: bytes, method: str) -> tuple[str, bytes]:
    """Compress with 'zlib', 'gzip' or 'bzip2': (header value, bytes)."""
    if method not in _COMPRESSION:
        raise DecodeError(f"unknown compression {method!r} (known: zlib, gzip, bzip2)")
    return _COMPRESSION[method], _codec(_ALIASES[method])[0](data)


def decompress(data: bytes, header: str) -> bytes:
    method = _ALIASES.get(header)
    if method is None:
        raise DecodeError(f"unknown compression {header!r}")
    try:
        return _codec(method)[1](data)
    except Exception as exc:
        raise DecodeError(f"cannot decompress {header} body: {exc}") from exc


def _codec(method: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    if method == "zlib":
        import zlib
        return zlib.compress, zlib.decompress
    if method == "gzip":
        import gzip
        return gzip.compress, gzip.decompress
    import bz2
    return bz2.compress, bz2.decompress
