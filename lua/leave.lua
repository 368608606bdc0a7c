-- leave.lua: a waiter leaves the line of its key (its client went away).
--
-- Removes the ticket from the line and its record; nothing else changes.
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- ARGV: now_ms, ticket; then the policy block.
--   now_ms  "" = Redis TIME
--   ticket  the waiter's ticket
-- Reply: {GRANTED, now_ms} when the ticket was in line; {DENIED, now_ms} when it was not.

local now = clock(ARGV[ARG.now_ms])
local ticket = ARGV[ARG.ticket]
local removed = redis.call('ZREM', KEYS[4], ticket)
redis.call('HDEL', KEYS[5], ticket)
if removed == 1 then
  return {REPLY.GRANTED, now}
end
return {REPLY.DENIED, now}
