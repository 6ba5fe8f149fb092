"""The Lua scripts that change a partition: each one command, atomic, in the partition's slot.

They only store: every decision (dedupe, ledger, traits, track mode, grouping) was taken in
Python by `gateway.rules`; a script writes its outcome, with the storage semantics the
SQLite store has in SQL (an outbox upsert adds occurrences or replaces a body, as
`ON CONFLICT ... DO UPDATE` does). Every script an owner runs starts with `FENCE_LUA`.

Every script takes the same first keys (`fixed_keys`): the lease, the epoch, the cursor,
the inbox stream, the id counter, the outbox's hashes and the dead letters' hashes; the keys
that vary (a day's dedupe set, a source's due set) follow, and ops name them by index.
"""

from __future__ import annotations

from gateway.store.redis.lease import FENCE_LUA
from gateway.store.redis.partition import (
    ID_BITS,
    dead_key,
    epoch_key,
    inbox_key,
    lease_key,
    outbox_key,
    progress_key,
    seq_key,
    waiting_key,
)

OUTBOX_PARTS = ("keys", "meta", "path", "body", "n", "v", "a", "err")
DEAD_PARTS = ("meta", "body", "n", "last", "replayed", "groups")

ONCE_TTL = 60  # seconds a script run's token is kept (see `partition.once_key`)

# after the fence: a run whose token is recorded already happened (its reply was lost)
_ONCE = f"""
if redis.call('EXISTS', KEYS[ONCE]) == 1 then return 1 end
redis.call('SET', KEYS[ONCE], '1', 'EX', {ONCE_TTL})
"""

# op codes of the commit script (see `COMMIT`)
SADD, HSET, ZADD_GT, OUTBOX_ADD, OUTBOX_REPLACE, DEAD_ADD, DEAD_JOIN = range(1, 8)


def fixed_keys(partition: int) -> list[str]:
    return [
        lease_key(partition), epoch_key(partition), progress_key(partition),
        inbox_key(partition), seq_key(partition),
        *(outbox_key(partition, part) for part in OUTBOX_PARTS),
        *(dead_key(partition, part) for part in DEAD_PARTS),
        waiting_key(partition),
    ]


FIXED = len(fixed_keys(0))

# KEYS: see `fixed_keys`. Helpers shared by the scripts below.
_PRELUDE = f"""
local K_LEASE, K_EPOCH, K_PROGRESS, K_INBOX, K_SEQ, K_WAITING = 1, 2, 3, 4, 5, 20
local OB_KEYS, OB_META, OB_PATH, OB_BODY, OB_N, OB_V, OB_A, OB_ERR = 6, 7, 8, 9, 10, 11, 12, 13
local DL_META, DL_BODY, DL_N, DL_LAST, DL_REPLAYED, DL_GROUPS = 14, 15, 16, 17, 18, 19

local function new_id(partition)
  return string.format('%d', redis.call('INCR', KEYS[K_SEQ]) * {1 << ID_BITS} + partition)
end

local function outbox_insert(partition, due, sk, meta, path, body, rep, at)
  local id = new_id(partition)
  redis.call('HSET', KEYS[OB_KEYS], sk, id)
  redis.call('HSET', KEYS[OB_META], id, meta)
  redis.call('HSET', KEYS[OB_PATH], id, path)
  redis.call('HSET', KEYS[OB_BODY], id, body)
  redis.call('HSET', KEYS[OB_N], id, rep)
  redis.call('HSET', KEYS[OB_V], id, 0)
  redis.call('HSET', KEYS[OB_A], id, 0)
  redis.call('ZADD', due, at, id)
  return id
end

local function outbox_delete(id, sk, due)
  for k = OB_META, OB_ERR do redis.call('HDEL', KEYS[k], id) end
  if redis.call('HGET', KEYS[OB_KEYS], sk) == id then redis.call('HDEL', KEYS[OB_KEYS], sk) end
  redis.call('ZREM', due, id)
end

local function dead_add(partition, meta, body, rep, at, group)
  local id = new_id(partition)
  redis.call('HSET', KEYS[DL_META], id, meta)
  redis.call('HSET', KEYS[DL_BODY], id, body)
  redis.call('HSET', KEYS[DL_N], id, rep)
  redis.call('HSET', KEYS[DL_LAST], id, at)
  if group ~= '' then redis.call('HSET', KEYS[DL_GROUPS], group, id) end
  return id
end
"""

# ARGV: owner, epoch, cursor (an entry id, or ''), partition, the index in KEYS of the
# run's token (`once_key`), the messages of the entries the cursor moves past (the owner
# read them: it knows their counts, and Redis need not read them back), then the ops, each
# as its code, its number of arguments and those (binary-safe strings: Redis's cmsgpack has
# no bytes type). One turn of one partition, or nothing: refused (0) unless fenced.
COMMIT = FENCE_LUA + _PRELUDE + "local ONCE = tonumber(ARGV[5])" + _ONCE + """
local partition = tonumber(ARGV[4])
local function pair(t, a, b) t[#t + 1] = a; t[#t + 1] = b end
local last = #ARGV
local i = 7
while i <= last do
  -- an op's arguments are ARGV[a .. i - 1], read in place (no table an op)
  local code, a = tonumber(ARGV[i]), i + 2
  i = a + tonumber(ARGV[i + 1])
  if code == 1 then
    redis.call('SADD', KEYS[tonumber(ARGV[a])], unpack(ARGV, a + 1, i - 1))
  elseif code == 2 then
    redis.call('HSET', KEYS[tonumber(ARGV[a])], unpack(ARGV, a + 1, i - 1))
  elseif code == 3 then
    redis.call('ZADD', KEYS[tonumber(ARGV[a])], 'GT', ARGV[a + 1], ARGV[a + 2])
  elseif code == 4 or code == 5 then
    -- args: due key, now, then for each call in order: (source, key), meta, path, body,
    -- repeat. The op's lookups are one HMGET and the items it makes one command a hash
    -- (not eight calls an item); a call met again in the op updates the item it is making
    local due, at = KEYS[tonumber(ARGV[a])], ARGV[a + 1]
    local slots = {}
    for j = a + 2, i - 1, 5 do slots[#slots + 1] = ARGV[j] end
    local found = redis.call('HMGET', KEYS[OB_KEYS], unpack(slots))
    local made, new = {}, {}  -- slot -> the item this op makes; those items, in order
    for k = 1, #slots do
      local j = a + 2 + (k - 1) * 5
      local item, id = made[slots[k]], found[k]
      if item then
        if code == 4 then item.n = item.n + tonumber(ARGV[j + 4]) else item.path = ARGV[j + 2] end
        item.body = ARGV[j + 3]
        item.v = item.v + 1
      elseif not id then
        item = {id = new_id(partition), slot = slots[k], meta = ARGV[j + 1], path = ARGV[j + 2],
                body = ARGV[j + 3], n = tonumber(ARGV[j + 4]), v = 0}
        made[slots[k]] = item
        new[#new + 1] = item
      elseif code == 4 then
        -- more occurrences of a ledger row's call: the body of the latest
        redis.call('HINCRBY', KEYS[OB_N], id, ARGV[j + 4])
        redis.call('HSET', KEYS[OB_BODY], id, ARGV[j + 3])
        redis.call('HINCRBY', KEYS[OB_V], id, 1)
      else
        -- an identify or group call merged again: the unsent one replaced
        redis.call('HSET', KEYS[OB_BODY], id, ARGV[j + 3])
        redis.call('HSET', KEYS[OB_PATH], id, ARGV[j + 2])
        redis.call('HINCRBY', KEYS[OB_V], id, 1)
      end
    end
    if #new > 0 then
      -- each part's pairs: (slot, id) for the keys, (id, value) for the others
      local ks, meta, path, body, n, v, att, due_at = {}, {}, {}, {}, {}, {}, {}, {}
      for _, item in ipairs(new) do
        local id = item.id
        pair(ks, item.slot, id)
        pair(meta, id, item.meta)
        pair(path, id, item.path)
        pair(body, id, item.body)
        pair(n, id, item.n)
        pair(v, id, item.v)
        pair(att, id, 0)
        pair(due_at, at, id)
      end
      redis.call('HSET', KEYS[OB_KEYS], unpack(ks))
      redis.call('HSET', KEYS[OB_META], unpack(meta))
      redis.call('HSET', KEYS[OB_PATH], unpack(path))
      redis.call('HSET', KEYS[OB_BODY], unpack(body))
      redis.call('HSET', KEYS[OB_N], unpack(n))
      redis.call('HSET', KEYS[OB_V], unpack(v))
      redis.call('HSET', KEYS[OB_A], unpack(att))
      redis.call('ZADD', due, unpack(due_at))
    end
  elseif code == 6 then
    -- args: meta, body, repeat, now, group field ('' when not grouped)
    dead_add(partition, ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
  elseif code == 7 then
    -- args: letter id, occurrences, now
    if redis.call('HEXISTS', KEYS[DL_N], ARGV[a]) == 1 then
      redis.call('HINCRBY', KEYS[DL_N], ARGV[a], ARGV[a + 1])
      redis.call('HSET', KEYS[DL_LAST], ARGV[a], ARGV[a + 2])
    end
  end
end
if ARGV[3] ~= '' then
  local function parse(id)
    local dash = string.find(id, '-', 1, true)
    return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
  end
  local ms, seq = parse(ARGV[3])
  local cur = redis.call('GET', KEYS[K_PROGRESS])
  local behind = false
  if cur then
    local cms, cseq = parse(cur)
    behind = ms < cms or (ms == cms and seq <= cseq)
  end
  if not behind then
    redis.call('SET', KEYS[K_PROGRESS], ARGV[3])
    -- what the trim drops leaves the partition's count of waiting messages
    local gone = tonumber(ARGV[6])
    if gone > 0 then redis.call('DECRBY', KEYS[K_WAITING], gone) end
    redis.call('XTRIM', KEYS[K_INBOX], 'MINID', string.format('%d-%d', ms, seq + 1))
  end
end
return 1
"""

# KEYS: fixed, then the item's due set, the run's token; ARGV: owner, epoch, id, "track" or
# not, version, (source, key). A track row loses one occurrence (it may have grown
# meanwhile); another call goes unless a newer version (more traits merged in) still has to
# go. Not idempotent (a decrement): hence the token.
DELIVERED = FENCE_LUA + _PRELUDE + "local ONCE = 22" + _ONCE + """
local id, due = ARGV[3], KEYS[21]
if redis.call('HEXISTS', KEYS[OB_N], id) == 0 then return 1 end
if ARGV[4] == 'track' then
  if redis.call('HINCRBY', KEYS[OB_N], id, -1) <= 0 then
    outbox_delete(id, ARGV[6], due)
  else
    redis.call('HSET', KEYS[OB_A], id, 0)
  end
elseif redis.call('HGET', KEYS[OB_V], id) == ARGV[5] then
  outbox_delete(id, ARGV[6], due)
else
  redis.call('HSET', KEYS[OB_A], id, 0)
end
return 1
"""

# KEYS: fixed, due set; ARGV: owner, epoch, id, attempts, next_at, error. From the attempt
# this item was sent as: copies failing together count once.
RETRY = FENCE_LUA + _PRELUDE + """
local id = ARGV[3]
if redis.call('HEXISTS', KEYS[OB_N], id) == 0 then return 1 end
local attempts = tonumber(redis.call('HGET', KEYS[OB_A], id) or '0')
if tonumber(ARGV[4]) > attempts then redis.call('HSET', KEYS[OB_A], id, ARGV[4]) end
redis.call('ZADD', KEYS[21], 'GT', ARGV[5], id)
redis.call('HSET', KEYS[OB_ERR], id, ARGV[6])
return 1
"""

# KEYS: fixed, due set; ARGV: owner, epoch, id, (source, key), "track" or not, the letter's
# meta, now, partition. The item becomes a dead letter with its body and occurrences.
REJECT = FENCE_LUA + _PRELUDE + """
local id = ARGV[3]
if redis.call('HEXISTS', KEYS[OB_N], id) == 0 then return 1 end
local rep = 1
if ARGV[5] == 'track' then rep = tonumber(redis.call('HGET', KEYS[OB_N], id)) end
local body = redis.call('HGET', KEYS[OB_BODY], id)
outbox_delete(id, ARGV[4], KEYS[21])
dead_add(tonumber(ARGV[8]), ARGV[6], body, rep, ARGV[7], '')
return 1
"""

# KEYS: fixed, due set (of the letter's source); ARGV: letter id, (source, replay key), the
# item's meta or '' (the letter's messages went back to the inbox: no call), now,
# partition, the letter's group field or '', the call's path. Not fenced: replay is an operator's action,
# from any gateway; it adds a call under a key no turn writes, and marks the letter.
REQUEUE = _PRELUDE + """
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[DL_META], id) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[DL_REPLAYED], id) == 1 then return 0 end
if ARGV[3] ~= '' then
  local path = ARGV[7]
  outbox_insert(tonumber(ARGV[5]), KEYS[21], ARGV[2], ARGV[3], path,
                redis.call('HGET', KEYS[DL_BODY], id), redis.call('HGET', KEYS[DL_N], id), ARGV[4])
end
redis.call('HSET', KEYS[DL_REPLAYED], id, ARGV[4])
if ARGV[6] ~= '' and redis.call('HGET', KEYS[DL_GROUPS], ARGV[6]) == id then
  redis.call('HDEL', KEYS[DL_GROUPS], ARGV[6])
end
return 1
"""

# KEYS: fixed, then the ledger's count hashes. {inbox messages, outbox calls, dead letters
# not replayed, ledger rows, ledger events}.
COUNTS = _PRELUDE + """
local inbox = math.max(0, tonumber(redis.call('GET', KEYS[K_WAITING]) or '0'))
local outbox = 0
for _, n in ipairs(redis.call('HVALS', KEYS[OB_N])) do outbox = outbox + tonumber(n) end
local dead = redis.call('HLEN', KEYS[DL_META]) - redis.call('HLEN', KEYS[DL_REPLAYED])
local rows, events = 0, 0
for k = 21, #KEYS do
  for _, n in ipairs(redis.call('HVALS', KEYS[k])) do
    rows = rows + 1
    events = events + tonumber(n)
  end
end
return {inbox, outbox, dead, rows, events}
"""
