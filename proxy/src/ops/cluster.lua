-- sluice lease renewal: runs atomically on the Redis server, once per instance and backend
-- every lease_ttl / 3. It reads Redis's own clock (TIME), so instance clocks never matter.
--
-- KEYS[1]  the backend's hash, e.g. "sluice:iis". Fields:
--            born      Redis time (ms) this state was created; missing = state lost
--            s:<id>    the share granted to instance <id>
--            e:<id>    its lease end (Redis time, ms)
--            d:<id>    its demand at its last renewal (peak in flight + queued)
--            f:<id>    its safe share
--            g:<id>    share of a previous incarnation of <id> (a crashed process whose
--            ge:<id>   requests may still run), held apart until ge + grace
-- ARGV     id, fresh (1 on a fresh process's first renewal), demand, used (the most the
--          instance may have in flight now), safe, ttl_ms, grace_ms (longest request
--          deadline), cap (N), expected (instances sharing the backend), step
--
-- What is held against the cap N, per instance:
--   live (lease end + grace not passed): max(share, safe)
--   dead: safe (it may be alive but cut off from Redis, and then it uses its safe share)
--   never seen, up to `expected` instances: safe (it may start while Redis is down)
--   plus any previous incarnation's share until its lease end + grace
-- A grant never makes the sum of holds exceed N (when every instance's settings agree and
-- the safe shares add up to at most N), and a share is never recorded below `used`.
-- A lost state (no `born`: Redis restarted empty) starts a learning period of ttl + grace
-- during which every grant is at most the safe share: leases granted before the loss may
-- still be in use until then, and each of them was at least its holder's safe share.
-- Returns { share, target, learning, overcommitted, id1, share1, live1, demand1, safe1, ... }.

local key = KEYS[1]
local id = ARGV[1]
local fresh = tonumber(ARGV[2]) == 1
local demand = tonumber(ARGV[3])
local used = tonumber(ARGV[4])
local safe = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local grace = tonumber(ARGV[7])
local cap = tonumber(ARGV[8])
local expected = tonumber(ARGV[9])
local step = tonumber(ARGV[10])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local born = tonumber(redis.call('HGET', key, 'born'))
if not born then
  born = now
  redis.call('HSET', key, 'born', born)
end
local learning = now < born + ttl + grace

local rec, ids = {}, {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do
  local kind, who = string.match(raw[i], '^(%a+):(.+)$')
  if kind then
    if not rec[who] then
      rec[who] = {}
      table.insert(ids, who)
    end
    rec[who][kind] = tonumber(raw[i + 1])
  end
end
if not rec[id] then
  rec[id] = { s = 0, e = 0, f = safe, d = 0 }
  table.insert(ids, id)
end

local function live(r) return (r.e or 0) + grace >= now end
local function ghost(r)
  if r.g and r.ge and r.ge + grace >= now then return r.g end
  return 0
end

local me = rec[id]
if fresh and live(me) and (me.s or 0) > 0 then
  -- A new process under an id whose lease is still held: its predecessor crashed and its
  -- requests may still run. Hold that share apart until it expires.
  me.g = ghost(me) + me.s
  me.ge = math.max(me.ge or 0, me.e)
  me.s = 0
  me.e = 0
end

-- Drop dead records beyond the expected number of instances (renamed ids).
local known = #ids
if known > expected then
  for _, who in ipairs(ids) do
    local r = rec[who]
    if known > expected and who ~= id and not live(r) and ghost(r) == 0 then
      redis.call('HDEL', key, 's:' .. who, 'e:' .. who, 'd:' .. who, 'f:' .. who, 'g:' .. who, 'ge:' .. who)
      rec[who] = nil
      known = known - 1
    end
  end
end

local others, fixed = 0, 0
local fsum, xsum = safe, math.max(0, demand - safe)
local shares = { { id = id, x = math.max(0, demand - safe) } }
for _, who in ipairs(ids) do
  local r = rec[who]
  if r then
    local g = ghost(r)
    fixed = fixed + g
    if who ~= id then
      local f = r.f or 0
      local h
      if live(r) then
        h = math.max(r.s or 0, f)
        fsum = fsum + f
        xsum = xsum + math.max(0, (r.d or 0) - f)
        table.insert(shares, { id = who, x = math.max(0, (r.d or 0) - f) })
      else
        h = f
        fixed = fixed + f
      end
      others = others + h + g
    end
  end
end
local missing = math.max(0, expected - known)
others = others + missing * safe
fixed = fixed + missing * safe

-- The target: each live instance's safe share, plus the rest of the cap split by demand
-- above the safe share; what nobody demands is split evenly. Whole slots left by rounding
-- go to the largest remainders (ties: by id), so the targets add up to the cap exactly.
local extra = math.max(0, cap - fixed - fsum)
local given = 0
for _, e in ipairs(shares) do
  local exact
  if xsum <= extra then
    exact = e.x + (extra - xsum) / #shares
  else
    exact = extra * e.x / xsum
  end
  e.base = math.floor(exact)
  e.rem = exact - e.base
  given = given + e.base
end
table.sort(shares, function(a, b)
  if a.rem ~= b.rem then return a.rem > b.rem end
  return a.id < b.id
end)
local target = safe
for k, e in ipairs(shares) do
  if e.id == id then
    target = safe + e.base
    if k <= extra - given then target = target + 1 end
  end
end
if learning then target = math.min(target, safe) end

local cur = 0
if live(me) then cur = me.s or 0 end
local free = cap - others - ghost(me)
local new
if target > cur then
  new = math.min(target, cur + step)
  new = math.max(cur, math.min(new, free))
else
  new = math.max(target, cur - step)
end
new = math.max(new, used)
if learning then new = math.min(new, safe) end
local over = 0
if new > free then over = 1 end

me.s, me.e, me.d, me.f = new, now + ttl, demand, safe
redis.call('HSET', key, 's:' .. id, new, 'e:' .. id, me.e, 'd:' .. id, demand, 'f:' .. id, safe)
if ghost(me) > 0 then
  redis.call('HSET', key, 'g:' .. id, me.g, 'ge:' .. id, me.ge)
else
  redis.call('HDEL', key, 'g:' .. id, 'ge:' .. id)
end

local out = { new, target, learning and 1 or 0, over }
for _, who in ipairs(ids) do
  local r = rec[who]
  if r then
    table.insert(out, who)
    table.insert(out, r.s or 0)
    table.insert(out, live(r) and 1 or 0)
    table.insert(out, r.d or 0)
    table.insert(out, r.f or 0)
  end
end
return out
