-- epoch.lua: the store's epoch: when it began to hold quota state, and whether it began
-- after a loss.
--
-- A missing key means the store is new or lost its state (restarted empty). The caller
-- says which it believes: `known` is the epoch it saw before ("" = none), and a missing key
-- with a known epoch is a loss. `loss_on_start` = "1" treats a missing key as a loss even
-- for a caller that knew none (a coordinator that started together with an empty store).
-- KEYS[1]: the epoch key (a string "start_ms:kind", kind "fresh" | "loss"; no TTL).
-- ARGV: now_ms ("" = Redis TIME), known, loss_on_start.
-- Reply: {start_ms, kind, now_ms}.

local now = clock(ARGV[1])
local current = redis.call('GET', KEYS[1])
if not current then
  local kind = 'fresh'
  if ARGV[2] ~= '' or ARGV[3] == '1' then
    kind = 'loss'
  end
  current = string.format('%d:%s', now, kind)
  redis.call('SET', KEYS[1], current)
end
local start, kind = string.match(current, '^(%d+):(%a+)$')
return {tonumber(start), kind, now}
