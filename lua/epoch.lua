-- epoch.lua: the store's epoch: when it began to hold quota state, and whether it began
-- after a loss.
--
-- A missing key means the store is new or lost its state (restarted empty). The caller
-- says which it believes: `known` is the epoch it saw before ("" = none), and a missing key
-- with a known epoch is a loss. `loss_on_start` = "1" treats a missing key as a loss even
-- for a caller that knew none (a coordinator that started together with an empty store).
-- KEYS: epoch (a string "start_ms:kind", kind "fresh" | "loss"; no TTL).
-- ARGV: now_ms, known, loss_on_start.
--   now_ms         "" = Redis TIME
--   known          the epoch the caller saw before, "" = none
--   loss_on_start  "1" or ""
-- Reply: {start_ms, kind, now_ms}.

local now = clock(ARGV[ARG.now_ms])
local current = redis.call('GET', KEYS[1])
if not current then
  local kind = 'fresh'
  if ARGV[ARG.known] ~= '' or ARGV[ARG.loss_on_start] == '1' then
    kind = 'loss'
  end
  current = string.format('%d:%s', now, kind)
  redis.call('SET', KEYS[1], current)
end
local start, kind = string.match(current, '^(%d+):(%a+)$')
return {tonumber(start), kind, now}
