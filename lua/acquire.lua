-- acquire.lua: grant one lease if the cooldown is over and every limit has room.
--
-- Checks everything first and writes only when all pass: a denial changes no count, lease
-- or cooldown (it may prune state that has already expired).
-- Epoch: when the caller names the store epoch it knows and this (tenant, api) carries
-- another stamp (or none), the script changes nothing and asks the caller to check the
-- epoch first (reply {2, now_ms}): the store may have lost its state. With `verified`, the
-- caller has just checked, and a grant stamps the epoch for stamp_ttl_ms (once it lapses,
-- the next acquire makes the caller check again: one more round trip per stamp_ttl_ms).
-- Recovery: after a loss, a windowed limit whose window still overlaps the loss grants at
-- most share_permille / 1000 of its amount.
-- KEYS: the layout in lib.lua.
-- ARGV: now_ms ("" = Redis TIME), token, cost (call units), estimate_ms (runtime
--       reserved), epoch ("" = no check), verified ("1" or ""), recovery
--       ("since_ms:share_permille" or ""), then what the policy fixes: ttl_ms, track_key
--       (1 = register in KEYS[4] too), stamp_ttl_ms, and the limits (see lib.lua).
-- Reply: {1, now_ms, expiry_ms} granted; {0, now_ms, retry_ms, bound} denied, where
--        bound is the 1-based limit that bound the wait, 0 for the cooldown, and
--        retry_ms -1 when no wait can ever grant it; {2, now_ms} check the epoch.

local now = clock(ARGV[1])
local token = ARGV[2]
local cost = tonumber(ARGV[3])
local estimate = tonumber(ARGV[4])
local epoch = ARGV[5]
local verified = ARGV[6] == '1'
local since, share = string.match(ARGV[7], '^(%d+):(%d+)$')
since, share = tonumber(since), tonumber(share)
local ttl = tonumber(ARGV[8])
local track_key = ARGV[9] == '1'
local stamp_ttl = tonumber(ARGV[10])
local limits = read_limits(11)

if epoch ~= '' and not verified and redis.call('GET', KEYS[5]) ~= epoch then
  return {2, now}
end

-- Leases past their expiry free their slot; their charges stay.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, token_gone in ipairs(expired) do
  redis.call('HDEL', KEYS[2], token_gone)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
if track_key then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
end

local retry, bound = 0, 0
local cooldown = tonumber(redis.call('GET', KEYS[1]) or '0')
if cooldown > now then
  retry = cooldown - now
end

local counted, sums, heres = {}, {}, {}
for i, lim in ipairs(limits) do
  local wait
  if lim.kind == 'concurrent' then
    wait = wait_for_slot(lim, now)
  else
    local need = cost
    if lim.kind == 'runtime' then
      need = estimate
    end
    counted[i] = need
    local recovered = since and since + lim.window + lim.margin
    local recovering = recovered and now < recovered
    local room = lim.amount
    if recovering then
      room = math.floor(lim.amount * share / 1000)
    end
    local live, used
    sums[i], heres[i] = prune(lim, now)
    if sums[i] + need <= room then
      wait = 0
    elseif recovering then
      -- The lost history may still fill this window upstream: grant only a share,
      -- until the window no longer overlaps the loss.
      live, used = live_buckets(lim, now)
      local full = lim.amount
      lim.amount = math.floor(full * share / 1000)
      local reduced = wait_for_units(lim, live, used, need, now)
      lim.amount = full
      wait = math.max(recovered - now, wait_for_units(lim, live, used, need, now))
      if reduced >= 0 and reduced < wait then
        wait = reduced
      end
    else
      live, used = live_buckets(lim, now)
      wait = wait_for_units(lim, live, used, need, now)
    end
  end
  if wait < 0 then
    return {0, now, -1, i}
  end
  if wait > retry then
    retry, bound = wait, i
  end
end

if retry > 0 then
  return {0, now, retry, bound}
end

for i, lim in ipairs(limits) do
  if counted[i] then
    charge(lim, now, counted[i], sums[i], heres[i])
  end
end

if verified then
  redis.call('SET', KEYS[5], epoch, 'PX', stamp_ttl)
end
local expiry = now + ttl
redis.call('HSET', KEYS[2], token, string.format('%d:%d:%d:%d', now, cost, estimate, expiry))
redis.call('ZADD', KEYS[3], expiry, token)
keep_leases(ttl)
if track_key then
  redis.call('ZADD', KEYS[4], expiry, token)
  extend_ttl(KEYS[4], ttl)
end
return {1, now, expiry}
