"""kombu's Redis message envelope for the Redis transport (``qctl.transports.redis``).

Encoding and decoding of kombu's JSON envelope (``encode_envelope``, ``decode_envelope``; for
remote control and events ``encode_control``, ``decode_control``), the priority bands:
``band_index`` (kombu's priority number -> band 0..3) and ``list_key`` (the Redis list of a
queue's band), and kombu's PUB/SUB names for fanout exchanges (``fanout_topic``,
``subscribe_globs``). Pure Python: no redis-py import here.
"""
from __future__ import annotations

import base64
import json
import re
from itertools import product
from typing import Any

from ..serialization import _default as _json_default  # kombu's type tags for header values
from ..serialization import json_loads
from . import ControlMessage, Envelope

SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: Properties kombu's Redis channel adds to every message; stripped again on fetch.
TRANSPORT_PROPERTIES = ("delivery_info", "body_encoding", "delivery_tag")


def band_index(priority: Any) -> int:
    """kombu's ``_q_for_pri``: 0-2 -> 0 (plain list), 3-5 -> 1, 6-8 -> 2, 9 and above -> 3."""
    try:
        return max(0, min(9, int(priority or 0))) // 3
    except (TypeError, ValueError):
        return 0


def list_key(queue: str, band: int) -> str:
    """The Redis list of ``queue``'s priority band (0..3)."""
    return queue if band == 0 else f"{queue}{SEP}{PRIORITY_STEPS[band]}"


def one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


def encode_envelope(envelope: Envelope, priority: int, exchange: str, routing_key: str,
                    tag: str) -> bytes:
    """kombu's Redis message for ``envelope``: same keys, key order and separators."""
    given = envelope.properties or {}
    props = {k: v for k, v in given.items() if k not in TRANSPORT_PROPERTIES and k != "priority"}
    props["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    props["priority"] = given.get("priority", priority)               # kombu: setdefault
    props["body_encoding"] = "base64"
    props["delivery_tag"] = tag
    body = envelope.body.encode("utf-8") if isinstance(envelope.body, str) else bytes(envelope.body)
    message = {"body": base64.b64encode(body).decode("ascii"),
               "content-encoding": envelope.content_encoding, "content-type": envelope.content_type,
               "headers": envelope.headers or {}, "properties": props}
    return json.dumps(message, default=_json_default).encode("ascii")


def decode_envelope(raw: bytes) -> tuple[Envelope, str, str, bool]:
    """(envelope, exchange, routing key, redelivered) of a kombu message; ValueError if not one."""
    try:
        message = json_loads(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a kombu JSON message: {one_line(exc)}") from None
    if not isinstance(message, dict):
        raise ValueError(f"not a kombu message: a JSON {type(message).__name__}, not an object")
    props, headers, body = message.get("properties"), message.get("headers") or {}, message.get("body")
    if not isinstance(props, dict) or not isinstance(headers, dict) or not isinstance(body, str):
        raise ValueError("not a kombu message: properties or headers not objects, or no string body")
    if props.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(body.encode("ascii"))     # lenient, as kombu
        except (ValueError, UnicodeEncodeError) as exc:
            raise ValueError(f"body is not valid base64: {one_line(exc)}") from None
    else:
        data = body.encode("utf-8")
    info = props.get("delivery_info") if isinstance(props.get("delivery_info"), dict) else {}
    envelope = Envelope(body=data, headers=headers,
                        properties={k: v for k, v in props.items() if k not in TRANSPORT_PROPERTIES},
                        content_type=message.get("content-type") or "application/json",
                        content_encoding=message.get("content-encoding") or "utf-8")
    return (envelope, str(info.get("exchange") or ""), str(info.get("routing_key") or ""),
            bool(info.get("redelivered") or headers.get("redelivered")))


# -- remote control and events (kombu's fanout exchanges over PUB/SUB) -----------------------

def is_pidbox(exchange: str) -> bool:
    """A pidbox request exchange (``celery.pidbox``): kombu binds its queues with routing key
    ``''`` and its messages are persistent (delivery_mode 2). Events (``celeryev``) are not."""
    return exchange.endswith(".pidbox")


def binding_key(exchange: str, pattern: str) -> str:
    """The routing key a kombu consumer binds with: ``''`` on a pidbox, else the pattern."""
    return "" if is_pidbox(exchange) else pattern


def fanout_topic(db: int, exchange: str, routing_key: str = "") -> str:
    """kombu's ``_get_publish_topic`` (``fanout_prefix`` and ``fanout_patterns`` on, their
    defaults): ``/0.celery.pidbox``, ``/0.celeryev/worker.heartbeat``."""
    return f"/{db}.{exchange}" + (f"/{routing_key}" if routing_key else "")


def _glob(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def subscribe_globs(db: int, exchange: str, pattern: str) -> list[str]:
    """The PSUBSCRIBE patterns of a subscriber to ``exchange`` with AMQP topic ``pattern``.

    kombu's: the binding key with ``#`` turned into ``*`` (``/0.celeryev/*``, gossip's
    ``/0.celeryev/worker.*``; a worker's pidbox, bound with ``''``: ``/0.celery.pidbox``).
    Where a ``#`` can match zero words, the pattern without it is added too (``#`` gets
    ``/0.celery.pidbox`` and ``/0.celery.pidbox/*``, ``worker.#`` also ``/0.celeryev/worker``),
    so that the globs catch every routing key the AMQP pattern matches; the subscriber then
    drops what they catch in excess (``topic_matches``: ``*`` is one word)."""
    base = f"/{db}.{_glob(exchange)}"
    if not pattern:
        return [base]
    words = pattern.split(".")
    hashes = words.count("#")
    if hashes > 3:                                  # no 16 patterns: everything, then filtered
        return [base, base + "/*"]
    variants = set()
    for keep in product((True, False), repeat=hashes):
        chosen, out = iter(keep), []
        for word in words:
            if word != "#":
                out.append("*" if word == "*" else _glob(word))
            elif next(chosen):
                out.append("*")
        variants.add(".".join(out))
    return sorted(base + ("/" + v if v else "") for v in variants)


def encode_control(message: ControlMessage, exchange: str, routing_key: str, delivery_mode: int,
                   tag: str) -> bytes:
    """kombu's Redis envelope of a pidbox request or reply, or an event (priority 0)."""
    envelope = Envelope(body=message.body, headers=dict(message.headers or {}),
                        properties={"delivery_mode": delivery_mode})
    return encode_envelope(envelope, 0, exchange, routing_key, tag)


def decode_control(raw: bytes) -> ControlMessage:
    """The message in a kombu envelope; ValueError if it is not one."""
    envelope, _exchange, routing_key, _redelivered = decode_envelope(raw)
    return ControlMessage(body=envelope.body, headers=envelope.headers, routing_key=routing_key)
