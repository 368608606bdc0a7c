-- release.lua: end a lease with the outcome of its call.
--
-- The lease leaves flight (lib.lua, "counter hash"). ok | failed: its calls, and its
-- reported runtime (else its estimate), are charged in the bucket of the release time.
-- When the upstream reported its own processing time (ran_ms), the call reached it at
-- least that long before the answer, so before now - ran_ms: its calls are charged in
-- the bucket of max(grant, now - ran_ms + 1) instead (the 1 ms for a time rounded up),
-- or the oldest bucket still counted if that lies before every window (design rule 3
-- holds: the charge still sits no earlier than the arrival). Its run time stays charged
-- at the release.
-- throttled: the same, and the fleet-wide cooldown moves to now + retry_ms (never
-- earlier than it already is). not_called: nothing is charged (a refund).
-- Unknown, expired or released leases change nothing (an expired record is dropped).
-- Wake-up: when the line of the lease's key holds waiters and the release changed what
-- a waiter may be granted, it publishes "released" on the shard channel
-- qg:{<tenant>|<api>}:w (SPUBLISH; the state key with `w` for `s`, so the keys' hash tag),
-- and the waiters' coordinators try again at once. What changes it: a concurrency slot
-- freed; units given back (not_called refunds, a run time below the estimate); a pause
-- that a throttled release started or moved, or a limit it lowered (the waiters learn
-- their new soonest grant, and those it puts beyond their wait are answered). A calls
-- lease released ok or failed frees nothing (its units stay counted, design rule 3):
-- no waiter can be granted that could not be before, so no wake-up; except when they
-- are charged before now (ran_ms, below) or while its limit probes (a probe goes alone
-- in flight, and a probe's end may raise the level).
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- Learned limits (design rule 8): a throttled release may name the upstream's limit,
-- named_amount calls per named_window_ms. When the api has a calls limit of that window
-- and the amount is below the policy's, the (tenant, api) learns it until now +
-- learn_ttl_ms (never above the policy's amount, never below 1); a later, lower one
-- replaces it.
-- A lease of several call units may end in parts (an api of calls limits only, without
-- probing: the engine checks): `calls` of its units were called and are charged as
-- above, `keep` stay in flight under the same lease (its cost becomes `keep`, to be
-- released later), and the rest were never called: refunded. calls + keep above the
-- lease's cost changes nothing ({DENIED, now_ms, "exceeds"}).
-- ARGV: now_ms, token, outcome, retry_ms, runtime_ms, named_amount, named_window_ms,
--       learn_ttl_ms, ran_ms, calls, keep; then the policy block.
--   now_ms           "" = Redis TIME
--   token            the lease's random part and key
--   outcome          ok | failed | throttled | not_called
--   retry_ms         the upstream's retry time, "" = none
--   runtime_ms       the reported run time, "" = keep the estimate
--   named_amount     the limit the upstream named, "" = none
--   named_window_ms  its window
--   learn_ttl_ms     how long a learned limit holds
--   ran_ms           how long the upstream itself says it processed the call (its own
--                    server-side time, as Stats.ExecutionTime), "" = not known
--   calls            the lease's call units that were called, "" = all of them
--   keep             its call units that stay in flight, "" = none
-- Probing (lib.lua, "Probing"): while a probing limit's confirmed level is below its
-- amount in force, an `ok` release adds its units to the `g` bucket of its grant; the
-- probe's release (its token in
-- P<window>.<i>) ends the probe and, `ok`, raises C<window>.<i> to what it proves; a
-- named limit of the window sets it to the amount now in force.
-- Reply: {GRANTED, now_ms, learned, index, amount, before, woke}: woke is 1 when the
--        release published a wake-up, else 0; learned is a LEARN code
--        (NONE: nothing named or not throttled; LOWERED: limit `index` now grants
--        `amount`, it granted `before`; KEPT: it already grants no more; HIGHER: the named amount
--        is not below the policy's `amount`; NO_LIMIT: the api has no calls limit of
--        that window); or {DENIED, now_ms, "unknown" | "expired" | "exceeds"}.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local outcome = ARGV[ARG.outcome]
local retry = tonumber(ARGV[ARG.retry_ms])
local runtime = tonumber(ARGV[ARG.runtime_ms])
local named = tonumber(ARGV[ARG.named_amount])
local named_window = tonumber(ARGV[ARG.named_window_ms])
local learn_ttl = tonumber(ARGV[ARG.learn_ttl_ms])
local ran = tonumber(ARGV[ARG.ran_ms])
local calls = tonumber(ARGV[ARG.calls])
local keep = tonumber(ARGV[ARG.keep]) or 0
local ttl, track_api, track_key, _, limits = read_policy()

local state = redis.call('HMGET', KEYS[1], token, 'cd')
if not state[1] then
  return {REPLY.DENIED, now, 'unknown'}
end
local lease = parse_lease(state[1])
local wake = false  -- whether the waiters' next try may end otherwise than their last
calls = calls or lease.cost
if lease.expiry > now and calls + keep > lease.cost then
  return {REPLY.DENIED, now, 'exceeds'}
end
if keep == 0 or lease.expiry <= now then
  forget_lease(token, track_api, track_key)
end
if lease.expiry <= now then
  return {REPLY.DENIED, now, 'expired'}
end
if keep > 0 then
  -- The rest of the lease stays in flight, as a lease of `keep` units.
  redis.call('HSET', KEYS[1], token,
    string.format('%d:%d:%d:%d', lease.grant, keep, lease.estimate, lease.expiry))
end

-- Probing limits (lib.lua, "Probing"): their amounts in force, confirmed levels and
-- probes, read only when the policy has one.
local probing = {}
for _, lim in ipairs(limits) do
  if lim.probes then
    probing[#probing + 1] = lim
  end
end
if #probing > 0 then
  local names = learned_fields(limits)
  for _, lim in ipairs(probing) do
    names[#names + 1] = probe_field('P', lim)
  end
  local values = redis.call('HMGET', KEYS[1], unpack(names))
  apply_learned(limits, values, now)
  for _, lim in ipairs(limits) do
    lim.in_force, lim.amount = lim.amount, lim.configured
  end
  for i, lim in ipairs(probing) do
    lim.probe = values[#names - #probing + i] == token
  end
end

-- The lease leaves flight in every windowed limit; unless it was not called, its units
-- are charged in the bucket of now (the call reached the upstream before this release),
-- its calls in that of the latest arrival the upstream's own run time allows.
local arrived = now
if ran and ran > 1 then
  arrived = math.max(lease.grant, now - ran + 1)
end
for _, lim in ipairs(limits) do
  if lim.kind == 'concurrent' then
    wake = true  -- its slot
  else
    local units, charged, at = lease.cost - keep, calls, arrived
    if lim.kind == 'runtime' then
      units, charged, at = lease.estimate, runtime or lease.estimate, now
    end
    if outcome == 'not_called' then
      charged = 0
    end
    if charged < units then
      wake = true  -- a refund, or run time below the estimate
    end
    if units > 0 or charged > 0 then
      -- Never in a bucket before every window that still counts: at the oldest that does
      -- (later than the arrival, so still safe), which keeps the counter's books whole
      -- (and the counter itself, with a probing limit's ring).
      local field = expiry_field(lim, lease.expiry)
      local here = math.max(math.floor(at / lim.gran),
        math.floor((now - lim.window - lim.margin) / lim.gran))
      if lim.probes and lim.confirmed < lim.in_force then
        -- Probing: a probe goes only alone in flight, and its end may raise the level.
        wake = true
        if outcome == 'ok' then
          count_grant(lim, lease)
        end
      end
      local c, values = open_counter(lim, now, {field, here})
      local take = math.min(values[1], units)  -- less only if the counter was lost
      local extra = {}
      c.fl = c.fl - take
      if values[1] > take then
        extra = {field, values[1] - take}
      elseif take > 0 then
        redis.call('HDEL', lim.key, field)
      end
      if c.fl <= 0 then
        c.fl, c.xl = 0, nil  -- a stale `xl` is ignored while `fl` is 0
      end
      if charged > 0 and here < math.floor(now / lim.gran) then
        wake = true  -- charged before now: it may leave the window before waiters were told
      end
      if charged > 0 then
        extra[#extra + 1] = here
        extra[#extra + 1] = values[2] + charged
        c.sum = c.sum + charged
        if not c.lo or here < c.lo then
          c.lo = here
        end
      end
      save_counter(lim, c, extra)
      if charged > 0 and not c.existed then
        -- Lost meanwhile: the grant made the counter live past this bucket, a new one not.
        redis.call('PEXPIRE', lim.key, lim.gran + lim.window + lim.margin)
      end
    end
  end
end

local learned, index, amount, before = LEARN.NONE, 0, 0, 0
if outcome == 'throttled' and named and named_window then
  learned = LEARN.NO_LIMIT
  for i, lim in ipairs(limits) do
    if lim.kind == 'calls' and lim.window == named_window then
      local field = 'L' .. lim.window
      index, amount = i, lim.amount
      before = learned_amount(lim, redis.call('HGET', KEYS[1], field), now) or lim.amount
      if named >= lim.amount then
        learned = LEARN.HIGHER
      elseif math.max(named, 1) >= before then
        learned, amount = LEARN.KEPT, before
      else
        learned, amount, wake = LEARN.LOWERED, math.max(named, 1), true
        local until_ms = now + learn_ttl
        local tx, expire_ms = plan_state_ttl(now, 0, until_ms, ttl)
        redis.call('HSET', KEYS[1], field,
          string.format('%d:%d:%d', amount, lim.amount, until_ms), 'tx', tx)
        if expire_ms then
          redis.call('PEXPIRE', KEYS[1], expire_ms)
        end
      end
      break
    end
  end
end

-- A probe's answer: `ok` raises the confirmed level to what it proves; a named limit of
-- its window (below) confirms the amount now in force. Either ends the probe.
local function confirm(lim, level)
  local until_ms = now + learn_ttl
  local tx, expire_ms = plan_state_ttl(now, 0, until_ms, ttl)
  redis.call('HSET', KEYS[1], probe_field('C', lim),
    string.format('%d:%d:%d', level, lim.amount, until_ms), 'tx', tx)
  if expire_ms then
    redis.call('PEXPIRE', KEYS[1], expire_ms)
  end
end
for _, lim in ipairs(probing) do
  if lim.probe then
    redis.call('HDEL', KEYS[1], probe_field('P', lim))
  end
  if learned ~= LEARN.NONE and learned ~= LEARN.NO_LIMIT and limits[index] == lim then
    if amount > lim.confirmed then
      confirm(lim, amount)  -- the upstream's own word: nothing below it needs a probe
    end
  elseif lim.probe and outcome == 'ok' and lim.confirmed < lim.in_force then
    local level = math.min(probe_proves(lim, lease, arrived), lim.in_force)
    if level > lim.confirmed then
      confirm(lim, level)
    end
  end
end

if outcome == 'throttled' and retry and retry > 0 then
  local until_ms = now + retry
  if (tonumber(state[2]) or 0) < until_ms then
    wake = true  -- a later soonest grant for every waiter
    -- tx as if unknown: the HDEL above may have emptied the hash (a rare path, so one
    -- PTTL more is cheap).
    local tx, expire_ms = plan_state_ttl(now, 0, until_ms, ttl)
    redis.call('HSET', KEYS[1], 'cd', until_ms, 'tx', tx)
    if expire_ms then
      redis.call('PEXPIRE', KEYS[1], expire_ms)
    end
  end
end
local woke = 0
if wake and redis.call('EXISTS', KEYS[4]) == 1 then
  wake_waiters()
  woke = 1
end
return {REPLY.GRANTED, now, learned, index, amount, before, woke}
