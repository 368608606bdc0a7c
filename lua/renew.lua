-- renew.lua: extend a live lease so that it expires no earlier than now + ttl_ms.
--
-- KEYS: state, inflight_api, inflight_key; then one per limit (lib.lua).
-- ARGV: now_ms, token, renew_ttl_ms; then the policy block.
--   now_ms        "" = Redis TIME
--   token         the lease's random part and key
--   renew_ttl_ms  the lease expires no earlier than now + this
-- Reply: {GRANTED, now_ms, expiry_ms} renewed, or {DENIED, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local renew_ttl = tonumber(ARGV[ARG.renew_ttl_ms])
local ttl, track_api, track_key = read_policy()

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
if track_api then
  redis.call('ZADD', KEYS[2], 'XX', expiry, token)
  extend_ttl(KEYS[2], expiry - now)
end
if track_key then
  redis.call('ZADD', KEYS[3], 'XX', expiry, token)
  extend_ttl(KEYS[3], expiry - now)
end
return {REPLY.GRANTED, now, expiry}
