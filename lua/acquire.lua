-- acquire.lua: grant one lease if the cooldown is over and every limit has room.
--
-- A windowed limit counts its charged buckets and every lease in flight (lib.lua,
-- "counter hash"); a grant puts the lease's cost (calls) and estimate (runtime) in flight.
-- Checks everything first and writes only when all pass: a denial changes no count,
-- lease or cooldown (it may drop state that has already expired).
-- Loss of state, per hash tag (design rule 9): the state hash carries the epoch of this
-- (tenant, api), `ep` = "start_ms:fresh|loss", and lives at least until `tx` (never less
-- than stamp_ttl_ms after a grant). The caller passes what it knew of them (known_epoch,
-- known_until). A state hash that is missing although the caller knew it must still live,
-- or that carries another epoch than the one the caller knew alive, was lost: the epoch
-- becomes a loss, from its start, for every caller. A missing hash the caller never knew
-- is fresh (or, with loss_on_start, a loss since that time). Each writer (an engine,
-- `writer`) counts its grants of the epoch in the field S<writer>; a state whose count
-- is below what the caller saw it write (`known_written`, same epoch, known alive)
-- misses grants that were written: a failover to a replica that had not received them.
-- The epoch then becomes a loss from now, for every caller. Counted per writer, since
-- other writers' grants on the new master would hide a shared count's gap.
-- Recovery: after a loss (of this hash tag's state, or a failover the caller saw: the
-- `recovery` time), a windowed limit whose window still overlaps the loss grants at most
-- share_permille / 1000 of its amount.
-- A grant on an api without concurrent limits costs TIME, one HMGET of the state hash,
-- one HMGET and one HSET per windowed limit (and a PTTL once per bucket of expiries), and
-- one HSET of the state hash.
-- KEYS: state, inflight_api, inflight_key, line, tickets; then one per limit (lib.lua).
-- Priority classes: a lease of a class with a share may be granted only while each
-- windowed limit's use (of every class, leases in flight included) plus its own units
-- stays within amount * class_permille / 1000 (the share is a cap on how full the window
-- may be, not a counter of the class's own use): the rest of each window is headroom
-- for the classes above. retry_ms and soonest_ms are computed under that cap. In
-- recovery the cap is the recovery share of the class's cap. Concurrent limits are
-- shared by every class alike.
-- The line (per key, lib.lua "line" and "tickets"): waiters hold tickets ordered by class
-- rank, then arrival. A request is granted only when every limit has room for the
-- tickets ahead of it (their cost, estimate and one slot each) and for itself, so a
-- newcomer never overtakes a waiter and capacity that falls short goes to the head; its
-- retry_ms counts those ahead too, and so does soonest_ms but for run time (see the
-- reply). A denied request with a ticket whose soonest grant lies within line_wait_ms
-- joins the line (or stays, refreshed until now + ticket_ttl_ms); otherwise, and when
-- granted, its ticket leaves. Tickets not refreshed in time are dropped. With nobody
-- waiting this costs one EXISTS.
-- Aging, so that no class starves: a grant of a lower class (rank > 0) stamps the state
-- hash's field G<rank> with its time (the first grant in the hash's life stamps every
-- lower class). A lower class whose stamp is aging_ms old or more has aged: its tickets
-- go ahead of every class that has not (aged classes among themselves by rank, then
-- arrival), and its grant is capped by the whole limit, not its share. Its grant stamps
-- it again, so each lower class is served that way at most once per aging_ms, and one
-- that keeps asking waits at most aging_ms, then for room. A lower class not yet aged
-- gets retry_ms and soonest_ms no longer than the time until it ages (nor shorter than
-- the cooldown): it may be served then.
-- ARGV: now_ms, token, cost, estimate_ms, known_epoch, known_until, writer,
--       known_written, loss_on_start, recovery, share_permille, class_permille, ticket,
--       rank, classes, aging_ms, line_wait_ms, ticket_ttl_ms; then the policy block.
--   now_ms          "" = Redis TIME
--   token           the lease's random part and key
--   cost            call units
--   estimate_ms     run time reserved
--   known_epoch     the start of this state's epoch as the caller last saw it, "" = none
--   known_until     until when the caller saw the state hash sure to live, "" = none
--   writer          the caller's id among the writers of this state, "" = none
--   known_written   how many grants of the writer's the caller saw written in the epoch
--   loss_on_start   a time (ms) since which a missing state counts as lost, "" = none
--   recovery        the time (ms) of a loss the caller saw (a failover), "" = none
--   share_permille  the share of each limit granted in recovery, "" = no loss tracking
--   class_permille  the lease's priority class's share of each windowed limit, "" = all
--   ticket          the waiter's ticket in the line of its key, "" = not waiting
--   rank            the class's rank, 0 highest: its place in line before arrival
--   classes         how many classes the api has (0 without classes)
--   aging_ms        a lower class this long without a grant goes first, "" = never
--   line_wait_ms    join or stay in line when the soonest grant lies within, "" = leave
--   ticket_ttl_ms   how long a joined or refreshed ticket stays without a refresh
-- Reply: {GRANTED, now_ms, expiry_ms, epoch_ms, until_ms, written}; {DENIED, now_ms,
--        retry_ms, bound, soonest_ms, amount, epoch_ms, until_ms, written}, where
--        retry_ms is the wait if nothing else happens (leases in flight expire
--        unreleased), bound the 1-based limit that bound it (0 for the cooldown),
--        soonest_ms the wait if every lease in flight were released now (both -1 when no
--        wait can ever grant it; a runtime limit's leases released having run no time,
--        and the tickets ahead of it granted and released so: a release charges the run
--        time it reports, not the estimate, so until nothing is left in flight a waiter
--        for run time may still be served soon), and amount the bound limit's amount in
--        force (a learned one may be lower than the policy's); epoch_ms, until_ms and
--        written (the writer's grants in the epoch) are what the caller should know next
--        time (0 untracked).
-- Learned limits (design rule 8) lower a calls limit's amount while they hold.
-- Probing (lib.lua, "Probing"): a grant above a probing limit's confirmed level is its
-- probe, granted only while nothing else of that counter is in flight and no one is
-- ahead in line; else it is denied, retry_ms as ever and soonest_ms 0 (a release may let
-- it probe). A probe's token goes into the state field P<window>.<i>.

local now = clock(ARGV[ARG.now_ms])
local token = ARGV[ARG.token]
local cost = tonumber(ARGV[ARG.cost])
local estimate = tonumber(ARGV[ARG.estimate_ms])
local known_epoch = tonumber(ARGV[ARG.known_epoch])
local known_until = tonumber(ARGV[ARG.known_until]) or 0
local writer = ARGV[ARG.writer]
local known_written = tonumber(ARGV[ARG.known_written]) or 0
local loss_on_start = tonumber(ARGV[ARG.loss_on_start])
local since = tonumber(ARGV[ARG.recovery])
local share = tonumber(ARGV[ARG.share_permille])
local class_share = tonumber(ARGV[ARG.class_permille])
local ticket = ARGV[ARG.ticket]
local rank = tonumber(ARGV[ARG.rank]) or 0
local classes = tonumber(ARGV[ARG.classes]) or 0
local aging = tonumber(ARGV[ARG.aging_ms])
if classes < 2 then
  aging = nil
end
local line_wait = tonumber(ARGV[ARG.line_wait_ms])
local ticket_ttl = tonumber(ARGV[ARG.ticket_ttl_ms]) or 0
local ttl, track_api, track_key, stamp_ttl, limits = read_policy()

local wanted = learned_fields(limits)
local stamps_at = 4 + #wanted  -- state[stamps_at + r]: the last grant of class rank r
if aging then
  for r = 1, classes - 1 do
    wanted[#wanted + 1] = 'G' .. r
  end
end
local written_field = share and writer ~= '' and 'S' .. writer
if written_field then
  wanted[#wanted + 1] = written_field
end
local state = redis.call('HMGET', KEYS[1], 'cd', 'ep', 'px', 'tx', unpack(wanted))
local written = written_field and tonumber(state[4 + #wanted]) or 0
apply_learned(limits, {unpack(state, 5, stamps_at)}, now)
local state_until = tonumber(state[4]) or 0

-- Whether the lower class of rank r has gone aging_ms without a grant.
local function aged(r)
  local stamp = aging and r > 0 and tonumber(state[stamps_at + r])
  return stamp and now - stamp >= aging
end
local promoted = aged(rank)
if promoted then
  class_share = nil
end

-- A ticket's place in line as it counts now: an aged class's go ahead of all others.
local function in_line(score)
  if aged(math.floor(score / RANK_SPAN)) then
    return score - classes * RANK_SPAN
  end
  return score
end

-- The tickets ahead in line: how many, and their call units and run time.
local ahead_n, ahead_cost, ahead_estimate = 0, 0, 0
local place = rank * RANK_SPAN + now  -- a newcomer's place
local queued = false
if redis.call('EXISTS', KEYS[4]) == 1 then
  local records = redis.call('HGETALL', KEYS[5])
  local alive, dead = {}, {}
  for i = 1, #records, 2 do
    local expiry, c, e = string.match(records[i + 1], '^(%d+):(%d+):(%d+)$')
    if tonumber(expiry) > now then
      alive[records[i]] = {tonumber(c), tonumber(e)}
    else
      dead[#dead + 1] = records[i]
    end
  end
  if ticket ~= '' then
    local score = tonumber(redis.call('ZSCORE', KEYS[4], ticket))
    if score and alive[ticket] then
      place, queued = score, true
    end
  end
  local function count(other)
    local units = alive[other]
    if units then
      ahead_n = ahead_n + 1
      ahead_cost = ahead_cost + units[1]
      ahead_estimate = ahead_estimate + units[2]
    else
      dead[#dead + 1] = other  -- its record expired, or went with the hash
    end
  end
  if aging then
    local mine = in_line(place)
    local line = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
    for i = 1, #line, 2 do
      if in_line(tonumber(line[i + 1])) < mine then
        count(line[i])
      elseif not alive[line[i]] then
        dead[#dead + 1] = line[i]
      end
    end
  else
    for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. place)) do
      count(other)
    end
  end
  if #dead > 0 then
    redis.call('ZREM', KEYS[4], unpack(dead))
    redis.call('HDEL', KEYS[5], unpack(dead))
  end
end

-- Join, refresh or leave the line after a denial; leave it after a grant.
local function keep_place(granted, soonest)
  if ticket == '' then
    return
  end
  if not granted and line_wait and soonest >= 0 and soonest <= line_wait then
    redis.call('ZADD', KEYS[4], 'NX', place, ticket)
    redis.call('HSET', KEYS[5], ticket,
      string.format('%d:%d:%d', now + ticket_ttl, cost, estimate))
    extend_ttl(KEYS[4], ticket_ttl)
    extend_ttl(KEYS[5], ticket_ttl)
  elseif queued then
    redis.call('ZREM', KEYS[4], ticket)
    redis.call('HDEL', KEYS[5], ticket)
  end
end


local epoch, epoch_text = 0, nil  -- epoch_text: to write with a grant
if share then
  local start, kind
  if state[2] then
    start, kind = string.match(state[2], '^(%d+):(%a+)$')
    start = tonumber(start)
  end
  local knew = known_epoch and known_until > now
  if not start then
    start, kind = now, 'fresh'
    if knew then
      kind = 'loss'
    elseif loss_on_start and loss_on_start <= now then
      start, kind = loss_on_start, 'loss'
    end
    epoch_text = string.format('%d:%s', start, kind)
  elseif knew and start ~= known_epoch and kind ~= 'loss' then
    kind = 'loss'  -- recreated while the caller knew it alive: a loss another took as fresh
    epoch_text = string.format('%d:%s', start, kind)
  elseif knew and start == known_epoch and written < known_written then
    start, kind = now, 'loss'  -- grants the caller saw written are missing
    epoch_text = string.format('%d:%s', start, kind)
  end
  epoch = start
  if kind == 'loss' and (not since or start > since) then
    since = start
  end
end
if not share then
  since = nil
end

local purge_at = tonumber(state[3])
if purge_at and purge_at <= now then
  purge_at = purge_leases(now, ttl, track_api)
  if purge_at then
    redis.call('HSET', KEYS[1], 'px', purge_at)
  else
    redis.call('HDEL', KEYS[1], 'px')
  end
end
if track_key then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end

-- Ms until a probe waiting for the leases in flight could go if nothing else happens:
-- when the count fits the confirmed level, or when the last of them expires.
local function probe_wait(lim, need, now)
  local live, used = live_buckets(lim, now)
  local full = lim.amount
  lim.amount = lim.confirmed
  local wait = wait_for_units(lim, live, used, need, now)
  lim.amount = full
  local last = 0
  for _, bucket in ipairs(live) do
    if bucket[3] then
      last = math.max(last, (bucket[1] + 1) * lim.gran - now)
    end
  end
  if wait < 0 or last < wait then
    wait = last
  end
  return math.max(wait, 1)
end

local expiry = now + ttl
local retry, bound, soonest = 0, 0, 0
local cooldown = tonumber(state[1]) or 0
if cooldown > now then
  retry, soonest = cooldown - now, cooldown - now
end

for i, lim in ipairs(limits) do
  local wait, soon = 0, 0
  if lim.kind == 'concurrent' then
    wait = wait_for_slot(lim, now, ahead_n, ttl)  -- soon stays 0: a release frees one
  else
    local need, before = cost, ahead_cost
    if lim.kind == 'runtime' then
      need, before = estimate, ahead_estimate
    end
    lim.need = need
    lim.field = expiry_field(lim, expiry)
    local c, values = open_counter(lim, now, {lim.field})
    lim.c, lim.here = c, values[1]
    -- After a loss the lost history may still fill this window upstream: grant only a
    -- share, until the window no longer overlaps the loss.
    local recovered = since and since + lim.window + lim.margin
    local in_force = lim.amount
    if class_share then
      lim.amount = math.floor(in_force * class_share / 1000)  -- the class's cap, for now
    end
    local room = lim.amount
    if recovered and now < recovered then
      room = math.floor(lim.amount * share / 1000)
    end
    -- Room for those ahead too. When they and this one never fit at once, those ahead
    -- go first: no grant now, and the wait is at least a window (soonest: until empty).
    local behind = before > 0 and need + before > room
    if behind then
      need = room
    else
      need = need + before
    end
    if c.sum + c.fl + need > room then
      local live, used = live_buckets(lim, now)
      wait = window_wait(lim, live, used, need, now, recovered, share)
      soon = wait
      if lim.kind == 'runtime' then
        -- Run time is charged as reported at release, so the estimates in flight, and
        -- those of the tickets ahead, may all come back unused: the soonest grant is when
        -- this lease's own estimate fits what is charged.
        if c.fl > 0 or before > 0 then
          local charged, sum = charged_only(lim, live, now)
          soon = window_wait(lim, charged, sum, lim.need, now, recovered, share)
        end
      elseif c.fl > 0 and wait > 0 then
        soon = window_wait(lim, released_now(lim, live, now), used, need, now, recovered, share)
      end
    end
    if behind and wait >= 0 then
      wait = math.max(wait, lim.window)
    end
    lim.amount = in_force
    if wait == 0 and lim.confirmed < in_force and c.sum + c.fl + need > lim.confirmed then
      if c.fl > 0 or before > 0 then
        wait, soon = probe_wait(lim, need, now), 0  -- a release may let it probe
      else
        lim.probe = true
      end
    end
  end
  if wait < 0 then
    keep_place(false, -1)
    return {REPLY.DENIED, now, -1, i, -1, lim.amount, epoch, state_until, written}
  end
  if wait > retry then
    retry, bound = wait, i
  end
  if soon > soonest then
    soonest = soon
  end
end

local stamp = aging and rank > 0 and tonumber(state[stamps_at + rank])
if retry > 0 and stamp and not promoted then
  local ages_in, pause = stamp + aging - now, math.max(cooldown - now, 0)
  retry = math.max(math.min(retry, ages_in), pause)
  soonest = math.max(math.min(soonest, ages_in), pause)
end
if retry > 0 then
  local amount = 0
  if bound > 0 then
    amount = limits[bound].amount
  end
  keep_place(false, soonest)
  return {REPLY.DENIED, now, retry, bound, soonest, amount, epoch, state_until, written}
end
keep_place(true, 0)

-- The lease's units go in flight in every windowed limit, filed under its expiry.
for _, lim in ipairs(limits) do
  if lim.need and lim.need > 0 then
    local c = lim.c
    local index = math.floor(expiry / lim.gran)
    -- Only what changes: the bookkeeping that settling or pruning changed is written.
    local fields = {lim.field, lim.here + lim.need, 'fl', c.fl + lim.need}
    if not c.xl or index < c.xl then
      fields[5], fields[6] = 'xl', index
    end
    redis.call('HSET', lim.key, unpack(fields))
    if lim.here == 0 then
      -- Until this expiry is settled and its bucket has left the window; a renewed lease
      -- may have made the counter live longer already.
      extend_ttl(lim.key, bucket_end(lim, index) - now)
    end
  end
end

local fields = {token, string.format('%d:%d:%d:%d', now, cost, estimate, expiry)}
local deadline = expiry
if share then
  -- The hash outlives every window this grant counts in, so that a missing one within
  -- that time is a loss, and the loss's epoch lasts as long as it matters.
  deadline = math.max(deadline, now + stamp_ttl)
end
if aging then
  -- This class's stamp, and every lower class's that has none yet: a class ages from
  -- its last grant, or from the first grant of any class in this state's life.
  for r = 1, classes - 1 do
    if r == rank or not state[stamps_at + r] then
      fields[#fields + 1] = 'G' .. r
      fields[#fields + 1] = now
    end
  end
end
if epoch_text then
  fields[#fields + 1] = 'ep'
  fields[#fields + 1] = epoch_text
end
if written_field then
  written = written + 1
  fields[#fields + 1] = written_field
  fields[#fields + 1] = written
end
for _, lim in ipairs(limits) do
  if lim.probe then
    fields[#fields + 1] = probe_field('P', lim)
    fields[#fields + 1] = token
  end
end
if not purge_at then
  fields[#fields + 1] = 'px'
  fields[#fields + 1] = expiry
end
local tx, expire_ms = plan_state_ttl(now, state_until, deadline, ttl)
if tx then
  fields[#fields + 1] = 'tx'
  fields[#fields + 1] = tx
  state_until = tx
end
redis.call('HSET', KEYS[1], unpack(fields))
if expire_ms then
  redis.call('PEXPIRE', KEYS[1], expire_ms)
end
if track_api then
  redis.call('ZADD', KEYS[2], expiry, token)
  extend_ttl(KEYS[2], ttl)
end
if track_key then
  redis.call('ZADD', KEYS[3], expiry, token)
  extend_ttl(KEYS[3], ttl)
end
return {REPLY.GRANTED, now, expiry, epoch, state_until, written}
