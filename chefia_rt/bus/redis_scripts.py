"""The Lua scripts of the Redis bus: each a check-and-set that must be atomic across nodes."""

# KEYS[2], the owner's set of lock keys, never holds more than ARGV[5] (LOCKS_PER_TERMINAL)
# members: a new lease is refused (2) when it is full of live ones, after dropping the members
# that expired or were taken over. So no script ever walks more than that many keys.
ACQUIRE = """
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('HGET', KEYS[1], 'lock_id'), redis.call('HGET', KEYS[1], 'expires')}
end
local limit = tonumber(ARGV[5])
if not holder and redis.call('SISMEMBER', KEYS[2], KEYS[1]) == 0
    and redis.call('SCARD', KEYS[2]) >= limit then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if redis.call('HGET', key, 'owner') ~= ARGV[1] then redis.call('SREM', KEYS[2], key) end
  end
  if redis.call('SCARD', KEYS[2]) >= limit then return {2, '', '', '0'} end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lock_id', ARGV[2], 'expires', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], KEYS[1])
local keep = math.max(600000, tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
return {1, ARGV[1], ARGV[2], ARGV[4]}
"""
# Many leases in one command: a pipeline of HMGETs still parses (and awaits) each reply in
# Python, once per key on the write path; one script reply is parsed at once by hiredis.
READ_LEASES = """
local leases = {}
for i, key in ipairs(KEYS) do
  leases[i] = redis.call('HMGET', key, 'owner', 'lock_id', 'expires')
end
return leases
"""

RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
  return 1
end
return 0
"""
# Forget a terminal's presence and release its locks (at most LOCKS_PER_TERMINAL keys, see
# ACQUIRE), but only if `session` is still current:
# a terminal that already reconnected elsewhere keeps its locks. No presence at all counts as
# current: a Redis restart forgets every session's presence, and the terminals connected then
# would otherwise never release the locks they take afterwards (only their expiry would).
UNREGISTER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
local released = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
redis.call('DEL', KEYS[2])
return released
"""

# The RequestCache (cache.py says why): an entry is a hash {e: epoch, v: version, f: fresh until
# (ms, Redis clock), d: body} that expires `keep` ms after its put. The epoch key names the
# cache's generation; a Redis that restarted empty or was flushed has none, so the first caller
# makes a new one, and puts based on reads of the old generation are refused.
REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
CACHE_GET = (
    """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
"""
    + REDIS_NOW
    + """
local put_until = string.format('%.0f', now + tonumber(ARGV[2]))
local held = redis.call('HMGET', KEYS[1], 'e', 'v', 'f', 'd')
if held[1] ~= epoch then return {epoch, '0', put_until} end
if tonumber(held[3]) > now then return {epoch, held[2], put_until, held[4]} end
return {epoch, held[2], put_until}
"""
)
# Versions compare as decimal text (shorter is smaller): Lua numbers are doubles, exact only up
# to 2^53, and a version may go beyond that.
CACHE_PUT = (
    """
local function older(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local epoch = redis.call('GET', KEYS[1])
"""
    + REDIS_NOW
    + """
if ARGV[1] ~= '' then
  if epoch ~= ARGV[1] or now > tonumber(ARGV[2]) then return 0 end
elseif not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
end
local stored = 0
for i = 2, #KEYS do
  local a = 4 * (i - 2) + 4
  local held = redis.call('HMGET', KEYS[i], 'e', 'v')
  if held[1] ~= epoch or not older(ARGV[a], held[2]) then
    local fresh = string.format('%.0f', now + tonumber(ARGV[a + 1]))
    redis.call('HSET', KEYS[i], 'e', epoch, 'v', ARGV[a], 'f', fresh, 'd', ARGV[a + 3])
    redis.call('PEXPIRE', KEYS[i], ARGV[a + 2])
    stored = stored + 1
  end
end
return stored
"""
)
