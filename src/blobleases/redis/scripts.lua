-- blobleases RedisStorage: the Lua scripts. Sections start with "--@ NAME";
-- the prelude (before the first section) is prepended to every script.
-- Per-content scripts take KEYS = {meta, leases, readers} of one content,
-- all with the hash tag {<content id>}, and build chunk keys from ARGV[1]
-- (the content's key base) so they stay in that one slot. Global scripts
-- take keys that all share the namespace's hash tag.
--
-- Key, meta field and value names are those of blobleases/redis/keys.py
-- (store layout 2). A lease value is
-- "<expires_at or empty>|<1 if detached else 0>|<owner>|<taken at>" (values
-- written before the 4th field have 3; owners never contain '|').
--
-- Where a script decides a rule of SPEC section 3 it mirrors the Python
-- function of blobleases/policy_rules.py named in its comment (Memory and
-- Directory call those functions); the conformance suite checks both.
--
-- Scripts that free memory or keep it level (ending leases and holds,
-- deleting, bookkeeping) or record reads (a reader hold is a few bytes) are
-- flagged allow-oom: a server at maxmemory with noeviction refuses every
-- script not so flagged, and freeing and reading must work there. Scripts
-- that add leases or blobs are not flagged.

local function lease_parts(v)
  local e, d, o = string.match(v, '^([^|]*)|([^|]*)|([^|]*)')
  return e, d, o
end

-- Mirror of policy_rules.expires_at: a ttl lease ends once now reaches
-- its expires_at.
local function is_expired(v, now)
  local e = lease_parts(v)
  return e ~= nil and e ~= '' and tonumber(e) <= now
end

-- Count unexpired leases, deleting expired ones.
local function live_leases(lkey, now)
  local all = redis.call('HGETALL', lkey)
  local n = 0
  for i = 1, #all, 2 do
    if is_expired(all[i + 1], now) then
      redis.call('HDEL', lkey, all[i])
    else
      n = n + 1
    end
  end
  return n
end

-- 1 (and the meta marked unreferenced) when no lease and no reader holds it.
local function mark_if_unreferenced(m, l, r, now)
  if live_leases(l, now) == 0 and redis.call('HLEN', r) == 0 then
    redis.call('HSET', m, 'unreferenced_since', tostring(now))
    return 1
  end
  return 0
end

-- The deadline of the eviction claim on a content (set by the claim script
-- for the store evicting it), or nil when there is none. A claim past its
-- deadline (its store stalled or died) is removed: the content stays.
local function eviction_claim(m, now)
  local c = redis.call('HGET', m, 'evicting')
  if not c or c == '' then
    return nil
  end
  local deadline = tonumber(string.match(c, ' (%S+)$'))
  if deadline and deadline > now then
    return deadline
  end
  redis.call('HDEL', m, 'evicting')
  return nil
end

local function delete_content(m, l, r, base)
  local meta = redis.call('HMGET', m, 'size', 'chunks')
  local n = tonumber(meta[2]) or 0
  for i = 0, n - 1 do
    redis.call('UNLINK', base .. 'chunk:' .. i)
  end
  redis.call('UNLINK', m, l, r)
  return tonumber(meta[1]) or 0
end

-- Hold a lease on present content. Returns {status, size, was_unreferenced,
-- token}: status 0 absent, 1 already held, 2 newly held, -2 being evicted
-- (claimed by a store: the caller waits until the claim is resolved and
-- asks again; {-2, deadline, 0}).
local function hold(m, l, lid, val, now)
  local s = redis.call('HGET', m, 'size')
  if not s then
    return {0, 0, 0}
  end
  local claim = eviction_claim(m, now)
  if claim then
    return {-2, tostring(claim), 0}
  end
  local t = redis.call('HGET', m, 'upload')
  local cur = redis.call('HGET', l, lid)
  if cur and not is_expired(cur, now) then
    return {1, tonumber(s), 0, t}
  end
  redis.call('HSET', l, lid, val)
  local u = redis.call('HGET', m, 'unreferenced_since')
  redis.call('HSET', m, 'last_access', tostring(now), 'unreferenced_since', '')
  local was = 0
  if u and u ~= '' then
    was = 1
  end
  return {2, tonumber(s), was, t}
end

-- After a lease or hold ended: {1, 0, 0} while referenced; else delete the
-- content at once when it is larger than the retention limit, or that limit
-- is 0 (returning {1, 2, size, token}), or mark it unreferenced for the
-- caller to retain ({1, 1, size}). The limit test mirrors
-- policy_rules.retains.
local function after_end(m, l, r, base, now, retain_limit)
  local s = redis.call('HGET', m, 'size')
  if not s then
    return {1, 0, 0}
  end
  if mark_if_unreferenced(m, l, r, now) == 0 then
    return {1, 0, 0}
  end
  if retain_limit <= 0 or tonumber(s) > retain_limit then
    local t = redis.call('HGET', m, 'upload')
    delete_content(m, l, r, base)
    return {1, 2, tonumber(s), t}
  end
  return {1, 1, tonumber(s)}
end

-- Remove a content's index entry (only if it still names ``token``, unless
-- that is empty); keys: index, total bytes, reserved bytes, lru, retained, retained
-- sizes, retained bytes. Returns 1 if removed.
local function index_remove(k, cid, token)
  local v = redis.call('HGET', k[1], cid)
  if not v then
    return 0
  end
  local sz, t, kind = string.match(v, '^(%d+) (%S+) ?(%S*)')
  if token ~= '' and t ~= token then
    return 0
  end
  redis.call('HDEL', k[1], cid)
  redis.call('DECRBY', k[2], tonumber(sz))
  if kind == 'reserved' then
    redis.call('DECRBY', k[3], tonumber(sz))
  end
  redis.call('ZREM', k[4], cid)
  if redis.call('ZREM', k[5], cid) == 1 then
    redis.call('DECRBY', k[7], tonumber(redis.call('HGET', k[6], cid) or 0))
  end
  redis.call('HDEL', k[6], cid)
  return 1
end

--@ hold
-- KEYS meta, leases; ARGV lease id, lease value, now
return hold(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))

--@ take_over
-- KEYS meta, leases, readers; ARGV old lease id, new lease id, new lease
-- value, now. Holds the new lease and ends the old one in this one script.
-- When the old lease is not held (or expired), the new one is held as hold()
-- does, except that content referenced only by expired leases counts as
-- absent. Returns {status, size, was_unreferenced} as hold() does (-2: being
-- evicted, nothing changed), and 1 if the old lease was ended.
local m, l, r = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[4])
local claim = eviction_claim(m, now)
if claim then
  return {-2, tostring(claim), 0, 0}
end
local old = redis.call('HGET', l, ARGV[1])
if old and not is_expired(old, now) then
  local res = hold(m, l, ARGV[2], ARGV[3], now)
  if res[1] == 0 then
    return {0, 0, 0, 0}
  end
  redis.call('HDEL', l, ARGV[1])
  return {res[1], res[2], res[3], 1}
end
local u = redis.call('HGET', m, 'unreferenced_since')
if redis.call('EXISTS', m) == 1 and (not u or u == '') and redis.call('HLEN', r) == 0 then
  local live = false
  local all = redis.call('HVALS', l)
  for i = 1, #all do
    if not is_expired(all[i], now) then
      live = true
      break
    end
  end
  if not live then
    return {0, 0, 0, 0}
  end
end
local res = hold(m, l, ARGV[2], ARGV[3], now)
return {res[1], res[2], res[3], 0}

--@ commit
-- KEYS meta, leases; ARGV base, token, chunk count, size, chunk size, now,
-- lease id, lease value. The staged chunks staging:<token>:<i> become the
-- blob's chunks chunk:<i>. Returns hold()'s answer when the content is already present
-- (the staged chunks are dropped; {-2, deadline, 0} while it is being
-- evicted, the staged chunks kept), {3, size, 0, token} when committed,
-- {-1, bad chunk index} when a staged chunk is missing or has the wrong
-- length (nothing committed).
local m, l = KEYS[1], KEYS[2]
local n, size, cs = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local prefix = ARGV[1] .. 'staging:' .. ARGV[2] .. ':'
if redis.call('EXISTS', m) == 1 then
  local claim = eviction_claim(m, now)
  if claim then
    return {-2, tostring(claim), 0}
  end
  for i = 0, n - 1 do
    redis.call('UNLINK', prefix .. i)
  end
  return hold(m, l, ARGV[7], ARGV[8], now)
end
for i = 0, n - 1 do
  local want = cs
  if i == n - 1 then
    want = size - (n - 1) * cs
  end
  if redis.call('STRLEN', prefix .. i) ~= want then
    for j = 0, n - 1 do
      redis.call('UNLINK', prefix .. j)
    end
    return {-1, i}
  end
end
for i = 0, n - 1 do
  local final = ARGV[1] .. 'chunk:' .. i
  redis.call('RENAME', prefix .. i, final)
  redis.call('PERSIST', final)
end
local t = tostring(now)
redis.call(
  'HSET', m, 'size', size, 'chunks', n, 'chunk_size', cs, 'upload', ARGV[2],
  'created', t, 'last_access', t, 'unreferenced_since', ''
)
redis.call('HSET', l, ARGV[7], ARGV[8])
return {3, size, 0, ARGV[2]}

--@ read allow-oom
-- KEYS meta, leases, readers; ARGV base, lease id, now, hold id, owner,
-- unused. Returns {0} when the lease is not held (or the content is gone),
-- {-1, ...} when it just expired, {-2, deadline} while it is being evicted
-- (nothing recorded), else {1, size, chunk count, chunk size,
-- token}; with a hold id the reader's hold is recorded. ARGV[7] is the retention limit
-- (see after_end).
local m, l, r = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[3])
local meta = redis.call('HMGET', m, 'size', 'chunks', 'chunk_size', 'upload')
if not meta[1] then
  return {0}
end
local claim = eviction_claim(m, now)
if claim then
  return {-2, tostring(claim)}
end
local v = redis.call('HGET', l, ARGV[2])
if not v then
  return {0}
end
if is_expired(v, now) then
  redis.call('HDEL', l, ARGV[2])
  local res = after_end(m, l, r, ARGV[1], now, tonumber(ARGV[7]))
  res[1] = -1
  return res
end
redis.call('HSET', m, 'last_access', tostring(now))
if ARGV[4] ~= '' then
  redis.call('HSET', r, ARGV[4], ARGV[5])
end
return {1, tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3]), meta[4]}

--@ end allow-oom
-- KEYS meta, leases, readers[, the 7 index keys of idx_remove]; ARGV mode,
-- id, owner, now, base, retention limit, content id. Modes (keys.End):
-- drop (a lease), reap_lease (a non-detached lease of owner), expire (a
-- lease if expired), release (a reader hold), reap_reader (owner's reader
-- hold).
-- Returns {0, 0, 0} if nothing ended, else after_end's answer; with the
-- index keys (a standalone server has no slots to respect) a deleted
-- content's index entry is removed too and the state is 3.
local m, l, r = KEYS[1], KEYS[2], KEYS[3]
local mode, id, owner, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ended = 0
if mode == 'drop' then
  ended = redis.call('HDEL', l, id)
elseif mode == 'reap_lease' or mode == 'expire' then
  local v = redis.call('HGET', l, id)
  if v then
    local _, d, o = lease_parts(v)
    if mode == 'reap_lease' and o == owner and d ~= '1' then
      ended = redis.call('HDEL', l, id)
    elseif mode == 'expire' and is_expired(v, now) then
      ended = redis.call('HDEL', l, id)
    end
  end
elseif mode == 'release' then
  ended = redis.call('HDEL', r, id)
elseif mode == 'reap_reader' then
  if redis.call('HGET', r, id) == owner then
    ended = redis.call('HDEL', r, id)
  end
end
if ended == 0 then
  return {0, 0, 0}
end
local res = after_end(m, l, r, ARGV[5], now, tonumber(ARGV[6]))
if res[2] == 2 and #KEYS >= 10 then
  index_remove({KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]}, ARGV[7], res[4])
  res[2] = 3
end
return res

--@ delete allow-oom
-- KEYS meta, leases, readers; ARGV base, mode, now, token ('' for any),
-- claim token (mode claimed). Modes: unreferenced (only if no lease and no reader
-- holds it), claimed (only if still claimed by this store's claim script:
-- no reader or lease was added since; its leases end), force. Returns
-- {deleted, size, token}.
local m, l, r = KEYS[1], KEYS[2], KEYS[3]
local mode, now = ARGV[2], tonumber(ARGV[3])
local t = redis.call('HGET', m, 'upload')
if not t then
  if mode == 'force' then
    redis.call('UNLINK', l, r)
  end
  return {0, 0, ''}
end
if ARGV[4] ~= '' and ARGV[4] ~= t then
  return {0, 0, t}
end
if mode == 'unreferenced' and (live_leases(l, now) > 0 or redis.call('HLEN', r) > 0) then
  return {0, 0, t}
end
if mode == 'claimed' then
  local c = redis.call('HGET', m, 'evicting')
  if not c or string.sub(c, 1, #ARGV[5] + 1) ~= ARGV[5] .. ' ' then
    return {0, 0, t}
  end
end
return {1, delete_content(m, l, r, ARGV[1]), t}

--@ idx_commit allow-oom
-- KEYS index, total bytes, reserved bytes, lru; ARGV content id, size, token, now.
-- Records committed content (converting a reservation), idempotently.
local v = redis.call('HGET', KEYS[1], ARGV[1])
local size = tonumber(ARGV[2])
if v then
  local sz, _, kind = string.match(v, '^(%d+) (%S+) ?(%S*)')
  sz = tonumber(sz)
  if kind == 'reserved' then
    redis.call('DECRBY', KEYS[3], sz)
  end
  if sz ~= size then
    redis.call('INCRBY', KEYS[2], size - sz)
  end
else
  redis.call('INCRBY', KEYS[2], size)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[4], 'NX', ARGV[4], ARGV[1])
return 1

--@ idx_remove allow-oom
-- KEYS index, total bytes, reserved bytes, lru, retained, retained sizes, retained
-- bytes; ARGV content id, token ('' for any). Returns 1 if removed.
return index_remove(KEYS, ARGV[1], ARGV[2])

--@ reserve
-- KEYS index, total bytes, reserved bytes; ARGV content id, size, token, max bytes,
-- deadline, owner, now, then the victims this store has claimed (claim
-- script). Returns {0} if the content is indexed already, {1} when reserved,
-- {2, total} when it does not fit even after the victims go (the caller
-- releases its claims: nothing was evicted). A claimed victim no longer
-- indexed was deleted meanwhile: its room is free already. Mirror of
-- policy_rules.plan_eviction's rule that a store that cannot fit evicts
-- nothing: every victim is claimed (so none can gain a lease or reader)
-- and the room is checked here, before anything is deleted.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return {0}
end
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
local size = tonumber(ARGV[2])
local freed = 0
for i = 8, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local sz, _, kind = string.match(v, '^(%d+) (%S+) ?(%S*)')
    if kind ~= 'reserved' then
      freed = freed + tonumber(sz)
    end
  end
end
if total + size - freed > tonumber(ARGV[4]) then
  return {2, total}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' reserved ' .. ARGV[5] .. ' ' .. ARGV[6])
redis.call('INCRBY', KEYS[2], size)
redis.call('INCRBY', KEYS[3], size)
return {1}

--@ claim
-- KEYS meta, leases, readers; ARGV mode (leased or retained content), claim token, deadline, now. Claims the content for
-- the store that planned to evict it: until the claim is released, deleted
-- or past its deadline, no lease or reader can be added (hold, commit,
-- take_over and read answer -2 and the caller waits). Returns {1, size}
-- when claimed, {0} when the content is gone, {-1} when it may not be
-- evicted now. Mirror of policy_rules.plan_eviction's rules: content with
-- an open reader is never evicted, and retained content goes only while
-- no lease holds it (a claim by another store: plan again).
local m, l, r = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[4])
local s = redis.call('HGET', m, 'size')
if not s then
  return {0}
end
if eviction_claim(m, now) or redis.call('HLEN', r) > 0 then
  return {-1}
end
if ARGV[1] == 'retained' and live_leases(l, now) > 0 then
  return {-1}
end
redis.call('HSET', m, 'evicting', ARGV[2] .. ' ' .. ARGV[3])
return {1, tonumber(s)}

--@ unclaim allow-oom
-- KEYS meta; ARGV claim token. Releases this store's claim, if it holds it.
local c = redis.call('HGET', KEYS[1], 'evicting')
if c and string.sub(c, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return redis.call('HDEL', KEYS[1], 'evicting')
end
return 0

--@ retain allow-oom
-- KEYS retained, retained sizes, retained bytes; ARGV content id, now, size,
-- budget. Adds the content to the retained LRU, then pops the oldest
-- retained entries while over budget and returns them (to delete if still
-- unreferenced): mirror of policy_rules.over_retain_budget.
if ARGV[1] ~= '' and redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]))
end
local budget = tonumber(ARGV[4])
local victims = {}
while tonumber(redis.call('GET', KEYS[3]) or '0') > budget do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then
    break
  end
  redis.call('ZREM', KEYS[1], first[1])
  redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], first[1]) or 0))
  redis.call('HDEL', KEYS[2], first[1])
  victims[#victims + 1] = first[1]
end
return victims

--@ unretain
-- KEYS retained, retained sizes, retained bytes; ARGV content id.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0))
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1

--@ hdel_if allow-oom
-- KEYS hash; ARGV field, expected value. Deletes the field only if unchanged.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0

--@ drop_stray allow-oom
-- KEYS meta; ARGV base, then key suffixes of one content ("chunk:<i>",
-- "staging:<token>:<i>", "leases" or "readers"). Deletes each unless, now, the meta names it:
-- chunks below the chunk count, and the leases and readers hashes while the
-- content exists (staged chunks are never named). Returns how many were
-- deleted.
local meta = redis.call('HMGET', KEYS[1], 'upload', 'chunks')
local deleted = 0
for i = 2, #ARGV do
  local suffix = ARGV[i]
  local keep = false
  if meta[1] then
    if suffix == 'leases' or suffix == 'readers' then
      keep = true
    else
      local index = string.match(suffix, '^chunk:(%d+)$')
      keep = index ~= nil and tonumber(index) < tonumber(meta[2])
    end
  end
  if not keep then
    deleted = deleted + redis.call('UNLINK', ARGV[1] .. suffix)
  end
end
return deleted

--@ touch allow-oom
-- KEYS lru; ARGV score, content id pairs. Records accesses of content still
-- in the LRU index (never adds an entry).
return redis.call('ZADD', KEYS[1], 'XX', 'GT', unpack(ARGV))

--@ note allow-oom
-- KEYS one key; ARGV "process", owner, start time: records a process that
-- holds readers (HSETNX); or "hold", member: records one of its reader holds
-- in its set (SADD).
if ARGV[1] == 'process' then
  return redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
end
return redis.call('SADD', KEYS[1], ARGV[2])
