"""The Lua scripts of the Redis transport (``qctl.transports.redis``), run with EVALSHA.

``_PRELUDE`` (key names and shared functions: lease bookkeeping, ``give_back``, kombu's
``redelivered`` flags inserted into the JSON text by ``mark_redelivered``, dead-letter records)
is prepended to every script except ``publish`` and the remote-control ones (``put_reply``,
``bind``, ``announce``, ``live_nodes``); ``FETCH`` is the atomic leased fetch; ``_SCRIPTS``
maps each script name ``RedisTransport._run`` takes to its full text. The keys they use are
listed in the docstring of ``qctl.transports.redis``.
"""

# Key names are built inside the scripts (kombu's fixed names; queue lists from ARGV or from
# qctl.lease_queue): fewer arguments to pack per call, and a single (non-cluster) Redis.

_PRELUDE = r"""
pcall(redis.replicate_commands)   -- TIME before writes on Redis < 5; a no-op on 7
local K_UNACKED, K_INDEX, K_LEASES, K_OWNER = 'unacked', 'unacked_index', 'qctl.leases', 'qctl.lease_owner'
local K_QUEUE, K_COUNT, K_RAW = 'qctl.lease_queue', 'qctl.delivery_count', 'qctl.lease_msg'
local K_SEQ, K_DEAD, K_DEAD_SEQ = 'qctl.seq', 'qctl.dead', 'qctl.dead_seq'
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function queue_of(list) return string.match(list, '^(.*)\6\22[369]$') or list end
local function skip_string(s, i)   -- s[i] is '"': the index after the closing quote
  local j = i + 1
  while true do
    local q = string.find(s, '["\\]', j)
    if not q then return nil elseif string.byte(s, q) == 92 then j = q + 2 else return q + 1 end
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
    elseif c == 123 or c == 91 then depth, i = depth + 1, p + 1
    elseif c == 125 or c == 93 then
      if depth == 0 then return nil end
      depth, i = depth - 1, p + 1
    else
      if depth == 0 then want_key = (c == 44) end
      i = p + 1
    end
  end
end
local function mark_redelivered(s)   -- kombu's restore flags, inserted into the text
  local top = string.find(s, '%S')
  if not top or string.byte(s, top) ~= 123 then return s end
  local spots, h, p = {}, member(s, top, 'headers'), member(s, top, 'properties')
  if h and string.byte(s, h) == 123 and not member(s, h, 'redelivered') then spots[#spots + 1] = h end
  local d = p and string.byte(s, p) == 123 and member(s, p, 'delivery_info')
  if d and string.byte(s, d) == 123 and not member(s, d, 'redelivered') then spots[#spots + 1] = d end
  table.sort(spots, function(a, b) return a > b end)
  for _, pos in ipairs(spots) do
    local nxt, flag = string.find(s, '%S', pos + 1), '"redelivered": true, '
    if nxt and string.byte(s, nxt) == 125 then flag = '"redelivered": true' end
    s = string.sub(s, 1, pos) .. flag .. string.sub(s, pos + 1)
  end
  return s
end
local function stored(tag)   -- the leased text and whether it is kombu JSON (nil: not ours now)
  local v = redis.call('HGET', K_RAW, tag)
  if not v then return nil, false end
  local kombu = string.sub(v, 1, 1) == 'k'
  if kombu and redis.call('HEXISTS', K_UNACKED, tag) == 0 then return nil, false end   -- a Celery sweep
  return string.sub(v, 2), kombu
end
local function forget(tag, drop_count)
  redis.call('HDEL', K_UNACKED, tag); redis.call('ZREM', K_INDEX, tag); redis.call('ZREM', K_LEASES, tag)
  redis.call('HDEL', K_OWNER, tag); redis.call('HDEL', K_QUEUE, tag); redis.call('HDEL', K_RAW, tag)
  if drop_count then redis.call('HDEL', K_COUNT, tag) end
end
local function give_back(tags, prefix)   -- RPUSH: next out again, in fetch order
  local items, queues = {}, {}
  for _, tag in ipairs(tags) do
    local info, text, kombu = redis.call('HGET', K_QUEUE, tag), stored(tag)
    local seq, list = string.match(info or '', '^(%d+) (.*)$')
    if list and text then
      items[#items + 1] = {tonumber(seq), list, kombu and mark_redelivered(text) or text}
    end
    forget(tag, false)
  end
  table.sort(items, function(a, b) return a[1] > b[1] end)
  for _, it in ipairs(items) do
    redis.call('RPUSH', it[2], it[3])
    queues[queue_of(it[2])] = true
  end
  for q in pairs(queues) do redis.call('PUBLISH', prefix .. q, '') end
  return #items
end
local function owned(first, owner)   -- the tags in ARGV[first..] that `owner` holds
  local tags = {}
  for i = first, #ARGV do
    if redis.call('HGET', K_OWNER, ARGV[i]) == owner then tags[#tags + 1] = ARGV[i] end
  end
  return tags
end
local function dead_record(list, reason, died_at, text, kombu)
  local rec = '{"id": ' .. redis.call('INCR', K_DEAD_SEQ) .. ', "queue": ' .. cjson.encode(queue_of(list))
    .. ', "list": ' .. cjson.encode(list) .. ', "reason": ' .. cjson.encode(reason) .. ', "died_at": ' .. died_at
  if kombu then return rec .. ', "envelope": ' .. cjson.encode(text) .. '}' end
  return rec .. ', "raw_hex": "' .. string.gsub(text, '.', function(c) return string.format('%02x', string.byte(c)) end) .. '"}'
end
"""

# ARGV: notify prefix, lease seconds, limit, owner, restore flag, queue names...
FETCH = _PRELUDE + r"""
local function valid_utf8(s)   -- strict: no stray bytes, overlong forms, surrogates, > U+10FFFF
  local i = string.find(s, '[\128-\255]')
  while i do
    local c, b1 = string.byte(s, i, i + 1)
    local len = (c >= 194 and c <= 223 and 1) or (c >= 224 and c <= 239 and 2) or (c >= 240 and c <= 244 and 3)
    if not len or not string.find(string.sub(s, i + 1, i + len), '^[\128-\191]+$') or #string.sub(s, i + 1, i + len) < len
       or (c == 224 and b1 < 160) or (c == 237 and b1 > 159) or (c == 240 and b1 < 144) or (c == 244 and b1 > 143) then
      return false
    end
    i = string.find(s, '[\128-\255]', i + len + 1)
  end
  return true
end
local function parse(raw)   -- the decoded kombu envelope, or nil for anything else
  if string.find(raw, '[\128-\255]') and not valid_utf8(raw) then return nil end
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg.properties) == 'table' and type(msg.body) == 'string' then
    return msg
  end
end
local function taken(tag)   -- by us, or by a Celery worker (its kombu unacked entry)
  return redis.call('HEXISTS', K_OWNER, tag) == 1 or redis.call('HEXISTS', K_UNACKED, tag) == 1
end
local prefix, lease, limit, owner = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local now = server_now()
if ARGV[5] == '1' then
  give_back(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 1000), prefix)
end
local queues = {}
for i = 6, #ARGV do
  local q = ARGV[i]
  queues[#queues + 1] = {q, q .. '\6\0223', q .. '\6\0226', q .. '\6\0229', 'qctl.delayed.' .. q, 'qctl.delayed_msgs.' .. q}
end
for _, k in ipairs(queues) do   -- due delayed messages join the back of their band
  for _, tag in ipairs(redis.call('ZRANGEBYSCORE', k[5], '-inf', now, 'LIMIT', 0, 1000)) do
    local v = redis.call('HGET', k[6], tag)
    if v then redis.call('LPUSH', k[1 + (tonumber(string.sub(v, 1, 1)) or 0)], string.sub(v, 3)) end
    redis.call('HDEL', k[6], tag); redis.call('ZREM', k[5], tag)
  end
end
local deadline, out = now + lease, {}
for qi, k in ipairs(queues) do
  for b = 1, 4 do
    while #out < limit do
      local raw = redis.call('RPOP', k[b])
      if not raw then break end
      local msg, tag, ex, rk = parse(raw), nil, nil, nil
      if msg then
        local di = msg.properties.delivery_info
        tag = msg.properties.delivery_tag
        if type(di) == 'table' then ex, rk = di.exchange, di.routing_key end
      end
      if type(tag) ~= 'string' or tag == '' then tag = 'qctl-' .. redis.sha1hex(raw) end  -- stable
      while taken(tag) do tag = 'qctl-' .. redis.call('INCR', K_SEQ) end   -- a duplicate copy
      if type(ex) ~= 'string' then ex = '' end
      if type(rk) ~= 'string' then rk = k[1] end
      if msg then
        redis.call('HSET', K_UNACKED, tag, '[' .. raw .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
        redis.call('ZADD', K_INDEX, now, tag)
      end
      redis.call('HSET', K_RAW, tag, (msg and 'k' or 'r') .. raw)   -- our copy, exact bytes
      redis.call('ZADD', K_LEASES, deadline, tag)
      redis.call('HSET', K_OWNER, tag, owner)
      redis.call('HSET', K_QUEUE, tag, redis.call('INCR', K_SEQ) .. ' ' .. k[b])
      out[#out + 1] = {tag, qi - 1, raw, redis.call('HINCRBY', K_COUNT, tag, 1), msg and 1 or 0}
    end
  end
end
if #out > 0 then return {out, tostring(now)} end
local next_eta = false
for _, k in ipairs(queues) do
  local z = redis.call('ZRANGE', k[5], 0, 0, 'WITHSCORES')
  if z[2] and (not next_eta or tonumber(z[2]) < tonumber(next_eta)) then next_eta = z[2] end
end
local l = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
return {out, tostring(now), next_eta, l[2] or false}
"""

_SCRIPTS = {
    # ARGV: owner, tags...
    "ack": "local tags = owned(2, ARGV[1]) for _, tag in ipairs(tags) do forget(tag, true) end "
           "return #tags",
    # ARGV: owner, then tag, eta pairs. Leased ETA messages into the broker-side delayed set.
    "defer": r"""
local n = 0
for i = 2, #ARGV, 2 do
  local tag, eta = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', K_OWNER, tag) == ARGV[1] then
    local info, text, kombu = redis.call('HGET', K_QUEUE, tag), stored(tag)
    local list = string.match(info or '', '^%d+ (.*)$')
    if list and text and kombu then
      local q, step = queue_of(list), string.match(list, '\6\22([369])$')
      redis.call('ZADD', 'qctl.delayed.' .. q, eta, tag)
      redis.call('HSET', 'qctl.delayed_msgs.' .. q, tag, (step and tonumber(step) / 3 or 0) .. ' ' .. text)
      forget(tag, true)
      n = n + 1
    end
  end
end
return n""",
    # ARGV: notify prefix, owner, tags...
    "give_back": "return give_back(owned(3, ARGV[2]), ARGV[1])",
    # ARGV: notify prefix.
    "restore": "return give_back(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', server_now(), "
               "'LIMIT', 0, 1000), ARGV[1])",
    # ARGV: owner, lease seconds, tags... Returns the tags that are no longer ours.
    "renew": r"""
local now, lost = server_now(), {}
for i = 3, #ARGV do
  if redis.call('HGET', K_OWNER, ARGV[i]) == ARGV[1] then
    redis.call('ZADD', K_LEASES, 'XX', now + tonumber(ARGV[2]), ARGV[i])
    redis.call('ZADD', K_INDEX, 'XX', now, ARGV[i])   -- a Celery sweep sees a live delivery
  else lost[#lost + 1] = ARGV[i] end
end
return lost""",
    # ARGV: owner, tag or '', reason, died_at, list and text of a copy to store when the tag is
    # not leased at all. 1 moved, 2 copy stored, 0 held by another consumer (or nothing to do).
    "dead_letter": r"""
local owner = ARGV[2] ~= '' and redis.call('HGET', K_OWNER, ARGV[2])
if owner and owner ~= ARGV[1] then return 0 end
if owner then
  local text, kombu = stored(ARGV[2])
  local list = string.match(redis.call('HGET', K_QUEUE, ARGV[2]) or '', '^%d+ (.*)$')
  forget(ARGV[2], true)
  if not text then return 0 end   -- a Celery restore sweep gave it back already
  redis.call('RPUSH', K_DEAD, dead_record(list or '', ARGV[3], ARGV[4], text, kombu))
  return 1
end
if ARGV[6] == '' then return 0 end
redis.call('RPUSH', K_DEAD, dead_record(ARGV[5], ARGV[3], ARGV[4], ARGV[6], true))
return 2""",
    # ARGV: notify prefix, '*' (all) or '', ids...
    "requeue_dead": r"""
local want, all, n, queues, kept = {}, ARGV[2] == '*', 0, {}, {}
for i = 3, #ARGV do want[ARGV[i]] = true end
for _, rec in ipairs(redis.call('LRANGE', K_DEAD, 0, -1)) do
  local ok, r = pcall(cjson.decode, rec)
  local text = nil
  if ok and type(r) == 'table' and type(r.list) == 'string' and r.list ~= '' and
     (all or want[type(r.id) == 'number' and string.format('%d', r.id) or tostring(r.id)]) then
    if type(r.envelope) == 'string' then text = r.envelope
    elseif type(r.raw_hex) == 'string' then
      text = string.gsub(r.raw_hex, '..', function(h) return string.char(tonumber(h, 16)) end)
    end
  end
  if text then
    redis.call('LPUSH', r.list, text)
    queues[queue_of(r.list)], n = true, n + 1
    if not all then redis.call('LREM', K_DEAD, 1, rec) end
  else kept[#kept + 1] = rec end
end
if all then   -- one rewrite instead of an O(n) LREM per record
  redis.call('DEL', K_DEAD)
  for _, rec in ipairs(kept) do redis.call('RPUSH', K_DEAD, rec) end
end
for q in pairs(queues) do redis.call('PUBLISH', ARGV[1] .. q, '') end
return n""",
}
_SCRIPTS = {name: _PRELUDE + body for name, body in _SCRIPTS.items()}
_SCRIPTS["fetch"] = FETCH
# KEYS: the band list, or the delayed zset and hash. ARGV: envelope, notify channel[, tag, eta,
# band]. One command (cheaper than a pipeline), atomic.
_SCRIPTS["publish"] = """if ARGV[3] then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3]); redis.call('HSET', KEYS[2], ARGV[3], ARGV[5] .. ' ' .. ARGV[1])
else redis.call('LPUSH', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], '')"""
# Remote control (kombu's pidbox layout; no KEYS: the key names come in ARGV, single Redis).
# ARGV: binding set (_kombu.binding.<exchange>), routing key, envelope, ttl ms. A Celery
# worker's reply: the queues of the members "<rk>\x06\x16<pattern>\x06\x16<queue>" whose routing
# key is ours (kombu's direct lookup, a set), LPUSH to each; no binding, no push. Each list keeps
# the longest TTL asked for. Returns how many lists got it.
_SCRIPTS["put_reply"] = r"""local sep, seen, n = '\6\22', {}, 0
for _, m in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  local i = string.find(m, sep, 1, true)
  local j = i and string.find(m, sep, i + 2, true)
  if j and string.sub(m, 1, i - 1) == ARGV[2] then
    local queue = string.sub(m, j + 2)
    if not seen[queue] then
      seen[queue] = true
      n = n + 1
      redis.call('LPUSH', queue, ARGV[3])
      if redis.call('PTTL', queue) < tonumber(ARGV[4]) then redis.call('PEXPIRE', queue, ARGV[4]) end
    end
  end
end
return n"""
# ARGV: binding set, member, exchange, ttl ms. kombu 5.7's REFRESH_BINDING: SADD the member and
# push the exchange's sweep deadline (server ms) out to now + ttl, never back (ZADD GT, written
# out for Redis < 6.2).
_SCRIPTS["bind"] = r"""pcall(redis.replicate_commands)
redis.call('SADD', ARGV[1], ARGV[2])
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[4])
local current = redis.call('ZSCORE', '_kombu.binding_deadlines', ARGV[3])
if not current or tonumber(current) < deadline then
  redis.call('ZADD', '_kombu.binding_deadlines', string.format('%d', deadline), ARGV[3])
end"""
# The live-node registry: zset qctl.nodes, nodename -> expiry (server seconds).
# ARGV: nodename, ttl s. Also drops the entries that expired (cheap: O(log n) when none).
_SCRIPTS["announce"] = r"""pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', 'qctl.nodes', string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', 'qctl.nodes', '-inf', string.format('%.6f', now))"""
_SCRIPTS["live_nodes"] = r"""local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', 'qctl.nodes', '(' .. string.format('%.6f', now), '+inf')"""
