-- lib.lua: helpers shared by every quotagate script; the loader puts the helpers a script
-- calls in front of it, so one EVALSHA carries both.
--
-- Units: every time and duration is integer milliseconds; runtime amounts are
-- milliseconds; calls amounts are call units. Integers go to redis.call as Lua numbers,
-- which Redis writes as plain digits (below 1e15, as all of ours are), more cheaply
-- than Lua's own tostring.
--
-- Key layout, shared by all scripts (all keys carry one hash tag {<tenant>|<api>}):
--   KEYS[1]      state: hash of the (tenant, api). Its leases, lease token (its random
--                part and key) -> "grant_ms:cost:estimate_ms:expiry_ms", and five fields
--                that hold no ':' in their names:
--                  cd  the end of the fleet-wide pause (cooldown)
--                  ep  the store epoch the (tenant, api) was last granted under (see
--                      epoch.lua), and et, until when that stamp holds
--                  px  when to next drop the records of expired leases (absent: none left)
--                  tx  a time the hash is sure to live until (its TTL ends no earlier):
--                      a grant that needs no longer only reads it
--                One hash, so that a grant reads all of it in one HMGET and writes it in
--                one HSET.
--   KEYS[2]      in flight (api): zset, lease token scored by expiry; kept only when a
--                concurrent limit of api scope needs it (track_api)
--   KEYS[3]      in flight (key): the same for the lease's key (track_key)
--   KEYS[3 + i]  limit i: for calls/runtime a hash, bucket index -> units charged in it,
--                plus the fields `lo` and `sum` (see below); for concurrent the in-flight
--                zset of its scope (KEYS[2] or KEYS[3])
-- Every script's ARGV closes with what the policy fixes (read_policy): ttl_ms (a new
-- lease's time to live), track_api and track_key ("1" or "0"), stamp_ttl_ms (how long an
-- epoch stamp holds), then the limits, five values each: kind ("calls" | "runtime" |
-- "concurrent"), amount, window_ms, granularity_ms, margin_ms; there are as many as KEYS
-- after KEYS[3]. (Separate values, not one string: Lua parses a string dearer than the
-- client packs arguments.)

local function clock(arg)
  if arg ~= nil and arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- What the policy fixes, from ARGV[first] on: ttl_ms, track_api, track_key, stamp_ttl_ms
-- and the limits (tables: kind, amount, window, gran, margin, key).
local function read_policy(first)
  local limits = {}
  for i = 1, #KEYS - 3 do
    local at = first + 4 + 5 * (i - 1)
    limits[i] = {
      kind = ARGV[at], amount = tonumber(ARGV[at + 1]), window = tonumber(ARGV[at + 2]),
      gran = tonumber(ARGV[at + 3]), margin = tonumber(ARGV[at + 4]), key = KEYS[3 + i],
      need = false, sum = 0, here = 0,  -- what acquire fills in (sized in, not grown)
    }
  end
  return tonumber(ARGV[first]), ARGV[first + 1] == '1', ARGV[first + 2] == '1',
    tonumber(ARGV[first + 3]), limits
end

-- A counter hash holds its buckets (bucket index -> units) and two bookkeeping fields:
-- `lo`, the oldest bucket that may still hold units, and `sum`, the units of all its
-- buckets. A grant reads those two and drops only the buckets that left the window since
-- the last call; a denial (for its exact wait) and usage read every bucket.

-- Buckets that still count at `now`: every bucket overlapping (now - window - margin, now].
-- Returns them as {index, units} (unsorted) and their sum.
local function live_buckets(lim, now)
  local flat = redis.call('HGETALL', lim.key)
  local horizon = now - lim.window - lim.margin
  local live, used = {}, 0
  for i = 1, #flat, 2 do
    local index = tonumber(flat[i])
    if index and (index + 1) * lim.gran > horizon then
      live[#live + 1] = {index, tonumber(flat[i + 1])}
      used = used + tonumber(flat[i + 1])
    end
  end
  return live, used
end

-- Drop the buckets that no longer count at `now` (expired state: even a denial may).
-- Returns the units still counted, and the units in the bucket of `now` (a grant adds to
-- it knowing both, see charge).
local function prune(lim, now)
  local meta = redis.call('HMGET', lim.key, 'lo', 'sum', math.floor(now / lim.gran))
  local lo, sum = tonumber(meta[1]), tonumber(meta[2])
  if not lo or not sum then
    return 0, 0
  end
  local horizon = now - lim.window - lim.margin
  local moved = false
  while sum > 0 and (lo + 1) * lim.gran <= horizon do
    local units = tonumber(redis.call('HGET', lim.key, lo))
    if units then
      sum = sum - units
      redis.call('HDEL', lim.key, lo)
    end
    lo = lo + 1
    moved = true
  end
  if sum <= 0 then
    redis.call('DEL', lim.key)
    return 0, 0
  end
  if moved then
    redis.call('HSET', lim.key, 'lo', lo, 'sum', sum)
  end
  return sum, tonumber(meta[3]) or 0
end

-- When a bucket stops counting: once (index + 1) * gran <= now - window - margin.
local function bucket_end(lim, index)
  return (index + 1) * lim.gran + lim.window + lim.margin
end

-- Milliseconds until `need` more units fit under the limit, if nothing else is granted.
local function wait_for_units(lim, live, used, need, now)
  local over = used + need - lim.amount
  if over <= 0 then
    return 0
  end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  for _, bucket in ipairs(live) do
    over = over - bucket[2]
    if over <= 0 then
      return bucket_end(lim, bucket[1]) - now
    end
  end
  return -1
end

-- Milliseconds until one more lease fits under a concurrent limit.
local function wait_for_slot(lim, now)
  local after = string.format('(%d', now)  -- scores above now: live leases
  local live = redis.call('ZCOUNT', lim.key, after, '+inf')
  if live < lim.amount then
    return 0, live
  end
  local kth = redis.call('ZRANGEBYSCORE', lim.key, after, '+inf', 'WITHSCORES',
    'LIMIT', live - lim.amount, 1)
  return tonumber(kth[2]) - now, live
end

local function extend_ttl(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

-- The state hash must live until `deadline` at least. When its `tx` field does not
-- promise that already, returns the new `tx` and, when the TTL must grow, the ms to
-- PEXPIRE the hash with once written (it never shortens the TTL); else nil.
local function plan_state_ttl(now, tx, deadline, slack)
  if tx >= deadline then
    return nil, nil
  end
  local want = deadline + slack - now
  local left = redis.call('PTTL', KEYS[1])  -- -2: no hash yet, -1: no TTL
  if left >= want then
    return now + left, nil
  end
  return now + want, want
end

local function parse_lease(record)
  local grant, cost, estimate, expiry = string.match(record, '^(%d+):(%d+):(%d+):(%d+)$')
  return {grant = tonumber(grant), cost = tonumber(cost), estimate = tonumber(estimate),
          expiry = tonumber(expiry)}
end

local function forget_lease(token, track_api, track_key)
  redis.call('HDEL', KEYS[1], token)
  if track_api then
    redis.call('ZREM', KEYS[2], token)
  end
  if track_key then
    redis.call('ZREM', KEYS[3], token)
  end
end

-- HDEL in slices (Lua's unpack takes a few thousand values at most).
local function hdel_all(key, fields)
  for at = 1, #fields, 1000 do
    redis.call('HDEL', key, unpack(fields, at, math.min(at + 999, #fields)))
  end
end

-- The state hash's lease records as {token, lease} (expired ones too), and how many of
-- them are live at `now`.
local function lease_records(now)
  local flat = redis.call('HGETALL', KEYS[1])
  local found, live = {}, 0
  for i = 1, #flat, 2 do
    if string.find(flat[i], ':', 1, true) then
      local lease = parse_lease(flat[i + 1])
      found[#found + 1] = {flat[i], lease}
      if lease.expiry > now then
        live = live + 1
      end
    end
  end
  return found, live
end

-- Drop the records of leases past their expiry (their slots free; their charges stay).
-- Returns when to purge next: now + ttl while leases are left (records outlive their
-- expiry by at most that), nil when none is.
local function purge_leases(now, ttl, track_api)
  local gone, left = {}, 0
  if track_api then
    gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
    if #gone > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    end
    left = redis.call('ZCARD', KEYS[2])
  else
    local found = lease_records(now)
    for _, entry in ipairs(found) do
      if entry[2].expiry <= now then
        gone[#gone + 1] = entry[1]
      else
        left = left + 1
      end
    end
  end
  hdel_all(KEYS[1], gone)
  if left > 0 then
    return now + ttl
  end
  return nil
end

-- Take back `units` from the bucket they were charged to, if it is still there.
local function uncharge(lim, at_ms, units)
  if units <= 0 then
    return
  end
  local field = math.floor(at_ms / lim.gran)
  local have = tonumber(redis.call('HGET', lim.key, field))
  if not have then
    return
  end
  local take = math.min(have, units)
  if have <= take then
    redis.call('HDEL', lim.key, field)
  else
    redis.call('HINCRBY', lim.key, field, -take)
  end
  if redis.call('HINCRBY', lim.key, 'sum', -take) <= 0 then
    redis.call('DEL', lim.key)
  end
end

-- Add `units` to the bucket of `now`, given what prune(lim, now) just returned: the
-- counter's sum and that bucket's units. One write, whatever the counter held.
local function charge(lim, now, units, sum, here)
  if units <= 0 then
    return
  end
  local field = math.floor(now / lim.gran)
  if sum == 0 then
    redis.call('HSET', lim.key, field, units, 'sum', units, 'lo', field)
  else
    redis.call('HSET', lim.key, field, here + units, 'sum', sum + units)
  end
  if here == 0 then
    -- A new bucket is the newest, so its life is the counter's life; a bucket charged
    -- again needs no more, as it set that life when it began.
    redis.call('PEXPIRE', lim.key, lim.gran + lim.window + lim.margin)
  end
end
