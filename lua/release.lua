-- release.lua: end a lease with the outcome of its call.
--
-- ok | failed: the charge stays. throttled: the charge stays and the fleet-wide cooldown
-- moves to now + retry_ms (never earlier than it already is). not_called: the calls and
-- the runtime reservation are refunded from the buckets they went into, if still there.
-- A reported runtime replaces the estimate: the estimate is refunded and the runtime is
-- charged in the release-time bucket (the conservative side).
-- Unknown, expired or released leases change nothing (an expired record is dropped).
-- KEYS: the layout in lib.lua.
-- ARGV: now_ms ("" = Redis TIME), token, outcome, retry_ms ("" = none),
--       runtime_ms ("" = keep the estimate), then what the policy fixes (see lib.lua).
-- Reply: {1, now_ms} released, or {0, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[1])
local token = ARGV[2]
local outcome = ARGV[3]
local retry = tonumber(ARGV[4])
local runtime = tonumber(ARGV[5])
local ttl, track_api, track_key, _, limits = read_policy(6)

local state = redis.call('HMGET', KEYS[1], token, 'cd')
if not state[1] then
  return {0, now, 'unknown'}
end
local lease = parse_lease(state[1])
forget_lease(token, track_api, track_key)
if lease.expiry <= now then
  return {0, now, 'expired'}
end

for _, lim in ipairs(limits) do
  if lim.kind == 'calls' and outcome == 'not_called' then
    uncharge(lim, lease.grant, lease.cost)
  elseif lim.kind == 'runtime' and (outcome == 'not_called' or runtime) then
    uncharge(lim, lease.grant, lease.estimate)
    if runtime and outcome ~= 'not_called' then
      local sum, here = prune(lim, now)
      charge(lim, now, runtime, sum, here)
    end
  end
end

if outcome == 'throttled' and retry and retry > 0 then
  local until_ms = now + retry
  if (tonumber(state[2]) or 0) < until_ms then
    -- tx as if unknown: the HDEL above may have emptied the hash (a rare path, so one
    -- PTTL more is cheap).
    local tx, expire_ms = plan_state_ttl(now, 0, until_ms, ttl)
    redis.call('HSET', KEYS[1], 'cd', until_ms, 'tx', tx)
    if expire_ms then
      redis.call('PEXPIRE', KEYS[1], expire_ms)
    end
  end
end
return {1, now}
