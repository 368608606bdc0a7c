-- renew.lua: extend a live lease so that it expires no earlier than now + ttl_ms.
--
-- KEYS: the layout in lib.lua (only KEYS[2..4] are used).
-- ARGV: now_ms ("" = Redis TIME), token, ttl_ms.
-- Reply: {1, now_ms, expiry_ms} renewed, or {0, now_ms, "unknown" | "expired"}.

local now = clock(ARGV[1])
local token = ARGV[2]
local ttl = tonumber(ARGV[3])

local record = redis.call('HGET', KEYS[2], token)
if not record then
  return {0, now, 'unknown'}
end
local lease = parse_lease(record)
if lease.expiry <= now then
  forget_lease(token)
  return {0, now, 'expired'}
end

local expiry = math.max(lease.expiry, now + ttl)
redis.call('HSET', KEYS[2], token,
  string.format('%d:%d:%d:%d', lease.grant, lease.cost, lease.estimate, expiry))
redis.call('ZADD', KEYS[3], 'XX', expiry, token)
redis.call('ZADD', KEYS[4], 'XX', expiry, token)
for i = 2, 4 do
  extend_ttl(KEYS[i], expiry - now)
end
return {1, now, expiry}
