-- renew.lua: extend a live lease so that it expires no earlier than now + ttl_ms.
--
-- KEYS: the layout in lib.lua.
-- ARGV: now_ms ("" = Redis TIME), token, renew_ttl_ms, then what the policy fixes (see
--       lib.lua).
-- Reply: {1, now_ms, expiry_ms} renewed, or {0, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[1])
local token = ARGV[2]
local renew_ttl = tonumber(ARGV[3])
local ttl, track_api, track_key = read_policy(4)

local state = redis.call('HMGET', KEYS[1], token, 'tx')
if not state[1] then
  return {0, now, 'unknown'}
end
local lease = parse_lease(state[1])
if lease.expiry <= now then
  forget_lease(token, track_api, track_key)
  return {0, now, 'expired'}
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
return {1, now, expiry}
