-- usage.lua: a read-only snapshot of one (tenant, api, key).
--
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- ARGV: now_ms; then the policy block.
--   now_ms  "" = Redis TIME
-- Reply: {now_ms, cooldown_ms, in_flight, waiting, used_1, resets_1, amount_1, used_2,
--        ...}: waiting is the tickets in the key's line whose waiters still refresh them;
--        used is call units, runtime ms or leases in flight; resets is the ms until used
--        next drops (the oldest counted bucket leaves the window, or the earliest lease
--        expires), 0 when nothing is used; amount is the limit in force (a learned one
--        may be lower than the policy's).

local now = clock(ARGV[ARG.now_ms])
local _, _, _, _, limits = read_policy()

local state = redis.call('HMGET', KEYS[1], 'cd', unpack(learned_fields(limits)))
apply_learned(limits, {unpack(state, 2)}, now)
local cooldown = (tonumber(state[1]) or 0) - now
local _, in_flight = lease_records(now)
local after = string.format('(%d', now)  -- scores above now: live leases
local waiting = 0
for _, record in ipairs(redis.call('HVALS', KEYS[5])) do
  if tonumber(string.match(record, '^(%d+):')) > now then
    waiting = waiting + 1
  end
end
local reply = {now, math.max(cooldown, 0), in_flight, waiting}
for _, lim in ipairs(limits) do
  local used, resets = 0, 0
  if lim.kind == 'concurrent' then
    used = redis.call('ZCOUNT', lim.key, after, '+inf')
    if used > 0 then
      local first = redis.call('ZRANGEBYSCORE', lim.key, after, '+inf', 'WITHSCORES',
        'LIMIT', 0, 1)
      resets = tonumber(first[2]) - now
    end
  else
    local live
    live, used = live_buckets(lim, now)
    for _, bucket in ipairs(live) do
      local ends = bucket_end(lim, bucket[1]) - now
      if resets == 0 or ends < resets then
        resets = ends
      end
    end
  end
  reply[#reply + 1] = used
  reply[#reply + 1] = resets
  reply[#reply + 1] = lim.amount
end
return reply
