-- renew.lua: extend a live lease so that it expires no earlier than now + ttl_ms; its units
-- in flight move with its expiry (lib.lua, "counter hash").
--
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- ARGV: now_ms, token, renew_ttl_ms; then the policy block.
--   now_ms        "" = Redis TIME
--   token         the lease's random part and key
--   renew_ttl_ms  the lease expires no earlier than now + this
-- Reply: {GRANTED, now_ms, expiry_ms} renewed, or {DENIED, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local renew_ttl = tonumber(ARGV[ARG.renew_ttl_ms])
local ttl, track_api, track_key, _, limits = read_policy()

local state = redis.call('HMGET', KEYS[1], token, 'tx')
if not state[1] then
  return {REPLY.DENIED, now, 'unknown'}
end
local lease = parse_lease(state[1])
if lease.expiry <= now then
  forget_lease(token, track_api, track_key)
  return {REPLY.DENIED, now, 'expired'}
end

local expiry = math.max(lease.expiry, now + renew_ttl)
local tx, expire_ms = plan_state_ttl(now, tonumber(state[2]) or 0, expiry, ttl)
local record = string.format('%d:%d:%d:%d', lease.grant, lease.cost, lease.estimate, expiry)
if tx then
  redis.call('HSET', KEYS[1], token, record, 'tx', tx)
else
  redis.call('HSET', KEYS[1], token, record)
end
if expire_ms then
  redis.call('PEXPIRE', KEYS[1], expire_ms)
end
-- The lease's units in flight are filed under its new expiry.
for _, lim in ipairs(limits) do
  local units = lease.cost
  if lim.kind == 'runtime' then
    units = lease.estimate
  end
  local from, to = expiry_field(lim, lease.expiry), expiry_field(lim, expiry)
  if lim.kind ~= 'concurrent' and units > 0 and from ~= to then
    local c, values = open_counter(lim, now, {from, to})
    local take = math.min(values[1], units)  -- less only if the counter was lost
    if take > 0 then
      local extra = {to, values[2] + take}
      if values[1] > take then
        extra[3], extra[4] = from, values[1] - take
      else
        redis.call('HDEL', lim.key, from)
      end
      save_counter(lim, c, extra)
      extend_ttl(lim.key, bucket_end(lim, math.floor(expiry / lim.gran)) - now)
    end
  end
end
if track_api then
  redis.call('ZADD', KEYS[2], 'XX', expiry, token)
  extend_ttl(KEYS[2], expiry - now)
end
if track_key then
  redis.call('ZADD', KEYS[3], 'XX', expiry, token)
  extend_ttl(KEYS[3], expiry - now)
end
return {REPLY.GRANTED, now, expiry}
