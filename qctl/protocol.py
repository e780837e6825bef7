"""Celery task message protocol 2: build the envelope a client sends, read what a worker gets.

Headers carry the metadata (``task``, ``id``, ``eta``, ``expires``, ``retries``, ``timelimit``
as ``[hard, soft]`` ...); the body is ``[args, kwargs, {callbacks, errbacks, chain, chord}]``.
Protocol 1 bodies (a dict holding ``task``/``id``/``args``) are converted on receipt.
"""
from __future__ import annotations

import os
import reprlib
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from . import serialization
from .exceptions import DecodeError, InvalidTaskError
from .transports import Envelope

_repr = reprlib.Repr()
_repr.maxstring = 256
_repr.maxother = 256
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 32
ARGSREPR_MAXSIZE = 1024

#: Reply-to address of this process (kombu's ``app.thread_oid`` is a uuid3 too).
_PROCESS_OID: dict[int, str] = {}


def process_oid() -> str:
    pid = os.getpid()
    oid = _PROCESS_OID.get(pid)
    if oid is None:
        oid = _PROCESS_OID[pid] = str(uuid.uuid3(uuid.NAMESPACE_OID, f"{socket.gethostname()}-{pid}-{uuid.uuid4()}"))
    return oid


def origin_nodename() -> str:
    return f"gen{os.getpid()}@{socket.gethostname()}"


def saferepr(obj: Any) -> str:
    text = _repr.repr(obj)
    return text if len(text) <= ARGSREPR_MAXSIZE else text[:ARGSREPR_MAXSIZE - 3] + "..."


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_datetime(value: Any, now: datetime | None = None) -> datetime | None:
    """An ``eta``/``expires`` option (datetime, ISO string, or seconds from now) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (now or utcnow()) + timedelta(seconds=value)
    if isinstance(value, timedelta):
        return (now or utcnow()) + value
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive means UTC, as Celery documents
        return value
    raise TypeError(f"cannot use {value!r} as a time")


def parse_iso(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidTaskError(f"bad time {value!r}: {exc}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def build_task_message(name: str, args: Iterable[Any] | None = None,
                       kwargs: dict[str, Any] | None = None, *, task_id: str | None = None,
                       countdown: float | None = None, eta: Any = None, expires: Any = None,
                       retries: int = 0, time_limit: float | None = None,
                       soft_time_limit: float | None = None, root_id: str | None = None,
                       parent_id: str | None = None, group_id: str | None = None,
                       group_index: int | None = None, shadow: str | None = None,
                       callbacks: list | None = None, errbacks: list | None = None,
                       chain: list | None = None, chord: Any = None, origin: str | None = None,
                       ignore_result: bool = False, headers: dict[str, Any] | None = None,
                       reply_to: str | None = None, priority: int | None = None,
                       serializer: str = "json", compression: str | None = None,
                       stamped_headers: list | None = None, stamps: dict | None = None,
                       replaced_task_nesting: int = 0, argsrepr: str | None = None,
                       kwargsrepr: str | None = None) -> Envelope:
    """A protocol-2 task envelope, byte-compatible with what Celery 5 sends."""
    task_id = task_id or str(uuid.uuid4())
    args = list(args or ())
    kwargs = dict(kwargs or {})
    now = utcnow()
    if countdown is not None:
        eta = now + timedelta(seconds=countdown)
    eta_dt = to_datetime(eta, now)
    expires_dt = to_datetime(expires, now)
    message_headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta_dt.isoformat() if eta_dt else None,
        "expires": expires_dt.isoformat() if expires_dt else None,
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr if argsrepr is not None else saferepr(tuple(args)),
        "kwargsrepr": kwargsrepr if kwargsrepr is not None else saferepr(kwargs),
        "origin": origin or origin_nodename(),
        "ignore_result": bool(ignore_result),
        "replaced_task_nesting": replaced_task_nesting,
        "stamped_headers": stamped_headers,
        "stamps": stamps or {},
    }
    if headers:
        message_headers.update(headers)
    embed = {"callbacks": _sigs(callbacks), "errbacks": _sigs(errbacks),
             "chain": _sigs(chain), "chord": dict(chord) if chord is not None else None}
    content_type, encoding, body = serialization.dumps([args, kwargs, embed], serializer)
    if compression:
        message_headers["compression"], body = serialization.compress(body, compression)
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to or process_oid(),
        "delivery_mode": 2,
        "priority": priority or 0,
    }
    if expires_dt is not None:
        ttl = (expires_dt - now).total_seconds()
        properties["expiration"] = str(max(int(ttl * 1000), 0))
    return Envelope(body=body, headers=message_headers, properties=properties,
                    content_type=content_type, content_encoding=encoding)


def _sigs(items: Any) -> list | None:
    if items is None:
        return None
    if isinstance(items, dict):
        items = [items]
    return [dict(item) for item in items]


@dataclass
class TaskMessage:
    """What a worker reads from an envelope: headers first (cheap), the body on demand."""

    headers: dict[str, Any]
    envelope: Envelope
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    body_decoded: bool = False
    eta: float | None = None        # UNIX times, parsed once from the headers
    expires: float | None = None

    @property
    def id(self) -> str:
        return self.headers["id"]

    @property
    def name(self) -> str:
        return self.headers["task"]

    def decode_body(self, accept: Iterable[str] | frozenset[str] | None) -> None:
        """Deserialize the body (refusing content types outside ``accept``)."""
        if self.body_decoded:
            return
        env = self.envelope
        body = env.body
        if self.headers.get("compression"):
            body = serialization.decompress(body, self.headers["compression"])
        payload = serialization.loads(body, env.content_type, env.content_encoding, accept)
        if isinstance(payload, dict) and "args" in payload:  # protocol 1
            payload = [payload.get("args") or [], payload.get("kwargs") or {},
                       {k: payload.get(k) for k in ("callbacks", "errbacks", "chain", "chord")}]
        if not (isinstance(payload, (list, tuple)) and len(payload) == 3):
            raise InvalidTaskError("task body is not [args, kwargs, embed]")
        args, kwargs, embed = payload
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise InvalidTaskError("task args must be a list and kwargs an object")
        self.args, self.kwargs = list(args), kwargs
        self.embed = embed if isinstance(embed, dict) else {}
        self.body_decoded = True


def read_headers(envelope: Envelope, accept: Iterable[str] | frozenset[str] | None) -> TaskMessage:
    """Check an envelope is a task message and return it with headers validated.

    Protocol 1 messages (no ``task`` header) have their body decoded here to find the headers.
    Raises ``InvalidTaskError``, ``DecodeError`` or ``ContentDisallowed``.
    """
    headers = envelope.headers
    if not isinstance(headers, dict):
        raise InvalidTaskError("message headers are not an object")
    if "task" not in headers:
        allowed = accept if isinstance(accept, frozenset) else serialization.accepted_content_types(accept)
        body = serialization.loads(envelope.body, envelope.content_type,
                                   envelope.content_encoding, allowed)
        if not (isinstance(body, dict) and "task" in body and "id" in body):
            raise InvalidTaskError("not a task message: no 'task' header and no protocol-1 body")
        headers = {"lang": "py", "task": body["task"], "id": body["id"],
                   "eta": body.get("eta"), "expires": body.get("expires"),
                   "retries": body.get("retries", 0), "timelimit": body.get("timelimit") or [None, None],
                   "group": body.get("taskset"), "root_id": body["id"], "parent_id": None,
                   "argsrepr": saferepr(body.get("args")), "kwargsrepr": saferepr(body.get("kwargs"))}
        eta, expires = parse_iso(headers.get("eta")), parse_iso(headers.get("expires"))
        message = TaskMessage(headers=headers, envelope=envelope,
                              eta=eta.timestamp() if eta else None,
                              expires=expires.timestamp() if expires else None)
        message.args, message.kwargs = list(body.get("args") or []), dict(body.get("kwargs") or {})
        message.embed = {k: body.get(k) for k in ("callbacks", "errbacks", "chain", "chord")}
        message.body_decoded = True
        return message
    if not isinstance(headers.get("task"), str) or not headers["task"]:
        raise InvalidTaskError("the 'task' header is not a task name")
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        raise InvalidTaskError("the 'id' header is missing")
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
            isinstance(timelimit, (list, tuple)) and len(timelimit) == 2
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in timelimit)):
        raise InvalidTaskError("the 'timelimit' header is not [hard, soft] seconds")
    retries = headers.get("retries", 0)
    if retries is not None and not isinstance(retries, int):
        raise InvalidTaskError("the 'retries' header is not an integer")
    eta, expires = parse_iso(headers.get("eta")), parse_iso(headers.get("expires"))
    return TaskMessage(headers=headers, envelope=envelope, eta=eta.timestamp() if eta else None,
                       expires=expires.timestamp() if expires else None)


__all__ = ["build_task_message", "read_headers", "TaskMessage", "DecodeError", "utcnow",
           "parse_iso", "to_datetime", "process_oid", "origin_nodename", "saferepr"]
