-- acquire.lua: grant one lease if the cooldown is over and every limit has room.
--
-- A windowed limit counts its charged buckets and every lease in flight (lib.lua,
-- "counter hash"); a grant puts the lease's cost (calls) and estimate (runtime) in flight.
-- Checks everything first and writes only when all pass: a denial changes no count,
-- lease or cooldown (it may drop state that has already expired).
-- Epoch: when the caller names the store epoch it knows and this (tenant, api) carries
-- another stamp (or none, or a lapsed one), the script changes nothing and asks the
-- caller to check the epoch first (reply CHECK_EPOCH): the store may have lost its
-- state. With `verified`, the caller has just checked, and a grant stamps the epoch for
-- stamp_ttl_ms (once it lapses, the next acquire makes the caller check again: one more
-- round trip per stamp_ttl_ms).
-- Recovery: after a loss, a windowed limit whose window still overlaps the loss grants at
-- most share_permille / 1000 of its amount.
-- A grant on an api without concurrent limits costs TIME, one HMGET of the state hash,
-- one HMGET and one HSET per windowed limit (and a PTTL once per bucket of expiries), and
-- one HSET of the state hash.
-- KEYS: state, inflight_api, inflight_key; then one per limit (lib.lua).
-- ARGV: now_ms, token, cost, estimate_ms, epoch, verified, recovery; then the policy block.
--   now_ms       "" = Redis TIME
--   token        the lease's random part and key
--   cost         call units
--   estimate_ms  run time reserved
--   epoch        the store epoch the caller knows, "" = no check
--   verified     "1" or ""
--   recovery     "since_ms:share_permille" or ""
-- Reply: {GRANTED, now_ms, expiry_ms}; {DENIED, now_ms, retry_ms, bound, soonest_ms,
--        amount}, where retry_ms is the wait if nothing else happens (leases in flight
--        expire unreleased), bound the 1-based limit that bound it (0 for the cooldown),
--        soonest_ms the wait if every lease in flight were released now (both -1 when no
--        wait can ever grant it), and amount the bound limit's amount in force (a learned
--        one may be lower than the policy's); {CHECK_EPOCH, now_ms}.
-- Learned limits (design rule 8) lower a calls limit's amount while they hold.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local cost = tonumber(ARGV[ARG.cost])
local estimate = tonumber(ARGV[ARG.estimate_ms])
local epoch = ARGV[ARG.epoch]
local verified = ARGV[ARG.verified] == '1'
local since, share
if ARGV[ARG.recovery] ~= '' then
  since, share = string.match(ARGV[ARG.recovery], '^(%d+):(%d+)$')
  since, share = tonumber(since), tonumber(share)
end
local ttl, track_api, track_key, stamp_ttl, limits = read_policy()

local state = redis.call('HMGET', KEYS[1], 'cd', 'ep', 'et', 'px', 'tx',
  unpack(learned_fields(limits)))
if epoch ~= '' and not verified and
    (state[2] ~= epoch or (tonumber(state[3]) or 0) <= now) then
  return {REPLY.CHECK_EPOCH, now}
end

apply_learned(limits, {unpack(state, 6)}, now)
local purge_at = tonumber(state[4])
if purge_at and purge_at <= now then
  purge_at = purge_leases(now, ttl, track_api)
  if purge_at then
    redis.call('HSET', KEYS[1], 'px', purge_at)
  else
    redis.call('HDEL', KEYS[1], 'px')
  end
end
if track_key then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end

local expiry = now + ttl
local retry, bound, soonest = 0, 0, 0
local cooldown = tonumber(state[1]) or 0
if cooldown > now then
  retry, soonest = cooldown - now, cooldown - now
end

for i, lim in ipairs(limits) do
  local wait, soon = 0, 0
  if lim.kind == 'concurrent' then
    wait = wait_for_slot(lim, now)  -- soon stays 0: a release frees a slot at once
  else
    local need = cost
    if lim.kind == 'runtime' then
      need = estimate
    end
    lim.need = need
    lim.field = expiry_field(lim, expiry)
    local c, values = open_counter(lim, now, {lim.field})
    lim.c, lim.here = c, values[1]
    -- After a loss the lost history may still fill this window upstream: grant only a
    -- share, until the window no longer overlaps the loss.
    local recovered = since and since + lim.window + lim.margin
    local room = lim.amount
    if recovered and now < recovered then
      room = math.floor(lim.amount * share / 1000)
    end
    if c.sum + c.fl + need > room then
      local live, used = live_buckets(lim, now)
      wait = window_wait(lim, live, used, need, now, recovered, share)
      soon = wait
      if c.fl > 0 and wait > 0 then
        soon = window_wait(lim, released_now(lim, live, now), used, need, now, recovered, share)
      end
    end
  end
  if wait < 0 then
    return {REPLY.DENIED, now, -1, i, -1, lim.amount}
  end
  if wait > retry then
    retry, bound = wait, i
  end
  if soon > soonest then
    soonest = soon
  end
end

if retry > 0 then
  local amount = 0
  if bound > 0 then
    amount = limits[bound].amount
  end
  return {REPLY.DENIED, now, retry, bound, soonest, amount}
end

-- The lease's units go in flight in every windowed limit, filed under its expiry.
for _, lim in ipairs(limits) do
  if lim.need and lim.need > 0 then
    local c = lim.c
    local index = math.floor(expiry / lim.gran)
    c.fl = c.fl + lim.need
    if not c.xl or index < c.xl then
      c.xl = index
    end
    save_counter(lim, c, {lim.field, lim.here + lim.need})
    if lim.here == 0 then
      -- Until this expiry is settled and its bucket has left the window; a renewed lease
      -- may have made the counter live longer already.
      extend_ttl(lim.key, bucket_end(lim, index) - now)
    end
  end
end

local fields = {token, string.format('%d:%d:%d:%d', now, cost, estimate, expiry)}
local deadline = expiry
if verified then
  fields[3], fields[4], fields[5], fields[6] = 'ep', epoch, 'et', now + stamp_ttl
  deadline = math.max(deadline, now + stamp_ttl)
end
if not purge_at then
  fields[#fields + 1] = 'px'
  fields[#fields + 1] = expiry
end
local tx, expire_ms = plan_state_ttl(now, tonumber(state[5]) or 0, deadline, ttl)
if tx then
  fields[#fields + 1] = 'tx'
  fields[#fields + 1] = tx
end
redis.call('HSET', KEYS[1], unpack(fields))
if expire_ms then
  redis.call('PEXPIRE', KEYS[1], expire_ms)
end
if track_api then
  redis.call('ZADD', KEYS[2], expiry, token)
  extend_ttl(KEYS[2], ttl)
end
if track_key then
  redis.call('ZADD', KEYS[3], expiry, token)
  extend_ttl(KEYS[3], ttl)
end
return {REPLY.GRANTED, now, expiry}
