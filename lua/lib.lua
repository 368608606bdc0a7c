-- lib.lua: helpers shared by every quotagate script; the loader puts this file in front
-- of each script, so one EVALSHA carries both.
--
-- Units: every time and duration is integer milliseconds; runtime amounts are
-- milliseconds; calls amounts are call units. Integers go to redis.call as Lua numbers,
-- which Redis writes as plain digits (below 1e15, as all of ours are), more cheaply
-- than Lua's own tostring.
--
-- Key layout, shared by all scripts (all keys carry one hash tag {<tenant>|<api>}):
--   KEYS[1]      cooldown: string, the end of the fleet-wide pause (ms since epoch)
--   KEYS[2]      leases: hash, lease token (its random part and key) ->
--                "grant_ms:cost:estimate_ms:expiry_ms"
--   KEYS[3]      in flight (api): zset, lease token scored by expiry
--   KEYS[4]      in flight (key): zset, the same for the lease's key
--   KEYS[5]      epoch stamp: string, the store epoch this (tenant, api) was last
--                granted under (see epoch.lua), living as long as the longest window
--   KEYS[5 + i]  limit i: for calls/runtime a hash, bucket index -> units charged in it,
--                plus the fields `lo` and `sum` (see below); for concurrent the in-flight
--                zset of its scope (KEYS[3] or KEYS[4])
-- The limits close ARGV, five values each: kind ("calls" | "runtime" | "concurrent"),
-- amount, window_ms, granularity_ms, margin_ms; there are as many as KEYS after KEYS[5].
-- (Separate values, not one string: Lua parses a string dearer than the client packs
-- arguments.)

local function clock(arg)
  if arg ~= nil and arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The limits from ARGV[first] on.
local function read_limits(first)
  local limits = {}
  for i = 1, #KEYS - 5 do
    local at = first + 5 * (i - 1)
    limits[i] = {
      kind = ARGV[at], amount = tonumber(ARGV[at + 1]), window = tonumber(ARGV[at + 2]),
      gran = tonumber(ARGV[at + 3]), margin = tonumber(ARGV[at + 4]), key = KEYS[5 + i],
    }
  end
  return limits
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

-- The lease hash and the api's in-flight zset (which hold the same leases, so they are
-- created and emptied together) must outlive every lease in them: when less than `ms` is
-- left, give them twice that, so most grants only read the hash's TTL.
local function keep_leases(ms)
  if redis.call('PTTL', KEYS[2]) < ms then
    redis.call('PEXPIRE', KEYS[2], 2 * ms)
    redis.call('PEXPIRE', KEYS[3], 2 * ms)
  end
end

local function parse_lease(record)
  local grant, cost, estimate, expiry = string.match(record, '^(%d+):(%d+):(%d+):(%d+)$')
  return {grant = tonumber(grant), cost = tonumber(cost), estimate = tonumber(estimate),
          expiry = tonumber(expiry)}
end

local function forget_lease(token)
  redis.call('HDEL', KEYS[2], token)
  redis.call('ZREM', KEYS[3], token)
  redis.call('ZREM', KEYS[4], token)
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
