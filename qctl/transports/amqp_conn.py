"""Connections to RabbitMQ through pika, shared by ``qctl.transports.amqp`` and the ``rpc://``
result backend: URL parsing (``connection_parameters``), one-line error texts (``describe``),
``Link`` (a connection and its channel), header and property conversion both ways, and the
patch that makes pika decode AMQP doubles as floats (applied on import). The rules for header
values are in ``qctl.transports.amqp``'s docstring."""
from __future__ import annotations

import decimal
import logging
import math
import os
import ssl
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pika
import pika.exceptions as pex

from ..exceptions import ImproperlyConfigured
from . import Envelope


def _read_floats_as_floats() -> None:
    """pika 1.4 decodes AMQP float and double field values with ``int()``: a Celery client's
    ``timelimit`` of ``[10, 0.5]`` would arrive as ``[10, 0]`` (no soft limit). Decode them
    as floats; every other field type is left to pika."""
    import struct
    import pika.data as data
    if getattr(data.decode_value, "qctl_floats", False):
        return
    original = data.decode_value

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset:offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return original(encoded, offset)
    decode_value.qctl_floats = True  # type: ignore[attr-defined]
    data.decode_value = decode_value


_read_floats_as_floats()

_GRACE = 0.3            # a zero-timeout fetch still waits this long for messages known to be ready
_PROPERTIES = ("correlation_id", "reply_to", "delivery_mode", "priority", "expiration",
               "message_id", "timestamp", "type", "user_id", "app_id")
_ERRORS = (pex.AMQPError, OSError)
_INHERITED: list[Any] = []   # a forked child's references to the parent's connections: never closed
# pika logs routine events (returned mandatory messages, passive-declare 404s, broker restarts)
# as warnings and errors; what matters reaches the caller as one OperationalError line.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)


# -- URLs, errors, headers ----------------------------------------------------------------

def connection_parameters(url: str, options: dict[str, Any] | None = None, heartbeat: int | None = None,
                          name: str = "qctl") -> pika.ConnectionParameters:
    """pika parameters for an AMQP URL (kombu's ``//`` means vhost ``/``). Options and query
    parameters: ``heartbeat`` (s, default 30), ``connect_timeout`` (5),
    ``blocked_connection_timeout`` (60), ``ssl`` (True or {ca_certs, certfile, keyfile, cert_reqs})."""
    options = dict(options or {})
    parts = urlsplit(url)
    options.update(dict(parse_qsl(parts.query)))
    secure = parts.scheme.lower() == "amqps" or bool(options.get("ssl"))
    timeout = float(options.get("connect_timeout", 5.0))
    ssl_options = None
    if secure:
        conf = options["ssl"] if isinstance(options.get("ssl"), dict) else {}
        context = ssl.create_default_context(cafile=conf.get("ca_certs") or conf.get("cafile"))
        if conf.get("certfile"):
            context.load_cert_chain(conf["certfile"], conf.get("keyfile"))
        if conf.get("cert_reqs") in (ssl.CERT_NONE, "CERT_NONE", "none"):
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        ssl_options = pika.SSLOptions(context, parts.hostname or "localhost")
    try:
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"bad port in broker URL: {exc}") from None
    return pika.ConnectionParameters(
        host=parts.hostname or "localhost", port=port or (5671 if secure else 5672),
        virtual_host=unquote(parts.path[1:]) or "/" if len(parts.path) > 1 else "/",
        credentials=pika.PlainCredentials(unquote(parts.username or "guest"),
                                          unquote(parts.password or "guest")),
        heartbeat=int(float(options.get("heartbeat", 30))) if heartbeat is None else heartbeat,
        connection_attempts=1, retry_delay=0, socket_timeout=timeout, stack_timeout=timeout * 2,
        ssl_options=ssl_options,
        blocked_connection_timeout=float(options.get("blocked_connection_timeout", 60.0)),
        client_properties={"connection_name": f"{name} pid {os.getpid()}"})


def describe(url: str, exc: BaseException, what: str) -> str:
    """``amqp: cannot <what> amqp://guest:********@host//: <detail>``, on one line."""
    from ..conf import mask_url
    while type(exc).__module__.startswith("pika"):        # unwrap pika's connection workflow
        inner = getattr(exc, "exceptions", None) or [getattr(exc, "exception", None)] or []
        if not isinstance(inner[-1], BaseException) and exc.args and isinstance(exc.args[0], BaseException):
            inner = [exc.args[0]]
        if not isinstance(inner[-1], BaseException):
            break
        exc = inner[-1]
    if isinstance(exc, (pex.ChannelClosed, pex.ConnectionClosed)):
        detail = f"{exc.reply_code} {exc.reply_text}"
    else:
        detail = str(exc) or type(exc).__name__
        detail = detail if type(exc).__name__ in detail else f"{type(exc).__name__}: {detail}"
    password = unquote(urlsplit(url).password or "")
    if len(password) >= 6:               # belt and braces: pika's texts do not quote it
        detail = detail.replace(password, "********")
    return " ".join(f"amqp: cannot {what} {mask_url(url)}: {detail}".split())


def _to_amqp(value: Any, ceil: bool = False) -> Any:
    if value is None or isinstance(value, (bool, str, bytes, int, decimal.Decimal, datetime)):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and (value.is_integer() or ceil):
            return math.ceil(value)
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _to_amqp(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_amqp(v, ceil) for v in value]
    return str(value)


def amqp_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """Headers pika can send and a Celery worker reads the same (see ``qctl.transports.amqp``)."""
    return {str(k): _to_amqp(v, ceil=(k == "timelimit")) for k, v in (headers or {}).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _json_type(payload: bytes) -> tuple[str, str]:
    return ("application/json", "utf-8") if payload[:1] in (b"{", b"[") else ("application/octet-stream", "binary")


def basic_properties(envelope: Envelope, priority: int = 0, headers: dict | None = None,
                     expiration: bool = True) -> pika.BasicProperties:
    """Celery's message properties for ``envelope``. No ``user_id``: RabbitMQ checks it
    against the login of whoever publishes, and we publish copies."""
    props = envelope.properties or {}
    extra = {k: props[k] for k in ("correlation_id", "reply_to", "message_id", "type", "app_id")
             if props.get(k) is not None}
    if isinstance(props.get("timestamp"), (int, float)):
        extra["timestamp"] = int(props["timestamp"])
    if expiration and props.get("expiration") is not None:
        extra["expiration"] = str(props["expiration"])
    return pika.BasicProperties(
        content_type=envelope.content_type, content_encoding=envelope.content_encoding,
        headers=amqp_headers(envelope.headers if headers is None else headers),
        delivery_mode=int(props.get("delivery_mode") or 2),
        priority=max(0, min(255, int(priority or props.get("priority") or 0))), **extra)


def _split(props: pika.BasicProperties, body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """(the envelope, our bookkeeping headers taken out of it)."""
    headers, internal = {}, {}
    for key, value in (props.headers or {}).items():
        death = key == "x-death" or key.startswith(("x-first-death-", "x-last-death-"))
        if key.startswith("x-qctl-") or key == "x-delivery-count" or death:
            internal[key] = value
            if death and "x-qctl-eta" not in (props.headers or {}):   # a foreign DLX: keep it
                headers[key] = _plain(value)
        else:
            headers[key] = _plain(value)
    properties = {k: getattr(props, k) for k in _PROPERTIES if getattr(props, k, None) is not None}
    return Envelope(bytes(body), headers, properties, props.content_type or "application/json",
                    props.content_encoding or "utf-8"), internal


# -- connections -------------------------------------------------------------------------

class Link:
    """A pika connection and its channel, used by whoever holds ``lock`` (pika is not
    thread-safe, but has no thread affinity)."""

    def __init__(self, conn: pika.BlockingConnection, confirm: bool, lock: Any) -> None:
        self.conn, self.confirm, self.lock = conn, confirm, lock
        self.declared: set[Any] = set()     # non-durable things declared on this connection
        self._ch = self._open()
        self._scratch: Any = None

    def _open(self) -> Any:
        ch = self.conn.channel()
        if self.confirm:
            ch.confirm_delivery()
        return ch

    def alive(self) -> bool:
        return self.conn.is_open and self._ch.is_open

    @property
    def channel_object(self) -> Any:
        """The main channel as it is (perhaps closed), to read why it closed."""
        return self._ch

    def channel(self) -> Any:
        """The main channel, reopened if the broker closed it (after a failed declare)."""
        if not self._ch.is_open:
            self._ch = self._open()
        return self._ch

    def ready_count(self, queue: str) -> int | None:
        """Ready messages in ``queue``, None when it does not exist (checked on a second
        channel, which a 404 closes)."""
        if self._scratch is None or not self._scratch.is_open:
            self._scratch = self.conn.channel()
        try:
            return self._scratch.queue_declare(queue, passive=True).method.message_count
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise

    def service(self) -> None:
        if self.conn.is_open:
            self.conn.process_data_events(0)

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
