-- release.lua: end a lease with the outcome of its call.
--
-- ok | failed: the charge stays. throttled: the charge stays and the fleet-wide cooldown
-- moves to now + retry_ms (never earlier than it already is). not_called: the calls and
-- the runtime reservation are refunded from the buckets they went into, if still there.
-- A reported runtime replaces the estimate: the estimate is refunded and the runtime is
-- charged in the release-time bucket (the conservative side).
-- Unknown, expired or released leases change nothing (an expired record is dropped).
-- KEYS: state, inflight_api, inflight_key; then one per limit (lib.lua).
-- ARGV: now_ms, token, outcome, retry_ms, runtime_ms; then the policy block.
--   now_ms      "" = Redis TIME
--   token       the lease's random part and key
--   outcome     ok | failed | throttled | not_called
--   retry_ms    the upstream's retry time, "" = none
--   runtime_ms  the reported run time, "" = keep the estimate
-- Reply: {GRANTED, now_ms} released, or {DENIED, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local outcome = ARGV[ARG.outcome]
local retry = tonumber(ARGV[ARG.retry_ms])
local runtime = tonumber(ARGV[ARG.runtime_ms])
local ttl, track_api, track_key, _, limits = read_policy()

local state = redis.call('HMGET', KEYS[1], token, 'cd')
if not state[1] then
  return {REPLY.DENIED, now, 'unknown'}
end
local lease = parse_lease(state[1])
forget_lease(token, track_api, track_key)
if lease.expiry <= now then
  return {REPLY.DENIED, now, 'expired'}
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
return {REPLY.GRANTED, now}
