-- forget.lua: forget the limits a (tenant, api) learned from the upstream (design rule 8).
--
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- ARGV: now_ms; then the policy block.
--   now_ms  "" = Redis TIME
-- Forgetting a learned limit that was in force raises it: the (tenant, api)'s waiters
-- are woken (lib.lua, wake_waiters), whichever key they wait on.
-- Reply: {GRANTED, now_ms, forgotten}: how many learned limits were in force.

local now = clock(ARGV[ARG.now_ms])
local _, _, _, _, limits = read_policy()

local names = learned_fields(limits)
local forgotten = 0
if #names > 0 then
  local values = redis.call('HMGET', KEYS[1], unpack(names))
  local at = 0
  for _, lim in ipairs(limits) do
    if lim.kind == 'calls' then
      at = at + 1
      if learned_amount(lim, values[at], now) then
        forgotten = forgotten + 1
      end
    end
  end
  redis.call('HDEL', KEYS[1], unpack(names))
end
if forgotten > 0 then
  wake_waiters()
end
return {REPLY.GRANTED, now, forgotten}
