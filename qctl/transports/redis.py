"""The Redis broker (``redis://[:password@]host:port/db``, ``rediss://`` for TLS), in kombu's layout.

Messages are kombu's JSON envelope (``{"body": <base64>, "content-encoding", "content-type",
"headers", "properties": {..., "delivery_info", "priority", "body_encoding", "delivery_tag"}}``)
``LPUSH``-ed onto the queue's list, so Celery workers consume what qctl publishes and qctl
workers consume what Celery clients publish. Keys (db from the URL; no key prefix)::

    <queue>, <queue>\\x06\\x163|6|9      lists (kombu): ready messages, by priority band
    _kombu.binding.<exchange>           set (kombu): "<rk>\\x06\\x16\\x06\\x16<queue>", declare_queue
    _kombu.binding_permanent.<exchange> set (kombu 5.7): keeps the binding table from sweeps
    unacked                             hash (kombu): tag -> [envelope, exchange, routing_key]
    unacked_index                       zset (kombu): tag -> delivery (or last renewal) time
    qctl.leases                         zset: tag -> lease deadline (server time)
    qctl.lease_owner                    hash: tag -> consumer id
    qctl.lease_queue                    hash: tag -> "<fetch seq> <list it came from>"
    qctl.delivery_count                 hash: tag -> times fetched
    qctl.unacked_raw                    hash: tag -> a leased entry that is not kombu JSON
    qctl.seq                            counter: fetch order, generated tags
    qctl.delayed.<queue>                zset: tag -> ETA of a message published with a future eta
    qctl.delayed_msgs.<queue>           hash: tag -> "<band 0-3> <envelope>"
    qctl.dead, qctl.dead_seq            list of JSON dead-letter records, their id counter
    <mailbox>                           list: control replies (LPUSH, read with BRPOP)

PUB/SUB channels: ``/<db>.<channel>`` for ``broadcast`` (kombu's fanout naming:
``celery.pidbox`` -> ``/0.celery.pidbox``, ``celeryev/*`` is PSUBSCRIBEd) and
``qctl.notify.<db>.<queue>``, published with every qctl publish or give-back, which wakes idle
qctl consumers at once. Messages published by Celery clients do not notify; idle consumers
re-check every ``poll_interval`` (default 0.1 s) as well.

Priority: as in Celery on Redis, the number is kombu's: clamped to 0..9 and put in band
0 (0-2), 3 (3-5), 6 (6-8) or 9, and **lower bands are served first** (0 is the highest
priority, the opposite of AMQP). ``fetch`` reads the queues in the order given, and each
queue's bands in kombu's order (plain list first), oldest first within a band.

Fetching is one Lua script: it pops up to ``limit`` messages and, in the same atomic step,
records each in kombu's ``unacked``/``unacked_index`` (so a Celery worker's restore sweep
could still recover it) and in qctl's lease keys, so a fetched message is never only in a
worker's memory. Expired leases are given back by ``restore_expired`` (also run by ``fetch``
at most every second, or when the earliest lease runs out), with kombu's ``redelivered``
flags inserted into the stored text (the JSON is never re-encoded by Lua, whose cjson would
lose number precision and empty arrays). Server time (``TIME``) is used for leases and ETAs.

Options (``broker_transport_options``): ``visibility_timeout`` (lease seconds),
``poll_interval``, ``socket_timeout`` (10), ``socket_connect_timeout`` (5),
``max_connections``, ``delayed_delivery`` (True; False publishes ETA messages straight to the
list, as Celery does, for fleets where only Celery workers consume). Not supported: Redis
Cluster, Sentinel, kombu's ``global_keyprefix``.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from typing import Any, Iterable, Sequence
from uuid import uuid4

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..conf import mask_url
from ..exceptions import ImproperlyConfigured, OperationalError
from ..serialization import _default as _json_default  # kombu's type tags for header values
from ..serialization import json_loads
from . import DeadLetter, Delivery, Envelope, Subscription, Transport

SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: Properties kombu's Redis channel adds to every message; stripped again on fetch.
TRANSPORT_PROPERTIES = ("delivery_info", "body_encoding", "delivery_tag")
COMMON_KEYS = ("unacked", "unacked_index", "qctl.leases", "qctl.lease_owner", "qctl.lease_queue",
               "qctl.delivery_count", "qctl.unacked_raw", "qctl.seq", "qctl.dead", "qctl.dead_seq")
_RESTORE_EVERY = 1.0      # seconds between expired-lease sweeps by one fetching object
_RESTORE_BATCH = 1000     # leases given back per script run (bounds the script's run time)
_MAX_BLOCK = 5.0          # longest single blocking call; below socket_timeout
_CERT_REQS = {"CERT_REQUIRED": "required", "CERT_OPTIONAL": "optional", "CERT_NONE": "none"}

# Redis clients a forked child inherited: kept referenced so that garbage collection in the
# child never touches sockets that belong to the parent.
_INHERITED: list[Any] = []


def band_index(priority: Any) -> int:
    """kombu's ``_q_for_pri``: 0-2 -> 0 (plain list), 3-5 -> 1, 6-8 -> 2, 9 and above -> 3."""
    try:
        value = max(0, min(9, int(priority or 0)))
    except (TypeError, ValueError):
        value = 0
    return value // 3


def list_key(queue: str, band: int) -> str:
    """The Redis list of ``queue``'s priority band (0..3)."""
    return queue if band == 0 else f"{queue}{SEP}{PRIORITY_STEPS[band]}"


def one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


def connect(url: str, options: dict[str, Any]) -> redis.Redis:
    """A client with its own connection pool for ``url``; raises ``ImproperlyConfigured``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    parts = urlsplit(url)
    query = [(k, _CERT_REQS.get(v, v) if k == "ssl_cert_reqs" else v)
             for k, v in parse_qsl(parts.query)]           # Celery spells CERT_REQUIRED
    url = urlunsplit((parts.scheme.split("+")[0], parts.netloc, parts.path, urlencode(query), ""))
    kwargs: dict[str, Any] = {
        "socket_timeout": float(options.get("socket_timeout") or 10.0),
        "socket_connect_timeout": float(options.get("socket_connect_timeout") or 5.0),
        "socket_keepalive": True,
        # No silent re-sending: a command retried after a lost reply could run twice (a
        # duplicate LPUSH); the caller's publish retry policy decides instead.
        "retry": Retry(NoBackoff(), 0),
    }
    if options.get("max_connections"):
        kwargs["max_connections"] = int(options["max_connections"])
    try:
        pool = redis.ConnectionPool.from_url(url, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"bad redis URL {mask_url(url)!r}: {one_line(exc)}") from exc
    return redis.Redis(connection_pool=pool)


class Errors:
    """``with Errors(url, what):`` turns redis-py errors into one-line ``OperationalError``."""

    def __init__(self, url: str, what: str) -> None:
        self.prefix = f"redis {what} {mask_url(url)}"

    def __enter__(self) -> "Errors":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, redis.RedisError) or isinstance(exc, OSError):
            raise OperationalError(f"{self.prefix}: {one_line(exc)}") from exc
        return False


# -- Lua ------------------------------------------------------------------------------------
# KEYS[1..10] are COMMON_KEYS in every script. Queue lists are reached through names stored in
# qctl.lease_queue, so these scripts need a single (non-cluster) Redis.

_PRELUDE = r"""
pcall(redis.replicate_commands)   -- TIME before writes (Redis < 5); a no-op on 7
local K_UNACKED, K_INDEX, K_LEASES, K_OWNER, K_QUEUE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_COUNT, K_RAW, K_SEQ, K_DEAD, K_DEAD_SEQ = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function queue_of(list)   -- 'q\6\0229' -> 'q'
  return string.match(list, '^(.*)\6\22[369]$') or list
end

local function skip_string(s, i)   -- s[i] is '"': the index after the closing quote
  local j = i + 1
  while true do
    local q = string.find(s, '["\\]', j)
    if not q then return nil end
    if string.byte(s, q) == 92 then j = q + 2 else return q + 1 end
  end
end

local function value_end(s, p)   -- the index after the JSON value starting at p
  local c = string.byte(s, p)
  if c == 34 then return skip_string(s, p) end
  if c ~= 123 and c ~= 91 then return string.find(s, '[,%]}%s]', p) or (#s + 1) end
  local depth, i = 0, p
  while true do
    local q = string.find(s, '["{}%[%]]', i)
    if not q then return nil end
    local b = string.byte(s, q)
    if b == 34 then
      i = skip_string(s, q)
      if not i then return nil end
    elseif b == 123 or b == 91 then depth = depth + 1; i = q + 1
    else
      depth = depth - 1; i = q + 1
      if depth == 0 then return i end
    end
  end
end

local function member(s, o, key)   -- where the value of `key` starts in the object at s[o]
  local i, depth, want_key = o + 1, 0, true
  while true do
    local p = string.find(s, '["{}%[%],:]', i)
    if not p then return nil end
    local c = string.byte(s, p)
    if c == 34 then
      local e = skip_string(s, p)
      if not e then return nil end
      if depth == 0 and want_key and string.sub(s, p + 1, e - 2) == key then
        return string.find(s, '[^%s:]', e)
      end
      i = e
    elseif c == 123 or c == 91 then depth = depth + 1; i = p + 1
    elseif c == 125 or c == 93 then
      if depth == 0 then return nil end
      depth = depth - 1; i = p + 1
    else
      if depth == 0 then want_key = (c == 44) end
      i = p + 1
    end
  end
end

local function mark_redelivered(s)   -- kombu's restore flags, inserted as text
  local top = string.find(s, '%S')
  if not top or string.byte(s, top) ~= 123 then return s end
  local spots = {}
  local h = member(s, top, 'headers')
  if h and string.byte(s, h) == 123 and not member(s, h, 'redelivered') then spots[#spots + 1] = h end
  local p = member(s, top, 'properties')
  if p and string.byte(s, p) == 123 then
    local d = member(s, p, 'delivery_info')
    if d and string.byte(s, d) == 123 and not member(s, d, 'redelivered') then spots[#spots + 1] = d end
  end
  table.sort(spots, function(a, b) return a > b end)
  for _, pos in ipairs(spots) do
    local nxt = string.find(s, '%S', pos + 1)
    local flag = '"redelivered": true, '
    if nxt and string.byte(s, nxt) == 125 then flag = '"redelivered": true' end
    s = string.sub(s, 1, pos) .. flag .. string.sub(s, pos + 1)
  end
  return s
end

local function stored(tag)   -- the leased message's text and whether it is kombu JSON
  local entry = redis.call('HGET', K_UNACKED, tag)
  if entry then
    local s = string.find(entry, '%S', 2)
    local e = s and value_end(entry, s)
    if e then return string.sub(entry, s, e - 1), true end
    return nil, false
  end
  local raw = redis.call('HGET', K_RAW, tag)
  if raw then return raw, false end
  return nil, false
end

local function forget(tag, drop_count)
  redis.call('HDEL', K_UNACKED, tag)
  redis.call('ZREM', K_INDEX, tag)
  redis.call('ZREM', K_LEASES, tag)
  redis.call('HDEL', K_OWNER, tag)
  redis.call('HDEL', K_QUEUE, tag)
  redis.call('HDEL', K_RAW, tag)
  if drop_count then redis.call('HDEL', K_COUNT, tag) end
end

local function give_back(tags, front, prefix)   -- RPUSH (next out) or LPUSH (last), in fetch order
  local items, queues = {}, {}
  for _, tag in ipairs(tags) do
    local info = redis.call('HGET', K_QUEUE, tag)
    local text, kombu = stored(tag)
    if info and text then
      local seq, list = string.match(info, '^(%d+) (.*)$')
      if list then
        if kombu then text = mark_redelivered(text) end
        items[#items + 1] = {tonumber(seq), list, text}
      end
    end
    forget(tag, false)
  end
  if front then table.sort(items, function(a, b) return a[1] > b[1] end)
  else table.sort(items, function(a, b) return a[1] < b[1] end) end
  for _, it in ipairs(items) do
    if front then redis.call('RPUSH', it[2], it[3]) else redis.call('LPUSH', it[2], it[3]) end
    queues[queue_of(it[2])] = true
  end
  for q in pairs(queues) do redis.call('PUBLISH', prefix .. q, '') end
  return #items
end

local function owned(first, owner)   -- ARGV[first..] that this owner holds
  local tags = {}
  for i = first, #ARGV do
    if redis.call('HGET', K_OWNER, ARGV[i]) == owner then tags[#tags + 1] = ARGV[i] end
  end
  return tags
end

local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

local function dead_record(list, reason, died_at, text, kombu)
  local rec = '{"id": ' .. redis.call('INCR', K_DEAD_SEQ) .. ', "queue": ' .. cjson.encode(queue_of(list))
    .. ', "list": ' .. cjson.encode(list) .. ', "reason": ' .. cjson.encode(reason)
    .. ', "died_at": ' .. died_at
  if text and kombu then return rec .. ', "envelope": ' .. cjson.encode(text) .. '}' end
  if text then return rec .. ', "raw_hex": "' .. hex(text) .. '"}' end
  return rec .. ', "envelope": null}'
end
"""

_VALID_UTF8 = r"""
local function valid_utf8(s)
  local i = 1
  while true do
    i = string.find(s, '[\128-\255]', i)
    if not i then return true end
    local c, len = string.byte(s, i), 0
    if c >= 194 and c <= 223 then len = 1 elseif c >= 224 and c <= 239 then len = 2
    elseif c >= 240 and c <= 244 then len = 3 else return false end
    for k = 1, len do
      local b = string.byte(s, i + k)
      if not b or b < 128 or b > 191 then return false end
    end
    local b1 = string.byte(s, i + 1)
    if (c == 224 and b1 < 160) or (c == 237 and b1 > 159) or (c == 240 and b1 < 144)
       or (c == 244 and b1 > 143) then return false end
    i = i + len + 1
  end
end

local function parse(raw)   -- the decoded kombu envelope, or nil for anything else
  if string.find(raw, '[\128-\255]') and not valid_utf8(raw) then return nil end
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg.properties) == 'table' and type(msg.body) == 'string' then
    return msg
  end
  return nil
end

local function taken(tag)
  return redis.call('HEXISTS', K_OWNER, tag) == 1 or redis.call('HEXISTS', K_UNACKED, tag) == 1
    or redis.call('HEXISTS', K_RAW, tag) == 1
end
"""

# ARGV: notify prefix, lease seconds, limit, owner, restore flag. KEYS[11..]: six per queue
# (the four band lists, the delayed zset, the delayed hash).
FETCH = _PRELUDE + _VALID_UTF8 + r"""
local prefix, lease, limit, owner = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local now = server_now()
local restored = 0
if ARGV[5] == '1' then
  restored = give_back(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 1000), true, prefix)
end
local nq = (#KEYS - 10) / 6
for qi = 0, nq - 1 do   -- due delayed messages join the back of their band
  local base = 11 + qi * 6
  for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[base + 4], '-inf', now, 'LIMIT', 0, 1000)) do
    local v = redis.call('HGET', KEYS[base + 5], tag)
    if v then redis.call('LPUSH', KEYS[base + (tonumber(string.sub(v, 1, 1)) or 0)], string.sub(v, 3)) end
    redis.call('HDEL', KEYS[base + 5], tag)
    redis.call('ZREM', KEYS[base + 4], tag)
  end
end
local deadline, out = now + lease, {}
for qi = 0, nq - 1 do
  local base = 11 + qi * 6
  for b = 0, 3 do
    local key = KEYS[base + b]
    while #out < limit do
      local raw = redis.call('RPOP', key)
      if not raw then break end
      local msg, tag, ex, rk = parse(raw), nil, nil, nil
      if msg then
        tag = msg.properties.delivery_tag
        local di = msg.properties.delivery_info
        if type(di) == 'table' then ex, rk = di.exchange, di.routing_key end
      end
      if type(tag) ~= 'string' or tag == '' then tag = 'qctl-' .. redis.sha1hex(raw) end  -- stable
      while taken(tag) do tag = 'qctl-' .. redis.call('INCR', K_SEQ) end
      if type(ex) ~= 'string' then ex = '' end
      if type(rk) ~= 'string' then rk = queue_of(key) end
      if msg then
        redis.call('HSET', K_UNACKED, tag, '[' .. raw .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
        redis.call('ZADD', K_INDEX, now, tag)
      else
        redis.call('HSET', K_RAW, tag, raw)
      end
      redis.call('ZADD', K_LEASES, deadline, tag)
      redis.call('HSET', K_OWNER, tag, owner)
      redis.call('HSET', K_QUEUE, tag, redis.call('INCR', K_SEQ) .. ' ' .. key)
      out[#out + 1] = {tag, qi, raw, redis.call('HINCRBY', K_COUNT, tag, 1), msg and 1 or 0}
    end
  end
  if #out >= limit then break end
end
if #out > 0 then return {out, tostring(now), false, false, restored} end
local next_eta = false
for qi = 0, nq - 1 do
  local z = redis.call('ZRANGE', KEYS[11 + qi * 6 + 4], 0, 0, 'WITHSCORES')
  if z[2] and (not next_eta or tonumber(z[2]) < tonumber(next_eta)) then next_eta = z[2] end
end
local l = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
return {out, tostring(now), next_eta, l[2] or false, restored}
"""

# ARGV: owner, tags...
ACK = _PRELUDE + r"""
local tags = owned(2, ARGV[1])
for _, tag in ipairs(tags) do forget(tag, true) end
return #tags
"""

# ARGV: notify prefix, owner, 'front'|'back', tags...
GIVE_BACK = _PRELUDE + r"""
return give_back(owned(4, ARGV[2]), ARGV[3] == 'front', ARGV[1])
"""

# ARGV: notify prefix.
RESTORE = _PRELUDE + r"""
local now = server_now()
return give_back(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 1000), true, ARGV[1])
"""

# ARGV: owner, lease seconds, tags... Returns the tags that are no longer ours.
RENEW = _PRELUDE + r"""
local now = server_now()
local lost = {}
for i = 3, #ARGV do
  local tag = ARGV[i]
  if redis.call('HGET', K_OWNER, tag) == ARGV[1] then
    redis.call('ZADD', K_LEASES, 'XX', now + tonumber(ARGV[2]), tag)
    redis.call('ZADD', K_INDEX, 'XX', now, tag)   -- a Celery sweep sees a live delivery
  else
    lost[#lost + 1] = tag
  end
end
return lost
"""

# ARGV: owner, tag, reason, died_at. 1 moved, 0 held by another consumer, -1 no such lease.
DEAD_LETTER = _PRELUDE + r"""
local owner = redis.call('HGET', K_OWNER, ARGV[2])
if not owner then return -1 end
if owner ~= ARGV[1] then return 0 end
local text, kombu = stored(ARGV[2])
if not text then forget(ARGV[2], true); return 0 end   -- a Celery sweep gave it back already
local info = redis.call('HGET', K_QUEUE, ARGV[2]) or ''
local list = string.match(info, '^%d+ (.*)$') or ''
redis.call('RPUSH', K_DEAD, dead_record(list, ARGV[3], ARGV[4], text, kombu))
forget(ARGV[2], true)
return 1
"""

# ARGV: list, reason, died_at, envelope text.
DEAD_COPY = _PRELUDE + r"""
return redis.call('RPUSH', K_DEAD, dead_record(ARGV[1], ARGV[2], ARGV[3], ARGV[4], true))
"""

# ARGV: notify prefix, '*' for all or '', ids...
REQUEUE_DEAD = _PRELUDE + r"""
local want, all = {}, ARGV[2] == '*'
for i = 3, #ARGV do want[ARGV[i]] = true end
local n, queues, kept = 0, {}, {}
for _, rec in ipairs(redis.call('LRANGE', K_DEAD, 0, -1)) do
  local ok, r = pcall(cjson.decode, rec)
  local done = false
  if ok and type(r) == 'table' and type(r.list) == 'string' and r.list ~= '' then
    local id = type(r.id) == 'number' and string.format('%d', r.id) or tostring(r.id)
    if all or want[id] then
      local text = nil
      if type(r.envelope) == 'string' then text = r.envelope
      elseif type(r.raw_hex) == 'string' then
        text = string.gsub(r.raw_hex, '..', function(h) return string.char(tonumber(h, 16)) end)
      end
      if text then
        redis.call('LPUSH', r.list, text)
        queues[queue_of(r.list)] = true
        n, done = n + 1, true
        if not all then redis.call('LREM', K_DEAD, 1, rec) end
      end
    end
  end
  if not done then kept[#kept + 1] = rec end
end
if all then
  redis.call('DEL', K_DEAD)
  for _, rec in ipairs(kept) do redis.call('RPUSH', K_DEAD, rec) end
end
for q in pairs(queues) do redis.call('PUBLISH', ARGV[1] .. q, '') end
return n
"""

# KEYS[1]: mailbox. ARGV: payload, ttl ms. The list keeps the longest TTL asked for.
PUT_REPLY = r"""
redis.call('LPUSH', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_SCRIPTS = {"fetch": FETCH, "ack": ACK, "give_back": GIVE_BACK, "restore": RESTORE,
            "renew": RENEW, "dead_letter": DEAD_LETTER, "dead_copy": DEAD_COPY,
            "requeue_dead": REQUEUE_DEAD, "put_reply": PUT_REPLY}


# -- envelopes ------------------------------------------------------------------------------

def encode_envelope(envelope: Envelope, priority: int, exchange: str, routing_key: str,
                    tag: str) -> bytes:
    """kombu's Redis message for ``envelope``: same keys, key order and separators."""
    props = {k: v for k, v in (envelope.properties or {}).items()
             if k not in TRANSPORT_PROPERTIES and k != "priority"}
    props["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    props["priority"] = (envelope.properties or {}).get("priority", priority)  # kombu: setdefault
    props["body_encoding"] = "base64"
    props["delivery_tag"] = tag
    body = envelope.body.encode("utf-8") if isinstance(envelope.body, str) else bytes(envelope.body)
    message = {"body": base64.b64encode(body).decode("ascii"),
               "content-encoding": envelope.content_encoding, "content-type": envelope.content_type,
               "headers": envelope.headers or {}, "properties": props}
    return json.dumps(message, default=_json_default).encode("ascii")


def decode_envelope(raw: bytes) -> tuple[Envelope, str, str, bool]:
    """(envelope, exchange, routing key, redelivered flag) of a kombu message; ValueError if
    it is not one."""
    try:
        message = json_loads(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a kombu JSON message: {one_line(exc)}") from None
    if not isinstance(message, dict):
        raise ValueError(f"not a kombu message: a JSON {type(message).__name__}, not an object")
    props = message.get("properties")
    headers = message.get("headers") or {}
    if not isinstance(props, dict) or not isinstance(headers, dict):
        raise ValueError("not a kombu message: properties or headers are not objects")
    body = message.get("body")
    if not isinstance(body, str):
        raise ValueError("not a kombu message: no string body")
    if props.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(body.encode("ascii"))     # lenient, as kombu
        except (ValueError, UnicodeEncodeError) as exc:
            raise ValueError(f"body is not valid base64: {one_line(exc)}") from None
    else:
        data = body.encode("utf-8")
    info = props.get("delivery_info") if isinstance(props.get("delivery_info"), dict) else {}
    redelivered = bool(info.get("redelivered") or headers.get("redelivered"))
    envelope = Envelope(body=data, headers=headers,
                        properties={k: v for k, v in props.items() if k not in TRANSPORT_PROPERTIES},
                        content_type=message.get("content-type") or "application/json",
                        content_encoding=message.get("content-encoding") or "utf-8")
    return envelope, str(info.get("exchange") or ""), str(info.get("routing_key") or ""), redelivered


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- subscriptions --------------------------------------------------------------------------

class RedisSubscription(Subscription):
    """One PUB/SUB connection on ``/<db>.<channel>`` (PSUBSCRIBE when it has a ``*``)."""

    def __init__(self, transport: "RedisTransport", channel: str) -> None:
        self._errors = transport._errors
        self.topic = f"/{transport.db}.{channel}"
        self._lock = threading.Lock()
        with self._errors:
            self._pubsub = transport._redis().pubsub()
            kind = "psubscribe" if "*" in channel else "subscribe"
            getattr(self._pubsub, kind)(self.topic)
            confirm(self._pubsub, {self.topic}, kind)

    def get(self, timeout: float) -> list[bytes]:
        """Messages broadcast since the last call; waits up to ``timeout`` s for the first."""
        deadline = time.monotonic() + max(timeout, 0.0)
        got: list[bytes] = []
        with self._lock, self._errors:
            if self._pubsub is None:
                return []
            while True:
                left = 0.0 if got else deadline - time.monotonic()
                message = self._pubsub.get_message(timeout=max(0.0, min(left, _MAX_BLOCK)))
                if message is None:
                    if got or time.monotonic() >= deadline:
                        return got
                elif message["type"] in ("message", "pmessage"):
                    got.append(bytes(message["data"]))

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass


def confirm(pubsub: Any, channels: set[str], kind: str = "subscribe", timeout: float = 5.0) -> None:
    """Read until the server confirmed the subscription to every one of ``channels``."""
    waiting = set(channels)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise redis.TimeoutError(f"no {kind} confirmation from the server")
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == kind:
            waiting.discard(_text(message["channel"]))


class _Waiter:
    """A thread's wake-up subscription to the notify channels of the queues it fetches from."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.channels: set[str] = set()

    def listen(self, channels: set[str]) -> bool:
        """Be subscribed to exactly ``channels``; True when a new subscription was made."""
        if channels == self.channels:
            return False
        if self.channels - channels:
            self.pubsub.unsubscribe(*(self.channels - channels))
        new = channels - self.channels
        if new:
            self.pubsub.subscribe(*new)
            confirm(self.pubsub, new)
        self.channels = set(channels)
        return bool(new)

    def pause(self) -> None:
        """Unsubscribe while busy, so notifications do not pile up unread."""
        if self.channels:
            self.pubsub.unsubscribe(*self.channels)
            self.channels = set()

    def wait(self, timeout: float) -> None:
        """Until a notification arrives or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            message = self.pubsub.get_message(timeout=min(left, _MAX_BLOCK))
            if message is not None and message["type"] == "message":
                return


# -- the transport --------------------------------------------------------------------------

class RedisTransport(Transport):
    """kombu's Redis layout with atomic leased fetches, broker-side ETAs and dead letters."""

    supports_delayed_delivery = True

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.poll_interval = float(self.options.get("poll_interval") or 0.1)
        self.supports_delayed_delivery = str(self.options.get("delayed_delivery", True)).lower() \
            not in ("false", "0", "no", "off")
        self._errors = Errors(url, "broker")
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self.db = 0
        self._reset(os.getpid())
        self._redis()                       # bad URLs fail here; nothing is sent yet

    def _reset(self, pid: int) -> None:
        self._pid = pid
        self._consumer_id = f"{socket.gethostname()}:{pid}:{uuid4().hex[:8]}"
        self._held: dict[str, None] = {}    # tags leased by this object, in fetch order
        self._local = threading.local()
        self._waiters: list[_Waiter] = []
        self._next_restore = 0.0
        self._lease_due: float | None = None   # earliest lease deadline seen (server clock)
        self._clock_skew = 0.0                 # server time - local time, from fetch replies

    def _redis(self) -> redis.Redis:
        """The client of this process (a new one, and a new consumer id, after fork)."""
        if os.getpid() != self._pid:
            _INHERITED.append((self._client, self._waiters))
            self._client = None
            self._lock = threading.Lock()
            self._reset(os.getpid())
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    client = connect(self.url, self.options)
                    self.db = int(client.connection_pool.connection_kwargs.get("db") or 0)
                    self._scripts = {name: client.register_script(text)
                                     for name, text in _SCRIPTS.items()}
                    self._client = client
                client = self._client
        return client

    @property
    def consumer_id(self) -> str:  # type: ignore[override]
        """Owner name of our leases; a forked child gets its own."""
        self._redis()
        return self._consumer_id

    def _run(self, name: str, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        client = self._redis()
        with self._errors:
            return self._scripts[name](keys=[*COMMON_KEYS, *keys], args=list(args), client=client)

    @property
    def _notify_prefix(self) -> str:
        return f"qctl.notify.{self.db}."

    # -- queues ---------------------------------------------------------------------------

    def declare_queue(self, name: str, **arguments: Any) -> None:
        """Bind ``name`` in kombu's binding table of its exchange (default: the queue name)."""
        exchange = arguments.get("exchange") or name
        routing_key = arguments.get("routing_key") or name
        member = f"{routing_key}{SEP}{SEP}{name}"
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            pipe.sadd(f"_kombu.binding.{exchange}", member)
            pipe.sadd(f"_kombu.binding_permanent.{exchange}", member)
            pipe.execute()

    def publish(self, queue: str, envelope: Envelope, *, priority: int = 0,
                eta: float | None = None, exchange: str = "", routing_key: str = "") -> None:
        """LPUSH kombu's envelope onto the band list (or into the delayed set) and wake idle
        qctl consumers; returns after Redis replied."""
        tag = str(uuid4())
        text = encode_envelope(envelope, priority, exchange or "", routing_key or queue, tag)
        band = band_index(priority)
        client = self._redis()
        delayed = eta is not None and self.supports_delayed_delivery and eta > time.time()
        with self._errors, client.pipeline(transaction=delayed) as pipe:
            if delayed:
                pipe.zadd(f"qctl.delayed.{queue}", {tag: float(eta)})
                pipe.hset(f"qctl.delayed_msgs.{queue}", tag, b"%d " % band + text)
            else:
                pipe.lpush(list_key(queue, band), text)
            pipe.publish(self._notify_prefix + queue, b"")
            pipe.execute()

    def _queue_keys(self, queue: str) -> list[str]:
        return [*(list_key(queue, b) for b in range(4)),
                f"qctl.delayed.{queue}", f"qctl.delayed_msgs.{queue}"]

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to ``limit`` messages in one script; when idle, wait on the notify channels."""
        queues = list(dict.fromkeys(queues))
        if not queues or limit <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        keys = [key for q in queues for key in self._queue_keys(q)]
        while True:
            got, wake = self._lease(queues, keys, limit)
            if got:
                self._pause_waiter()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            waiter = self._waiter()
            with self._errors:
                try:
                    if waiter.listen({self._notify_prefix + q for q in queues}):
                        continue        # subscribed now: look again, so no publish is missed
                    waiter.wait(min(left, self.poll_interval, wake))
                except BaseException:
                    self._drop_waiter()
                    raise

    def _lease(self, queues: list[str], keys: list[str], limit: int) -> tuple[list[Delivery], float]:
        """One run of the fetch script: (deliveries, seconds until something may be due)."""
        now = time.time()
        restore = now >= self._next_restore or (
            self._lease_due is not None and now + self._clock_skew >= self._lease_due)
        with self._lock:
            owner = self._consumer_id
        reply = self._run("fetch", [self._notify_prefix, repr(float(self.lease_seconds)), int(limit),
                                    owner, "1" if restore else "0"], keys)
        if restore:
            self._next_restore = now + _RESTORE_EVERY
        rows, server_now, next_eta, next_lease = reply[0], float(reply[1]), reply[2], reply[3]
        self._clock_skew = server_now - now
        self._lease_due = float(next_lease) if next_lease is not None else None
        deliveries = [self._delivery(queues, *row) for row in rows]
        if deliveries:
            with self._lock:
                self._held.update((d.tag, None) for d in deliveries)
        due = [float(x) - server_now for x in (next_eta, next_lease) if x is not None]
        return deliveries, max(min(due, default=3600.0), 0.0) + 0.001

    @staticmethod
    def _delivery(queues: list[str], tag: bytes, index: int, raw: bytes, count: int,
                  kombu: int) -> Delivery:
        tag_text, queue = _text(tag), queues[int(index)]
        if not kombu:
            return Delivery(tag=tag_text, queue=queue, envelope=None, delivery_count=int(count),
                            redelivered=int(count) > 1, raw=bytes(raw), routing_key=queue,
                            error="not a kombu JSON message (an object with properties and a body)")
        try:
            envelope, exchange, routing_key, flag = decode_envelope(raw)
        except ValueError as exc:
            return Delivery(tag=tag_text, queue=queue, envelope=None, delivery_count=int(count),
                            redelivered=int(count) > 1, raw=bytes(raw), error=str(exc),
                            routing_key=queue)
        return Delivery(tag=tag_text, queue=queue, envelope=envelope,
                        redelivered=flag or int(count) > 1, delivery_count=int(count),
                        exchange=exchange, routing_key=routing_key or queue)

    def _waiter(self) -> _Waiter:
        waiter = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = _Waiter(self._redis())
            with self._lock:
                self._waiters.append(waiter)
        return waiter

    def _pause_waiter(self) -> None:
        waiter = getattr(self._local, "waiter", None)
        if waiter is not None:
            try:
                waiter.pause()
            except (redis.RedisError, OSError):
                self._drop_waiter()

    def _drop_waiter(self) -> None:
        waiter = getattr(self._local, "waiter", None)
        self._local.waiter = None
        if waiter is not None:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            try:
                waiter.pubsub.close()
            except (redis.RedisError, OSError):
                pass

    @staticmethod
    def _tags(tags: Iterable[Any]) -> list[str]:
        return [str(tag) for tag in tags if tag is not None]

    def _forget_held(self, tags: Iterable[str]) -> None:
        with self._lock:
            for tag in tags:
                self._held.pop(tag, None)

    def ack(self, tags: Iterable[Any]) -> None:
        """Delete our leased messages: one script run for all tags."""
        tags = self._tags(tags)
        if tags:
            self._run("ack", [self.consumer_id, *tags])
            self._forget_held(tags)

    def requeue(self, tags: Iterable[Any]) -> None:
        """Our leased messages back to the end of their list (kombu's reject), redelivered."""
        tags = self._tags(tags)
        if tags:
            self._run("give_back", [self._notify_prefix, self.consumer_id, "back", *tags])
            self._forget_held(tags)

    def dead_letter(self, tag: Any, reason: str, envelope: Envelope | None = None,
                    queue: str | None = None) -> None:
        """Move the leased message to ``qctl.dead`` (or store a copy of ``envelope``)."""
        died_at = repr(time.time())
        if tag is not None:
            moved = self._run("dead_letter", [self.consumer_id, str(tag), reason, died_at])
            self._forget_held([str(tag)])
            if int(moved) >= 0 or envelope is None:
                return
        if envelope is None:
            return
        priority = (envelope.properties or {}).get("priority") or 0
        text = encode_envelope(envelope, priority, "", queue or "", str(uuid4()))
        self._run("dead_copy", [list_key(queue or "", band_index(priority)), reason, died_at, text])

    def renew_leases(self) -> None:
        """Push out the deadline (and kombu's unacked_index time) of every lease we hold."""
        with self._lock:
            tags = list(self._held)
        for start in range(0, len(tags), 1000):
            lost = self._run("renew", [self.consumer_id, repr(float(self.lease_seconds)),
                                       *tags[start:start + 1000]])
            self._forget_held(_text(t) for t in lost)

    def restore_expired(self) -> int:
        """Expired leases (of any consumer) back to the front of their lists."""
        total = 0
        while True:
            count = int(self._run("restore", [self._notify_prefix]))
            total += count
            if count < _RESTORE_BATCH:
                return total

    def release_all(self) -> int:
        """Everything this object holds back to the front of its list, in fetch order."""
        with self._lock:
            tags, self._held = list(self._held), {}
        if not tags:
            return 0
        return int(self._run("give_back", [self._notify_prefix, self.consumer_id, "front", *tags]))

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; returns how many."""
        keys = self._queue_keys(queue)
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            for key in keys[:4]:
                pipe.llen(key)
            pipe.zcard(keys[4])
            pipe.delete(*keys)
            return sum(pipe.execute()[:5])

    def queue_size(self, queue: str) -> int:
        """LLEN of the list and its bands plus the delayed messages."""
        keys = self._queue_keys(queue)
        client = self._redis()
        with self._errors, client.pipeline(transaction=False) as pipe:
            for key in keys[:4]:
                pipe.llen(key)
            pipe.zcard(keys[4])
            return sum(pipe.execute())

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters first."""
        if limit <= 0:
            return []
        with self._errors:
            records = self._redis().lrange("qctl.dead", 0, int(limit) - 1)
        letters = []
        for item in records:
            try:
                record = json.loads(item)
            except ValueError:
                continue      # not ours: leave it alone
            envelope, raw = None, None
            if isinstance(record.get("envelope"), str):
                raw = record["envelope"].encode("utf-8")
                try:
                    envelope = decode_envelope(raw)[0]
                    raw = None
                except ValueError:
                    pass
            elif isinstance(record.get("raw_hex"), str):
                raw = bytes.fromhex(record["raw_hex"])
            letters.append(DeadLetter(id=record.get("id"), queue=record.get("queue") or "",
                                      reason=record.get("reason") or "",
                                      died_at=float(record.get("died_at") or 0.0),
                                      envelope=envelope, raw=raw))
        return letters

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Dead letters back to the end of their band list, delivery count reset."""
        if ids is None:
            return int(self._run("requeue_dead", [self._notify_prefix, "*"]))
        ids = [str(i) for i in ids]
        if not ids:
            return 0
        return int(self._run("requeue_dead", [self._notify_prefix, "", *ids]))

    def purge_dead(self) -> int:
        """Delete every dead letter."""
        client = self._redis()
        with self._errors, client.pipeline(transaction=True) as pipe:
            pipe.llen("qctl.dead")
            pipe.delete("qctl.dead")
            return int(pipe.execute()[0])

    # -- broadcast channel and reply mailboxes --------------------------------------------

    def broadcast(self, channel: str, payload: bytes) -> None:
        """``PUBLISH /<db>.<channel> payload`` (kombu's fanout over PUB/SUB)."""
        client = self._redis()
        with self._errors:
            client.publish(f"/{self.db}.{channel}", payload)

    def subscribe(self, channel: str) -> Subscription:
        """A PUB/SUB subscription, confirmed by the server before this returns."""
        self._redis()
        return RedisSubscription(self, channel)

    def put_reply(self, mailbox: str, payload: bytes, ttl: float = 60.0) -> None:
        """LPUSH onto the ``mailbox`` list, which expires ``ttl`` s after the last put."""
        client = self._redis()
        with self._errors:
            self._scripts["put_reply"](keys=[mailbox], args=[payload, max(1, int(ttl * 1000))],
                                       client=client)

    def get_replies(self, mailbox: str, timeout: float) -> list[bytes]:
        """BRPOP the first reply (up to ``timeout`` s), then drain the rest without waiting."""
        client = self._redis()
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._errors:
            while True:
                first = client.rpop(mailbox)
                if first is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                # BRPOP 0 would block forever: never pass it; whole milliseconds at least.
                popped = client.brpop([mailbox], timeout=max(0.001, round(min(left, _MAX_BLOCK), 3)))
                if popped is not None:
                    first = popped[1]
                    break
            got = [bytes(first)]
            while True:
                more = client.rpop(mailbox, 100)
                if not more:
                    return got
                got.extend(bytes(x) for x in more)

    # -- life cycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """PING; ``OperationalError`` when Redis does not answer."""
        client = self._redis()
        with self._errors:
            client.ping()

    def close(self) -> None:
        """Close this process's connections. Idempotent; the object reconnects on next use."""
        if os.getpid() != self._pid:
            self._redis()               # forked: only forget the parent's connections
            return
        with self._lock:
            waiters, self._waiters = self._waiters, []
            client = self._client
        self._local = threading.local()
        for waiter in waiters:
            try:
                waiter.pubsub.close()
            except (redis.RedisError, OSError):
                pass
        if client is not None:
            try:
                client.connection_pool.disconnect()
            except (redis.RedisError, OSError):
                pass
